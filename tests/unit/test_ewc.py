"""EWC: the Fisher is the naive per-example (or minibatch) estimate on exactly the alignment data passed in,
the penalty is zero at θ* and equals its formula elsewhere, nothing leaks into the first step's gradient,
a resumed run keeps θ* and F, and λ = 0 is plain SFT exactly."""

from __future__ import annotations

import json

import pytest
import torch

from safeft import config as C
from safeft import models
from safeft.context import RunContext
from safeft.data.chat import collate, render
from safeft.data.types import Example
from safeft.methods.ewc import EWC, EWCConfig
from safeft.runs import checkpoints
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
ALIGN = [Example(f"a{i}", f"How do I do harmful thing {i}?", "I'm sorry, I can't help." + " No." * i) for i in range(6)]
OTHER = [Example(f"o{i}", f"Tell me about fox {i}.", "The quick brown fox jumps over the lazy dog.") for i in range(6)]


def _cfg(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", "train.steps=4", "defense.name=ewc", *extra)


def _ctx(tiny, tmp_path, *extra: str, align=ALIGN, move_b: bool = True) -> RunContext:
    ctx = make_ctx(_cfg(tmp_path, *extra), tiny, tmp_path, {"alignment": align, "harmful_prompts": []})
    if move_b:  # a non-zero B, so that A has gradients too and every entry of F is exercised
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in ctx.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    return ctx


def _naive_fisher(ctx, data, batch_size: int | None) -> dict[str, torch.Tensor]:
    """Per-example (batch_size None) mean, or summed minibatch, of squared gradients; written from scratch."""
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    groups = (
        [[ex] for ex in data]
        if batch_size is None
        else [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    )
    for group in groups:
        rows = [render(ctx.tokenizer, ex) for ex in group]
        batch = collate(rows, ctx.tokenizer.pad_token_id, "right")
        ctx.model.zero_grad()
        ctx.model(**batch).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                out[n] += p.grad.detach() ** 2
    ctx.model.zero_grad(set_to_none=True)
    if batch_size is None:
        for f in out.values():
            f /= len(data)
    return out


def _setup(ctx) -> EWC:
    d = EWC(ctx.cfg.defense)
    d.setup(ctx)
    return d


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9)


def test_per_example_fisher_equals_a_naive_loop_over_the_alignment_data(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.normalize=false")
    d = _setup(ctx)
    _close(d.fisher, _naive_fisher(ctx, ALIGN, None))
    assert all(f.dtype == torch.float32 for f in d.fisher.values())
    assert ctx.passes == {"forward": len(ALIGN), "backward": len(ALIGN)}  # one F+B per example
    # no gradient is left behind to leak into the first training step (§4.5-1)
    assert all(p.grad is None for p in ctx.model.parameters())


def test_minibatch_fisher_is_the_sum_of_squared_minibatch_gradients(tiny, tmp_path):
    ctx = _ctx(
        tiny, tmp_path, "defense.normalize=false", "defense.fisher_reduction=sum_minibatch_sq", "defense.fisher_batch=4"
    )
    d = _setup(ctx)
    _close(d.fisher, _naive_fisher(ctx, ALIGN, 4))
    assert ctx.passes["forward"] == 2  # 6 examples in batches of 4: 4 + 2


def test_minibatch_of_one_is_n_times_the_per_example_mean(tiny_dir, tmp_path):
    per = _setup(_ctx(models.load(str(tiny_dir)), tmp_path / "a", "defense.normalize=false")).fisher
    summed = _setup(
        _ctx(
            models.load(str(tiny_dir)),
            tmp_path / "b",
            "defense.normalize=false",
            "defense.fisher_reduction=sum_minibatch_sq",
            "defense.fisher_batch=1",
        )
    ).fisher
    _close(summed, {k: len(ALIGN) * v for k, v in per.items()})


def test_fisher_comes_from_the_data_passed_in(tiny_dir, tmp_path):
    a = _setup(_ctx(models.load(str(tiny_dir)), tmp_path / "a", "defense.normalize=false", align=ALIGN)).fisher
    b = _setup(_ctx(models.load(str(tiny_dir)), tmp_path / "b", "defense.normalize=false", align=OTHER)).fisher
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    # and only the first fisher_samples examples count
    c = _setup(
        _ctx(models.load(str(tiny_dir)), tmp_path / "c", "defense.normalize=false", "defense.fisher_samples=2")
    ).fisher
    ctx = _ctx(models.load(str(tiny_dir)), tmp_path / "d")
    _close(c, _naive_fisher(ctx, ALIGN[:2], None))


def test_normalised_fisher_has_mean_one(tiny, tmp_path):
    d = _setup(_ctx(tiny, tmp_path))
    total = sum(float(f.sum()) for f in d.fisher.values())
    count = sum(f.numel() for f in d.fisher.values())
    assert total / count == pytest.approx(1.0, rel=1e-5)
    assert d.raw_mean > 0


def test_fresh_adapter_has_zero_fisher_on_a(tiny, tmp_path):
    # θ* of a fresh LoRA has B = 0, so ∂L/∂A = 0 there: the penalty acts on B only (the variant we run, §4.5-4)
    d = _setup(_ctx(tiny, tmp_path, move_b=False))
    assert all(float(f.abs().sum()) == 0 for n, f in d.fisher.items() if "lora_A" in n)
    assert any(float(f.abs().sum()) > 0 for n, f in d.fisher.items() if "lora_B" in n)


def test_penalty_is_zero_at_theta_star_and_follows_its_formula(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.lam=3.0")
    d = _setup(ctx)
    assert d.penalty(ctx, {})["ewc"].item() == 0.0
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    star = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.01)
    pen = d.penalty(ctx, {})["ewc"]
    naive = 0.5 * 3.0 * sum((d.fisher[n] * (p.detach() - star[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(pen.detach(), naive, rtol=1e-5, atol=0)
    pen.backward()
    grads = {n: p.grad for n, p in params.items()}
    for n, p in params.items():  # ∂/∂θ of λ/2 Σ F (θ − θ*)² = λ F (θ − θ*)
        torch.testing.assert_close(grads[n], 3.0 * d.fisher[n] * (p.detach() - star[n]), rtol=1e-4, atol=1e-10)


def test_lam_zero_reproduces_plain_sft_exactly(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("sft", ("defense.name=sft",)), ("ewc", ("defense.lam=0",))):
        m, tok = models.load(str(tiny_dir))
        runs[name] = train(
            _cfg(tmp_path / name, *extra),
            examples=EXAMPLES,
            model=m,
            tokenizer=tok,
            aux={"alignment": ALIGN},
            progress=False,
        )
    assert [r["loss"] for r in runs["ewc"].metrics] == [r["loss"] for r in runs["sft"].metrics]
    summary = json.loads((runs["ewc"].run_dir / "train_summary.json").read_text())
    assert summary["setup_passes"] == {"forward": 0, "backward": 0}  # no Fisher pass at λ = 0
    a, b = (load_file(str(checkpoints(runs[n].run_dir)[-1] / "trainable.safetensors")) for n in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_penalty_is_logged_and_setup_costs_one_pass_per_example(tmp_path, tiny):
    model, tok = tiny
    res = train(
        _cfg(tmp_path, "defense.lam=100"),
        examples=EXAMPLES,
        model=model,
        tokenizer=tok,
        aux={"alignment": ALIGN},
        progress=False,
    )
    rows = res.metrics
    assert rows[0]["loss/ewc"] == 0.0 and rows[-1]["loss/ewc"] > 0
    assert all(r["passes/forward"] == 1 and r["passes/backward"] == 1 for r in rows)
    summary = json.loads((res.run_dir / "train_summary.json").read_text())
    assert summary["setup_passes"] == {"forward": len(ALIGN), "backward": len(ALIGN)}


def test_resume_keeps_theta_star_and_fisher(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    extra = ("train.steps=6", "train.save_every=2", "defense.lam=100")
    m, tok = models.load(str(tiny_dir))
    straight = train(
        _cfg(tmp_path / "a", *extra),
        examples=EXAMPLES,
        model=m,
        tokenizer=tok,
        aux={"alignment": ALIGN},
        progress=False,
    )
    cfg = _cfg(tmp_path / "b", *extra)
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(
            cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux={"alignment": ALIGN}, progress=False, interrupt_after=3
        )
    m, tok = models.load(str(tiny_dir))
    resumed = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux={"alignment": ALIGN}, progress=False)
    a, b = (load_file(str(checkpoints(r.run_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss/ewc"] for r in straight.metrics[2:]] == [r["loss/ewc"] for r in resumed.metrics]


def test_bad_config_is_rejected():
    # the Config checks its values as it is built (from YAML or here), before any defense exists
    for bad in ({"lam": -1.0}, {"fisher_samples": 0}, {"fisher_batch": 0}, {"fisher_reduction": "max"}):
        with pytest.raises(C.ConfigError):
            EWC(EWCConfig(**bad))
