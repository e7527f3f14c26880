"""The Defense interface: the seam that keeps the training loop free of method names.

A defense plugs into ``safeft.train`` through three calls:

* ``setup(ctx)`` once, before step 0: caches (reference states, Fisher, anchor logits, probes).
* ``step(ctx, batch)`` per micro-batch: computes its loss terms, calls ``ctx.backward`` itself (once, or
  several times for multi-pass methods), and returns a ``StepOutput`` whose named terms the loop logs as
  ``loss/<term>`` without knowing what they mean.
* ``after_train(ctx)`` once, after the last step: post-hoc fixes (e.g. Safe LoRA's projection).

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

if TYPE_CHECKING:
    from safeft.train import RunContext

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    loss: torch.Tensor  # the total that was back-propagated (detached)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, each already weighted


class Defense:
    name: ClassVar[str]
    stage: ClassVar[str]  # "align" | "finetune" | "post"
    needs: ClassVar[tuple[str, ...]] = ()  # aux data / services: "reference", "harmful_prompts", ...
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, cfg: DefenseConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: RunContext) -> None:
        """One-off work before step 0."""

    def penalty(self, ctx: RunContext, batch: Batch) -> dict[str, torch.Tensor]:
        """Extra loss terms (already weighted) added to the task CE by the default ``step``."""
        return {}

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        task = ctx.forward(batch).loss
        terms = {"task": task, **self.penalty(ctx, batch)}
        total = torch.stack([t.float() for t in terms.values()]).sum()
        ctx.backward(total)
        return StepOutput(total.detach(), {k: v.detach() for k, v in terms.items()})

    def after_train(self, ctx: RunContext) -> None:
        """Post-hoc work after the last step."""

    # Anything a defense must carry across a resume (e.g. an aux-data cursor, an EMA) goes here.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint holds {sorted(state)}")


def cycle(items: list, seed: int) -> Iterator:
    """Endless deterministic reshuffled pass over ``items`` (for aux data such as anchor prompts)."""
    import random

    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i]
