"""The Defense interface: the seam that keeps the training loop free of method names.

A defense is one file under ``methods/``: a ``Config`` dataclass (its hyperparameters, validated in
``__post_init__``, and its name, declared once as the ``name`` default) and a ``Defense`` subclass decorated
with ``@register`` (``methods/registry.py``). ``methods/lisa.py`` is the template; ``docs/design.md``
("Adding a defense") walks through it. The loop (``safeft.train``) calls:

* ``task_examples(examples, aux)`` once, before rendering: a defense that changes the training data itself
  (safety-data mixing) returns the new list.
* ``setup(ctx)`` once, before step 0: caches (reference states, Fisher, anchor logits, probes).
* ``step(ctx, batch)`` per micro-batch: computes its loss terms, calls ``ctx.backward`` itself (once, or
  several times for multi-pass methods), and returns a ``StepOutput`` whose named terms the loop logs as
  ``loss/<term>`` without knowing what they mean.
* ``after_train(ctx)`` once, after the last step: post-hoc fixes (e.g. Safe LoRA's projection). The loop
  saves the final checkpoint again afterwards, so what it changed is what the run keeps.
* ``close()`` always, last, even when training fails: remove hooks and other attachments.
* ``state_dict`` / ``load_state_dict`` at checkpoints and on resume, for state beyond the aux streams.

The default ``step`` is task CE plus whatever ``penalty`` returns, so a regulariser-style defense only
writes ``penalty``. What a defense sees of the run is ``ctx``, a ``safeft.context.RunContext`` (never the
loop module): ``ctx.forward`` / ``ctx.backward`` / ``ctx.grad`` count every pass, so each run reports its
real cost; ``ctx.forward(..., autocast=False)`` is a counted fp32 pass (a Fisher estimate);
``ctx.unwrapped`` is the model without accelerate's wrapper (for hooks, embeddings, parameters);
``ctx.reference()`` the frozen aligned model; ``ctx.stream`` a checkpointed aux data stream;
``ctx.micro`` / ``ctx.last_micro`` say where the micro-batch stands in its optimizer step, for state
updated once per optimizer step (SAP's probe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from safeft.config import ConfigError, DefenseConfig
from safeft.data.types import Example

if TYPE_CHECKING:
    from safeft.context import RunContext, Stream

Batch = dict[str, torch.Tensor]


@dataclass
class StepOutput:
    loss: torch.Tensor  # the total that was back-propagated (detached)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, each already weighted
    # Numbers worth watching that are not part of the optimised loss (a probe norm, an unweighted KL);
    # the loop logs them as ``diag/<name>``, apart from ``loss/<term>``, so loss == sum of loss terms.
    diagnostics: dict[str, float] = field(default_factory=dict)


class Defense:
    name: ClassVar[str]  # the registry key; ``@register`` sets it from ``Config.name``
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


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """For a Config's ``__post_init__``: raise ``ConfigError`` naming ``defense.<key>``, what is allowed and
    the value given, e.g. ``require(self.rho >= 0, "rho", ">= 0", self.rho)``."""
    if not ok:
        raise ConfigError(f"defense.{key} must be {allowed}, not {value!r}")


def backward_terms(
    ctx: RunContext, terms: dict[str, torch.Tensor], diagnostics: dict[str, float] | None = None
) -> StepOutput:
    """Back-propagate the sum of named loss terms (in fp32) once; the ``StepOutput`` the loop logs."""
    total = torch.stack([t.float() for t in terms.values()]).sum()
    ctx.backward(total)
    return StepOutput(total.detach(), {k: v.detach() for k, v in terms.items()}, diagnostics or {})


def harmful_rows(ctx: RunContext, stream_name: str, batch_size: int) -> Stream:
    """A checkpointed stream of (harmful prompt -> templated compliance opener) rows from aux ``contrastive``.

    The "harmful answer" is only an opener such as "Sure, here is how to do that ..." with no operational
    content (``safeft.data.aux.COMPLIANCE_OPENERS``): what the alignment-stage defenses (Booster, RepNoise)
    need is the direction from refusing to complying, and no harmful text is wanted in this repository.
    """
    triples = ctx.aux_data("contrastive")
    missing = [ex.id for ex in triples if "harmful_response" not in ex.meta]
    if missing:
        raise ValueError(f"contrastive aux rows need meta['harmful_response'] (first without: {missing[0]!r})")
    rows = ctx.render([Example(ex.id, ex.prompt, ex.meta["harmful_response"]) for ex in triples])
    return ctx.stream(stream_name, [dataclasses.replace(r, id=str(i)) for i, r in enumerate(rows)], batch_size)
