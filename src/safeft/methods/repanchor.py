"""RepAnchor: a CKA-drift-weighted representation MSE on the layers that drift most from the aligned model.

Paper: the RepAnchor half of "Safety-Anchored Fine-Tuning" (AI4GOOD Workshop 2026,
https://openreview.net/forum?id=DV4a7kg06D; abstract only, no code). The abstract fixes: an MSE penalty on
"the most vulnerable layers", weighted by CKA drift, and a weight γ trading safety for utility. The rest is
[inferred] and marked below and in ``RepAnchorConfig``.

Objective (per micro-batch)::

    drift_l = 1 - CKA_lin( H_l^θ(X_probe), H_l^ref(X_probe) )          every N_cka steps, eval mode, no grad
    S       = top-k layers by EMA(drift)   or the fixed window ``layers``
    w_l     = max(EMA(drift_l), floor) / Σ_{l'∈S} max(EMA(drift_l'), floor)                       (detached)
    R(θ)    = Σ_{l∈S} w_l · mean_{tokens, dims} ( (h_l^θ(x^a) - h_l^ref(x^a)) / s_l )²
    L(θ)    = CE(θ; b_task) + γ · R(θ)

h_l is the output of decoder block l (0-based index into the decoder stack, hooked through
``models.decoder_layers``), i.e. the residual stream; for the last block that is *before* the final norm.
s_l is the RMS of h_l^ref over the anchor set (cached), so every layer's term is scale-free.

Hyperparameters (``defense.*``): ``gamma`` γ = 0.1 (sweep 0.01-1.0; 0 = exactly SFT), ``top_k`` = 5
layers, ``layers`` = None (a fixed window instead, e.g. the abstract's 1-indexed 28-32 of a 32-layer model
is ``[27, 28, 29, 30, 31]``; re-derive per model), ``refresh_every`` N_cka = 50, ``ema`` = 0.9, ``n_probe`` =
64, ``n_anchors`` = 64, ``anchor_batch`` = 2, ``drift_floor`` = 1e-4, ``sample`` = mean (mean | last),
``ref_max_new_tokens`` = 16, ``fuse`` = true.

Data: harmful prompts without responses (aux ``harmful_prompts``) and the task prompts of the run.

Cost per step: 1 F+B (task) + r F+B (clean anchor pass), r = anchor tokens / task tokens. With ``fuse``
(the default, [ours]) the clean anchor rows ride in the task forward (``safeft.packing``), reading the chat
template's prefix from a task row, so a step is ONE wider forward/backward; ``fuse=false`` runs them in a
pass of their own (same objective). R reads the selected blocks' outputs at every token of a row but the
first, so a row is needed whole (nothing to cut after its last read position, unlike SAFT's KL rows); it
reads no logits, so the unembedding skips the anchor positions (``packing.forward_at``). Every
``refresh_every`` steps one forward of θ over the probe set (the reference's probe samples are cached; the
first refresh also computes them for the task half). Setup: one greedy generation over the anchors, one
reference forward over anchors and probes.

[inferred] design choices:
* Anchor rows = harmful prompt + the reference's greedy answer y_ref (the same rows SAFT uses, so
  ``saft+repanchor`` shares one anchor stream); ``ref_max_new_tokens=0`` anchors on prompts only. The MSE
  covers every real token of the row except the first (BOS / first template token: massive activations
  would dominate it; a known pitfall of activation-matching losses).
* The reference's hidden states of the anchors are cached once for every candidate layer (all layers in
  top-k mode): anchors x tokens x layers x d fp32, ~0.4 GB for SmolLM2-135M at 64 anchors x 100 tokens,
  fine at our sizes; a fixed window caches only its layers.
* Probe set (CKA): the first ``n_probe/2`` harmful prompts plus the first ``n_probe/2`` distinct task
  prompts seen in training batches before the first refresh (the loop hands a defense no task rows in
  setup). Samples are the mean over the prompt's real tokens except the first (``sample=mean``), or the
  last prompt token (``sample=last``); CKA is the fp64 feature-space linear CKA (``diagnose.cka``).
* Drift is EMA-smoothed (the EMA is on the drift, before selection, so S does not flip on noise), then
  floored at ``drift_floor`` and normalised over S. It is measured in setup too: at step 0 θ = θ₀, so every
  drift is ~0, and while no drift exceeds the floor, S is every candidate layer with uniform weights (no
  layer is more vulnerable than another before anything has moved). That step-0 measurement seeds the EMA
  (no bias correction): the normalisation cancels the resulting scale, only the floor comparison sees it.
  The EMA, the probe prompts and the last refresh step are in ``state_dict``, so a resumed run selects the
  same layers with the same weights.

Code: ``RepAnchor`` is its own anchor-family part (``methods.anchors``): its segments are the clean anchor
rows with the selected blocks captured, its term γ·R read off them; ``anchor_step`` packs them into the task
forward or runs them in a pass of their own (``backward="each"``). The drift refresh runs before either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from safeft import models
from safeft.config import DefenseConfig
from safeft.context import RunContext
from safeft.data.chat import IGNORE, Rendered, last_prompt_index
from safeft.data.types import Example
from safeft.diagnose.cka import linear_cka
from safeft.hooks import capture, eval_mode
from safeft.methods.anchors import (
    AnchorSet,
    Outputs,
    Part,
    Request,
    Segment,
    anchor_step,
    check_anchor_fields,
    forward_alone,
    inputs_only,
    packs,
    prompt_mask,
    require,
)
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import register

log = logging.getLogger(__name__)

SAMPLES = ("mean", "last")


@dataclass
class RepAnchorConfig(DefenseConfig):
    name: str = "repanchor"
    gamma: float = 0.1  # γ, weight of the representation MSE [inferred default; sweep 0.01, 0.1, 1.0]; 0 = SFT
    top_k: int = 5  # anchor the k layers with the largest drift [inferred]
    layers: list[int] | None = None  # fixed window of 0-based decoder indices instead of top-k
    refresh_every: int = 50  # N_cka: steps between drift measurements [inferred]
    ema: float = 0.9  # EMA factor of the drift across refreshes [inferred]
    n_probe: int = 64  # CKA probe prompts: half harmful, half task [inferred]
    n_anchors: int = 64  # anchor harmful prompts, the first n of aux harmful_prompts [inferred]
    # anchor rows per step [inferred; ours]. The spec suggests the task batch size, which at K = 3 costs
    # ~6x SFT on a 135M model (anchor rows are as long as task rows); 2 keeps saft+repanchor near 2x.
    anchor_batch: int = 2
    drift_floor: float = 1e-4  # drifts below this count as this, so weights never divide by 0 [inferred]
    sample: str = "mean"  # CKA sample per prompt: "mean" of real tokens except the first, or "last" [inferred]
    ref_max_new_tokens: int = 16  # y_ref length [inferred; ours: the refusal onset, where safety is decided]
    # the clean anchor rows ride in the task forward (safeft.packing) when the setup check passes, instead of
    # a second small pass; same objective [ours]. false = a separate anchor forward.
    fuse: bool = True

    def __post_init__(self) -> None:
        require(self, "sample", self.sample in SAMPLES, f"one of {', '.join(SAMPLES)}")
        require(self, "gamma", self.gamma >= 0, ">= 0")
        require(self, "drift_floor", self.drift_floor > 0, "> 0")
        require(self, "ema", 0 <= self.ema < 1, "in [0, 1)")
        require(self, "top_k", self.top_k >= 1, ">= 1")
        require(self, "refresh_every", self.refresh_every >= 1, ">= 1")
        require(self, "n_probe", self.n_probe >= 8, ">= 8")
        distinct = self.layers is None or (bool(self.layers) and len(set(self.layers)) == len(self.layers))
        require(self, "layers", distinct, "null or a non-empty list of distinct 0-based decoder indices")
        check_anchor_fields(self, min_new_tokens=0)


# ----------------------------------------------------------------------------- pure parts


def select_layers(
    drift: torch.Tensor, candidates: list[int], top_k: int | None, floor: float
) -> tuple[list[int], torch.Tensor]:
    """(S, w): the anchored layers (ascending) and their normalised weights, from per-candidate drifts.

    ``top_k`` None keeps every candidate (a fixed window). While no drift exceeds ``floor``, S is every
    candidate with uniform weights.
    """
    d = drift.double().clamp_min(floor)
    if top_k is None or top_k >= len(candidates) or bool((d <= floor).all()):
        keep = list(range(len(candidates)))
    else:
        keep = sorted(d.topk(top_k).indices.tolist())
    w = d[keep] / d[keep].sum()
    return [candidates[i] for i in keep], w


def token_mask(batch: Batch) -> torch.Tensor:
    """(B, T) bool: every real token except the first (BOS / first template token)."""
    mask = batch["attention_mask"].bool().clone()
    mask[:, 0] = False
    return mask


def pool(h: torch.Tensor, batch: Batch, sample: str) -> torch.Tensor:
    """One CKA sample per row (B, d) fp64 from block outputs h (B, T, d) of a right-padded prompt batch."""
    if sample == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_prompt_index(batch)].double()
    mask = token_mask(batch).unsqueeze(-1).double()
    return (h.double() * mask).sum(1) / mask.sum(1).clamp_min(1)


# ----------------------------------------------------------------------------- the defense


@register
class RepAnchor(Defense, Part):
    """RepAnchor: task CE + γ · CKA-drift-weighted MSE to the reference's hidden states (see module doc)."""

    stage = "finetune"
    needs = ("reference", "harmful_prompts")
    Config = RepAnchorConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "processes": (
            "collects its CKA probe prompts from the task micro-batches one process sees, so processes would "
            "measure different drift and anchor different layers"
        ),
        "deepspeed": (
            "runs more than one backward per micro-batch, and accelerate's DeepSpeed engine steps the optimizer "
            "inside the backward that ends an accumulation (without packing)"
        ),
    }

    def __init__(self, cfg: RepAnchorConfig) -> None:
        super().__init__(cfg)
        self.cfg: RepAnchorConfig = cfg
        self.anchors = AnchorSet(cfg.n_anchors, cfg.ref_max_new_tokens, cfg.anchor_batch)
        # no-grad passes over the anchor and probe sets (caching, drift refreshes) batch wider than a step
        self.setup_batch = max(cfg.anchor_batch, 16)
        # state carried across a resume
        self.drift_ema: list[float] | None = None
        self.last_refresh = 0
        self.probe_task: list[list[int]] = []
        # caches rebuilt in setup
        self.candidates: list[int] = []
        self.ref_hidden: list[torch.Tensor] = []  # per anchor row: (n_candidates, tokens, d) fp32
        self.scale = torch.ones(0)  # per candidate: RMS of h_ref over the anchor set
        self.probe_harm: list[Rendered] = []
        self.probe_ref: dict[int, torch.Tensor] = {}  # layer -> (n_probe rows, d) fp64 reference samples
        self.fused = False  # clean anchors packed into the task forward (set in setup)

    # ------------------------------------------------------------------ setup

    @property
    def parts(self) -> list[Part]:
        """The anchor-family parts this run trains with: itself (none at γ = 0: exactly SFT)."""
        return [self] if self.cfg.gamma > 0 else []

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.gamma > 0:  # gamma == 0 touches nothing: exactly SFT
            rows = self.anchors.build(ctx)
            self.prepare(ctx, rows)
            self.fused = packs(ctx, self.cfg.fuse, self.parts, rows, "repanchor")

    def prepare(self, ctx: RunContext, rows: list[Rendered]) -> None:
        """Cache the reference's anchor hidden states and probe samples; measure the step-0 drift."""
        n_blocks = len(models.decoder_layers(ctx.unwrapped))
        self.candidates = sorted(self.cfg.layers) if self.cfg.layers is not None else list(range(n_blocks))
        if self.candidates[0] < 0 or self.candidates[-1] >= n_blocks:
            raise ValueError(f"defense.layers={self.cfg.layers}: the model has {n_blocks} blocks (0-based indices)")
        self.ref_hidden = []
        with ctx.reference() as ref, eval_mode(ref):
            for start in range(0, len(rows), self.setup_batch):
                batch = ctx.batch(rows[start : start + self.setup_batch])
                with capture(ref, self.candidates) as h:
                    ctx.forward(inputs_only(batch), model=ref, logits_to_keep=1)
                mask = token_mask(batch)
                stacked = torch.stack([h[i] for i in self.candidates], dim=1).float()  # (B, L_c, T, d)
                self.ref_hidden += [stacked[i][:, mask[i]] for i in range(stacked.shape[0])]
        tokens = torch.cat([r.transpose(0, 1) for r in self.ref_hidden])  # (N, L_c, d)
        self.scale = tokens.square().mean(dim=(0, 2)).sqrt().clamp_min(1e-6)
        harmful = ctx.aux_data("harmful_prompts")[: self.cfg.n_probe // 2]
        self.probe_harm = ctx.render([Example(h.id, h.prompt) for h in harmful])  # prompts only
        self.probe_ref = self._features(ctx, self._probe_rows(), reference=True)
        if self.drift_ema is None:  # a fresh run (a resumed one restored its EMA)
            self.drift_ema = self._measure(ctx).tolist()
        log.info(
            "repanchor: %d anchors, candidate layers %s, step-0 drift max %.2e",
            len(rows),
            self.candidates,
            max(self.drift_ema),
        )

    def _probe_rows(self) -> list[Rendered]:
        task = [Rendered(ids, [IGNORE] * len(ids), len(ids), f"task{i}") for i, ids in enumerate(self.probe_task)]
        return self.probe_harm + task

    def _features(self, ctx: RunContext, rows: list[Rendered], reference: bool) -> dict[int, torch.Tensor]:
        """Per candidate layer, one fp64 sample per probe row, from θ or from the reference."""
        parts: dict[int, list[torch.Tensor]] = {i: [] for i in self.candidates}
        cm = ctx.reference() if reference else torch.no_grad()
        with cm as ref:
            model = ref if reference else ctx.unwrapped
            with eval_mode(model):
                for start in range(0, len(rows), self.setup_batch):
                    batch = ctx.batch(rows[start : start + self.setup_batch])
                    with capture(model, self.candidates) as h:
                        ctx.forward(inputs_only(batch), model=model, logits_to_keep=1)
                    for i in self.candidates:
                        parts[i].append(pool(h[i], batch, self.cfg.sample))
        return {i: torch.cat(p) for i, p in parts.items()}

    def _measure(self, ctx: RunContext) -> torch.Tensor:
        """drift_l = 1 - CKA(θ, ref) per candidate layer on the probe set (fp64)."""
        feats = self._features(ctx, self._probe_rows(), reference=False)
        return torch.stack([1 - linear_cka(feats[i], self.probe_ref[i]) for i in self.candidates])

    # ------------------------------------------------------------------ refresh

    def observe(self, ctx: RunContext, batch: Batch) -> None:
        """Per micro-batch, before its passes: collect task probe prompts; refresh the drift when due."""
        want = self.cfg.n_probe - self.cfg.n_probe // 2
        if self.last_refresh == 0 and len(self.probe_task) < want:
            seen = {tuple(p) for p in self.probe_task}
            for ids, keep in zip(batch["input_ids"], prompt_mask(batch), strict=True):
                p = ids[keep].tolist()
                if tuple(p) not in seen and len(self.probe_task) < want:
                    self.probe_task.append(p)
                    seen.add(tuple(p))
        if ctx.step == 0 or ctx.step % self.cfg.refresh_every or ctx.step == self.last_refresh:
            return
        if self.last_refresh == 0:  # first refresh: the probe set is complete and frozen from here on
            self.probe_ref = self._features(ctx, self._probe_rows(), reference=True)
        drift = self._measure(ctx)
        ema = torch.tensor(self.drift_ema, dtype=torch.float64)
        self.drift_ema = (self.cfg.ema * ema + (1 - self.cfg.ema) * drift).tolist()
        self.last_refresh = ctx.step
        layers, w = self.selection()
        log.info("repanchor step %d: drift %s -> layers %s, weights %s", ctx.step, _fmt(drift), layers, _fmt(w))

    def selection(self) -> tuple[list[int], torch.Tensor]:
        assert self.drift_ema is not None, "RepAnchor.prepare runs in setup"
        top_k = None if self.cfg.layers is not None else self.cfg.top_k
        return select_layers(torch.tensor(self.drift_ema), self.candidates, top_k, self.cfg.drift_floor)

    # ------------------------------------------------------------------ the penalty (the part)

    def segments(self, ctx: RunContext, batch: Batch, rows: list[Rendered]) -> Request:
        """The clean anchor rows, with the selected blocks' outputs captured."""
        layers, _ = self.selection()
        return Request([Segment.of(r) for r in rows], layers=layers, data=rows)

    def terms(self, ctx: RunContext, out: Outputs) -> dict[str, torch.Tensor]:
        return {"rep": self.cfg.gamma * self.rep_loss(out)}

    def rep_loss(self, out: Outputs) -> torch.Tensor:
        """R(θ) (unweighted by γ, with grad) from a pass that ran the anchor rows ``out.request.data``.

        Each row is anchored on every real token but the first (see ``token_mask``), in order.
        """
        rows: list[Rendered] = out.request.data
        layers, w = self.selection()
        total = torch.zeros((), device=next(iter(out.hidden.values())).device)
        for weight, layer in zip(w.tolist(), layers, strict=True):
            c = self.candidates.index(layer)
            x = out.hidden[layer]
            got = torch.cat([out.take(x, i, torch.arange(1, len(r.input_ids))) for i, r in enumerate(rows)])
            ref = torch.cat([self.ref_hidden[int(r.id)][c] for r in rows])
            diff = (got.float() - ref) / self.scale[c]
            total = total + weight * diff.square().mean()
        return total

    def penalty_value(self, ctx: RunContext, rows: list[Rendered]) -> torch.Tensor:
        """R(θ) on a clean anchor batch in its own forward (unweighted by γ, with grad)."""
        return self.rep_loss(forward_alone(ctx, self.segments(ctx, {}, rows)))

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.parts:
            return super().step(ctx, batch)
        self.observe(ctx, batch)
        return anchor_step(ctx, batch, self.parts, self.anchors.next(), packed=self.fused, backward="each")

    # ------------------------------------------------------------------ resume

    def drift_state(self) -> dict[str, Any]:
        return {"drift_ema": self.drift_ema, "last_refresh": self.last_refresh, "probe_task": self.probe_task}

    def load_drift_state(self, state: dict[str, Any]) -> None:
        self.drift_ema = state["drift_ema"]
        self.last_refresh = state["last_refresh"]
        self.probe_task = state["probe_task"]

    def state_dict(self) -> dict[str, Any]:
        if self.cfg.gamma == 0:
            return {}
        return {"y_ref": self.anchors.y_ref, **self.drift_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.anchors.y_ref = state["y_ref"]
            self.load_drift_state(state)


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in t.tolist()) + "]"
