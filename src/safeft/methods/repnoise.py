"""RepNoise: Representation Noising (alignment stage; the user's fine-tuning afterwards is plain SFT).

Rosati et al., "Representation Noising: A Defence Mechanism Against Harmful Finetuning", NeurIPS 2024,
https://arxiv.org/abs/2405.14577 (code: domenicrosati/representation-noising ``loss.py::rep_noise_loss``;
the copy the git-disl papers run: git-disl/Booster ``RepNoiseTrainer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from safeft.config import DefenseConfig
from safeft.data.chat import IGNORE
from safeft.hooks import capture_modules
from safeft.methods.base import Batch, Defense, StepOutput, harmful_rows, require
from safeft.methods.registry import register
from safeft.models import ModelError, decoder_layers, find_submodule, unwrap_peft

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

NOISE_SITES = ("mlp", "block")
MLP_ATTRS = ("mlp", "feed_forward", "ffn")  # the MLP sub-module's name on a decoder block, by architecture
FINAL_NORMS = ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm")


@dataclass
class RepNoiseConfig(DefenseConfig):
    name: str = "repnoise"
    alpha: float = 1.0  # α, weight of the bounded ascent −α·log(S + 1) on the harmful answers
    beta: float = 0.001  # β, weight of the mean per-layer MMD² between harmful activations and N(0, 1)
    harmful_batch: int = 8  # harmful rows per micro-batch [inferred: = our alignment batch]
    noise_site: str = "mlp"  # mlp (the code: each block's MLP output) | block (the block's residual output)
    # Logit-lens ascent on hidden_states[L-k], [L-2k], ... (k = lens_every); 1 = every layer as the code,
    # 0 = final logits only. [inferred] default 4 keeps RepNoise near 3x SFT on SmolLM2-135M (see the class doc).
    lens_every: int = 4
    kernel_num: int = 5  # MMD: number of Gaussian kernels (the code: 5)
    kernel_mul: float = 2.0  # MMD: bandwidth ratio between consecutive kernels (the code: 2)

    def __post_init__(self) -> None:
        require(self.alpha >= 0, "alpha", ">= 0", self.alpha)
        require(self.beta >= 0, "beta", ">= 0", self.beta)
        require(self.lens_every >= 0, "lens_every", ">= 0", self.lens_every)
        require(self.harmful_batch >= 1, "harmful_batch", ">= 1", self.harmful_batch)
        require(self.noise_site in NOISE_SITES, "noise_site", f"one of {', '.join(NOISE_SITES)}", self.noise_site)
        require(self.kernel_num >= 1, "kernel_num", ">= 1", self.kernel_num)
        require(self.kernel_mul > 0, "kernel_mul", "> 0", self.kernel_mul)


# ----------------------------------------------------------------------------- MMD


def mmd2(z: torch.Tensor, g: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased (V-statistic) MMD² between samples ``z`` (B, n) and ``g`` (B', n), multi-bandwidth Gaussian
    kernel, as the RepNoise code's ``MMD_loss``, in fp32.

    Pairwise squared distances come from the Gram matrix (‖a‖² + ‖b‖² − 2a·b): O((B+B')²) memory instead
    of the code's (B+B')²×n ``expand``, which at n = T·d is the blow-up the spec warns about. The base
    bandwidth is the mean off-diagonal distance, detached, divided by ``kernel_mul ** (kernel_num // 2)``;
    kernels use bandwidth·kernel_mul**i for i < kernel_num.
    """
    p = torch.cat([z, g]).float()
    m = p.shape[0]
    sq = p.pow(2).sum(1)
    off = 1.0 - torch.eye(m, device=p.device)  # d_ii is exactly 0; rounding in the Gram form could say otherwise
    d = (sq[:, None] + sq[None, :] - 2.0 * (p @ p.T)).clamp_min(0) * off
    bandwidth = d.detach().sum() / (m * m - m) / kernel_mul ** (kernel_num // 2)
    bandwidth = bandwidth.clamp_min(1e-12)
    k = sum(torch.exp(-d / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    b = z.shape[0]
    return k[:b, :b].mean() + k[b:, b:].mean() - k[:b, b:].mean() - k[b:, :b].mean()


# ----------------------------------------------------------------------------- model parts


def noise_sites(model: nn.Module, site: str) -> list[nn.Module]:
    """Per decoder block (by index): its MLP sub-module, or the block itself. Raises when not found."""
    blocks = decoder_layers(model)
    if site == "block":
        return list(blocks)
    out = []
    for i, block in enumerate(blocks):
        found = [getattr(block, a) for a in MLP_ATTRS if isinstance(getattr(block, a, None), nn.Module)]
        if not found:
            raise ModelError(
                f"decoder block {i} ({type(block).__name__}) has no MLP sub-module (looked for "
                f"{', '.join(MLP_ATTRS)}); use defense.noise_site=block or extend MLP_ATTRS"
            )
        out.append(found[0])
    return out


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding (the logit lens needs it). Raises when not found."""
    base = unwrap_peft(model)
    node = find_submodule(base, FINAL_NORMS)
    if node is not None:
        return node
    raise ModelError(
        f"cannot find the final norm of {type(base).__name__} (looked for {', '.join(FINAL_NORMS)}); "
        "RepNoise's logit lens needs it (or set defense.lens_every=0)"
    )


def lens_indices(n_layers: int, every: int) -> list[int]:
    """hidden_states indices j < L for the logit lens: L−k, L−2k, ... >= 0 (k = every; [] when every = 0).

    j = L is left out: it is the final logits' own input, which the ascent always includes (and in HF it is
    already final-normed, so the code's lens normed it twice, pitfall 2)."""
    if every == 0:
        return []
    return list(range(n_layers - every, -1, -every))[::-1]


# ----------------------------------------------------------------------------- the defense


@register
class RepNoise(Defense):
    r"""Push harmful-answer activations towards Gaussian noise and bound-ascend the harmful answers' loss.

    Paper: Rosati et al., "Representation Noising: A Defence Mechanism Against Harmful Finetuning",
    NeurIPS 2024, arXiv 2405.14577 (code domenicrosati/representation-noising, ``rep_noise_loss``).

    Objective, per micro-batch (alignment batch b_a, harmful batch x_h, m = x_h's response mask)::

        L(θ) = CE(θ; b_a) + β · (1/L) Σ_l MMD²( Z_l , G_l ) − α · log(S + 1)
        S    = mean over { CE(logits(x_h)) } ∪ { CE(W_U · Norm(h_j(x_h))) : j ∈ J }     (response tokens)

    Z_l: block l's MLP output on x_h, masked by m and flattened over (T, d) per row; G_l: N(0, 1) of the
    same shape, masked alike; MMD² as the code (5 Gaussian kernels, bandwidth from the detached mean
    distance; ``mmd2``). J: the logit-lens layers (``lens_indices``).

    Hyperparameters:
      * ``alpha`` (α) = 1, the code's default (the Booster repo's baseline uses 0.1); range 0.1-2. Large α
        or learning rates collapse the model (pitfall 5): watch ``loss/task``.
      * ``beta`` (β) = 0.001, the code's default and the released model's; range 1e-4-1.
      * ``harmful_batch`` = 8 [inferred: our alignment batch; the code pairs equal batches].
      * ``noise_site`` = ``mlp`` (the code: ``model.layers.{l}.mlp``) | ``block`` (the residual stream).
      * ``lens_every`` (k) = 4 [inferred]. The code's ascent projects EVERY hidden state through the
        unembedding (``lens_every`` = 1). On SmolLM2-135M (30 layers, 49k-token vocabulary, so ``lm_head`` is
        ~1/5 of a forward) a faithful per-layer lens over every position made RepNoise 7.9× SFT in an earlier
        attempt. Here the lens only projects the response positions (identical loss, far fewer tokens) and,
        by default, every 4th layer counted down from the top (j = 26, 22, …, 2 on 30 layers): ≈3× SFT.
        ``lens_every=1`` is the code's choice of layers; 0 keeps only the final logits.
      * ``kernel_num`` = 5, ``kernel_mul`` = 2: the code's MMD kernels.

    Data: the stage's task batch is the alignment data (harmful → refusal, benign → self-answer): it is the
    descent ("retain") term, unpaired with the harmful batch as in the Booster repo's RepNoise baseline.
    The harmful batch comes from aux ``contrastive`` as (harmful prompt → templated compliance opener); no
    harmful content is trained on [inferred: the code uses BeaverTails harmful answers].

    Cost: 2 F+B per micro-batch (alignment batch; harmful batch with hidden states) plus |J| unembedding
    projections of the harmful response tokens with their backward, and L MMD Gram matrices (negligible):
    logged as ``passes/forward = 2``, ``passes/backward = 2``. Terms: ``loss/task``, ``loss/noise`` (β·MMD),
    ``loss/ascent`` (−α·log(S+1)); ``diag/harmful_ce`` = S.

    Design choices [inferred] and pitfalls handled:
      * Explicit response mask from the harmful rows' labels (prompt and pad excluded), not the code's
        token inequality of paired sequences nor its "label id 0 is padding" rule (pitfalls 3, 4).
      * S is the mean over its terms (the code divides L+2 terms by L+1), and hidden_states[L] is not
        lens-projected again (the code normed it twice): the final logits stand for the last layer.
      * MMD distances via the Gram matrix (no (2B)²×(T·d) tensor); bandwidth detached as the code.
      * Hooks on the MLPs are attached by block index and removed in ``finally`` after each pass (the
        original never removed its hooks, pitfall 1); a model without findable blocks, MLPs or final norm
        raises ``ModelError``. α = β = 0 runs no harmful pass: exactly SFT.
    """

    stage = "align"
    needs = ("contrastive",)
    Config = RepNoiseConfig
    cfg: RepNoiseConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "deepspeed": (
            "runs more than one backward per micro-batch, and accelerate's DeepSpeed engine steps the optimizer "
            "inside the backward that ends an accumulation"
        ),
    }

    def __init__(self, cfg: RepNoiseConfig) -> None:
        super().__init__(cfg)
        self.sites: list[nn.Module] = []
        self.lens: list[int] = []
        self.norm: nn.Module | None = None
        self._stream = None

    @property
    def active(self) -> bool:
        return self.cfg.alpha > 0 or self.cfg.beta > 0

    def setup(self, ctx: RunContext) -> None:
        if not self.active:
            return  # α = β = 0: exactly SFT, at SFT's cost
        model = ctx.unwrapped
        self.sites = noise_sites(model, self.cfg.noise_site)
        self.lens = lens_indices(len(self.sites), self.cfg.lens_every)
        if self.cfg.alpha > 0 and self.lens:
            self.norm = final_norm(model)
        if model.get_output_embeddings() is None:
            raise ModelError(f"{type(model).__name__} has no output embeddings; RepNoise's ascent needs them")
        self._stream = harmful_rows(ctx, "repnoise_harmful", self.cfg.harmful_batch)
        log.info(
            "repnoise: %d %s sites, logit lens on hidden_states %s", len(self.sites), self.cfg.noise_site, self.lens
        )

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.active:
            return super().step(ctx, batch)
        if self._stream is None:
            raise RuntimeError("RepNoise.step called before setup")
        task = ctx.forward(batch).loss
        ctx.backward(task)
        harm = ctx.batch(self._stream.next())
        noise, ascent, s = self.harmful_terms(ctx, harm)
        ctx.backward(noise + ascent)
        terms = {"task": task.detach(), "noise": noise.detach(), "ascent": ascent.detach()}
        total = torch.stack([t.float() for t in terms.values()]).sum()
        return StepOutput(total, terms, diagnostics={"harmful_ce": s})

    def harmful_terms(self, ctx: RunContext, harm: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(β·mean_l MMD², −α·log(S+1), S) on the harmful batch, from one forward."""
        cfg = self.cfg
        want_states = cfg.alpha > 0 and bool(self.lens)
        sites = self.sites if cfg.beta > 0 else []
        with capture_modules(sites) as acts:
            out = ctx.forward(harm, output_hidden_states=want_states)
        zero = torch.zeros((), device=ctx.device)
        noise = zero
        if cfg.beta > 0:
            if len(acts) != len(sites):
                raise ModelError(f"repnoise: only {len(acts)} of {len(sites)} noise sites ran in the forward")
            m = (harm["labels"] != IGNORE).unsqueeze(-1)  # response tokens (B, T, 1)
            mmds = []
            for i in range(len(sites)):
                a = acts[i].float() * m
                g = torch.randn_like(a) * m
                mmds.append(mmd2(a.flatten(1), g.flatten(1), cfg.kernel_mul, cfg.kernel_num))
            noise = cfg.beta * torch.stack(mmds).mean()
        ascent, s = zero, float("nan")
        if cfg.alpha > 0:
            ces = [out.loss.float()]
            if want_states:
                model = ctx.unwrapped
                head = model.get_output_embeddings()
                sel = harm["labels"][:, 1:] != IGNORE  # positions whose next token is a response token
                target = harm["labels"][:, 1:][sel]
                for j in self.lens:
                    h = out.hidden_states[j][:, :-1][sel]  # (N, d): project only what is scored
                    with ctx.accelerator.autocast():
                        logits = head(self.norm(h))
                    ces.append(F.cross_entropy(logits.float(), target))
            mean_ce = torch.stack(ces).mean()
            ascent = -cfg.alpha * torch.log(mean_ce + 1.0)
            s = float(mean_ce.detach())
        return noise, ascent, s
