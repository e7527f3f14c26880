"""``utility:lm_eval:<task>[,option=value...]``: a task of EleutherAI's lm-evaluation-harness, on the same model.

The model object safeft evaluates (a LoRA run included) is handed to lm-eval's ``HFLM`` as it is
(``HFLM(pretrained=<model>, tokenizer=<tokenizer>)`` accepts an instantiated model), so the number is of
exactly the weights the other suites measured; nothing is saved or reloaded. ``<task>`` is a task or group
lm-eval knows (``gsm8k``, ``mmlu``, ``ifeval``; their data come from the hub, so they need a network) or the
path of a task YAML of your own (``tasks/my_task.yaml``; its folder is searched for the files it includes).
Options, comma-separated after the task:

* ``num_fewshot=N``: lm-eval's few-shot count (default: the task's own);
* ``chat=true``: render through the model's chat template with the run's system prompt (lm-eval's
  ``apply_chat_template``); off by default, as in lm-eval and most published numbers;
* ``include=DIR``: another folder of task YAMLs to search for ``<task>``;
* ``metric=NAME`` / ``filter=NAME``: which of the task's numbers is the headline (default: its first).

Decoding follows the task's own ``generation_kwargs`` (not ``eval.max_new_tokens``), so numbers compare with
lm-eval's. lm-eval is an optional dependency (``pip install 'safeft[lm_eval]'``), imported only when such a
suite is built. The summary holds the task's metrics as lm-eval reports them, the headline ``metric`` and
``score``, ``n``, and ``accuracy`` with its Wilson interval when the headline is the share of correct items;
each record holds the prompt, the model's answer (the generated text, or the choice it scored highest),
``gold``, ``correct`` and the per-sample metrics.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safeft import io
from safeft.config import ConfigError, EvalConfig
from safeft.data.types import Example
from safeft.eval.suites.base import SUITES, Suite, SuiteInputs
from safeft.hooks import eval_mode
from safeft.stats import put_rate

log = logging.getLogger(__name__)

OPTIONS = ("num_fewshot", "chat", "include", "metric", "filter")
INSTALL = "pip install 'safeft[lm_eval]'"
_YAML = (".yaml", ".yml")


class HarnessError(ConfigError):
    """lm-evaluation-harness is missing, or a task or option cannot be used."""


def require_lm_eval() -> None:
    """Raise a clear error naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401 - optional dependency, imported only when such a suite is asked for
    except ImportError as e:
        raise HarnessError(
            f"the utility:lm_eval suites need lm-evaluation-harness, which is not installed; install it with: {INSTALL}"
        ) from e


def parse(arg: str, name: str) -> tuple[str, dict[str, Any]]:
    """``<task>[,key=value...]`` -> (task, options), checked."""
    task, *parts = [p.strip() for p in arg.split(",")]
    if not task or "=" in task:
        raise HarnessError(f"suite {name!r}: name the task first (utility:lm_eval:gsm8k,num_fewshot=5)")
    opts: dict[str, Any] = {}
    for part in filter(None, parts):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not value:
            raise HarnessError(f"suite {name!r}: option {part!r} is not of the form key=value")
        if key not in OPTIONS:
            hint = difflib.get_close_matches(key, OPTIONS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise HarnessError(f"suite {name!r}: unknown option {key!r}{extra} (options: {', '.join(OPTIONS)})")
        if key in opts:
            raise HarnessError(f"suite {name!r}: option {key!r} given twice")
        opts[key] = value
    if "num_fewshot" in opts:
        if not opts["num_fewshot"].isdigit():
            raise HarnessError(f"suite {name!r}: num_fewshot must be a whole number >= 0, not {opts['num_fewshot']!r}")
        opts["num_fewshot"] = int(opts["num_fewshot"])
    if "chat" in opts:
        flag = opts["chat"].lower()
        if flag not in ("true", "false"):
            raise HarnessError(f"suite {name!r}: chat must be true or false, not {opts['chat']!r}")
        opts["chat"] = flag == "true"
    if "include" in opts and not Path(opts["include"]).is_dir():
        raise HarnessError(f"suite {name!r}: include={opts['include']}: no such folder")
    return task, opts


@SUITES.register(
    "utility:lm_eval",
    ":<task or task.yaml>[,num_fewshot=][,chat=true][,include=DIR][,metric=][,filter=] an lm-evaluation-harness "
    "task on the same model (optional: pip install 'safeft[lm_eval]')",
)
class LmEval(Suite):
    kind = "utility:lm_eval"
    arg = "required"
    arg_help = "an lm-eval task"

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.task, self.options = parse(arg, self.name)
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        include = [self.options["include"]] if "include" in self.options else []
        if self.task.endswith(_YAML):
            path = Path(self.task)
            if not path.is_file():
                raise HarnessError(f"suite {self.name!r}: {self.task}: no such task file")
            # Only the file's own folder: scanning lm-eval's ~15k built-in tasks takes seconds and a local
            # task never needs them. The task is then loaded by the name its file gives it (lm-eval 0.4.13
            # cannot load a group by its file's path).
            self.manager = TaskManager(include_path=[str(path.parent), *include], include_defaults=False)
            index = self.manager.task_index
            names = [n for n, e in index.items() if e.yaml_path and Path(e.yaml_path).resolve() == path.resolve()]
            if len(names) != 1:
                found = f" ({', '.join(names)})" if names else " (a 'task:' or 'group:' key, valid YAML?)"
                raise HarnessError(f"suite {self.name!r}: lm-eval finds {len(names)} tasks in {self.task}{found}")
            self.spec = names[0]
        else:
            self.spec = self.task
            self.manager = TaskManager(include_path=include or None)
            if self.task not in self.manager.all_tasks:  # fails here, before any suite generates
                hint = difflib.get_close_matches(self.task, self.manager.all_tasks, n=3)
                extra = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
                raise HarnessError(f"suite {self.name!r}: lm-eval has no task or group {self.task!r}{extra}")

    def items(self, cfg: EvalConfig) -> list[Example]:
        return []  # lm-eval owns the task's documents (and --limit, passed to it)

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        opts = self.options
        if inp.settings.backend != "hf":
            log.info("%s: lm-eval runs the model through transformers (HFLM), not %s", self.name, inp.settings.backend)
        chat = bool(opts.get("chat", False))
        with eval_mode(inp.model), _rng_kept():
            lm = HFLM(pretrained=inp.model, tokenizer=inp.tok, batch_size=inp.settings.batch_size)
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[self.spec],
                task_manager=self.manager,
                num_fewshot=opts.get("num_fewshot"),
                limit=inp.limit,
                apply_chat_template=chat,
                system_instruction=inp.settings.system_prompt if chat else None,
                log_samples=True,
                # lm-eval's default (100000 resamples) can take minutes for corpus-level metrics; 1000 gives
                # their stderr to two digits, and mean metrics use the closed form anyway
                bootstrap_iters=1000,
            )
        if res is None:  # only a non-zero rank of a distributed launch gets None
            raise HarnessError(f"{self.name}: lm-eval returned no results (a multi-process launch?)")
        top = _top_name(res)
        # an lm-eval result entry: "metric,filter" -> number, beside name, alias, sample_len
        metrics = {k: _number(v) for k, v in res["results"][top].items() if "," in k}
        metric = self._headline(metrics, top)
        # (subtask, sample) under the headline's filter: lm-eval keeps one sample per document and filter
        samples = [
            (t, s) for t, rows in res["samples"].items() for s in rows if s.get("filter") == metric.split(",")[1]
        ]
        entry: dict[str, Any] = {
            "task": top,
            "lm_eval_version": lm_eval.__version__,
            "num_fewshot": res["n-shot"].get(top, _shots(res)),
            "chat_template": chat,
            "metric": metric,
            "score": metrics[metric],
            "higher_is_better": _higher_is_better(res, top, metric.split(",")[0]),
            "metrics": metrics,
            "n": len(samples),
        }
        if len(res["samples"]) > 1:
            entry["subtasks"] = {t: len(rows) for t, rows in sorted(res["samples"].items())}
        if inp.limit is not None:
            entry["limit"] = inp.limit  # lm-eval applies it per (sub)task
        values = [s.get(metric.split(",")[0]) for _, s in samples]
        binary = bool(values) and all(isinstance(v, int | float | bool) and float(v) in (0.0, 1.0) for v in values)
        k = int(sum(float(v) for v in values)) if binary else None
        # The Wilson interval only where the task's own number IS the share of correct items (a group that
        # averages its subtasks unweighted is not); lm-eval's stderr stays in `metrics` either way.
        if k is not None and metrics[metric] is not None and math.isclose(k / len(values), metrics[metric]):
            put_rate(entry, "accuracy", k, len(values))
        if inp.out is not None:
            recs = [self._record(res, task, s, metric, chat) for task, s in samples]
            io.write_jsonl(inp.out / self.records_file, recs)
        return entry

    def _headline(self, metrics: dict[str, Any], top: str) -> str:
        """The ``metric,filter`` key of the headline number: the options', else the task's first."""
        keys = [k for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr")]
        want_m, want_f = self.options.get("metric"), self.options.get("filter")
        chosen = [k for k in keys if want_m in (None, k.split(",")[0]) and want_f in (None, k.split(",")[1])]
        if not chosen:
            raise HarnessError(
                f"{self.name}: no metric{' ' + want_m if want_m else ''}{' with filter ' + want_f if want_f else ''} "
                f"in {top}'s results (it has: {', '.join(keys) or 'none'})"
            )
        return chosen[0]

    def _record(self, res: dict[str, Any], task: str, s: dict[str, Any], metric: str, chat: bool) -> dict[str, Any]:
        name = metric.split(",")[0]
        args = s.get("arguments") or [[""]]
        value = s.get(name)
        rec = {
            "id": f"{task}-{s['doc_id']}",
            "suite": self.name,
            "task": task,
            "prompt": str(args[0][0]),
            "completion": _answer(res["configs"][task].get("output_type"), args, s.get("filtered_resps")),
            "gold": _gold(res["configs"][task].get("output_type"), args, s.get("target")),
            "correct": bool(value) if isinstance(value, int | float | bool) and float(value) in (0.0, 1.0) else None,
            "metrics": {m: s.get(m) for m in s.get("metrics", [])},
            "resps": s.get("filtered_resps"),
            "settings": {"lm_eval": res.get("lm_eval_version"), "num_fewshot": res["n-shot"].get(task), "chat": chat},
        }
        return json.loads(json.dumps(rec, default=_plain))


def _top_name(res: dict[str, Any]) -> str:
    """The task or group asked for: the one result no group lists as its child."""
    children = {c for subs in res.get("group_subtasks", {}).values() for c in subs}
    tops = [t for t in res["results"] if t not in children]
    if len(tops) != 1:
        raise HarnessError(f"lm-eval returned {len(tops)} top-level results ({', '.join(tops)}); expected one")
    return tops[0]


def _shots(res: dict[str, Any]) -> int | None:
    shots = set(res.get("n-shot", {}).values())
    return shots.pop() if len(shots) == 1 else None


def _higher_is_better(res: dict[str, Any], top: str, metric: str) -> bool | None:
    hib = res.get("higher_is_better", {}).get(top, {})
    return hib.get(metric) if isinstance(hib, dict) else None


def _answer(output_type: str | None, args: list[Any], resps: Any) -> str:
    """What the model answered: the generated text, or the continuation it scored highest."""
    if output_type == "generate_until":
        return str(resps[0] if isinstance(resps, list | tuple) and resps else resps)
    if output_type == "multiple_choice" and isinstance(resps, list | tuple) and resps:
        lls = [r[0] if isinstance(r, list | tuple) else r for r in resps]
        best = max(range(len(lls)), key=lambda i: float(lls[i]))
        return str(args[best][1]).strip()
    return ""  # loglikelihood(_rolling): a score, not an answer; it is in `resps`


def _gold(output_type: str | None, args: list[Any], target: Any) -> Any:
    """The gold answer as text where lm-eval keeps a choice's index."""
    if output_type == "multiple_choice" and isinstance(target, int) and 0 <= target < len(args):
        return str(args[target][1]).strip()
    return target


def _number(value: Any) -> Any:
    """lm-eval writes "N/A" for a stderr it did not compute; JSON wants null there."""
    if isinstance(value, str):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, tuples: as plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's global generators; put them back afterwards so a suite
    that runs next decodes as it would have without this one."""
    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
