"""Experiment trackers (``train.report_to``): the same numbers as ``metrics.jsonl``, in TensorBoard or W&B.

They go through accelerate's tracker classes (``accelerate.tracking``), started on the main process only,
so a multi-process run logs once. ``metrics.jsonl`` stays the record of the run: a tracker is a view of it
for people who already watch their runs there, never the only copy. Each backend is an optional extra
(``pip install 'safeft[trackers]'``); asking for one that is not installed is an error before anything runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from safeft import config as C

# name -> the modules any one of which makes it usable
BACKENDS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check(cfg: C.RunConfig) -> list[str]:
    """The trackers ``train.report_to`` asks for, each known and installed; raise ``ConfigError`` otherwise."""
    names = [n for n in cfg.train.report_to if n != "none"]
    for n in names:
        if n not in BACKENDS:
            raise C.ConfigError(f"train.report_to: {n!r} is not a tracker; use any of {', '.join(BACKENDS)} or none")
        if not any(importlib.util.find_spec(m) for m in BACKENDS[n]):
            raise C.ConfigError(
                f"train.report_to={n}: the {n} package is not installed; pip install 'safeft[trackers]'"
            )
    if "none" in cfg.train.report_to and names:
        raise C.ConfigError(f"train.report_to: 'none' together with {names}")
    return names


def _scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as flat scalar hyperparameters (what trackers store); lists become strings."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif v is None or isinstance(v, bool | int | float | str):
            out[key] = v if v is not None else "null"
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The run's trackers: ``log(row)`` with the row ``metrics.jsonl`` gets; ``close()`` in ``finally``."""

    def __init__(self, cfg: C.RunConfig, run_dir: Path, main: bool) -> None:
        self.items: list[Any] = []
        if not main:
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        for name in check(cfg):
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", run_dir)  # event files under <run>/tensorboard
            else:
                os.environ.setdefault("WANDB_DIR", str(run_dir))  # wandb's own files beside the run
                tracker = WandBTracker(run_dir.name, project=os.environ.get("WANDB_PROJECT", "safeft"))
            tracker.start()
            tracker.store_init_configuration(_scalars(C.to_dict(cfg)))
            self.items.append(tracker)

    def log(self, row: dict[str, Any]) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        for t in self.items:
            t.log(values, step=row["step"])

    def close(self) -> None:
        for t in self.items:
            t.finish()
        self.items = []
