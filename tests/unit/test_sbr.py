"""SBR: the anchor penalty is zero at the aligned point, grows when the adapter moves, reads the right
token under either padding, and λ = 0 is plain SFT exactly."""

from __future__ import annotations

import pytest
import torch

import safeft.methods.sbr  # noqa: F401  (registers "sbr")
from safeft import config as C
from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.sbr import SBR, final_states
from safeft.packing import relative_error
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
# Different lengths, so padding actually happens.
HARMFUL = [Example(f"h{i}", "How do I do harmful thing " + "really " * i + f"number {i}?") for i in range(5)]


def _cfg(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", "train.steps=4", *extra)


def _ctx(tiny, tmp_path, *extra: str) -> RunContext:
    """A RunContext around a fresh tiny (model, tokenizer) with a new LoRA adapter, as the loop builds it."""
    return make_ctx(_cfg(tmp_path, "defense.name=sbr", *extra), tiny, tmp_path, {"harmful_prompts": HARMFUL})


def _setup(ctx: RunContext) -> SBR:
    d = SBR(ctx.cfg.defense)
    d.setup(ctx)
    return d


def test_penalty_is_zero_at_the_aligned_point_and_grows_when_the_adapter_moves(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.n_anchors=4")
    d = _setup(ctx)
    assert d.h_ref.shape == (4, 64) and d.h_ref.dtype == torch.float32
    assert ctx.passes["forward"] == 1  # the reference states are computed once
    assert d.penalty(ctx, {})["sbr"].item() == 0.0  # LoRA-B = 0: model == reference, exactly
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    pen = d.penalty(ctx, {})["sbr"]
    assert pen.item() > 0
    pen.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ctx.model.named_parameters() if "lora_B" in n)
    assert ctx.passes["forward"] == 3  # each penalty is one counted forward


def test_final_state_is_the_unembedding_input_at_the_last_prompt_token(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path)
    rows = ctx.render(HARMFUL)
    with ctx.reference() as ref:
        right = final_states(ctx, ref, ctx.batch(rows, "right"))
        left = final_states(ctx, ref, ctx.batch(rows, "left"))
        alone = torch.cat([final_states(ctx, ref, ctx.batch([r])) for r in rows])
        # for Llama, transformers' hidden_states[-1] is post-norm too: both must name the same vector
        one = ctx.batch(rows[-1:])
        last = ctx.forward(one, model=ref, output_hidden_states=True).hidden_states[-1][0, -1]
    # Padding changes only float rounding (different shapes, shifted RoPE positions), never the token read.
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[-1], last.float(), atol=1e-6, rtol=1e-6)
    # and padding really happened: the short rows' last token is not the batch's last column
    assert len({len(r.input_ids) for r in rows}) == len(rows)


def test_a_single_anchor_works(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.n_anchors=1")
    d = _setup(ctx)
    assert d.h_ref.shape == (1, 64)
    assert d.penalty(ctx, {})["sbr"].item() == 0.0


def test_streamed_anchor_batches_meet_their_own_reference_rows(tiny, tmp_path):
    # 2 of 5 anchors per micro-batch. A sub-batch is padded to its own width, so it matches the cached
    # states up to rounding only; a mix-up of rows would cost O(1), not 1e-10.
    ctx = _ctx(tiny, tmp_path, "defense.n_anchors=5", "defense.anchor_batch=2")
    d = _setup(ctx)
    for _ in range(4):  # crosses an epoch boundary of the stream (reshuffled)
        assert d.penalty(ctx, {})["sbr"].item() < 1e-8
    assert ctx.streams["sbr_anchors"].pos == 8


def test_lam_zero_reproduces_plain_sft_exactly(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from safeft.runs import checkpoints

    runs = {}
    for name, extra in (("sft", ()), ("sbr", ("defense.lam=0",))):
        m, tok = models.load(str(tiny_dir))
        cfg = _cfg(tmp_path / name, f"defense.name={name}", *extra)
        runs[name] = train(
            cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux={"harmful_prompts": HARMFUL}, progress=False
        )
    sft, sbr = runs["sft"].metrics, runs["sbr"].metrics
    assert [r["loss"] for r in sbr] == [r["loss"] for r in sft]
    assert all(r["passes/forward"] == 1 and r["passes/backward"] == 1 for r in sbr)  # λ = 0 costs nothing
    assert not any(k == "loss/sbr" for r in sbr for k in r)
    a, b = (load_file(str(checkpoints(runs[n].run_dir)[-1] / "trainable.safetensors")) for n in ("sft", "sbr"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fuse", [True, False])
def test_penalty_is_logged_and_the_anchors_cost_what_they_should(tmp_path, tiny, fuse):
    model, tok = tiny
    cfg = _cfg(tmp_path, "defense.name=sbr", "defense.n_anchors=3", f"defense.fuse={fuse}")
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux={"harmful_prompts": HARMFUL}, progress=False)
    rows = res.metrics
    # packed, the anchors match the plain pass that made h_ref to rounding only
    assert rows[0]["loss/sbr"] == 0.0 if not fuse else rows[0]["loss/sbr"] < 1e-8
    assert rows[-1]["loss/sbr"] > 1e-6
    if fuse:  # one wider pass: the anchors ride in the task forward
        assert all(r["passes/forward"] == 1 and r["passes/backward"] == 1 for r in rows)
    else:  # the released code's separate anchor forward
        assert all(r["passes/forward"] == 2 and r["passes/backward"] == 1 for r in rows)
    assert all(r["positions"] > 0 for r in rows)


def _grads(ctx: RunContext) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("anchor_batch", [None, 2])
def test_the_packed_step_equals_task_plus_penalty_in_separate_passes(tiny, tmp_path, anchor_batch):
    # Same loss terms and same gradient, whether the anchors ride in the task forward or run alone.
    extra = ["defense.n_anchors=4"] + ([f"defense.anchor_batch={anchor_batch}"] if anchor_batch else [])
    ctx = _ctx(tiny, tmp_path, *extra)
    ctx.task_rows = ctx.render(EXAMPLES)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # away from the aligned point, so the penalty and its gradient are not 0
    fused, plain = _setup(ctx), _setup(ctx)
    plain.fused = False
    assert fused.fused
    batch = ctx.batch(ctx.task_rows[:4])
    out = {}
    for name, d in (("fused", fused), ("plain", plain)):
        ctx.model.zero_grad(set_to_none=True)
        if anchor_batch:  # both read the one named stream: start each at the same anchors
            ctx.streams["sbr_anchors"].pos = 0
        out[name] = (d.step(ctx, batch), _grads(ctx))
    (a, ga), (b, gb) = out["fused"], out["plain"]
    assert a.terms["sbr"].item() > 1e-4
    for k in ("task", "sbr"):
        torch.testing.assert_close(a.terms[k], b.terms[k], atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    # float rounding differs (other shapes); a wrong mask or position would be an O(1) difference
    assert max(relative_error(ga[n], gb[n]) for n in ga) < 1e-4


def test_a_model_that_ignores_the_packed_mask_falls_back_to_a_separate_pass(tiny, tmp_path, caplog, monkeypatch):
    # An attention that treats every row as one causal sequence lets packed anchors see the task tokens
    # before them: the setup check must notice (O(1) error) and keep the separate anchor forward.
    import safeft.packing as packing

    real = packing.pack

    def causal_everywhere(task, segs, **kw):
        packed = real(task, segs, **kw)
        m = packed.batch["attention_mask"]
        packed.batch["attention_mask"] = torch.ones_like(m).tril()
        return packed

    monkeypatch.setattr(packing, "pack", causal_everywhere)
    ctx = _ctx(tiny, tmp_path, "defense.n_anchors=4")
    ctx.task_rows = ctx.render(EXAMPLES)
    d = _setup(ctx)
    assert not d.fused
    assert "does not reproduce a plain pass" in caplog.text


def test_a_model_without_output_embeddings_is_refused(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path)
    ctx.model.get_output_embeddings = lambda: None
    with pytest.raises(models.ModelError, match="no output embeddings"):
        _setup(ctx)


def test_bad_config_is_rejected():
    from safeft.methods.sbr import SBRConfig

    # the check lives in SBRConfig.__post_init__, so the config is built inside the raises block
    for bad in ({"lam": -1.0}, {"n_anchors": 0}, {"anchor_batch": 0}):
        with pytest.raises(C.ConfigError):
            SBR(SBRConfig(**bad))
