"""NuSLERP: spherical interpolation between two models, or between their task vectors (docs/methods.md, "nuslerp").

mergekit 0.1.5 normalises with torch norms over the whole flattened tensor
(``nuslerp_flatten``, the default), over each row's last dimension, or over
each column (``nuslerp_row_wise``); the reductions are torch's own over the
whole tensor, so the merge is one chunk (``WholeTensorMerge``).
"""

from __future__ import annotations

import torch

from langmerge.methods.base import Kernel, Method, MethodParameters, TensorInfo, TensorMerge, global_field, model_field
from langmerge.methods.common import WholeTensorMerge

EPS = 1e-8  # (1 - cos^2) at or below EPS^2 counts as colinear: interpolate linearly
NORM_FLOOR = 1e-7


class NuslerpParameters(MethodParameters):
    weights: list[float] = model_field(alias="weight", help="the two models' weights; t = w_2 / (w_1 + w_2)")
    row_wise: bool = global_field(False, alias="nuslerp_row_wise", help="interpolate each column (dim 0) separately")
    flatten: bool = global_field(True, alias="nuslerp_flatten", help="interpolate the whole tensor as one vector")


def interpolation_point(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    """Spherical interpolation along ``dim`` (or over the flattened tensors), linear where the two are colinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # keeps the unused branch finite
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


class NuslerpMethod(Method[NuslerpParameters]):
    name = "nuslerp"
    summary = "spherical interpolation of two models (of their task vectors when a base is given), t from the weights"
    label = "NuSLERP"
    reference = "https://github.com/arcee-ai/mergekit"
    base_policy = "optional"
    parameter_model = NuslerpParameters
    min_models = max_models = 2

    def plan(
        self,
        params: NuslerpParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        t = interpolation_point(params.weights)
        dim = 0 if params.row_wise else -1

        def merge(base: torch.Tensor | None, inputs: list[torch.Tensor]) -> torch.Tensor:
            if base is None:
                return nuslerp(t, inputs[0], inputs[1], dim, params.flatten)
            return base + nuslerp(t, inputs[0] - base, inputs[1] - base, dim, params.flatten)

        return WholeTensorMerge(tensor, merge)


NUSLERP = NuslerpMethod()
