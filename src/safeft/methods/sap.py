"""SAP: Safety-Aware Probing (a probe on the MLP outputs that steers LoRA updates off harmful directions).

Wu, Zhang, Wei, Zhang, Sun, "Secure LLM Fine-Tuning via Safety-Aware Probing", arXiv 2505.16737.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from safeft import packing
from safeft.config import ConfigError, DefenseConfig
from safeft.data.chat import IGNORE, Rendered
from safeft.data.types import Example
from safeft.hooks import first, hooked, with_first
from safeft.methods.base import Batch, Defense, StepOutput, require
from safeft.methods.registry import register
from safeft.methods.weights import global_norm, param_grads, shifted
from safeft.models import ModelError, decoder_layers, trainable_parameters
from safeft.packing import forward_at, label_positions, task_loss

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

# The released code probes layers {3, 9} of Llama-2-7B's 32; other depths keep the same fractions.
DEFAULT_DEPTHS = (3 / 32, 9 / 32)


@dataclass
class SAPConfig(DefenseConfig):
    name: str = "sap"
    layers: list[int] | None = None  # decoder indices probed; None = round(3/32·L) and round(9/32·L)
    grad_rate: float = 2e-5  # r: ‖ΔW‖ = r·‖W_trainable‖
    probe_lr: float = 0.05  # η_V, lr of the probe's AdamW
    contrastive_batch: int = 8  # (prompt, safe, harmful) triples per direction estimate
    temperature: float = 1.0  # T in −log σ(Δ/T)
    reference_parity: bool = False  # True = the released code's contrastive loss, bug included
    # [ours] the harmful contrastive rows read their prompt's states from the safe row in the one contrastive
    # forward (safeft.packing) when the model passes the setup check; false = safe and harmful rows batched
    # plainly. Same objective either way.
    fuse: bool = True

    def __post_init__(self) -> None:
        require(self.grad_rate >= 0, "grad_rate", ">= 0", self.grad_rate)
        require(self.probe_lr > 0, "probe_lr", "> 0", self.probe_lr)
        require(self.contrastive_batch >= 1, "contrastive_batch", ">= 1", self.contrastive_batch)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        if self.layers is not None:
            ok = bool(self.layers) and len(set(self.layers)) == len(self.layers)
            require(ok, "layers", "a non-empty list of decoder indices without repeats (or null)", self.layers)


def default_layers(n_layers: int) -> list[int]:
    """Two blocks at ≈10 % and ≈28 % of depth: {3, 9} of 32, {3, 8} of 30, {0, 1} of 2."""
    return sorted({min(n_layers - 1, round(f * n_layers)) for f in DEFAULT_DEPTHS})


# ----------------------------------------------------------------------------- contrastive loss


def summed_logprobs(
    ctx: RunContext,
    batch: Batch,
    at: tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    owner: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """(n,) fp32: Σ log p(targets[i] | position at[i]) grouped by ``owner[i]`` (0..n-1), not length-normalised,
    from ONE forward of ``batch`` whose unembedding runs only at the positions ``at`` (rows, cols)."""
    logits = forward_at(ctx, batch, *at)[0]
    lp = -F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(n, device=lp.device).index_add(0, owner, lp)


def _parity_logprobs(
    ctx: RunContext, safe: Sequence[Rendered], harm: Sequence[Rendered]
) -> tuple[torch.Tensor, torch.Tensor]:
    # The released loss (SAP_code datas.py + train.py): the input is the PROMPT only, padded with EOS
    # (attention 0) to the width of prompt+response; the labels are prompt+response with the prompt
    # masked and every EOS masked (pad = EOS there); CE is taken without the causal shift. One forward
    # serves both label sets because the input is the prompt alone.
    eos = ctx.tokenizer.eos_token_id
    width = max(len(r.input_ids) for r in (*safe, *harm))
    ids = torch.full((len(safe), width), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((2, len(safe), width), IGNORE, dtype=torch.long)
    for i, (s, h) in enumerate(zip(safe, harm, strict=True)):
        if s.input_ids[: s.prompt_len] != h.input_ids[: h.prompt_len]:
            raise ValueError(f"contrastive row {s.id!r}: the safe and harmful rows have different prompts")
        ids[i, : s.prompt_len] = torch.tensor(s.input_ids[: s.prompt_len])
        mask[i, : s.prompt_len] = 1
        labels[0, i, : len(s.labels)] = torch.tensor(s.labels)
        labels[1, i, : len(h.labels)] = torch.tensor(h.labels)
    labels[labels == eos] = IGNORE
    labels = labels.to(ctx.device)
    batch = {"input_ids": ids.to(ctx.device), "attention_mask": mask.to(ctx.device)}
    # both label sets' positions, unshifted; owners 0..n-1 score the safe set, n..2n-1 the harmful one
    k, rows, cols = torch.nonzero(labels != IGNORE, as_tuple=True)
    lp = summed_logprobs(ctx, batch, (rows, cols), labels[k, rows, cols], k * len(safe) + rows, 2 * len(safe))
    return lp[: len(safe)], lp[len(safe) :]


def _shared_logprobs(
    ctx: RunContext, safe: Sequence[Rendered], harm: Sequence[Rendered], fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # One forward: the safe rows as a plain batch, each harmful row packed in beside them, reading the states
    # of the prompt it shares with its safe row instead of recomputing them (``safeft.packing``; exact under
    # the causal mask, checked in setup), so the harmful rows add only their own response tokens.
    host = ctx.batch(list(safe))
    packed = packing.pack(
        host, [torch.tensor(h.input_ids) for h in harm], pad_id=ctx.tokenizer.pad_token_id, share=True, fmt=fmt
    )
    rows, cols, targets = label_positions(packed.batch["labels"])  # the safe rows (the hosts) only
    at, owner = [(rows, cols)], [rows]
    for j, (p, h) in enumerate(zip(packed.placements, harm, strict=True)):
        y = torch.tensor(h.labels[1:], device=ctx.device)
        t = torch.nonzero(y != IGNORE).squeeze(1)
        at.append((torch.full_like(t, p.row), p.columns(t)))
        owner.append(torch.full_like(t, len(safe) + j))
        targets = torch.cat([targets, y[t]])
    at_rows, at_cols = (torch.cat(x) for x in zip(*at, strict=True))
    lp = summed_logprobs(ctx, packed.batch, (at_rows, at_cols), targets, torch.cat(owner), 2 * len(safe))
    return lp[: len(safe)], lp[len(safe) :]


def contrastive_loss(
    ctx: RunContext,
    safe: Sequence[Rendered],
    harm: Sequence[Rendered],
    temperature: float = 1.0,
    parity: bool = False,
    fmt: str | None = None,
) -> torch.Tensor:
    """L_c = −mean_i log σ((log p(y_safe,i | q_i) − log p(y_harm,i | q_i)) / T), no reference model.

    ``safe[i]`` and ``harm[i]`` are the same prompt rendered with the refusal and with the compliant
    response. Default: teacher-forced log-probs of prompt+y_safe and prompt+y_harm, both in ONE forward
    whose unembedding runs only at the response positions. With ``fmt`` (the model's packed-mask format,
    ``packing.attention_format``; set once the setup check passed) each harmful row reads its prompt's
    states from its safe row; without, the safe and harmful rows are batched plainly. Either way the same
    loss: batching and sharing change rounding only. ``parity=True``: the released code's loss instead (see
    ``_parity_logprobs``).
    """
    if parity:
        lp_safe, lp_harm = _parity_logprobs(ctx, safe, harm)
    elif fmt is not None:
        lp_safe, lp_harm = _shared_logprobs(ctx, safe, harm, fmt)
    else:
        batch = ctx.batch([*safe, *harm])
        rows, cols, targets = label_positions(batch["labels"])
        lp = summed_logprobs(ctx, batch, (rows, cols), targets, rows, 2 * len(safe))
        lp_safe, lp_harm = lp[: len(safe)], lp[len(safe) :]
    return -F.logsigmoid((lp_safe - lp_harm) / temperature).mean()


# ----------------------------------------------------------------------------- the defense


@register
class SAP(Defense):
    r"""Train a probe V on the MLP outputs so that moving the weights toward "harmful preferred" raises the
    task loss; the task gradient, taken with V in place, then steers the update away from that direction.

    Paper: Wu, Zhang, Wei, Zhang, Sun, "Secure LLM Fine-Tuning via Safety-Aware Probing", arXiv 2505.16737
    (code ChengcanWu/SAP, ``SAP_code/train.py``).

    Objects: a probe v_j ∈ R^d (fp32) added to the output of ``decoder_layers(model)[j].mlp`` for each j in
    ``layers``, broadcast over batch and positions (the released code's zero-initialised
    ``mlp.down_proj.bias``); contrastive triples (q, y_safe, y_harm). Per optimizer step t::

        L_c(W)  = −mean_i log σ([log p_W(y_safe,i|q_i) − log p_W(y_harm,i|q_i)] / T)   (summed token log-probs)
        ΔW      = r · ‖W‖ · g/(‖g‖ + 1e-8),   g = ∇_W L_c(W_t, V_t)       (W = trainable params, global norms)
        g_V     = ∇_V CE(W_t, V_t; b) − ∇_V CE(W_t + ΔW, V_t; b)
        V_{t+1} = AdamW step of size η_V from V = 0 along g_V            (Adam moments persist over steps)
        W_{t+1} = the loop's optimizer on ∇_W CE(W_t, V_t; b)

    V_0 = 0, so step 0 is plain SFT; the V that shapes step t's update was fitted at step t − 1.

    Hyperparameters (defaults are the released code's):
      * ``layers`` = None → round(3/32·L) and round(9/32·L) of L blocks, i.e. {3, 9} of 32 as the code
        [inferred: the code hard-codes {3, 9} for Llama-2-7B; scaling by depth is ours]. Indices 0..L−1.
      * ``grad_rate`` r = 2e-5 (range 1e-6 – 1e-3; 0 leaves V at 0, i.e. SFT at 3× cost).
      * ``probe_lr`` η_V = 0.05: every probe coordinate is ≈ ±η_V after its one Adam step, ‖v_j‖ ≈ η_V·√d.
        The probe's AdamW keeps torch's defaults otherwise (wd 0.01: no effect on a zeroed V), as the code.
      * ``contrastive_batch`` = 8 (range 4 – 32), ``temperature`` T = 1.0.
      * ``reference_parity`` = False. The released contrastive loss scores each response token from a
        prompt-only context (input = prompt padded with EOS under attention 0, labels = prompt+response,
        no causal shift, EOS never a target). False (default) computes the intended teacher-forced loss
        with two forwards; True reproduces the released one for replication (one forward). Either way the
        rows come from the shared chat renderer, so the released template details (system prompt, no
        generation prompt in the prompt part, so the assistant header was scored) are not reproduced
        [inferred].
      * ``fuse`` = true [ours]: in the one contrastive forward each harmful row reads the states of the
        prompt it shares with its safe row instead of recomputing them (``safeft.packing``; checked once in
        setup on θ in eval mode, a model that fails keeps plain batching, with a warning, and a resumed run
        keeps its first verdict). false = the safe and harmful rows batched plainly. Same loss either way.

    Data: aux ``contrastive`` (prompt, response = refusal, ``meta["harmful_response"]`` = a compliance
    opener), cycled through a checkpointed stream. The log-probs are summed, not length-normalised (as the
    paper and code), so a long refusal against a short opener biases Δ toward the opener; the direction
    still points from refusing to complying, but length-matched pairs give a cleaner one.

    Cost (grad_accum = 1): 3 F+B per step, counted as ``passes/forward = 3`` (the contrastive pass, with
    the safe and the harmful rows in one forward, as in parity mode, the harmful rows adding only their
    response tokens with ``fuse``; one pass at W + ΔW whose
    backward reaches only V; one at W, SFT's own pass) and ``passes/backward = 3``. The contrastive pass and
    the pass at W + ΔW unembed only the response positions their losses read (``packing.forward_at``: the
    unembedding is ~1/5 of a pass on a 49k vocabulary). [ours] Both change the cost, not the objective: loss
    and gradients agree with separate full-logit forwards to rounding (``tests/unit/test_perf_equivalence.py``). With
    ``grad_accum = k``: the contrastive pass once per optimizer step, 2 F+B per micro-batch. Extra memory:
    two trainable-sized copies (ΔW and the saved W).

    Decisions and pitfalls handled:
      * The probe lives on the defense, not in the model: hooks (by decoder index; a block without ``.mlp``
        raises) are removed and V zeroed in ``after_train``, so checkpoints, evaluation and saved models
        see the plain model [inferred: the code never saves a model]. V and the probe's AdamW state
        travel in ``state_dict`` for exact resume. A run that dies by an exception never reaches
        ``after_train``; call ``remove_hooks()`` before reusing that model object.
      * ΔW and the norms are fp32; the excursion restores W from a saved copy, and raises if the weights
        did not move by at least half of ‖ΔW‖ (bf16 weights would round a ~1e-7 step away). When g itself
        vanishes (‖g‖ < 1e-8: L_c saturated, the safe answers already win by far), ΔW shrinks with it as
        in the code; that is logged once, not raised [inferred].
      * g and the V gradient at W + ΔW come from ``ctx.grad``, so they never reach the loop's optimizer;
        the clean pass goes through ``ctx.backward`` (W's gradient for the optimizer, and ∂CE/∂V at W).
      * Gradient accumulation [inferred; the code has none]: ΔW is estimated once per optimizer step (on
        its first micro-batch, from one contrastive batch) and V is updated once per optimizer step from
        g_V averaged over the micro-batches, so every micro-batch of a step sees the same V_t and ΔW and
        k micro-batches of b behave like one batch of k·b.
      * The probe is cast to the MLP output's dtype under autocast; its gradient and state stay fp32.
    """

    stage = "finetune"
    needs = ("contrastive",)
    Config = SAPConfig
    cfg: SAPConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "processes": (
            "its probe V and V's AdamW live outside the model, so DDP averages the weights' gradient but not V's:"
            " each process would fit its own probe on its own slice of the batch"
        ),
        "fsdp": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the harmful shift W + dW)"
        ),
        "deepspeed": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the harmful shift W + dW)"
        ),
    }

    def __init__(self, cfg: SAPConfig) -> None:
        super().__init__(cfg)
        self.layers: list[int] = []
        self.probe: dict[int, torch.Tensor] = {}  # decoder index -> v_j, fp32 leaf tensors (not model params)
        self.opt: torch.optim.Optimizer | None = None
        self.diagnostics: dict[str, float] = {}  # last step's contrastive loss, ‖V‖, ‖ΔW‖ (not optimised)
        self._hooks = contextlib.ExitStack()  # the probe's forward hooks, closed by remove_hooks
        self._safe: list[Rendered] = []
        self._harm: list[Rendered] = []
        self._stream = None
        self._pending: dict[str, Any] | None = None
        self._delta: list[torch.Tensor] | None = None
        self._nominal = True
        self._warned = False
        self._gv_shifted: list[torch.Tensor] | None = None
        self.fmt: str | None = None  # the packed-mask format when the contrastive rows share prompts (setup)

    # -- setup / teardown

    def setup(self, ctx: RunContext) -> None:
        model = ctx.unwrapped
        blocks = decoder_layers(model)
        self.layers = list(self.cfg.layers) if self.cfg.layers is not None else default_layers(len(blocks))
        bad = [j for j in self.layers if not 0 <= j < len(blocks)]
        if bad:
            raise ConfigError(
                f"defense.layers {bad} out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
            )
        d = _hidden_size(model)
        self.probe = {j: torch.zeros(d, device=ctx.device, requires_grad=True) for j in self.layers}
        self.opt = torch.optim.AdamW(list(self.probe.values()), lr=self.cfg.probe_lr)
        mlps = {}
        for j in self.layers:
            mlp = getattr(blocks[j], "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise ModelError(
                    f"decoder block {j} ({type(blocks[j]).__name__}) has no .mlp module; "
                    "SAP adds its probe to the MLP output and cannot attach to this architecture"
                )
            mlps[j] = mlp
        self._hooks.enter_context(hooked(mlps, lambda j: _adder(self.probe[j])))
        self._build_contrastive(ctx)
        if self._pending is not None and "fmt" in self._pending:
            self.fmt = self._pending["fmt"]  # a resumed run keeps the verdict it started with: the same passes
        elif self.cfg.fuse and not self.cfg.reference_parity:
            # checked on θ (SAP keeps no reference) at V = 0, on the first contrastive pairs
            safe, harm = self._safe[: self.cfg.contrastive_batch], self._harm[: self.cfg.contrastive_batch]
            if packing.packing_works(ctx, harm, share=True, who="sap", hosts=safe, model=model):
                self.fmt = packing.attention_format(model)
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    def _build_contrastive(self, ctx: RunContext) -> None:
        triples = ctx.aux_data("contrastive")
        missing = [ex.id for ex in triples if not ex.response or "harmful_response" not in ex.meta]
        if missing:
            raise ValueError(f"contrastive aux rows need a response and meta['harmful_response'] ({missing[0]!r})")
        safe = ctx.render([Example(ex.id, ex.prompt, ex.response) for ex in triples])
        harm = ctx.render([Example(ex.id, ex.prompt, ex.meta["harmful_response"]) for ex in triples])
        # Row ids become indices into ``harm``, so the stream (of safe rows) finds each row's partner.
        self._safe, self._harm = safe, harm
        rows = [dataclasses.replace(r, id=str(i)) for i, r in enumerate(safe)]
        self._stream = ctx.stream("sap_contrastive", rows, self.cfg.contrastive_batch)

    def remove_hooks(self) -> None:
        self._hooks.close()
        with torch.no_grad():
            for v in self.probe.values():
                v.zero_()

    def after_train(self, ctx: RunContext) -> None:
        # The probe is an optimisation device: evaluation and saving must see the plain model.
        self.remove_hooks()

    def close(self) -> None:
        self.remove_hooks()

    # -- one micro-batch

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if self.opt is None:
            raise RuntimeError("SAP.step called before setup")
        k = ctx.cfg.train.grad_accum
        params = list(trainable_parameters(ctx.unwrapped).values())
        probe = list(self.probe.values())
        if ctx.micro == 0:
            self._delta, self._nominal = self._harmful_shift(ctx, params)
        # V's gradient at W + ΔW (for V only: ctx.grad keeps it away from the optimizer).
        with shifted(params, self._delta, check=self._nominal):
            grads = ctx.grad(task_loss(ctx, batch), probe)
        prev = self._gv_shifted or [torch.zeros_like(v) for v in probe]
        self._gv_shifted = [a + g.float() / k for a, g in zip(prev, grads, strict=True)]
        # The clean pass with V_t: W's gradient for the loop's optimizer; V.grad receives ∂CE/∂V / k.
        task = ctx.forward(batch).loss  # SFT's own pass: at V = 0 this step is SFT's exactly
        ctx.backward(task)
        if ctx.last_micro:  # V moves once per optimizer step, from g_V averaged over its micro-batches
            self._update_probe()
        return StepOutput(task.detach(), {"task": task.detach()}, diagnostics=dict(self.diagnostics))

    def _harmful_shift(self, ctx: RunContext, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """ΔW = r·‖W‖·g/(‖g‖ + 1e-8) with g = ∇_W L_c at (W_t, V_t), all in fp32.

        Also says whether ΔW has its nominal size (‖g‖ ≥ 1e-8, so ‖ΔW‖ ≥ r·‖W‖/2): only then must the
        weights visibly move. A vanishing g means the contrastive loss is saturated (the safe answers
        already win by a wide margin); ΔW then shrinks with it, as in the released code, and is not an error.
        """
        rows = self._stream.next()
        harm = [self._harm[int(r.id)] for r in rows]
        lc = contrastive_loss(ctx, rows, harm, self.cfg.temperature, self.cfg.reference_parity, self.fmt)
        g = [gi.float() for gi in param_grads(ctx, lc, params)]
        g_norm = global_norm(g)
        scale = self.cfg.grad_rate * global_norm(params) / (g_norm + 1e-8)
        delta = [gi * scale for gi in g]
        self.diagnostics = {"contrastive": float(lc.detach()), "shift_norm": float(global_norm(delta))}
        nominal = float(g_norm) >= 1e-8
        if not nominal and not self._warned:
            self._warned = True
            log.warning(
                "sap: contrastive gradient vanished (‖g‖ = %.3g, L_c = %.3g); ΔW is below its radius",
                float(g_norm),
                float(lc.detach()),
            )
        return delta, nominal

    def _update_probe(self) -> None:
        """V ← 0, then one AdamW step along g_V = ∂CE/∂V(W) − ∂CE/∂V(W + ΔW)."""
        probe = list(self.probe.values())
        with torch.no_grad():
            for v, shifted_grad in zip(probe, self._gv_shifted, strict=True):
                clean = v.grad if v.grad is not None else torch.zeros_like(v)
                v.grad = clean - shifted_grad
                v.zero_()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.diagnostics["probe_norm"] = float(global_norm(probe))
        log.debug("sap step: %s", self.diagnostics)
        self._delta, self._gv_shifted = None, None

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        if self._delta is not None:
            raise RuntimeError("SAP state requested in the middle of an optimizer step")
        return {
            "layers": list(self.layers),
            "probe": [v.detach().cpu().clone() for v in self.probe.values()],
            "optimizer": self.opt.state_dict() if self.opt is not None else None,
            "fmt": self.fmt,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The loop restores a checkpoint before setup builds the probe, so keep it until then.
        if self.opt is None:
            self._pending = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state["layers"] != self.layers:
            raise RuntimeError(f"checkpoint probes layers {state['layers']}, this run {self.layers}")
        with torch.no_grad():
            for v, saved in zip(self.probe.values(), state["probe"], strict=True):
                v.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])


def _adder(v: torch.Tensor):
    def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
        h = first(out)  # MoE blocks return (hidden, router logits)
        return with_first(out, h + v.to(h.dtype))

    return hook


def _hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(d, int):
        return d
    emb = model.get_input_embeddings()
    if emb is None:
        raise ModelError(f"cannot tell the hidden size of {type(model).__name__}")
    return emb.weight.shape[1]
