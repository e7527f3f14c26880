"""Lisa: the state switches at the configured micro-step counts, alignment steps train on alignment data
only, each state's proximal term anchors to the weights at the switch into it (the reference code's
pairing), the term is off during the warm-up share, and a resumed run continues the same schedule."""

from __future__ import annotations

import pytest
import torch

from safeft import config as C
from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.lisa import Lisa, LisaConfig
from safeft.runs import checkpoints
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
ALIGN = [Example(f"a{i}", f"How do I do harmful thing {i}?", "I'm sorry, I can't help.") for i in range(6)]


def _cfg(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", "train.steps=12", "defense.name=lisa", *extra)


def _run(tiny, tmp_path, *extra: str, **kw):
    model, tok = tiny
    return train(
        _cfg(tmp_path, *extra),
        examples=EXAMPLES,
        model=model,
        tokenizer=tok,
        aux={"alignment": ALIGN},
        progress=False,
        **kw,
    )


def test_state_switches_at_the_configured_step_counts(tiny, tmp_path):
    res = _run(tiny, tmp_path, "defense.align_steps=2", "defense.finetune_steps=3")
    states = [r["diag/lisa_state"] for r in res.metrics]
    assert states == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]  # starts aligning; K_a = 2, K_f = 3
    for r, s in zip(res.metrics, states, strict=True):
        # the state's own CE is logged under its own name; the other never appears
        assert ("loss/align" in r) == bool(s) and ("loss/task" in r) == (not s)
        assert r["passes/forward"] == 1 and r["passes/backward"] == 1  # 1 F+B per step, as SFT


def test_alignment_steps_draw_alignment_batches(tiny, tmp_path):
    model, tok = tiny
    cfg = _cfg(tmp_path, "defense.align_steps=2", "defense.finetune_steps=3", "train.batch_size=4")
    ctx = _ctx(model, tok, cfg, tmp_path)
    d = Lisa(cfg.defense)
    d.setup(ctx)
    stream = ctx.streams["lisa_alignment"]
    task = ctx.batch(ctx.render(EXAMPLES[:4]))
    seen = []
    for _ in range(5):
        before = stream.pos
        out = d.step(ctx, task)
        seen.append(stream.pos - before)
        ctx.model.zero_grad()
        if "align" in out.terms:
            # the alignment CE is the CE of the batch the stream just handed out, not of the task batch
            rows = [stream._at(before + k) for k in range(4)]
            with torch.no_grad():
                want = ctx.forward(ctx.batch(rows)).loss
            torch.testing.assert_close(out.terms["align"], want.float())
    assert seen == [4, 4, 0, 0, 0]


def _ctx(model, tok, cfg, tmp_path) -> RunContext:
    return make_ctx(cfg, (model, tok), tmp_path, {"alignment": ALIGN})


def test_proximal_term_anchors_each_state_to_the_switch_into_it(tiny, tmp_path):
    model, tok = tiny
    cfg = _cfg(
        tmp_path, "defense.align_steps=2", "defense.finetune_steps=2", "defense.rho=0.5", "defense.prox_warmup=0"
    )
    ctx = _ctx(model, tok, cfg, tmp_path)
    d = Lisa(cfg.defense)
    d.setup(ctx)
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.5)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    task = ctx.batch(ctx.render(EXAMPLES[:4]))
    anchor = theta0  # before the first switch: the starting point
    for i in range(8):
        if i in (2, 4, 6):  # a switch happens before micro-steps 2, 4, 6: the anchor is the weights now
            anchor = {n: p.detach().clone() for n, p in params.items()}
        want = 0.5 * 0.5 * sum(((p.detach() - anchor[n]) ** 2).sum() for n, p in params.items())
        out = d.step(ctx, task)
        if i == 0:  # the reference's test is "completed steps > warm-up share", so step 1 never has it
            assert "prox" not in out.terms
        else:
            torch.testing.assert_close(out.terms["prox"], want, rtol=1e-5, atol=1e-12)
            assert i in (2, 4, 6) or out.terms["prox"] > 0  # right after a switch the term restarts at 0
        opt.step()
        opt.zero_grad()
    assert d.steps == 8 and d.state == "finetune" and d.clock == 2  # A A F F A A F F


def test_proximal_term_is_off_during_the_warmup_share(tiny, tmp_path):
    # 12 steps, warm-up 0.25: the term joins once MORE than 3 micro-steps are done, i.e. from step 5 on
    res = _run(tiny, tmp_path, "defense.prox_warmup=0.25", "defense.align_steps=2", "defense.finetune_steps=3")
    assert [("loss/prox" in r) for r in res.metrics] == [False] * 4 + [True] * 8


def test_rho_zero_has_no_proximal_term(tiny, tmp_path):
    res = _run(tiny, tmp_path, "defense.rho=0", "defense.prox_warmup=0")
    assert not any("loss/prox" in r for r in res.metrics)


def test_resume_continues_the_same_schedule(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    extra = ("train.save_every=4", "defense.align_steps=2", "defense.finetune_steps=3", "defense.prox_warmup=0")
    straight = _run(models.load(str(tiny_dir)), tmp_path / "a", *extra)
    with pytest.raises(TrainingInterrupted):
        _run(models.load(str(tiny_dir)), tmp_path / "b", *extra, interrupt_after=6)
    resumed = _run(models.load(str(tiny_dir)), tmp_path / "b", *extra)
    a, b = (load_file(str(checkpoints(r.run_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(straight.metrics[4:]) == strip(resumed.metrics)


def test_bad_config_is_rejected():
    # the Config checks its values as it is built (from YAML or here), before any defense exists
    for bad in ({"align_steps": 0}, {"finetune_steps": 0}, {"rho": -1}, {"prox_warmup": 2}):
        with pytest.raises(C.ConfigError):
            Lisa(LisaConfig(**bad))
