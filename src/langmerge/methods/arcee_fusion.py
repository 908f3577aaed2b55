"""Arcee Fusion: take the model's changes only where they are important (docs/methods.md, "arcee_fusion").

Importance is ``|x - b|`` times the KL divergence between the softmaxes of
each last-dimension row of ``x`` and ``b``; the threshold is
``median + 1.5 (q3 - q1)`` of the importance over the tensor, whose quartiles
mergekit 0.1.5 reads from the sorted importance, or from a sample of 10^6
entries drawn with replacement where the tensor is larger. mergekit draws
that sample from torch's global stream; here from the merge's seeded
generator (``parameters.seed``), as DARE's masks. One chunk: the softmaxes
and the sort are torch's over the whole tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langmerge.methods.base import (
    Kernel,
    Method,
    MethodParameters,
    TensorInfo,
    TensorMerge,
    global_field,
    required_base,
)
from langmerge.methods.common import WholeTensorMerge, widened

SAMPLE = 1_000_000  # above this many entries, the quartiles come from a sample of this size
QUARTILES = (0.25, 0.5, 0.75)


class ArceeFusionParameters(MethodParameters):
    seed: int = global_field(0, help="seed of the sample the quartiles are read from (tensors above 10^6 entries)")


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|x - base|`` times the KL divergence of the rows' softmaxes (last dimension)."""
    eps = 1e-8
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (x - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), device=flat.device, generator=generator)]
    ordered, _ = torch.sort(flat)
    positions = (torch.tensor(QUARTILES).to(ordered.device) * (ordered.numel() - 1)).long()
    return ordered[positions]


def arcee_fusion(base: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    score = importance(x, base)
    q1, median, q3 = quartiles(score, generator)
    mask: torch.Tensor = (score >= median + 1.5 * (q3 - q1)).float()
    return base + (x - base) * mask


class ArceeFusionMethod(Method[ArceeFusionParameters]):
    name = "arcee_fusion"
    summary = "the model's changes where their importance (|change| x row KL divergence) is an upper outlier"
    label = "Arcee Fusion"
    reference = "https://arcee.ai"
    parameter_model = ArceeFusionParameters
    min_models = max_models = 1
    randomized = True  # the quartile sample of tensors above 10^6 entries

    def plan(
        self,
        params: ArceeFusionParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        generator = generators[0] if generators else None
        return WholeTensorMerge(
            tensor,
            lambda base, inputs: arcee_fusion(required_base(base), inputs[0], generator),
            result_dtype=widened(tensor.dtype),
        )


ARCEE_FUSION = ArceeFusionMethod()
