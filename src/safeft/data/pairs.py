"""Contrastive pairs we wrote for stage-1 alignment: an edgy-but-benign prompt and its harmful neighbour.

``contrastive_pairs.jsonl`` (package data) holds one pair a line, e.g. "How do I kill a runaway Java process
on Windows?" / "How do I kill my neighbour's dog without being caught?". At align time (``align.contrastive``)
the benign side is answered by the base model itself, like every benign alignment prompt, and the harmful
side gets one of our refusals, so the model sees the two sides of the boundary next to each other. They are
not the ``contrastive`` aux data of ``safeft.data.aux`` (harmful prompts with a refusal and a compliance
opener, for SAP).

Only prompts are stored: the base model's own answers keep its style of helpfulness (the aligned model
learns *when* to answer, not a new way of answering), and the embedded base model refused none of our
119 earlier edgy probes (``docs/results.md``): its answers are helpful in kind, if not always right, and a
written reference answer would teach a style it does not have. The answers are not checked for accuracy.

Each pair's ``category`` is an over-refusal probe category (``probes.CATEGORIES``) and its ``topic`` the
refusal topic of its harmful side (``refusals.TOPICS``). Neither side may hold a held-out prompt: the tests
check the harmful side against HarmBench and Do-Not-Answer dev, the benign side against the dev and test
probes (exactly and as near copies), and ``align.select_prompts`` asserts it again before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from safeft.data.probes import CATEGORIES
from safeft.data.refusals import EXPLAINED_REFUSALS, TOPICS
from safeft.data.types import DataError, normalise_prompt
from safeft.io import iter_json_objects

PAIR_FIELDS = ("id", "category", "topic", "benign", "harmful")


@dataclass(frozen=True)
class ContrastivePair:
    """An edgy-but-benign prompt (answered by the base model at align time) and its harmful neighbour
    (refused). ``category`` is an over-refusal probe category (``probes.CATEGORIES``); ``topic`` the
    refusal topic of the harmful side (:data:`TOPICS`)."""

    id: str
    category: str
    topic: str
    benign: str
    harmful: str


def pairs_path() -> Path:
    return Path(str(resources.files("safeft.data") / "contrastive_pairs.jsonl"))


def load_contrastive_pairs(path: str | Path | None = None) -> list[ContrastivePair]:
    """Every pair of the pair file (default: the packaged one), in file order.

    Strict, like the probe file: a line that is not a JSON object with exactly :data:`PAIR_FIELDS` as
    non-empty strings, an unknown category or topic, a duplicate id, or a prompt (either side) repeating an
    earlier one after normalisation raises DataError naming the file and line.
    """
    path = Path(path) if path is not None else pairs_path()
    out: list[ContrastivePair] = []
    seen_ids: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    for lineno, row in iter_json_objects(path):
        where = f"{path} line {lineno}"
        if set(row) != set(PAIR_FIELDS):
            raise DataError(f"{where}: fields {sorted(row)}; a pair has exactly {list(PAIR_FIELDS)}")
        for k in PAIR_FIELDS:
            if not isinstance(row[k], str) or not row[k].strip():
                raise DataError(f"{where}: {k!r} must be a non-empty string")
        if row["category"] not in CATEGORIES:
            raise DataError(f"{where}: category {row['category']!r} is not one of {list(CATEGORIES)}")
        if row["topic"] not in EXPLAINED_REFUSALS:
            raise DataError(f"{where}: topic {row['topic']!r} is not one of {list(TOPICS)}")
        if row["id"] in seen_ids:
            raise DataError(f"{where}: duplicate id {row['id']!r} (first on line {seen_ids[row['id']]})")
        seen_ids[row["id"]] = lineno
        for side in ("benign", "harmful"):
            key = normalise_prompt(row[side])
            if key in seen_prompts:
                raise DataError(f"{where}: {side} prompt repeats line {seen_prompts[key]} ({row[side]!r})")
            seen_prompts[key] = lineno
        out.append(ContrastivePair(**{k: row[k] for k in PAIR_FIELDS}))
    return out
