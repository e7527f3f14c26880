"""Vaccine: ε has global norm ρ along the hidden-state gradient, only the second pass reaches the optimizer
(checked against a naive two-pass computation), ρ = 0 is SFT exactly, hooks never outlive a step, and an
architecture without findable layers raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.vaccine import Vaccine, perturbation_sites
from safeft.models import ModelError
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?" + " really" * (i % 3), f"Answer: {i + 7}") for i in range(12)]


def _ctx(tiny, tmp_path, *extra: str) -> RunContext:
    ctx = make_ctx(["defense.name=vaccine", *extra], tiny, tmp_path)
    with torch.no_grad():  # move off LoRA-B = 0 so every gradient is generic
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return ctx


def _setup(ctx: RunContext) -> Vaccine:
    d = Vaccine(ctx.cfg.defense)
    d.setup(ctx)
    return d


def _site_grads(ctx, sites, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Naive: dL/d(site output) via retain_grad, with a plain backward."""
    outs = []

    def keep(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        outs.append(h)

    handles = [s.register_forward_hook(keep) for s in sites]
    try:
        loss = ctx.model(**batch).loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    ctx.model.zero_grad(set_to_none=True)
    return [o.grad.detach().clone() for o in outs], loss.detach()


def _perturbed_param_grads(ctx, sites, batch, eps) -> dict[str, torch.Tensor]:
    def add(i):
        def hook(_m, _i, out):
            if isinstance(out, tuple):
                return (out[0] + eps[i],) + out[1:]
            return out + eps[i]

        return hook

    handles = [s.register_forward_hook(add(i)) for i, s in enumerate(sites)]
    try:
        ctx.model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    ctx.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("site", ["attn_out", "block_out"])
def test_eps_has_global_norm_rho_along_the_hidden_state_gradient(tiny, tmp_path, site):
    ctx = _ctx(tiny, tmp_path, "defense.rho=0.7", f"defense.perturb_site={site}")
    d = _setup(ctx)
    assert len(d.sites) == 2  # one per decoder block of the tiny model
    batch = ctx.batch(ctx.render(EXAMPLES[:4]))
    eps, _ = d.perturbation(ctx, batch)
    assert torch.sqrt(sum(e.pow(2).sum() for e in eps)).item() == pytest.approx(0.7, rel=1e-5)
    grads, _ = _site_grads(ctx, d.sites, batch)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    for e, g in zip(eps, grads, strict=True):
        assert e.shape == g.shape == (*batch["input_ids"].shape, 64)
        torch.testing.assert_close(e, 0.7 * g / (norm + 1e-7), rtol=1e-4, atol=1e-7)
    # pass 1 touched no parameter's .grad
    assert all(p.grad is None for p in ctx.model.parameters())


def test_only_the_second_pass_reaches_the_optimizer(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.rho=2.0", "train.grad_accum=2")
    d = _setup(ctx)
    batch = ctx.batch(ctx.render(EXAMPLES[:4]))
    grads, _ = _site_grads(ctx, d.sites, batch)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    want = _perturbed_param_grads(ctx, d.sites, batch, [2.0 * g / (norm + 1e-7) for g in grads])
    clean = _perturbed_param_grads(ctx, d.sites, batch, [torch.zeros_like(g) for g in grads])
    # a gradient already accumulated by an earlier micro-batch must survive (no zero_grad between passes)
    earlier = {n: torch.full_like(p, 0.25) for n, p in ctx.model.named_parameters() if p.requires_grad}
    for n, p in ctx.model.named_parameters():
        if p.requires_grad:
            p.grad = earlier[n].clone()
    out = d.step(ctx, batch)
    assert ctx.passes == {"forward": 2, "backward": 2}
    moved = False
    for n, p in ctx.model.named_parameters():
        if not p.requires_grad:
            continue
        # grad_accum = 2: the loop's backward divides by 2
        torch.testing.assert_close(p.grad, earlier[n] + want[n] / 2, rtol=1e-4, atol=1e-6)
        moved |= not torch.allclose(want[n], clean[n], rtol=1e-3, atol=1e-6)
    assert moved, "the perturbation did not change the gradient: the test could not tell the passes apart"
    assert out.diagnostics["eps_norm"] == pytest.approx(2.0, rel=1e-5)
    assert out.terms["task"].item() != pytest.approx(out.diagnostics["clean_loss"], abs=1e-7)


def _forward_hook_count(model: nn.Module) -> int:
    """Forward hooks of ours left on the model (transformers keeps its own output-capturing hooks)."""
    return sum(
        1
        for m in model.modules()
        for h in m._forward_hooks.values()
        if getattr(h, "__module__", "").startswith("safeft")
    )


def test_hooks_are_removed_after_each_pass_and_after_a_failure(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path)
    d = _setup(ctx)
    batch = ctx.batch(ctx.render(EXAMPLES[:4]))
    d.step(ctx, batch)
    assert _forward_hook_count(ctx.model) == 0
    bad = dict(batch, labels=batch["labels"][:, :2])  # shape mismatch: the forward raises inside the hooks
    with pytest.raises(Exception):  # noqa: B017  (whatever the model raises)
        d.step(ctx, bad)
    assert _forward_hook_count(ctx.model) == 0


def test_rho_zero_reproduces_sft_exactly(tiny_dir, tmp_path):
    runs = {}
    for name, extra in (("sft", ()), ("vaccine", ("defense.rho=0",))):
        model, tok = models.load(str(tiny_dir))
        cfg = tiny_run_config(tmp_path / name, f"defense.name={name}", "train.steps=4", *extra)
        runs[name] = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, progress=False)
    assert [r["loss"] for r in runs["vaccine"].metrics] == [r["loss"] for r in runs["sft"].metrics]
    assert runs["vaccine"].metrics[0]["passes/forward"] == 2  # both passes ran, with ε = 0
    a, b = dict(runs["sft"].model.named_parameters()), dict(runs["vaccine"].model.named_parameters())
    for n, p in a.items():
        assert torch.equal(p, b[n]), n
    assert _forward_hook_count(runs["vaccine"].model) == 0


def test_rho_changes_training(tiny_dir, tmp_path):
    losses = {}
    for rho in (0.0, 5.0):
        model, tok = models.load(str(tiny_dir))
        cfg = tiny_run_config(tmp_path / str(rho), "defense.name=vaccine", f"defense.rho={rho}")
        res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, progress=False)
        losses[rho] = [r["loss"] for r in res.metrics]
    assert losses[0.0] != losses[5.0]


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Linear(4, 4)  # no attribute named like an attention


class _NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_unfindable_layers_or_attention_raise():
    with pytest.raises(ModelError, match="cannot find the decoder layer stack"):
        perturbation_sites(_NoLayers(), "attn_out")
    with pytest.raises(ModelError, match="no attention sub-module"):
        perturbation_sites(_NoAttention(), "attn_out")
    assert len(perturbation_sites(_NoAttention(), "block_out")) == 2


def test_config_is_checked():
    from safeft import config as C

    with pytest.raises(C.ConfigError, match="perturb_site"):
        C.load(overrides=["defense.name=vaccine", "defense.perturb_site=mlp"])
    with pytest.raises(C.ConfigError, match="rho"):
        C.load(overrides=["defense.name=vaccine", "defense.rho=-1"])
