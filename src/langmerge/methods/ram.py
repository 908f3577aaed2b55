"""RAM and RAM+ (tensor-local): merge entries that one model changes whole, average those several change.

Per entry, the models whose task vector exceeds ``epsilon`` in magnitude
contribute: where only one does, its value is taken (RAM+ scales it by
``1 + r * min(max(rho, 0), alpha)``, ``rho`` the model's shared over unique
entries in the tensor); where several do, their mean (docs/methods.md, "ram").
RAM is elementwise; RAM+ counts each model's shared and unique entries in one
exact pass first.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from langmerge.methods.base import (
    Block,
    Kernel,
    Method,
    MethodParameters,
    Pass,
    TensorInfo,
    TensorMerge,
    global_field,
    required_base,
)
from langmerge.methods.common import ElementwiseMerge, finite, widened


class RamParameters(MethodParameters):
    epsilon: float = global_field(1e-5, help="task-vector entries at most this large in magnitude do not count")


class RamPlusParameters(RamParameters):
    r: float = global_field(0.1, help="how much a model's unique entries are amplified per unit of rho")
    alpha: float = global_field(0.2, help="the largest rho that counts")


def _contributions(
    base: torch.Tensor, inputs: list[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors (models x entries), which exceed epsilon, and per entry how many do."""
    vectors = torch.stack([x - base for x in inputs], dim=0).view(len(inputs), -1)
    counted = vectors.abs() > epsilon
    contributors = counted.sum(dim=0, keepdim=True)
    return vectors, counted, contributors


def ram(
    base: torch.Tensor, inputs: list[torch.Tensor], epsilon: float, amplify: torch.Tensor | None = None
) -> torch.Tensor:
    """One chunk; ``amplify`` (one factor per model, RAM+) scales the entries a model alone changes."""
    vectors, counted, contributors = _contributions(base, inputs, epsilon)
    shared, unique = contributors > 1, contributors == 1
    kept = vectors * counted
    alone = kept * unique if amplify is None else kept * unique * amplify.unsqueeze(-1)
    merged = (alone + kept * shared / contributors.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


class _Counts(Pass):
    """Per model, the entries it changes that others change too (shared) and that it alone changes (unique)."""

    def __init__(self, merge: RamPlusMerge):
        self.merge = merge
        # exact integer counts, one per model, as torch int64 tensors once seen
        self.shared: torch.Tensor | int = 0
        self.unique: torch.Tensor | int = 0

    def update(self, block: Block) -> None:
        _, counted, contributors = _contributions(block.required_base, block.inputs, self.merge.p.epsilon)
        self.shared = self.shared + (counted & (contributors > 1)).sum(dim=1).cpu()
        self.unique = self.unique + (counted & (contributors == 1)).sum(dim=1).cpu()

    def finish(self) -> None:
        p = self.merge.p
        if not isinstance(self.shared, torch.Tensor) or not isinstance(self.unique, torch.Tensor):
            return  # an empty tensor: nothing to merge
        rho = self.shared / self.unique.clamp(min=p.epsilon)
        self.merge.amplify = 1 + p.r * rho.clamp(min=0, max=p.alpha)


class RamPlusMerge(TensorMerge):
    def __init__(self, p: RamPlusParameters, tensor: TensorInfo):
        self.p, self.tensor = p, tensor
        self.amplify: torch.Tensor | None = None
        self.result_dtype = widened(tensor.dtype)  # the float32 factors promote mergekit's result

    def statistics(self) -> Iterator[Pass]:
        yield _Counts(self)

    def merge(self, block: Block) -> torch.Tensor:
        base = block.required_base
        assert self.amplify is not None  # set by the counting pass
        return finite(ram(base, block.inputs, self.p.epsilon, self.amplify.to(base.device)))


class RamMethod(Method[RamParameters]):
    name = "ram"
    summary = "per entry, a model's value where it alone changes it, the mean where several do (RAM)"
    label = "RAM"
    reference = "https://arxiv.org/abs/2601.13572"
    parameter_model = RamParameters

    def plan(
        self,
        params: RamParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return ElementwiseMerge(lambda base, inputs: ram(required_base(base), inputs, params.epsilon))


class RamPlusMethod(Method[RamPlusParameters]):
    name = "ramplus_tl"
    summary = "RAM with each model's unique entries amplified by its share of shared entries in the tensor (RAM+)"
    label = "RAM+ (tensor-local)"
    reference = "https://arxiv.org/abs/2601.13572"
    parameter_model = RamPlusParameters

    def plan(
        self,
        params: RamPlusParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return RamPlusMerge(params, tensor)


RAM = RamMethod()
RAMPLUS_TL = RamPlusMethod()
