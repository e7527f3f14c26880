"""SBR: Safety Bottleneck Regularization (anchor the unembedding input on harmful prompts).

Lu, Sha, Wang, Sun, Zhou, Dai, Xiao, "Safety Anchor: Defending Harmful Fine-tuning via Geometric
Bottlenecks", ICML 2026, https://arxiv.org/abs/2605.05995.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from safeft.config import DefenseConfig
from safeft.context import RunContext
from safeft.data.chat import Rendered, last_prompt_index
from safeft.methods.anchors import AnchorSet, Outputs, Part, Request, Segment, anchor_step, packs, require, terms_alone
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import register
from safeft.packing import forward_at

log = logging.getLogger(__name__)


@dataclass
class SBRConfig(DefenseConfig):
    name: str = "sbr"
    lam: float = 50.0  # λ, weight of the anchor MSE; 0 = plain SFT
    n_anchors: int = 8  # N harmful prompts anchored (the first N of the aux set); the paper's headline is 1
    anchor_batch: int | None = None  # anchors per micro-batch; None = all N every step
    # run the anchors inside the task forward (safeft.packing) when the model passes the setup check;
    # false = a separate anchor forward as in the released code. Same objective either way [ours].
    fuse: bool = True

    def __post_init__(self) -> None:
        require(self, "lam", self.lam >= 0, ">= 0")
        require(self, "n_anchors", self.n_anchors >= 1, ">= 1")
        require(self, "anchor_batch", self.anchor_batch is None or self.anchor_batch >= 1, ">= 1 or null")


def final_states(ctx: RunContext, model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, d) fp32 unembedding input at each row's last real token, for left or right padding.

    ``model`` is the module to run (``ctx.model``, or the reference from ``ctx.reference()``); the forward
    is counted through ``ctx.forward``.
    """
    none = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    # the unembedding runs at no position (SBR reads its input, not the logits); forward_at checks that every
    # position reached it, e.g. not a model that only unembeds the last position
    h = forward_at(ctx, batch, none, none, model=model)[1]
    idx = last_prompt_index(batch)
    return h[torch.arange(h.shape[0], device=h.device), idx].float()


@register
class SBR(Defense, Part):
    r"""Pin the final hidden state of harmful prompts, where the reply starts, to the aligned model's.

    Paper: Lu et al., "Safety Anchor: Defending Harmful Fine-tuning via Geometric Bottlenecks", ICML 2026,
    arXiv 2605.05995 (official code soyoaaa/SBR, ``HFT_SBR.py``).

    Objective, per micro-batch::

        L(θ) = CE(θ; b_task) + λ · 1/(N'·d) · Σ_n ‖h_θ(p_n) − h_ref(p_n)‖²

    where ``h(p)`` is the input of the unembedding (post final norm) at the last prompt token of anchor
    prompt ``p`` rendered with the shared chat template and its generation prompt (exactly where the
    deployed model starts its reply), ``h_ref`` is the same state of the frozen aligned reference
    (``ctx.reference()``: adapter disabled under LoRA), computed once in ``setup`` and cached in fp32, and
    the mean runs over the N' anchors used this step and the d hidden units (``F.mse_loss``, as the code;
    the paper may reduce differently, so λ is only comparable with the code's).

    Hyperparameters:
      * ``lam`` (λ) = 50, the released value; useful range 1-100. 0 returns no term and runs no anchor
        forward, so λ = 0 is plain SFT exactly, at SFT's cost.
      * ``n_anchors`` (N) = 8, the released script; N = 1 is the paper's headline ("a single safety anchor");
        range 1-32. If the aux set holds fewer prompts, all of them are used, with a warning [inferred].
      * ``anchor_batch`` = None: all N anchors every micro-batch, as the code. An integer k < N cycles
        through the anchors k at a time through a checkpointed stream [inferred: for large N only].
      * ``fuse`` = true [ours]: the anchors ride in the task forward (``safeft.packing``) instead of a
        forward of their own. Same objective; false runs the released code's separate anchor forward.
      Each is checked in ``SBRConfig`` (λ >= 0, N >= 1, ``anchor_batch`` >= 1 or null).

    Data: the aux set ``harmful_prompts`` (prompts only, no responses or labels); the first N are anchors.

    Cost: one forward/backward per micro-batch, the task batch with the anchors packed in: they fill its
    padding, widen it only as needed, and read the chat template's system prompt and user header from a
    task row instead of recomputing it (anchors add only their own tokens: 148 of 348 for the 8 default
    anchors on SmolLM2, ~+12 % positions on batch-8 finance rows, 1.08x SFT's step time on 2 CPU cores).
    The term reads the unembedding's input at each anchor's last prompt position and nothing after it: an
    anchor row is its prompt alone, ending at the generation prompt, so there is nothing to cut; it reads no
    logits, so the unembedding (~1/5 of a pass per position on a 49k vocabulary) skips the anchor positions
    (``packing.forward_at``; the task's own CE is unembedded at every position, as in SFT). Logged as
    ``passes/forward = 1``, ``passes/backward = 1`` and ``positions`` per step. Setup: one reference forward
    for ``h_ref`` plus the packing check (three reference forwards on the first task rows). With ``fuse``
    false, or where the check fails: a separate forward over the N anchors (``passes/forward = 2``), which
    on a small model costs far more than its tokens (1.53x SFT measured: every pass pays the same per-layer
    overhead).

    Pitfalls handled:
      * The hidden state is taken with a pre-hook on ``get_output_embeddings()`` (the ``lm_head`` input),
        not from ``hidden_states[-1]``, so it is post-norm on every architecture; a model without output
        embeddings, or one that does not unembed every position, raises.
      * The last prompt token is found from the attention mask (``last_prompt_index``), right for left
        and right padding (the code assumed right padding); anchors are right-padded like training rows, so
        position ids are the plain ``0..n-1`` a prompt gets at generation time.
      * Anchors are rendered by the shared renderer with the run's system prompt, so the anchored position
        is the one the deployed model answers from (the code used Llama-3.1's template directly).
      * ``h_ref`` comes from the reference before any update, in fp32; the MSE is taken in fp32 whatever
        the autocast precision.
      * Packed anchors must see exactly what they see alone. ``safeft.packing`` builds a 4-D mask and
        position ids for that, and setup checks the result on the reference against plain passes; a model
        whose attention ignores the mask (or takes no custom mask) keeps the separate forward, with a
        warning. In bf16 the packed and the plain pass differ by rounding (~1 % relative on the final
        state on SmolLM2, as much as batching the anchors differently does), so the logged penalty starts
        near 0.02 at λ = 50 instead of exactly 0; in fp32 they agree to ~1e-6.

    Code: SBR is its own anchor-family part (``methods.anchors``): its segments are the anchor prompts with
    the unembedding input captured, its term the MSE at their last positions. ``anchor_step`` packs them into
    the task forward or runs them in a forward of their own and back-propagates the sum once
    (``backward="once"``, as the released code).
    """

    stage = "finetune"
    needs = ("reference", "harmful_prompts")
    Config = SBRConfig

    def __init__(self, cfg: SBRConfig) -> None:
        super().__init__(cfg)
        self.cfg: SBRConfig = cfg
        self.h_ref: torch.Tensor | None = None  # (N, d) fp32
        self.anchors: AnchorSet | None = None  # built in setup, once the number of prompts is known
        self.fused = False

    @property
    def parts(self) -> list[Part]:
        """The anchor-family parts this run trains with: itself (none at λ = 0: plain SFT)."""
        return [self] if self.cfg.lam > 0 else []

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.lam == 0:
            return  # no anchors, no reference forward: λ = 0 is SFT, at SFT's cost
        n = min(self.cfg.n_anchors, len(ctx.aux_data("harmful_prompts")))
        k = self.cfg.anchor_batch
        # all N anchors every step, as the code; a smaller anchor_batch cycles through them in a named stream.
        # Prompts only (no answers): a row then ends at the generation prompt, after which the reply starts.
        self.anchors = AnchorSet(self.cfg.n_anchors, 0, None if k is None or k >= n else k, stream="sbr_anchors")
        rows = self.anchors.build(ctx)
        with ctx.reference() as ref:
            self.h_ref = final_states(ctx, ref, ctx.batch(rows, "right")).detach()
        self.fused = packs(ctx, self.cfg.fuse, self.parts, rows, "sbr")

    def segments(self, ctx: RunContext, batch: Batch, rows: list[Rendered]) -> Request:
        """The anchor prompts, with the unembedding input captured; their reference states as data."""
        if self.h_ref is None:
            raise RuntimeError("SBR runs its anchors before setup")
        ref = self.h_ref[torch.tensor([int(r.id) for r in rows], device=self.h_ref.device)]
        return Request([Segment.of(r) for r in rows], final=True, data=ref)

    def terms(self, ctx: RunContext, out: Outputs) -> dict[str, torch.Tensor]:
        h = out.take_last(out.final).float()
        return {"sbr": self.cfg.lam * F.mse_loss(h, out.request.data)}

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.parts:
            return super().step(ctx, batch)
        return anchor_step(ctx, batch, self.parts, self.anchors.next(), packed=self.fused, backward="once")

    def penalty(self, ctx: RunContext, batch: Batch) -> dict[str, torch.Tensor]:
        """The anchor term from the anchors' own forward (the separate-pass step adds it to the task CE)."""
        if not self.parts:
            return {}
        if self.anchors is None:
            raise RuntimeError("SBR.penalty called before setup")
        return terms_alone(ctx, self, batch, self.anchors.next())
