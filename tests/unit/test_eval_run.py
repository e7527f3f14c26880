"""Generation settings recorded per sample, --limit, suite selection, HumanEval through the sandbox, vLLM guard."""

from __future__ import annotations

import json
import sys
import types

import pytest

from safeft.config import ConfigError, EvalConfig
from safeft.data.sources import load_source
from safeft.eval import humaneval as H
from safeft.eval.generate import GenerationError, GenSettings, generate, generate_full
from safeft.eval.results import Store
from safeft.eval.sandbox import SandboxLimits, run_many
from safeft.eval.suites import evaluate, headline, parse_suites

CFG = dict(n_harmful=4, n_over_refusal=3, n_utility=3, max_new_tokens=4, batch_size=4, precision="fp32")


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _latest(out):
    """The directory of the newest evaluation under ``out/eval`` (safeft.eval.results)."""
    return Store(out / "eval").evaluation_dirs()[-1]


def test_every_setting_is_recorded_with_each_sample(tiny, tmp_path):
    model, tok = tiny
    cfg = EvalConfig(**CFG, suites=["harmful"])
    evaluate(model, tok, cfg, tmp_path, system_prompt="Answer briefly.")
    recs = _lines(_latest(tmp_path) / "harmful.jsonl")
    assert len(recs) == 4
    s = recs[0]["settings"]
    assert s["max_new_tokens"] == 4 and s["system_prompt"] == "Answer briefly." and s["decoding"] == "greedy"
    assert s["dtype"] == "float32" and s["precision"] == "fp32" and s["backend"] == "hf"
    assert {"temperature", "top_p", "top_k", "seed", "batch_size", "tokenizer"} <= set(s)
    assert len(s["chat_template_sha256"]) == 16
    for r in recs:
        assert 1 <= r["n_new_tokens"] <= 4 and r["finish"] in ("stop", "length")
        assert (r["finish"] == "length") == (r["n_new_tokens"] == 4) or r["finish"] == "stop"


def test_the_template_hash_changes_with_the_template(tiny):
    _, tok = tiny
    before = GenSettings().record(tok)["chat_template_sha256"]
    tok.chat_template = tok.chat_template.replace("tiny test model", "different model")
    assert GenSettings().record(tok)["chat_template_sha256"] != before


def test_system_prompt_reaches_the_model(tiny):
    model, tok = tiny
    prompts = ["What is 12 percent of 250?", "hi"]
    plain = generate(model, tok, prompts, GenSettings(8, precision="fp32"), progress=False)
    other = generate(model, tok, prompts, GenSettings(8, precision="fp32", system_prompt="Sorry sorry"), progress=False)
    assert plain != other


def test_finish_reason_and_token_count(tiny):
    model, tok = tiny
    gens = generate_full(model, tok, ["hi", "def add_seven(x):"], GenSettings(3, precision="fp32"), progress=False)
    for g in gens:
        assert g.n_tokens <= 3 and (g.finish == "stop" or g.n_tokens == 3)


def test_sampling_is_seeded_and_recorded(tiny):
    model, tok = tiny
    prompts = ["hi", "What is 12 percent of 250?", "def add_seven(x):"]
    s = GenSettings(12, do_sample=True, temperature=1.5, top_k=50, seed=3, precision="fp32")
    a, b = (generate(model, tok, prompts, s, progress=False) for _ in range(2))
    greedy = generate(model, tok, prompts, GenSettings(12, precision="fp32"), progress=False)
    assert a == b and a != greedy
    rec = s.record()
    assert rec["decoding"] == "sample" and rec["temperature"] == 1.5 and rec["top_k"] == 50 and rec["seed"] == 3


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of hf, vllm"):
        GenSettings(backend="tgi")
    with pytest.raises(ValueError, match="precision"):
        GenSettings(precision="fp16")


def test_vllm_backend_without_vllm_says_what_to_install(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(GenerationError, match="pip install vllm"):
        generate(model, tok, ["hi"], GenSettings(backend="vllm"))


def test_vllm_backend_without_a_gpu_says_so(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(GenerationError, match="needs a CUDA GPU"):
        generate(model, tok, ["hi"], GenSettings(backend="vllm"))


def test_limit_caps_every_suite_and_is_recorded(tiny, tmp_path):
    model, tok = tiny
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, ["finance"], limit=2)
    assert set(summary) == {"harmful", "over_refusal", "utility:finance"}
    for name, entry in summary.items():
        assert entry["n"] == 2 and entry["limit"] == 2, name
    assert len(_lines(_latest(tmp_path) / "over_refusal.jsonl")) == 2
    full = evaluate(model, tok, EvalConfig(**CFG), None, ["finance"])
    assert full["harmful"]["n"] == 4 and "limit" not in full["harmful"]
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        evaluate(model, tok, EvalConfig(**CFG), None, limit=0)


def test_only_the_selected_suites_run(tiny, tmp_path):
    model, tok = tiny
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=["over_refusal", "utility:medical"])
    assert set(summary) == {"over_refusal", "utility:medical"}
    files = {p.name for p in _latest(tmp_path).iterdir()}
    assert files == {"over_refusal.jsonl", "utility_medical.jsonl", "summary.json"}
    assert headline(summary).keys() == {"over_refusal", "utility:medical/acc", "utility:medical/nll"}


def test_suite_names_are_checked():
    assert parse_suites(["harmful", "utility", "utility:code", "humaneval"], ["finance"]) == [
        "harmful",
        "utility:finance",
        "utility:code",
        "humaneval",
    ]
    assert parse_suites(["utility"], []) == []  # a model spec has no domain of its own
    with pytest.raises(KeyError, match="did you mean 'over_refusal'"):
        parse_suites(["over_refusals"])
    with pytest.raises(KeyError, match="unknown domain 'fiance'"):
        parse_suites(["utility:fiance"])
    with pytest.raises(ConfigError, match="takes no argument"):
        parse_suites(["humaneval:plus"])


def test_harmful_suite_takes_any_data_source(tiny, tmp_path):
    model, tok = tiny
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"bad thing {i}"}) + "\n" for i in range(3)))
    name = f"harmful:jsonl:{src}"
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=[name])
    assert summary[name]["n"] == 3 and summary[name]["source"] == f"jsonl:{src}"
    (rec_file,) = [p for p in _latest(tmp_path).glob("harmful_*.jsonl")]
    assert [r["id"] for r in _lines(rec_file)] == ["m0", "m1", "m2"]
    assert f"asr:jsonl:{src}" in headline(summary)


def test_humaneval_loads_from_the_package_and_its_solutions_pass_in_the_sandbox():
    items = load_source("humaneval")
    assert len(items) == 164 and items[0].meta["entry_point"] and "def check" in items[0].meta["test"]
    some = items[:4]
    fast = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=512)
    body = run_many([[H.program(e, e.response), H.tests(e)] for e in some], fast, progress=False)
    whole = [f"Here you go:\n```python\n{e.prompt}{e.response}```" for e in some]
    fenced = run_many([[H.program(e, w), H.tests(e)] for e, w in zip(some, whole, strict=True)], fast, progress=False)
    wrong = run_many([[H.program(e, "    return None\n"), H.tests(e)] for e in some], fast, progress=False)
    assert all(r.passed for r in body + fenced), [r.reason for r in body + fenced]
    assert not any(r.passed for r in wrong) and all("failed" in r.reason for r in wrong)


def test_humaneval_suite_records_pass_at_1(tiny, tmp_path):
    model, tok = tiny
    cfg = EvalConfig(**CFG, humaneval_max_new_tokens=6)
    summary = evaluate(model, tok, cfg, tmp_path, suites=["humaneval"], limit=2)
    he = summary["humaneval"]
    assert he["n"] == 2 and he["max_new_tokens"] == 6 and he["decoding"] == "greedy" and he["pass@1"] == 0.0
    recs = _lines(_latest(tmp_path) / "humaneval.jsonl")
    assert [r["id"] for r in recs] == ["humaneval-0", "humaneval-1"]
    assert all(r["correct"] is False and r["reason"] and r["prompt"].startswith(H.INSTRUCTION) for r in recs)


def test_code_utility_runs_the_tests_in_the_sandbox(tiny, tmp_path):
    model, tok = tiny
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=["utility:code"], limit=2)
    assert summary["utility:code"]["accuracy"] == 0.0
    assert all(r["reason"] for r in _lines(_latest(tmp_path) / "utility_code.jsonl"))


def test_cli_suite_and_limit(tiny_dir, tmp_path, capsys):
    from safeft.cli import main

    overrides = ["eval.max_new_tokens=3", "eval.precision=fp32", f"out_dir={tmp_path}", "run_id=e"]
    rc = main(["eval", str(tiny_dir), *overrides, "--suite", "over_refusal", "--limit", "2"])
    assert rc == 0
    summary = json.loads((_latest(tmp_path / "e") / "summary.json").read_text())
    assert list(summary) == ["over_refusal"] and summary["over_refusal"]["n"] == 2
    assert json.loads((tmp_path / "e" / "eval" / "summary.json").read_text()) == {}  # a smoke run is not the run's
    assert main(["eval", str(tiny_dir), f"out_dir={tmp_path}", "--suite", "harmfull"]) == 2
    assert "did you mean 'harmful'" in capsys.readouterr().err


def test_generation_benchmark_runs_in_quick_mode(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--prompts", "4", "--max-new-tokens", "3", "--dtype", "float32"])
    assert res["prompts"] == 4 and res["settings"]["dtype"] == "float32"
    assert res["batched"]["new_tokens"] == res["one_at_a_time"]["new_tokens"]
    assert res["identical_completions"] == "4/4"  # fp32 on the tiny model: padding must not change outputs


def test_a_run_is_evaluated_with_its_own_system_prompt_and_eval_settings(tiny, tiny_dir, tmp_path, capsys):
    from safeft.cli import main
    from safeft.testing import tiny_run_config
    from safeft.train import train

    model, tok = tiny
    cfg = tiny_run_config(
        tmp_path / "runs",
        f"model.spec={tiny_dir}",
        "train.steps=1",
        "model.system_prompt=Be brief.",
        "eval.max_new_tokens=3",
        "eval.n_harmful=2",
    )
    res = train(cfg, model=model, tokenizer=tok, progress=False)
    assert main(["eval", str(res.run_dir), "--suite", "harmful"]) == 0
    out = capsys.readouterr().out
    assert "harmful: asr " in out and "(n=2)" in out  # the rate printed with its interval and n
    recs = [json.loads(x) for f in (res.run_dir / "eval").rglob("harmful.jsonl") for x in f.read_text().splitlines()]
    assert len(recs) == 2
    assert {r["settings"]["system_prompt"] for r in recs} == {"Be brief."}
    assert {r["settings"]["max_new_tokens"] for r in recs} == {3}
