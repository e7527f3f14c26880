"""Where evaluations live on disk, so that no evaluation ever destroys another.

::

    <run>/eval/index.json             every evaluation: its settings, whether it is full, its suites, when
    <run>/eval/<id>/<suite>.jsonl     per-sample records of one evaluation (``safeft.eval.records``)
    <run>/eval/<id>/summary.json      that evaluation's summary, one entry per suite
    <run>/eval/summary.json           the run's numbers: per suite, the newest FULL evaluation's entry

``<id>`` is a hash of the settings that change the numbers (model checkpoint, judge, prompt counts and seed,
``--limit``, and the generation settings that decide a completion: max_new_tokens, sampling, system
prompt, chat template, precision, backend). Evaluating again with other settings — another judge, a
``--limit`` smoke run — writes another directory; with the same settings it replaces that evaluation's
suite file only once the suite has finished (each file is written atomically). ``summary.json`` merges the
full evaluations only (no ``--limit``), so a smoke run never stands in for a full result.

A run evaluated before this layout (records directly under ``eval/``) has them moved, untouched, into
``eval/legacy/`` the first time it is evaluated again; ``--rescore`` works on either layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safeft import io
from safeft.data.types import DataError

log = logging.getLogger(__name__)

INDEX = "index.json"
SUMMARY = "summary.json"
LEGACY = "legacy"
LOCK = "index.lock"


def settings_id(key: dict[str, Any]) -> str:
    """The directory name of an evaluation: 12 hex digits of the SHA-256 of its settings (sorted JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or move the file") from None


class Store:
    """The evaluations of one run (or model) under ``eval_dir``; updates to the index are serialised with a
    lock file, so two evaluations of one run at once cannot lose each other's entries."""

    def __init__(self, eval_dir: Path) -> None:
        self.dir = Path(eval_dir)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The index, read under an exclusive lock and written back atomically when the block ends."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = _read_json(self.dir / INDEX, {"evaluations": {}})
                yield index
                io.write_json(self.dir / INDEX, index)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return (self.dir / INDEX).exists()

    def begin(self, key: dict[str, Any], full: bool) -> Path:
        """Register an evaluation with settings ``key``; return its directory (created)."""
        eid = settings_id(key)
        with self.locked() as index:
            self._adopt_legacy(index)
            entry = index["evaluations"].setdefault(eid, {"settings": key, "full": full, "suites": {}})
            entry["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            entry["seq"] = index["seq"] = index.get("seq", 0) + 1  # a counter orders events; clocks can jump
        path = self.dir / eid
        path.mkdir(exist_ok=True)
        return path

    def commit(self, eval_path: Path, suite: str, entry: dict[str, Any], records_file: str | None) -> None:
        """A suite of the evaluation in ``eval_path`` has finished (its records are written): store its summary
        entry and refresh the run's merged summary."""
        with self.locked() as index:
            summary = _read_json(eval_path / SUMMARY, {})
            summary[suite] = entry
            io.write_json(eval_path / SUMMARY, summary)
            ev = index["evaluations"][eval_path.name]
            ev["seq"] = index["seq"] = index.get("seq", 0) + 1  # the newest finished suite wins the merge
            ev["suites"][suite] = {
                "file": records_file,
                "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seq": ev["seq"],
            }
            self.write_merged(index)

    def evaluation_dirs(self) -> list[Path]:
        """The directories of every evaluation in the index, least recently active first."""
        index = _read_json(self.dir / INDEX, {"evaluations": {}})
        evs = sorted(index["evaluations"].items(), key=lambda kv: kv[1].get("seq", 0))
        return [self.dir / eid for eid, _ in evs if (self.dir / eid).is_dir()]

    def write_merged(self, index: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the run's summary.json from the evaluations' own summaries: per suite, the entry of the
        full evaluation that finished it last, with its ``eval_id``. Call it holding ``locked``."""
        best: dict[str, tuple[int, str]] = {}
        for eid, ev in index["evaluations"].items():
            if not ev.get("full"):
                continue
            for suite, done in ev["suites"].items():
                if suite not in best or done["seq"] > best[suite][0]:
                    best[suite] = (done["seq"], eid)
        merged: dict[str, Any] = {}
        for suite, (_, eid) in sorted(best.items(), key=lambda kv: kv[1][0]):
            entry = _read_json(self.dir / eid / SUMMARY, {}).get(suite)
            if entry is not None:
                merged[suite] = {**entry, "eval_id": eid}
        io.write_json(self.dir / SUMMARY, merged)
        return merged

    def _adopt_legacy(self, index: dict[str, Any]) -> None:
        """Move records written directly under ``eval/`` (the layout before the index) into ``eval/legacy``
        so the merged summary can take their place without destroying them. Each move is a rename, and a
        move cut short is finished by the next evaluation (the index is written only at the end)."""
        dest = self.dir / LEGACY
        root = [*self.dir.glob("*.jsonl"), *[p for p in [self.dir / SUMMARY] if p.exists()]]
        if index["evaluations"] or not (root or dest.is_dir()):
            return
        dest.mkdir(exist_ok=True)
        for p in root:
            os.replace(p, dest / p.name)
        summary = _read_json(dest / SUMMARY, {})
        full = all("limit" not in e for e in summary.values() if isinstance(e, dict))
        index["seq"] = seq = index.get("seq", 0) + 1
        suites = {s: {"file": None, "completed": None, "seq": seq} for s in summary}
        index["evaluations"][LEGACY] = {"settings": {"legacy": True}, "full": full, "suites": suites, "seq": seq}
        self.write_merged(index)
        log.info("moved the records evaluated before the settings-hash layout to %s", dest)
