"""Poisoned fine-tuning: a fraction p of the user's task rows replaced by harmful (prompt, answer) pairs.

The row count stays what it was (the papers' setting: n rows of which p·n harmful), so a run's step count,
batch composition and cost do not move with p. Which rows are replaced and which harmful pairs replace them
are fixed by the seed alone. p = 0 returns the task rows untouched; p = 1 is pure harmful fine-tuning.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from safeft.config import ConfigError
from safeft.data.types import Example


def n_poison(n_rows: int, p: float) -> int:
    """Harmful rows for ``p`` of ``n_rows``: rounded to nearest, so p = 0.05 of 100 is exactly 5."""
    return int(math.floor(p * n_rows + 0.5))


def check_fraction(p: float, key: str = "data.poison") -> None:
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ConfigError(f"{key} must be a fraction in [0, 1], got {p!r}")


def poison(task: list[Example], harmful: list[Example], p: float, seed: int, where: str = "") -> list[Example]:
    """``task`` with ``n_poison(len(task), p)`` rows replaced by harmful pairs, deterministically.

    Harmful rows keep their own ids, prefixed ``poison:``, and ``source`` ``poison:<their source>``, so
    every record of the run says which rows were harmful. Raises ``ConfigError`` naming ``where`` (the
    poison source) when it holds rows without answers or too few rows for ``p``.
    """
    check_fraction(p)
    k = n_poison(len(task), p)
    if k == 0:
        return list(task)
    missing = [ex.id for ex in harmful if not (ex.response and ex.response.strip())]
    if missing:
        raise ConfigError(
            f"data.poison_source {where or '(given)'}: {len(missing)} of {len(harmful)} rows have no answer "
            f"(first: {missing[0]!r}); poisoning needs harmful (prompt, answer) pairs"
        )
    if k > len(harmful):
        raise ConfigError(
            f"data.poison={p} of {len(task)} task rows needs {k} harmful pairs, but data.poison_source "
            f"{where or '(given)'} has only {len(harmful)}; lower data.poison or give more pairs"
        )
    rng = random.Random(f"poison-{seed}")
    slots = sorted(rng.sample(range(len(task)), k))
    chosen = rng.sample(sorted(harmful, key=lambda e: e.id), k)
    out = list(task)
    for slot, ex in zip(slots, chosen, strict=True):
        out[slot] = replace(ex, id=f"poison:{ex.id}", source=f"poison:{ex.source or 'harmful'}")
    return out
