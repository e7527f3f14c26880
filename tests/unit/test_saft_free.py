"""SAFT's amortised PGD (``defense.pgd_mode=free``): δ carried per anchor row, one ascent step per use from the
step's own backward. It runs packed at one forward and one backward per step, keeps δ in the ε-ball, raises the
KL over uses on a fixed model, and resumes exactly (δ is in the checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

import safeft.methods.saft  # noqa: F401  (registers "saft")
import safeft.methods.saft_repanchor  # noqa: F401  (registers "saft+repanchor")
from safeft import config as C
from safeft import models
from safeft.data.types import Example
from safeft.methods.anchors import prompt_mask
from safeft.methods.saft import SAFT, KLTarget, adversarial_logits, embed, kl_to_reference, pgd
from safeft.packing import relative_error
from safeft.runs import checkpoints, read_trainer_state
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(16)]
AUX = {"harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(6)]}
FREE = ("defense.pgd_mode=free", "defense.ref_max_new_tokens=6", "defense.n_anchors=4")


def _cfg(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", *extra)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture()
def free(tiny, tmp_path):
    """A set-up free-PGD SAFT on a moved adapter (θ ≠ reference, so the clean KL is not 0), every anchor per step."""
    cfg = _cfg(tmp_path, "defense.name=saft", "defense.eps=0.3", "defense.anchor_batch=4", *FREE)
    ctx = make_ctx(cfg, tiny, tmp_path, AUX)
    ctx.task_rows = ctx.render(EXAMPLES)
    saft = SAFT(cfg.defense)
    saft.setup(ctx)
    assert saft.fused
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    return saft, ctx


def _kl_at(ctx, saft: SAFT, delta: torch.Tensor) -> float:
    rows = saft.anchors.rows
    batch = ctx.batch(rows)
    target = KLTarget.cat([saft.targets[int(r.id)] for r in rows])
    with torch.no_grad():
        return float(kl_to_reference(target, adversarial_logits(ctx, batch, embed(ctx, batch["input_ids"]), delta)))


def _carried(ctx, saft: SAFT) -> torch.Tensor:
    """The carried δ of every anchor row as one (B, T, d) batch tensor (0 off the prompt)."""
    batch = ctx.batch(saft.anchors.rows)
    out = torch.zeros_like(embed(ctx, batch["input_ids"]).float())
    for i, r in enumerate(saft.anchors.rows):
        d = saft.kl[0].delta[int(r.id)]
        out[i, : len(d)] = d
    return out


def test_the_config_takes_free_only_where_delta_can_be_carried():
    assert C.load(overrides=["defense.name=saft", "defense.pgd_mode=free"]).defense.pgd_mode == "free"
    with pytest.raises(C.ConfigError, match="pgd_mode"):
        C.load(overrides=["defense.name=saft", "defense.pgd_mode=fast"])
    with pytest.raises(C.ConfigError, match="pgd_mode"):  # the task rows change every step
        C.load(overrides=["defense.name=saft", "defense.pgd_mode=free", "defense.kl_on=both"])
    assert C.load(overrides=["defense.name=saft"]).defense.pgd_mode == "exact"  # off by default


def test_the_carried_delta_stays_in_the_ball_and_raises_the_kl_over_uses(free):
    saft, ctx = free
    batch = ctx.batch(saft.anchors.rows)
    emb = embed(ctx, batch["input_ids"]).float()
    radius = saft.cfg.eps * emb.norm(dim=-1) * prompt_mask(batch)
    clean = _kl_at(ctx, saft, torch.zeros_like(emb))
    kls = []
    for _ in range(6):  # θ fixed: no optimizer step, gradients dropped
        ctx.passes = {"forward": 0, "backward": 0}
        saft.step(ctx, ctx.batch(ctx.task_rows[:4]))
        assert ctx.passes == {"forward": 1, "backward": 1}  # the packed pass's backward is δ's ascent step
        ctx.model.zero_grad(set_to_none=True)
        delta = _carried(ctx, saft)
        for r in saft.anchors.rows:
            assert saft.kl[0].delta[int(r.id)].shape == (r.prompt_len, emb.shape[-1])  # δ lives on the prompt only
        assert (delta.norm(dim=-1) <= radius * (1 + 1e-5) + 1e-7).all()
        kls.append(_kl_at(ctx, saft, delta))
    # a random δ with the same per-token norms: the ascent is what raises the KL, not the size of δ
    noise = torch.randn_like(delta) * prompt_mask(batch).unsqueeze(-1)
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * delta.norm(dim=-1, keepdim=True)
    random = _kl_at(ctx, saft, noise)
    assert kls == sorted(kls) and kls[-1] > 1.5 * kls[0], kls  # one ascent step per use, carried across steps
    assert kls[-1] > 2 * random and kls[-1] > 2 * clean, (kls, random, clean)
    # after 6 uses the carried δ is an attack of the same order as exact PGD's 3 fresh steps on this model
    target = KLTarget.cat([saft.targets[int(r.id)] for r in saft.anchors.rows])
    exact = _kl_at(ctx, saft, pgd(ctx, batch, target, saft.cfg))
    assert kls[-1] > 0.5 * exact, (kls[-1], exact)


def test_packed_and_separate_free_steps_give_the_same_terms_and_the_same_next_delta(free):
    saft, ctx = free
    plain = SAFT(saft.cfg)
    plain.anchors, plain.kl[0].targets = saft.anchors, saft.kl[0].targets
    batch = ctx.batch(ctx.task_rows[:4])
    out = {}
    for name, d in (("packed", saft), ("separate", plain)):
        ctx.model.zero_grad(set_to_none=True)
        ctx.passes = {"forward": 0, "backward": 0}
        ctx.streams["anchor"].pos = 0  # the same rows in the same order
        torch.manual_seed(0)  # the same δ₀ at the rows' first use
        step = d.step(ctx, batch)
        grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
        out[name] = (step, grads, dict(ctx.passes), _carried(ctx, d))
    (a, ga, pa, da), (b, gb, pb, db) = out["packed"], out["separate"]
    assert pa == {"forward": 1, "backward": 1} and pb == {"forward": 2, "backward": 2}
    for k in ("task", "kl"):
        assert relative_error(a.terms[k], b.terms[k]) < 1e-4
    assert max(relative_error(ga[n], gb[n]) for n in ga) < 1e-4
    assert relative_error(da, db) < 1e-4 and da.norm() > 0


@pytest.mark.parametrize(("name", "lora"), [("saft", True), ("saft+repanchor", True), ("saft+repanchor", False)])
def test_free_pgd_runs_packed_at_one_forward_and_one_backward(tmp_path, tiny, name, lora):
    # full fine-tuning too: the embeddings then train, so the ball is re-measured at every use
    model, tok = tiny
    extra = ("defense.n_probe=8",) if name == "saft+repanchor" else ()
    cfg = _cfg(tmp_path, f"defense.name={name}", "train.steps=3", f"model.lora.enabled={lora}", *FREE, *extra)
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    for r in res.metrics:
        assert (r["passes/forward"], r["passes/backward"]) == (1, 1)
        terms = [k for k in r if k.startswith("loss/")]
        assert r["loss/kl"] > 0 and r["loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-5)


def test_free_pgd_resumes_exactly(tmp_path, tiny_dir):
    """Interrupted after step 3 (last checkpoint: 2) and resumed == never interrupted; 4 anchors, 2 per step, so
    every row's δ is carried through the checkpoint into its next use."""
    extra = (
        "defense.name=saft+repanchor",
        "train.steps=5",
        "train.save_every=2",
        "model.lora.dropout=0.1",
        "defense.refresh_every=2",
        "defense.n_probe=8",
        "defense.anchor_batch=2",
        *FREE,
    )
    m, tok = models.load(str(tiny_dir))
    straight = train(_cfg(tmp_path / "a", *extra), examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False)
    cfg = _cfg(tmp_path / "b", *extra)
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False, interrupt_after=3)
    saved = _defense_state(tmp_path / "b" / "runs" / "r")["pgd_delta"]
    assert sorted(saved) == [0, 1, 2, 3]  # every row was used by step 2
    m, tok = models.load(str(tiny_dir))
    resumed = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False)

    from safetensors.torch import load_file

    a, b = (load_file(str(checkpoints(r.run_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight.run_dir) == _metrics(resumed.run_dir)


def _defense_state(run_dir) -> dict:
    return read_trainer_state(checkpoints(run_dir)[-1])["defense"]  # data only: nothing unpickled


def test_exact_mode_checkpoints_are_unchanged(tmp_path, tiny):
    model, tok = tiny
    cfg = _cfg(tmp_path, "defense.name=saft", "train.steps=1", "defense.pgd_steps=1", *FREE[1:])
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    assert set(_defense_state(res.run_dir)) == {"y_ref"}
