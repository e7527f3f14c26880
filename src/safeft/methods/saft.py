"""SAFT: safety-anchored fine-tuning with a PGD inner loop that maximises the KL to the aligned reference.

Paper: "Safety-Anchored Fine-Tuning: Diagnosing and Preventing Safety Collapse in Large Language Models via
Adversarial Alignment Anchoring", AI4GOOD Workshop 2026, https://openreview.net/forum?id=DV4a7kg06D.
Only the abstract is public (no code, no full text), so this file is the reference implementation. The
abstract fixes: a PGD inner loop, the KL divergence to a frozen aligned reference as the adversarial
objective, LoRA, and a weight λ trading safety for utility. Everything else is marked [inferred] below
and in ``SAFTConfig``.

Objective (per micro-batch; x^a anchor prompts, y_ref the reference's own greedy answers to them)::

    KL(θ, δ; x, y) = 1/|R| Σ_{t∈R} KL( π_ref(·| x, y_<t) ‖ π_θ(·| emb(x)+δ, y_<t) )   R = response positions
    δ*   = PGD_K( argmax_{‖δ_t‖₂ ≤ ε‖emb(x_t)‖₂}  KL(θ, δ; x^a, y_ref) )                    (θ frozen, no .grad)
    L(θ) = CE(θ; b_task) + λ · KL(θ, δ*; x^a, y_ref)

Hyperparameters (``defense.*``): ``lam`` λ = 0.5 (sweep 0.1-1.0; 0 = exactly SFT), ``pgd_steps`` K = 3
(1-5; 0 = no attack, plain KL anchoring), ``eps`` ε = 0.05 (relative per-token radius, 0.01-0.2),
``pgd_alpha`` = ε/2 (ε if K = 1), ``n_anchors`` = 64 (64-512), ``anchor_batch`` = 2 (spec: = task batch; see config),
``ref_max_new_tokens`` = 16 (16-64), ``kl_topk`` = 64 (0 = full vocabulary), ``kl_on`` = anchor
(anchor | task | both), ``random_init`` = true, ``fuse`` = true ([ours]: the outer pass rides in the
task forward; false = a separate adversarial pass, same objective), ``pgd_mode`` = exact (exact | free;
free = the amortised PGD below, [ours], anchor KL only).

Data: harmful prompts without responses (aux ``harmful_prompts``); y_ref comes from the reference itself,
so no human labels and no harmful text are needed. Reference: the adapter-disabled model under LoRA (0
extra bytes), a frozen copy under full fine-tuning.

Cost per step, in F+B of one task micro-batch: 1 (task) + (K + 1)·r (K PGD passes whose backward reaches
only δ, plus the adversarial outer pass), r = anchor tokens / task tokens. With ``fuse`` (the default) the
outer pass's anchor rows ride in the task forward as rows of embeddings emb + δ* (``safeft.packing``;
they cannot share the host's template prefix, δ* moves it), so a step runs K + 1 forwards and K + 1
backwards: 4 and 4 at K = 3 (5 and 5 unfused). ``kl_on=task`` adds one reference forward on the task
batch; ``both`` does the anchor and the task part; neither is packed. Setup: one greedy generation of
``n_anchors`` answers, one reference forward over them, and the packing check (three reference forwards;
a model that fails it keeps the separate pass, with a warning).

What runs is only what the KL reads (same objective; ``tests/unit/test_perf_equivalence.py`` checks loss,
gradients and δ* against full passes): a KL row stops after its last response position whose logits are
read (its final token is only ever a target: one position less per row, in every PGD pass and in the
outer pass), and the unembedding (d x vocabulary, ~1/5 of a pass on SmolLM2's 49k vocabulary) runs only
at the response positions (16 of ~60 per anchor row at the default ``ref_max_new_tokens``), in PGD, in
the outer pass and in the reference's forwards. The task's own CE is unembedded at every position, as in SFT.

Amortised PGD, ``pgd_mode=free`` [ours, off by default; after "Adversarial Training for Free!", Shafahi et
al., NeurIPS 2019]: δ is carried per anchor row across steps, in the defense's checkpointed state (~6.6 MB
at 64 anchors on SmolLM2-135M, so a resumed run continues with the same δ). Each use of a row measures the
KL at its carried δ in the outer pass and takes ONE normalised ascent step, projected per token, from the
gradient that the step's own backward leaves on δ (λ · ∂KL/∂δ, the same direction); there is no PGD pass.
A step is 1 forward + 1 backward packed (2 + 2 unfused), positions ≈ the outer pass alone. What changes
against exact PGD: δ is stale (it was fitted to θ at the row's previous uses, one step behind the current
use's gradient); each use adds one ascent step instead of K fresh ones from a random start, so the attack
builds up over a row's uses (a row recurs every n_anchors / anchor_batch steps: 32 at the defaults); the
ascent gradient comes from the training pass (dropout on), not from an eval-mode pass. On a fixed model the
KL at the carried δ rises use after use, to the order of exact PGD's K = 3 attack within a few uses
(``tests/unit/test_saft_free.py``); its effect on ASR and utility against exact PGD is to be measured on
the embedded model (issue 19).

[inferred] design choices, each a knob or stated here:
* Perturbation site: the input embeddings of the anchor's *prompt* tokens (chat-template tokens
  included); δ is exactly 0 on response and pad positions, so y_ref is scored as the reference produced it.
* Radius and step are relative to each token's embedding norm (ε‖emb(x_t)‖, α‖emb(x_t)‖), so one ε means
  the same on every model; the ascent step is the gradient normalised per token, then projected per token.
* δ₀ ~ 0.5 · Uniform(ε-ball) when ``random_init``: at step 0 π_θ = π_ref, the KL sits at its minimum and
  its gradient is exactly 0, so a PGD started at 0 would never move.
* PGD runs in eval mode (LoRA dropout off) and in fp32 for δ; the outer pass is a normal training forward.
* KL direction KL(π_ref ‖ π_θ) (forward, mass-covering: penalises π_θ dropping the refusal tokens), in fp32
  from log-softmax. ``kl_topk`` > 0 caches the reference's top-k log-probs plus one tail bucket (the rest
  of the mass) per position; π_θ is coarse-grained onto the same k+1 bins, which gives a lower bound of
  the full KL (data-processing inequality) that is exact once π_ref's tail mass is 0.
* Reference log-probs of the anchors are computed once in setup on CLEAN inputs (x and y_ref are fixed).
* The anchors are the first ``n_anchors`` harmful prompts (fewer if fewer are given); y_ref is greedy,
  stored in the checkpoint so a resumed run anchors on exactly the same text.
* ``kl_on=both`` averages the anchor and the task KL, so λ keeps its scale. With ``kl_on=task`` the target
  is the reference on the clean task batch, computed on the fly (TRADES-style).

Code: each KL is an anchor-family part (``methods.anchors``, ``AdversarialKL``): its segments are the rows
under attack (PGD runs when they are asked for), its term the KL on their response positions. ``anchor_step``
runs them packed into the task forward or each in its own pass (``backward="each"``: one backward per pass);
free PGD's ascent step runs in the part's ``after_backward``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from safeft.config import DefenseConfig
from safeft.context import RunContext
from safeft.data.chat import IGNORE, Rendered
from safeft.hooks import eval_mode
from safeft.methods.anchors import (
    AnchorSet,
    Outputs,
    Part,
    Request,
    Segment,
    anchor_step,
    check_anchor_fields,
    packs,
    prompt_mask,
    require,
)
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import register
from safeft.packing import forward_at, label_positions

log = logging.getLogger(__name__)

KL_ON = ("anchor", "task", "both")
PGD_MODES = ("exact", "free")


@dataclass
class SAFTConfig(DefenseConfig):
    name: str = "saft"
    lam: float = 0.5  # λ, weight of the adversarial KL [inferred default; sweep 0.1, 0.5, 1.0]; 0 = SFT
    pgd_steps: int = 3  # K PGD ascent steps [inferred]; 0 = no attack (KL at δ₀)
    eps: float = 0.05  # PGD radius, relative per-token L2: ‖δ_t‖ <= eps·‖emb(x_t)‖ [inferred]
    pgd_alpha: float | None = None  # relative step size; None = eps/2, or eps when K = 1 [inferred]
    n_anchors: int = 64  # anchor harmful prompts, the first n of aux harmful_prompts [inferred]
    # anchor rows per step [inferred; ours]. The spec suggests the task batch size, which at K = 3 costs
    # ~6x SFT on a 135M model (anchor rows are as long as task rows); 2 keeps saft+repanchor near 2x.
    anchor_batch: int = 2
    ref_max_new_tokens: int = 16  # y_ref length [inferred; ours: the refusal onset, where safety is decided]
    kl_topk: int = 64  # cache top-k reference log-probs + a tail bucket; 0 = full vocabulary [inferred]
    kl_on: str = "anchor"  # anchor | task | both: where the KL is measured [inferred]
    random_init: bool = True  # δ₀ ~ 0.5·Uniform(ε-ball), else δ₀ = 0 [inferred]
    # the outer (adversarial) anchor pass rides in the task forward (safeft.packing) when the setup check
    # passes, instead of a second small pass; same objective [ours]. PGD's K passes stay separate (they
    # need θ's gradient w.r.t. δ only). false = separate passes. kl_on=task|both always run separately.
    fuse: bool = True
    # exact: K fresh PGD steps per use of an anchor row (the spec). free [ours]: δ is carried per anchor row
    # across steps and takes one ascent step per use from the step's own backward (see the module doc)
    pgd_mode: str = "exact"

    def __post_init__(self) -> None:
        require(self, "kl_on", self.kl_on in KL_ON, f"one of {', '.join(KL_ON)}")
        require(self, "pgd_mode", self.pgd_mode in PGD_MODES, f"one of {', '.join(PGD_MODES)}")
        # free PGD carries δ per anchor row; the task rows are different rows every step
        free_ok = self.pgd_mode == "exact" or self.kl_on == "anchor"
        require(self, "pgd_mode", free_ok, f"exact when kl_on={self.kl_on} (free carries δ per anchor row)")
        for key in ("lam", "eps", "pgd_steps", "kl_topk"):
            require(self, key, getattr(self, key) >= 0, ">= 0")
        require(self, "pgd_alpha", self.pgd_alpha is None or self.pgd_alpha > 0, "> 0 (or null for the default)")
        check_anchor_fields(self, min_new_tokens=0 if self.kl_on == "task" else 1)

    @property
    def alpha(self) -> float:
        if self.pgd_alpha is not None:
            return self.pgd_alpha
        return self.eps if self.pgd_steps == 1 else self.eps / 2


# ----------------------------------------------------------------------------- KL to the reference


@dataclass
class KLTarget:
    """Reference next-token log-probs at N response positions, fp32.

    ``index`` None: ``logp`` is (N, V), the full distribution. Otherwise ``index`` (N, k) holds the top-k
    token ids and ``logp`` (N, k+1) their log-probs followed by the log of the remaining (tail) mass.
    """

    logp: torch.Tensor
    index: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[KLTarget]) -> KLTarget:
        index = None if parts[0].index is None else torch.cat([p.index for p in parts])
        return KLTarget(torch.cat([p.logp for p in parts]), index)


def _tail(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # log of the mass outside `index`, exact (no 1 - Σp cancellation)
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)


def reference_target(logits: torch.Tensor, topk: int) -> KLTarget:
    """Build a ``KLTarget`` from reference logits (N, V) at response positions."""
    logp = logits.float().log_softmax(-1)
    if topk <= 0 or topk >= logp.shape[-1]:
        return KLTarget(logp)
    top, index = logp.topk(topk, dim=-1)
    return KLTarget(torch.cat([top, _tail(logp, index)], dim=-1), index)


def kl_to_reference(target: KLTarget, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(π_ref ‖ π_θ), fp32; ``logits`` (N, V) are π_θ's at the same positions."""
    logq = logits.float().log_softmax(-1)
    if target.index is not None:
        logq = torch.cat([logq.gather(-1, target.index), _tail(logq, target.index)], dim=-1)
    p = target.logp.exp()
    # bins where π_ref has no mass contribute 0 (their log-prob may be -inf)
    terms = p * torch.where(p > 0, target.logp - logq, torch.zeros_like(logq))
    return terms.sum(-1).mean()


def reference_targets(ctx: RunContext, rows: list[Rendered], topk: int, batch_size: int) -> list[KLTarget]:
    """One ``KLTarget`` per row (its response positions), from the reference on the clean rows."""
    out: list[KLTarget] = []
    with ctx.reference() as ref, eval_mode(ref):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = ctx.batch(chunk)
            at, cols, _ = label_positions(batch["labels"])
            logits = forward_at(ctx, batch, at, cols, model=ref)[0]  # row-major: row by row
            per_row = logits.split(torch.bincount(at, minlength=len(chunk)).tolist())
            out += [reference_target(x, topk) for x in per_row]
    return out


# ----------------------------------------------------------------------------- PGD


def embed(ctx: RunContext, input_ids: torch.Tensor) -> torch.Tensor:
    return ctx.unwrapped.get_input_embeddings()(input_ids)


def adversarial_logits(ctx: RunContext, batch: Batch, emb: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """π_θ logits (N, V) at the response positions (row-major), for inputs emb + δ.

    Only what the KL reads runs: the columns up to the last response position whose logits it reads (a row's
    final token is only ever a target; under the causal mask nothing read depends on it), and the
    unembedding at the response positions only.
    """
    rows, cols, _ = label_positions(batch["labels"])
    width = int(cols.max()) + 1 if len(cols) else batch["labels"].shape[1]
    embeds = (emb.float() + delta)[:, :width].to(emb.dtype)
    inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"][:, :width]}
    return forward_at(ctx, inputs, rows, cols)[0]


def project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-token L2 projection of δ (B, T, d) onto ‖δ_t‖ <= radius_t (B, T)."""
    norm = delta.norm(dim=-1, keepdim=True)
    r = radius.unsqueeze(-1)
    return delta * torch.where(norm > r, r / norm.clamp_min(1e-12), torch.ones_like(norm))


def random_start(radius: torch.Tensor, dim: int) -> torch.Tensor:
    """δ₀ (..., dim) ~ 0.5 · Uniform(ball of radius_t) per token (``radius`` (...,)), fp32."""
    direction = torch.randn(*radius.shape, dim, device=radius.device)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = torch.rand(radius.shape, device=radius.device).pow(1.0 / dim)  # uniform in the ball
    return 0.5 * (radius * u).unsqueeze(-1) * direction


def ascend(delta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """One PGD step: δ + step_t · g_t/‖g_t‖ per token, projected onto ‖δ_t‖ <= radius_t (detached)."""
    grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return project(delta.detach() + step.unsqueeze(-1) * grad, radius)


def pgd(ctx: RunContext, batch: Batch, target: KLTarget, cfg: SAFTConfig) -> torch.Tensor:
    """δ* (B, T, d), fp32, detached: K normalised ascent steps on the KL, projected per token.

    Gradients come from ``ctx.grad`` (autograd.grad w.r.t. δ only): no parameter's ``.grad`` is touched.
    """
    with torch.no_grad():
        emb = embed(ctx, batch["input_ids"]).float()
    mask = prompt_mask(batch).float()
    scale = emb.norm(dim=-1) * mask  # ‖emb(x_t)‖ on prompt tokens, 0 elsewhere
    radius = cfg.eps * scale
    delta = random_start(radius, emb.shape[-1]) if cfg.random_init else torch.zeros_like(emb)
    if cfg.pgd_steps == 0 or cfg.eps == 0:
        return delta
    with eval_mode(ctx.model):
        for _ in range(cfg.pgd_steps):
            delta.requires_grad_(True)
            kl = kl_to_reference(target, adversarial_logits(ctx, batch, emb, delta))
            (grad,) = ctx.grad(kl, [delta])
            delta = ascend(delta, grad * mask.unsqueeze(-1), cfg.alpha * scale, radius)
    return delta.detach()


# ----------------------------------------------------------------------------- the anchor-family part


class AdversarialKL(Part):
    """weight · KL(π_ref ‖ π_θ) at δ*, on the anchor rows (``on="anchor"``) or on the task batch (``"task"``).

    Its segments are the rows as embeddings emb + δ* (PGD runs when they are asked for), each cut after the
    last position whose logits the KL reads; its term is the KL on their response positions. On the task
    rows it cannot ride in the task forward (they are the host). With ``pgd_mode=free`` δ is this part's
    state: one tensor per anchor row, carried across steps (``carried`` / ``after_backward``).
    """

    own_embeddings = True

    def __init__(self, cfg: SAFTConfig, on: str, split: int) -> None:
        self.cfg, self.on, self.split = cfg, on, split  # split: how many KLs share λ (kl_on=both: 2)
        self.packable = on == "anchor"
        self.targets: list[KLTarget] = []  # per anchor row, cached in prepare (on="anchor")
        # free PGD: anchor row id -> its δ over the row's prompt tokens (k, d) fp32, checkpointed by the defense
        self.delta: dict[int, torch.Tensor] = {}
        self._live: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # this step's (row id, δ leaf, ‖emb‖)

    def prepare(self, ctx: RunContext, rows: list[Rendered]) -> None:
        """Cache the reference's log-probs on the anchors' response positions (once)."""
        # setup is a one-off no-grad pass: batch it wider than the per-step anchor batch
        self.targets = reference_targets(ctx, rows, self.cfg.kl_topk, max(self.cfg.anchor_batch, 16))
        n_pos = sum(t.logp.shape[0] for t in self.targets)
        log.info("saft: %d anchors, %d response positions cached (kl_topk=%d)", len(rows), n_pos, self.cfg.kl_topk)

    def segments(self, ctx: RunContext, batch: Batch, rows: list[Rendered]) -> Request:
        if self.on == "anchor":
            rows_batch = ctx.batch(rows)
            target = KLTarget.cat([self.targets[int(r.id)] for r in rows])
        else:  # TRADES-style: the reference on the clean task batch, computed on the fly
            at, cols, _ = label_positions(batch["labels"])
            with ctx.reference() as ref, eval_mode(ref):
                logits = forward_at(ctx, batch, at, cols, model=ref)[0]
            target = reference_target(logits, self.cfg.kl_topk)
            rows_batch = batch
        if self.cfg.pgd_mode == "free":
            delta = self.carried(ctx, rows, rows_batch)
        else:
            delta = pgd(ctx, rows_batch, target, self.cfg)
        emb = embed(ctx, rows_batch["input_ids"])
        adv = (emb.float() + delta).to(emb.dtype)
        ids = rows_batch["input_ids"]
        # the positions whose logits the KL reads; nothing after the last of them is needed (causal mask)
        positions = [torch.nonzero(y[1:] != IGNORE).squeeze(1) for y in rows_batch["labels"]]
        lengths = rows_batch["attention_mask"].sum(1).tolist()
        ends = [int(t[-1]) + 1 if len(t) else n for t, n in zip(positions, lengths, strict=True)]
        segs = [Segment(ids[i, :n], adv[i, :n]) for i, n in enumerate(ends)]
        return Request(segs, logits=positions, data=target)

    def terms(self, ctx: RunContext, out: Outputs) -> dict[str, torch.Tensor]:
        return {"kl": self.cfg.lam / self.split * kl_to_reference(out.request.data, out.logits)}

    # ------------------------------------------------------------------ free PGD [ours]

    def carried(self, ctx: RunContext, rows: list[Rendered], batch: Batch) -> torch.Tensor:
        """δ (B, T, d) for this micro-batch's anchor rows from the carried state, each row's own δ a leaf that
        the step's backward gives a gradient (``after_backward``). A row's first use starts it as exact PGD
        starts (δ₀); the ball is re-measured every use (full fine-tuning moves the embeddings)."""
        with torch.no_grad():
            emb = embed(ctx, batch["input_ids"]).float()
        mask = prompt_mask(batch)
        scale = emb.norm(dim=-1) * mask  # ‖emb(x_t)‖ on prompt tokens, 0 elsewhere
        delta = torch.zeros_like(emb)
        self._live = []
        for i, row in enumerate(rows):
            k = int(mask[i].sum())
            if not bool(mask[i, :k].all()):
                raise ValueError(f"anchor row {row.id}: its prompt is not a prefix of the row (free PGD needs one)")
            s = scale[i, :k]
            start = self.delta.get(int(row.id))
            if start is None and self.cfg.random_init:
                start = random_start(self.cfg.eps * s, emb.shape[-1])
            elif start is None:
                start = torch.zeros_like(emb[i, :k])
            leaf = project(start.to(emb.device), self.cfg.eps * s).requires_grad_(True)
            delta[i, :k] = leaf  # a fresh tensor: the write is recorded, the backward reaches the leaf
            self._live.append((int(row.id), leaf, s))
        return delta

    def after_backward(self, ctx: RunContext) -> None:
        """Free PGD: each row used this step takes one normalised ascent step along the gradient its δ received
        from the step's backward (λ/split · ∂KL/∂δ, a positive multiple of the KL's), projected per token."""
        for rid, leaf, s in self._live:
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            self.delta[rid] = ascend(leaf, grad, self.cfg.alpha * s, self.cfg.eps * s)
        self._live = []


# ----------------------------------------------------------------------------- the defense


@register
class SAFT(Defense):
    """SAFT: task CE + λ · KL(π_ref ‖ π_θ) on anchor prompts under a PGD embedding attack (see module doc)."""

    stage = "finetune"
    needs = ("reference", "harmful_prompts")
    Config = SAFTConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "fsdp": (
            "embeds the anchors with the input embedding outside the model's forward to add the PGD perturbation,"
            " and FSDP keeps that weight sharded there"
        ),
        "deepspeed": (
            "runs more than one backward per micro-batch, and accelerate's DeepSpeed engine steps the optimizer "
            "inside the backward that ends an accumulation; its PGD takes auxiliary gradients with "
            "torch.autograd.grad through the model, outside the engine's backward hooks"
        ),
    }

    def __init__(self, cfg: SAFTConfig) -> None:
        super().__init__(cfg)
        self.cfg: SAFTConfig = cfg
        self.anchors = AnchorSet(cfg.n_anchors, cfg.ref_max_new_tokens, cfg.anchor_batch)
        where = ("anchor", "task") if cfg.kl_on == "both" else (cfg.kl_on,)
        self.kl = [AdversarialKL(cfg, on, len(where)) for on in where]
        self.fused = False  # the outer anchor pass packed into the task forward (set in setup)

    @property
    def parts(self) -> list[Part]:
        """The anchor-family parts this run trains with (none at λ = 0: exactly SFT)."""
        return list(self.kl) if self.cfg.lam > 0 else []

    @property
    def uses_anchors(self) -> bool:
        return self.cfg.lam > 0 and self.cfg.kl_on != "task"

    @property
    def targets(self) -> list[KLTarget]:
        """The reference's cached log-probs per anchor row."""
        return self.kl[0].targets

    def setup(self, ctx: RunContext) -> None:
        if self.uses_anchors:  # lam == 0 touches nothing: exactly SFT
            rows = self.anchors.build(ctx)
            self.prepare(ctx, rows)
            self.fused = packs(ctx, self.cfg.fuse, self.parts, rows, "saft")

    def prepare(self, ctx: RunContext, rows: list[Rendered]) -> None:
        """Cache the reference's log-probs on the anchors' response positions (once)."""
        for part in self.kl:
            if part.on == "anchor":
                part.prepare(ctx, rows)

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.parts:
            return super().step(ctx, batch)
        rows = self.anchors.next() if self.uses_anchors else []
        return anchor_step(ctx, batch, self.parts, rows, packed=self.fused, backward="each")

    def state_dict(self) -> dict[str, Any]:
        return {"y_ref": self.anchors.y_ref, **self.attack_state()} if self.uses_anchors else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors.y_ref = state.get("y_ref")
        self.load_attack_state(state)

    def attack_state(self) -> dict[str, Any]:
        """Free PGD's carried δ per anchor row, for an exact resume (nothing in exact mode: its checkpoints are
        unchanged). 64 anchors x ~45 prompt tokens x 576 dims is ~6.6 MB fp32 on SmolLM2-135M."""
        if self.cfg.pgd_mode != "free" or not self.uses_anchors:
            return {}
        return {"pgd_delta": {k: v.detach().cpu().clone() for k, v in self.kl[0].delta.items()}}

    def load_attack_state(self, state: dict[str, Any]) -> None:
        if "pgd_delta" in state:
            self.kl[0].delta = dict(state["pgd_delta"])
