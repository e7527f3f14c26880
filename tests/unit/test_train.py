"""The training loop: it learns, it counts, it resumes exactly, and it rejects bad input cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from safeft import config as C
from safeft.data.types import DataError, Example
from safeft.runs import checkpoints, load_trainable
from safeft.testing import tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(24)]


def cfg_for(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", "train.steps=12", *extra)


def test_loop_learns_and_changes_parameters(tmp_path, tiny):
    model, tok = tiny
    cfg = cfg_for(tmp_path, "train.steps=20", "train.lr=0.05", "train.schedule=constant")
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, progress=False)
    losses = [m["loss"] for m in res.metrics]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    changed = [n for n, p in res.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert changed, "LoRA B starts at zero; after training it must not be"
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 21))
    assert {"loss", "loss/task", "passes/forward", "passes/backward", "lr", "tokens"} <= set(lines[0])
    assert lines[0]["passes/forward"] == 1 and lines[0]["passes/backward"] == 1
    assert (res.run_dir / "config.yaml").exists() and C.load(res.run_dir / "config.yaml") == cfg


def test_passes_are_counted_per_optimizer_step(tmp_path, tiny):
    model, tok = tiny
    res = train(
        cfg_for(tmp_path, "train.steps=2", "train.grad_accum=3"),
        examples=EXAMPLES,
        model=model,
        tokenizer=tok,
        progress=False,
    )
    assert res.metrics[0]["passes/forward"] == 3 and res.metrics[0]["passes/backward"] == 3


def _final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(checkpoints(run_dir)[-1] / "trainable.safetensors"))


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tiny_dir):
    from safeft import models

    # lora dropout > 0 makes the RNG state matter, so a sloppy resume would show.
    extra = ("train.save_every=4", "model.lora.dropout=0.1", "train.schedule=cosine", "train.warmup_ratio=0.2")
    m1, tok = models.load(str(tiny_dir))
    straight = train(cfg_for(tmp_path / "a", *extra), examples=EXAMPLES, model=m1, tokenizer=tok, progress=False)

    cfg = cfg_for(tmp_path / "b", *extra)
    m2, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        # killed after step 6: the last checkpoint is step 4, steps 5-6 must be redone and re-logged once
        train(cfg, examples=EXAMPLES, model=m2, tokenizer=tok, progress=False, interrupt_after=6)
    assert len(_metrics(tmp_path / "b" / "runs" / "r")) == 6
    m3, tok = models.load(str(tiny_dir))
    resumed = train(cfg, examples=EXAMPLES, model=m3, tokenizer=tok, progress=False)

    a, b = _final_state(straight.run_dir), _final_state(resumed.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight.run_dir) == _metrics(resumed.run_dir)


def test_resume_refuses_a_different_config(tmp_path, tiny_dir):
    from safeft import models

    m, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(
            cfg_for(tmp_path, "train.save_every=2"),
            examples=EXAMPLES,
            model=m,
            tokenizer=tok,
            progress=False,
            interrupt_after=2,
        )
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(C.ConfigError, match="different config"):
        train(
            cfg_for(tmp_path, "train.save_every=2", "train.lr=0.5"),
            examples=EXAMPLES,
            model=m,
            tokenizer=tok,
            progress=False,
        )


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, tiny_dir):
    """2 micro-batches of 4 = 1 batch of 8 when every row has the same number of label tokens."""
    from safeft import models
    from safeft.data.chat import render

    same_len = [Example(f"e{i}", f"Q {d}", f"A {d}") for i, d in enumerate([2, 3, 5, 7] * 4)]
    m, tok = models.load(str(tiny_dir))
    # the equivalence only holds when every row has the same number of label tokens
    assert len({sum(x != -100 for x in render(tok, e).labels) for e in same_len}) == 1
    a = train(
        cfg_for(tmp_path / "a", "train.steps=3", "train.batch_size=8"),
        examples=same_len,
        model=m,
        tokenizer=tok,
        progress=False,
    )
    m, tok = models.load(str(tiny_dir))
    b = train(
        cfg_for(tmp_path / "b", "train.steps=3", "train.batch_size=4", "train.grad_accum=2"),
        examples=same_len,
        model=m,
        tokenizer=tok,
        progress=False,
    )
    sa, sb = _final_state(a.run_dir), _final_state(b.run_dir)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_load_trainable_rejects_a_mismatched_checkpoint(tmp_path, tiny_dir):
    from safeft import models

    m, tok = models.load(str(tiny_dir))
    res = train(cfg_for(tmp_path, "train.steps=1"), examples=EXAMPLES, model=m, tokenizer=tok, progress=False)
    full, _ = models.load(str(tiny_dir))
    with pytest.raises(RuntimeError, match="does not match"):
        load_trainable(full, checkpoints(res.run_dir)[-1])


def test_malformed_data_names_file_and_row_and_writes_nothing(tmp_path, tiny):
    model, tok = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "", "response": "x"}\n')
    cfg = cfg_for(tmp_path, f"data.task=jsonl:{bad}")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2"):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert not (tmp_path / "runs").exists()


def test_rows_without_response_are_rejected(tmp_path, tiny):
    model, tok = tiny
    f = tmp_path / "noresp.jsonl"
    f.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises((C.ConfigError, DataError), match=r"no response .*noresp.jsonl, line 1"):  # file and line
        train(cfg_for(tmp_path, f"data.task=jsonl:{f}"), model=model, tokenizer=tok, progress=False)
    assert not (tmp_path / "runs").exists()


def test_eval_every_logs_asr_at_step_zero_and_every_k_steps_and_resumes(tmp_path, tiny_dir):
    from safeft import models
    from safeft.eval import judges

    extra = (
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        "train.eval_n_harmful=3",
        "eval.max_new_tokens=3",
        "eval.judge=dummy",
        "eval.precision=fp32",
    )
    m, tok = models.load(str(tiny_dir))
    res = train(cfg_for(tmp_path / "a", *extra), examples=EXAMPLES, model=m, tokenizer=tok, progress=False)
    evals = [json.loads(x) for x in (res.run_dir / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(e["n"] == 3 and e["judge"] == "dummy" for e in evals)
    # the logged ASR is the per-sample records' ASR (re-scorable), and the metrics rows carry it too
    for e in evals:
        recs = [json.loads(x) for x in (res.run_dir / "eval_steps" / f"step-{e['step']:06d}" / "harmful.jsonl").open()]
        again = judges.dummy([r["prompt"] for r in recs], [r["completion"] for r in recs])
        assert e["asr"] == sum(bool(v.harmful) for v in again) / 3
    rows = {r["step"]: r for r in _metrics(res.run_dir)}
    assert rows[2]["eval/asr"] == evals[1]["asr"] and "eval/asr" not in rows[1]

    # evaluation must not perturb training: same weights as a run without it
    m2, tok = models.load(str(tiny_dir))
    plain = train(
        cfg_for(tmp_path / "b", *extra, "train.eval_every=0"),
        examples=EXAMPLES,
        model=m2,
        tokenizer=tok,
        progress=False,
    )
    a, b = _final_state(res.run_dir), _final_state(plain.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain.run_dir / "evals.jsonl").exists()

    # an interrupted run re-evaluates only what it redoes
    cfg = cfg_for(tmp_path / "c", *extra)
    m3, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(cfg, examples=EXAMPLES, model=m3, tokenizer=tok, progress=False, interrupt_after=3)
    m4, tok = models.load(str(tiny_dir))
    again = train(cfg, examples=EXAMPLES, model=m4, tokenizer=tok, progress=False)
    steps = [json.loads(x)["step"] for x in (again.run_dir / "evals.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]


def test_eval_every_rejects_negative_values(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(C.ConfigError, match="eval_every"):
        train(cfg_for(tmp_path, "train.eval_every=-1"), examples=EXAMPLES, model=model, tokenizer=tok, progress=False)
