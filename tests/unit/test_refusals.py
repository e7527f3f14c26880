"""Our own refusal texts and benign prompt lists: sizes, markers, uniqueness, and held-out disjointness."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safeft.data.refusals import (
    BENIGN_EDGY_PROMPTS,
    BENIGN_PROMPTS,
    EXPLAINED_REFUSALS,
    INTENT_TOPICS,
    MARKERLESS_REFUSALS,
    OVER_REFUSAL_PROBES,
    REFUSALS,
    TOPICS,
    explained_refusal_for,
    refusal_for,
    topic_of,
)
from safeft.data.types import normalise_prompt
from safeft.eval import judges
from safeft.eval.judges import REFUSAL_MARKERS

# the judge's own list: a training refusal must be visible to the judge that scores ASR
MARKERS = REFUSAL_MARKERS
PROMPT_LISTS = {
    "OVER_REFUSAL_PROBES": OVER_REFUSAL_PROBES,
    "BENIGN_PROMPTS": BENIGN_PROMPTS,
    "BENIGN_EDGY_PROMPTS": BENIGN_EDGY_PROMPTS,
}


def _has_marker(text: str) -> bool:
    return any(m in text for m in MARKERS)


def test_list_sizes() -> None:
    assert len(REFUSALS) >= 24
    assert len(OVER_REFUSAL_PROBES) >= 110
    assert len(BENIGN_PROMPTS) >= 80
    assert len(BENIGN_EDGY_PROMPTS) >= 30


def test_training_refusals_carry_a_marker_and_calibration_ones_do_not() -> None:
    assert all(_has_marker(r) for r in REFUSALS), [r for r in REFUSALS if not _has_marker(r)]
    assert len(MARKERLESS_REFUSALS) >= 4
    assert not any(_has_marker(r) for r in MARKERLESS_REFUSALS)
    assert not set(REFUSALS) & set(MARKERLESS_REFUSALS)


def test_refusals_are_short_and_distinct() -> None:
    assert len(set(REFUSALS)) == len(REFUSALS)
    for text in REFUSALS:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
        assert 1 <= len(sentences) <= 3, text
    # Varied openings, so a model does not learn one fixed prefix.
    assert len({r.split()[0] for r in REFUSALS}) >= 4


@pytest.mark.parametrize("name", PROMPT_LISTS)
def test_prompt_lists_have_no_duplicates_and_are_short(name: str) -> None:
    prompts = PROMPT_LISTS[name]
    keys = [normalise_prompt(p) for p in prompts]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes
    for p in prompts:
        assert p == p.strip() and p[-1] in ".?!", p
        assert len(p.split()) <= 25, p


def test_prompt_lists_are_pairwise_disjoint() -> None:
    keys = {name: {normalise_prompt(p) for p in prompts} for name, prompts in PROMPT_LISTS.items()}
    assert not keys["OVER_REFUSAL_PROBES"] & keys["BENIGN_EDGY_PROMPTS"]
    assert not keys["OVER_REFUSAL_PROBES"] & keys["BENIGN_PROMPTS"]
    assert not keys["BENIGN_PROMPTS"] & keys["BENIGN_EDGY_PROMPTS"]


def test_refusal_for_is_deterministic_and_spreads() -> None:
    assert refusal_for("prompt-17") == refusal_for("prompt-17")
    assert refusal_for("prompt-17", seed=4) == refusal_for("prompt-17", seed=4)
    picks = [refusal_for(f"prompt-{i}") for i in range(500)]
    assert set(picks) <= set(REFUSALS)
    assert len(set(picks)) >= len(REFUSALS) // 2
    reseeded = [refusal_for(f"prompt-{i}", seed=1) for i in range(500)]
    assert reseeded != picks


def test_refusal_for_does_not_depend_on_hash_randomisation() -> None:
    code = "from safeft.data.refusals import refusal_for; print(refusal_for('abc', 3))"
    src = str(Path(__file__).resolve().parents[2] / "src")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": src}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout)
    assert outputs == {refusal_for("abc", 3) + "\n"}


def test_training_refusals_open_with_a_marker_whose_variants_stay_markers() -> None:
    # "I can't provide" is a marker but generalises to "I can't help", which is not; these openers do not.
    openers = ("I'm sorry", "I am sorry", "Sorry", "I apologize", "My apologies", "I cannot")
    assert [r for r in REFUSALS if not r.startswith(openers)] == []


# ----------------------------------------------------------------------------- refusals that explain briefly

EXPLAINED = [t for texts in EXPLAINED_REFUSALS.values() for t in texts]
TRAINING_REFUSALS = [*REFUSALS, *EXPLAINED]


@pytest.mark.parametrize("judge", ["refusal_keywords", "refusal_layered"])
def test_every_training_refusal_is_judged_a_refusal(judge: str) -> None:
    # ASR and over-refusal are read by these two judges: a training refusal either misses would teach the
    # model a refusal that the reported numbers count as compliance.
    verdicts = judges.get(judge)(["q"] * len(TRAINING_REFUSALS), TRAINING_REFUSALS)
    assert [t for t, v in zip(TRAINING_REFUSALS, verdicts, strict=True) if not v.refused] == []


def test_explained_refusals_are_short_open_with_a_marker_and_cover_every_topic() -> None:
    openers = ("I'm sorry", "I am sorry", "Sorry", "I apologize", "My apologies", "I cannot")
    assert [r for r in EXPLAINED if not r.startswith(openers)] == []
    assert set(TOPICS) == set(EXPLAINED_REFUSALS) and all(len(v) >= 3 for v in EXPLAINED_REFUSALS.values())
    assert len(set(EXPLAINED)) == len(EXPLAINED) and not set(EXPLAINED) & set(REFUSALS)
    for text in EXPLAINED:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
        assert 1 <= len(sentences) <= 2 and len(text.split()) <= 40, text


def test_every_do_not_answer_prompt_gets_a_known_topic() -> None:
    from safeft.data.sources import load_source

    pool = load_source("donotanswer")
    intents = {i for e in pool for i in e.meta.get("intents") or ()}
    assert intents <= set(INTENT_TOPICS), sorted(intents - set(INTENT_TOPICS))  # a new code would fall back silently
    assert {topic_of(e.meta) for e in pool} <= set(TOPICS)
    assert topic_of({"intents": ["S006items"], "category": "malicious_uses"}) == "weapons"
    assert topic_of({"intents": ["nope"], "category": "malicious_uses"}) == "illegal"
    assert topic_of({}) == "general"


def test_explained_refusal_for_is_deterministic_and_checks_the_topic() -> None:
    picks = {explained_refusal_for(f"p{i}", "cyber") for i in range(60)}
    assert picks == set(EXPLAINED_REFUSALS["cyber"])
    assert explained_refusal_for("p1", "cyber", 3) == explained_refusal_for("p1", "cyber", 3)
    with pytest.raises(KeyError, match="unknown refusal topic"):
        explained_refusal_for("p1", "cybr")
