"""Deterministic data splits and the train/test leakage guard.

The safety numbers this project reports are only meaningful if the harmful prompts used to *measure*
safety were never used to *train* or *tune* it. The fixed protocol is:

* **align / anchor / dev** come from Do-Not-Answer (shuffled with a seeded RNG, cut into disjoint sets):
  ``align`` for safety alignment data, ``anchor`` for defenses that regularise towards refusals during
  fine-tuning, ``dev`` for choosing hyper-parameters honestly.
* **test** is HarmBench (all 200 behaviours) and is never trained or tuned on.

:func:`assert_no_leakage` enforces this at split time, and callers that build their own training sets
should call it again before training.

The benign over-refusal probes have their own fixed train / dev / test split (``safeft.data.probes``);
:func:`assert_probes_held_out` raises when a test-split probe appears in training data, and the alignment
data and every defense's aux data are checked with it.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from safeft.data.types import Example, normalise_prompt

__all__ = [
    "MIN_EMBED_CHARS",
    "LeakageError",
    "SafetySplits",
    "assert_no_leakage",
    "assert_probes_held_out",
    "find_leaks",
    "safety_splits",
    "split_ids",
]

log = logging.getLogger(__name__)

# A test prompt only counts as "embedded" in a longer training prompt when its normalised form is at least
# this long: short prompts ("how to make a bomb") occur by chance inside unrelated text, while a 30+
# character sentence inside a training prompt is almost always a template wrapped around the test item.
MIN_EMBED_CHARS = 30

_SHOW = 3  # offending prompts quoted per set in a LeakageError
_TRUNC = 80  # characters per quoted prompt


class LeakageError(AssertionError):
    """A held-out test prompt occurs in a training (or tuning) set."""


@dataclass(frozen=True)
class SafetySplits:
    """Harmful-prompt splits: Do-Not-Answer for align/anchor/dev, HarmBench for test."""

    align: list[Example]
    anchor: list[Example]
    dev: list[Example]
    test: list[Example]


def find_leaks(test: Sequence[Example], train: Sequence[Example]) -> list[Example]:
    """Test examples whose prompt occurs in ``train``, in ``test`` order.

    Matching is on :func:`normalise_prompt` forms (case, whitespace and edge punctuation ignored) and
    counts a test prompt as leaked when a training prompt equals it, or when a training prompt *contains*
    it and it is at least :data:`MIN_EMBED_CHARS` long (templated leakage such as
    ``"Answer the following: <test prompt>"``). Paraphrases are not detected: this is a cheap guard
    against copying mistakes, not a semantic de-duplicator.
    """
    train_norm = [normalise_prompt(ex.prompt) for ex in train]
    train_exact = set(train_norm)
    leaked: list[Example] = []
    for ex in test:
        t = normalise_prompt(ex.prompt)
        # Exact hits go through the set first; the quadratic substring scan only runs for long prompts.
        if not t:
            continue
        if t in train_exact or (len(t) >= MIN_EMBED_CHARS and any(_embedded(t, s) for s in train_norm)):
            leaked.append(ex)
    return leaked


def _embedded(test_norm: str, train_norm: str) -> bool:
    """Whether a long-enough normalised test prompt sits inside a longer normalised training prompt."""
    return len(test_norm) >= MIN_EMBED_CHARS and len(train_norm) > len(test_norm) and test_norm in train_norm


def assert_no_leakage(test: Sequence[Example], **train_sets: Sequence[Example]) -> None:
    """Raise :class:`LeakageError` if any ``test`` prompt occurs in any named set (see :func:`find_leaks`).

    Usage: ``assert_no_leakage(harmbench, align=align, anchor=anchor)``. The message names every leaking
    set, how many distinct test prompts leaked into it, and the first few of them.
    """
    problems: list[str] = []
    for name, train in train_sets.items():
        leaked = find_leaks(test, train)
        if not leaked:
            continue
        # Several copies of one test prompt in the test set would inflate the count; report distinct ones.
        distinct = list(dict.fromkeys(normalise_prompt(ex.prompt) for ex in leaked))
        shown = ", ".join(repr(_truncate(p)) for p in distinct[:_SHOW])
        more = f" (+{len(distinct) - _SHOW} more)" if len(distinct) > _SHOW else ""
        problems.append(f"{len(distinct)} test prompt(s) leak into {name!r}: {shown}{more}")
    if problems:
        raise LeakageError("test/train leakage: " + "; ".join(problems))


def assert_probes_held_out(**train_sets: Sequence[Example]) -> None:
    """Raise :class:`LeakageError` if a test-split over-refusal probe occurs in any named training set.

    Usage: ``assert_probes_held_out(alignment=rows)``. The test probes are what over-refusal is reported
    on; one of them in the training data would make that number a training-set number."""
    from safeft.data.probes import over_refusal_probes

    try:
        assert_no_leakage(over_refusal_probes("test"), **train_sets)
    except LeakageError as e:
        raise LeakageError(f"over-refusal test probes in training data: {e}") from None


def _truncate(text: str) -> str:
    return text if len(text) <= _TRUNC else text[: _TRUNC - 3] + "..."


def safety_splits(
    seed: int = 0,
    n_align: int = 400,
    n_anchor: int = 128,
    n_dev: int = 100,
    exclude_categories: tuple[str, ...] = ("human_chatbox",),
) -> SafetySplits:
    """Disjoint Do-Not-Answer align/anchor/dev sets and the HarmBench test set, fixed by ``seed``.

    ``human_chatbox`` is excluded by default: it holds mental-health, loneliness and over-reliance
    prompts ("I feel so alone", "can you be my friend?") where a canned refusal is the *wrong* answer, so
    training refusals on them would teach the model to stonewall vulnerable users.

    Do-Not-Answer prompts that HarmBench would flag as leaked (same normalised prompt, or containing a
    long HarmBench prompt) are dropped before cutting, as are normalised duplicates within Do-Not-Answer
    (one prompt must not land in both align and dev). Both counts are logged.
    """
    # Import here so `splits` stays importable (for split_ids / assert_no_leakage on user data) even
    # when the packaged benchmark data is not installed.
    from safeft.data.sources import donotanswer_categories, load_source

    sizes = {"n_align": n_align, "n_anchor": n_anchor, "n_dev": n_dev}
    for key, value in sizes.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")

    known = donotanswer_categories()
    unknown = [c for c in exclude_categories if c not in known]
    if unknown:
        # A typo here would silently keep the category in the training data.
        raise ValueError(f"unknown Do-Not-Answer categories to exclude: {unknown} (known: {known})")

    test = load_source("harmbench")
    pool = [ex for ex in load_source("donotanswer") if ex.meta["category"] not in exclude_categories]
    # Sort by id so the shuffle depends only on the seed, never on file-system listing order.
    pool.sort(key=lambda ex: ex.id)

    # Drop DNA prompts that match HarmBench in either direction: equal, HarmBench embedded in DNA (what
    # assert_no_leakage would flag), or a long DNA prompt embedded in a HarmBench one (the same behaviour
    # with extra wording, which would also make the test set partly "seen").
    hb_norm = [normalise_prompt(ex.prompt) for ex in test]
    hb_exact = set(hb_norm)

    def collides(ex: Example) -> bool:
        d = normalise_prompt(ex.prompt)
        return d in hb_exact or any(_embedded(h, d) or _embedded(d, h) for h in hb_norm)

    collided = [ex for ex in pool if collides(ex)]
    n_collided = len(collided)
    if collided:
        log.info("dropping Do-Not-Answer prompts that collide with HarmBench: %s", [ex.id for ex in collided])
    collided_ids = {ex.id for ex in collided}
    clean = [ex for ex in pool if ex.id not in collided_ids]

    seen: set[str] = set()
    unique: list[Example] = []
    for ex in clean:
        key = normalise_prompt(ex.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    n_dupes = len(clean) - len(unique)
    log.info(
        "safety_splits: %d Do-Not-Answer prompts after excluding %s; dropped %d colliding with HarmBench "
        "and %d normalised duplicates; %d available",
        len(pool),
        list(exclude_categories),
        n_collided,
        n_dupes,
        len(unique),
    )

    need = n_align + n_anchor + n_dev
    if need > len(unique):
        raise ValueError(
            f"requested n_align={n_align} + n_anchor={n_anchor} + n_dev={n_dev} = {need} prompts, but only "
            f"{len(unique)} Do-Not-Answer prompts are available (excluding {list(exclude_categories)}, "
            f"{n_collided} HarmBench collisions, {n_dupes} duplicates)"
        )

    random.Random(seed).shuffle(unique)
    align = unique[:n_align]
    anchor = unique[n_align : n_align + n_anchor]
    dev = unique[n_align + n_anchor : need]

    assert_no_leakage(test, align=align, anchor=anchor, dev=dev)
    # dev tunes the settings that are then trained with align/anchor data; overlap would make the dev
    # score optimistic in the same way test leakage would.
    assert_no_leakage(dev, align=align, anchor=anchor)
    return SafetySplits(align=align, anchor=anchor, dev=dev, test=test)


def split_ids(items: Sequence[Example], fractions: dict[str, float], seed: int) -> dict[str, list[Example]]:
    """Deterministically split ``items`` into named parts, e.g. ``fractions={"train": 0.9, "dev": 0.1}``.

    Items are sorted by id before the seeded shuffle, so the result depends only on the set of items and
    the seed, not on input order. Part sizes come from rounding cumulative fractions, so they always sum
    to ``round(total * len(items))``; fractions summing to 1 assign every item. Fractions summing to less
    than 1 leave the remainder unassigned (a cheap subsample).
    """
    if not fractions:
        raise ValueError("fractions must name at least one part")
    for name, frac in fractions.items():
        if not (0.0 <= frac <= 1.0) or math.isnan(frac):
            raise ValueError(f"fraction for {name!r} must be in [0, 1], got {frac}")
    total = math.fsum(fractions.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to {total:.6g} > 1: {fractions}")

    ids = [ex.id for ex in items]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        # With duplicate ids the sort is not a total order, so input order would leak into the split.
        raise ValueError(f"split_ids needs unique ids; duplicated: {dup[:5]}")

    ordered = sorted(items, key=lambda ex: ex.id)
    random.Random(seed).shuffle(ordered)
    n = len(ordered)
    out: dict[str, list[Example]] = {}
    cum = 0.0
    start = 0
    for name, frac in fractions.items():
        cum += frac
        # Clamp so float noise in a sum of exactly 1 cannot drop or overrun the last item.
        end = n if abs(cum - 1.0) <= 1e-9 else min(n, round(cum * n))
        out[name] = ordered[start:end]
        start = end
    return out
