"""Booster: attenuate the harmful perturbation at alignment time (alignment stage; fine-tuning is plain SFT).

Huang, Hu, Tekin, Ilhan, Liu, "Booster: Tackling Harmful Fine-tuning for Large Language Models via
Attenuating Harmful Perturbation", ICLR 2025, https://arxiv.org/abs/2409.01586 (code: git-disl/Booster
``BoosterAlignmentTrainer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from safeft.config import DefenseConfig
from safeft.methods.base import Batch, Defense, StepOutput, harmful_rows, require
from safeft.methods.registry import register
from safeft.methods.weights import global_norm, param_grads, shifted
from safeft.models import trainable_parameters

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)


@dataclass
class BoosterConfig(DefenseConfig):
    name: str = "booster"
    lam: float = 5.0  # λ, weight of the harmful-loss-reduction term; 0 = SFT (no harmful passes)
    alpha: float = 0.1  # α, length of the simulated normalised harmful step (global L2 over trainables)
    harmful_batch: int = 8  # harmful rows per micro-batch (the code: 10, its alignment batch) [inferred: ours 8]

    def __post_init__(self) -> None:
        require(self.lam >= 0, "lam", ">= 0", self.lam)
        require(self.alpha >= 0, "alpha", ">= 0", self.alpha)
        require(self.harmful_batch >= 1, "harmful_batch", ">= 1", self.harmful_batch)


@register
class Booster(Defense):
    r"""Align while penalising how much one normalised harmful gradient step would lower the harmful loss.

    Paper: Huang et al., "Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating
    Harmful Perturbation", ICLR 2025, arXiv 2409.01586 (code git-disl/Booster, ``BoosterAlignmentTrainer``).

    Objective (alignment batch b_a, harmful batch b_h)::

        min_θ  f(θ) + λ · [ h(θ) − h(θ − α·∇h(θ)/‖∇h(θ)‖) ],   f = CE(θ; b_a),  h = CE(θ; b_h)

    with the code's first-order gradient (the Hessian term through the inner step is dropped)::

        g_h = ∇h(θ);  θ' = θ − α·g_h/(‖g_h‖ + 1e-7);  g_h' = ∇h(θ');  grad = ∇f(θ) + λ·g_h − λ·g_h'

    Hyperparameters:
      * ``lam`` (λ) = 5, the code's ``smooth_align.sh``; range 1-20. 0 runs no harmful pass: SFT exactly.
      * ``alpha`` (α) = 0.1, the code's; range 0.01-1. α = 0 makes θ' = θ, so g_h' = g_h and the added
        gradient is exactly 0: SFT's trajectory at 3× the cost (a test checks it: nothing of the two harmful
        passes may leak into the update).
      * ``harmful_batch`` = 8 [inferred: the code fixes 10, equal to its alignment batch; ours equals our
        alignment batch of 8].

    Data: the stage's task batch is the alignment data (harmful → refusal, benign → self-answer); the harmful
    batch comes from aux ``contrastive`` as (harmful prompt → templated compliance opener) [inferred: the
    code uses BeaverTails unsafe answers; we train on no harmful content, only the opener that starts a
    compliant reply, which is what the harmful loss must not be able to lower].

    Cost: 3 F+B per micro-batch (two on the harmful batch, one on the alignment batch) plus two gradient
    copies of the trainable parameters; logged as ``passes/forward = 3``, ``passes/backward = 3``. Terms:
    ``loss/task`` = f, ``loss/booster`` = λ·(h − h') (the objective's value; its gradient is the first-order
    one above); ``diag/harmful_loss`` = h, ``diag/harmful_loss_after_step`` = h'.

    Pitfalls handled: the norm is over all trainable parameters jointly; θ is restored from a saved copy,
    not by subtracting the step again (``weights.shifted``); the harmful passes use ``ctx.grad`` so nothing of
    them reaches ``.grad`` except the explicit λ·(g_h − g_h') (divided by ``grad_accum`` like every
    backward); with gradient accumulation every micro-batch does all three passes.
    """

    stage = "align"
    needs = ("contrastive",)
    Config = BoosterConfig
    cfg: BoosterConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "processes": (
            "adds lam*(g_h - g_h') to .grad after the backward, outside DDP's gradient all-reduce: each process "
            "would add its own term and the replicas would drift apart"
        ),
        "fsdp": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the harmful step shifts the weights in place)"
        ),
        "deepspeed": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the harmful step shifts the weights in place)"
        ),
    }

    def __init__(self, cfg: BoosterConfig) -> None:
        super().__init__(cfg)
        self._stream = None

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.lam > 0:  # λ = 0 touches nothing: exactly SFT at SFT's cost
            self._stream = harmful_rows(ctx, "booster_harmful", self.cfg.harmful_batch)

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if self.cfg.lam == 0:
            return super().step(ctx, batch)
        if self._stream is None:
            raise RuntimeError("Booster.step called before setup")
        params = list(trainable_parameters(ctx.unwrapped).values())
        harm = ctx.batch(self._stream.next())
        h = ctx.forward(harm).loss
        g = param_grads(ctx, h, params)
        norm = global_norm(g)
        step = [-self.cfg.alpha * t.float() / (norm + 1e-7) for t in g]
        # θ' only needs to move when α > 0; the check in `shifted` would reject a vanishing step otherwise.
        with shifted(params, step, check=self.cfg.alpha > 0 and float(norm) > 1e-6):
            h_after = ctx.forward(harm).loss
            g_after = param_grads(ctx, h_after, params)
        task = ctx.forward(batch).loss
        ctx.backward(task)
        scale = self.cfg.lam / ctx.cfg.train.grad_accum  # as ctx.backward scales every backward
        with torch.no_grad():
            for p, a, b in zip(params, g, g_after, strict=True):
                extra = scale * (a - b)
                if p.grad is None:
                    p.grad = extra.to(p.dtype).clone()
                else:
                    p.grad.add_(extra.to(p.grad.dtype))
        boost = self.cfg.lam * (h.detach() - h_after.detach())
        terms = {"task": task.detach(), "booster": boost}
        return StepOutput(
            task.detach() + boost,
            terms,
            diagnostics={"harmful_loss": float(h.detach()), "harmful_loss_after_step": float(h_after.detach())},
        )
