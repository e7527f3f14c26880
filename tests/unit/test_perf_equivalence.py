"""The step-cost cuts keep the objective: each cheaper computation against the one it replaced, loss AND gradient.

What changed (issue 19): the unembedding runs only at the positions a loss reads (``packing.forward_at``); SAFT's
KL rows stop after the last position the KL reads, in PGD and in the packed pass; SAP's contrastive loss runs
its safe and harmful rows in one forward. The references below are the code before the change, restated with
plain calls (full logits at every position, transformers' own loss, full-width PGD rows, two contrastive
forwards), in fp32 on the tiny model, with LoRA B moved off zero so every term and gradient is non-zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import safeft.methods.repanchor  # noqa: F401  (registers "repanchor")
import safeft.methods.saft  # noqa: F401  (registers "saft")
import safeft.methods.saft_repanchor  # noqa: F401  (registers "saft+repanchor")
import safeft.methods.sbr  # noqa: F401  (registers "sbr")
from safeft import methods, packing
from safeft.context import RunContext
from safeft.data.chat import IGNORE
from safeft.data.types import Example
from safeft.hooks import capture, eval_mode, unembedding_input
from safeft.methods.anchors import inputs_only, prompt_mask, response_mask
from safeft.methods.saft import KLTarget, embed, kl_to_reference, pgd, project
from safeft.methods.sap import contrastive_loss
from safeft.packing import relative_error
from safeft.testing import make_ctx, tiny_run_config

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?" + " Please" * (i % 3), f"Answer: {i + 7}") for i in range(12)]
AUX = {
    "harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(6)],
    # responses the tiny model scores alike, so the contrastive loss is O(1) and its gradient generic
    "contrastive": [
        Example(
            f"c{i}",
            f"How do I do harmful thing {'really ' * i}number {i}?",
            "Sorry, I can't.",
            "aux:contrastive",
            {"harmful_response": "Answer: 30."},
        )
        for i in range(6)
    ],
}
ANCHORED = ("saft", "repanchor", "saft+repanchor")  # defenses whose anchors carry the reference's answers
TOL = 1e-5  # fp32: what changed is which rows a matmul sees and the order of a sum; a wrong position is O(1)


def _ctx(tiny, tmp_path, name: str, *extra: str) -> RunContext:
    cfg = tiny_run_config(
        tmp_path / "runs",
        f"defense.name={name}",
        *(
            ("defense.ref_max_new_tokens=6", "defense.n_anchors=4", "defense.anchor_batch=3")
            if name in ANCHORED
            else ()
        ),
        *extra,
    )
    ctx = make_ctx(cfg, tiny, tmp_path, AUX)
    ctx.task_rows = ctx.render(EXAMPLES)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return ctx


def _grads(ctx: RunContext) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert a.keys() == b.keys() and a
    worst = max(relative_error(a[k], b[k]) for k in a)
    assert worst < tol, worst


# ----------------------------------------------------------------------------- the building blocks


def test_forward_at_gives_the_full_passes_logits_and_final_states(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "sbr")
    batch = ctx.batch(ctx.task_rows[:4])
    with torch.no_grad(), unembedding_input(ctx.unwrapped) as seen:
        full = ctx.model(**inputs_only(batch)).logits
    rows, cols, _ = packing.label_positions(batch["labels"])
    with torch.no_grad():
        logits, final = packing.forward_at(ctx, batch, rows, cols)
    assert logits.shape == (len(rows), full.shape[-1]) and len(rows) < full.shape[0] * full.shape[1] / 2
    assert relative_error(logits, full[:, :-1][response_mask(batch)]) < 1e-6  # the same row-major order
    assert torch.equal(final, seen[0])
    # no position at all: the final states still come back, the unembedding runs on nothing
    none = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        logits, final = packing.forward_at(ctx, batch, none, none)
    assert logits.shape[0] == 0 and torch.equal(final, seen[0])


def test_forward_at_refuses_a_model_that_does_not_unembed_every_position(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "sbr")
    batch = ctx.batch(ctx.task_rows[:2])
    rows, cols, _ = packing.label_positions(batch["labels"])
    # a model whose forward unembeds only the last position (as transformers' logits_to_keep=1 does)
    last_only = ctx.unwrapped.get_output_embeddings().register_forward_pre_hook(lambda _m, a: (a[0][:, -1:],))
    try:
        with pytest.raises(packing.ModelError, match="every position"):
            packing.forward_at(ctx, batch, rows, cols)
    finally:
        last_only.remove()


def test_task_loss_is_the_models_own_loss_with_its_gradient(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "sbr")
    batch = ctx.batch(ctx.task_rows[:4])
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    ref = ctx.model(**batch).loss
    got = packing.task_loss(ctx, batch)
    assert relative_error(got.detach(), ref.detach()) < 1e-6
    ga, gb = torch.autograd.grad(got, params), torch.autograd.grad(ref, params)
    _same(dict(enumerate(ga)), dict(enumerate(gb)))
    # causal_lm_loss on the full logits is transformers' computation, bit for bit
    with torch.no_grad():
        out = ctx.model(**batch)
    assert torch.equal(packing.causal_lm_loss(out.logits, batch["labels"]), out.loss)


# ----------------------------------------------------------------------------- the anchor family, packed


def _old_packed(ctx: RunContext, batch, segs, embeds, layers=()):
    """The packed pass before the change: transformers' loss on the packed labels, logits at every position."""
    model = ctx.unwrapped
    packed = packing.pack(
        batch,
        segs,
        pad_id=ctx.tokenizer.pad_token_id,
        share=[e is None for e in embeds],
        fmt=packing.attention_format(model),
        embed=model.get_input_embeddings(),
        segment_embeds=embeds,
    )
    with capture(model, list(layers)) as hidden, unembedding_input(model) as seen:
        out = ctx.model(**packed.batch)
    return packed, out, seen[0], hidden


def _old_pgd(ctx: RunContext, batch, target: KLTarget, cfg) -> torch.Tensor:
    """SAFT's PGD before the change: full-width rows, logits at every position, sliced to the response."""
    with torch.no_grad():
        emb = embed(ctx, batch["input_ids"]).float()
    mask = prompt_mask(batch).float()
    scale = emb.norm(dim=-1) * mask
    radius = cfg.eps * scale
    direction = torch.randn_like(emb)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = torch.rand(emb.shape[:-1]).pow(1.0 / emb.shape[-1])
    delta = 0.5 * (radius * u).unsqueeze(-1) * direction
    step = (cfg.alpha * scale).unsqueeze(-1)
    with eval_mode(ctx.model):
        for _ in range(cfg.pgd_steps):
            delta.requires_grad_(True)
            logits = ctx.model(inputs_embeds=emb + delta, attention_mask=batch["attention_mask"]).logits
            kl = kl_to_reference(target, logits[:, :-1][response_mask(batch)])
            (grad,) = torch.autograd.grad(kl, [delta])
            grad = grad * mask.unsqueeze(-1)
            grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project(delta.detach() + step * grad, radius)
    return delta.detach()


def _old_terms(ctx: RunContext, d, batch, rows) -> dict[str, torch.Tensor]:
    """Every loss term of ``d``'s packed step, computed as the code before the change computed it."""
    sbr = getattr(d, "h_ref", None) is not None
    saft = getattr(d, "saft", d) if hasattr(d, "saft") or hasattr(d, "kl") else None
    rep = getattr(d, "rep", d) if hasattr(d, "rep") or hasattr(d, "ref_hidden") else None
    segs, embeds, layers = [], [], ()
    if saft is not None:
        rb = ctx.batch(rows)
        target = KLTarget.cat([saft.targets[int(r.id)] for r in rows])
        delta = _old_pgd(ctx, rb, target, saft.cfg)
        emb = embed(ctx, rb["input_ids"])
        adv = emb.float() + delta
        n = rb["attention_mask"].sum(1).tolist()
        segs += [rb["input_ids"][i, :k] for i, k in enumerate(n)]
        embeds += [adv[i, :k] for i, k in enumerate(n)]
    if sbr or rep is not None:
        segs += [torch.tensor(r.input_ids) for r in rows]
        embeds += [None] * len(rows)
    if rep is not None:
        layers = rep.selection()[0]
    packed, out, final, hidden = _old_packed(ctx, batch, segs, embeds, layers)
    terms = {"task": out.loss}
    first = 0
    if saft is not None:
        resp = [torch.nonzero(torch.tensor(r.labels[1:]) != IGNORE).squeeze(1) for r in rows]
        logits = torch.cat([packed.take(out.logits, i, t) for i, t in enumerate(resp)])
        terms["kl"] = saft.cfg.lam * kl_to_reference(target, logits)
        first = len(rows)
    if sbr:
        h = torch.stack(
            [packed.take(final, first + i, torch.tensor([len(r.input_ids) - 1]))[0] for i, r in enumerate(rows)]
        )
        terms["sbr"] = d.cfg.lam * F.mse_loss(h.float(), d.h_ref[[int(r.id) for r in rows]])
    if rep is not None:
        sel, w = rep.selection()
        total = 0.0
        for weight, layer in zip(w.tolist(), sel, strict=True):
            c = rep.candidates.index(layer)
            got = torch.cat(
                [packed.take(hidden[layer], first + i, torch.arange(1, len(r.input_ids))) for i, r in enumerate(rows)]
            )
            ref = torch.cat([rep.ref_hidden[int(r.id)][c] for r in rows])
            total = total + weight * ((got.float() - ref) / rep.scale[c]).square().mean()
        terms["rep"] = rep.cfg.gamma * total
    return terms


@pytest.mark.parametrize("name", ["sbr", "saft", "repanchor", "saft+repanchor"])
def test_the_packed_step_keeps_the_loss_and_gradient_of_the_code_before(tiny, tmp_path, name):
    ctx = _ctx(tiny, tmp_path, name)
    d = methods.build(ctx.cfg.defense)
    d.setup(ctx)
    assert d.fused
    batch = ctx.batch(ctx.task_rows[:4])
    stream = "sbr_anchors" if name == "sbr" else "anchor"
    pos = ctx.streams[stream].pos if stream in ctx.streams else None

    ctx.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same PGD start
    new = d.step(ctx, batch)
    g_new = _grads(ctx)

    rows = d.anchors.rows if pos is None else None
    if pos is not None:
        ctx.streams[stream].pos = pos
        rows = d.anchors.next()
    ctx.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    old = _old_terms(ctx, d, batch, rows)
    torch.stack([t.float() for t in old.values()]).sum().backward()
    g_old = _grads(ctx)

    assert set(new.terms) == set(old)
    for k in old:
        assert old[k].item() > 1e-6
        assert relative_error(new.terms[k], old[k].detach()) < TOL, k
    _same(g_new, g_old)


def test_pgd_gives_the_same_attack_on_fewer_positions(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "saft", "defense.eps=0.3")
    d = methods.build(ctx.cfg.defense)
    d.setup(ctx)
    rows = d.anchors.next()
    batch = ctx.batch(rows)
    target = KLTarget.cat([d.targets[int(r.id)] for r in rows])
    torch.manual_seed(0)
    new = pgd(ctx, batch, target, d.cfg)
    torch.manual_seed(0)
    old = _old_pgd(ctx, batch, target, d.cfg)
    assert relative_error(new, old) < TOL and new.norm() > 0
    # each row's last token is only ever a target: the KL rows are one position shorter
    segs = d.kl[0].segments(ctx, batch, rows).segments
    assert [len(s.ids) for s in segs] == [len(r.input_ids) - 1 for r in rows]


# ----------------------------------------------------------------------------- SAP


def _old_contrastive(ctx: RunContext, safe, harm, temperature: float) -> torch.Tensor:
    """SAP's contrastive loss before the change: two forwards, logits at every position."""

    def logprob(rows):
        b = ctx.batch(list(rows))
        logits, labels = ctx.model(**inputs_only(b)).logits[:, :-1], b["labels"][:, 1:]
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return -nll.sum(1)

    return -F.logsigmoid((logprob(safe) - logprob(harm)) / temperature).mean()


@pytest.mark.parametrize("mode", ["batched", "shared", "parity"])
def test_the_contrastive_loss_in_one_forward_keeps_its_value_and_gradient(tiny, tmp_path, mode):
    ctx = _ctx(tiny, tmp_path, "sap")
    rows = AUX["contrastive"]
    safe = ctx.render([Example(e.id, e.prompt, e.response) for e in rows])
    harm = ctx.render([Example(e.id, e.prompt, e.meta["harmful_response"]) for e in rows])
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    ctx.passes, ctx.positions = {"forward": 0, "backward": 0}, 0
    fmt = packing.attention_format(ctx.unwrapped) if mode == "shared" else None
    new = contrastive_loss(ctx, safe, harm, 2.0, parity=mode == "parity", fmt=fmt)
    assert ctx.passes["forward"] == 1
    if mode == "shared":  # the harmful rows add only what follows the prompt they share with their safe row
        batched = 2 * len(safe) * max(len(r.input_ids) for r in (*safe, *harm))  # both sets as plain rows
        assert ctx.positions <= 0.6 * batched
    if mode == "parity":  # the released loss was one forward already; only the unembedding is cut
        eos = ctx.tokenizer.eos_token_id
        width = max(len(r.input_ids) for r in (*safe, *harm))
        ids = torch.full((len(safe), width), eos)
        mask = torch.zeros_like(ids)
        labels = torch.full((2, len(safe), width), IGNORE)
        for i, (s, h) in enumerate(zip(safe, harm, strict=True)):
            ids[i, : s.prompt_len], mask[i, : s.prompt_len] = torch.tensor(s.input_ids[: s.prompt_len]), 1
            labels[0, i, : len(s.labels)] = torch.tensor(s.labels)
            labels[1, i, : len(h.labels)] = torch.tensor(h.labels)
        labels[labels == eos] = IGNORE
        logits = ctx.model(input_ids=ids, attention_mask=mask).logits.float()
        lp = [-F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none").sum(1) for y in labels]
        old = -F.logsigmoid((lp[0] - lp[1]) / 2.0).mean()
    else:
        old = _old_contrastive(ctx, safe, harm, 2.0)
    assert relative_error(new.detach(), old.detach()) < TOL and old.item() > 1e-3
    _same(dict(enumerate(torch.autograd.grad(new, params))), dict(enumerate(torch.autograd.grad(old, params))))


@pytest.mark.parametrize("fuse", [True, False])
def test_sap_shares_the_prompts_where_the_setup_check_passes_and_resumes_with_its_verdict(tiny, tmp_path, fuse):
    ctx = _ctx(tiny, tmp_path, "sap", "defense.contrastive_batch=3", f"defense.fuse={fuse}")
    d = methods.build(ctx.cfg.defense)
    d.setup(ctx)
    assert d.fmt == ("sdpa" if fuse else None)
    state = d.state_dict()
    again = methods.build(ctx.cfg.defense)
    again.load_state_dict({**state, "fmt": None})  # a run that started without sharing keeps running without
    again.setup(ctx)
    assert again.fmt is None
    d.remove_hooks(), again.remove_hooks()
