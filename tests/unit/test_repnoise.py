"""RepNoise: the Gram-form MMD equals the naive O(n²) pairwise computation (values and gradients), the
response-only logit lens equals a full-vocabulary, full-position lens, α = β = 0 is SFT exactly, hooks never
outlive a step, and architectures without findable blocks, MLPs or final norm raise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.repnoise import RepNoise, final_norm, lens_indices, mmd2, noise_sites
from safeft.models import ModelError
from safeft.testing import make_ctx, tiny_contrastive, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
CONTRASTIVE = tiny_contrastive()
AUX = {"contrastive": CONTRASTIVE}


def naive_mmd2(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """The RepNoise code's construction: explicit (2B)²×n difference tensor, then the kernel sum."""
    total = torch.cat([x, y]).double()
    n = total.shape[0]
    diff = total.unsqueeze(0).expand(n, n, -1) - total.unsqueeze(1).expand(n, n, -1)
    d = diff.pow(2).sum(2)
    bandwidth = d.detach().sum() / (n * n - n)
    bandwidth = bandwidth / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-d / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    b = x.shape[0]
    return torch.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


@pytest.mark.parametrize(("b", "n", "scale"), [(4, 40, 1.0), (3, 257, 0.3), (8, 1000, 2.0), (1, 5, 1.0)])
def test_mmd_equals_the_naive_pairwise_computation(b, n, scale):
    gen = torch.Generator().manual_seed(b * 1000 + n)
    z = (scale * torch.randn(b, n, generator=gen) + 0.5).requires_grad_(True)
    g = torch.randn(b, n, generator=gen)
    got = mmd2(z, g)
    z2 = z.detach().double().requires_grad_(True)
    want = naive_mmd2(z2, g)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(z.grad.double(), z2.grad, rtol=1e-3, atol=1e-6)


def test_mmd_is_zero_for_identical_samples_and_positive_otherwise():
    x = torch.randn(4, 30)
    assert mmd2(x, x.clone()).abs().item() < 1e-6
    assert mmd2(x + 3.0, torch.randn(4, 30)).item() > 0.1


def test_lens_indices():
    assert lens_indices(30, 4) == [2, 6, 10, 14, 18, 22, 26]
    assert lens_indices(30, 1) == list(range(30))
    assert lens_indices(30, 0) == []
    assert lens_indices(2, 4) == []


def _ctx(tiny, tmp_path, *extra: str) -> RunContext:
    return make_ctx(["defense.name=repnoise", "defense.harmful_batch=3", *extra], tiny, tmp_path, AUX)


def test_ascent_equals_a_full_logit_lens_over_every_position(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.beta=0", "defense.alpha=0.5", "defense.lens_every=1")
    d = RepNoise(ctx.cfg.defense)
    d.setup(ctx)
    assert d.lens == [0, 1]
    harm = ctx.batch([d._stream._at(k) for k in range(3)])
    noise, ascent, s = d.harmful_terms(ctx, harm)
    assert noise.item() == 0.0
    # naive: every position through norm + lm_head, masked CE with the causal shift
    inner = ctx.model.base_model.model
    with torch.no_grad():
        out = inner(**harm, output_hidden_states=True)
        labels = harm["labels"][:, 1:].reshape(-1)
        ces = [out.loss]
        for j in (0, 1):
            logits = inner.lm_head(inner.model.norm(out.hidden_states[j]))[:, :-1]
            ces.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100))
    want = sum(c.item() for c in ces) / 3
    assert s == pytest.approx(want, rel=1e-5)
    assert ascent.item() == pytest.approx(-0.5 * math.log(want + 1), rel=1e-5)


def test_noise_term_is_the_layer_mean_of_masked_mmd(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.alpha=0", "defense.beta=0.5")
    d = RepNoise(ctx.cfg.defense)
    d.setup(ctx)
    harm = ctx.batch([d._stream._at(k) for k in range(3)])
    torch.manual_seed(7)
    noise, ascent, _ = d.harmful_terms(ctx, harm)
    assert ascent.item() == 0.0
    acts = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: acts.append(o)) for m in d.sites]
    with torch.no_grad():
        ctx.model(**harm)
    for h in hooks:
        h.remove()
    mask = (harm["labels"] != -100).unsqueeze(-1)
    torch.manual_seed(7)
    want = []
    for a in acts:
        a = a * mask
        g = torch.randn_like(a) * mask
        want.append(naive_mmd2(a.flatten(1), g.flatten(1)).item())
    assert noise.item() == pytest.approx(0.5 * sum(want) / len(want), rel=1e-4)


def _hooks(model: nn.Module) -> int:
    """Forward hooks of ours left on the model (transformers keeps its own output-capturing hooks)."""
    return sum(
        1
        for m in model.modules()
        for h in m._forward_hooks.values()
        if getattr(h, "__module__", "").startswith("safeft")
    )


def test_step_logs_terms_and_removes_hooks(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path)
    d = RepNoise(ctx.cfg.defense)
    d.setup(ctx)
    batch = ctx.batch(ctx.render(EXAMPLES[:4]))
    out = d.step(ctx, batch)
    assert ctx.passes == {"forward": 2, "backward": 2}
    assert set(out.terms) == {"task", "noise", "ascent"}
    assert out.terms["ascent"].item() < 0 < out.terms["noise"].item()
    assert _hooks(ctx.model) == 0
    d._stream.rows = [r.__class__(**{**r.__dict__, "labels": r.labels[:2]}) for r in d._stream.rows]
    with pytest.raises(Exception):  # noqa: B017  (a malformed harmful batch fails inside the hooks)
        d.step(ctx, batch)
    assert _hooks(ctx.model) == 0


def test_zero_weights_reproduce_sft_exactly(tiny_dir, tmp_path):
    runs = {}
    for name, more in (("sft", ()), ("repnoise", ("defense.alpha=0", "defense.beta=0"))):
        model, tok = models.load(str(tiny_dir))
        cfg = tiny_run_config(tmp_path / name, f"defense.name={name}", "train.steps=4", *more)
        runs[name] = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=dict(AUX), progress=False)
    assert [r["loss"] for r in runs["repnoise"].metrics] == [r["loss"] for r in runs["sft"].metrics]
    a, b = dict(runs["sft"].model.named_parameters()), dict(runs["repnoise"].model.named_parameters())
    for n, p in a.items():
        assert torch.equal(p, b[n]), n


def test_repnoise_changes_training(tiny_dir, tmp_path):
    model, tok = models.load(str(tiny_dir))
    cfg = tiny_run_config(tmp_path, "defense.name=repnoise", "defense.beta=0.1", "defense.lens_every=1")
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=dict(AUX), progress=False)
    assert all(r["passes/forward"] == 2 and "loss/noise" in r and "diag/harmful_ce" in r for r in res.metrics)
    assert _hooks(res.model) == 0


class _NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Linear(4, 4)


class _NoMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_unfindable_parts_raise():
    with pytest.raises(ModelError, match="cannot find the decoder layer stack"):
        noise_sites(_NoLayers(), "mlp")
    with pytest.raises(ModelError, match="no MLP sub-module"):
        noise_sites(_NoMLP(), "mlp")
    assert len(noise_sites(_NoMLP(), "block")) == 2
    with pytest.raises(ModelError, match="final norm"):
        final_norm(_NoMLP())


def test_config_is_checked():
    from safeft import config as C

    with pytest.raises(C.ConfigError, match="noise_site"):
        C.load(overrides=["defense.name=repnoise", "defense.noise_site=attn"])
    with pytest.raises(C.ConfigError, match="alpha"):
        C.load(overrides=["defense.name=repnoise", "defense.alpha=-1"])
