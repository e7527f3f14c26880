"""RepAnchor: layer selection from drift, the penalty's zero point, drift localisation, hooks, gamma = 0 == SFT."""

from __future__ import annotations

import pytest
import torch

import safeft.methods.repanchor  # noqa: F401  (registers "repanchor")
from safeft import config as C
from safeft import models
from safeft.data.types import Example
from safeft.methods.repanchor import RepAnchor, pool, select_layers
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(16)]
AUX = {"harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(8)]}


REP = ("defense.ref_max_new_tokens=6", "defense.n_anchors=4", "defense.anchor_batch=4", "defense.n_probe=8")


def cfg_for(tmp_path, *extra: str, method: str = "repanchor") -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", f"defense.name={method}", *(REP if method == "repanchor" else ()), *extra)


@pytest.fixture()
def rep_ctx(tiny, tmp_path):
    cfg = cfg_for(tmp_path)
    ctx = make_ctx(cfg, tiny, tmp_path, AUX)
    rep = RepAnchor(cfg.defense)
    rep.setup(ctx)
    return rep, ctx


def _perturb_lora(model, layer: int | None = None, scale: float = 0.3) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and (layer is None or f"layers.{layer}." in n):
                p.add_(scale * torch.randn_like(p))


def test_top_k_picks_the_layers_with_the_largest_drift():
    drift = torch.tensor([0.01, 0.20, 0.05, 0.30, 0.001, 0.10])
    layers, w = select_layers(drift, [10, 11, 12, 13, 14, 15], top_k=2, floor=1e-4)
    assert layers == [11, 13]
    assert torch.allclose(w, torch.tensor([0.4, 0.6], dtype=torch.float64))
    layers, w = select_layers(drift, [10, 11, 12, 13, 14, 15], top_k=3, floor=1e-4)
    assert layers == [11, 13, 15] and float(w.sum()) == pytest.approx(1.0)
    # a fixed window keeps every layer, weighted by drift; drifts below the floor count as the floor
    layers, w = select_layers(torch.tensor([0.0, 0.3]), [4, 5], top_k=None, floor=0.1)
    assert layers == [4, 5] and torch.allclose(w, torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_cka_samples_skip_the_first_token_and_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    assert torch.equal(pool(h, batch, "last"), torch.stack([h[0, 2], h[1, 3]]).double())
    assert torch.equal(pool(h, batch, "mean"), torch.stack([h[0, 1:3].mean(0), h[1, 1:].mean(0)]).double())


def test_before_any_measurable_drift_every_layer_is_anchored_uniformly(rep_ctx):
    rep, _ = rep_ctx
    assert max(rep.drift_ema) < 1e-6  # step 0: θ = θ₀
    layers, w = rep.selection()
    assert layers == [0, 1] and torch.allclose(w, torch.full((2,), 0.5, dtype=torch.float64))


def test_penalty_is_zero_at_step_zero_and_positive_once_weights_move(rep_ctx):
    rep, ctx = rep_ctx
    rows = rep.anchors.next()
    assert float(rep.penalty_value(ctx, rows).detach()) < 1e-12
    _perturb_lora(ctx.model)
    assert float(rep.penalty_value(ctx, rows).detach()) > 1e-4
    blocks = models.decoder_layers(ctx.model)
    assert all(not b._forward_hooks for b in blocks), "capture must remove its hooks"


def test_drift_localises_to_the_layer_that_changed(rep_ctx):
    rep, ctx = rep_ctx
    _perturb_lora(ctx.model, layer=1)
    drift = rep._measure(ctx)
    assert float(drift[0]) < 1e-9 < float(drift[1])
    rep.drift_ema = drift.tolist()
    rep.cfg.top_k = 1
    assert rep.selection()[0] == [1]


def test_bad_config_is_rejected(rep_ctx, tmp_path):
    with pytest.raises(C.ConfigError, match="sample"):
        cfg_for(tmp_path, "defense.sample=first")
    with pytest.raises(C.ConfigError, match="layers"):
        cfg_for(tmp_path, "defense.layers=[]")
    rep, ctx = rep_ctx
    rep.cfg.layers = [1, 2]
    with pytest.raises(ValueError, match="2 blocks"):
        rep.prepare(ctx, rep.anchors.rows)


def test_zero_gamma_reproduces_sft_exactly(tmp_path, tiny_dir):
    extra = ("train.steps=3", "model.lora.dropout=0.1")
    m, tok = models.load(str(tiny_dir))
    sft = train(
        cfg_for(tmp_path / "a", *extra, method="sft"),
        examples=EXAMPLES,
        model=m,
        tokenizer=tok,
        progress=False,
    )
    m, tok = models.load(str(tiny_dir))
    res = train(
        cfg_for(tmp_path / "b", *extra, "defense.gamma=0"),
        examples=EXAMPLES,
        model=m,
        tokenizer=tok,
        aux=AUX,
        progress=False,
    )
    assert [r["loss"] for r in res.metrics] == [r["loss"] for r in sft.metrics]
