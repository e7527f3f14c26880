"""``safeft sweep``: a grid over dotted config keys, each cell an ordinary run directory, resumable.

A sweep file::

    base: demo.yaml                  # a run config (path relative to this file); optional
    overrides: [train.steps=40]      # dotted overrides on top of the base, for every cell
    align: true                      # fine-tune the stage-1 aligned model (cached; see below)
    grids:                           # the cells: the union of the cross products of each grid
      - defense.name: [sft, sbr]
        data.task: [domain:finance, domain:code]
        train.seed: [0, 1]
      - defense.name: [saft+repanchor]
        defense.lam: [0.1, 0.3, 1.0]
    out_dir: runs/sweeps/my-sweep    # default: runs/sweeps/<file name>

(``grid:`` with one mapping is the same as ``grids:`` with one element.) Every cell's config is built and
checked before the first cell runs, so a typo in cell 17 fails in a second, not after 16 trained cells.

Each cell is trained by ``safeft.train.train`` into ``<out_dir>/cells/<name>`` (the name is made of the
cell's settings plus a short hash of them) and then evaluated with the cell's ``eval`` section. Work that
cells share is computed once through the existing caches: the aligned model (``align``), the base model's
answers, the defenses' reference caches within a cell's resume. With ``align: true``, a fine-tune-stage
defense fine-tunes the aligned model; an alignment-stage defense (Vaccine, Booster, RepNoise) IS the
alignment (run once per defense and cached), followed by plain SFT on the cell's data, as the papers do.

A killed sweep, re-run, skips finished cells (``done.json``) and resumes a half-done one from its last
checkpoint (set ``train.save_every`` for mid-cell resume; the train loop resumes by itself). A cell that
fails is recorded in its ``error.json`` (message and traceback) and the sweep goes on; ``--retry-failed``
tries those again. ``--shard i/n`` (or ``auto`` under ``accelerate launch``/``torchrun``, from RANK and
WORLD_SIZE) runs every n-th cell, so several devices each take their own cells. ``--dry-run`` writes
nothing: it lists the cells (state, estimated cost) and the stage-1 alignments they need, each once
(:func:`alignments`), since an alignment-stage defense's alignment can cost more than its cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safeft import config as C
from safeft import io

log = logging.getLogger(__name__)

# Step cost relative to SFT, measured side by side on SmolLM2-135M, batch 8, 2 CPU cores (README's table);
# only for --dry-run's estimate. Methods not listed count as 1.
COST_HINT = {"sbr": 1.1, "saft": 2.0, "repanchor": 1.2, "saft+repanchor": 1.9, "sap": 3.6, "vaccine": 1.9,
             "booster": 2.5, "repnoise": 2.2}  # fmt: skip
SFT_STEP_S = 2.5  # s per SFT step at batch 8 on that machine; a finished cell's own timing replaces it
EVAL_S_PER_PROMPT = 0.47  # s per evaluated prompt at 64 new tokens on that machine (generation dominates)


@dataclass
class Cell:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, this cell's own settings

    def args(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]


@dataclass
class Sweep:
    path: Path
    base: Path | None
    overrides: list[str]
    cells: list[Cell]
    out_dir: Path
    align: bool = False
    configs: dict[str, C.RunConfig] = field(default_factory=dict)  # cell name -> its resolved config

    def cell_dir(self, cell: Cell) -> Path:
        return self.out_dir / "cells" / cell.name


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.split(":")[-1] if isinstance(value, str) and ":" in value else text
    return re.sub(r"[^A-Za-z0-9.+]+", "-", text).strip("-")[:24] or "x"


def cell_name(overrides: dict[str, Any]) -> str:
    """Readable and unique: the last part of each key with its value, then a hash of all of them."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:6]
    parts = [f"{k.rsplit('.', 1)[-1]}-{_slug(v)}" for k, v in overrides.items()]
    return "_".join([*parts, digest])


def expand(grids: list[dict[str, list[Any]]], where: str) -> list[Cell]:
    cells: list[Cell] = []
    seen: set[str] = set()
    for g, grid in enumerate(grids):
        if not isinstance(grid, dict) or not grid:
            raise C.ConfigError(f"{where}: grids[{g}] must be a non-empty mapping of dotted key -> list of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise C.ConfigError(f"{where}: grids[{g}].{key} must be a non-empty list, got {values!r}")
        for combo in itertools.product(*grid.values()):
            overrides = dict(zip(grid.keys(), combo, strict=True))
            name = cell_name(overrides)
            if name not in seen:  # the same settings from two grids are one cell
                seen.add(name)
                cells.append(Cell(name, overrides))
    return cells


def read_grid_file(
    path: str | Path, extra_keys: tuple[str, ...] = (), what: str = "sweep"
) -> tuple[dict[str, Any], Path | None, list[str], list[Cell]]:
    """The parts every grid file shares (``base``, ``overrides``, ``grid``/``grids``, ``out_dir``), checked:
    (the raw mapping, the base config's path, the overrides as key=value strings, the cells). ``extra_keys``
    are the caller's own top-level keys; any other key is an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise C.ConfigError(f"{path}: {what} file not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise C.ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise C.ConfigError(f"{path}: top level must be a mapping")
    known = {"base", "overrides", "grid", "grids", "out_dir", *extra_keys}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise C.ConfigError(f"{path}: unknown key(s) {unknown}; valid: {sorted(known)}")
    base = (path.parent / spec["base"]).resolve() if spec.get("base") else None
    if base is not None and not base.exists():
        raise C.ConfigError(f"{path}: base config {base} not found")
    overrides = spec.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if not isinstance(overrides, list):
        raise C.ConfigError(f"{path}: overrides must be a list of key=value strings or a mapping")
    if "grid" in spec and "grids" in spec:
        raise C.ConfigError(f"{path}: give either grid (one mapping) or grids (a list), not both")
    grids = spec.get("grids") or ([spec["grid"]] if "grid" in spec else None)
    if not grids:
        raise C.ConfigError(f"{path}: a {what} needs grid: (dotted key -> list of values) or grids: [...]")
    return spec, base, [str(o) for o in overrides], expand(grids, str(path))


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Parse a sweep file and build (and so check) every cell's config; nothing is written."""
    path = Path(path)
    spec, base, overrides, cells = read_grid_file(path, ("align",))
    if not isinstance(spec.get("align", False), bool):
        raise C.ConfigError(f"{path}: align must be true or false")
    out = Path(out_dir or spec.get("out_dir") or Path("runs") / "sweeps" / path.stem)
    sweep = Sweep(path, base, overrides, cells, out, bool(spec.get("align", False)))
    for cell in cells:
        try:
            sweep.configs[cell.name] = C.load(
                base, [*sweep.overrides, *cell.args(), f"out_dir={sweep.out_dir / 'cells'}", f"run_id={cell.name}"]
            )
        except C.ConfigError as e:
            raise C.ConfigError(f"{path}: cell {cell.name} ({cell.overrides}): {e}") from None
    return sweep


def _state(d: Path) -> str:
    if (d / "done.json").exists():
        return "done"
    if (d / "error.json").exists():
        return "failed"
    if (d / "checkpoints").exists():
        return "partial"
    return "todo"


def estimate_s(sweep: Sweep, cell: Cell) -> float:
    cfg = sweep.configs[cell.name]
    step_s = _measured_step_s(sweep) or SFT_STEP_S * cfg.train.batch_size / 8
    train_s = cfg.train.steps * cfg.train.grad_accum * step_s * COST_HINT.get(cfg.defense.name, 1.0)
    ev = cfg.eval
    prompts = (ev.n_harmful or 200) + (ev.n_over_refusal or 119) + (ev.n_utility or 200)
    return train_s + EVAL_S_PER_PROMPT * prompts * ev.max_new_tokens / 64


def _measured_step_s(sweep: Sweep) -> float | None:
    """SFT-equivalent seconds per step from the finished cells of this sweep, if any."""
    rates = []
    for cell in sweep.cells:
        d = sweep.cell_dir(cell)
        if _state(d) == "done" and (d / "metrics.jsonl").exists():
            times = [json.loads(x).get("time/step_s") for x in (d / "metrics.jsonl").read_text().splitlines() if x]
            times = [t for t in times if t]
            if times:
                cfg = sweep.configs[cell.name]
                rates.append(sum(times) / len(times) / COST_HINT.get(cfg.defense.name, 1.0) / cfg.train.grad_accum)
    return sum(rates) / len(rates) if rates else None


def plan(sweep: Sweep) -> list[dict[str, Any]]:
    """Every cell with its state and estimated cost (what --dry-run prints)."""
    return [
        {
            "cell": c.name,
            "state": _state(sweep.cell_dir(c)),
            "overrides": c.overrides,
            "est_min": estimate_s(sweep, c) / 60,
        }
        for c in sweep.cells
    ]


def shard_of(spec: str | None) -> tuple[int, int]:
    """``i/n`` -> (i, n); ``auto`` -> this process's rank and the world size; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    if spec == "auto":
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise C.ConfigError(f"--shard must be i/n with 0 <= i < n, or auto; got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def _stages(cfg: C.RunConfig) -> tuple[C.RunConfig, C.RunConfig]:
    """(what stage 1 aligns with, what the cell then fine-tunes with) for a sweep that aligns. An
    alignment-stage defense (Vaccine, Booster, RepNoise) IS the alignment and the fine-tune is plain SFT;
    any other defense fine-tunes the plainly aligned model."""
    from safeft.methods.registry import METHODS

    sft = dataclasses.replace(cfg, defense=C.build(C.DefenseConfig, {"name": "sft"}, "defense"))
    if getattr(METHODS.get(cfg.defense.name), "stage", "finetune") == "align":
        return cfg, sft
    return sft, cfg


def _model_for(sweep: Sweep, cfg: C.RunConfig, progress: bool) -> tuple[C.RunConfig, dict[str, Any]]:
    """The cell's fine-tuning config: on the aligned model when the sweep aligns (cached, so shared)."""
    if not sweep.align:
        return cfg, {}
    from safeft.align import align

    stage1, ft = _stages(cfg)
    aligned = align(stage1, progress=progress)
    ft = dataclasses.replace(ft, model=dataclasses.replace(ft.model, spec=str(aligned)))
    return ft, {"aligned_model": str(aligned), "align_defense": stage1.defense.name}


def alignments(sweep: Sweep) -> list[dict[str, Any]]:
    """The stage-1 alignments the cells need, each once: its defense, cache directory, whether it is cached
    and, if not, its estimated cost (the training at the defense's step cost, plus the base model's answers
    once per prompt list, which alignments differing only in the defense share)."""
    if not sweep.align:
        return []
    from safeft import align as A

    found: dict[str, dict[str, Any]] = {}
    prompt_lists: set[str] = set()
    step_s = _measured_step_s(sweep) or SFT_STEP_S
    for cell in sweep.cells:
        stage1, _ = _stages(sweep.configs[cell.name])
        ident = json.dumps([dataclasses.asdict(x) for x in (stage1.model, stage1.align, stage1.defense)], default=str)
        if ident in found:
            continue
        path = A.cache_path(stage1)
        cached = (path / "model" / "config.json").exists()
        est_s = 0.0
        if not cached:
            tc = stage1.align.train
            est_s = tc.steps * tc.grad_accum * step_s * tc.batch_size / 8 * COST_HINT.get(stage1.defense.name, 1.0)
            _, prompts = A.select_prompts(stage1)
            if json.dumps([stage1.model.spec, prompts]) not in prompt_lists:
                prompt_lists.add(json.dumps([stage1.model.spec, prompts]))
                est_s += EVAL_S_PER_PROMPT * len(prompts) * stage1.align.benign_max_new_tokens / 64
        found[ident] = {"defense": stage1.defense.name, "path": str(path), "cached": cached, "est_min": est_s / 60}
    return list(found.values())


def run_cell(sweep: Sweep, cell: Cell, progress: bool = True) -> dict[str, Any]:
    from safeft.data.domains import run_domain
    from safeft.eval.suites import evaluate, headline
    from safeft.train import train

    d = sweep.cell_dir(cell)
    cfg = sweep.configs[cell.name]
    t0 = time.perf_counter()
    ft, extra = _model_for(sweep, cfg, progress)
    res = train(ft, run_dir=d, progress=progress)
    domain = run_domain(ft)
    domains = [domain] if domain else []
    summary = evaluate(res.model, res.tokenizer, ft.eval, d, domains, ft.model.system_prompt)
    done = {
        "cell": cell.name,
        "overrides": cell.overrides,
        **extra,
        "headline": headline(summary),
        "elapsed_s": time.perf_counter() - t0,
    }
    io.write_json(d / "done.json", done)
    (d / "error.json").unlink(missing_ok=True)
    return done


def run_sweep(
    sweep: Sweep, shard: str | None = None, retry_failed: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run every cell of this process's shard that is not done; return the sweep's index."""
    i, n = shard_of(shard)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(sweep.out_dir / "sweep.yaml", sweep.path.read_text())
    mine = [c for k, c in enumerate(sweep.cells) if k % n == i]
    for k, cell in enumerate(mine, 1):
        d = sweep.cell_dir(cell)
        state = _state(d)
        if state == "done" or (state == "failed" and not retry_failed):
            log.info("sweep [%d/%d] %s: %s, skipped", k, len(mine), cell.name, state)
            continue
        log.info("sweep [%d/%d] %s: %s", k, len(mine), cell.name, "resuming" if state == "partial" else "running")
        try:
            run_cell(sweep, cell, progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one bad cell must not lose the others; its error is kept beside it
            d.mkdir(parents=True, exist_ok=True)
            io.write_json(d / "error.json", {"cell": cell.name, "overrides": cell.overrides, "error": repr(e),
                                             "traceback": traceback.format_exc()})  # fmt: skip
            log.error("sweep: cell %s failed: %s (recorded in %s)", cell.name, e, d / "error.json")
    return write_index(sweep)


def write_index(sweep: Sweep) -> dict[str, Any]:
    index = {"sweep": str(sweep.path), "cells": plan(sweep)}
    io.write_json(sweep.out_dir / "index.json", index)
    return index
