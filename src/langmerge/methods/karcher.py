"""The Karcher mean: the models' Riemannian centre of mass on the hypersphere (docs/methods.md, "karcher").

Equal weights, no base (a recipe's base_model is one more input, as in
mergekit 0.1.5); the mean of the unit vectors is refined by at most
``max_iter`` steps along the mean of the log maps, then scaled to the mean
norm. Every step is mergekit's torch step on the whole tensor (a dot product
per model and step): one chunk (``WholeTensorMerge``).
"""

from __future__ import annotations

from typing import cast

import torch

from langmerge.methods.base import Kernel, Method, MethodParameters, TensorInfo, TensorMerge, global_field
from langmerge.methods.common import WholeTensorMerge


class KarcherParameters(MethodParameters):
    max_iter: int = global_field(10, help="the most refinement steps")
    tol: float = global_field(1e-5, help="norms, angles and steps below this count as zero")


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return cast(torch.Tensor, sum(x * 0 for x in tensors))  # zeros of the inputs' dtype, as mergekit's
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    length = torch.linalg.vector_norm(mean.to(work))
    mean = points[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)  # the log map of u at the mean
        size = torch.linalg.vector_norm(step.to(work))
        if size.item() < tol:
            break
        mean = (torch.cos(size) * mean + torch.sin(size) * (step / size)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(work))
        if size.item() > tol:
            mean = (mean / size).to(mean.dtype)
    return cast(torch.Tensor, sum(a * n for a, n in zip(alphas, norms))) * mean


class KarcherMethod(Method[KarcherParameters]):
    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models on the hypersphere, scaled to their mean norm"
    label = "Karcher mean"
    reference = "https://arxiv.org/abs/2603.04972"
    base_policy = "input"
    parameter_model = KarcherParameters

    def plan(
        self,
        params: KarcherParameters,
        tensor: TensorInfo,
        kernel: Kernel = "reference",
        generators: list[torch.Generator] | None = None,
    ) -> TensorMerge:
        return WholeTensorMerge(tensor, lambda base, inputs: karcher_mean(inputs, params.max_iter, params.tol))


KARCHER = KarcherMethod()
