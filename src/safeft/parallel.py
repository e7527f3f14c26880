"""What the loop does differently under several processes (HF Accelerate: DDP, FSDP, DeepSpeed), in one place.

The loop calls these at fixed points and never asks how many processes there are: with one process each is
a no-op or an identity. docs/scale.md says per defense what sharding changes and what was verified where.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from safeft import config as C
from safeft.context import shards_parameters
from safeft.runs import checkpoints, rank_rng_state, seed_all, set_rng_state

if TYPE_CHECKING:
    from safeft.context import RunContext

log = logging.getLogger(__name__)


def check_engine(accelerator, cfg: C.RunConfig, run_dir: Path, resume: bool) -> None:
    """What this loop cannot do under a parameter-sharding engine, refused before anything is written. (A
    weights-only checkpoint met without such an engine is refused by ``runs.resume_point``.)"""
    newest = checkpoints(run_dir)[-1:] if resume else []
    if shards_parameters(accelerator):
        if cfg.train.eval_every > 0:
            raise C.ConfigError(
                "train.eval_every generates with the whole model on the main process, which FSDP/DeepSpeed keep "
                "sharded; set train.eval_every=0 and evaluate the checkpoints with `safeft eval`"
            )
        if newest:
            raise C.ConfigError(
                f"{run_dir} has checkpoints; resuming under FSDP/DeepSpeed is not supported (their optimizer state is "
                "sharded and safeft checkpoints hold the full trainable weights only): start a new run_id"
            )


def gathered_trainable(accelerator, ctx: RunContext) -> dict[str, torch.Tensor]:
    """The full trainable tensors from a sharded engine, on the main process (collective: all call it)."""
    # FSDP names nested units' parameters with this infix; its full state dict does not.
    names = {n.replace("_fsdp_wrapped_module.", "") for n, p in ctx.unwrapped.named_parameters() if p.requires_grad}
    full = accelerator.get_state_dict(ctx.model)
    if not ctx.is_main:
        return {}
    return {n: t.detach().cpu().clone() for n, t in full.items() if n in names}


def own_random_stream(ctx: RunContext, resumed_from: Path | None) -> None:
    """From here on each process draws its own random numbers (dropout masks, PGD starts): identical draws
    would correlate what should be independent samples across the global batch. Setup ran before this, on
    the same RNG everywhere, so the defenses' caches agree. Process 0 keeps the stream a single-process run
    has; a resumed run restores each process's own state from the checkpoint."""
    saved = None
    if resumed_from is not None:
        saved = json.loads((resumed_from / "state.json").read_text()).get("processes", 1)
        if saved != ctx.processes:
            log.warning(
                "%s was written by %d processes and resumes with %d: the global batch changes from here on, "
                "so the run is no longer the one an uninterrupted run would be",
                resumed_from,
                saved,
                ctx.processes,
            )
    own = rank_rng_state(resumed_from, ctx.rank) if saved == ctx.processes and ctx.processes > 1 else None
    if own is not None:
        set_rng_state(own)
    elif ctx.rank > 0:
        seed_all(random.Random(f"safeft-{ctx.cfg.train.seed}-process-{ctx.rank}").getrandbits(32))


def reduce_step(
    ctx: RunContext, total: float, sums: dict[str, float], diags: dict[str, float], tokens: int
) -> tuple[float, dict[str, float], dict[str, float], int, int, dict[str, int]]:
    """(loss, terms, diagnostics, tokens, positions, passes) of the global batch: means over processes of
    the per-process values (each already a mean over its micro-batches); token, position and pass counts
    summed, so a step's cost reads the same whether its micro-batches ran in one process or in several."""
    packed = {"total": total, "tokens": tokens, "positions": ctx.positions}
    packed |= {f"p/{k}": v for k, v in ctx.passes.items()}
    packed |= {f"t/{k}": v for k, v in sums.items()} | {f"d/{k}": v for k, v in diags.items()}
    red = ctx.reduce_mean(packed)
    n = ctx.processes
    terms = {k: red[f"t/{k}"] for k in sums}
    diag = {k: red[f"d/{k}"] for k in diags}
    passes = {k: round(red[f"p/{k}"] * n) for k in ctx.passes}
    return red["total"], terms, diag, round(red["tokens"] * n), round(red["positions"] * n), passes
