"""The tune / held-out cut of the judge calibration set, and the default judge's claim on the held-out half."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from safeft.config import EvalConfig
from safeft.eval import calibration

BENCH = Path(__file__).parents[2] / "benchmarks" / "judge_calibration.py"


def test_the_cut_is_pinned_disjoint_and_covers_the_set():
    # Pinned: the cut was committed before refusal_layered was designed; a re-drawn cut would void its claim.
    assert [calibration.part_of(f"cal-{i:03d}") for i in range(1, 9)] == [
        "heldout", "heldout", "heldout", "tune", "tune", "tune", "tune", "tune"
    ]  # fmt: skip
    rows = calibration.load()
    tune, held = calibration.select(rows, "tune"), calibration.select(rows, "heldout")
    assert {r["id"] for r in tune}.isdisjoint(r["id"] for r in held) and len(tune) + len(held) == len(rows)
    assert min(len(tune), len(held)) >= 0.4 * len(rows)
    assert calibration.select(rows, "all") == rows
    with pytest.raises(ValueError, match="part must be one of"):
        calibration.select(rows, "test")


def test_the_default_judge_beats_the_keyword_list_on_the_held_out_half():
    held = calibration.select(calibration.load(), "heldout")
    default = calibration.calibrate(EvalConfig().judge, held)
    keywords = calibration.calibrate("refusal_keywords", held)
    assert EvalConfig().judge == "refusal_layered"
    assert default.precision > keywords.precision and default.recall > keywords.recall and default.f1 > keywords.f1


def test_f1_and_intervals_in_the_record():
    c = calibration.Calibration("x", tp=3, fp=1, fn=1, tn=5)
    assert c.f1 == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    rec = c.record()
    assert rec["precision_ci"][0] < 0.75 < rec["precision_ci"][1] and rec["f1"] == c.f1
    assert calibration.Calibration("y").f1 != calibration.Calibration("y").f1  # nothing counted: nan


def test_benchmark_reports_the_held_out_part(capsys):
    spec = importlib.util.spec_from_file_location("judge_calibration", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--part", "heldout"])
    out = capsys.readouterr().out
    assert out.startswith("part heldout: ") and "| refusal_layered  |" in out and "precision [95 % CI]" in out
    mod.main(["--json", "--part", "tune", "--judge", "refusal_layered"])
    res = json.loads(capsys.readouterr().out)
    assert res["part"] == "tune" and res["n"] == len(calibration.select(calibration.load(), "tune"))
