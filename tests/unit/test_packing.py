"""Packing a defense's anchor rows into the task forward: every sequence sees what it would see alone, and a
packed step gives the separate passes' loss terms and gradients (SBR's own case is in test_sbr.py)."""

from __future__ import annotations

import pytest
import torch

import safeft.methods.repanchor  # noqa: F401  (registers "repanchor")
import safeft.methods.saft  # noqa: F401  (registers "saft")
import safeft.methods.saft_repanchor  # noqa: F401  (registers "saft+repanchor")
from safeft import methods
from safeft.context import RunContext
from safeft.data.chat import collate
from safeft.data.types import Example
from safeft.packing import layout, pack, relative_error
from safeft.testing import make_ctx, tiny_run_config

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?" + " Please" * (i % 3), f"Answer: {i + 7}") for i in range(12)]
AUX = {"harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(6)]}


def _final_states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[-1]


def test_every_packed_sequence_sees_exactly_what_it_sees_alone(tiny):
    model, tok = tiny
    model.eval()
    rows = [r for r in (tok(f"<s>{t}") for t in ("a b c d e f", "a b x", "a b c d e f g h i j"))]
    task_ids = [torch.tensor(r["input_ids"]) for r in rows]
    width = max(len(t) for t in task_ids)
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(task_ids):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1
    task = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    # segments that share 0, 2 and 6 leading tokens with some task row, of different lengths
    segs = [torch.tensor(tok(f"<s>{t}")["input_ids"]) for t in ("z y", "a b q r s", "a b c d e f u v w", "a b")]
    packed = pack(task, segs, pad_id=tok.pad_token_id, share=True)
    got = _final_states(model, packed.batch)
    plain = _final_states(model, task)
    for i, t in enumerate(task_ids):
        torch.testing.assert_close(got[i, : len(t)], plain[i, : len(t)], atol=1e-5, rtol=1e-5)
    for j, s in enumerate(segs):
        alone = _final_states(model, {"input_ids": s[None]})[0]
        torch.testing.assert_close(packed.take(got, j, torch.arange(len(s))), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.take_last(got)[j], alone[-1], atol=1e-5, rtol=1e-5)
    assert max(p.shared for p in packed.placements) >= 6  # the prefix really was read from a host row
    # the task's labels only: the packed CE is the same loss over the same tokens
    with torch.no_grad():
        torch.testing.assert_close(model(**packed.batch).loss, model(**task).loss, atol=1e-6, rtol=1e-6)


def test_layout_fills_padding_before_widening_and_never_overlaps():
    lengths = [10, 4, 7]
    hosts = [[1, 2] + [3] * (n - 2) for n in lengths]
    segs = [[1, 2, 9, 9], [1, 2, 8], [5, 5, 5, 5, 5]]
    placements, width, extra = layout(lengths, hosts, segs, [True, True, False], 10)
    assert (width, extra) == (10, 0)  # 2 + 1 own tokens after sharing, and 5: all fit in the padding
    used = {i: set(range(n)) for i, n in enumerate(lengths)}
    for p in placements:
        cols = set(range(p.start, p.start + p.length - p.shared))
        assert max(cols) < width and not cols & used[p.row]
        used[p.row] |= cols
    # no padding to fill: the batch grows by the least rows x width
    placements, width, extra = layout([10, 10], [[0] * 10, [0] * 10], [[7] * 6], [False], 10)
    assert width * (2 + extra) == min(2 * 16, 3 * 10)


def test_a_segment_with_its_own_embeddings_cannot_share():
    task = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    task["labels"] = task["input_ids"]
    with pytest.raises(ValueError, match="cannot share"):
        pack(task, [torch.ones(2, dtype=torch.long)], pad_id=0, share=True, segment_embeds=[torch.zeros(2, 4)])
    left = {**task, "attention_mask": torch.tensor([[0, 1, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        pack(left, [torch.ones(2, dtype=torch.long)], pad_id=0)


def _ctx(tiny, tmp_path, name: str, *extra: str) -> RunContext:
    cfg = tiny_run_config(
        tmp_path / "runs",
        f"defense.name={name}",
        "defense.ref_max_new_tokens=6",
        "defense.n_anchors=4",
        "defense.anchor_batch=3",
        *extra,
    )
    ctx = make_ctx(cfg, tiny, tmp_path, AUX)
    model = ctx.model
    ctx.task_rows = ctx.render(EXAMPLES)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # away from the aligned point: every term and its gradient is non-zero
    return ctx


@pytest.mark.parametrize(
    ("name", "terms"),
    [("saft", ("task", "kl")), ("repanchor", ("task", "rep")), ("saft+repanchor", ("task", "kl", "rep"))],
)
def test_a_packed_step_equals_the_separate_passes(tiny, tmp_path, name, terms):
    ctx = _ctx(tiny, tmp_path, name)
    fused, plain = methods.build(ctx.cfg.defense), methods.build(ctx.cfg.defense)
    fused.setup(ctx)
    plain.setup(ctx)
    assert fused.fused and plain.fused
    plain.fused = False
    batch = ctx.batch(ctx.task_rows[:4])
    results = {}
    for key, d in (("fused", fused), ("plain", plain)):
        ctx.model.zero_grad(set_to_none=True)
        ctx.streams["anchor"].pos = 0  # both read the one named anchor stream
        ctx.passes = {"forward": 0, "backward": 0}
        torch.manual_seed(0)  # the same PGD start
        out = d.step(ctx, batch)
        grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
        results[key] = (out, grads, dict(ctx.passes))
    (a, ga, pa), (b, gb, pb) = results["fused"], results["plain"]
    assert set(a.terms) == set(b.terms) == set(terms)
    for k in terms:
        assert a.terms[k].item() > 1e-6
        torch.testing.assert_close(a.terms[k], b.terms[k], atol=1e-6, rtol=1e-4)
    assert ga.keys() == gb.keys() and ga
    assert max(relative_error(ga[n], gb[n]) for n in ga) < 1e-4  # a wrong column would be O(1)
    # one task forward carries the outer anchor passes: SAFT's adversarial and RepAnchor's clean one
    outer = ("kl" in terms) + ("rep" in terms)
    assert pa["forward"] == pb["forward"] - outer and pa["backward"] == pb["backward"] - outer


def test_fusion_is_refused_where_the_check_fails(tiny, tmp_path, caplog, monkeypatch):
    import safeft.packing as packing

    real = packing.pack

    def ignores_mask(task, segs, **kw):  # an attention that treats each row as one causal sequence
        packed = real(task, segs, **kw)
        packed.batch["attention_mask"] = torch.ones_like(packed.batch["attention_mask"]).tril()
        return packed

    monkeypatch.setattr(packing, "pack", ignores_mask)
    ctx = _ctx(tiny, tmp_path, "saft+repanchor")
    d = methods.build(ctx.cfg.defense)
    d.setup(ctx)
    assert not d.fused and "does not reproduce a plain pass" in caplog.text


def test_an_attention_without_a_custom_mask_format_keeps_separate_passes(tiny, tmp_path, caplog, monkeypatch):
    import safeft.packing as packing

    assert packing.attention_format(tiny[0]) == "sdpa"
    monkeypatch.setattr(packing, "attention_format", lambda model: None)  # e.g. flash_attention_2
    ctx = _ctx(tiny, tmp_path, "repanchor")
    d = methods.build(ctx.cfg.defense)
    d.setup(ctx)
    assert not d.fused and "takes no custom 4-D mask" in caplog.text


def test_collate_and_pack_agree_on_a_batch_without_segments(tiny):
    _, tok = tiny
    from safeft.data.chat import render

    rows = [render(tok, ex, None, None) for ex in EXAMPLES[:3]]
    task = collate(rows, tok.pad_token_id)
    packed = pack(task, [], pad_id=tok.pad_token_id)
    assert torch.equal(packed.batch["input_ids"], task["input_ids"])
    assert torch.equal(packed.batch["labels"], task["labels"])


def _arch(name: str, impl: str):
    import transformers as T

    common = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    kv = dict(num_key_value_heads=2)
    table = {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {**common, **kv}),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {**common, **kv, "sliding_window": 4096}),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**common, **kv, "head_dim": 8, "sliding_window": 4096}),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**common, **kv, "head_dim": 8, "sliding_window": 4096}),
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=120)),
    }
    cfg_cls, model_cls, kw = table[name]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw, attn_implementation=impl)).eval()


@pytest.mark.parametrize(
    ("arch", "impl"),
    [(a, i) for a in ("qwen2", "mistral", "gemma3", "gpt2") for i in ("sdpa", "eager")] + [("gemma2", "eager")],
)
def test_packing_is_exact_on_other_architectures(arch, impl):
    # RoPE and learned absolute positions, grouped-query attention, sliding-window configs, both mask formats
    from safeft.packing import attention_format

    model = _arch(arch, impl)
    fmt = attention_format(model)
    assert fmt == impl
    gen = torch.Generator().manual_seed(1)
    prefix = [1, 5, 6, 7, 8]
    rows = [prefix + torch.randint(10, 90, (n,), generator=gen).tolist() for n in (12, 7, 15, 9)]
    width = max(map(len, rows))
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    task = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    segs = [torch.tensor(prefix + torch.randint(10, 90, (n,), generator=gen).tolist()) for n in (3, 6, 2, 9, 4)]
    packed = pack(task, segs, pad_id=0, share=True, fmt=fmt)
    got, plain = _final_states(model, packed.batch), _final_states(model, task)
    for i, r in enumerate(rows):
        assert relative_error(got[i, : len(r)], plain[i, : len(r)]) < 1e-5
    for j, s in enumerate(segs):
        alone = _final_states(model, {"input_ids": s[None]})[0]
        assert relative_error(packed.take(got, j, torch.arange(len(s))), alone) < 1e-5


@pytest.mark.parametrize("name", ["sbr", "saft+repanchor"])
def test_packing_under_full_fine_tuning(tmp_path, tiny, name):
    # the reference is then a frozen copy, not the adapter-disabled model: the check must run on it
    from safeft.train import train

    model, tok = tiny
    cfg = tiny_run_config(
        tmp_path / "runs",
        f"defense.name={name}",
        "model.lora.enabled=false",
        "train.steps=2",
        *(("defense.ref_max_new_tokens=6", "defense.n_anchors=4") if name != "sbr" else ("defense.n_anchors=3",)),
    )
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    assert all(r["passes/forward"] == (1 if name == "sbr" else 4) for r in res.metrics)  # packed
    assert all(k in res.metrics[-1] for k in (("loss/sbr",) if name == "sbr" else ("loss/kl", "loss/rep")))
