"""The ``Suite`` base class and the ``SUITES`` registry, plus what every suite shares.

A suite is named ``KIND`` or ``KIND:ARG`` (``harmful``, ``harmful:donotanswer``, ``utility:finance``). Each
kind is a ``Suite`` subclass registered under its kind in ``SUITES`` by its plug-in module (``judged``:
harmful, over_refusal; ``checked``: utility, humaneval; ``task``: utility:task; ``harness``: utility:lm_eval);
the registry imports them on first lookup. A kind may itself hold a colon (``utility:task``): a name belongs
to the longest registered kind it starts with (``suite_class``). An instance is one named suite: it knows its
items, its generation settings, its records file and how to run.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from safeft.config import ConfigError, EvalConfig
from safeft.data.types import Example
from safeft.eval.generate import Generation, GenSettings
from safeft.eval.records import file_stem
from safeft.registry import Registry

SUITES: Registry[type[Suite]] = Registry(
    "suite",
    plugins=(
        "safeft.eval.suites.judged",
        "safeft.eval.suites.checked",
        "safeft.eval.suites.task",
        "safeft.eval.suites.harness",
    ),
)

# What a suite may need, declared in ``Suite.needs``: the driver gives every suite the model, tokenizer and
# settings; it checks the judge spec before generating anything when a suite needs a judge, and expands a
# bare name into one suite per run domain when a suite needs a domain.
NEEDS = ("model", "tokenizer", "settings", "judge", "domain")


@dataclass(frozen=True)
class SuiteInputs:
    """What the driver hands a suite's ``run``."""

    model: nn.Module
    tok: Any
    settings: GenSettings  # already adjusted by ``Suite.settings``
    judge: str  # the judge spec (eval.judge); suites that need no judge ignore it
    out: Path | None  # directory for the records file; None keeps no records
    limit: int | None  # a smoke run's cap, recorded in the summary entry


class Suite(abc.ABC):
    """One evaluation suite. Subclasses set ``kind``, ``needs`` and ``arg`` and implement ``items``/``run``."""

    kind: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ("model", "tokenizer", "settings")
    # what may follow ``KIND:``: "none" (nothing), "optional" or "required"; ``arg_help`` names it
    arg: ClassVar[str] = "none"
    arg_help: ClassVar[str] = "an argument"

    def __init__(self, arg: str = "") -> None:
        self.argument = arg

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.argument}" if self.argument else self.kind

    @property
    def records_file(self) -> str:
        """The records file's name inside an evaluation directory (``utility:finance`` -> utility_finance.jsonl)."""
        return f"{file_stem(self.name)}.jsonl"

    @classmethod
    def expand(cls, name: str, domains: Sequence[str]) -> list[Suite]:
        """The suites a name on the command line stands for, checked: a bare name of a kind that needs a
        domain means one suite per run domain (none when the target has no domain)."""
        rest = name[len(cls.kind) :]  # the kind may hold a colon itself (utility:task)
        sep, arg = rest[:1], rest[1:]
        if cls.arg == "none" and sep:
            raise ConfigError(f"suite {cls.kind!r} takes no argument (got {name!r})")
        if sep and not arg:
            raise ConfigError(f"suite {name!r}: name {cls.arg_help} after '{cls.kind}:' or drop the colon")
        if not arg and "domain" in cls.needs:
            return [cls(d) for d in domains]
        if not arg and cls.arg == "required":
            raise ConfigError(f"suite {cls.kind!r} needs {cls.arg_help} (write {cls.kind}:<{cls.arg_help}>)")
        return [cls(arg)]

    @abc.abstractmethod
    def items(self, cfg: EvalConfig) -> list[Example]:
        """The suite's fixed items under ``cfg`` (before any ``--limit``)."""

    def settings(self, base: GenSettings, cfg: EvalConfig) -> GenSettings:
        """Generation settings for this suite; the eval config's by default."""
        return base

    @abc.abstractmethod
    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        """Generate, score, write the records to ``inp.out / self.records_file``; return the summary entry."""


def suite_class(name: str) -> type[Suite]:
    """The class a suite name belongs to: the longest registered kind the name starts with, so
    ``utility:task:jsonl:f`` is ``utility:task``'s and ``utility:finance`` is ``utility``'s. Unknown kinds
    raise with a did-you-mean."""
    parts = name.split(":")
    for i in range(len(parts), 1, -1):  # compound kinds first; a plain kind is the last resort
        kind = ":".join(parts[:i])
        if kind in SUITES:
            return SUITES.get(kind)
    return SUITES.get(parts[0])


def subset(items: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed, seeded subset (the same one for every model compared), in id order."""
    items = sorted(items, key=lambda e: e.id)
    if n is None or n >= len(items):
        return list(items)
    return sorted(random.Random(seed).sample(items, n), key=lambda e: e.id)


def stats(settings: GenSettings, items: Sequence[Example], limit: int | None, gens: Sequence[Generation] = ()):
    """What every summary entry carries beside its headline number."""
    out: dict[str, Any] = {"n": len(items), "max_new_tokens": settings.max_new_tokens}
    if limit is not None:
        out["limit"] = limit  # a smoke run: never compare this number with a full one
    if gens:
        out["hit_max_new_tokens"] = sum(g.finish == "length" for g in gens)
    return out
