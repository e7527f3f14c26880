"""SAP: the contrastive loss against a naive reference, the probe update against the equations, the
weight excursion restored exactly, and a probe that never leaks into the model, its checkpoints or resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import safeft.methods.sap  # noqa: F401  (registers "sap")
from safeft import config as C
from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.sap import SAP, contrastive_loss, default_layers
from safeft.methods.weights import shifted
from safeft.runs import checkpoints
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
# Responses the random tiny model scores alike (|Δ log p| < 6), so L_c is O(1) and its gradient generic.
CONTRASTIVE = [
    Example(
        f"c{i}",
        "How do I do harmful thing " + "really " * i + f"number {i}?",
        "Sorry, I can't.",
        meta={"harmful_response": "Answer: 30."},
    )
    for i in range(6)
]
AUX = {"contrastive": CONTRASTIVE}


def _cfg(tmp_path, name: str = "sap", *extra: str) -> C.RunConfig:
    defense = [f"defense.name={name}"] + (["defense.contrastive_batch=3"] if name == "sap" else [])
    return tiny_run_config(tmp_path / "runs", *defense, *extra)


def _ctx(tiny, tmp_path, *extra: str) -> RunContext:
    return make_ctx(_cfg(tmp_path, "sap", *extra), tiny, tmp_path, AUX)


def _setup(ctx: RunContext) -> SAP:
    d = SAP(ctx.cfg.defense)
    d.setup(ctx)
    return d


def _move_adapter(model) -> None:
    # LoRA-B starts at 0; give it a value so gradients and the weight norm are generic.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- pure parts


def test_default_layers_follow_the_released_depth_fractions():
    assert default_layers(32) == [3, 9]
    assert default_layers(30) == [3, 8]
    assert default_layers(2) == [0, 1]
    assert default_layers(1) == [0]


def test_contrastive_loss_matches_a_naive_per_example_computation(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.temperature=2.0")
    model, tok = ctx.model, ctx.tokenizer
    _move_adapter(model)
    safe = ctx.render([Example(e.id, e.prompt, e.response) for e in CONTRASTIVE])
    harm = ctx.render([Example(e.id, e.prompt, e.meta["harmful_response"]) for e in CONTRASTIVE])

    def logp(row, parity=False):
        ids, n, p = torch.tensor([row.input_ids]), len(row.input_ids), row.prompt_len
        if not parity:  # teacher forcing: the logits at t-1 score token t
            out = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            return sum(out[t - 1, row.input_ids[t]] for t in range(p, n))
        # the released loss: prompt-only context padded with EOS (attention 0), unshifted, EOS never scored
        eos = tok.eos_token_id
        inp = torch.tensor([row.input_ids[:p] + [eos] * (n - p)])
        mask = torch.tensor([[1] * p + [0] * (n - p)])
        out = F.log_softmax(model(input_ids=inp, attention_mask=mask).logits[0].float(), -1)
        return sum(out[t, row.input_ids[t]] for t in range(p, n) if row.input_ids[t] != eos)

    corrected = None
    for parity in (False, True):
        with torch.no_grad():
            naive = torch.stack(
                [-F.logsigmoid((logp(s, parity) - logp(h, parity)) / 2.0) for s, h in zip(safe, harm, strict=True)]
            ).mean()
            got = contrastive_loss(ctx, safe, harm, temperature=2.0, parity=parity)
        torch.testing.assert_close(got, naive, atol=1e-5, rtol=1e-5)
        if parity:
            assert abs(got.item() - corrected) > 1e-3  # the released loss is a different number
        corrected = got.item()


def test_shifted_restores_the_weights_exactly_and_refuses_a_shift_that_rounds_away():
    torch.manual_seed(0)
    w = [torch.randn(5, 3), torch.randn(7)]
    before = [x.clone() for x in w]
    delta = [torch.full((5, 3), 0.1), torch.full((7,), 1e-3)]  # (w + d) - d != w in fp32 for these
    with shifted(w, delta):
        assert not torch.equal(w[0], before[0])
        torch.testing.assert_close(w[1], before[1] + 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(w, before, strict=True))

    w16 = [torch.ones(10, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="keep the trainable"), shifted(w16, [torch.full((10,), 1e-7)]):
        pass
    assert torch.equal(w16[0], torch.ones(10, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- one step against the equations


def test_one_step_follows_the_equations_and_restores_w(tiny, tmp_path):
    # A large r so that g_V (a difference of two nearby gradients) stands well above rounding.
    ctx = _ctx(tiny, tmp_path, "defense.grad_rate=0.01", "defense.probe_lr=0.05")
    model = ctx.model
    _move_adapter(model)
    d = _setup(ctx)
    assert d.layers == [0, 1] and _hooks(model) == 2
    with torch.no_grad():
        for v in d.probe.values():
            v.normal_(std=0.3)  # a non-zero V_t, so the clean pass must use it
    v_t = [v.detach().clone() for v in d.probe.values()]
    params = [p for p in model.parameters() if p.requires_grad]
    w_t = [p.detach().clone() for p in params]
    batch = ctx.batch(ctx.render(EXAMPLES[:4]))

    # What the step must compute, written out naively (peek at the contrastive batch it will draw).
    stream = ctx.streams["sap_contrastive"]
    pos = stream.pos
    rows = stream.next()
    stream.pos = pos
    harm = ctx.render([Example(e.id, e.prompt, e.meta["harmful_response"]) for e in CONTRASTIVE])
    lc = contrastive_loss(ctx, rows, [harm[int(r.id)] for r in rows])
    g = torch.autograd.grad(lc, params)
    g_norm = torch.sqrt(sum((x**2).sum() for x in g))
    w_norm = torch.sqrt(sum((x**2).sum() for x in w_t))
    dw = [0.01 * w_norm * x / (g_norm + 1e-8) for x in g]
    probe = list(d.probe.values())
    with torch.no_grad():
        for p, x in zip(params, dw, strict=True):
            p.add_(x)
    gv_shift = torch.autograd.grad(model(**batch).loss, probe)
    with torch.no_grad():
        for p, x in zip(params, w_t, strict=True):
            p.copy_(x)
    clean = model(**batch).loss
    gv_clean = torch.autograd.grad(clean, probe, retain_graph=True)
    gw_clean = torch.autograd.grad(clean, params)
    g_v = [a - b for a, b in zip(gv_clean, gv_shift, strict=True)]
    # one AdamW step from V = 0 with fresh moments: -lr * g / (|g| + eps)
    v_next = [-0.05 * x / (x.abs() + 1e-8) for x in g_v]

    ctx.passes = {"forward": 0, "backward": 0}
    out = d.step(ctx, batch)
    assert ctx.passes == {"forward": 3, "backward": 3}  # the safe and harmful rows share one forward
    assert all(torch.equal(p, x) for p, x in zip(params, w_t, strict=True)), "W must be restored exactly after W + ΔW"
    assert out.loss.item() == pytest.approx(clean.item(), abs=1e-6) and set(out.terms) == {"task"}
    for p, x in zip(params, gw_clean, strict=True):  # the optimizer gets ∇_W CE(W_t, V_t), nothing from the probe pass
        torch.testing.assert_close(p.grad, x, atol=1e-6, rtol=1e-5)
    assert not any(torch.equal(a, b) for a, b in zip(v_t, probe, strict=True))
    for v, want in zip(probe, v_next, strict=True):
        assert v.grad is None
        # g_V is a difference of two nearby gradients: where it is tiny, rounding may flip a sign or move
        # the Adam denominator a little, so compare signs on (almost) all coordinates and values loosely.
        same = torch.sign(v) == torch.sign(want)
        assert same.float().mean() > 0.95 and v.abs().max() <= 0.05 * (1 + 1e-5)
        torch.testing.assert_close(v[same], want[same], atol=2e-4, rtol=0)
    assert d.diagnostics["shift_norm"] == pytest.approx(0.01 * w_norm.item(), rel=1e-4)


def test_the_probe_needs_an_mlp_and_layers_in_range(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path, "defense.layers=[5]")
    with pytest.raises(C.ConfigError, match="out of range"):
        _setup(ctx)
    ctx.cfg.defense.layers = [1]
    del models.decoder_layers(ctx.model)[1].mlp
    with pytest.raises(models.ModelError, match=r"no \.mlp"):
        _setup(ctx)


# ----------------------------------------------------------------------------- through the loop


def test_probe_stays_out_of_the_model_and_step_one_is_sft(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    runs = {}
    for name in ("sft", "sap"):
        m, tok = models.load(str(tiny_dir))
        cfg = _cfg(tmp_path / name, name, "train.grad_accum=2")
        runs[name] = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=dict(AUX), progress=False)
    sft, sap = runs["sft"], runs["sap"]
    # V_0 = 0: the first update is plain SFT's; afterwards the probe changes the loss
    assert sap.metrics[0]["loss"] == sft.metrics[0]["loss"]
    assert sap.metrics[1]["loss"] != sft.metrics[1]["loss"]
    # ΔW once per optimizer step (1 forward of the safe and harmful rows + 1 backward), then 2 F+B per micro-batch
    assert all(r["passes/forward"] == 5 and r["passes/backward"] == 5 for r in sap.metrics)
    saved = load_file(str(checkpoints(sap.run_dir)[-1] / "trainable.safetensors"))
    assert set(saved) == set(load_file(str(checkpoints(sft.run_dir)[-1] / "trainable.safetensors")))
    assert set(sap.model.state_dict()) == set(sft.model.state_dict())
    assert _hooks(sap.model) == 0


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    # dropout makes the RNG matter; V and its Adam moments must come back from the checkpoint
    extra = ("sap", "train.steps=5", "train.save_every=2", "model.lora.dropout=0.1")
    m1, tok = models.load(str(tiny_dir))
    straight = train(
        _cfg(tmp_path / "a", *extra), examples=EXAMPLES, model=m1, tokenizer=tok, aux=dict(AUX), progress=False
    )

    cfg = _cfg(tmp_path / "b", *extra)
    m2, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(cfg, examples=EXAMPLES, model=m2, tokenizer=tok, aux=dict(AUX), progress=False, interrupt_after=3)
    m3, tok = models.load(str(tiny_dir))
    resumed = train(cfg, examples=EXAMPLES, model=m3, tokenizer=tok, aux=dict(AUX), progress=False)

    a, b = (load_file(str(checkpoints(r.run_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight.run_dir) == _metrics(resumed.run_dir)


def test_bad_config_is_rejected():
    from safeft.methods.sap import SAPConfig

    # the Config checks its values as it is built (from YAML or here), before any defense exists
    for bad in (
        {"probe_lr": 0.0},
        {"temperature": 0.0},
        {"grad_rate": -1.0},
        {"contrastive_batch": 0},
        {"layers": []},
        {"layers": [1, 1]},
    ):
        with pytest.raises(C.ConfigError):
            SAP(SAPConfig(**bad))
