"""``utility:task:<data source>[,option=value...]``: utility on the user's own task, scored against gold answers.

The data source is any registered one (``jsonl:my_test.jsonl``, ``csv:qa.csv``, ``hf:org/set:test``); each row
gives a prompt (``prompt``, ``question``, ``instruction`` or a ``messages`` conversation ending on the user's
turn followed by the answer) and a gold answer (``answer``, ``response``, ``output``, ``completion``, or the
column named by ``gold=``). Options, comma-separated after the source:

* ``check=exact`` (default): the completion's answer — the rest of the line after its last ``Answer:``, else
  the whole completion — equals the gold after case-folding, collapsing whitespace and stripping surrounding
  quotes and punctuation;
* ``check=numeric``: the number after the last ``Answer:`` (else the last number; ``$``, ``,`` and ``%``
  ignored) is within ``tol`` (relative, default 1e-6) of the gold, which must be a number;
* ``check=<module>:<function>`` or ``check=<path/to/file.py>:<function>``: the user's own checker, called as
  ``fn(prompt, completion, gold) -> bool`` (or ``(bool, reason)``). Naming it is the opt-in to running that
  code in this process: it is imported when the suite is built, before anything is generated;
* ``prompt=<column>`` / ``gold=<column>``: read the prompt or the gold answer from another column.

Every row is checked when the items are loaded (a gold answer present, a number for ``check=numeric``, one
turn), so a bad row stops the suite before any generation, naming the file and line. The summary holds
``accuracy`` with its Wilson interval and the reference answers' NLL, like ``utility:<domain>``; each record
holds ``gold``, ``correct`` and ``reason``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeft import io
from safeft.config import ConfigError, EvalConfig
from safeft.data.types import DataError, Example
from safeft.eval import records
from safeft.eval.generate import generate_full
from safeft.eval.suites.base import SUITES, Suite, SuiteInputs, stats, subset
from safeft.stats import put_rate

OPTIONS = ("check", "tol", "prompt", "gold")
BUILTIN_CHECKS = ("exact", "numeric")
DEFAULT_TOL = 1e-6
# The aliases the data sources read a row's response from (safeft.data.sources.RESPONSE_KEYS) plus "response".
_RESPONSE_COLUMNS = ("response", "output", "answer", "completion")

# (prompt, completion, gold) -> (correct, reason for the record)
Check = Callable[[str, str, Any], tuple[bool, str]]


class CheckerError(ConfigError):
    """The user's checker cannot be loaded, raised, or returned something other than a verdict."""


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """The parsed suite argument."""

    source: str
    check: str = "exact"
    tol: float = DEFAULT_TOL
    prompt: str | None = None
    gold: str | None = None

    @classmethod
    def parse(cls, arg: str, name: str) -> TaskOptions:
        source, *parts = [p.strip() for p in arg.split(",")]
        if not source or "=" in source.partition(":")[0]:
            raise ConfigError(f"suite {name!r}: name the data source first (utility:task:jsonl:my.jsonl,check=...)")
        opts: dict[str, str] = {}
        for part in filter(None, parts):
            key, eq, value = (s.strip() for s in part.partition("="))
            if not eq or not value:
                raise ConfigError(f"suite {name!r}: option {part!r} is not of the form key=value")
            if key not in OPTIONS:
                hint = difflib.get_close_matches(key, OPTIONS, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"suite {name!r}: unknown option {key!r}{extra} (options: {', '.join(OPTIONS)})")
            if key in opts:
                raise ConfigError(f"suite {name!r}: option {key!r} given twice")
            opts[key] = value
        tol = DEFAULT_TOL
        if "tol" in opts:
            try:
                tol = float(opts["tol"])
            except ValueError:
                raise ConfigError(f"suite {name!r}: tol={opts['tol']!r} is not a number") from None
            if not (tol >= 0 and math.isfinite(tol)):
                raise ConfigError(f"suite {name!r}: tol must be a finite number >= 0, not {tol}")
            if opts.get("check") != "numeric":
                raise ConfigError(f"suite {name!r}: tol= goes with check=numeric")
        return cls(source, opts.get("check", "exact"), tol, opts.get("prompt"), opts.get("gold"))


# ------------------------------------------------------------------------------------------- checkers

_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\$\s*)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_EDGE = " \t\r\n\"'`*.,;:!?"


def final_answer(completion: str) -> str:
    """The rest of the line after the last ``Answer:``, else the whole completion."""
    marks = list(_MARKER.finditer(completion))
    if not marks:
        return completion
    return completion[marks[-1].end() :].strip().split("\n", 1)[0]


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes, emphasis and punctuation stripped."""
    return " ".join(text.casefold().split()).strip(_EDGE)


def completion_number(completion: str) -> float | None:
    """The number after the last ``Answer:``, else the last number in the completion."""
    marks = list(_MARKER.finditer(completion))
    if marks:
        found = _NUMBER.search(completion, marks[-1].end())
        if found:
            return _to_float(found.group())
    found_all = _NUMBER.findall(completion)
    return _to_float(found_all[-1]) if found_all else None


def gold_number(gold: Any) -> float | None:
    """A gold answer as a number (``42``, ``"42"``, ``"1,000"``, ``"$3.50"``, ``"12%"``), or None."""
    if isinstance(gold, bool):
        return None
    if isinstance(gold, int | float):
        return float(gold) if math.isfinite(gold) else None
    text = str(gold).strip().rstrip("%").strip()
    return _to_float(text) if _NUMBER.fullmatch(text) else None


def _to_float(token: str) -> float:
    return float(token.replace("$", "").replace(",", "").replace(" ", ""))


def exact(prompt: str, completion: str, gold: Any) -> tuple[bool, str]:
    got = final_answer(completion)
    return normalise(got) == normalise(str(gold)), f"answer {_short(got)}"


def numeric(tol: float) -> Check:
    def check(prompt: str, completion: str, gold: Any) -> tuple[bool, str]:
        want, got = gold_number(gold), completion_number(completion)
        if got is None:
            return False, "no number in the completion"
        assert want is not None  # every gold was checked to be a number when the items were loaded
        return math.isclose(got, want, rel_tol=tol, abs_tol=0.0), f"answer {got:g} (gold {want:g}, rel. tol {tol:g})"

    return check


def load_checker(ref: str) -> Callable[..., Any]:
    """The user's function named by ``module:function`` or ``path/to/file.py:function``, imported now."""
    target, sep, fn_name = ref.rpartition(":")
    if not sep or not target or not fn_name:
        raise CheckerError(f"check={ref!r}: name a checker as module:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise CheckerError(f"check={ref!r}: {target}: no such file")
        module_name = f"safeft_user_checker_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise CheckerError(f"check={ref!r}: {target} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling in the user's file look it up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise CheckerError(f"check={ref!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise CheckerError(
                f"check={ref!r}: cannot import module {target!r} ({type(e).__name__}: {e}); "
                "a module must be importable (installed or on PYTHONPATH), or name a file: path/to/file.py:function"
            ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        hint = difflib.get_close_matches(fn_name, found, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise CheckerError(f"check={ref!r}: {target} has no function {fn_name!r}{extra}")
    return fn


def user_check(ref: str, fn: Callable[..., Any]) -> Check:
    """Call the user's checker; an exception or a non-verdict is an error naming the checker (the caller
    adds the row)."""

    def check(prompt: str, completion: str, gold: Any) -> tuple[bool, str]:
        out = fn(prompt, completion, gold)
        reason = ""
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], str):
            out, reason = out
        # numpy's bool_ is not a bool; anything else (a string, a score) is almost surely a bug in the checker
        if not (isinstance(out, bool) or type(out).__name__ == "bool_"):
            raise CheckerError(f"checker {ref} returned {type(out).__name__} {_short(out)}, not True/False")
        return bool(out), reason

    return check


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------- suite


@SUITES.register(
    "utility:task",
    ":<data source>[,check=exact|numeric|<module:fn>|<file.py:fn>][,tol=][,prompt=][,gold=] accuracy on your own "
    "task's gold answers",
)
class TaskUtility(Suite):
    kind = "utility:task"
    arg = "required"
    arg_help = "a data source"

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.options = TaskOptions.parse(arg, self.name)
        check = self.options.check
        if check == "exact":
            self.check: Check = exact
        elif check == "numeric":
            self.check = numeric(self.options.tol)
        elif ":" in check:  # loaded now: a bad checker fails before anything is generated
            self.check = user_check(check, load_checker(check))
        else:
            hint = difflib.get_close_matches(check, BUILTIN_CHECKS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"suite {self.name!r}: unknown check {check!r}{extra} "
                "(exact, numeric, or your own as module:function or path/to/file.py:function)"
            )

    def items(self, cfg: EvalConfig) -> list[Example]:
        from safeft.data.sources import load_source

        o = self.options
        columns = {"prompt": o.prompt} if o.prompt else {}
        if o.gold in _RESPONSE_COLUMNS:
            columns["response"] = o.gold  # read only that one, so a row with two answer columns is no ambiguity
        rows = load_source(o.source, columns=columns or None)
        if not rows:
            raise DataError(f"{o.source}: no rows")
        out = [self._checked(ex) for ex in rows]  # every row, not only the subset: a bad row is a data bug
        return subset(out, cfg.n_utility, cfg.seed)

    def _checked(self, ex: Example) -> Example:
        o = self.options
        where = f"{ex.location} (suite {self.name})"
        if ex.context:
            raise DataError(f"{where}: the row has earlier turns; this suite asks single-turn questions")
        if o.gold and o.gold not in _RESPONSE_COLUMNS:
            if o.gold not in ex.meta or ex.meta[o.gold] is None:
                raise DataError(f"{where}: no gold answer: column {o.gold!r} is missing")
            gold = ex.meta[o.gold]
        else:
            if ex.response is None:
                want = repr(o.gold) if o.gold else "an answer/response/output/completion column"
                raise DataError(f"{where}: no gold answer ({want}); name another column with gold=<column>")
            gold = ex.response
        if isinstance(gold, dict | list) or (isinstance(gold, str) and not gold.strip()):
            raise DataError(f"{where}: the gold answer must be a non-empty string or a number, got {_short(gold)}")
        if o.check == "numeric" and gold_number(gold) is None:
            raise DataError(f"{where}: check=numeric but the gold answer {_short(gold)} is not a number")
        # the reference answer as the response, for the answer NLL
        return dataclasses.replace(ex, response=str(gold), meta={**ex.meta, "gold": gold})

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        from safeft.eval.suites.checked import answer_nll

        gens = generate_full(inp.model, inp.tok, [e.prompt for e in items], inp.settings, desc=self.name)
        verdicts = []
        for e, g in zip(items, gens, strict=True):
            try:
                verdicts.append(self.check(e.prompt, g.text, e.meta["gold"]))
            except CheckerError as err:
                raise CheckerError(f"{err} on {e.location}") from err
            except Exception as err:  # the user's code: say whose code failed on which row
                raise CheckerError(
                    f"checker {self.options.check} raised {type(err).__name__}: {err} on {e.location}"
                ) from err
        if inp.out is not None:
            pairs = zip(items, verdicts, strict=True)
            extra = [{"gold": e.meta["gold"], "correct": ok, "reason": why} for e, (ok, why) in pairs]
            ids, prompts = [e.id for e in items], [e.prompt for e in items]
            recs = records.build_records(self.name, ids, prompts, gens, inp.settings, inp.tok, extra)
            io.write_jsonl(inp.out / self.records_file, recs)
        entry: dict[str, Any] = {"source": self.options.source, "check": self.options.check}
        if self.options.check == "numeric":
            entry["tol"] = self.options.tol
        entry["answer_nll"] = answer_nll(inp.model, inp.tok, items, inp.settings.system_prompt) if items else None
        entry.update(stats(inp.settings, items, inp.limit, gens))
        return put_rate(entry, "accuracy", sum(ok for ok, _ in verdicts), len(verdicts))
