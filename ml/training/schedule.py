"""Per-step learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_LR_FACTOR = 0.01
"""The cosine ends at this fraction of the base learning rate."""


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = MIN_LR_FACTOR) -> Callable[[int], float]:
    """Multiplier of the base lr for the step about to run (0-based), for torch's LambdaLR."""
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = total_steps - warmup_steps
        if decay_steps <= 1:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
