"""The demo table: every rate with its Wilson interval and n, under the configured judge and the keyword list."""

from __future__ import annotations

import pytest

from safeft.config import ConfigError, EvalConfig
from safeft.demo import format_table, table_cells
from safeft.eval import judges, records
from safeft.stats import Rate, wilson

HARMFUL = ["I'm sorry, but I can't help with that.", "Sure, step one is easy.", "It is illegal, but here is how."]
EDGY = ["Sorry to hear it hangs! Run kill -9 with its PID.", "I cannot help with that.", "Use boiling water."]


def _entry(comps: list[str], specs: list[str]) -> dict:
    recs = [{"id": str(i), "prompt": "p", "completion": c} for i, c in enumerate(comps)]
    for spec in specs:
        records.add_verdicts(recs, judges.get(spec)(["p"] * len(recs), comps))
    return {"n": len(recs), "judges": records.all_metrics(recs)}


def _summary(specs: list[str]) -> dict:
    return {
        "harmful": _entry(HARMFUL, specs),
        "over_refusal": _entry(EDGY, specs),
        "utility:finance": {"accuracy": 0.25, "answer_nll": 1.5, "n": 4},
    }


def test_cells_are_rates_per_judge():
    specs = ["refusal_layered", "refusal_keywords"]
    cells = table_cells(_summary(specs), "finance", specs)
    # layered: the "illegal, but here is how" answer is compliance; keywords: a refusal (the word "illegal")
    assert cells["asr@refusal_layered"] == Rate(2, 3) and cells["asr@refusal_keywords"] == Rate(1, 3)
    # layered: "Sorry to hear" opens an answer; keywords: "Sorry" anywhere is a refusal
    assert cells["over_refusal@refusal_layered"] == Rate(1, 3)
    assert cells["over_refusal@refusal_keywords"] == Rate(2, 3)
    assert cells["acc"] == Rate(1, 4) and cells["nll"] == 1.5


def test_table_prints_intervals_and_n():
    specs = ["refusal_layered", "refusal_keywords"]
    cells = {"base": table_cells(_summary(specs), "finance", specs)}
    text = format_table(cells, "finance", EvalConfig(judge="refusal_layered"))
    header, _, row = text.splitlines()[:3]
    assert "ASR ↓ (refusal_layered) n=3" in header and "ASR ↓ (refusal_keywords) n=3" in header
    assert "finance acc ↑ n=4" in header
    lo, hi = wilson(2, 3)
    assert f"66.7 % [{100 * lo:.1f}, {100 * hi:.1f}]" in row and "1.500" in row
    assert "95 % Wilson" in text


def test_the_harmful_column_reads_the_held_out_half_and_says_so():
    specs = ["refusal_keywords"]
    summary = _summary(specs)
    summary["harmful:harmbench:heldout"] = summary.pop("harmful")
    cells = {"aligned": table_cells(summary, "finance", specs)}
    assert cells["aligned"]["asr@refusal_keywords"] == Rate(1, 3)
    ev = EvalConfig(judge="refusal_keywords", suites=["harmful:harmbench:heldout", "over_refusal", "utility"])
    assert "HarmBench's held-out half" in format_table(cells, "finance", ev)
    # two harmful suites would leave the one ASR column ambiguous: an error, not a silent pick
    summary["harmful"] = summary["harmful:harmbench:heldout"]
    with pytest.raises(ConfigError, match="one harmful column"):
        table_cells(summary, "finance", specs)


def test_one_judge_one_column_and_varying_n_goes_into_the_cell():
    cells = {
        "a": {"asr@refusal_keywords": Rate(1, 10), "over_refusal@refusal_keywords": Rate(0, 5)},
        "b": {"asr@refusal_keywords": Rate(2, 20), "over_refusal@refusal_keywords": Rate(1, 5)},
    }
    text = format_table(cells, "finance", EvalConfig(judge="refusal_keywords"))
    assert "| model | ASR ↓ | over-refusal ↓ n=5 |" in text
    assert "10.0 % [1.8, 40.4] (n=10)" in text and "10.0 % [2.8, 30.1] (n=20)" in text
    assert "| – | – |" in text  # no utility suite: dashes, not zeros


def test_a_tiny_model_evaluated_under_both_judges(tiny, tmp_path):
    import dataclasses
    import json

    from safeft import config as C
    from safeft.demo import _judges, evaluate_twice

    model, tok = tiny
    ev = EvalConfig(n_harmful=3, n_over_refusal=3, n_utility=2, max_new_tokens=4, batch_size=4, precision="fp32")
    cfg = dataclasses.replace(C.RunConfig(), eval=ev)
    assert _judges(ev) == ["refusal_layered", "refusal_keywords"]  # the new default, then the keyword list
    summary = evaluate_twice(model, tok, cfg, tmp_path, "finance")
    stored = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for suite in ("harmful", "over_refusal"):
        assert set(summary[suite]["judges"]) >= {"refusal_layered", "refusal_keywords"}
        assert stored[suite]["judges"]["refusal_keywords"]["n"] == 3
        assert summary[suite]["judge"] == "refusal_layered"  # the headline stays with the configured judge
    cells = table_cells(summary, "finance", _judges(ev))
    assert {"asr@refusal_layered", "asr@refusal_keywords", "over_refusal@refusal_keywords", "acc"} <= set(cells)
    assert cells["asr@refusal_keywords"].n == 3 and cells["acc"].n == 2


def test_a_bad_method_spec_fails_before_anything_is_aligned(tmp_path, monkeypatch) -> None:
    from safeft import config as C
    from safeft import demo as D

    def no_align(*a, **k):
        raise AssertionError("aligned before the methods were checked")

    monkeypatch.setattr(D, "align", no_align)
    cfg = C.load(overrides=["demo.methods=[sft, 'saft+repanchor:pgd_mode=free', 'sbr:lam']", f"out_dir={tmp_path}"])
    with pytest.raises(C.ConfigError, match=r"demo.methods\[2\]"):
        D.demo(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_two_methods_with_one_run_directory_fail_before_anything_is_aligned(tmp_path, monkeypatch) -> None:
    from safeft import config as C
    from safeft import demo as D

    monkeypatch.setattr(D, "align", lambda *a, **k: (_ for _ in ()).throw(AssertionError("aligned")))
    cfg = C.load(overrides=["demo.methods=[sft, sbr, sft]", f"out_dir={tmp_path}"])
    with pytest.raises(C.ConfigError, match="same run directory twice"):
        D.demo(cfg, progress=False)
    assert not any(tmp_path.iterdir())


def test_a_method_spec_becomes_one_run_directory_name():
    from safeft.demo import run_dir_name

    assert run_dir_name("saft+repanchor:pgd_mode=free") == "saft+repanchor-pgd_mode-free"
    assert run_dir_name("sft") == "sft"


def test_the_base_model_is_evaluated_on_the_harmful_suite_unless_told_otherwise() -> None:
    from safeft import config as C
    from safeft.demo import DEMO_DEFAULTS, base_suites

    cfg = C.load(overrides=[f"eval.suites={DEMO_DEFAULTS['eval']['suites']}"])
    assert base_suites(cfg).eval.suites == ["harmful:harmbench:heldout"]
    assert base_suites(C.load(overrides=["demo.base_eval=all"])).eval.suites == C.EvalConfig().suites
    with pytest.raises(ConfigError, match="no harmful suite"):
        base_suites(C.load(overrides=["eval.suites=[over_refusal]"]))
    with pytest.raises(ConfigError, match="demo.base_eval must be"):
        C.load(overrides=["demo.base_eval=some"])


def _rec(i: str, harmful: bool, error: bool = False) -> dict:
    verdict = {"label": "error"} if error else {"harmful": harmful, "refused": not harmful}
    return {"id": i, "verdicts": {"refusal_layered": verdict, "refusal_keywords": {"harmful": harmful}}}


def test_asr_splits_by_harmbench_part_and_the_parts_add_up() -> None:
    from safeft.demo import format_parts, rates_by_part

    parts = {"heldout": {"a", "b", "c"}, "contextual": {"x", "y"}}
    recs = [_rec("a", True), _rec("b", False), _rec("c", False), _rec("x", True), _rec("y", True, error=True)]
    got = rates_by_part(recs, parts, ["refusal_layered", "refusal_keywords"])
    assert got["heldout"]["refusal_layered"] == Rate(1, 3)
    assert got["contextual"]["refusal_layered"] == Rate(1, 1)  # the unanswered item is counted apart
    assert got["contextual"]["refusal_keywords"] == Rate(2, 2)
    text = format_parts({"aligned": got}, ["refusal_layered", "refusal_keywords"])
    assert "refusal_layered / refusal_keywords" in text and "- aligned: heldout 33.3 % [6.1, 79.2] (n=3)" in text
    with pytest.raises(ValueError, match="in no part or in several"):
        rates_by_part([*recs, _rec("z", True)], parts, ["refusal_keywords"])


def test_the_parts_of_a_harmbench_union_suite_are_found() -> None:
    from safeft.demo import harmbench_parts

    assert harmbench_parts("harmful:harmbench:heldout") == {}
    assert harmbench_parts("harmful") == {}
    got = harmbench_parts("harmful:harmbench:dev+heldout")
    assert list(got) == ["dev", "heldout"] and len(got["dev"]) == len(got["heldout"]) == 100
