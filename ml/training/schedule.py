"""Per-step learning-rate schedules: linear warmup, then a cosine decay over the whole run (single-label), or the
base lr held and a cosine decay over the last fifth of the steps only (warmup-stable-decay, multi-label)."""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_LR_FACTOR = 0.01
"""The cosine ends at this fraction of the base learning rate."""


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def _cosine(progress: float, min_factor: float) -> float:
    """From 1 at ``progress`` 0 to ``min_factor`` at 1."""
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = MIN_LR_FACTOR) -> Callable[[int], float]:
    """Multiplier of the base lr for the step about to run (0-based), for torch's LambdaLR."""
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        decay_steps = total_steps - warmup_steps
        if decay_steps <= 1:
            return 1.0
        return _cosine((step - warmup_steps) / (decay_steps - 1), min_factor)

    return factor


DECAY_FRACTION = 0.2
"""Warmup-stable-decay: the share of all steps, at the end of the run, over which the lr decays."""


def warmup_stable_decay(total_steps: int, warmup_steps: int, decay_fraction: float = DECAY_FRACTION,
                        min_factor: float = MIN_LR_FACTOR) -> Callable[[int], float]:
    """Multiplier of the base lr for the step about to run (0-based): linear warmup, the base lr, then a cosine from
    it to ``min_factor`` over the last ``decay_fraction`` of the steps (it reaches ``min_factor`` at the last step).

    The multi-label schedule. Measured in ``bench/training.py --scenario multilabel`` (docs/multilabel.md): a run of a
    few epochs there is still far from converged (validation mAP rises every epoch), and the whole-run cosine,
    whose mean lr is half the base lr, lost to a constant-lr loop; holding the lr keeps the learning, and the short
    decay at the end still settles the weights the package keeps.
    """
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = min(total_steps - warmup_steps, max(1, round(decay_fraction * total_steps)))
    decay_start = total_steps - decay_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        if step < decay_start or decay_steps <= 0:
            return 1.0
        return _cosine((step - decay_start + 1) / decay_steps, min_factor)

    return factor


SHORT_SCHEDULE_EPOCHS = 10
"""Below this many epochs a run is a short fine-tune: no warmup, no label smoothing unless asked for."""
LONG_SCHEDULE_WARMUP_FRACTION = 0.05
LONG_SCHEDULE_MAX_WARMUP_EPOCHS = 5.0
LONG_SCHEDULE_LABEL_SMOOTHING = 0.1


def schedule_defaults(epochs: int) -> tuple[float, float]:
    """``(warmup_epochs, label_smoothing)`` for a request that leaves them unset, scaled with the schedule.

    Measured in ``bench/training.py --scenario finetune`` (docs/performance.md; 3 seeds, test accuracy): at
    3 epochs from a pretrained backbone, defaults 0.974 against a plain constant-lr AdamW loop's 0.952; one
    warmup epoch drops ours to 0.955 and label smoothing 0.1 to 0.972 (no gain); at 5 epochs all within
    0.001. Both are regularisers of long schedules, so they start at ``SHORT_SCHEDULE_EPOCHS``: warmup 5% of
    the epochs (at most 5), smoothing 0.1.
    """
    if epochs < SHORT_SCHEDULE_EPOCHS:
        return 0.0, 0.0
    warmup = min(LONG_SCHEDULE_MAX_WARMUP_EPOCHS, round(LONG_SCHEDULE_WARMUP_FRACTION * epochs, 2))
    return warmup, LONG_SCHEDULE_LABEL_SMOOTHING
