"""The Defense interface: the seam that keeps the training loop free of method names.

A defense plugs into ``safeft.train`` through three calls:

* ``setup(ctx)`` once, before step 0: caches (reference states, Fisher, anchor logits, probes).
* ``step(ctx, batch)`` per micro-batch: computes its loss terms, calls ``ctx.backward`` itself (once, or
  several times for multi-pass methods), and returns a ``StepOutput`` whose named terms the loop logs as
  ``loss/<term>`` without knowing what they mean.
* ``after_train(ctx)`` once, after the last step: post-hoc fixes (e.g. Safe LoRA's projection). The loop
  saves the final checkpoint again afterwards, so what it changed is what the run keeps.
* ``task_examples(examples, aux)`` once, before rendering: a defense that changes the training data itself
  (safety-data mixing) returns the new list.

The default ``step`` is task CE plus whatever ``penalty`` returns, so a regulariser-style defense only
writes ``penalty``. Every forward and backward goes through ``ctx.forward`` / ``ctx.backward``, which count
passes, so each run reports its real cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from safeft.config import DefenseConfig
from safeft.data.types import Example

if TYPE_CHECKING:
    from safeft.context import RunContext

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    loss: torch.Tensor  # the total that was back-propagated (detached)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, each already weighted
    # Numbers worth watching that are not part of the optimised loss (a probe norm, an unweighted KL);
    # the loop logs them as ``diag/<name>``, apart from ``loss/<term>``, so loss == sum of loss terms.
    diagnostics: dict[str, float] = field(default_factory=dict)


class Defense:
    name: ClassVar[str]
    stage: ClassVar[str]  # "align" | "finetune" | "post"
    needs: ClassVar[tuple[str, ...]] = ()  # aux data / services: "reference", "harmful_prompts", ...
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    # Run settings this method cannot honour, each with the reason. The loop refuses them at start-up,
    # naming the method and the reason (``safeft.context.check_supported``; keys ``context.FEATURES``:
    # "processes", "fsdp", "deepspeed", "gradient_checkpointing"); docs/scale.md has the table.
    unsupported: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg

    def task_examples(self, examples: list[Example], aux: dict[str, list[Example]]) -> list[Example]:
        """The task examples to train on, given the user's and the aux data (default: unchanged).

        Called once before anything is rendered or written (e.g. safety-data mixing appends refusals);
        a bad combination raises here, before the run directory exists.
        """
        return examples

    def setup(self, ctx: RunContext) -> None:
        """One-off work before step 0."""

    def penalty(self, ctx: RunContext, batch: Batch) -> dict[str, torch.Tensor]:
        """Extra loss terms (already weighted) added to the task CE by the default ``step``."""
        return {}

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        task = ctx.forward(batch).loss
        return backward_terms(ctx, {"task": task, **self.penalty(ctx, batch)})

    def after_train(self, ctx: RunContext) -> None:
        """Post-hoc work after the last step."""

    def close(self) -> None:
        """Release hooks and other attachments to the model. The loop calls it even when training fails,
        so a crashed or interrupted run never leaves a probe or perturbation hook on the model."""

    # Anything a defense must carry across a resume (an EMA, a probe and its optimizer) goes here; aux
    # stream positions are checkpointed by the loop. On resume, ``load_state_dict`` runs before ``setup``,
    # so ``setup`` can reuse restored state (e.g. cached reference answers) instead of recomputing it.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint holds {sorted(state)}")


def backward_terms(
    ctx: RunContext, terms: dict[str, torch.Tensor], diagnostics: dict[str, float] | None = None
) -> StepOutput:
    """Back-propagate the sum of named loss terms (in fp32) once; the ``StepOutput`` the loop logs."""
    total = torch.stack([t.float() for t in terms.values()]).sum()
    ctx.backward(total)
    return StepOutput(total.detach(), {k: v.detach() for k, v in terms.items()}, diagnostics or {})


def cycle(items: list, seed: int) -> Iterator:
    """Endless deterministic reshuffled pass over ``items`` (for aux data such as anchor prompts)."""
    import random

    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i]
