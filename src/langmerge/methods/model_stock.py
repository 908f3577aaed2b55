"""Model Stock: interpolate between the base and the models' average by their task vectors' mean cosine.

``t = n cos / (1 + (n - 1) cos)`` from the mean pairwise cosine of the task
vectors (over the whole tensor, or per row with ``filter_wise``); the merge is
``t * average + (1 - t) * base`` (docs/methods.md, "model_stock"). The cosines
are torch reductions over the whole tensor in mergekit 0.1.5: one chunk.
"""

from __future__ import annotations

import torch

from langmerge.methods.base import (
    Kernel,
    Method,
    MethodParameters,
    TensorInfo,
    TensorMerge,
    global_field,
    required_base,
)
from langmerge.methods.common import WholeTensorMerge


class ModelStockParameters(MethodParameters):
    filter_wise: bool = global_field(False, help="one interpolation per row (filter) instead of per tensor")


def model_stock(base: torch.Tensor, inputs: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, inputs = base.unsqueeze(0), [x.unsqueeze(0) for x in inputs]
    else:
        base, inputs = base.reshape(-1), [x.reshape(-1) for x in inputs]
    offsets = [x - base for x in inputs]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(inputs)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate there: keep the base
    t = torch.where(
        singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator)
    )
    average = sum(inputs) / n
    return (t * average + (1 - t) * base).reshape(shape)


class ModelStockMethod(Method[ModelStockParameters]):
    name = "model_stock"
    summary = "interpolate from the base towards the models' average by their task vectors' mean cosine"
    label = "Model Stock"
    reference = "https://arxiv.org/abs/2403.19522"
    parameter_model = ModelStockParameters
    min_models = 2

    def plan(
        self,
        params: ModelStockParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return WholeTensorMerge(
            tensor, lambda base, inputs: model_stock(required_base(base), inputs, params.filter_wise)
        )


MODEL_STOCK = ModelStockMethod()
