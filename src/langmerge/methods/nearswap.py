"""NearSwap: take the other model's value where it is near the base's, the base's where they are far apart.

Per entry: ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, ``merged = w b + (1 - w) a`` with ``a`` the base
(docs/methods.md, "nearswap"). Elementwise: any chunk layout.
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
from langmerge.methods.common import ElementwiseMerge


class NearswapParameters(MethodParameters):
    t: float = global_field(help="the distance below which the other model's value is taken whole")


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


class NearswapMethod(Method[NearswapParameters]):
    name = "nearswap"
    summary = "per entry, the other model's value where it is within t of the base's, blended towards the base beyond"
    label = "NearSwap"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    parameter_model = NearswapParameters
    min_models = max_models = 1

    def plan(
        self,
        params: NearswapParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return ElementwiseMerge(lambda base, inputs: nearswap(required_base(base), inputs[0], params.t))


NEARSWAP = NearswapMethod()
