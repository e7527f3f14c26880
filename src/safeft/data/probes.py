"""Over-refusal probes: benign prompts that merely sound edgy, split train / dev / test once and for all.

``over_refusal_probes.jsonl`` (package data) holds 311 prompts we wrote for safeft, one JSON object a line
with ``id``, ``prompt`` and ``category`` (:data:`CATEGORIES`: words with a harmless sense, "how do I kill a
process"; figurative language; harmless targets, "kill weeds"; fiction, history and games; definitions;
questions *about* discrimination; public or fictional people's public facts; medical and legal questions;
security explained for defence).

**Splits.** Each probe's split is fixed by a hash of its id (:func:`split_of`): 40 % train, 20 % dev,
40 % test. By id and not by position, so adding, removing or reordering probes never moves an existing one
into another split (a test probe can never drift into training by an edit). The test share is the largest
because it is reported with an interval: ~140 prompts give about ±6 points at a 15 % refusal rate, where a
60-prompt test set would give ±9. Train gets as much, for alignment data that teaches the boundary
(helpful answers to edgy prompts); dev is the smallest, because the 119 older probes join it (below).

* ``test`` is reported (the ``over_refusal`` suite's default) and never used to train or to choose a
  setting; :func:`safeft.data.splits.assert_probes_held_out` raises if one appears in training data.
* ``dev`` chooses settings: the new dev probes plus the **legacy** probes,
  ``refusals.OVER_REFUSAL_PROBES`` (ids ``probe-<i>``, as the suite has always named them). Those were
  used to choose the current alignment setting, so they can no longer serve as a test set; they were never
  trained on, which is what dev needs.
* ``train`` may be used in alignment or defense data.

``source`` takes any prompt file instead (``jsonl:<path>``, ``csv:<path>``, ``hf:<id>``: see
``safeft.data.sources``), e.g. XSTest's or OR-Bench's benign prompts, already filtered to the safe ones.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from safeft.data.types import DataError, Example, normalise_prompt
from safeft.io import iter_json_objects

SPLITS = ("train", "dev", "test")
LEGACY = "legacy"
FRACTIONS = {"train": 0.4, "dev": 0.2, "test": 0.4}
CATEGORIES = (
    "homonym",
    "figurative",
    "safe_target",
    "fiction",
    "history",
    "games",
    "definition",
    "discrimination",
    "privacy",
    "medical",
    "legal",
    "security",
)
FIELDS = ("id", "prompt", "category")

# Part of the hash: changing it would re-draw every split, which is exactly what must never happen
# quietly, so it is a constant and a test pins a few assignments.
_SALT = "safeft-over-refusal-probes-v1"


def default_path() -> Path:
    return Path(str(resources.files("safeft.data") / "over_refusal_probes.jsonl"))


def split_of(probe_id: str) -> str:
    """``train``, ``dev`` or ``test`` for a probe id: a hash of the id against the cumulative fractions."""
    digest = hashlib.sha256(f"{_SALT}\x00{probe_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cum = 0.0
    for name in SPLITS:
        cum += FRACTIONS[name]
        if u < cum:
            return name
    return SPLITS[-1]  # u within float rounding of 1


def load_probes(path: str | Path | None = None) -> list[Example]:
    """Every probe of our probe file (default: the packaged one), in file order, each with its split.

    Strict: a line that is not a JSON object with exactly ``id``, ``prompt`` and ``category`` (a known
    category, non-empty strings), a duplicate id, or a prompt that repeats an earlier one after
    normalisation raises DataError naming the file and line. A repeated prompt under two ids could sit in
    train and test at once.
    """
    path = Path(path) if path is not None else default_path()
    out: list[Example] = []
    seen_ids: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    for lineno, row in iter_json_objects(path):
        where = f"{path} line {lineno}"
        extra = sorted(set(row) - set(FIELDS))
        if extra:
            raise DataError(f"{where}: unknown field(s) {extra}; a probe has exactly {list(FIELDS)}")
        for k in FIELDS:
            if not isinstance(row.get(k), str) or not row[k].strip():
                raise DataError(f"{where}: {k!r} must be a non-empty string")
        if row["category"] not in CATEGORIES:
            raise DataError(f"{where}: category {row['category']!r} is not one of {list(CATEGORIES)}")
        if row["id"] in seen_ids:
            raise DataError(f"{where}: duplicate id {row['id']!r} (first on line {seen_ids[row['id']]})")
        key = normalise_prompt(row["prompt"])
        if key in seen_prompts:
            raise DataError(f"{where}: prompt repeats line {seen_prompts[key]} ({row['prompt']!r})")
        seen_ids[row["id"]], seen_prompts[key] = lineno, lineno
        meta = {"category": row["category"], "split": split_of(row["id"]), "set": "v2"}
        out.append(Example(row["id"], row["prompt"], source="over_refusal", meta=meta))
    return out


def legacy_probes() -> list[Example]:
    """The 119 probes the suite reported before the split (``refusals.OVER_REFUSAL_PROBES``), now dev."""
    from safeft.data.refusals import OVER_REFUSAL_PROBES

    meta = {"category": LEGACY, "split": "dev", "set": "v1"}
    return [Example(f"probe-{i}", p, source="over_refusal", meta=dict(meta)) for i, p in enumerate(OVER_REFUSAL_PROBES)]


def over_refusal_probes(split: str | None = "test", source: str | None = None) -> list[Example]:
    """The over-refusal probes the ``over_refusal`` suite runs, sorted by id.

    ``split``: ``test`` (reported; the default), ``dev`` (new dev probes + the legacy ones), ``train``,
    ``legacy`` (the legacy ones alone, to compare with numbers reported before the split), or None (all).
    ``source``: a data-source spec (``jsonl:<path>``, ``csv:<path>``, ``hf:<id>``, ...) or a path to a
    ``.jsonl`` file, whose every row is a probe; a malformed row raises DataError naming the file and line.
    A user's file has no splits of ours, so ``split`` must then be None or left at ``test``.
    """
    if source is not None:
        if split not in (None, "test"):
            raise ValueError(f"split={split!r} applies to our probes only; a source file is used whole (split=None)")
        return sorted(_load_source(source), key=lambda e: e.id)
    if split == LEGACY:
        items = legacy_probes()
    elif split is None:
        items = load_probes() + legacy_probes()
    elif split in SPLITS:
        items = [e for e in load_probes() if e.meta["split"] == split]
        if split == "dev":
            items += legacy_probes()
    else:
        raise ValueError(f"over-refusal split must be one of {[*SPLITS, LEGACY]} or None, not {split!r}")
    return sorted(items, key=lambda e: e.id)


def _load_source(source: str) -> list[Example]:
    from safeft.data.sources import SOURCES, load_source

    name = source.partition(":")[0]
    if name not in SOURCES and source.endswith(".jsonl"):
        source = f"jsonl:{source}"  # a bare path, the common case for XSTest / OR-Bench exports
    items = load_source(source)
    if not items:
        raise DataError(f"over-refusal source {source!r} holds no prompts")
    return items
