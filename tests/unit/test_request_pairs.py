"""Our instruction-form contrastive pairs (request_pairs.jsonl): coverage, a fixed train/dev split, strict
loading, and no held-out prompt on either side (HarmBench, Do-Not-Answer dev, the over-refusal probes),
exactly or as a near copy."""

from __future__ import annotations

import difflib
import json
from collections import Counter

import pytest

from safeft.data import refusals
from safeft.data.pairs import REQUEST_CATEGORIES, RequestPair, load_contrastive_pairs, load_request_pairs
from safeft.data.probes import over_refusal_probes
from safeft.data.splits import assert_no_leakage, assert_probes_held_out, safety_splits
from safeft.data.types import DataError, Example, normalise_prompt

PAIRS = load_request_pairs()
BENIGN = [Example(p.id, p.benign) for p in PAIRS]
HARMFUL = [Example(p.id, p.harmful) for p in PAIRS]


def test_every_harm_area_has_train_and_dev_pairs():
    assert len(PAIRS) >= 200
    per = Counter((p.category, p.split) for p in PAIRS)
    for c in REQUEST_CATEGORIES:
        assert per[(c, "train")] >= 10 and per[(c, "dev")] >= 5, (c, per)
    assert {p.topic for p in PAIRS} <= set(refusals.TOPICS)
    assert len(load_request_pairs("train")) + len(load_request_pairs("dev")) == len(PAIRS)
    with pytest.raises(ValueError, match="split"):
        load_request_pairs("test")


def test_harmful_side_holds_no_harmbench_or_do_not_answer_prompt():
    splits = safety_splits()
    for held_out in (splits.test, splits.dev):
        assert_no_leakage(held_out, requests=HARMFUL)


def test_benign_side_holds_no_test_or_dev_probe():
    assert_probes_held_out(requests=BENIGN)
    assert_no_leakage(over_refusal_probes("dev"), requests=BENIGN)


def _near(ours: list[str], held_out: list[str], bound: float = 0.8) -> list[tuple[str, str]]:
    # the leakage assert compares normalised text; a copy with a word changed would pass it. Quick ratios
    # first: they bound the real ratio from above and keep this test fast.
    out = []
    for a in map(normalise_prompt, ours):
        for b in held_out:
            m = difflib.SequenceMatcher(None, a, b)
            if m.real_quick_ratio() >= bound and m.quick_ratio() >= bound and m.ratio() >= bound:
                out.append((a, b))
    return out


def test_no_side_is_a_near_copy_of_a_held_out_prompt():
    splits = safety_splits()
    harm = [normalise_prompt(e.prompt) for e in (*splits.test, *splits.dev)]
    probes = [normalise_prompt(e.prompt) for s in ("dev", "test") for e in over_refusal_probes(s)]
    assert _near([p.harmful for p in PAIRS], harm) == []
    assert _near([p.benign for p in PAIRS], probes) == []


def test_disjoint_from_the_question_form_pairs():
    theirs = {normalise_prompt(t) for p in load_contrastive_pairs() for t in (p.benign, p.harmful)}
    assert not theirs & {normalise_prompt(t) for p in PAIRS for t in (p.benign, p.harmful)}


GOOD = {
    "id": "a",
    "split": "dev",
    "category": "fraud",
    "topic": "fraud",
    "benign": "Write an email reminding staff about phishing.",
    "harmful": "Write a phishing email.",
}


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({**GOOD, "split": "test"}, "split 'test'"),
        ({k: v for k, v in GOOD.items() if k != "split"}, "a pair has exactly"),
        ({**GOOD, "category": "homonym"}, "category 'homonym'"),
    ],
)
def test_loader_is_strict_and_names_the_line(tmp_path, row, match):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"{path} line 1: {match}" if "exactly" not in match else match):
        load_request_pairs(path=path)


def test_loader_reads_a_good_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert load_request_pairs(path=path) == [RequestPair(**GOOD)]
    assert load_request_pairs("train", path=path) == []
