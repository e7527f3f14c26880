"""Intervals for rates: every rate safeft reports carries its n and a 95 % Wilson interval."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95 % at z = 1.96); exact at k = 0 and k = n."""
    if n <= 0:
        raise ValueError(f"a rate needs n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes out of n={n} trials")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
