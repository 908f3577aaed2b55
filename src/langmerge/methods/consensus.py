"""Sign election and disjoint merging of weighted task vectors (TIES steps 4-5).

``weighted`` is always a stack of shape ``(n_models, *tensor_shape)``.
"""

from __future__ import annotations

import torch


def elect_sign(weighted: torch.Tensor, vote_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Majority sign by mass: +1 where the (scaled) sum is >= 0, else -1.

    ``vote_scale`` (shape ``(n_models,)``) multiplies each model's vote; it is
    how TIES-SV gives protected models ``1 + slack`` times the say. ``None``
    is plain TIES.
    """
    if vote_scale is not None:
        # Scaled votes are summed in at least float32 so that 1 + slack is not
        # rounded to bfloat16's 8 bits of mantissa.
        work = torch.promote_types(weighted.dtype, torch.float32)
        scale = vote_scale.to(device=weighted.device, dtype=work).reshape(-1, *([1] * (weighted.dim() - 1)))
        mass = (weighted.to(work) * scale).sum(dim=0)
    else:
        mass = weighted.sum(dim=0)
    return (mass >= 0).to(weighted.dtype) * 2 - 1


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Entries whose sign equals the elected sign; zeros (trimmed) never agree."""
    return weighted.sign() == sign


def disjoint_sum(weighted: torch.Tensor, weights: torch.Tensor, agree: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sum the agreeing entries; with ``normalize``, divide by the agreeing weights (0 -> 1)."""
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed
