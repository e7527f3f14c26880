"""Safety-data mixing: fine-tune on the task data with refusal examples mixed in.

Bianchi et al., "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that
Follow Instructions", ICLR 2024, https://arxiv.org/abs/2309.07875; also the "vlguard" baseline of the
git-disl Vaccine and Booster code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from safeft.config import ConfigError, DefenseConfig
from safeft.data.chat import IGNORE
from safeft.data.types import Example
from safeft.methods.base import Batch, Defense, StepOutput, backward_terms, require
from safeft.methods.registry import register

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

VARIANTS = ("dataset", "append", "batch")


@dataclass
class MixingConfig(DefenseConfig):
    name: str = "mixing"
    variant: str = "dataset"  # dataset (A) | append (B) | batch (C)
    fraction: float = 0.03  # A: share of safety examples in the mixed training set
    n_safety: int = 100  # B: safety examples appended to the task data
    lam: float = 1.0  # C: weight of the safety-batch CE
    safety_batch: int = 4  # C: safety examples per micro-batch
    train_on_inputs: bool = False  # A/B: loss on the prompt tokens too (Alpaca-LoRA's default is True)

    def __post_init__(self) -> None:
        require(self.variant in VARIANTS, "variant", f"one of {', '.join(VARIANTS)}", self.variant)
        require(0 <= self.fraction < 1, "fraction", "in [0, 1)", self.fraction)
        require(self.n_safety >= 0, "n_safety", ">= 0", self.n_safety)
        require(self.lam >= 0, "lam", ">= 0", self.lam)
        require(self.safety_batch >= 1, "safety_batch", ">= 1", self.safety_batch)
        if self.train_on_inputs and self.variant == "batch":
            raise ConfigError("defense.train_on_inputs applies to the dataset and append variants only, not batch")


def n_mixed(fraction: float, n_task: int) -> int:
    """Safety examples X such that X / (n_task + X) is ``fraction``, rounded; at least 1 when fraction > 0."""
    if fraction == 0:
        return 0
    return max(1, round(fraction * n_task / (1 - fraction)))


@register
class Mixing(Defense):
    r"""Train on refusal examples too: mixed into the task set, appended to it, or as a second batch per step.

    Paper: Bianchi et al., "Safety-Tuned LLaMAs", ICLR 2024, arXiv 2309.07875 (code
    vinid/safety-tuned-llamas); variants B and C as run by git-disl Vaccine (``vlguard``) and Booster
    (``VlguardTrainer``).

    Variants (``variant``):
      * ``dataset`` (A, Safety-Tuned LLaMAs): the training set is the task data ∪ X refusal examples with
        X/(N+X) = ``fraction``; plain SFT on the shuffled union, L = CE(θ; b) with b drawn from it.
      * ``append`` (B, Vaccine ``vlguard``): the same union with a fixed X = ``n_safety`` (reference 100).
      * ``batch`` (C, Booster ``VlguardTrainer``): the task data unchanged, and each micro-batch adds a
        separate safety batch: L = CE(θ; b_task) + λ · CE(θ; b_safety).

    Hyperparameters:
      * ``fraction`` = 0.03 (A; the paper: a few hundred of 20k, ≈ 3 %, suffice); range 0-0.5. X is
        rounded, and at least 1 when fraction > 0; the achieved share is logged. 0 = plain SFT exactly.
      * ``n_safety`` = 100 (B; reference ``guide_data_num``); range 0-all (our alignment set holds 400).
        0 = plain SFT exactly.
      * ``lam`` (λ) = 1 (C; the reference adds the two losses); range 0-10. 0 runs no safety pass: SFT
        exactly, at SFT's cost.
      * ``safety_batch`` = 4 (C; reference fixed batch 4), cycled through a checkpointed stream.
      * ``train_on_inputs`` = False [inferred]: response-only loss like our SFT, so the row differs from
        SFT by the data alone; True reproduces the Alpaca-LoRA code's loss on prompt tokens (A's
        reference), applied to every row of the mix.

    Data: the aux set ``alignment`` (harmful prompt → refusal; Do-Not-Answer's ``align`` split, checked
    against HarmBench); A and B take its first X examples.

    Cost: A and B 1 F+B per step (SFT's) over a data set X rows larger; C ≈ 1 + safety_batch/batch_size
    F+B per micro-batch (logged as 2 forward + 1 backward: both losses are back-propagated together).
    """

    stage = "finetune"
    needs = ("alignment",)
    Config = MixingConfig
    cfg: MixingConfig

    def __init__(self, cfg: MixingConfig) -> None:
        super().__init__(cfg)
        self._stream = None

    def task_examples(self, examples: list[Example], aux: dict[str, list[Example]]) -> list[Example]:
        if self.cfg.variant == "batch":
            return examples
        x = n_mixed(self.cfg.fraction, len(examples)) if self.cfg.variant == "dataset" else self.cfg.n_safety
        if x == 0:
            return examples
        pool = aux.get("alignment") or []
        if len(pool) < x:
            raise ConfigError(f"mixing: {x} safety examples wanted but the alignment set holds {len(pool)}")
        ids = {ex.id for ex in examples}
        clash = [ex.id for ex in pool[:x] if ex.id in ids]
        if clash:
            raise ConfigError(f"mixing: safety example id {clash[0]!r} is also a task example id")
        safety = list(pool[:x])
        log.info(
            "mixing: %d task + %d safety examples (%.1f %% safety)", len(examples), x, 100 * x / (len(examples) + x)
        )
        # Order does not matter: the loop's stream shuffles every epoch.
        return [*examples, *safety]

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.variant == "batch" and self.cfg.lam > 0:
            rows = ctx.render(ctx.aux_data("alignment"))
            self._stream = ctx.stream("mixing_safety", rows, self.cfg.safety_batch)

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if self.cfg.train_on_inputs:
            # Every real token is a target (the causal shift happens inside the model); padding stays masked.
            batch = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)}
        terms = {"task": ctx.forward(batch).loss.float()}
        if self._stream is not None:
            safety = ctx.batch(self._stream.next())
            terms["safety"] = self.cfg.lam * ctx.forward(safety).loss.float()
        return backward_terms(ctx, terms)
