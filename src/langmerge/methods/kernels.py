"""Per-tensor merge kernels: tensors and resolved numbers in, one tensor out.

These are the whole numerics of langmerge (REFERENCE §1.2-1.6); the engine,
the in-memory tuner and the analysis all call them, so a merge gives the same
bits whichever way it is run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from langmerge.methods import fused_cpu
from langmerge.methods.consensus import agreement_mask, disjoint_sum, elect_sign
from langmerge.methods.registry import MergeMethod
from langmerge.methods.sparsify import bernoulli_drop, magnitude_trim


@dataclass(frozen=True)
class TensorParameters:
    """Every number one tensor's merge needs, already resolved for that tensor."""

    weights: list[float]
    normalize: bool
    densities: list[float] = field(default_factory=list)
    rescale: bool = False
    lam: float = 1.0
    slack: float = 0.0
    protected: list[bool] = field(default_factory=list)


def linear(inputs: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """``sum w_i x_i`` (over ``sum w_i`` with normalize), accumulated in float32 (float64 for float64)."""
    first = inputs[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc, device=first.device)
    result = torch.zeros_like(first, dtype=acc)
    for x, coefficient in zip(inputs, w.unbind(0)):
        result.addcmul_(x, coefficient)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def sparsified_task_vectors(
    method: MergeMethod,
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    p: TensorParameters,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Stack of ``(x_i - base)``, each trimmed or dropped per ``method`` (unweighted)."""
    deltas = base.new_empty((len(inputs), *base.shape))
    for i, x in enumerate(inputs):
        delta = x - base
        if method.sparsification == "magnitude":
            delta = magnitude_trim(delta, p.densities[i], p.rescale)
        elif method.sparsification == "random":
            delta = bernoulli_drop(delta, p.densities[i], p.rescale, generators[i] if generators else None)
        deltas[i] = delta
        del delta
    return deltas


def weight_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(n, 1, ..., 1)`` to broadcast over a stack like ``like``."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def vote_scale(p: TensorParameters) -> torch.Tensor | None:
    """TIES-SV's per-model vote multipliers, or None when the vote is plain TIES."""
    if p.slack == 0 or not any(p.protected):
        return None
    return torch.tensor([1.0 + p.slack if prot else 1.0 for prot in p.protected], dtype=torch.float64)


class NonFiniteMerge(ArithmeticError):
    """The merged tensor holds NaN or Inf (an input does, or normalizing weights sum to zero)."""


def merge_tensor(
    method: MergeMethod,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    p: TensorParameters,
    generators: list[torch.Generator] | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Merge one tensor. ``inputs`` exclude the base; all share one compute dtype.

    With ``fused`` (the default) task arithmetic, TIES and TIES-SV run on the
    CPU in ``fused_cpu``, which gives the same bits as the steps below.
    Raises ``NonFiniteMerge`` when the result holds NaN or Inf: every step
    multiplies its masks, so a NaN or Inf in any input always reaches it.
    """
    if not method.uses_base:
        return _finite(linear(inputs, p.weights, p.normalize))
    if not inputs:
        return _finite(base)
    if (
        fused
        and method.sparsification in (None, "magnitude")
        and not (method.sparsification and p.rescale)
        and fused_cpu.available(base.dtype, base.device)
        and base.numel() >= fused_cpu.MIN_NUMEL
    ):
        scale = vote_scale(p)
        merged = fused_cpu.merge_tensor_fused(
            base,
            inputs,
            p.weights,
            p.densities if method.sparsification else None,
            method.consensus,
            p.normalize,
            p.lam,
            scale.tolist() if scale is not None else None,
        )
        if merged is not None:
            merged, nonfinite = merged
            if nonfinite:
                raise NonFiniteMerge
            return merged
    weighted = sparsified_task_vectors(method, base, inputs, p, generators)
    w = weight_column(p.weights, weighted)
    weighted.mul_(w)
    if method.consensus:
        agree = agreement_mask(weighted, elect_sign(weighted, vote_scale(p)))
        mixed = disjoint_sum(weighted, w, agree, p.normalize)
    else:
        mixed = weighted.sum(dim=0)
        if p.normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if p.lam != 1:
        mixed *= p.lam
    return _finite((base + mixed).to(base.dtype))


def _finite(t: torch.Tensor) -> torch.Tensor:
    if not fused_cpu.all_finite(t):
        raise NonFiniteMerge
    return t
