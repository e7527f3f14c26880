"""The run-directory format: where a run lives, its checkpoints, resuming one, loading one as a model.

::

    runs/<run-id>/config.yaml           the resolved config (``safeft train --config`` reproduces the run)
    runs/<run-id>/metrics.jsonl         one line per logged step
    runs/<run-id>/evals.jsonl           periodic ASR during training (train.eval_every)
    runs/<run-id>/checkpoints/step-N/   trainable.safetensors (adapter or full weights), trainer.pt
                                        (optimizer, scheduler, RNG, the defense's state; newest only),
                                        rng.pt (every process's RNG under data parallelism; newest only),
                                        state.json (step, data positions, process count); complete once
                                        state.json exists
    runs/<run-id>/train_summary.json    written when training ends

The loop (``safeft.train``), diagnosis and the CLI read and write runs through these functions only.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safeft import config as C
from safeft import devices, io, models


def make_run_dir(cfg: C.RunConfig) -> Path:
    run_id = cfg.run_id or f"{cfg.defense.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / run_id


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its ``state.json`` exists)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def iter_checkpoints(run_dir: Path) -> Iterator[tuple[int, Path]]:
    for p in checkpoints(run_dir):
        yield int(p.name.split("-")[1]), p


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    defense_state: dict[str, Any],
    state: dict[str, Any],
    *,
    weights: dict[str, torch.Tensor] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step-<state['step']>`` atomically; older ones keep only their weights.

    ``model`` is the unwrapped model; ``state`` the JSON part (step, data positions, flags). ``weights``
    replaces ``trainable_state(model)`` (gathered from a sharded engine); ``optimizer=None`` writes weights
    and state only (no resume from it). ``rng_ranks``: every process's RNG under data parallelism, so each
    resumes its own random stream (``rank_rng_state``).
    """
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step-{state['step']:06d}"
    with io.atomic_dir(final) as tmp:
        save_file(weights if weights is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            torch.save({**trainer, "rng": rng_state(), "defense": defense_state}, tmp / "trainer.pt")
        if rng_ranks is not None:
            torch.save(rng_ranks, tmp / "rng.pt")
        io.write_json(tmp / "state.json", state, indent=None)
    # Only the newest checkpoint needs optimizer state to resume; older ones keep their weights for
    # diagnosis (CKA over training) at a third of the size.
    for old in checkpoints(run_dir)[:-1]:
        (old / "trainer.pt").unlink(missing_ok=True)
        (old / "rng.pt").unlink(missing_ok=True)
    return final


def rank_rng_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    """Process ``rank``'s RNG state from a checkpoint written under data parallelism (None otherwise)."""
    path = Path(ckpt) / "rng.pt"
    if not path.exists():
        return None
    states = torch.load(path, weights_only=False)
    if rank >= len(states):
        raise RuntimeError(f"{ckpt} holds the RNG of {len(states)} processes; this is process {rank}")
    return states[rank]


def load_trainable(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; return (its state.json, the defense's state)."""
    load_trainable(model, ckpt)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return json.loads((ckpt / "state.json").read_text()), trainer["defense"]


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a per-step log (metrics, evals) after ``step``: a resumed run logs them again."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    io.write_text(path, "".join(ln + "\n" for ln in keep))


def check_same_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """Refuse to resume a run directory that was started with a different config."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or not checkpoints(run_dir):
        return
    import yaml

    old = yaml.safe_load(saved.read_text())
    new = C.to_dict(cfg)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise C.ConfigError(
            f"{run_dir} holds a run with a different config (sections differ: {', '.join(diff)}); "
            "use another run_id, or delete the directory to start over"
        )


def load_run_model(run_dir: Path, step: int | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a trained model from its run directory: base model + the checkpoint's trainable weights."""
    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.yaml")
    done = checkpoints(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    ckpt = done[-1] if step is None else run_dir / "checkpoints" / f"step-{step:06d}"
    model, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))
    model = models.attach_lora(model, cfg.model.lora)
    load_trainable(model, ckpt)
    model.eval()
    return model, tok
