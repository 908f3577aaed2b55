"""SLERP: spherical interpolation from the base to one model, over the whole tensor (docs/methods.md, "slerp").

mergekit 0.1.5 sums the norms and the dot product in segments of 2^20
entries (the norm of the segments' norms; the sum of the segments' dots),
each segment reduced by torch in float32 (float64 for float64 inputs). Here
every segment lies inside one chunk (``ChunkRule(multiple_of=SEGMENT)``), a
norms pass and a dots pass keep one value per segment, and the merge pass is
elementwise: the bits are mergekit's, in flat memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from langmerge.methods.base import (
    Block,
    ChunkRule,
    Kernel,
    Method,
    MethodParameters,
    Pass,
    TensorInfo,
    TensorMerge,
    global_field,
)
from langmerge.methods.common import finite

SEGMENT = (
    1 << 20
)  # mergekit's scratch segment, in entries (one tensor at a time, as merge_tensors and mergekit-yaml run)
DOT_THRESHOLD = 0.9995  # above this |cos|, the two are (anti)parallel: interpolate linearly
EPS = 1e-8  # a norm at or below this counts as 1


class SlerpParameters(MethodParameters):
    t: float = global_field(help="the interpolation point: 0 is the base, 1 the other model")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(block: Block) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The block's 2^20-entry segments (the last one of the tensor may be shorter): (base, other) in the work dtype."""
    base = block.required_base
    work = _work_dtype(base.dtype)
    for a in range(0, block.numel, SEGMENT):
        yield (base[a : a + SEGMENT].to(work).reshape(1, -1), block.inputs[0][a : a + SEGMENT].to(work).reshape(1, -1))


class _Norms(Pass):
    def __init__(self, merge: SlerpMerge):
        self.merge = merge
        self.base: list[torch.Tensor] = []
        self.other: list[torch.Tensor] = []

    def update(self, block: Block) -> None:
        for x, y in _segments(block):
            self.base.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
            self.other.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))

    def finish(self) -> None:
        norms = []
        for parts in (self.base, self.other):
            norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
            norms.append(torch.where(norm > EPS, norm, 1))
        self.merge.norm_base, self.merge.norm_other = norms


class _Dots(Pass):
    def __init__(self, merge: SlerpMerge):
        self.merge = merge
        self.parts: list[torch.Tensor] = []

    def update(self, block: Block) -> None:
        m = self.merge
        assert m.norm_base is not None and m.norm_other is not None  # the norms pass ran first
        for x, y in _segments(block):
            self.parts.append(((x / m.norm_base) * (y / m.norm_other)).sum(dim=1, keepdim=True))

    def finish(self) -> None:
        self.merge.coefficients(torch.stack(self.parts).sum(dim=0).clamp(-1, 1))


class SlerpMerge(TensorMerge):
    chunk_rule = ChunkRule(multiple_of=SEGMENT)

    def __init__(self, p: SlerpParameters, tensor: TensorInfo):
        self.t = torch.tensor([[p.t]], dtype=_work_dtype(tensor.dtype), device=tensor.device)
        self.empty = tensor.numel == 0
        self.norm_base: torch.Tensor | None = None
        self.norm_other: torch.Tensor | None = None
        # set by the statistics passes
        self.coef_base: torch.Tensor | None = None
        self.coef_other: torch.Tensor | None = None

    def statistics(self) -> Iterator[Pass]:
        if self.empty:
            return
        yield _Norms(self)
        yield _Dots(self)

    def coefficients(self, cos: torch.Tensor) -> None:
        """The two interpolation coefficients from the cosine (linear where the vectors are (anti)parallel)."""
        t = self.t
        linear = cos.abs() > DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0, cos))  # keeps the unused branch finite
        sin_theta = torch.sin(theta)
        self.coef_base = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        self.coef_other = torch.where(linear, t, torch.sin(t * theta) / sin_theta)

    def merge(self, block: Block) -> torch.Tensor:
        work = self.t.dtype
        base = block.required_base
        assert self.coef_base is not None and self.coef_other is not None  # set by the passes
        x, y = base.to(work).reshape(1, -1), block.inputs[0].to(work).reshape(1, -1)
        return finite((self.coef_base * x + self.coef_other * y).reshape(-1).to(base.dtype))


class SlerpMethod(Method[SlerpParameters]):
    name = "slerp"
    summary = "spherical interpolation from the base (t = 0) to the other model (t = 1)"
    label = "SLERP"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    parameter_model = SlerpParameters
    min_models = max_models = 1

    def plan(
        self,
        params: SlerpParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return SlerpMerge(params, tensor)


SLERP = SlerpMethod()
