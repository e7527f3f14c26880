"""Vaccine: perturbation-aware alignment (alignment stage; the user's fine-tuning afterwards is plain SFT).

Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning
Attack", NeurIPS 2024, https://arxiv.org/abs/2402.01109 (code: git-disl/Vaccine ``trainer.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from safeft.config import DefenseConfig
from safeft.hooks import hooked, with_first
from safeft.methods.base import Batch, Defense, StepOutput, require
from safeft.methods.registry import register
from safeft.models import ModelError, decoder_layers

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

SITES = ("attn_out", "block_out")
# Attribute names under which decoder blocks keep their self-attention sub-module (Llama/Mistral/Qwen/Gemma:
# self_attn; GPT-2/GPT-J: attn; GPT-NeoX: attention; Falcon/Bloom: self_attention). Looked up by name on the
# block found by index, never by isinstance against a list of attention classes.
ATTENTION_ATTRS = ("self_attn", "attn", "attention", "self_attention")


@dataclass
class VaccineConfig(DefenseConfig):
    name: str = "vaccine"
    rho: float = 2.0  # ρ, global L2 norm of the perturbation over all sites; 0 = SFT (two passes, ε = 0)
    perturb_site: str = "attn_out"  # attn_out (the code: attention output before the residual add) | block_out

    def __post_init__(self) -> None:
        require(self.rho >= 0, "rho", ">= 0", self.rho)
        require(self.perturb_site in SITES, "perturb_site", f"one of {', '.join(SITES)}", self.perturb_site)


def perturbation_sites(model: nn.Module, site: str) -> list[nn.Module]:
    """One module per decoder block, by block index: the block's attention (``attn_out``) or the block.

    Raises ``ModelError`` when the block stack or a block's attention cannot be found: a perturbation that
    silently attaches to nothing would make Vaccine plain SFT.
    """
    blocks = decoder_layers(model)
    if site == "block_out":
        return list(blocks)
    out = []
    for i, block in enumerate(blocks):
        found = [getattr(block, a) for a in ATTENTION_ATTRS if isinstance(getattr(block, a, None), nn.Module)]
        if not found:
            raise ModelError(
                f"decoder block {i} ({type(block).__name__}) has no attention sub-module "
                f"(looked for {', '.join(ATTENTION_ATTRS)}); "
                "use defense.perturb_site=block_out or extend ATTENTION_ATTRS"
            )
        out.append(found[0])
    return out


def _first(out):
    """The hidden-state tensor of a module output (a tensor, or a tuple whose first item it is)."""
    return out[0] if isinstance(out, tuple) else out


def global_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ε_l = ρ · g_l / (‖g‖ + 1e-7) with ‖g‖ = sqrt(Σ_l ‖g_l‖²) over every site, row and token, in fp32."""
    g32 = [g.float() for g in grads]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g32))
    return [rho * g / (norm + 1e-7) for g in g32]


@register
class Vaccine(Defense):
    r"""Align so the alignment loss stays low under a worst-case shift of every layer's hidden output.

    Paper: Huang, Hu, Liu, "Vaccine: Perturbation-aware Alignment for Large Language Models against
    Harmful Fine-tuning Attack", NeurIPS 2024, arXiv 2402.01109 (code git-disl/Vaccine, ``VaccineTrainer``).

    Objective (alignment stage, on the alignment batch b)::

        min_θ  max_{‖ε‖₂ ≤ ρ}  CE(θ, ε; b),    ẽ_l = e_l(ẽ_{l-1}; θ) + ε_l  at every site l = 1..L

    solved with one SAM-style ascent step: pass 1 takes g_l = ∂CE/∂e_l at ε = 0; ε_l = ρ·g_l/(‖g‖ + 1e-7)
    with ONE global norm over all sites, batch rows and tokens; pass 2 recomputes CE with ε added (ε a
    constant) and only its parameter gradients reach the optimizer.

    Hyperparameters:
      * ``rho`` (ρ) = 2, the code's default (Booster's repo uses 5 for its Vaccine baseline); range 0.1-10.
        The norm is global, so the per-token shift shrinks like 1/sqrt(B·T·L): re-tune ρ when batch size,
        sequence length or depth change a lot (pitfall 2). ρ = 0 still runs both passes with ε = 0, which
        reproduces SFT exactly (a test checks it, so the two-pass machinery is covered).
      * ``perturb_site`` = ``attn_out``: the attention sub-block output (after ``o_proj``, before the
        residual add), as the code; ``block_out``: the whole decoder block's output (the paper's wording,
        "hidden embedding").

    Data: the alignment data only (the stage's task batch); no harmful data.

    Cost: 2 F+B per micro-batch (2× SFT). Pass 1's backward only reaches the sites (``ctx.grad``), not the
    weights' ``.grad``. Memory: one stored gradient per site, L·B·T·d floats. Logged as ``passes/forward = 2``,
    ``passes/backward = 2``; ``loss/task`` is the perturbed loss that is optimised, ``diag/clean_loss`` the
    pass-1 loss and ``diag/eps_norm`` ‖ε‖ (= ρ unless the gradient vanishes).

    Design choices [inferred] and pitfalls handled:
      * Sites are found by decoder-block index (``models.decoder_layers``) and an attribute name on each
        block, never by matching attention classes; an architecture without them raises ``ModelError``.
      * Pass 1 takes gradients with ``torch.autograd.grad`` w.r.t. the site outputs only, instead of the
        code's full backward + ``zero_grad``: nothing of pass 1 can reach the optimizer, and gradients of
        earlier micro-batches under gradient accumulation are not wiped (the code's ``zero_grad`` would).
      * The perturbation is added by returning ``out + ε`` from a forward hook (gradient passes through as
        identity, as the code's ``.data`` assignment). Both passes see the identical batch (ε is
        shape-locked to it). Hooks are removed in ``finally`` after each pass, so none outlives a step.
      * ε is computed in fp32 and cast to the site's dtype when added.
    """

    stage = "align"
    needs = ()
    Config = VaccineConfig
    cfg: VaccineConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "gradient_checkpointing": (
            "adds its perturbation with a forward hook that is removed before the backward, so a checkpointed "
            "block recomputed in the backward would run without it and the gradient would be taken at the clean "
            "point"
        ),
        "fsdp": (
            "pass 1 takes auxiliary gradients with torch.autograd.grad through the model, outside the engine's "
            "backward hooks (not verified under FSDP)"
        ),
        "deepspeed": (
            "pass 1 takes auxiliary gradients with torch.autograd.grad through the model, outside the engine's "
            "backward hooks (not verified under DeepSpeed)"
        ),
    }

    def __init__(self, cfg: VaccineConfig) -> None:
        super().__init__(cfg)
        self.sites: list[nn.Module] = []

    def setup(self, ctx: RunContext) -> None:
        # Resolved once, before step 0: an architecture we cannot hook fails before any training.
        self.sites = perturbation_sites(ctx.unwrapped, self.cfg.perturb_site)
        log.info("vaccine: %d %s sites, rho=%g", len(self.sites), self.cfg.perturb_site, self.cfg.rho)

    def perturbation(self, ctx: RunContext, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pass 1: (ε per site, the clean loss). No parameter ``.grad`` is touched."""
        outs: dict[int, torch.Tensor] = {}

        def capture(i: int):
            def hook(_mod, _inp, out):
                outs[i] = _first(out)  # keyed by index: a re-run (checkpoint recompute) overwrites, never adds

            return hook

        with hooked(self.sites, capture):
            loss = ctx.forward(batch).loss
        if len(outs) != len(self.sites):
            raise ModelError(f"vaccine: only {len(outs)} of {len(self.sites)} perturbation sites ran in the forward")
        order = [outs[i] for i in range(len(self.sites))]
        live = [t for t in order if t.requires_grad]
        if not live:
            raise ModelError("vaccine: no perturbation site depends on a trainable parameter")
        got = iter(ctx.grad(loss, live, allow_unused=True))
        grads = []
        for t in order:
            g = next(got) if t.requires_grad else None
            grads.append(torch.zeros_like(t) if g is None else g.detach())
        return global_perturbation(grads, self.cfg.rho), loss.detach()

    def step(self, ctx: RunContext, batch: Batch) -> StepOutput:
        if not self.sites:
            raise RuntimeError("Vaccine.step called before setup")
        eps, clean = self.perturbation(ctx, batch)

        def add(i: int):
            def hook(_mod, _inp, out):
                h = _first(out)
                return with_first(out, h + eps[i].to(h.dtype))

            return hook

        with hooked(self.sites, add):
            loss = ctx.forward(batch).loss
        ctx.backward(loss)
        eps_norm = float(torch.sqrt(sum(e.pow(2).sum() for e in eps)))
        return StepOutput(
            loss.detach(), {"task": loss.detach()}, diagnostics={"clean_loss": float(clean), "eps_norm": eps_norm}
        )
