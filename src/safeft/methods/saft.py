"""SAFT: safety-anchored fine-tuning with a PGD inner loop that maximises the KL to the aligned reference.

Paper: "Safety-Anchored Fine-Tuning: Diagnosing and Preventing Safety Collapse in Large Language Models via
Adversarial Alignment Anchoring", AI4GOOD Workshop 2026, https://openreview.net/forum?id=DV4a7kg06D.
Only the abstract is public (no code, no full text), so this file is the reference implementation. The
abstract fixes: a PGD inner loop, the KL divergence to a frozen aligned reference as the adversarial
objective, LoRA, and a weight λ trading safety for utility. Everything else is marked [inferred] below
and in ``SAFTConfig`` (spec: shared/design/algorithms.md §6).

Objective (per micro-batch; x^a anchor prompts, y_ref the reference's own greedy answers to them)::

    KL(θ, δ; x, y) = 1/|R| Σ_{t∈R} KL( π_ref(·| x, y_<t) ‖ π_θ(·| emb(x)+δ, y_<t) )   R = response positions
    δ*   = PGD_K( argmax_{‖δ_t‖₂ ≤ ε‖emb(x_t)‖₂}  KL(θ, δ; x^a, y_ref) )                    (θ frozen, no .grad)
    L(θ) = CE(θ; b_task) + λ · KL(θ, δ*; x^a, y_ref)

Hyperparameters (``defense.*``): ``lam`` λ = 0.5 (sweep 0.1-1.0; 0 = exactly SFT), ``pgd_steps`` K = 3
(1-5; 0 = no attack, plain KL anchoring), ``eps`` ε = 0.05 (relative per-token radius, 0.01-0.2),
``pgd_alpha`` = ε/2 (ε if K = 1), ``n_anchors`` = 64 (64-512), ``anchor_batch`` = 2 (spec: = task batch; see config),
``ref_max_new_tokens`` = 16 (16-64), ``kl_topk`` = 64 (0 = full vocabulary), ``kl_on`` = anchor
(anchor | task | both), ``random_init`` = true, ``fuse`` = true ([ours]: the outer pass rides in the
task forward; false = a separate adversarial pass, same objective).

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
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from safeft.config import ConfigError, DefenseConfig
from safeft.data.chat import IGNORE, Rendered
from safeft.data.types import Example
from safeft.hooks import capture, eval_mode
from safeft.methods.base import Batch, Defense, StepOutput, backward_terms
from safeft.methods.registry import METHODS
from safeft.packing import attention_format, pack, packing_works

if TYPE_CHECKING:
    from safeft.context import RunContext, Stream

log = logging.getLogger(__name__)

KL_ON = ("anchor", "task", "both")


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

    def __post_init__(self) -> None:
        check_saft(self)

    @property
    def alpha(self) -> float:
        if self.pgd_alpha is not None:
            return self.pgd_alpha
        return self.eps if self.pgd_steps == 1 else self.eps / 2


def check_saft(cfg: Any) -> None:
    where = f"defense ({cfg.name})"
    if cfg.kl_on not in KL_ON:
        raise ConfigError(f"{where}.kl_on must be one of {', '.join(KL_ON)}, not {cfg.kl_on!r}")
    for key in ("lam", "eps", "pgd_steps", "kl_topk"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.pgd_alpha is not None and cfg.pgd_alpha <= 0:
        raise ConfigError(f"{where}.pgd_alpha must be > 0 (or null for the default), got {cfg.pgd_alpha}")
    check_anchor_fields(cfg, min_new_tokens=0 if cfg.kl_on == "task" else 1)


def check_anchor_fields(cfg: Any, min_new_tokens: int) -> None:
    where = f"defense ({cfg.name})"
    if cfg.n_anchors < 1 or cfg.anchor_batch < 1:
        raise ConfigError(f"{where}: n_anchors and anchor_batch must be >= 1")
    if cfg.ref_max_new_tokens < min_new_tokens:
        raise ConfigError(
            f"{where}.ref_max_new_tokens must be >= {min_new_tokens}: the anchor KL is measured on y_ref's tokens"
        )


# ----------------------------------------------------------------------------- shared anchor helpers


def inputs_only(batch: Batch) -> Batch:
    """The batch without labels, so the model does not compute a loss nobody reads."""
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def prompt_mask(batch: Batch) -> torch.Tensor:
    """(B, T) bool: real prompt tokens (not pad, not response)."""
    return batch["attention_mask"].bool() & (batch["labels"] == IGNORE)


def response_mask(batch: Batch) -> torch.Tensor:
    """(B, T-1) bool: positions whose logits predict a response token (labels shifted by one)."""
    return batch["labels"][:, 1:] != IGNORE


class AnchorSet:
    """The anchor prompts with the reference's greedy answers, rendered once, served as a checkpointed stream.

    Rows get ids "0".."n-1" so per-row caches are plain list lookups (``int(row.id)``).
    """

    def __init__(self, n: int, max_new_tokens: int, batch_size: int) -> None:
        self.n, self.max_new_tokens, self.batch_size = n, max_new_tokens, batch_size
        self.y_ref: list[str] | None = None  # restored from a checkpoint, or generated in build
        self.rows: list[Rendered] = []
        self._stream: Stream | None = None

    def build(self, ctx: RunContext) -> list[Rendered]:
        from safeft.eval.generate import GenSettings, generate

        prompts = [ex.prompt for ex in ctx.aux_data("harmful_prompts")[: self.n]]
        if len(prompts) < self.n:
            log.info("anchors: %d harmful prompts given, fewer than n_anchors=%d; using all", len(prompts), self.n)
        if self.y_ref is None:
            if self.max_new_tokens > 0:
                settings = GenSettings(
                    max_new_tokens=self.max_new_tokens,
                    system_prompt=ctx.system_prompt,
                    precision=ctx.cfg.train.precision,
                )
                with ctx.reference() as ref:
                    self.y_ref = generate(ref, ctx.tokenizer, prompts, settings, desc="anchors: reference answers")
            else:
                self.y_ref = []
        if self.y_ref and len(self.y_ref) != len(prompts):
            raise RuntimeError(f"checkpoint holds {len(self.y_ref)} anchor answers for {len(prompts)} prompts")
        answers = self.y_ref or [None] * len(prompts)
        examples = [Example(str(i), p, y, "anchor") for i, (p, y) in enumerate(zip(prompts, answers, strict=True))]
        self.rows = ctx.render(examples)
        self._stream = ctx.stream("anchor", self.rows, self.batch_size)
        return self.rows

    def next(self) -> list[Rendered]:
        assert self._stream is not None, "AnchorSet.build(ctx) runs in setup"
        return self._stream.next()


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
            logits = ctx.forward(inputs_only(batch), model=ref).logits[:, :-1]
            resp = response_mask(batch)
            out += [reference_target(logits[i][resp[i]], topk) for i in range(len(chunk))]
    return out


# ----------------------------------------------------------------------------- PGD


def embed(ctx: RunContext, input_ids: torch.Tensor) -> torch.Tensor:
    return ctx.unwrapped.get_input_embeddings()(input_ids)


def adversarial_logits(ctx: RunContext, batch: Batch, emb: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """π_θ logits at the response positions, for inputs emb + δ."""
    embeds = (emb.float() + delta).to(emb.dtype)
    logits = ctx.forward({"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}).logits
    return logits[:, :-1][response_mask(batch)]


def response_positions(row: Rendered) -> torch.Tensor:
    """Positions of ``row`` whose logits predict one of its response tokens (labels shifted by one)."""
    return torch.nonzero(torch.tensor(row.labels[1:]) != IGNORE).squeeze(1)


def project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-token L2 projection of δ (B, T, d) onto ‖δ_t‖ <= radius_t (B, T)."""
    norm = delta.norm(dim=-1, keepdim=True)
    r = radius.unsqueeze(-1)
    return delta * torch.where(norm > r, r / norm.clamp_min(1e-12), torch.ones_like(norm))


def pgd(ctx: RunContext, batch: Batch, target: KLTarget, cfg: SAFTConfig) -> torch.Tensor:
    """δ* (B, T, d), fp32, detached: K normalised ascent steps on the KL, projected per token.

    Gradients come from ``ctx.grad`` (autograd.grad w.r.t. δ only): no parameter's ``.grad`` is touched.
    """
    with torch.no_grad():
        emb = embed(ctx, batch["input_ids"]).float()
    mask = prompt_mask(batch).float()
    scale = emb.norm(dim=-1) * mask  # ‖emb(x_t)‖ on prompt tokens, 0 elsewhere
    radius = cfg.eps * scale
    delta = torch.zeros_like(emb)
    if cfg.random_init:
        direction = torch.randn_like(emb)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u = torch.rand(emb.shape[:-1], device=emb.device).pow(1.0 / emb.shape[-1])  # uniform in the ball
        delta = 0.5 * (radius * u).unsqueeze(-1) * direction
    if cfg.pgd_steps == 0 or cfg.eps == 0:
        return delta
    step = (cfg.alpha * scale).unsqueeze(-1)
    with eval_mode(ctx.model):
        for _ in range(cfg.pgd_steps):
            delta.requires_grad_(True)
            kl = kl_to_reference(target, adversarial_logits(ctx, batch, emb, delta))
            (grad,) = ctx.grad(kl, [delta])
            grad = grad * mask.unsqueeze(-1)
            grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project(delta.detach() + step * grad, radius)
    return delta.detach()


# ----------------------------------------------------------------------------- one packed outer pass


def fused_step(ctx: RunContext, batch: Batch, rows: list[Rendered], saft: SAFT | None = None, rep=None) -> StepOutput:
    """Task CE + λ·KL at δ* (``saft``) + γ·R on the clean anchors (``rep``, a RepAnchor) from ONE forward.

    PGD runs first, in its own K passes. Then the anchor rows ride in the task batch (``safeft.packing``):
    under attack as rows of embeddings emb + δ* (they share nothing with their host: δ* moves the template
    tokens too), and clean for RepAnchor, reading the chat template's prefix from the host row. The terms
    and their gradient equal the separate passes' to float rounding; one backward instead of three.
    """
    model = ctx.unwrapped
    segments = [torch.tensor(r.input_ids) for r in rows]
    segs: list[torch.Tensor] = []
    embeds: list[torch.Tensor | None] = []
    share: list[bool] = []
    target = None
    if saft is not None:
        anchors = ctx.batch(rows)
        target = KLTarget.cat([saft.targets[int(r.id)] for r in rows])
        delta = pgd(ctx, anchors, target, saft.cfg)
        emb = embed(ctx, anchors["input_ids"])
        adv = (emb.float() + delta).to(emb.dtype)
        segs += segments
        embeds += [adv[i, : len(s)] for i, s in enumerate(segments)]
        share += [False] * len(rows)
    if rep is not None:
        layers, _ = rep.selection()
        segs += segments
        embeds += [None] * len(rows)
        share += [True] * len(rows)
    packed = pack(
        batch,
        segs,
        pad_id=ctx.tokenizer.pad_token_id,
        share=share,
        fmt=attention_format(model),
        embed=model.get_input_embeddings(),
        segment_embeds=embeds if saft is not None else None,
    )
    with capture(model, layers) if rep is not None else contextlib.nullcontext({}) as h:
        out = ctx.forward(packed.batch)
    terms = {"task": out.loss}
    if saft is not None:
        logits = torch.cat([packed.take(out.logits, i, response_positions(r)) for i, r in enumerate(rows)])
        terms["kl"] = saft.cfg.lam * kl_to_reference(target, logits)
    if rep is not None:
        first = len(rows) if saft is not None else 0  # the clean rows follow the attacked ones

        def take(x: torch.Tensor, i: int) -> torch.Tensor:  # every real token but the first (token_mask)
            return packed.take(x, first + i, torch.arange(1, len(rows[i].input_ids)))

        terms["rep"] = rep.cfg.gamma * rep.rep_loss(h, take, rows)
    return backward_terms(ctx, terms)


# ----------------------------------------------------------------------------- the defense


@METHODS.register("saft")
class SAFT(Defense):
    """SAFT: task CE + λ · KL(π_ref ‖ π_θ) on anchor prompts under a PGD embedding attack (see module doc)."""

    name = "saft"
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
        self.targets: list[KLTarget] = []
        self.fused = False  # the outer anchor pass packed into the task forward (set in setup)

    @property
    def uses_anchors(self) -> bool:
        return self.cfg.lam > 0 and self.cfg.kl_on != "task"

    def setup(self, ctx: RunContext) -> None:
        if self.uses_anchors:  # lam == 0 touches nothing: exactly SFT
            rows = self.anchors.build(ctx)
            self.prepare(ctx, rows)
            self.fused = self.can_fuse and packing_works(ctx, rows, share=False, who="saft")

    @property
    def can_fuse(self) -> bool:
        return self.cfg.fuse and self.cfg.kl_on == "anchor"

    def prepare(self, ctx: RunContext, rows: list[Rendered]) -> None:
        """Cache the reference's log-probs on the anchors' response positions (once)."""
        # setup is a one-off no-grad pass: batch it wider than the per-step anchor batch
        self.targets = reference_targets(ctx, rows, self.cfg.kl_topk, max(self.cfg.anchor_batch, 16))
        n_pos = sum(t.logp.shape[0] for t in self.targets)
        log.info("saft: %d anchors, %d response positions cached (kl_topk=%d)", len(rows), n_pos, self.cfg.kl_topk)

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if self.cfg.lam == 0:
            return super().step(ctx, batch)
        if self.fused:
            return fused_step(ctx, batch, self.anchors.next(), saft=self)
        task = ctx.forward(batch).loss
        ctx.backward(task)
        kl = self.kl_term(ctx, batch, self.anchors.next() if self.uses_anchors else None)
        terms = {"task": task.detach().float(), "kl": kl}
        return StepOutput(torch.stack(list(terms.values())).sum(), terms)

    def kl_term(self, ctx: RunContext, task_batch: Batch, anchor_rows: list[Rendered] | None) -> torch.Tensor:
        """λ·KL under PGD, back-propagated here (one backward per part); returns the weighted value, detached."""
        parts: list[tuple[Batch, KLTarget]] = []
        if self.cfg.kl_on in ("anchor", "both"):
            assert anchor_rows is not None
            parts.append((ctx.batch(anchor_rows), KLTarget.cat([self.targets[int(r.id)] for r in anchor_rows])))
        if self.cfg.kl_on in ("task", "both"):
            with ctx.reference() as ref, eval_mode(ref):
                logits = ctx.forward(inputs_only(task_batch), model=ref).logits
            parts.append((task_batch, reference_target(logits[:, :-1][response_mask(task_batch)], self.cfg.kl_topk)))
        weight = self.cfg.lam / len(parts)
        total = torch.zeros((), device=ctx.device)
        for batch, target in parts:
            delta = pgd(ctx, batch, target, self.cfg)
            kl = kl_to_reference(target, adversarial_logits(ctx, batch, embed(ctx, batch["input_ids"]), delta))
            ctx.backward(weight * kl)
            total = total + weight * kl.detach()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"y_ref": self.anchors.y_ref} if self.uses_anchors else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors.y_ref = state.get("y_ref")
