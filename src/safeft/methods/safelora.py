"""Safe LoRA: after fine-tuning, project each LoRA update onto the base→aligned weight-difference subspace.

Hsu, Tsai, Lin, Chen, Yu, Huang, "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning
Large Language Models", NeurIPS 2024, https://arxiv.org/abs/2405.16833 (code IBM/SafeLoRA).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from safeft import io, models
from safeft.config import ConfigError, DefenseConfig
from safeft.methods.base import Defense, require
from safeft.methods.registry import register
from safeft.models import ModelError

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)

SELECTS = ("threshold", "number")


@dataclass
class SafeLoRAConfig(DefenseConfig):
    name: str = "safelora"
    # The UNALIGNED model the aligned one (model.spec) was made from; on the embedded model: smollm2-135m.
    base_model: str | None = None
    select: str = "threshold"  # threshold: project modules with cos <= τ | number: the K lowest-cos modules
    threshold: float = 0.5  # τ
    num_proj_layers: int = 10  # K, for select=number (the reference's default mode)
    exact_projection: bool = False  # True: orthogonal projector onto col(V) instead of V Vᵀ / ‖V‖_F

    def __post_init__(self) -> None:
        # Required, but a dataclass field without a default cannot follow `name`; so it is checked here.
        require(
            self.base_model is not None,
            "base_model",
            "set to the unaligned model the aligned model.spec came from (e.g. smollm2-135m)",
            self.base_model,
        )
        require(self.select in SELECTS, "select", f"one of {', '.join(SELECTS)}", self.select)
        require(-1 <= self.threshold <= 1, "threshold", "in [-1, 1]", self.threshold)
        require(self.num_proj_layers >= 0, "num_proj_layers", ">= 0", self.num_proj_layers)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, LoRA layer, adapter name) for every LoRA-wrapped module, paired by module, not order."""
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if len(active) != 1:
                raise ModelError(f"Safe LoRA: module {name} has active adapters {active}; expected exactly one")
            yield name, mod, active[0]


def base_key(module_name: str) -> str:
    """The plain-checkpoint key of a LoRA module's weight: peft's ``base_model.model.`` prefix removed."""
    prefix = "base_model.model."
    name = module_name[len(prefix) :] if module_name.startswith(prefix) else module_name
    return f"{name}.weight"


def projector(v: torch.Tensor, exact: bool) -> torch.Tensor:
    """(d_out, d_out) fp32 projector built from V = W_aligned − W_base (d_out, d_in).

    ``exact=False``: C = V Vᵀ / ‖V‖_F, the reference's "approximate projection" (not idempotent).
    ``exact=True``: C = U_k U_kᵀ, the orthogonal projector onto the column space of V; U_k are the left
    singular vectors whose singular values exceed the usual rank tolerance (σ_max · max(m, n) · eps), so a
    rank-deficient V (an aligned model made by merging a rank-r LoRA) gives a rank-r projector rather than
    the identity a plain QR of V would give [inferred: the spec suggests QR; SVD is its rank-revealing form].
    """
    v = v.float()
    if exact:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        tol = s.max() * max(v.shape) * torch.finfo(torch.float32).eps
        uk = u[:, s > tol]
        return uk @ uk.T
    return (v @ v.T) / torch.linalg.matrix_norm(v)


def cosine(c: torch.Tensor, delta: torch.Tensor) -> float:
    """cos = ⟨C ΔW, ΔW⟩_F / (‖C ΔW‖_F ‖ΔW‖_F); NaN when either side is zero."""
    cd = c @ delta
    den = torch.linalg.matrix_norm(cd) * torch.linalg.matrix_norm(delta)
    return float((cd * delta).sum() / den) if den > 0 else float("nan")


@register
class SafeLoRA(Defense):
    r"""Post-hoc: replace LoRA-B by C·B in the modules whose update leaves the safety-aligned subspace.

    Paper: Hsu et al., "Safe LoRA", NeurIPS 2024, arXiv 2405.16833; code IBM/SafeLoRA ``model.py``.
    Training is plain SFT; the projection runs in ``after_train`` and the
    loop saves the final checkpoint again afterwards, so the run's weights ARE the projected ones.

    For every LoRA module i (paired by module name with the base checkpoint)::

        V_i   = W_i^aligned − W_i^base                   (the frozen weight under the adapter − the base's)
        C_i   = V_i V_iᵀ / ‖V_i‖_F                       (exact_projection: U_k U_kᵀ from the SVD of V_i)
        ΔW_i  = B_i A_i
        cos_i = ⟨C_i ΔW_i, ΔW_i⟩_F / (‖C_i ΔW_i‖_F ‖ΔW_i‖_F)
        if module i is selected:  B_i ← C_i B_i          (A and the α/r scaling unchanged; cos is scale-free)

    Selection: ``threshold`` projects every module with cos_i ≤ τ and leaves those above τ unchanged;
    ``number`` projects the K modules with the lowest cos (the reference's default mode).

    Hyperparameters:
      * ``base_model``: the unaligned model spec, required (the aligned model is ``model.spec``). Module
        names and shapes must match; anything else raises, in ``setup``, before training.
      * ``select`` = ``threshold`` [inferred: the reference defaults to ``number`` with K = 10 of
        Llama-2's 64 q/v modules; a fixed count does not carry over to 210 all-linear modules].
      * ``threshold`` (τ) = 0.5 (reference); range 0-1 (higher projects more modules).
      * ``num_proj_layers`` (K) = 10 (reference); range 0-all; ``select=number`` with K = 0 projects
        nothing and reproduces SFT exactly.
      * ``exact_projection`` = False (parity: V Vᵀ / ‖V‖_F as the reference computes it); True uses the true
        orthogonal projector onto col(V).

    Data: none beyond SFT's; it needs the base model's weights.

    Cost: training is SFT (1 F+B per step). One-off: loading the base model (in ``setup`` to check it,
    again in ``after_train``), then per module one d_out×d_out projector and a few products (an SVD with
    ``exact_projection``); C is built one module at a time, never all kept. A per-module report (cos,
    ‖V‖, projected or not) goes to ``<run>/safelora.json``; the reference's "Pdst" diagnostic,
    mean_i 1/(1 + ‖B_i,new − C_i B_i,old‖), is logged.

    Pitfalls handled: A and B are taken from each peft LoRA layer by adapter name, not by parameter order
    or by ``shape[0] == r``; base and aligned weights are paired by name with shapes checked; a module
    whose V is zero (the aligned model never changed it) is left unchanged with a warning, and if every
    module's V is zero (base and aligned the same model) the run raises instead of silently being SFT.
    """

    stage = "post"
    needs = ()
    Config = SafeLoRAConfig
    cfg: SafeLoRAConfig
    unsupported = {  # refused at start-up (docs/scale.md)
        "fsdp": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the post-hoc projection of every LoRA B)"
        ),
        "deepspeed": (
            "reads or writes trainable parameters whole outside the model's forward, which FSDP and DeepSpeed "
            "ZeRO-3 keep sharded there (the post-hoc projection of every LoRA B)"
        ),
    }

    def __init__(self, cfg: SafeLoRAConfig) -> None:
        super().__init__(cfg)
        self.report: list[dict] = []

    def _pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
        """(name, LoRA layer, adapter, base weight) per LoRA module; raises on any mismatch."""
        if not models.is_lora(model):
            raise ConfigError("safelora projects LoRA adapters; it cannot run with model.lora.enabled=false")
        base, _ = models.load(self.cfg.base_model)
        state = base.state_dict()
        out, problems = [], []
        for name, mod, adapter in lora_modules(model):
            layer = mod.get_base_layer()
            if not isinstance(layer, nn.Linear) or getattr(mod, "fan_in_fan_out", False):
                raise ModelError(f"Safe LoRA: {name} wraps a {type(layer).__name__}; only nn.Linear is supported")
            key = base_key(name)
            if key not in state:
                problems.append(f"{key}: not in the base model")
            elif state[key].shape != layer.weight.shape:
                problems.append(f"{key}: base {tuple(state[key].shape)} vs aligned {tuple(layer.weight.shape)}")
            else:
                out.append((name, mod, adapter, state[key]))
        if problems or not out:
            raise ModelError(
                f"Safe LoRA: the base model {self.cfg.base_model!r} does not match the fine-tuned model "
                f"({len(problems)} of {len(problems) + len(out)} LoRA modules): " + "; ".join(problems[:5])
            )
        return out

    def setup(self, ctx: RunContext) -> None:
        # Check the pairing now, so a wrong base model fails before training rather than after it.
        self._pairs(ctx.unwrapped)

    @torch.no_grad()
    def after_train(self, ctx: RunContext) -> None:
        model = ctx.unwrapped
        rows = []
        for name, mod, adapter, w_base in self._pairs(model):
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            v = mod.get_base_layer().weight.detach().float() - w_base.to(a.device).float()
            v_norm = float(torch.linalg.matrix_norm(v))
            c = projector(v, self.cfg.exact_projection) if v_norm > 0 else None
            cos = cosine(c, b.float() @ a.float()) if c is not None else float("nan")
            rows.append({"module": name, "adapter": adapter, "v_norm": v_norm, "cos": cos, "_c": c, "_b": b})
        zero = [r["module"] for r in rows if r["v_norm"] == 0]
        if len(zero) == len(rows):
            raise ModelError(
                f"Safe LoRA: base {self.cfg.base_model!r} and the aligned model are identical in every LoRA "
                "module; there is no safety subspace to project onto"
            )
        if zero:
            log.warning(
                "safelora: %d modules unchanged by alignment (V = 0) are left as they are: %s", len(zero), zero[:3]
            )
        # NaN cos (no update, or V = 0) is never selected: there is nothing to project.
        valid = [r for r in rows if r["cos"] == r["cos"]]
        if self.cfg.select == "threshold":
            chosen = {r["module"] for r in valid if r["cos"] <= self.cfg.threshold}
        else:
            chosen = {r["module"] for r in sorted(valid, key=lambda r: r["cos"])[: self.cfg.num_proj_layers]}
        pdst = []
        for r in rows:
            c, b = r.pop("_c"), r.pop("_b")
            r["projected"] = r["module"] in chosen
            if c is None:
                continue
            old = b.detach().float().clone()
            if r["projected"]:
                b.copy_((c @ old).to(b.dtype))
            pdst.append(1.0 / (1.0 + float(torch.linalg.matrix_norm(b.float() - c @ old))))
        self.report = rows
        summary = {
            "base_model": self.cfg.base_model,
            "select": self.cfg.select,
            "threshold": self.cfg.threshold,
            "num_proj_layers": self.cfg.num_proj_layers,
            "exact_projection": self.cfg.exact_projection,
            "projected": len(chosen),
            "modules": len(rows),
            "pdst": sum(pdst) / len(pdst) if pdst else float("nan"),
            "per_module": rows,
        }
        io.write_json(ctx.run_dir / "safelora.json", summary)
        log.info("safelora: projected %d of %d LoRA modules (Pdst %.3f)", len(chosen), len(rows), summary["pdst"])
