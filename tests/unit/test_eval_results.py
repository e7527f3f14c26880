"""Evaluations are kept side by side (settings-hash directories), never overwritten by a smoke run or another
judge; suites are registered objects; every verb builds its generation settings from the eval config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from safeft import config as C
from safeft.cli import main
from safeft.config import EvalConfig
from safeft.data.domains import run_domain
from safeft.data.types import Example
from safeft.eval import judges, records
from safeft.eval.generate import GenSettings
from safeft.eval.results import Store
from safeft.eval.suites import SUITES, Suite, SuiteInputs, evaluate, parse_suites
from safeft.eval.suites.driver import settings_key

# the layout tests name their judge: the default judge may change without changing what they check
CFG = dict(n_harmful=4, n_over_refusal=3, n_utility=3, max_new_tokens=4, batch_size=4, precision="fp32")
CFG["judge"] = "refusal_keywords"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> content), the index lock excluded."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def merged(out: Path) -> dict[str, Any]:
    return json.loads((out / "eval" / "summary.json").read_text())


def test_a_limit_run_leaves_the_full_results_and_summary_intact(tiny, tmp_path):
    model, tok = tiny
    full = evaluate(model, tok, EvalConfig(**CFG), tmp_path, ["finance"])
    (full_dir,) = Store(tmp_path / "eval").evaluation_dirs()
    before = snapshot(full_dir)
    summary_before = merged(tmp_path)
    assert summary_before.keys() == full.keys() and summary_before["harmful"]["n"] == 4

    smoke = evaluate(model, tok, EvalConfig(**CFG), tmp_path, ["finance"], limit=2)
    assert all(e["n"] == 2 and e["limit"] == 2 for e in smoke.values())
    assert snapshot(full_dir) == before  # not a byte of the full evaluation changed
    assert merged(tmp_path) == summary_before  # the run's numbers are still the full ones
    dirs = Store(tmp_path / "eval").evaluation_dirs()
    assert len(dirs) == 2 and dirs[0] == full_dir
    assert len(records.read_records(dirs[1] / "harmful.jsonl")) == 2
    index = json.loads((tmp_path / "eval" / "index.json").read_text())["evaluations"]
    assert index[full_dir.name]["full"] is True and index[dirs[1].name]["full"] is False
    assert index[dirs[1].name]["settings"]["limit"] == 2


def test_two_judges_evaluations_coexist_and_the_newest_full_one_is_the_runs(tiny, tmp_path):
    model, tok = tiny
    cfg = EvalConfig(**CFG, suites=["harmful"])
    evaluate(model, tok, cfg, tmp_path)
    evaluate(model, tok, dataclasses.replace(cfg, judge="dummy"), tmp_path)
    a, b = Store(tmp_path / "eval").evaluation_dirs()
    ra, rb = records.read_records(a / "harmful.jsonl"), records.read_records(b / "harmful.jsonl")
    assert all(set(r["verdicts"]) == {"refusal_keywords", "incoherent"} for r in ra)
    assert all(set(r["verdicts"]) == {"dummy", "incoherent"} for r in rb)
    assert json.loads((a / "summary.json").read_text())["harmful"]["judge"] == "refusal_keywords"
    s = merged(tmp_path)["harmful"]
    assert s["judge"] == "dummy" and s["eval_id"] == b.name
    assert s["asr"] == records.metrics(rb, "dummy")["asr"]


def test_same_settings_replace_their_evaluation_only_once_it_completed(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = EvalConfig(**CFG, suites=["harmful", "over_refusal"])
    evaluate(model, tok, cfg, tmp_path)
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    # mark the stored over_refusal records: a rewrite of them, even an identical one, would drop the mark
    marked = [{**r, "mark": 1} for r in records.read_records(ev / "over_refusal.jsonl")]
    (ev / "over_refusal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    before, summary_before = snapshot(ev), merged(tmp_path)

    real = judges.get

    def broken(spec):  # the suite judge fails on the second suite, after its generation
        j = real(spec)
        calls.append(spec)
        if spec == "refusal_keywords" and calls.count(spec) == 3:  # 1: the up-front check, 2: harmful
            raise RuntimeError("judge crashed")
        return j

    calls: list[str] = []
    monkeypatch.setattr(judges, "get", broken)
    with pytest.raises(RuntimeError, match="judge crashed"):
        evaluate(model, tok, cfg, tmp_path)
    assert Store(tmp_path / "eval").evaluation_dirs() == [ev]  # same settings, same directory
    # harmful finished again and replaced its (identical) records; over_refusal's were never touched
    assert snapshot(ev) == before and merged(tmp_path) == summary_before
    assert not [p for p in ev.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_the_settings_hash_follows_what_changes_the_numbers(tiny):
    _, tok = tiny
    base = EvalConfig(**CFG)

    def key(cfg=base, limit=None, model=None, system=None):
        return settings_key(cfg, GenSettings.from_eval(cfg, system), tok, limit, model)

    k = key()
    for other in (
        key(limit=2),
        key(model={"checkpoint_step": 4}),
        key(system="Answer briefly."),
        key(dataclasses.replace(base, judge="dummy")),
        key(dataclasses.replace(base, max_new_tokens=8)),
        key(dataclasses.replace(base, n_harmful=5)),
        key(dataclasses.replace(base, do_sample=True)),
        # the hf backend's batch size decides the padded shapes, which on CPU change some greedy completions
        key(dataclasses.replace(base, batch_size=1)),
    ):
        assert other != k
    # sampling knobs that greedy decoding never reads keep the evaluation's identity, and so does the batch
    # size where vLLM schedules its own batches
    assert key(dataclasses.replace(base, temperature=0.3, top_k=5)) == k
    vllm = GenSettings.from_eval(dataclasses.replace(base, backend="vllm"))
    assert vllm.identity(tok) == dataclasses.replace(vllm, batch_size=1).identity(tok)
    sampled = dataclasses.replace(base, do_sample=True)
    assert key(dataclasses.replace(sampled, temperature=0.3)) != key(sampled)


def test_a_run_evaluated_before_the_index_keeps_its_results(tiny, tmp_path):
    model, tok = tiny
    old = tmp_path / "eval"
    recs = [{"id": "h0", "suite": "harmful", "prompt": "p", "completion": "Sure.", "settings": {}}]
    records.add_verdicts(recs, judges.get("refusal_keywords")(["p"], ["Sure."]))
    (old / "harmful.jsonl").parent.mkdir()
    (old / "harmful.jsonl").write_text(json.dumps(recs[0]) + "\n")
    (old / "summary.json").write_text(json.dumps({"harmful": {"asr": 1.0, "n": 1, "judge": "refusal_keywords"}}))
    before = snapshot(old)

    evaluate(model, tok, EvalConfig(**CFG, suites=["over_refusal"]), tmp_path)
    assert snapshot(old / "legacy") == before  # moved, untouched
    s = merged(tmp_path)
    assert s["harmful"]["asr"] == 1.0 and s["harmful"]["eval_id"] == "legacy" and "over_refusal" in s
    res = records.rescore(tmp_path, ["dummy"])
    assert "legacy/harmful.jsonl" in res["files"] and "dummy" in merged(tmp_path)["harmful"]["judges"]


def test_rescore_judges_every_evaluation_and_rewrites_the_runs_summary(tiny, tmp_path, capsys):
    model, tok = tiny
    cfg = EvalConfig(**CFG, suites=["harmful"])
    evaluate(model, tok, cfg, tmp_path)
    evaluate(model, tok, cfg, tmp_path, limit=2)
    full, smoke = Store(tmp_path / "eval").evaluation_dirs()
    assert main(["eval", "--rescore", "--judge", "dummy", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{full.name}/harmful.jsonl: dummy: 4 judged, 4 new" in out
    assert f"{smoke.name}/harmful.jsonl: dummy: 2 judged, 2 new" in out
    for d, n in ((full, 4), (smoke, 2)):
        assert json.loads((d / "summary.json").read_text())["harmful"]["judges"]["dummy"]["n"] == n
    s = merged(tmp_path)["harmful"]
    assert s["eval_id"] == full.name and s["judges"]["dummy"]["n"] == 4 and s["judge"] == "refusal_keywords"
    # one evaluation's folder alone: re-judged in place, and the run's summary follows it
    assert main(["eval", "--rescore", "--judge", "refusal_rule", str(full)]) == 0
    assert "harmful.jsonl: refusal_rule: 4 judged, 4 new" in capsys.readouterr().out
    assert "refusal_rule" in merged(tmp_path)["harmful"]["judges"]


class Echo(Suite):
    """A toy suite written in this test file: its score is the share of items the model answered at all."""

    kind = "echo"

    def items(self, cfg: EvalConfig) -> list[Example]:
        return [Example(f"e{i}", f"say {i}") for i in range(3)]

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        from safeft import io
        from safeft.eval.generate import generate_full

        gens = generate_full(inp.model, inp.tok, [e.prompt for e in items], inp.settings, progress=False)
        recs = records.build_records(self.name, [e.id for e in items], [e.prompt for e in items], gens, inp.settings)
        if inp.out is not None:
            io.write_jsonl(inp.out / self.records_file, recs)
        return {"answered": sum(bool(g.text) for g in gens) / len(gens), "n": len(items)}


def test_a_suite_is_one_registered_class(tiny, tmp_path, monkeypatch):
    assert {"harmful", "over_refusal", "utility", "humaneval"} <= set(SUITES)
    monkeypatch.setitem(SUITES._items, "echo", Echo)
    model, tok = tiny
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=["echo", "over_refusal"])
    assert list(summary) == ["echo", "over_refusal"] and summary["echo"]["n"] == 3
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    recs = records.read_records(ev / "echo.jsonl")
    assert [r["id"] for r in recs] == ["e0", "e1", "e2"] and recs[0]["settings"]["max_new_tokens"] == 4
    assert merged(tmp_path)["echo"]["answered"] == summary["echo"]["answered"]
    with pytest.raises(C.ConfigError, match="takes no argument"):
        parse_suites(["echo:x"])


def test_a_bad_judge_fails_before_anything_is_generated(tiny, tmp_path, monkeypatch):
    import safeft.eval.suites.judged as J

    monkeypatch.setattr(J, "generate_full", lambda *a, **k: pytest.fail("generated before checking the judge"))
    model, tok = tiny
    with pytest.raises(KeyError, match="unknown judge"):
        evaluate(model, tok, EvalConfig(**{**CFG, "judge": "refusal_keywordz"}), tmp_path, suites=["harmful"])


def test_gen_settings_come_from_the_eval_config():
    ev = EvalConfig(
        max_new_tokens=7, batch_size=3, do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=5, precision="fp32"
    )
    s = GenSettings.from_eval(ev, system_prompt="Be brief.")
    assert s == GenSettings(7, 3, True, 0.7, "Be brief.", "fp32", 0.9, 40, 5, "hf")
    own = GenSettings.from_eval(ev, max_new_tokens=96, batch_size=16, precision="bf16")
    assert (own.max_new_tokens, own.batch_size, own.precision) == (96, 16, "bf16")
    assert (own.do_sample, own.temperature, own.seed, own.system_prompt) == (True, 0.7, 5, None)


def test_training_time_asr_and_diagnosis_decode_like_safeft_eval(tmp_path, monkeypatch):
    """Both used to build greedy settings whatever eval.do_sample said."""
    import safeft.eval.suites as S
    from safeft import train
    from safeft.diagnose import drift

    cfg = C.load(overrides=["eval.do_sample=true", "eval.temperature=0.5", "eval.seed=3", "model.system_prompt=Hi"])
    want = GenSettings.from_eval(cfg.eval, system_prompt="Hi")
    seen: list[GenSettings] = []
    monkeypatch.setattr(S, "harmful", lambda m, t, items, settings, *a, **k: seen.append(settings) or {"asr": 0.0})

    asr = train.PeriodicASR(cfg, tmp_path)
    asr._items = [Example("h0", "p")]
    ctx = type("Ctx", (), {"step": 0, "unwrapped": None, "tokenizer": None})()
    asr.run(ctx)
    rm = drift.RunModels(cfg, None, None, ref_model=None)
    drift._asr_now(rm, [Example("h0", "p")], reference=False)
    assert seen == [want, want] and want.do_sample and want.temperature == 0.5


def test_alignment_answers_take_the_eval_decoding_and_the_cache_key_follows_it():
    from safeft import align

    def cfg(*extra):
        return C.load(overrides=["model.spec=/some/model/dir", *extra])

    s = align._benign_settings(cfg("eval.do_sample=true"))
    assert (s.max_new_tokens, s.batch_size, s.do_sample) == (C.AlignConfig().benign_max_new_tokens, 16, True)
    base = align.cache_key(cfg())
    assert align.cache_key(cfg("eval.seed=7", "eval.max_new_tokens=9")) == base  # greedy: same answers, same key
    assert align.cache_key(cfg("eval.do_sample=true")) != base


def test_the_runs_domain_is_read_in_one_place():
    assert run_domain(C.load(overrides=["data.task=domain:medical"])) == "medical"
    assert run_domain(C.load(overrides=["data.task=domain:code:train"])) == "code"
    assert run_domain(C.load(overrides=["data.task=jsonl:/x/y.jsonl"])) is None
    assert run_domain(C.load()) is None


def test_cli_eval_of_a_run_names_its_checkpoint(tmp_path, tiny_dir):
    from safeft.testing import tiny_run_config
    from safeft.train import train

    cfg = tiny_run_config(tmp_path / "runs", f"model.spec={tiny_dir}", "train.steps=2", "data.n_train=8")
    res = train(cfg, progress=False)
    args = ["eval.max_new_tokens=2", "eval.precision=fp32", "eval.n_harmful=2", "--suite", "harmful"]
    assert main(["eval", str(res.run_dir), *args]) == 0
    (ev,) = Store(res.run_dir / "eval").evaluation_dirs()
    index = json.loads((res.run_dir / "eval" / "index.json").read_text())["evaluations"]
    assert index[ev.name]["settings"]["model"] == {"checkpoint_step": 2}
    assert merged(res.run_dir)["harmful"]["n"] == 2
