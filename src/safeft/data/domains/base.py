"""Benign fine-tuning domains: generated tasks whose answers a checker can score automatically.

A domain makes one item at a time from a seeded ``random.Random``; ``load_domain`` turns that into
deterministic, de-duplicated train and test splits whose prompts never overlap.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from safeft.data.types import DataError, Example, normalise_prompt
from safeft.registry import Registry

if TYPE_CHECKING:
    from safeft.config import RunConfig

N_TRAIN = 1200
N_TEST = 200
SPLITS = ("train", "test")


class Domain(abc.ABC):
    """A task generator plus the checker that decides whether a model completion is correct."""

    name: ClassVar[str]

    @abc.abstractmethod
    def make(self, rng: random.Random, index: int) -> Example:
        """Build one item; ``index`` is its position in the split. The caller assigns the final id."""

    @abc.abstractmethod
    def check(self, example: Example, completion: str) -> bool:
        """Return True if ``completion`` answers ``example`` correctly."""

    def check_detail(self, example: Example, completion: str) -> tuple[bool, str]:
        """``check`` plus a short reason for the record (e.g. why sandboxed code failed)."""
        return self.check(example, completion), ""


DOMAINS: Registry[type[Domain]] = Registry("domain")


def run_domain(cfg: RunConfig) -> str | None:
    """The domain a run fine-tunes on: ``<name>`` of ``data.task = domain:<name>[:<split>]``; None when the
    run has no data section or its task is another data source. The one reader of it (eval, demo, diagnose)."""
    task = cfg.data.task if cfg.data is not None else ""
    kind, _, rest = task.partition(":")
    return (rest.split(":")[0] or None) if kind == "domain" else None


def load_domain(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """The first ``n`` items (default: all) of a domain's ``split``, identical for identical ``seed``.

    The test split is drawn first from its own stream; train skips every prompt test already holds, so a
    train prefix of any length is disjoint from the whole test split.
    """
    domain = DOMAINS.get(name)()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for domain {domain.name!r}; expected one of {SPLITS}")
    size = N_TRAIN if split == "train" else N_TEST
    if n is None:
        n = size
    if not 0 <= n <= size:
        raise ValueError(f"domain {domain.name!r} split {split!r} holds {size} items; asked for {n}")
    if split == "test":
        return _generate(domain, "test", n, seed, taken=set())
    # Train must avoid the *whole* test split, not just the part a caller asked for.
    test = _generate(domain, "test", N_TEST, seed, taken=set())
    return _generate(domain, "train", n, seed, taken={normalise_prompt(e.prompt) for e in test})


def _generate(domain: Domain, split: str, count: int, seed: int, taken: set[str]) -> list[Example]:
    # A str seed goes through SHA-512 inside random.Random, so streams do not depend on PYTHONHASHSEED.
    rng = random.Random(f"{domain.name}-{split}-{seed}")
    seen = set(taken)
    out: list[Example] = []
    budget = 100 * count + 1000
    while len(out) < count:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"domain {domain.name!r} cannot produce {count} unique {split} prompts")
        item = domain.make(rng, len(out))
        key = normalise_prompt(item.prompt)
        if key in seen:
            continue
        seen.add(key)
        out.append(dataclasses.replace(item, id=f"{domain.name}-{split}-{len(out)}", source=domain.name))
    return out


def check(example: Example, completion: str) -> bool:
    """Score ``completion`` with the checker of the domain named in ``example.meta["domain"]``."""
    name = example.meta.get("domain")
    if not name:
        raise DataError(f"{example.source or 'unknown source'} row {example.id!r}: meta has no 'domain'")
    return DOMAINS.get(name)().check(example, completion)


# ---- numeric answers (finance, medical) -------------------------------------------------------------

# Thousands-separated numbers first so "1,234.50" is read whole; a bare "300," still stops at the comma.
_NUMBER = re.compile(r"-?(?:\$\s*)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER = "answer:"


def parse_answer(completion: str) -> float | None:
    """The number after the last ``Answer:``, else the last number; ``$``, ``,`` and ``%`` are ignored."""
    at = completion.lower().rfind(_ANSWER)
    if at >= 0:
        match = _NUMBER.search(completion, at + len(_ANSWER))
        if match:
            return _to_float(match.group())
    found = _NUMBER.findall(completion)
    return _to_float(found[-1]) if found else None


def _to_float(token: str) -> float:
    return float(token.replace("$", "").replace(",", "").replace(" ", ""))


def numbers_match(predicted: float | None, gold: float, rel_tol: float, abs_tol: float = 0.01) -> bool:
    """True when ``predicted`` is within ``rel_tol`` of ``gold``, or within ``abs_tol`` for tiny golds."""
    if predicted is None:
        return False
    return abs(predicted - gold) <= max(rel_tol * abs(gold), abs_tol)


def fmt(value: float, places: int = 3) -> str:
    """Shortest decimal form of ``value`` rounded to ``places``: 300.0 -> "300", 5.40 -> "5.4"."""
    text = f"{round(value, places):.{places}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def money(value: float) -> str:
    """Currency form: whole amounts without decimals, anything else with exactly two (5.4 -> "5.40")."""
    cents = round(value * 100)
    return str(cents // 100) if cents % 100 == 0 else f"{cents / 100:.2f}"


def plural(count: float, word: str) -> str:
    """``"1 year"`` / ``"3 years"``: keeps templates grammatical without a branch in every one."""
    return f"{fmt(count)} {word}" if count == 1 else f"{fmt(count)} {word}s"


class Item(NamedTuple):
    """A generated numeric task before it becomes an ``Example``."""

    task: str
    prompt: str
    working: str
    answer: str  # already formatted exactly as it appears after "Answer:"


class NumericDomain(Domain):
    """A domain whose response is one line of working followed by ``Answer: <number>``.

    Task types are used in rotation (by index) so every split is balanced across them.
    """

    tasks: ClassVar[tuple[Callable[[random.Random], Item], ...]]
    rel_tol: ClassVar[float]

    def make(self, rng: random.Random, index: int) -> Example:
        item = self.tasks[index % len(self.tasks)](rng)
        return Example(
            id="",
            prompt=item.prompt,
            response=f"{item.working}\nAnswer: {item.answer}",
            source=self.name,
            # Gold is parsed back from the displayed text so meta and response can never disagree.
            meta={"domain": self.name, "task": item.task, "answer": float(item.answer)},
        )

    def check(self, example: Example, completion: str) -> bool:
        return numbers_match(parse_answer(completion), float(example.meta["answer"]), self.rel_tol)
