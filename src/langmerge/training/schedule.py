"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

A pure function of the step, so that a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, floor_lr: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``peak * (step + 1) / warmup`` for the first ``warmup`` steps. Then cosine from
    ``peak`` (first step after warm-up) to ``floor`` (last step).
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside 0..{total_steps - 1}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = (step - warmup_steps) / decay_steps if decay_steps > 0 else 0.0
    return floor_lr + 0.5 * (peak_lr - floor_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup: float) -> int:
    """Warm-up steps from a fraction of the run (< 1) or a step count (>= 1)."""
    if warmup < 0:
        raise ValueError(f"warm-up {warmup} is negative")
    steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    return min(steps, max(total_steps - 1, 0))
