"""Records and `safeft eval --rescore`: re-judging stored completions without generating."""

from __future__ import annotations

import json

import pytest

from safeft import io, models, runs
from safeft.cli import main
from safeft.data.types import Example
from safeft.eval import judges, records
from safeft.eval.generate import GenSettings
from safeft.eval.suites import harmful

COMPS = [
    "REFUSE. I'm sorry, I can't help with that.",  # both judges: refused
    "Sure, step one is ...",  # both: complied
    "REFUSE to answer in detail; here is an overview anyway.",  # dummy: refused, keywords: complied
    "I'm sorry, that is not something I do.",  # dummy: complied, keywords: refused
    "",  # incoherent (empty)
    "REFUSE!",  # dummy: refused, keywords: complied
]


def make_run(tmp_path, judge="refusal_keywords"):
    """A run directory with stored records and a summary, as the harmful suite writes them."""
    ev = tmp_path / "run" / "eval"
    recs = [
        {
            "id": f"h{i}",
            "suite": "harmful",
            "prompt": f"bad request {i}",
            "completion": c,
            "settings": {"max_new_tokens": 8},
        }
        for i, c in enumerate(COMPS)
    ]
    records.add_verdicts(recs, judges.get(judge)([r["prompt"] for r in recs], COMPS))
    io.write_jsonl(ev / "harmful.jsonl", recs)
    m = records.metrics(recs, judge)
    io.write_json(ev / "summary.json", {"harmful": {"asr": m["asr"], "n": 6, "judge": judge}})
    return tmp_path / "run"


def load(run):
    return [json.loads(x) for x in (run / "eval" / "harmful.jsonl").read_text().splitlines()]


def forbid_model_loads(monkeypatch):
    """Rescoring must never load the evaluated model."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", boom)
    monkeypatch.setattr(runs, "load_run_model", boom)


@pytest.fixture(autouse=True)
def no_model_loads(request, monkeypatch):
    if "tiny" not in request.fixturenames:  # the suite-run test forbids loads after generating
        forbid_model_loads(monkeypatch)


def test_same_judge_reproduces_stored_verdicts(tmp_path, capsys):
    run = make_run(tmp_path)
    before = load(run)
    assert main(["eval", "--rescore", "--judge", "refusal_keywords", str(run)]) == 0
    out = capsys.readouterr().out
    assert "harmful.jsonl: refusal_keywords: 6 judged, 0 new, 0 changed vs stored" in out
    after = load(run)
    assert [r["verdicts"]["refusal_keywords"] for r in after] == [r["verdicts"]["refusal_keywords"] for r in before]
    summary = json.loads((run / "eval" / "summary.json").read_text())["harmful"]
    assert summary["asr"] == 4 / 6 and summary["judges"]["refusal_keywords"]["asr"] == 4 / 6
    assert summary["judges"]["refusal_keywords"]["n"] == 6
    assert summary["judges"]["refusal_keywords"]["max_new_tokens"] == 8


def test_another_judge_changes_verdicts_and_keeps_the_old_ones(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", "--rescore", "--judge", "dummy", "--judge", "refusal_rule", str(run)]) == 0
    out = capsys.readouterr().out
    assert "dummy: 6 judged, 6 new" in out and "refusal_rule: 6 judged, 6 new" in out
    recs = load(run)
    kw = [r["verdicts"]["refusal_keywords"]["refused"] for r in recs]
    dm = [r["verdicts"]["dummy"]["refused"] for r in recs]
    assert kw == [True, False, False, True, False, False] and dm == [True, False, True, False, False, True]
    assert all(set(r["verdicts"]) == {"refusal_keywords", "dummy", "refusal_rule", "incoherent"} for r in recs)
    s = json.loads((run / "eval" / "summary.json").read_text())["harmful"]
    assert s["judge"] == "refusal_keywords" and s["asr"] == 4 / 6  # the headline stays with its own judge
    assert s["judges"]["dummy"]["asr"] == 3 / 6 and s["judges"]["incoherent"]["incoherent_rate"] == 1 / 6
    assert s["judge_specs"] == {"dummy": "dummy", "refusal_rule": "refusal_rule"}
    # the stored dummy verdicts now differ from what refusal_keywords would say: rescoring with it again
    # reports the changes it makes to *its own* stored verdicts only (none)
    assert main(["eval", "--rescore", "--judge", "refusal_keywords", str(run)]) == 0
    assert "0 changed" in capsys.readouterr().out
    assert [r["verdicts"]["dummy"]["refused"] for r in load(run)] == dm


def test_rescore_counts_changed_verdicts_when_a_judge_name_is_reused(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, judge="dummy")

    # a judge registered under the same name that now decides differently (e.g. a new judge version)
    def flipped(prompts, comps):
        return [judges.Verdict("dummy", refused=c[:6] != "REFUSE", harmful=c[:6] == "REFUSE") for c in comps]

    monkeypatch.setitem(judges.JUDGES._items, "dummy", flipped)
    assert main(["eval", "--rescore", "--judge", "dummy", str(run)]) == 0
    assert "dummy: 6 judged, 0 new, 6 changed vs stored" in capsys.readouterr().out


def test_rescore_after_a_real_suite_run(tiny, tmp_path, capsys, monkeypatch):
    model, tok = tiny
    items = [Example(f"h{i}", f"harmful prompt {i}") for i in range(4)]
    summary = harmful(model, tok, items, GenSettings(4, 2, precision="fp32"), "refusal_keywords", tmp_path / "eval")
    assert summary["judges"]["incoherent"]["n"] == 4 and summary["judge_specs"] == {
        "refusal_keywords": "refusal_keywords"
    }
    io.write_json(tmp_path / "eval" / "summary.json", {"harmful": summary})
    forbid_model_loads(monkeypatch)
    assert main(["eval", "--rescore", "--judge", "refusal_keywords", str(tmp_path)]) == 0
    assert "4 judged, 0 new, 0 changed" in capsys.readouterr().out


def test_harm_judge_metrics_include_hs_plus(tmp_path):
    recs = [{"id": str(i), "prompt": "p", "completion": c} for i, c in enumerate(["fine text here", "", "more text"])]
    records.add_verdicts(recs, [judges.Verdict("g", harmful=h) for h in (True, False, False)])
    records.add_verdicts(recs, judges.get("incoherent")(["p"] * 3, [r["completion"] for r in recs]))
    m = records.metrics(recs, "g")
    assert m["hs"] == m["asr"] == 1 / 3 and m["hs_plus"] == 2 / 3 and m["n"] == 3 and "refusal_rate" not in m
    recs[2]["verdicts"]["g"] = judges.Verdict("g").record()  # an unparsed answer
    assert records.metrics(recs, "g")["n_unparsed"] == 1


def test_strongreject_metric_is_the_mean_parsed_score():
    recs = [{"id": str(i), "prompt": "p", "completion": "c"} for i in range(3)]
    vs = [
        judges.Verdict("sr", refused=False, score=0.5),
        judges.Verdict("sr", refused=True, score=0.0),
        judges.Verdict("sr"),
    ]
    records.add_verdicts(recs, vs)
    m = records.metrics(recs, "sr")
    assert m["strongreject"] == 0.25 and m["refusal_rate"] == 1 / 3 and m["n_unparsed"] == 1 and m["n"] == 3


def test_bad_records_file_names_file_and_line_and_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path)
    f = run / "eval" / "harmful.jsonl"
    lines = f.read_text().splitlines()
    lines[2] = lines[2][:-5]
    f.write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_text() for p in (run / "eval").iterdir()}
    assert main(["eval", "--rescore", "--judge", "dummy", str(run)]) == 2
    err = capsys.readouterr().err
    assert "harmful.jsonl line 3: not valid JSON" in err
    assert {p.name: p.read_text() for p in (run / "eval").iterdir()} == before  # no temp files either


def test_missing_field_is_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "a", "prompt": "p", "completion": "c"}\n{"id": "b", "prompt": "p"}\n')
    with pytest.raises(Exception, match="x.jsonl line 2: missing field.*completion"):
        records.read_records(f)


def test_judge_that_cannot_load_fails_before_anything_is_written(tmp_path, capsys):
    run = make_run(tmp_path)
    before = (run / "eval" / "harmful.jsonl").read_text()
    assert (
        main(["eval", "--rescore", "--judge", "dummy", "--judge", f"hf_classifier:model={tmp_path}/none", str(run)])
        == 2
    )
    err = capsys.readouterr().err
    assert "does not exist; provide model=" in err
    assert main(["eval", "--rescore", "--judge", "harmbench_cls:model=x/y", str(run)]) == 2
    assert "needs template=" in capsys.readouterr().err
    assert (run / "eval" / "harmful.jsonl").read_text() == before  # no judge ran, not even dummy


def test_cli_checks(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", "--rescore", str(run)]) == 2
    assert "at least one --judge" in capsys.readouterr().err
    assert main(["eval", "--judge", "dummy", str(run)]) == 2
    assert "--judge goes with --rescore" in capsys.readouterr().err
    assert main(["eval", "--rescore", "--judge", "dummy", str(tmp_path / "nothing")]) == 2
    assert "no eval/ directory" in capsys.readouterr().err
    assert main(["eval", "--rescore", "--judge", "dummy", "--suite", "over_refusal", str(run)]) == 2
    assert "no judged records" in capsys.readouterr().err


def test_rewritten_files_keep_their_mode(tmp_path):
    run = make_run(tmp_path)
    f = run / "eval" / "harmful.jsonl"
    f.chmod(0o644)
    records.rescore(run, ["dummy"])
    assert f.stat().st_mode & 0o777 == 0o644
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]  # no temp files left


def test_each_judge_is_built_once_for_all_suite_files(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    recs = records.read_records(run / "eval" / "harmful.jsonl")
    io.write_jsonl(run / "eval" / "over_refusal.jsonl", [{**r, "suite": "over_refusal"} for r in recs])
    calls = []
    real = judges.get
    monkeypatch.setattr(judges, "get", lambda spec: calls.append(spec) or real(spec))
    res = records.rescore(run, ["dummy"])
    assert set(res["files"]) == {"harmful.jsonl", "over_refusal.jsonl"} and set(res["summary"]) == {
        "harmful",
        "over_refusal",
    }
    assert calls.count("dummy") == 1  # a model judge would load its weights once, not once per file
