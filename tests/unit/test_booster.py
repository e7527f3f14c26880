"""Booster: the update is ∇f + λ∇h(θ) − λ∇h(θ') against a naive computation, θ is restored exactly,
α = 0 and λ = 0 reproduce SFT exactly, and the harmful rows are only templated compliance openers."""

from __future__ import annotations

import pytest
import torch

from safeft import models
from safeft.context import RunContext
from safeft.data.aux import COMPLIANCE_OPENERS
from safeft.data.types import Example
from safeft.methods.booster import Booster
from safeft.testing import make_ctx, tiny_contrastive, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
CONTRASTIVE = tiny_contrastive()
AUX = {"contrastive": CONTRASTIVE}


def _ctx(tiny, tmp_path, *extra: str) -> RunContext:
    ctx = make_ctx(["defense.name=booster", "defense.harmful_batch=3", *extra], tiny, tmp_path, AUX)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return ctx


def _grad(model, batch) -> tuple[dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, float(loss.detach())


def test_update_matches_the_naive_first_order_gradient_and_restores_theta(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.lam=5", "defense.alpha=0.3")
    d = Booster(ctx.cfg.defense)
    d.setup(ctx)
    harm = ctx.batch([d._stream._at(k) for k in range(3)])
    task = ctx.batch(ctx.render(EXAMPLES[:4]))
    named = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    theta = {n: p.detach().clone() for n, p in named.items()}
    # naive: explicit copies, explicit parameter shift
    g_h, h = _grad(ctx.model, harm)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g_h.values()))
    with torch.no_grad():
        for n, p in named.items():
            p.sub_(0.3 * g_h[n] / (norm + 1e-7))
    g_h2, h2 = _grad(ctx.model, harm)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(theta[n])
    g_f, f = _grad(ctx.model, task)
    out = d.step(ctx, task)
    assert ctx.passes == {"forward": 3, "backward": 3}
    for n, p in named.items():
        assert torch.equal(p.detach(), theta[n]), f"{n} not restored exactly"
        torch.testing.assert_close(p.grad, g_f[n] + 5 * g_h[n] - 5 * g_h2[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(g_h[n], g_h2[n]) for n in named)  # the shift mattered
    assert out.terms["task"].item() == pytest.approx(f, rel=1e-5)
    assert out.terms["booster"].item() == pytest.approx(5 * (h - h2), rel=1e-3, abs=1e-6)
    assert out.diagnostics["harmful_loss"] == pytest.approx(h, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(t.item() for t in out.terms.values()), rel=1e-6)


@pytest.mark.parametrize("extra", [("defense.lam=0",), ("defense.lam=5", "defense.alpha=0")])
def test_zero_weight_or_zero_step_reproduces_sft_exactly(tiny_dir, tmp_path, extra):
    runs = {}
    for name, more in (("sft", ()), ("booster", extra)):
        model, tok = models.load(str(tiny_dir))
        cfg = tiny_run_config(tmp_path / name, f"defense.name={name}", "train.steps=4", *more)
        runs[name] = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=dict(AUX), progress=False)
    assert [r["loss/task"] for r in runs["booster"].metrics] == [r["loss/task"] for r in runs["sft"].metrics]
    a, b = dict(runs["sft"].model.named_parameters()), dict(runs["booster"].model.named_parameters())
    for n, p in a.items():
        assert torch.equal(p, b[n]), n
    assert runs["booster"].metrics[0]["passes/forward"] == (1 if "defense.lam=0" in extra else 3)


def test_booster_changes_training_and_uses_only_compliance_openers(tiny_dir, tmp_path):
    model, tok = models.load(str(tiny_dir))
    cfg = tiny_run_config(tmp_path, "defense.name=booster", "defense.harmful_batch=2")
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=dict(AUX), progress=False)
    assert all(r["passes/forward"] == 3 and r["passes/backward"] == 3 for r in res.metrics)
    assert all("diag/harmful_loss" in r and "loss/booster" in r for r in res.metrics)


def test_real_contrastive_aux_holds_only_openers():
    from safeft.data.aux import build_aux

    rows = build_aux(["contrastive"])["contrastive"]
    assert rows and all(r.meta["harmful_response"] in COMPLIANCE_OPENERS for r in rows)


def test_config_is_checked():
    from safeft import config as C

    with pytest.raises(C.ConfigError, match="alpha"):
        C.load(overrides=["defense.name=booster", "defense.alpha=-0.1"])
    with pytest.raises(C.ConfigError, match="harmful_batch"):
        C.load(overrides=["defense.name=booster", "defense.harmful_batch=0"])
