"""The record types every data source yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Malformed input data. The message always names the file (or source) and the row."""


class Turn(NamedTuple):
    """One message of a conversation. A tuple, so an Example holding turns stays hashable."""

    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Example:
    """One (prompt, optional response) pair, optionally after earlier turns of a conversation.

    ``id`` is stable across runs (source name + row or generator index) so per-sample records can be
    joined and re-scored later. ``meta`` carries source-specific fields: a domain's gold ``answer``, a
    code task's ``tests``, a harmful prompt's ``category``.

    A multi-turn row keeps its last user turn as ``prompt`` and its last assistant turn as ``response``
    (so leakage checks, logs and every prompt-only consumer see the question actually answered); the
    turns before that prompt (a system turn, earlier user/assistant exchanges) are ``context``.
    ``train_context`` says whether the assistant turns inside ``context`` get labels too: True for TRL's
    ``messages`` rows (every assistant turn is a written target), False for prompt/completion rows (the
    prompt is conditioning only, as in TRL's completion-only loss).
    """

    id: str
    prompt: str
    response: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    context: tuple[Turn, ...] = ()
    train_context: bool = False
    # "data.jsonl, line 7": where the row came from, for error messages that outlive loading (rendering,
    # truncation). Not part of the row's identity.
    where: str = field(default="", hash=False, compare=False)

    @property
    def location(self) -> str:
        """The row's file and line when known, else its source and id (for error messages)."""
        return self.where or f"{self.source or 'data'} row {self.id!r}"


def normalise_prompt(text: str) -> str:
    """Canonical form used for leakage checks: case-folded, whitespace collapsed, edge punctuation off."""
    return " ".join(text.casefold().split()).strip(" .?!")
