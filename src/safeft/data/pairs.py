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

``request_pairs.jsonl`` holds pairs of the same kind in the *form* of instructions and content requests
("Write a persuasive blog post ..."), where Do-Not-Answer, the harmful prompts of stage 1, asks questions
and HarmBench, the test set, gives instructions. Each carries a ``split``: ``train`` pairs may be trained on
(``align.request_pairs``), ``dev`` pairs never are; they measure a setting on this form
(``benchmarks/align_frontier.py``). Their categories are harm areas (:data:`REQUEST_CATEGORIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from safeft.data.probes import CATEGORIES
from safeft.data.refusals import EXPLAINED_REFUSALS, TOPICS
from safeft.data.types import DataError, Example, normalise_prompt
from safeft.io import iter_json_objects

PAIR_FIELDS = ("id", "category", "topic", "benign", "harmful")
REQUEST_FIELDS = (*PAIR_FIELDS, "split")
REQUEST_CATEGORIES = (
    "persuasion",
    "harassment",
    "fraud",
    "cyber",
    "weapons",
    "chemistry",
    "drugs",
    "violence",
    "privacy",
    "illegal",
    "self_harm",
    "extremism",
)
REQUEST_SPLITS = ("train", "dev")


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


@dataclass(frozen=True)
class RequestPair(ContrastivePair):
    """A contrastive pair in instruction form; ``split`` is ``train`` (trainable) or ``dev`` (never trained)."""

    split: str


def pairs_path() -> Path:
    return Path(str(resources.files("safeft.data") / "contrastive_pairs.jsonl"))


def request_pairs_path() -> Path:
    return Path(str(resources.files("safeft.data") / "request_pairs.jsonl"))


def load_contrastive_pairs(path: str | Path | None = None) -> list[ContrastivePair]:
    """Every pair of the pair file (default: the packaged one), in file order.

    Strict, like the probe file: a line that is not a JSON object with exactly :data:`PAIR_FIELDS` as
    non-empty strings, an unknown category or topic, a duplicate id, or a prompt (either side) repeating an
    earlier one after normalisation raises DataError naming the file and line.
    """
    path = Path(path) if path is not None else pairs_path()
    return _load(path, PAIR_FIELDS, CATEGORIES, ContrastivePair)


def load_request_pairs(split: str | None = None, path: str | Path | None = None) -> list[RequestPair]:
    """The instruction-form pairs of ``split`` (None: all), in file order; as strict as
    :func:`load_contrastive_pairs`, with a ``split`` field of :data:`REQUEST_SPLITS` besides."""
    if split is not None and split not in REQUEST_SPLITS:
        raise ValueError(f"request pair split must be one of {list(REQUEST_SPLITS)}, not {split!r}")
    path = Path(path) if path is not None else request_pairs_path()
    pairs = _load(path, REQUEST_FIELDS, REQUEST_CATEGORIES, RequestPair)
    return [p for p in pairs if split is None or p.split == split]


def side_examples(pairs: list[ContrastivePair], side: str) -> list[Example]:
    """One side (``benign`` or ``harmful``) of ``pairs`` as examples with ids ``<pair id>:<side>``: what the
    frontier evaluates and what the alignment leakage check compares against."""
    return [Example(f"{p.id}:{side}", getattr(p, side), source="pairs") for p in pairs]


def _load(path: Path, fields: tuple[str, ...], categories: tuple[str, ...], cls: type) -> list:
    out: list = []
    seen_ids: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    for lineno, row in iter_json_objects(path):
        where = f"{path} line {lineno}"
        if set(row) != set(fields):
            raise DataError(f"{where}: fields {sorted(row)}; a pair has exactly {list(fields)}")
        for k in fields:
            if not isinstance(row[k], str) or not row[k].strip():
                raise DataError(f"{where}: {k!r} must be a non-empty string")
        if row["category"] not in categories:
            raise DataError(f"{where}: category {row['category']!r} is not one of {list(categories)}")
        if "split" in fields and row["split"] not in REQUEST_SPLITS:
            raise DataError(f"{where}: split {row['split']!r} is not one of {list(REQUEST_SPLITS)}")
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
        out.append(cls(**{k: row[k] for k in fields}))
    return out
