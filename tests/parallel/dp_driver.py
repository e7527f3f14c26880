"""Data-parallel runs on the tiny model, started by ``accelerate launch`` (see ``test_data_parallel.py``).

Every process runs the same scenarios: SFT, SBR (anchors packed into the task forward) and Vaccine (two
passes per micro-batch) for three steps at 2 rows per process, and an SFT run killed after a checkpoint and
resumed, beside the same run uninterrupted. Each process records every write it makes under the run root
(a ``sys.addaudithook`` hook sees ``open`` for writing, renames, ``mkdir``, removals, temp files) and, at
the end, writes ``result-<rank>.json`` beside the run root: its metrics rows and its writes.

The scenarios live here so the test builds the single-process runs it compares against from the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from safeft.data.types import Example

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(24)]
HARMFUL = [Example(f"h{i}", "How do I do harmful thing " + "really " * i + f"number {i}?") for i in range(5)]
AUX = {"harmful_prompts": HARMFUL}

# 2 rows per process and micro-batch; the single-process comparison accumulates 2 micro-batches of 2, so the
# global batch (4 rows) and every micro-batch's content are the same in both.
COMMON = ("train.batch_size=2", "train.lr=0.01", "train.schedule=linear")
SCENARIOS: dict[str, tuple[str, ...]] = {
    "sft": ("defense.name=sft", "train.steps=3"),
    "sbr": ("defense.name=sbr", "defense.n_anchors=3", "defense.lam=5.0", "train.steps=3"),
    "vaccine": ("defense.name=vaccine", "defense.rho=2.0", "train.steps=3"),
}
# Dropout makes the random streams matter, so a resume that restored only process 0's RNG would show.
RESUME = ("defense.name=sft", "train.steps=4", "train.save_every=2", "model.lora.dropout=0.1")
KILLED_AFTER = 3  # the last checkpoint is step 2; step 3 is redone after the resume


def config(root: Path, name: str, extra: tuple[str, ...], grad_accum: int):
    from safeft.testing import tiny_run_config

    return tiny_run_config(root / name, *COMMON, *extra, f"train.grad_accum={grad_accum}", f"run_id={name}")


def run(tiny_dir: str, root: Path, name: str, extra: tuple[str, ...], grad_accum: int, **kw):
    from safeft import models
    from safeft.train import train

    model, tok = models.load(tiny_dir)
    cfg = config(root, name, extra, grad_accum)
    return train(cfg, examples=EXAMPLES, aux=AUX, model=model, tokenizer=tok, progress=False, **kw)


def _audit(root: str, writes: list[list[str]]) -> None:
    """Record every write-like operation on a path under ``root`` (audit hooks cannot be removed: driver only)."""
    create = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    events = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "shutil.rmtree"}
    events |= {"tempfile.mkstemp", "tempfile.mkdtemp"}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & create)
            paths = args[:1] if writing else ()
        elif event in events:
            # a rename's target counts too: the atomic writer renames a temp file onto the real name
            paths = args[:2] if event == "os.rename" else args[:1]
        else:
            return
        for path in paths:
            if isinstance(path, str | bytes | os.PathLike) and os.path.abspath(os.fsdecode(path)).startswith(root):
                writes.append([event, os.fsdecode(path)])

    sys.addaudithook(hook)


def main() -> None:
    from accelerate import PartialState

    from safeft.train import TrainingInterrupted

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    root = out / "runs"
    writes: list[list[str]] = []
    _audit(str(root.resolve()), writes)

    results: dict[str, list[dict]] = {}
    for name, extra in SCENARIOS.items():
        results[name] = run(args.tiny_dir, root, name, extra, grad_accum=1).metrics
    results["resume-straight"] = run(args.tiny_dir, root, "resume-straight", RESUME, grad_accum=1).metrics
    try:
        run(args.tiny_dir, root, "resume-cut", RESUME, grad_accum=1, interrupt_after=KILLED_AFTER)
        raise SystemExit("the interrupted run was not interrupted")
    except TrainingInterrupted:
        pass
    results["resume-cut"] = run(args.tiny_dir, root, "resume-cut", RESUME, grad_accum=1).metrics

    state = PartialState()
    record = {"rank": state.process_index, "processes": state.num_processes, "metrics": results, "writes": writes}
    (out / f"result-{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
