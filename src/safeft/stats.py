"""Rates with their 95 % Wilson interval and n: the form every rate safeft prints or writes takes.

A rate from 100 prompts moves by several points between two honest runs; without its interval, a reader
cannot tell a real difference between two defenses from noise. The Wilson score interval is used rather
than the normal ("Wald") one because it stays inside [0, 1] and keeps its coverage near 0 % and 100 %,
where safety rates live (ASR 0 %, refusal 98 %): the Wald interval of 0 of 100 is [0, 0].

    >>> str(Rate(12, 100))
    '12.0 % [7.0, 19.8] (n=100)'

Pure functions, no dependencies beyond the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials.

    ``n = 0`` raises: a rate of nothing has no interval, and a silent (0, 1) would print as if measured.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"wilson needs integer counts, got k={k!r}, n={n!r}")
    if n <= 0:
        raise ValueError(f"wilson needs n >= 1 (a rate of nothing has no interval), got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"wilson needs z > 0, got {z}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly 0 or 1; float rounding must not put it a hair off.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``: the value, its Wilson interval, and the one way safeft prints it."""

    k: int
    n: int

    def __post_init__(self) -> None:
        # n = 0 is allowed ("no data", printed as such); anything else must be a valid count pair.
        if isinstance(self.k, bool) or isinstance(self.n, bool) or int(self.k) != self.k or int(self.n) != self.n:
            raise ValueError(f"Rate needs integer counts, got k={self.k!r}, n={self.n!r}")
        if not 0 <= self.k <= self.n:
            raise ValueError(f"Rate needs 0 <= k <= n, got k={self.k}, n={self.n}")

    @classmethod
    def of(cls, value: float, n: int) -> Rate:
        """The rate a stored ``value`` = k / n stands for; raises if ``value`` is not a share of ``n``."""
        if n == 0:
            return cls(0, 0)
        k = round(value * n)
        if not math.isclose(k / n, value, rel_tol=0, abs_tol=1e-9):
            raise ValueError(f"{value!r} is not k/{n} for any integer k: not a rate over {n} items")
        return cls(k, n)

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.k, self.n) if self.n else (float("nan"), float("nan"))

    def record(self) -> dict[str, Any]:
        low, high = self.ci
        return {"value": self.value, "ci": [low, high], "n": self.n}

    def format(self, digits: int = 1) -> str:
        if not self.n:
            return "– (n=0)"
        low, high = self.ci
        return f"{100 * self.value:.{digits}f} % [{100 * low:.{digits}f}, {100 * high:.{digits}f}] (n={self.n})"

    def __str__(self) -> str:
        return self.format()


def put_rate(entry: dict[str, Any], key: str, k: int, n: int) -> dict[str, Any]:
    """Write the rate ``k/n`` under ``key``, its interval under ``<key>_ci`` and ``n``; returns ``entry``.

    An entry that already carries a different ``n`` raises: two rates of one entry over different counts
    would print under one n and mislead."""
    if "n" in entry and entry["n"] != n:
        raise ValueError(f"{key}: counted over n={n}, but the entry already has n={entry['n']}")
    r = Rate(k, n)
    entry[key] = r.value if n else None
    entry[f"{key}_ci"] = list(r.ci) if n else None
    entry["n"] = n
    return entry


def add_intervals(entry: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Add ``<key>_ci`` for each rate ``key`` present in ``entry`` (a summary dict with its ``n``).

    For summaries that stored the rate and n but not the count: k is recovered as rate x n, and a value
    that is not a share of n raises rather than getting a made-up interval."""
    present = [k for k in keys if isinstance(entry.get(k), int | float) and not isinstance(entry.get(k), bool)]
    if present and "n" not in entry:
        raise ValueError(f"cannot add intervals for {present}: the entry has no 'n'")
    for key in present:
        r = Rate.of(float(entry[key]), int(entry.get("n_answered", entry["n"])))  # see rate_in
        entry[f"{key}_ci"] = list(r.ci) if r.n else None
    return entry


def rate_in(entry: Mapping[str, Any], key: str) -> Rate | None:
    """The :class:`Rate` stored under ``key`` of a summary entry (with its ``n``), or None if absent. A judged
    entry's rates are over the items the judge answered (``n_answered``, present when some were not), while its
    ``n`` stays every prompt: reading ``n`` there turned 1 harmful of 1 answered (of 2) into 2 of 2."""
    value = entry.get(key)
    if value is None or "n" not in entry:
        return None
    return Rate.of(float(value), int(entry.get("n_answered", entry["n"])))
