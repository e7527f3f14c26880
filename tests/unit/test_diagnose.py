"""Diagnosis on tiny runs: drift numbers against direct computations, localisation, pictures, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safeft import models
from safeft.diagnose.cka import linear_cka
from safeft.diagnose.drift import DriftConfig, compare_models, diagnose_run, shared_prefix_len
from safeft.diagnose.localise import Thresholds, localise, ranges
from safeft.testing import tiny_run_config
from safeft.train import train

TINY = DriftConfig(n_harmful=8, n_benign=8, batch_size=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step tiny SFT run with checkpoints and ASR every 2 steps."""
    from safeft.testing import save_tiny_model

    root = tmp_path_factory.mktemp("diag")
    spec = save_tiny_model(root / "model")
    cfg = tiny_run_config(
        root / "runs",
        f"model.spec={spec}",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        "train.eval_n_harmful=4",
        "eval.max_new_tokens=3",
        "eval.judge=dummy",
        "eval.precision=fp32",
        "data.n_train=16",
    )
    res = train(cfg, progress=False)
    return res.run_dir


def _rows(tok, prompts):
    from safeft.data.chat import render
    from safeft.data.types import Example

    return [render(tok, Example(str(i), p)) for i, p in enumerate(prompts)]


PROMPTS = [f"Question {i}: what is {i * 7} percent of {100 + i}?" + " more" * (i % 4) for i in range(10)]


def test_identical_models_give_cka_one_and_kl_zero(tiny):
    model, tok = tiny
    res = compare_models(model, model, _rows(tok, PROMPTS), tok.pad_token_id, batch_size=4)
    for s in ("last", "mean", "token"):
        assert np.allclose(res.cka[s], 1.0, atol=1e-9), s
    assert abs(res.kl) < 1e-9 and res.n_prompts == 10
    rows = _rows(tok, PROMPTS)
    kept = compare_models(model, model, rows, tok.pad_token_id, batch_size=4, keep_prefix=True)
    assert kept.n_tokens == sum(len(r.input_ids) - 1 for r in rows) > res.n_tokens  # only the first token dropped


def test_drift_matches_a_direct_computation_and_sees_the_changed_layer(tiny, tiny_dir):
    model, tok = tiny
    other, _ = models.load(str(tiny_dir))
    with torch.no_grad():  # change block 1 only: block 0's representation must stay identical
        for p in models.decoder_layers(other)[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = _rows(tok, PROMPTS)
    res = compare_models(other, model, rows, tok.pad_token_id, batch_size=3)  # reference = the original
    assert res.cka["mean"][0] == pytest.approx(1.0, abs=1e-9) and res.cka["mean"][1] < 0.999
    # direct, unbatched: one prompt at a time, the samples built by hand
    skip = shared_prefix_len(rows)
    feats = {m: {"last": [], "mean": [], "token": []} for m in ("ref", "mod")}
    kls = []
    for r in rows:
        ids = torch.tensor([r.input_ids])
        with torch.no_grad():
            a = model(input_ids=ids, output_hidden_states=True)
            b = other(input_ids=ids, output_hidden_states=True)
        for m, out in (("ref", a), ("mod", b)):
            h1 = out.hidden_states[1][0].double()  # block 0 output
            feats[m]["last"].append(h1[-1])
            feats[m]["mean"].append(h1[skip:].mean(0))
            feats[m]["token"].append(h1[skip:])
        p = torch.log_softmax(a.logits[0, -1].double(), -1)
        q = torch.log_softmax(b.logits[0, -1].double(), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    assert res.kl == pytest.approx(np.mean(kls), rel=1e-6)
    for s, cat in (("last", torch.stack), ("mean", torch.stack), ("token", torch.cat)):
        direct = float(linear_cka(cat(feats["ref"][s]), cat(feats["mod"][s])))
        assert res.cka[s][0] == pytest.approx(direct, abs=1e-6)
    assert res.n_tokens == sum(len(r.input_ids) - skip for r in rows)
    fast = compare_models(other, model, rows, tok.pad_token_id, batch_size=3, fp32_products=True)
    assert np.allclose(fast.cka["token"], res.cka["token"], atol=1e-6) and fast.cka["mean"] == res.cka["mean"]


def test_shared_prefix_is_the_common_template_head(tiny):
    _, tok = tiny
    rows = _rows(tok, ["alpha beta", "alpha gamma", "delta"])
    n = shared_prefix_len(rows)
    assert all(r.input_ids[:n] == rows[0].input_ids[:n] for r in rows)
    assert len({r.input_ids[n] for r in rows}) > 1


def test_diagnose_run_covers_every_checkpoint_and_reads_the_logged_asr(tiny_run, monkeypatch):
    rec = diagnose_run(tiny_run, TINY, progress=False)
    assert [s["step"] for s in rec["steps"]] == [0, 2, 4]
    logged = [json.loads(x) for x in (tiny_run / "evals.jsonl").read_text().splitlines()]
    assert [s["asr"] for s in rec["steps"]] == [e["asr"] for e in logged]
    last = rec["steps"][-1]["probes"]["harmful"]
    assert len(last["cka"]["mean"]) == 2 and last["kl"] > 0 and all(c < 1 for c in last["cka"]["token"])
    # cached: a second call reads the per-step files (same numbers, no recomputation)
    cached = (tiny_run / "diagnose" / "steps" / "step-000004.json").stat().st_mtime
    from safeft.diagnose import drift

    def no_model(*a, **k):
        raise AssertionError("a fully cached diagnosis must not load the model")

    monkeypatch.setattr(drift, "open_run", no_model)
    again = diagnose_run(tiny_run, DriftConfig(n_harmful=8, n_benign=8, batch_size=5), progress=False)
    assert again["steps"] == rec["steps"]
    assert (tiny_run / "diagnose" / "steps" / "step-000004.json").stat().st_mtime == cached


def _record(drift_last: list[float], kl: list[float], asr: list[float | None]) -> dict:
    """A synthetic record: drift grows linearly in time up to drift_last per layer."""
    steps = list(range(0, 15 * len(kl), 15))
    out = []
    for t, s in enumerate(steps):
        frac = t / (len(steps) - 1)
        cka = [1 - frac * d for d in drift_last]
        probe = {"cka": {"mean": cka, "last": cka, "token": cka}, "kl": kl[t]}
        out.append({"step": s, "asr": asr[t], "probes": {"harmful": probe, "benign": probe}})
    return {"name": "syn", "layers": len(drift_last), "steps": out}


def test_localise_finds_the_late_layers_and_the_onset():
    drift = [0.001] * 24 + [0.05, 0.06, 0.08, 0.09, 0.1, 0.2]
    summ = localise(_record(drift, [0.0, 0.2, 0.7, 0.9], [0.1, 0.3, 0.9, 0.95]))
    assert summ["concentrated_layers"] == [25, 26, 27, 28, 29] and summ["concentrated_ranges"] == "25–29"
    assert summ["peak_layer"] == 29
    assert summ["onset_asr_step"] == 30 and summ["onset_kl_step"] == 30 and summ["onset_step"] == 30
    assert summ["concentrated_share"] == pytest.approx(0.53 / 0.604) and summ["uniform_share"] == pytest.approx(1 / 6)
    assert summ["mean_cka_final"]["harmful"]["mean"] == pytest.approx(1 - sum(drift) / 30)
    assert "layers 25–29" in summ["verdict"] and "onset by step 30" in summ["verdict"]
    # earlier KL crossing wins; no ASR logged is fine
    summ = localise(_record(drift, [0.0, 0.6, 0.7, 0.9], [None] * 4), Thresholds(kl=0.5))
    assert summ["onset_step"] == 15 and summ["onset_asr_step"] is None
    calm = localise(_record(drift, [0.0, 0.01, 0.02, 0.03], [0.1] * 4))
    assert calm["onset_step"] is None and "no collapse onset" in calm["verdict"]
    assert ranges([3, 4, 5, 9, 11, 12]) == "3–5, 9, 11–12"


def test_cli_diagnose_writes_figures_tables_summary_and_compares(tiny_run, tmp_path, capsys):
    import shutil

    from safeft.cli import main

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("diagnose"))
    (other / "evals.jsonl").unlink()  # this one did not log ASR: --eval-asr computes it
    out = tmp_path / "out"
    args = [str(tiny_run), "--compare", str(other), "--out", str(out), "--eval-asr", "4"]
    assert main(["diagnose", *args, "--n-harmful", "8", "--n-benign", "8", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("mean CKA") == 2
    summ = json.loads((out / "summary.json").read_text())
    assert summ["steps"] == [0, 2, 4] and summ["compare"]["run"] == "other"
    assert all(a is not None for a in summ["compare"]["asr"])  # computed for the run that did not log it
    for f in ("overview.png", "heatmaps.png", "curves.csv", "cka_harmful_mean.csv", "cka_benign_token.csv"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "compare-other" / "overview.png").exists() is False
    assert (out / "compare-other" / "cka_harmful_last.csv").exists()
    head = (out / "cka_harmful_mean.csv").read_text().splitlines()
    assert head[0] == "step,layer0,layer1" and head[1].startswith("0,1.000000,1.000000") and len(head) == 4


def test_cli_diagnose_rejects_a_run_without_checkpoints(tmp_path, capsys):
    from safeft.cli import main

    (tmp_path / "config.yaml").write_text("data:\n  task: domain:finance\n")
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "nope")]) == 2


def test_a_run_unsafe_from_the_start_has_no_onset():
    drift = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    summ = localise(_record(drift, [0.0, 0.1, 0.2, 0.3], [0.9, 0.95, 1.0, 1.0]))
    assert summ["onset_asr_step"] is None and summ["unsafe_at_start"]
    assert "already ≥ 50% at step 0" in summ["verdict"] and summ["concentrated_layers"] == [5]
    assert "layer 5 (" in summ["verdict"]


def test_layers_are_ranked_by_the_drift_at_the_onset_not_by_later_task_drift():
    # collapse at step 15 moves the last layers; afterwards task learning moves early layers even more
    rec = _record([0.01] * 6, [0.0, 1.0, 1.0, 1.0], [0.0, 0.9, 0.9, 0.9])
    late = [0.0, 0.0, 0.0, 0.0, 0.01, 0.02]
    for t, st in enumerate(rec["steps"]):
        early = [0.05 * max(t - 1, 0)] * 2 + [0.0] * 4
        cka = [1 - (late[i] if t else 0) - early[i] for i in range(6)]
        for p in ("harmful", "benign"):
            st["probes"][p]["cka"] = {s: cka for s in ("mean", "last", "token")}
    summ = localise(rec)
    assert summ["onset_step"] == 15 and summ["drift_rise_step"] == 15
    assert summ["concentrated_layers"] == [5] and summ["concentrated_layers_final"] == [0]
