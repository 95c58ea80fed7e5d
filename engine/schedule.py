"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay.

One function of the optimizer step, handed to ``torch.optim.lr_scheduler.LambdaLR`` by
the Trainer; ``SCHEDULES`` names the choices, for ``TrainConfig`` and ``--scheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``s`` (0-based)."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


__all__ = ["SCHEDULES", "lr_lambda"]
