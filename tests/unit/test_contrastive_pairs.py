"""Our contrastive pairs (edgy-but-benign prompt / harmful neighbour): coverage, strict loading, and that
neither side holds a held-out prompt (HarmBench, Do-Not-Answer dev, the over-refusal dev and test probes)."""

from __future__ import annotations

import difflib
import json
from collections import Counter

import pytest

from safeft.data import refusals
from safeft.data.pairs import ContrastivePair, load_contrastive_pairs
from safeft.data.probes import CATEGORIES, over_refusal_probes
from safeft.data.splits import assert_no_leakage, assert_probes_held_out, safety_splits
from safeft.data.types import DataError, Example, normalise_prompt

PAIRS = load_contrastive_pairs()
BENIGN = [Example(p.id, p.benign) for p in PAIRS]
HARMFUL = [Example(p.id, p.harmful) for p in PAIRS]


def test_at_least_120_pairs_covering_every_probe_category():
    assert len(PAIRS) >= 120
    per_category = Counter(p.category for p in PAIRS)
    assert set(per_category) == set(CATEGORIES) and min(per_category.values()) >= 8, per_category
    assert {p.topic for p in PAIRS} <= set(refusals.TOPICS)


def test_prompts_are_single_short_requests():
    for p in PAIRS:
        for text in (p.benign, p.harmful):
            assert text == text.strip() and text[-1] in ".?!" and len(text.split()) <= 25, text


def test_harmful_side_holds_no_harmbench_or_do_not_answer_dev_prompt():
    splits = safety_splits()
    assert_no_leakage(splits.test, contrastive=HARMFUL)
    assert_no_leakage(splits.dev, contrastive=HARMFUL)


def test_benign_side_holds_no_test_or_dev_probe():
    assert_probes_held_out(contrastive=BENIGN)
    assert_no_leakage(over_refusal_probes("dev"), contrastive=BENIGN)


def test_benign_side_is_no_near_copy_of_a_held_out_probe():
    # The leakage assert compares normalised text; a copy with a word changed ("How do I kill a zombie
    # process on Linux?") would pass it and still put a test probe into training. Quick ratios first: they
    # bound the real ratio from above and keep this test well under a second.
    held_out = [normalise_prompt(e.prompt) for s in ("dev", "test") for e in over_refusal_probes(s)]
    near = []
    for p in PAIRS:
        b = normalise_prompt(p.benign)
        for h in held_out:
            m = difflib.SequenceMatcher(None, b, h)
            if m.real_quick_ratio() >= 0.85 and m.quick_ratio() >= 0.85 and m.ratio() >= 0.85:
                near.append((p.benign, h))
    assert near == []


def test_benign_side_is_disjoint_from_our_other_prompt_lists():
    ours = {normalise_prompt(q) for q in (*refusals.BENIGN_PROMPTS, *refusals.BENIGN_EDGY_PROMPTS)}
    ours |= {normalise_prompt(e.prompt) for e in over_refusal_probes("train")}
    assert not ours & {normalise_prompt(p.benign) for p in PAIRS}


def _write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"id": "a", "category": "homonym", "topic": "violence", "benign": "Kill a process?", "harmful": "Kill him?"}


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["{not json"], "line 1: not valid JSON"),
        ([{**GOOD, "extra": "x"}], "a pair has exactly"),
        ([{**GOOD, "benign": " "}], "'benign' must be a non-empty string"),
        ([{**GOOD, "category": "homonyms"}], "category 'homonyms'"),
        ([{**GOOD, "topic": "violent"}], "topic 'violent'"),
        ([GOOD, {**GOOD, "benign": "b?", "harmful": "h?"}], "line 2: duplicate id 'a'"),
        ([GOOD, {**GOOD, "id": "b", "benign": "kill a PROCESS", "harmful": "h?"}], "line 2: benign prompt repeats"),
        ([{**GOOD, "harmful": "Kill a process!"}], "line 1: harmful prompt repeats line 1"),
    ],
)
def test_loader_is_strict_and_names_the_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_contrastive_pairs(_write(tmp_path, rows))


def test_loader_reads_a_good_file(tmp_path):
    (pair,) = load_contrastive_pairs(_write(tmp_path, [GOOD]))
    assert pair == ContrastivePair(**GOOD)
