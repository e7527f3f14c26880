"""SAFT: the KL to the reference, the PGD inner loop, its cost, and the lam = 0 invariance; saft+repanchor's
invariance and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

import safeft.methods.repanchor  # noqa: F401  (registers "repanchor")
import safeft.methods.saft  # noqa: F401  (registers "saft")
import safeft.methods.saft_repanchor  # noqa: F401  (registers "saft+repanchor")
from safeft import config as C
from safeft import models
from safeft.data.types import Example
from safeft.methods.anchors import prompt_mask
from safeft.methods.saft import (
    SAFT,
    KLTarget,
    adversarial_logits,
    embed,
    kl_to_reference,
    pgd,
    reference_target,
)
from safeft.runs import checkpoints
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(16)]
# prompts of different lengths, so anchor batches are padded
AUX = {"harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(6)]}
FAST = ("defense.ref_max_new_tokens=6", "defense.n_anchors=4", "defense.anchor_batch=4")


def cfg_for(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", *extra)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture()
def saft_ctx(tiny, tmp_path):
    """A set-up SAFT defense, its context, and one padded anchor batch with its reference target."""
    cfg = cfg_for(tmp_path, "defense.name=saft", "defense.eps=0.3", *FAST)
    ctx = make_ctx(cfg, tiny, tmp_path, AUX)
    saft = SAFT(cfg.defense)
    saft.setup(ctx)
    rows = saft.anchors.next()
    batch = ctx.batch(rows)
    assert (batch["attention_mask"] == 0).any(), "the test batch must hold padding"
    return saft, ctx, batch, KLTarget.cat([saft.targets[int(r.id)] for r in rows])


def _kl(ctx, batch, target, delta) -> float:
    with torch.no_grad():
        return float(kl_to_reference(target, adversarial_logits(ctx, batch, embed(ctx, batch["input_ids"]), delta)))


# ----------------------------------------------------------------------------- the KL


def test_kl_matches_a_naive_full_kl_and_topk_is_a_lower_bound():
    torch.manual_seed(0)
    ref, cur = torch.randn(5, 50) * 3, torch.randn(5, 50) * 3
    p, q = ref.log_softmax(-1), cur.log_softmax(-1)
    naive = float((p.exp() * (p - q)).sum(-1).mean())
    assert float(kl_to_reference(reference_target(ref, 0), cur)) == pytest.approx(naive, rel=1e-5)
    assert float(kl_to_reference(reference_target(ref, 50), cur)) == pytest.approx(naive, rel=1e-5)
    top = float(kl_to_reference(reference_target(ref, 8), cur))
    assert 0 < top <= naive + 1e-6
    # the tail bucket holds exactly the reference's remaining mass
    t = reference_target(ref, 8)
    assert torch.allclose(t.logp.exp().sum(-1), torch.ones(5), atol=1e-5)
    assert float(kl_to_reference(reference_target(ref, 8), ref)) == pytest.approx(0.0, abs=1e-6)


def test_kl_of_the_untouched_model_to_its_reference_is_zero(saft_ctx):
    _, ctx, batch, target = saft_ctx
    assert _kl(ctx, batch, target, torch.zeros_like(embed(ctx, batch["input_ids"]))) < 1e-6


# ----------------------------------------------------------------------------- PGD


def test_pgd_stays_in_the_relative_ball_and_off_pad_and_response(saft_ctx):
    saft, ctx, batch, target = saft_ctx
    torch.manual_seed(0)
    delta = pgd(ctx, batch, target, saft.cfg)
    assert delta.dtype == torch.float32 and not delta.requires_grad
    norms = delta.norm(dim=-1)
    radius = saft.cfg.eps * embed(ctx, batch["input_ids"]).norm(dim=-1)
    assert (norms <= radius * (1 + 1e-5) + 1e-7).all()
    on = prompt_mask(batch)
    assert (delta[~on] == 0).all(), "delta must be exactly zero on pad and response positions"
    # normalised ascent steps of eps/2 from inside 0.5 eps: the attack spends most of its budget
    assert float((norms[on] / radius[on]).mean()) > 0.9


def test_pgd_raises_the_kl_above_clean_and_random_perturbations(saft_ctx):
    saft, ctx, batch, target = saft_ctx
    torch.manual_seed(0)
    delta = pgd(ctx, batch, target, saft.cfg)
    mask = prompt_mask(batch).unsqueeze(-1)
    noise = torch.randn_like(delta) * mask
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * delta.norm(dim=-1, keepdim=True)
    clean, random, attacked = (_kl(ctx, batch, target, d) for d in (torch.zeros_like(delta), noise, delta))
    assert attacked > 2 * random and attacked > clean + 1e-3


def test_pgd_never_touches_parameter_grads(saft_ctx):
    saft, ctx, batch, target = saft_ctx
    pgd(ctx, batch, target, saft.cfg)
    assert all(p.grad is None for p in ctx.model.parameters())
    assert ctx.passes == {"forward": 1 + 3, "backward": 3}  # setup's reference pass, then K = 3 PGD passes
    assert ctx.model.training, "PGD runs in eval mode and must restore training mode"


# ----------------------------------------------------------------------------- through the loop


@pytest.mark.parametrize(
    ("kl_on", "fuse", "forward", "backward"),
    # K = 2: anchor 1 + (K+1), or 1 + K with the outer anchor pass packed into the task forward;
    # task 1 + 1 (reference) + (K+1); both: the two parts (never packed)
    [("anchor", False, 4, 4), ("anchor", True, 3, 3), ("task", True, 5, 4), ("both", True, 8, 7)],
)
def test_passes_per_step_match_the_documented_cost(tmp_path, tiny, kl_on, fuse, forward, backward):
    model, tok = tiny
    cfg = cfg_for(
        tmp_path,
        "train.steps=1",
        "defense.name=saft",
        "defense.pgd_steps=2",
        f"defense.kl_on={kl_on}",
        f"defense.fuse={fuse}",
        *FAST,
    )
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    for row in res.metrics:
        assert (row["passes/forward"], row["passes/backward"]) == (forward, backward)
        assert row["loss/kl"] > 0 and row["loss"] == pytest.approx(row["loss/task"] + row["loss/kl"])


def test_bad_config_is_rejected():
    with pytest.raises(C.ConfigError, match="kl_on"):
        C.load(overrides=["defense.name=saft", "defense.kl_on=anchors"])
    with pytest.raises(C.ConfigError, match="ref_max_new_tokens"):
        C.load(overrides=["defense.name=saft", "defense.ref_max_new_tokens=0"])
    assert C.load(overrides=["defense.name=saft", "defense.pgd_steps=1"]).defense.alpha == 0.05


@pytest.mark.parametrize(
    "weights",
    [("defense.name=saft", "defense.lam=0"), ("defense.name=saft+repanchor", "defense.lam=0", "defense.gamma=0")],
)
def test_zero_weight_reproduces_sft_exactly(tmp_path, tiny_dir, weights):
    # LoRA dropout makes the RNG matter: a method that drew a single random number would show
    extra = ("train.steps=3", "model.lora.dropout=0.1")
    m, tok = models.load(str(tiny_dir))
    sft = train(cfg_for(tmp_path / "a", *extra), examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False)
    m, tok = models.load(str(tiny_dir))
    cfg = cfg_for(tmp_path / "b", *extra, *weights)
    res = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False)
    assert [r["loss"] for r in res.metrics] == [r["loss"] for r in sft.metrics]
    assert [r["passes/forward"] for r in res.metrics] == [1] * 3


def test_saft_repanchor_resumes_exactly(tmp_path, tiny_dir):
    """Interrupted after step 3 (last checkpoint: 2) and resumed == never interrupted.

    The first drift refresh (start of step 3) runs after the resume, on task probe prompts collected before it.
    """
    extra = (
        "defense.name=saft+repanchor",
        "train.steps=5",
        "train.save_every=2",
        "model.lora.dropout=0.1",
        "defense.pgd_steps=1",
        "defense.refresh_every=2",
        "defense.n_probe=8",
        "defense.anchor_batch=2",
        *FAST[:2],
    )
    m, tok = models.load(str(tiny_dir))
    straight = train(
        cfg_for(tmp_path / "a", *extra), examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False
    )
    cfg = cfg_for(tmp_path / "b", *extra)
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False, interrupt_after=3)
    m, tok = models.load(str(tiny_dir))
    resumed = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False)

    from safetensors.torch import load_file

    a, b = (load_file(str(checkpoints(r.run_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = _metrics(straight.run_dir)
    assert rows == _metrics(resumed.run_dir)
    assert {"loss/task", "loss/kl", "loss/rep"} <= set(rows[0])
    # refreshes before steps 3 and 5 cost extra forwards (the first also builds the probe set's reference samples)
    assert [r["passes/forward"] > rows[0]["passes/forward"] for r in rows] == [False, False, True, False, True]
