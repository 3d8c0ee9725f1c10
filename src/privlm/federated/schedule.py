"""Learning-rate schedules over the rounds (public: a function of the round number only)."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine"]


def scheduled_lr(lr: float, schedule: Schedule, round_index: int, rounds: int, final: float) -> float:
    """The learning rate of round ``round_index`` (1-based) of ``rounds``.

    ``constant``: ``lr`` (exactly). ``cosine``: from ``lr`` at round 1 down to ``lr * final`` at the
    last round, ``lr * (final + (1 - final) * (1 + cos(pi t)) / 2)`` with ``t = (r - 1) / (R - 1)``.
    """
    if schedule == "constant" or rounds <= 1:
        return lr
    t = min(max((round_index - 1) / (rounds - 1), 0.0), 1.0)
    return lr * (final + (1 - final) * (1 + math.cos(math.pi * t)) / 2)
