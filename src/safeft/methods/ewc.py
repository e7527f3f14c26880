"""EWC: elastic weight consolidation toward the aligned point, with a Fisher computed on alignment data.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017,
https://arxiv.org/abs/1612.00796; the fine-tuning-stage safety baseline of the Vaccine, Booster and Lisa
papers (git-disl ``trainer.py::FITrainer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from safeft.config import ConfigError, DefenseConfig
from safeft.data.chat import Rendered
from safeft.methods.base import Batch, Defense, require
from safeft.methods.registry import register
from safeft.models import trainable_parameters

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

REDUCTIONS = ("mean_per_example_sq", "sum_minibatch_sq")


@dataclass
class EWCConfig(DefenseConfig):
    name: str = "ewc"
    lam: float = 1.0  # λ in λ/2 · Σ F (θ − θ*)²; 0 = plain SFT
    fisher_samples: int = 256  # alignment examples the Fisher is estimated on (the first N of the aux set)
    fisher_reduction: str = "mean_per_example_sq"  # or "sum_minibatch_sq" (the reference's)
    fisher_batch: int = 5  # micro-batch of the "sum_minibatch_sq" reduction (the reference's eval batch)
    normalize: bool = True  # divide F by its mean over all trainable entries, so λ is scale-free

    def __post_init__(self) -> None:
        require(self.lam >= 0, "lam", ">= 0", self.lam)
        require(self.fisher_samples >= 1, "fisher_samples", ">= 1", self.fisher_samples)
        reduction = self.fisher_reduction
        require(reduction in REDUCTIONS, "fisher_reduction", f"one of {', '.join(REDUCTIONS)}", reduction)
        require(self.fisher_batch >= 1, "fisher_batch", ">= 1", self.fisher_batch)


def fisher_diagonal(
    ctx: RunContext, rows: list[Rendered], params: dict[str, torch.nn.Parameter], reduction: str, batch_size: int = 5
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of ``params`` at their current values, over ``rows``, in fp32.

    * ``mean_per_example_sq``: F = 1/N · Σ_n (∇_θ CE(x_n))², per-example gradients (batches of one).
    * ``sum_minibatch_sq``: F = Σ_b (∇_θ CE(b))² over consecutive micro-batches of ``batch_size`` (the
      reference's estimator; ≈ B× smaller per batch than the per-example one, so λ is not comparable).

    Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is left behind to leak into the
    first training step (a pitfall of the reference code). Each micro-batch is one counted F+B.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"defense.fisher_reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}")
    names = list(params)
    tensors = [params[n] for n in names]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    size = 1 if reduction == "mean_per_example_sq" else batch_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    from tqdm.auto import tqdm

    for chunk in tqdm(chunks, desc="ewc fisher", disable=len(chunks) < 20, leave=False):
        batch = ctx.batch(chunk)
        # fp32, no autocast: squared bf16 gradients underflow
        loss = ctx.forward(batch, autocast=False).loss.float()
        # allow_unused: a parameter the loss does not reach has zero Fisher (not an error).
        grads = ctx.grad(loss, tensors, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    if reduction == "mean_per_example_sq":
        for f in fisher.values():
            f /= len(rows)
    return fisher


@register
class EWC(Defense):
    r"""Penalise moving the trainable weights along directions the alignment data is sensitive to.

    Paper: Kirkpatrick et al. 2017 (EWC); as a harmful-fine-tuning baseline, git-disl Vaccine/Booster/Lisa
    ``FITrainer``.

    Objective, per micro-batch::

        L(θ) = CE(θ; b_task) + (λ/2) · Σ_i F_i (θ_i − θ*_i)²
        F_i  = 1/N Σ_n (∂ CE(θ*; x_n, y_n) / ∂θ_i)²          (x_n, y_n) ∈ D_align, the first N aux examples

    θ* is the trainable state at the start of fine-tuning, F the empirical diagonal Fisher at θ*, in fp32,
    over the trainable parameters only (LoRA A/B, or every weight under full fine-tuning).

    Hyperparameters:
      * ``lam`` (λ) = 1 with ``normalize`` on [inferred]; range 0.01-100. With F normalised to mean 1,
        an entry with average Fisher is pulled back with strength λ (per unit of displacement), which at
        λ ≈ 1 already outweighs a typical per-entry task gradient. 0 returns no term and computes no
        Fisher, so λ = 0 is plain SFT exactly, at SFT's cost. The reference uses λ = 1e9 with the
        un-normalised, summed-minibatch Fisher (with ½ dropped), which is not comparable.
      * ``fisher_samples`` (N) = 256 [inferred; the reference uses 2000 rows, our alignment split holds
        400]; range 64-all.
      * ``fisher_reduction`` = ``mean_per_example_sq`` (the textbook diagonal Fisher, recommended) or
        ``sum_minibatch_sq`` (the reference's: squared minibatch gradients, summed, batch ``fisher_batch`` = 5).
      * ``normalize`` = True: F ← F / mean(F) over all trainable entries, so λ does not depend on the
        estimator, the model size or the loss scale. The raw mean is logged once.

    Data: the aux set ``alignment`` (harmful prompt → refusal), passed explicitly, never the task data or
    whatever happens to be an eval set (the Booster code computed it on harmful rows).

    Cost: per step 1 F+B (SFT's) plus an O(P) elementwise term. One-off: N F+B per-example passes (or
    N/B minibatch passes). Memory: F and θ*, one fp32 copy each of the trainable parameters; both are kept
    in the checkpoint, so a resumed run penalises toward the same θ* with the same F.

    Variant run here: fine-tuning attaches a FRESH LoRA to the merged aligned model, so
    θ* = (A random, B = 0). At B = 0 the gradient w.r.t. A vanishes, so F_A = 0 and the penalty is a
    Fisher-weighted L2 on the new adapter's B (and free movement of A). The reference instead continues
    the alignment LoRA. Under full fine-tuning θ* is the aligned weights themselves.
    """

    stage = "finetune"
    needs = ("alignment",)
    Config = EWCConfig
    cfg: EWCConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "fsdp": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the Fisher-weighted distance to the aligned point)"
        ),
        "deepspeed": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the Fisher-weighted distance to the aligned point)"
        ),
    }

    def __init__(self, cfg: EWCConfig) -> None:
        super().__init__(cfg)
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None  # θ*
        self.raw_mean: float | None = None

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.lam == 0:
            return  # no Fisher, no θ*: λ = 0 is SFT at SFT's cost
        params = trainable_parameters(ctx.unwrapped)
        if self.fisher is not None:  # resumed: θ* and F come from the checkpoint, not the current weights
            self._check(params)
            self._to(ctx.device)
            return
        data = ctx.aux_data("alignment")
        if len(data) < self.cfg.fisher_samples:
            log.warning(
                "ewc: fisher_samples=%d but only %d alignment examples; using all", self.cfg.fisher_samples, len(data)
            )
        rows = ctx.render(data[: self.cfg.fisher_samples])
        self.anchor = {n: p.detach().float().clone() for n, p in params.items()}
        fisher = fisher_diagonal(ctx, rows, params, self.cfg.fisher_reduction, self.cfg.fisher_batch)
        total = sum(float(f.sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        self.raw_mean = total / count
        if self.raw_mean == 0 or not torch.isfinite(torch.tensor(self.raw_mean)):
            raise RuntimeError(f"ewc: the Fisher on the alignment data is {self.raw_mean} everywhere; cannot anchor")
        if self.cfg.normalize:
            for f in fisher.values():
                f /= self.raw_mean
        self.fisher = fisher
        log.info(
            "ewc: Fisher over %d alignment examples (%s), raw mean %.3g",
            len(rows),
            self.cfg.fisher_reduction,
            self.raw_mean,
        )

    def penalty(self, ctx: RunContext, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.lam == 0:
            return {}
        if self.fisher is None or self.anchor is None:
            raise RuntimeError("EWC.penalty called before setup")
        params = trainable_parameters(ctx.unwrapped)
        total = torch.zeros((), device=ctx.device, dtype=torch.float32)
        for n, p in params.items():
            total = total + (self.fisher[n] * (p.float() - self.anchor[n]) ** 2).sum()
        return {"ewc": 0.5 * self.cfg.lam * total}

    # F and θ* travel with the checkpoint: after a resume the current weights are no longer θ*.
    def state_dict(self) -> dict[str, Any]:
        if self.fisher is None:
            return {}
        cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
        return {"fisher": cpu(self.fisher), "anchor": cpu(self.anchor), "raw_mean": self.raw_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.fisher, self.anchor, self.raw_mean = state["fisher"], state["anchor"], state["raw_mean"]

    def _check(self, params: dict[str, torch.nn.Parameter]) -> None:
        if set(params) != set(self.fisher):
            raise RuntimeError("ewc: the checkpoint's Fisher does not cover the model's trainable parameters")

    def _to(self, device) -> None:
        self.fisher = {k: v.to(device) for k, v in self.fisher.items()}
        self.anchor = {k: v.to(device) for k, v in self.anchor.items()}
