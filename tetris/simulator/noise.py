"""Seeded multiplicative noise on simulated durations (real kernels are not perfectly
predictable; a planner that only works on exact durations is fragile)."""

from __future__ import annotations

import math
import random


class DurationNoise:
    """Multiplies a duration by a log-normal factor with mean 1 and coefficient of variation
    `cv` (0 = exact durations, and no random numbers are drawn at all)."""

    __slots__ = ("_mu", "_rng", "_sigma", "cv")

    def __init__(self, cv: float = 0.0, seed: int = 0) -> None:
        if cv < 0 or not math.isfinite(cv):
            raise ValueError(f"noise cv must be a finite number >= 0, got {cv}")
        self.cv = cv
        self._sigma = math.sqrt(math.log1p(cv * cv))
        self._mu = -0.5 * self._sigma * self._sigma
        self._rng = random.Random(seed)

    def apply(self, seconds: float) -> float:
        if self.cv == 0.0:
            return seconds
        return seconds * math.exp(self._rng.gauss(self._mu, self._sigma))
