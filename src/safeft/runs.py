"""The run-directory format: where a run lives, its checkpoints, resuming one, loading one as a model.

::

    runs/<run-id>/config.yaml           the resolved config (``safeft train --config`` reproduces the run)
    runs/<run-id>/data_fingerprint.json hash of the task rows the run started on (resume refuses other data)
    runs/<run-id>/metrics.jsonl         one line per logged step
    runs/<run-id>/evals.jsonl           periodic ASR during training (train.eval_every)
    runs/<run-id>/checkpoints/step-N/   trainable.safetensors (adapter or full weights),
                                        trainer.safetensors + trainer.json (optimizer, scheduler, RNG, the
                                        defense's state: ``safeft.tensortree``, no pickle; the newest two
                                        checkpoints only), rng_ranks.* (every process's RNG under data
                                        parallelism), state.json (step, data positions, process count); complete once
                                        state.json exists
    runs/<run-id>/train_summary.json    written when training ends
    runs/<run-id>/.lock                 held (flock) by the one process writing the run

One directory holds one run: a second writer is refused while the first holds the lock, a fresh start
over an existing run needs ``overwrite``, a finished run is left as it is, and a resume is refused when
the config or the data differ from what the run started with.

The loop (``safeft.train``), diagnosis and the CLI read and write runs through these functions only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safeft import config as C
from safeft import devices, io, models, tensortree

log = logging.getLogger(__name__)

TRAINER = "trainer"  # trainer.safetensors + trainer.json in a checkpoint
RNG_RANKS = "rng_ranks"  # every process's RNG under data parallelism (rng_ranks.safetensors + .json)
KEEP_TRAINER_STATE = 2  # newest checkpoints that keep optimizer state: the newest, and one to fall back on
LOCK = ".lock"
FINGERPRINT = "data_fingerprint.json"


class RunError(C.ConfigError):
    """A run directory that cannot be used as asked: held by another process, holding another run, or
    damaged beyond what a resume can recover. The message names the directory and what to do."""


class TrainingDiverged(RuntimeError):
    """Loss, gradients or weights went non-finite. Nothing non-finite was saved: the newest checkpoint
    in the run directory is the last finite one."""


def make_run_dir(cfg: C.RunConfig) -> Path:
    run_id = cfg.run_id or f"{cfg.defense.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / run_id


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

    ``model`` is the unwrapped model; ``state`` the JSON part (step, data positions, flags). The trainer
    state goes through ``tensortree`` (safetensors + JSON), so loading a checkpoint never unpickles.
    ``weights`` replaces ``trainable_state(model)`` (gathered from a sharded engine); ``optimizer=None``
    writes weights and state only (no resume from it). ``rng_ranks``: every process's RNG under data
    parallelism, so each resumes its own random stream (``rank_rng_state``).
    """
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step-{state['step']:06d}"
    trainer = None
    if optimizer is not None:
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "defense": defense_state,
        }
    with io.atomic_dir(final) as tmp:
        save_file(weights if weights is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
        if trainer is not None:
            tensortree.save(trainer, tmp, TRAINER)
        if rng_ranks is not None:
            tensortree.save({"ranks": rng_ranks}, tmp, RNG_RANKS)
        io.write_json(tmp / "state.json", state, indent=None)
    # Resuming needs the optimizer state of one checkpoint; the newest two keep it, so a newest checkpoint
    # lost or damaged still leaves one to resume from. Older ones keep their weights for diagnosis (CKA
    # over training) at a third of the size.
    for old in checkpoints(run_dir)[:-KEEP_TRAINER_STATE]:
        for name in (f"{TRAINER}.safetensors", f"{TRAINER}.json", "trainer.pt"):
            (old / name).unlink(missing_ok=True)
        for name in (f"{RNG_RANKS}.safetensors", f"{RNG_RANKS}.json"):
            (old / name).unlink(missing_ok=True)
    return final


def rank_rng_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    """Process ``rank``'s RNG state from a checkpoint written under data parallelism (None otherwise)."""
    if not tensortree.exists(Path(ckpt), RNG_RANKS):
        return None
    states = tensortree.load(Path(ckpt), RNG_RANKS)["ranks"]
    if rank >= len(states):
        raise RuntimeError(f"{ckpt} holds the RNG of {len(states)} processes; this is process {rank}")
    return states[rank]


def has_trainer_state(ckpt: Path) -> bool:
    return tensortree.exists(ckpt, TRAINER) or (Path(ckpt) / "trainer.pt").is_file()


def _legacy_safe_globals() -> list:
    # What an older safeft's trainer.pt holds besides tensors and containers: numpy's RNG state (an
    # array of uint32 and numpy scalars). Arrays of Python objects stay refused.
    import numpy.dtypes as npd
    from numpy._core import multiarray

    dtypes = [getattr(npd, n) for n in dir(npd) if n.endswith("DType") and n != "ObjectDType"]
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt`` (optimizer, scheduler, rng, defense), read as data only.

    A ``trainer.pt`` from an older safeft is read with ``torch.load(weights_only=True)`` and only numpy's
    array types allowed: a crafted pickle naming any other callable is refused, not run.
    """
    ckpt = Path(ckpt)
    if tensortree.exists(ckpt, TRAINER):
        return tensortree.load(ckpt, TRAINER)
    legacy = ckpt / "trainer.pt"
    if legacy.is_file():
        import pickle

        try:
            with torch.serialization.safe_globals(_legacy_safe_globals()):
                return torch.load(legacy, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
            # torch's message suggests weights_only=False; the line worth showing is what was refused
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), type(e).__name__)
            raise tensortree.StateFormatError(
                f"{legacy}: refused: it holds objects safeft does not unpickle ({why[:200]})"
            ) from None
    raise tensortree.StateFormatError(f"{ckpt}: no trainer state ({TRAINER}.safetensors + {TRAINER}.json)")


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


def resume_point(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The newest complete checkpoint a run can resume from exactly: (its dir, state.json, trainer state).

    None when the run has no checkpoint. A newest checkpoint without readable trainer state (deleted,
    damaged, from a disk that filled) is skipped with a warning for the one before it; a run with
    checkpoints but none resumable is a ``RunError`` naming what is left.
    """
    done = checkpoints(run_dir)
    if not done:
        return None
    problems = []
    for ckpt in reversed(done):
        try:
            state = json.loads((ckpt / "state.json").read_text())
            trainer = read_trainer_state(ckpt)
        except (tensortree.StateFormatError, json.JSONDecodeError, OSError) as e:
            problems.append(f"{ckpt.name}: {e}")
            continue
        if problems:
            log.warning("cannot resume from %s; resuming from %s instead", "; ".join(problems), ckpt.name)
        return ckpt, state, trainer
    raise RunError(
        f"{run_dir}: no checkpoint can be resumed exactly ({'; '.join(problems[:2])}). The weights of "
        f"{done[-1].name} still load for eval and diagnose; to train again, add --overwrite (train(..., "
        "overwrite=True)) or use another run_id"
    )


def load_checkpoint(
    ckpt: Path, model: nn.Module, optimizer, scheduler, trainer: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; return (its state.json, the defense's state).

    ``trainer`` is the checkpoint's trainer state when the caller has read it already (``resume_point``)."""
    trainer = trainer if trainer is not None else read_trainer_state(ckpt)
    load_trainable(model, ckpt)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return json.loads((Path(ckpt) / "state.json").read_text()), trainer["defense"]


# ----------------------------------------------------------------------------- append-only logs


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of an append-only log (metrics, evals). A torn last line (a write cut short by a kill
    or a full disk) is dropped with a warning; a bad line before the last is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    out = []
    for k, (lineno, raw) in enumerate(numbered):
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k == len(numbered) - 1:
                log.warning("%s, line %d: dropping a torn last line (%s)", path, lineno, str(e)[:80])
                break
            raise RunError(f"{path}, line {lineno}: damaged log line ({str(e)[:120]})") from None
        out.append(rec)
    return out


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a per-step log (metrics, evals) after ``step`` (and a torn last line): a resumed
    run logs them again. Rewritten whole and atomically, so the appends that follow start on a clean line."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_log(path) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if path.read_bytes() != text.encode("utf-8"):
        io.write_text(path, text)


# ----------------------------------------------------------------------------- one directory, one run


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (its record is not written yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir/.lock`` for the duration: one writer per run directory.

    An ``flock`` on the file is what excludes: the kernel drops it when its process dies, however it
    dies, so a lock left by a killed run is free and is taken over (with a warning naming the old
    holder). The file's content (pid, host, start time) is only there to name the holder in the error a
    second writer gets. Linux/macOS only (``fcntl``); on NFS, ``flock`` is the server's lock.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with io.writing(path):
        run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        with io.writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(
                f"{run_dir} is in use by {_holder_text(holder)}: one run directory holds one run. Wait for "
                f"that run to end, or use another run_id"
            ) from None
        # The holder before us may have removed the file between our open and our flock; then we hold a
        # lock on a file nobody else will open. Only a lock on the file at ``path`` counts.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunError(f"{path}: could not take the lock (it kept being replaced)")
    try:
        old = _read_holder(fd)
        if old and old.get("pid") is not None:
            log.warning(
                "%s: taking over the lock of %s: that process is gone (killed?) and held it no more",
                run_dir,
                _holder_text(old),
            )
        with io.writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        # Unlink before unlocking, so no one can open and lock this file once we let it go.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def has_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything of a run (hidden files such as the lock do not count)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir())


def describe(run_dir: Path) -> str:
    done = checkpoints(run_dir)
    if done:
        return f"checkpoints up to {done[-1].name}"
    n = len(read_log(Path(run_dir) / "metrics.jsonl"))
    return f"metrics of {n} logged steps" if n else "files of an earlier start"


def clear_run(run_dir: Path) -> None:
    """Delete everything of the run in ``run_dir`` but the lock (``overwrite``: a fresh start, really)."""
    for p in Path(run_dir).iterdir():
        if p.name == LOCK:
            continue
        with io.writing(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def clean_partial(run_dir: Path) -> None:
    """Remove checkpoint temp dirs a killed save left behind (``.step-N-tmp-*``, ``.step-N-old-*``)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step-*-*"):
            if p.is_dir() and ("-tmp-" in p.name or "-old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def finished(run_dir: Path, cfg: C.RunConfig) -> dict[str, Any] | None:
    """The run's ``train_summary.json`` when it ran to its last step (post-hoc work included), else None."""
    run_dir = Path(run_dir)
    path = run_dir / "train_summary.json"
    done = checkpoints(run_dir)
    if not path.exists() or not done:
        return None
    try:
        state = json.loads((done[-1] / "state.json").read_text())
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{run_dir}: damaged run file ({e})") from None
    if state.get("step") == cfg.train.steps and state.get("post_hoc_done", False):
        return summary
    return None


def fingerprint(examples) -> tuple[str, int]:
    """Hash of the task rows a run trains on (id, prompt, response, in order) and their number."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.response]).encode("utf-8"))
        n += 1
    return h.hexdigest(), n


def record_fingerprint(run_dir: Path, fp: str, n_rows: int, task: str | None) -> None:
    io.write_json(Path(run_dir) / FINGERPRINT, {"fingerprint": fp, "rows": n_rows, "task": task})


def check_fingerprint(run_dir: Path, fp: str, n_rows: int) -> None:
    """Refuse to resume a run on other data than it started with."""
    path = Path(run_dir) / FINGERPRINT
    if not path.exists():
        log.warning("%s: no data fingerprint recorded (an older run); cannot check the data is unchanged", run_dir)
        return
    old = json.loads(path.read_text())
    if old.get("fingerprint") != fp:
        raise RunError(
            f"{run_dir}: the training data changed since this run started ({old.get('task')}: "
            f"{old.get('rows')} rows, fingerprint {str(old.get('fingerprint'))[:12]}; now {n_rows} rows, "
            f"fingerprint {fp[:12]}). Resuming would train one run on two data sets: restore the data, or "
            "add --overwrite (train(..., overwrite=True)) to start over, or use another run_id"
        )


def check_same_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """Refuse to continue a run directory that was started with a different config.

    Both configs are compared resolved (defaults filled in), so a key added to safeft since the run began
    does not count as a difference; where the runs directory lives (``out_dir``, ``run_id``) does not either.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        return
    try:
        old = C.to_dict(C.load(saved))
    except C.ConfigError as e:
        raise RunError(f"{saved}: cannot read the config this run was started with ({e})") from None
    new = C.to_dict(cfg)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("out_dir", "run_id"))
    if diff:
        raise RunError(
            f"{run_dir} holds a run with a different config (sections differ: {', '.join(diff)}); "
            "use another run_id, or add --overwrite (train(..., overwrite=True)) to delete it and start over"
        )


@contextlib.contextmanager
def claim(
    accelerator, run_dir: Path, cfg: C.RunConfig, fingerprint, *, resume: bool, overwrite: bool
) -> Iterator[tuple[str, tuple[Path, dict[str, Any], dict[str, Any]] | None]]:
    """Hold ``run_dir`` for one run: (mode, resume point) from ``open_run`` for the block's duration.

    Under several processes the main one holds the lock and decides; the others follow its decision and
    read the same checkpoint. A directory this call created and nothing wrote into is removed afterwards.
    """
    from safeft.context import broadcast

    main = accelerator.is_main_process
    created = not run_dir.exists()
    try:
        with lock(run_dir) if main else contextlib.nullcontext():
            decision: tuple[str, str | None] | Exception | None = None
            point = None
            if main:
                try:
                    mode, point = open_run(run_dir, cfg, fingerprint, resume=resume, overwrite=overwrite)
                    decision = (mode, str(point[0]) if point else None)
                except Exception as e:  # every process must hear of it, or the others wait forever
                    decision = e
            decision = broadcast(accelerator, decision)
            if isinstance(decision, Exception):
                raise decision
            mode, ckpt = decision
            if not main and ckpt is not None:
                point = (Path(ckpt), json.loads((Path(ckpt) / "state.json").read_text()), read_trainer_state(ckpt))
            yield mode, point
    finally:
        if main and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused or failed before writing: no empty directory left behind


def open_run(
    run_dir: Path, cfg: C.RunConfig, fp: tuple[str, int], *, resume: bool, overwrite: bool
) -> tuple[str, tuple[Path, dict[str, Any], dict[str, Any]] | None]:
    """Decide, under the lock, what a ``train`` call does with ``run_dir``: ("fresh" | "resume" | "finished",
    the checkpoint to resume from as ``resume_point`` gives it, or None).

    ``overwrite`` deletes an existing run first. Without it an existing run is resumed when ``resume``
    (same config and data, logs and a checkpoint readable; else refused, before anything is written) or
    refused (``resume=False`` must not mix two runs in one directory).
    """
    if has_run(run_dir) and overwrite:
        log.warning("%s: --overwrite: deleting the run it holds (%s)", run_dir, describe(run_dir))
        clear_run(run_dir)
    if not has_run(run_dir):
        return "fresh", None
    if not resume:
        raise RunError(
            f"{run_dir} already holds a run ({describe(run_dir)}). --no-resume (resume=False) starts fresh only "
            "together with --overwrite (overwrite=True), which deletes its checkpoints, metrics and evals; "
            "or use another run_id"
        )
    check_same_config(run_dir, cfg)
    check_fingerprint(run_dir, *fp)
    if finished(run_dir, cfg) is not None:
        return "finished", None
    for name in ("metrics.jsonl", "evals.jsonl"):
        read_log(Path(run_dir) / name)  # a damaged line before the last is refused here, not after writing
    point = resume_point(run_dir)
    clean_partial(run_dir)
    return "resume", point


def load_run_model(run_dir: Path, step: int | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a trained model from its run directory: base model + the checkpoint's trainable weights."""
    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.yaml")
    done = checkpoints(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    ckpt = done[-1] if step is None else run_dir / "checkpoints" / f"step-{step:06d}"
    model, tok = models.load(cfg.model.spec, allow_pickle=cfg.model.allow_pickle, **devices.load_args(cfg.model))
    if cfg.data is not None:  # prompts render as they did in training
        from safeft.data.chat import use_chat_template

        use_chat_template(tok, cfg.data.chat_template)
    model = models.attach_lora(model, cfg.model.lora)
    load_trainable(model, ckpt)
    model.eval()
    return model, tok
