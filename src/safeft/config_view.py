"""The resolved config as commented YAML: every key, its value (the default unless set), and what it means.

``safeft config [--config F] [--defense N] [k=v ...]`` prints it. The comments are the ones written beside
each field of the config dataclasses (``safeft.config`` and each defense's ``XConfig``), read from their
source, so the printed help cannot drift from the code. The output is itself a valid config file:
``safeft config train.steps=10 > my.yaml`` then ``safeft train --config my.yaml`` trains the same run.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from functools import cache
from typing import Any

import yaml


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} for a dataclass: the comment at the end of the field's line, else the comment lines
    just above it. Fields inherited from a base class take the base's comment."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # classes built at run time have no source
            continue
        out.update(_comments_in(src, {f.name for f in dataclasses.fields(klass)}))
    return out


def _comments_in(src: str, names: set[str]) -> dict[str, str]:
    comments: dict[int, str] = {}  # row -> comment text
    in_string: set[int] = set()  # rows inside a string (a docstring line "steps: ..." is not a field)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type == tokenize.STRING:
                # rows after the first: a field line may hold a one-line string default itself
                in_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = src.splitlines()
    body_indent = None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        stripped = line.lstrip()
        head = stripped.split(":", 1)[0].strip()
        if i in in_string or ":" not in stripped or not head.isidentifier() or head not in names:
            continue
        indent = len(line) - len(stripped)
        body_indent = indent if body_indent is None else body_indent
        if indent != body_indent:
            continue
        if i in comments:  # a comment at the end of the field's own line
            out[head] = comments[i]
            continue
        above, j = [], i - 1
        while j >= 1 and j in comments and lines[j - 1].lstrip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[head] = " ".join(above)
    return out


def _dump_leaf(key: str, value: Any) -> list[str]:
    """``key: value`` on one line (lists in flow style), in a form YAML reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if "\n" in text or yaml.safe_load(f"{key}: {text}") != {key: value}:
        text = json.dumps(value)  # a JSON string is a YAML double-quoted scalar, newlines escaped
    return [f"{key}: {text}"]


def _optional_dataclass(tp: Any) -> type | None:
    """X for an annotation ``X | None`` where X is a dataclass; else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _render(obj: Any, indent: int) -> list[str]:
    pad = " " * indent
    comments = field_comments(type(obj))
    hints = typing.get_type_hints(type(obj))
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        note = comments.get(f.name)
        if note:
            out += [f"{pad}# {ln}" for ln in textwrap.wrap(note, 110 - indent)]
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            out += _render(value, indent + 2)
            continue
        inner = _optional_dataclass(hints[f.name]) if value is None else None
        if inner is not None:
            # An unset optional section: show its keys (commented out) so they can be found and set.
            out.append(f"{pad}# {f.name}: unset; its keys, when set ({f.name}.<key>=...):")
            out += [f"{pad}#   {ln.strip()}" for ln in _template(inner)]
        out += [pad + ln for ln in _dump_leaf(f.name, value)]
    return out


def _template(cls: type) -> list[str]:
    comments = field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            shown = _dump_leaf(f.name, f.default)[0]
        elif f.default_factory is not dataclasses.MISSING:
            shown = _dump_leaf(f.name, f.default_factory())[0]
        else:
            shown = f"{f.name}: (required)"
        note = comments.get(f.name)
        lines.append(f"{shown}  # {note}" if note else shown)
    return lines


def commented_yaml(cfg: Any) -> str:
    """Every key of the dataclass config ``cfg`` with its value, each preceded by its comment."""
    return "\n".join(_render(cfg, 0)) + "\n"
