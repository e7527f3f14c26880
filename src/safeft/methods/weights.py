"""Weight-space tools that several defenses use: global norms, gradients kept off ``.grad``, excursions.

Booster and SAP both evaluate the loss at a shifted point θ + Δ (a simulated harmful step, a harmful
direction) and come back to θ; they need the same three pieces, so they live here rather than in either
method's file (no method file imports another).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from safeft.context import RunContext


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors (as if concatenated), detached, in fp32."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors]))


def param_grads(ctx: RunContext, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∇loss per parameter through ``ctx.grad`` (a counted backward that never reaches ``.grad``), detached;
    zeros for a parameter the loss does not reach."""
    got = ctx.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if t is None else t.detach() for p, t in zip(params, got, strict=True)]


@contextlib.contextmanager
def shifted(params: Sequence[torch.Tensor], delta: Sequence[torch.Tensor], check: bool = True) -> Iterator[None]:
    """Add ``delta`` to ``params`` in place for the block; restore the saved values exactly afterwards.

    The restore copies a saved clone rather than subtracting ``delta`` again (``(w + d) − d != w`` in
    floating point). With ``check``, raises if the weights did not actually move by at least half of
    ``‖delta‖`` (e.g. bf16 weights rounding a 1e-7 step away): a loss evaluated at a point the weights never
    reached would fit the defense to noise.
    """
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True):
                p.add_(d.to(p.dtype))
            want = float(global_norm(delta))
            moved = float(global_norm([p - s for p, s in zip(params, saved, strict=True)]))
        if check and want > 0 and not moved >= 0.5 * want:
            dtypes = sorted({str(p.dtype) for p in params})
            raise RuntimeError(
                f"the weight shift of norm {want:.3g} moved the weights by only {moved:.3g} "
                f"(trainable dtypes {dtypes}); keep the trainable (adapter) weights in fp32"
            )
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
