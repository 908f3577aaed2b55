"""Multi-SLERP: barycentric interpolation of several models on the hypersphere (docs/methods.md, "multislerp").

The unit vectors' weighted mean is the point of tangency; the weighted mean
of the tangent vectors is mapped back to the sphere and scaled to the
weighted mean norm. Norms over the whole tensor, as mergekit 0.1.5 takes them
with torch: one chunk (``WholeTensorMerge``).
"""

from __future__ import annotations

import torch

from langmerge.errors import LangmergeError
from langmerge.methods.base import Kernel, Method, MethodParameters, TensorInfo, TensorMerge, global_field, model_field
from langmerge.methods.common import WholeTensorMerge


class MultislerpParameters(MethodParameters):
    weights: list[float] = model_field(alias="weight", help="the model's weight")
    normalize_weights: bool = global_field(True, help="divide the weights by their sum")
    eps: float = global_field(1e-8, help="added to norms before dividing")


def multislerp(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: MultislerpParameters, name: str
) -> torch.Tensor:
    if len(inputs) == 1:
        return inputs[0]  # mergekit returns the one model as it is, base or not
    vectors = torch.stack(inputs, dim=0)
    if base is not None:
        vectors -= base
    flat = vectors.view(vectors.shape[0], -1)
    w = torch.tensor(p.weights, dtype=vectors.dtype, device=vectors.device)
    if p.normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + p.eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < p.eps:
        if len(inputs) != 2:
            raise LangmergeError(
                f"tensor {name!r}: multislerp's weighted mean of the unit vectors is zero "
                "(antipodal vectors with balancing weights); change the weights"
            )
        result: torch.Tensor = (vectors[0] * w[0] + vectors[1] * w[1]).view(vectors.shape[1:])  # two models: linear
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + p.eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * w).sum()).view(vectors.shape[1:])
    return result if base is None else result + base


class MultislerpMethod(Method[MultislerpParameters]):
    name = "multislerp"
    summary = "barycentric interpolation of several models (or task vectors) on the hypersphere"
    label = "Multi-SLERP"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base_policy = "optional"
    parameter_model = MultislerpParameters

    def plan(
        self,
        params: MultislerpParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return WholeTensorMerge(tensor, lambda base, inputs: multislerp(base, inputs, params, tensor.name))


MULTISLERP = MultislerpMethod()
