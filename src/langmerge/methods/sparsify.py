"""Sparsification of one task vector: pure functions, one tensor in, one out.

Numerics follow REFERENCE §1.4 step 2 and §1.6 (mergekit 0.1.5 semantics):
masks are applied by multiplication, so signed zeros and dtypes come out
exactly as in mergekit; ranking is done on float32 magnitudes.
"""

from __future__ import annotations

import torch

from langmerge.methods import fused_cpu

L1_EPS = 1e-7


def keep_count(numel: int, density: float) -> int:
    """How many entries magnitude trimming keeps: ``max(1, int(d * numel))``, all for d >= 1, none for d <= 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_keep_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``keep_count`` entries of largest magnitude.

    Exact k-th selection (linear time) instead of a full sort. Entries tied
    with the k-th largest magnitude are kept in flat-index order until k are
    kept, so the count is exact even when magnitudes tie (zeros, bfloat16).
    """
    numel = tensor.numel()
    k = keep_count(numel, density)
    if k == numel:
        return torch.ones_like(tensor, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    if fused_cpu.available(tensor.dtype, tensor.device) and numel >= fused_cpu.MIN_NUMEL:
        return fused_cpu.keep_mask(tensor, k)  # the same selection by radix select, in linear time
    magnitude = tensor.detach().reshape(-1).abs().float()
    threshold = torch.kthvalue(magnitude, numel - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        tied = torch.nonzero(magnitude == threshold).reshape(-1)[:missing]
        keep[tied] = True
    return keep.reshape(tensor.shape)


def rescale_to_l1(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm matches ``original`` (mergekit's ``rescale``)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def magnitude_trim(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: zero all but the ``keep_count`` largest-magnitude entries."""
    if density >= 1:
        return tensor
    masked = tensor * magnitude_keep_mask(tensor, density)
    return rescale_to_l1(tensor, masked) if rescale else masked


def bernoulli_drop(
    tensor: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; optionally restore the L1 norm.

    Draws happen in the tensor's dtype for bfloat16 or off-CPU tensors and in
    float32 otherwise (CPU bernoulli lacks float16), as in mergekit, so a
    generator seeded like torch's global RNG reproduces mergekit's masks.
    """
    if density >= 1:
        return tensor
    work = tensor.dtype if (tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16) else torch.float32
    probabilities = torch.full_like(tensor, density, dtype=work)
    mask = torch.bernoulli(probabilities, generator=generator)
    original = tensor.to(work)
    masked = original * mask
    if rescale:
        masked = rescale_to_l1(original, masked)
    return masked.to(tensor.dtype)
