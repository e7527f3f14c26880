"""The anchor-family protocol is the only thing to learn: a new anchor-style defense, written here through
``safeft.methods.anchors`` alone, runs packed and separate with the same terms and gradients and trains
through the loop. Also: the family's files import no method but the ones a composition is made of."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from safeft import models
from safeft.config import DefenseConfig
from safeft.context import RunContext, make_accelerator
from safeft.data.types import Example
from safeft.methods.anchors import (
    AnchorSet,
    Outputs,
    Part,
    Request,
    Segment,
    anchor_step,
    forward_alone,
    packs,
)
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import METHODS
from safeft.packing import relative_error
from safeft.testing import tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?" + " Please" * (i % 3), f"Answer: {i + 7}") for i in range(12)]
AUX = {"harmful_prompts": [Example(f"h{i}", "How do I do a harmful thing" + " now" * i + "?") for i in range(6)]}


# ----------------------------------------------------------------------------- the toy defense (~40 lines)


@dataclass
class MeanStateConfig(DefenseConfig):
    name: str = "toy_mean_state"
    weight: float = 10.0
    n_anchors: int = 4
    anchor_batch: int = 3
    fuse: bool = True


class MeanState(Defense, Part):
    """Pull θ's mean final hidden state over each anchor prompt's tokens to the reference's (an MSE)."""

    name, stage, needs, Config = "toy_mean_state", "finetune", ("reference", "harmful_prompts"), MeanStateConfig

    def __init__(self, cfg: MeanStateConfig) -> None:
        super().__init__(cfg)
        self.anchors = AnchorSet(cfg.n_anchors, 0, cfg.anchor_batch, stream="toy_anchors")  # prompts only
        self.ref = torch.empty(0)
        self.fused = False

    def setup(self, ctx: RunContext) -> None:
        rows = self.anchors.build(ctx)
        with ctx.reference() as ref:  # the same request, run on the reference: its means, row by row
            self.ref = self.means(forward_alone(ctx, self.segments(ctx, {}, rows), model=ref)).detach()
        self.fused = packs(ctx, self.cfg.fuse, [self], rows, self.name)

    def segments(self, ctx: RunContext, batch: Batch, rows: list) -> Request:
        return Request([Segment.of(r) for r in rows], final=True, data=[int(r.id) for r in rows])

    def terms(self, ctx: RunContext, out: Outputs) -> dict[str, torch.Tensor]:
        return {"mean_state": self.cfg.weight * F.mse_loss(self.means(out), self.ref[out.request.data])}

    @staticmethod
    def means(out: Outputs) -> torch.Tensor:  # (n_segments, d) fp32
        return torch.stack([out.take(out.final, j).float().mean(0) for j in range(len(out.request.segments))])

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        return anchor_step(ctx, batch, [self], self.anchors.next(), packed=self.fused)


# ----------------------------------------------------------------------------- tests


@pytest.fixture()
def registered(monkeypatch):
    """The toy under its name for this test only (config loading and the loop look defenses up by name)."""
    list(METHODS)  # load the built-in defenses first
    monkeypatch.setitem(METHODS._items, MeanState.name, MeanState)
    monkeypatch.setitem(METHODS._docs, MeanState.name, "toy")


def _ctx(tiny, tmp_path) -> RunContext:
    model, tok = tiny
    cfg = tiny_run_config(tmp_path / "runs")
    model = models.attach_lora(model, cfg.model.lora)
    models.prepare_reference(model)
    ctx = RunContext(make_accelerator("fp32"), model, tok, cfg, tmp_path, aux=AUX)
    ctx.task_rows = ctx.render(EXAMPLES)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # away from the aligned point: the term and its gradient are non-zero
    return ctx


def _run(ctx: RunContext, toy: MeanState, parts: list, **kw) -> tuple[StepOutput, dict, dict[str, int]]:
    """One ``anchor_step`` of ``parts`` on the first task rows, from the start of the toy's anchor stream."""
    ctx.model.zero_grad(set_to_none=True)
    ctx.streams["toy_anchors"].pos = 0  # every run reads the same anchors
    ctx.passes = {"forward": 0, "backward": 0}
    out = anchor_step(ctx, ctx.batch(ctx.task_rows[:4]), parts, toy.anchors.next(), **kw)
    grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
    return out, grads, dict(ctx.passes)


def test_the_toy_gives_the_same_terms_and_gradients_packed_and_separate(tiny, tmp_path):
    ctx = _ctx(tiny, tmp_path)
    toy = MeanState(MeanStateConfig())
    toy.setup(ctx)
    assert toy.fused, "the tiny Llama passes the packing check"
    modes = {"packed": (True, "once"), "once": (False, "once"), "each": (False, "each")}
    runs = {mode: _run(ctx, toy, [toy], packed=p, backward=b) for mode, (p, b) in modes.items()}
    a, ga, pa = runs["packed"]
    assert a.terms["mean_state"].item() > 1e-4
    for mode in ("once", "each"):
        b, gb, _ = runs[mode]
        assert set(a.terms) == set(b.terms) == {"task", "mean_state"}
        for k in a.terms:
            assert relative_error(a.terms[k], b.terms[k]) < 1e-4
        assert relative_error(a.loss, b.loss) < 1e-4
        assert ga.keys() == gb.keys() and ga
        assert max(relative_error(ga[n], gb[n]) for n in ga) < 1e-4  # a wrong position would be O(1)
    # one wider pass; separate: the anchors' own forward, back-propagated with the task's or after it
    assert pa == {"forward": 1, "backward": 1}
    assert runs["once"][2] == {"forward": 2, "backward": 1} and runs["each"][2] == {"forward": 2, "backward": 2}


def test_two_parts_share_one_anchor_stream_and_one_pass(tiny, tmp_path):
    # a composition is a longer list of parts: the same rows go to each, packed into the same forward
    ctx = _ctx(tiny, tmp_path)
    toy = MeanState(MeanStateConfig())
    toy.setup(ctx)
    one, _, _ = _run(ctx, toy, [toy], packed=True)
    two, _, passes = _run(ctx, toy, [toy, toy], packed=True)
    assert passes == {"forward": 1, "backward": 1}
    assert relative_error(two.terms["mean_state"], 2 * one.terms["mean_state"]) < 1e-5  # same-named terms add


@pytest.mark.parametrize("fuse", [True, False])
def test_the_toy_trains_through_the_loop(tiny, tmp_path, registered, fuse):
    model, tok = tiny
    cfg = tiny_run_config(tmp_path / "runs", "defense.name=toy_mean_state", "train.steps=2", f"defense.fuse={fuse}")
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    rows = res.metrics
    assert len(rows) == 2
    assert all((r["passes/forward"], r["passes/backward"]) == ((1, 1) if fuse else (2, 1)) for r in rows)
    assert all(r["loss"] == pytest.approx(r["loss/task"] + r["loss/mean_state"]) for r in rows)
    # step 0: θ is the reference (LoRA B = 0), so the term is rounding only; after one update it is not
    assert rows[0]["loss/mean_state"] < 1e-8 < rows[1]["loss/mean_state"]
    assert res.run_dir.joinpath("train_summary.json").exists()


def test_saft_repanchor_with_the_kl_on_the_task_batch_runs_unpacked(tiny, tmp_path):
    # SAFT's task-batch KL cannot ride in the task forward; it used to be packed with RepAnchor's anchors
    # all the same, and read anchor targets that were never built (IndexError)
    model, tok = tiny
    extra = ("defense.kl_on=task", "defense.pgd_steps=1", "defense.n_anchors=4", "defense.ref_max_new_tokens=4")
    cfg = tiny_run_config(
        tmp_path / "runs", "defense.name=saft+repanchor", "train.steps=2", "defense.n_probe=8", *extra
    )
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    # task 1 + 1; reference on the task batch 1 + 0; PGD 1 + 1; adversarial pass 1 + 1; RepAnchor's 1 + 1
    assert all((r["passes/forward"], r["passes/backward"]) == (5, 4) for r in res.metrics)
    assert all(r["loss/kl"] > 0 and "loss/rep" in r for r in res.metrics)


FAMILY = Path(__file__).resolve().parents[2] / "src" / "safeft" / "methods"


def _method_imports(name: str) -> set[str]:
    """The ``safeft.methods.*`` modules a method file imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse((FAMILY / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safeft.methods."):
            found.add(node.module.removeprefix("safeft.methods."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("safeft.methods.") for a in node.names if a.name.startswith("safeft.methods.")
            }
    return found


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("anchors", {"base"}),
        ("sbr", {"anchors", "base", "registry"}),
        ("saft", {"anchors", "base", "registry"}),
        ("repanchor", {"anchors", "base", "registry"}),
        ("saft_repanchor", {"anchors", "base", "registry", "saft", "repanchor"}),  # the two it composes
    ],
)
def test_the_family_imports_no_sibling_method(name, allowed):
    assert _method_imports(name) <= allowed
