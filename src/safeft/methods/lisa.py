"""Lisa: lazy safety alignment, bi-state optimisation of alignment and task steps with a proximal term.

Huang, Hu, Ilhan, Tekin, Liu, "Lisa: Lazy Safety Alignment for Large Language Models against Harmful
Fine-tuning Attack", NeurIPS 2024, https://arxiv.org/abs/2405.18641 (git-disl ``Lisa/trainer.py``).

This file is the template for a new defense (``docs/design.md``, "Adding a defense"): a Config dataclass
that declares the method's name once and checks its values in ``__post_init__``, then one ``@register``-ed
class whose docstring says paper, objective, hyperparameters, data, cost and pitfalls, in that order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from safeft.config import DefenseConfig
from safeft.methods.base import Batch, Defense, StepOutput, backward_terms, require
from safeft.methods.registry import register
from safeft.models import trainable_parameters

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

ALIGN, TASK = "alignment", "finetune"


@dataclass
class LisaConfig(DefenseConfig):
    name: str = "lisa"  # the registry key, declared once: YAML's `defense.name: lisa` selects this method
    align_steps: int = 2  # K_a: micro-steps per alignment state (reference 100)
    finetune_steps: int = 18  # K_f: micro-steps per fine-tune state (reference 900)
    rho: float = 1.0  # ρ, weight of the proximal term (ρ/2)·‖θ − θ̃‖²; 0 = bi-state without proximal term
    prox_warmup: float = 0.1  # share of all micro-steps at the start with the proximal term off (reference 0.1)

    # Checked here, so a bad value fails when the config is loaded, before any model or data is touched.
    def __post_init__(self) -> None:
        require(self.align_steps >= 1, "align_steps", ">= 1", self.align_steps)
        require(self.finetune_steps >= 1, "finetune_steps", ">= 1", self.finetune_steps)
        require(self.rho >= 0, "rho", ">= 0", self.rho)
        require(0 <= self.prox_warmup <= 1, "prox_warmup", "in [0, 1]", self.prox_warmup)


@register
class Lisa(Defense):
    r"""Alternate K_a alignment steps and K_f task steps; anchor each state to where the other one left off.

    Paper: Huang et al., "Lisa: Lazy Safety Alignment ...", NeurIPS 2024, arXiv 2405.18641; code
    git-disl/Lisa ``LisaTrainer``.

    Objective, per micro-batch; training starts in the alignment state::

        alignment state (K_a micro-steps):  L = CE(θ; b_align) + (ρ/2)·‖θ − θ̃_A‖²   (the task batch is discarded)
        fine-tune state (K_f micro-steps):  L = CE(θ; b_task)  + (ρ/2)·‖θ − θ̃_F‖²

    θ̃_A is the snapshot of the trainable weights taken when the alignment state was entered, i.e. the last
    fine-tune iterate, and θ̃_F the one taken on entering the fine-tune state, i.e. the last alignment
    iterate: the pairing of the reference CODE (``switch_model`` runs after the status flips), not of the
    README. Before the first switch the snapshot is the starting point θ₀. The proximal term is off for the
    first ``prox_warmup`` share of all micro-steps, as the reference (``steps ≤ 0.1·total``).

    Hyperparameters:
      * ``align_steps`` (K_a) = 2 and ``finetune_steps`` (K_f) = 18 [inferred]: the reference's 100/900 is
        for ~20k micro-steps; on a 75-step run it would never leave the alignment state. We keep the
        share of alignment steps at 10 % and shorten the cycle so a short run alternates several times.
        Range: K_a ≥ 1, K_f ≥ 1; a cycle well below the run length.
      * ``rho`` (ρ) = 1 (reference ``lisa_poison_ratio.sh``; Booster's reuse uses 0.01); range 0.01-10.
        0 switches the term off (bi-state only).
      * ``prox_warmup`` = 0.1 (reference); range 0-1.

    Data: the aux set ``alignment`` (harmful prompt → refusal), drawn in batches of ``train.batch_size``
    from a checkpointed stream.

    Cost: 1 F+B per micro-step (SFT's), plus an O(P) elementwise proximal term and two fp32 snapshots of
    the trainable parameters, which are kept in the checkpoint with the state and counters so a resumed
    run continues the same schedule. Logged terms: ``align`` or ``task`` (the state's CE) and ``prox``;
    ``diag/lisa_state`` is 1 in the alignment state and 0 in the fine-tune state.

    Pitfalls handled:
      * Steps are micro-steps (calls of ``step``), as the reference counts ``training_step`` calls; with
        ``train.grad_accum`` = 1 they are optimizer steps. The total step count is kept, so the task sees
        K_f/(K_a+K_f) of the run's steps, as in the reference.
      * The switch is checked before the micro-step and the snapshot taken after the flip, so each state
        is anchored to the last iterate of the other (the reference code's order, not its README's).
      * The snapshots are fp32 copies of the trainable parameters only (LoRA A/B under LoRA).
    """

    stage = "finetune"
    needs = ("alignment",)
    Config = LisaConfig
    cfg: LisaConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "fsdp": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the proximal term and its snapshots)"
        ),
        "deepspeed": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the proximal term and its snapshots)"
        ),
    }

    def __init__(self, cfg: LisaConfig) -> None:
        super().__init__(cfg)
        self.state = ALIGN
        self.clock = 0  # micro-steps spent in the current state
        self.steps = 0  # micro-steps overall
        self.snapshot: dict[str, torch.Tensor] | None = None  # θ̃ of the current state
        self._stream = None
        self._total = 0

    def setup(self, ctx: RunContext) -> None:
        rows = ctx.render(ctx.aux_data("alignment"))
        self._stream = ctx.stream("lisa_alignment", rows, ctx.cfg.train.batch_size)
        self._total = ctx.cfg.train.steps * ctx.cfg.train.grad_accum
        if self._total < self.cfg.align_steps + self.cfg.finetune_steps:
            log.warning(
                "lisa: %d micro-steps is less than one cycle (K_a=%d + K_f=%d)",
                self._total,
                self.cfg.align_steps,
                self.cfg.finetune_steps,
            )
        if self.snapshot is None:  # fresh run: before the first switch, anchor to the starting point θ₀
            self.snapshot = self._take(ctx)
        else:
            self.snapshot = {k: v.to(ctx.device) for k, v in self.snapshot.items()}

    def _take(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        params = trainable_parameters(ctx.unwrapped)
        return {n: p.detach().float().clone() for n, p in params.items()}

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if self._stream is None or self.snapshot is None:
            raise RuntimeError("Lisa.step called before setup")
        # The switch is checked before the micro-step, as the reference (``check_mode`` at the top of
        # ``training_step``): the weights now are the last iterate of the state being left, after its final
        # optimizer update. Flip, then snapshot, so the new state is anchored to where the old one ended.
        if self.clock >= (self.cfg.align_steps if self.state == ALIGN else self.cfg.finetune_steps):
            self.state = TASK if self.state == ALIGN else ALIGN
            self.clock = 0
            self.snapshot = self._take(ctx)
        aligning = self.state == ALIGN
        if aligning:
            batch = ctx.batch(self._stream.next())  # the user's batch is discarded in this state
        ce = ctx.forward(batch).loss.float()
        terms = {"align" if aligning else "task": ce}
        # Off while the completed micro-steps are at most prox_warmup of the total (reference: steps > 0.1·total).
        if self.cfg.rho > 0 and self.steps > self.cfg.prox_warmup * self._total:
            params = trainable_parameters(ctx.unwrapped)
            sq = sum(((p.float() - self.snapshot[n]) ** 2).sum() for n, p in params.items())
            terms["prox"] = 0.5 * self.cfg.rho * sq
        out = backward_terms(ctx, terms, {"lisa_state": float(aligning)})
        self.steps += 1
        self.clock += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        snap = {k: v.cpu() for k, v in self.snapshot.items()} if self.snapshot is not None else None
        return {"state": self.state, "clock": self.clock, "steps": self.steps, "snapshot": snap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.state, self.clock, self.steps = state["state"], state["clock"], state["steps"]
            self.snapshot = state["snapshot"]
