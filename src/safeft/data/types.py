"""The one record type every data source yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Malformed input data. The message always names the file (or source) and the row."""


@dataclass(frozen=True)
class Example:
    """One (prompt, optional response) pair.

    ``id`` is stable across runs (source name + row or generator index) so per-sample records can be
    joined and re-scored later. ``meta`` carries source-specific fields: a domain's gold ``answer``, a
    code task's ``tests``, a harmful prompt's ``category``.
    """

    id: str
    prompt: str
    response: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def normalise_prompt(text: str) -> str:
    """Canonical form used for leakage checks: case-folded, whitespace collapsed, edge punctuation off."""
    return " ".join(text.casefold().split()).strip(" .?!")
