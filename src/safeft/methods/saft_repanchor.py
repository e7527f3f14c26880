"""SAFT + RepAnchor: the paper's headline method, both anchors on one shared anchor stream.

Paper: "Safety-Anchored Fine-Tuning" (AI4GOOD Workshop 2026, https://openreview.net/forum?id=DV4a7kg06D;
abstract only). The abstract reports 2.5 / 2.0 / 4.0 % ASR on code / finance / medical with this
combination, and says safety and utility are "continuously tunable through λ and γ".

Objective::

    L(θ) = CE(θ; b_task) + λ · KL(θ, δ*; x^a, y_ref) + γ · R(θ; x^a)

with the KL and δ* of ``methods.saft`` and the drift-weighted MSE R of ``methods.repanchor``, both on the
SAME anchor micro-batch x^a each step (one stream, one y_ref generation, one checkpointed position).

Hyperparameters: every field of ``SAFTConfig`` and ``RepAnchorConfig`` (the anchor fields ``n_anchors``,
``anchor_batch``, ``ref_max_new_tokens`` are shared); ``lam`` = 0.5 and ``gamma`` = 0.1 by default, both
[inferred]. ``lam = 0`` gives RepAnchor, ``gamma = 0`` gives SAFT, both 0 give exactly SFT. Report the
(λ, γ) Pareto frontier rather than one point.

Data: harmful prompts without responses (aux ``harmful_prompts``); the reference's own greedy answers.

Cost per step, in F+B of one task micro-batch: 1 + (K + 2)·r (K PGD passes, the adversarial KL pass, the
clean RepAnchor pass; r = anchor tokens / task tokens), plus one probe-set forward every
``refresh_every`` steps. [inferred] The adversarial and the clean anchor rows are kept apart, as in the
spec's pseudo-code: RepAnchor anchors the clean representations while the KL is measured under attack. A
cheaper variant (K = 1, one shared clean pass) is not implemented. [ours] With ``fuse`` (the default) both
ride in the task forward (``safeft.packing``: the attacked rows as embeddings, the clean rows reading the
template prefix from a task row), so a step is K + 1 forwards and K + 1 backwards (4 and 4 at K = 3,
instead of 6 and 6): 1.89x SFT's step time on SmolLM2, batch 8, 2 CPU cores (2.36x unfused), measured
before the unembedding was restricted to the positions each term reads (SAFT's KL positions only; none of
RepAnchor's, which reads block outputs) and the KL rows were cut after their last read position (see
``methods.saft``). ``kl_on=task|both`` keeps every pass separate (the task rows cannot ride in themselves).
With ``pgd_mode=free`` ([ours], ``methods.saft``) δ is carried per anchor row and takes its ascent step from
the packed backward: a step is ONE forward and ONE backward (positions: the task batch plus both anchor
rows once), and the checkpoint holds the carried δ beside y_ref and the drift state.

Code: the composition of SAFT's and RepAnchor's anchor-family parts (``methods.anchors``) on this defense's
one anchor set: ``anchor_step`` hands both the same rows. It imports the two methods it composes, and only
these: their configs make up its config, their parts its step; nothing else imports a method file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from safeft.context import RunContext
from safeft.methods.anchors import AnchorSet, Part, anchor_step, packs
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import register
from safeft.methods.repanchor import RepAnchor, RepAnchorConfig
from safeft.methods.saft import SAFT, SAFTConfig


@dataclass
class SAFTRepAnchorConfig(RepAnchorConfig, SAFTConfig):
    """Every SAFT field, then every RepAnchor field (the anchor fields appear once, with SAFT's)."""

    name: str = "saft+repanchor"

    def __post_init__(self) -> None:
        SAFTConfig.__post_init__(self)
        RepAnchorConfig.__post_init__(self)


def _member(cls: type, cfg: SAFTRepAnchorConfig) -> Any:
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@register
class SAFTRepAnchor(Defense):
    """SAFT + RepAnchor: task CE + λ·adversarial KL to the reference + γ·drift-weighted MSE (see module doc)."""

    stage = "finetune"
    needs = ("reference", "harmful_prompts")
    Config = SAFTRepAnchorConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "processes": (
            "RepAnchor's part collects its CKA probe prompts from the task micro-batches one process sees, so "
            "processes would measure different drift and anchor different layers"
        ),
        "fsdp": (
            "embeds the anchors with the input embedding outside the model's forward to add the PGD perturbation,"
            " and FSDP keeps that weight sharded there"
        ),
        "deepspeed": (
            "runs more than one backward per micro-batch, and accelerate's DeepSpeed engine steps the optimizer "
            "inside the backward that ends an accumulation"
        ),
    }

    def __init__(self, cfg: SAFTRepAnchorConfig) -> None:
        super().__init__(cfg)
        self.cfg: SAFTRepAnchorConfig = cfg
        self.saft = SAFT(_member(SAFTConfig, cfg))
        self.rep = RepAnchor(_member(RepAnchorConfig, cfg))
        self.anchors = AnchorSet(cfg.n_anchors, cfg.ref_max_new_tokens, cfg.anchor_batch)  # shared by both
        self.fused = False  # the outer anchor passes packed into the task forward (set in setup)

    @property
    def parts(self) -> list[Part]:
        """SAFT's KL part(s), then RepAnchor's: the order of their passes, and of the logged terms."""
        return self.saft.parts + self.rep.parts

    @property
    def uses_anchors(self) -> bool:
        return self.saft.uses_anchors or self.cfg.gamma > 0

    def setup(self, ctx: RunContext) -> None:
        if not self.uses_anchors:
            return
        rows = self.anchors.build(ctx)
        if self.saft.uses_anchors:
            self.saft.prepare(ctx, rows)
        if self.cfg.gamma > 0:
            self.rep.prepare(ctx, rows)
        self.fused = packs(ctx, self.cfg.fuse, self.parts, rows, "saft+repanchor")

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.parts:
            return super().step(ctx, batch)
        if self.cfg.gamma > 0:
            self.rep.observe(ctx, batch)
        rows = self.anchors.next() if self.uses_anchors else []
        return anchor_step(ctx, batch, self.parts, rows, packed=self.fused, backward="each")

    def state_dict(self) -> dict[str, Any]:
        if not self.uses_anchors:
            return {}
        rep = self.rep.drift_state() if self.cfg.gamma > 0 else {}
        return {"y_ref": self.anchors.y_ref, **rep, **self.saft.attack_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.anchors.y_ref = state["y_ref"]
        if self.cfg.gamma > 0:
            self.rep.load_drift_state(state)
        self.saft.load_attack_state(state)
