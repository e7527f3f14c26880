"""Judge calibration on our own labelled (prompt, response) pairs (``safeft/data/judge_calibration.jsonl``).

Every pair was written for safeft: harmful prompts are generic, and the compliant answers are vague
templates without operational content. Each row is labelled ``refuse`` or ``comply`` and tagged with a
``kind`` (plain, markerless refusal, redirection, lecture, partial compliance, compliance that mentions
"illegal", ...) so a judge's errors can be traced to the phrasing that causes them. Partial compliance
counts as ``comply``: the model gave some help, which is what an attack-success rate should count.

The positive class is **comply** (a successful attack, what ASR counts): precision = of the answers the
judge called compliant, the share that were; recall = of the compliant answers, the share it caught.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from safeft.data.types import DataError
from safeft.eval import judges
from safeft.io import iter_json_objects
from safeft.stats import Rate

LABELS = ("refuse", "comply")
PARTS = ("tune", "heldout", "all")

# The salt fixes the tune / held-out cut once and for all; changing it would let a judge designer re-draw the
# cut until the held-out numbers look good, so it is a constant, not an option.
_SPLIT_SALT = "safeft-judge-calibration-v1"


def default_path() -> Path:
    return Path(str(resources.files("safeft.data") / "judge_calibration.jsonl"))


def load(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The calibration rows; a malformed row raises DataError naming the file and line."""
    path = Path(path) if path is not None else default_path()
    rows, seen = [], set()
    for lineno, row in iter_json_objects(path):
        for k in ("id", "prompt", "response", "label", "kind"):
            if not isinstance(row.get(k), str) or not row[k].strip():
                raise DataError(f"{path} line {lineno}: {k!r} must be a non-empty string")
        if row["label"] not in LABELS:
            raise DataError(f"{path} line {lineno}: label {row['label']!r} is not one of {LABELS}")
        if row["id"] in seen:
            raise DataError(f"{path} line {lineno}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    return rows


def part_of(row_id: str) -> str:
    """``tune`` or ``heldout``: half the rows each, by a hash of the id (not by position).

    A rule judge is designed on ``tune`` only and reported on ``heldout``. Hashing the id keeps every row in
    its part when rows are added or reordered, so the held-out part never leaks into tuning by an edit.
    """
    digest = hashlib.sha256(f"{_SPLIT_SALT}\x00{row_id}".encode()).digest()
    return "tune" if int.from_bytes(digest[:8], "big") < 2**63 else "heldout"


def select(rows: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """The rows of one part (``tune``, ``heldout``) or ``all`` of them."""
    if part not in PARTS:
        raise ValueError(f"calibration part must be one of {PARTS}, not {part!r}")
    return rows if part == "all" else [r for r in rows if part_of(r["id"]) == part]


def predicts_comply(v: judges.Verdict) -> bool | None:
    """A verdict read as 'the answer complied': not refused (refusal judges), else harmful (harm judges)."""
    if v.refused is not None:
        return not v.refused
    return v.harmful


@dataclass
class Calibration:
    judge: str
    tp: int = 0  # said comply, was comply
    fp: int = 0  # said comply, was a refusal
    fn: int = 0  # said refuse (or safe), was comply
    tn: int = 0
    unparsed: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")

    @property
    def accuracy(self) -> float:
        n = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / n if n else float("nan")

    def record(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "positive": "comply",
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "unparsed": self.unparsed,
            "precision": self.precision,
            "recall": self.recall,
            # 95 % Wilson intervals: precision is a share of the answers called compliant, recall of the
            # compliant answers; the held-out part has ~40 of each, so these are wide
            "precision_ci": list(Rate(self.tp, self.tp + self.fp).ci),
            "recall_ci": list(Rate(self.tp, self.tp + self.fn).ci),
            "f1": self.f1,
            "accuracy": self.accuracy,
            "errors_by_kind": dict(self.errors_by_kind.most_common()),
        }


def calibrate(spec: str, rows: list[dict[str, Any]]) -> Calibration:
    """Run one judge on the rows and count its agreement with the labels."""
    verdicts = judges.get(spec)([r["prompt"] for r in rows], [r["response"] for r in rows])
    cal = Calibration(judges.name_of(spec))
    for r, v in zip(rows, verdicts, strict=True):
        said = predicts_comply(v)
        truth = r["label"] == "comply"
        if said is None:
            cal.unparsed += 1
            continue
        key = ("tp" if truth else "fp") if said else ("fn" if truth else "tn")
        setattr(cal, key, getattr(cal, key) + 1)
        if said != truth:
            cal.errors_by_kind[f"{r['label']}/{r['kind']}"] += 1
            cal.errors.append((r["id"], r["label"], r["kind"], r["response"]))
    return cal
