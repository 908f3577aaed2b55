"""Sparsification of one task vector: the steps, as pure functions (docs/methods.md, "TIES" and "DARE").

Numerics follow mergekit 0.1.5: masks are applied by multiplication, so signed
zeros and dtypes come out exactly as in mergekit; ranking is done on float32
magnitudes; DARE draws its masks with ``torch.bernoulli`` in the tensor's dtype
for bfloat16 or off-CPU tensors and in float32 otherwise (CPU bernoulli lacks
float16). One difference: ``rescale`` matches L1 norms summed exactly
(``exact.ExactL1``) where mergekit uses torch's order-dependent sum.

The functions on whole tensors (``magnitude_keep_mask``, ``magnitude_trim``,
``bernoulli_drop``) are the chunked steps run on one chunk.
"""

from __future__ import annotations

import torch

from langmerge.methods.exact import ExactL1
from langmerge.methods.selection import keep_count, select_mask

L1_EPS = 1e-7

__all__ = [
    "L1_EPS",
    "bernoulli_drop",
    "dare_work_dtype",
    "della_mask",
    "della_probabilities",
    "draw_mask",
    "keep_count",
    "magnitude_keep_mask",
    "magnitude_trim",
    "outlier_counts",
    "rescale_factor",
]


def dare_work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype DARE draws and masks in (mergekit's rule)."""
    return dtype if (device.type != "cpu" or dtype == torch.bfloat16) else torch.float32


def draw_mask(like: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's keep mask for one chunk, continuing ``generator``'s stream (one draw per entry, in flat order)."""
    probabilities = torch.full_like(like, density, dtype=dare_work_dtype(like.dtype, like.device))
    return torch.bernoulli(probabilities, generator=generator)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' selection (density < 1) as two top-k counts: keep the ``kept`` largest magnitudes, less the
    ``dropped`` largest of them.

    mergekit keeps ``int(density * numel)`` entries after dropping the ``int(gamma * numel)`` largest, and drops
    fewer outliers where that would leave too few entries (the smallest are dropped first).
    """
    target = int(density * numel)
    smallest = max(0, numel - target - int(gamma * numel))
    return numel - smallest, numel - smallest - target


def della_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry: ``density - epsilon`` for the smallest magnitude of its row up to
    ``density + epsilon`` for the largest, linear in the magnitude's rank along dim 1 (mergekit's steps and dtypes).

    ``rows`` is the task vector shaped ``(rows, n, ...)`` in the compute dtype; the result is in DARE's work dtype.
    """
    work = dare_work_dtype(rows.dtype, rows.device)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - low) / (high - low)).clamp(0, 1)
    # a row of one entry: mergekit divides 0 by 0 and torch.bernoulli refuses the NaN (a bug); its rank is the
    # middle one here, so it is kept with probability ``density``
    spread = torch.where(high > low, spread, 0.5)
    return (density - epsilon) + spread * 2 * epsilon


def della_mask(rows: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """DELLA's keep mask for whole rows, continuing ``generator``'s stream (one draw per entry, in flat order)."""
    return torch.bernoulli(della_probabilities(rows, density, epsilon), generator=generator)


def rescale_factor(before: ExactL1, after: ExactL1, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """``before / after`` as a 0-d tensor of ``dtype``, or None where either norm is below ``L1_EPS`` (no rescale)."""
    b = torch.tensor(before.value(dtype), dtype=dtype, device=device)
    a = torch.tensor(after.value(dtype), dtype=dtype, device=device)
    if b < L1_EPS or a < L1_EPS:
        return None
    return b / a


def magnitude_keep_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of exactly ``keep_count`` entries of largest magnitude.

    Entries tied with the k-th largest magnitude are kept in flat-index order
    until k are kept, so the count is exact even when magnitudes tie (zeros,
    bfloat16).
    """
    return select_mask(tensor, keep_count(tensor.numel(), density))


def _l1(t: torch.Tensor) -> ExactL1:
    total = ExactL1()
    total.add(t)
    return total


def _rescaled(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    factor = rescale_factor(_l1(original), _l1(masked), masked.dtype, masked.device)
    return masked if factor is None else masked * factor


def magnitude_trim(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: zero all but the ``keep_count`` largest-magnitude entries."""
    if density >= 1:
        return tensor
    masked = tensor * magnitude_keep_mask(tensor, density)
    return _rescaled(tensor, masked) if rescale else masked


def bernoulli_drop(
    tensor: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``; optionally restore the L1 norm."""
    if density >= 1:
        return tensor
    mask = draw_mask(tensor, density, generator)
    original = tensor.to(mask.dtype)
    masked = original * mask
    if rescale:
        masked = _rescaled(original, masked)
    return masked.to(tensor.dtype)
