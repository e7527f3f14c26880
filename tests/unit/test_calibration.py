"""The judge calibration set and its benchmark: shape, variety, honest counting, clear errors."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from safeft.data.types import DataError
from safeft.eval import calibration

BENCH = Path(__file__).parents[2] / "benchmarks" / "judge_calibration.py"


def test_set_is_large_balanced_and_varied():
    rows = calibration.load()
    labels = Counter(r["label"] for r in rows)
    kinds = {(r["label"], r["kind"]) for r in rows}
    assert len(rows) >= 155 and min(labels.values()) >= 60
    assert len({r["id"] for r in rows}) == len(rows) and len({r["response"] for r in rows}) == len(rows)
    for k in ("markerless", "redirect", "lecture", "short", "polite_opening"):
        assert ("refuse", k) in kinds, k
    for k in ("illegal_mention", "stress_marker", "partial", "long", "short", "plain"):
        assert ("comply", k) in kinds, k
    assert any("illegal" in r["response"] for r in rows if r["label"] == "comply")
    assert any("I cannot stress enough" in r["response"] for r in rows if r["label"] == "comply")
    assert any(len(r["response"]) < 10 for r in rows) and any(len(r["response"]) > 300 for r in rows)


def test_counts_add_up_and_match_a_naive_count():
    rows = calibration.load()
    cal = calibration.calibrate("refusal_keywords", rows)
    assert cal.tp + cal.fp + cal.fn + cal.tn + cal.unparsed == len(rows)
    from safeft.eval.judges import REFUSAL_MARKERS

    said = [not any(m in r["response"].replace("\u2019", "'") for m in REFUSAL_MARKERS) for r in rows]
    truth = [r["label"] == "comply" for r in rows]
    assert cal.tp == sum(s and t for s, t in zip(said, truth, strict=True))
    assert cal.fp == sum(s and not t for s, t in zip(said, truth, strict=True))
    assert cal.precision == pytest.approx(cal.tp / (cal.tp + cal.fp)) and cal.recall == pytest.approx(
        cal.tp / (cal.tp + cal.fn)
    )
    # the known failure of the keyword rule shows up where it should: compliance that says "illegal"
    assert cal.errors_by_kind["comply/illegal_mention"] > 0


def test_dummy_judge_calls_everything_compliant():
    rows = calibration.load()
    cal = calibration.calibrate("dummy", rows)
    assert cal.recall == 1.0 and cal.tn == 0


def test_bad_calibration_file_names_file_and_line(tmp_path):
    f = tmp_path / "cal.jsonl"
    good = {"id": "a", "prompt": "p", "response": "r", "label": "comply", "kind": "plain"}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match="cal.jsonl line 2: label 'maybe'"):
        calibration.load(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="line 2: duplicate id 'a'"):
        calibration.load(f)


def test_benchmark_prints_a_table_per_judge(capsys):
    spec = importlib.util.spec_from_file_location("judge_calibration", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([])
    out = capsys.readouterr().out
    assert "positive class = comply" in out and "| refusal_keywords |" in out and "| refusal_rule     |" in out
    mod.main(["--json", "--judge", "refusal_rule"])
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == len(calibration.load()) and res["results"][0]["judge"] == "refusal_rule"
    assert res["incoherent_false_alarms"] == 0
