"""Booster: attenuate the harmful perturbation at alignment time (alignment stage; fine-tuning is plain SFT).

Huang, Hu, Tekin, Ilhan, Liu, "Booster: Tackling Harmful Fine-tuning for Large Language Models via
Attenuating Harmful Perturbation", ICLR 2025, https://arxiv.org/abs/2409.01586 (code: git-disl/Booster
``BoosterAlignmentTrainer``). Spec: shared/design/algorithms.md §7a.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from safeft.config import ConfigError, DefenseConfig
from safeft.data.chat import Rendered
from safeft.data.types import Example
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import METHODS
from safeft.methods.sap import shifted
from safeft.models import trainable_parameters

log = logging.getLogger(__name__)


@dataclass
class BoosterConfig(DefenseConfig):
    name: str = "booster"
    lam: float = 5.0  # λ, weight of the harmful-loss-reduction term; 0 = SFT (no harmful passes)
    alpha: float = 0.1  # α, length of the simulated normalised harmful step (global L2 over trainables)
    harmful_batch: int = 8  # harmful rows per micro-batch (the code: 10, its alignment batch) [inferred: ours 8]

    def __post_init__(self) -> None:
        for key in ("lam", "alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"defense.{key} must be >= 0, not {getattr(self, key)}")
        if self.harmful_batch < 1:
            raise ConfigError(f"defense.harmful_batch must be >= 1, not {self.harmful_batch}")


def harmful_rows(ctx, stream_name: str, batch_size: int):
    """A checkpointed stream of (harmful prompt -> templated compliance opener) rows from aux ``contrastive``.

    The "harmful answer" is only an opener such as "Sure, here is how to do that ..." with no operational
    content (``safeft.data.aux.COMPLIANCE_OPENERS``): what these methods need is the direction from refusing
    to complying, and no harmful text is wanted in this repository.
    """
    triples = ctx.aux_data("contrastive")
    missing = [ex.id for ex in triples if "harmful_response" not in ex.meta]
    if missing:
        raise ValueError(f"contrastive aux rows need meta['harmful_response'] (first without: {missing[0]!r})")
    rows: list[Rendered] = ctx.render([Example(ex.id, ex.prompt, ex.meta["harmful_response"]) for ex in triples])
    return ctx.stream(stream_name, [dataclasses.replace(r, id=str(i)) for i, r in enumerate(rows)], batch_size)


def _grads(ctx, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇loss per parameter through ``ctx.grad`` (never into ``.grad``); zeros for parameters it does not reach."""
    got = ctx.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if t is None else t.detach() for p, t in zip(params, got, strict=True)]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


@METHODS.register("booster")
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
    not by subtracting the step again (``sap.shifted``); the harmful passes use ``ctx.grad`` so nothing of
    them reaches ``.grad`` except the explicit λ·(g_h − g_h') (divided by ``grad_accum`` like every
    backward); with gradient accumulation every micro-batch does all three passes.
    """

    name = "booster"
    stage = "align"
    needs = ("contrastive",)
    Config = BoosterConfig
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
        self.cfg: BoosterConfig = cfg
        self._stream = None

    def setup(self, ctx) -> None:
        if self.cfg.lam > 0:  # λ = 0 touches nothing: exactly SFT at SFT's cost
            self._stream = harmful_rows(ctx, "booster_harmful", self.cfg.harmful_batch)

    def step(self, ctx, batch: Batch) -> StepOutput:
        if self.cfg.lam == 0:
            return super().step(ctx, batch)
        if self._stream is None:
            raise RuntimeError("Booster.step called before setup")
        params = list(trainable_parameters(ctx.unwrapped).values())
        harm = ctx.batch(self._stream.next())
        h = ctx.forward(harm).loss
        g = _grads(ctx, h, params)
        norm = global_norm(g)
        step = [-self.cfg.alpha * t.float() / (norm + 1e-7) for t in g]
        # θ' only needs to move when α > 0; the check in `shifted` would reject a vanishing step otherwise.
        with shifted(params, step, check=self.cfg.alpha > 0 and float(norm) > 1e-6):
            h_after = ctx.forward(harm).loss
            g_after = _grads(ctx, h_after, params)
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
