"""``evaluate``: run named suites on one model and keep every result (``safeft.eval.results``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from safeft.config import ConfigError, EvalConfig
from safeft.eval import judges
from safeft.eval.generate import GenSettings
from safeft.eval.results import Store
from safeft.eval.suites.base import Suite, SuiteInputs, suite_class

log = logging.getLogger(__name__)


def build_suites(names: Sequence[str], domains: Sequence[str] = ()) -> list[Suite]:
    """The suites that ``names`` stand for, checked, in order, without repeats; a bare name of a suite that
    needs a domain (``utility``) means one suite per entry of ``domains``."""
    out: dict[str, Suite] = {}
    for name in names:
        cls = suite_class(name)  # unknown kinds raise with a did-you-mean
        expanded = cls.expand(name, domains)
        if not expanded:
            log.warning("suite %r skipped: no domain (name one: %s:<domain> or --domain)", name, cls.kind)
        for suite in expanded:
            out.setdefault(suite.name, suite)
    return list(out.values())


def parse_suites(names: Sequence[str], domains: Sequence[str] = ()) -> list[str]:
    """Validate suite names and expand bare ``utility`` into ``utility:<d>`` for each of ``domains``."""
    return [s.name for s in build_suites(names, domains)]


def settings_key(
    cfg: EvalConfig, settings: GenSettings, tok, limit: int | None, model_id: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything that changes an evaluation's numbers; its hash names the evaluation's directory. The hf
    backend's batch size is in it (``GenSettings.identity``): another batch size is another evaluation, kept
    beside the first instead of overwriting its records."""
    return {
        "model": model_id or {},
        "judge": cfg.judge,
        "n": {"harmful": cfg.n_harmful, "over_refusal": cfg.n_over_refusal, "utility": cfg.n_utility},
        "seed": cfg.seed,
        "limit": limit,
        "generation": settings.identity(tok),
        "humaneval_max_new_tokens": cfg.humaneval_max_new_tokens,
    }


def evaluate(
    model: nn.Module,
    tok,
    cfg: EvalConfig,
    out: Path | None,
    domains: Sequence[str] = (),
    system_prompt: str | None = None,
    suites: Sequence[str] | None = None,
    limit: int | None = None,
    model_id: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the suites (default ``cfg.suites``) and return this evaluation's summary, one entry per suite.

    With ``out``, records and summaries go under ``out/eval`` (layout: ``safeft.eval.results``), in a
    directory named by the hash of the settings, ``model_id`` (e.g. the run's checkpoint step) included.
    ``limit`` caps every suite at its first N items (after the fixed seeded subset) for smoke runs; the
    summary says so (``limit``) and the run's merged ``summary.json`` never takes such an entry.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, not {limit}")
    chosen = build_suites(cfg.suites if suites is None else suites, domains)
    if any("judge" in s.needs for s in chosen):
        judges.get(cfg.judge)  # a bad judge spec fails here, not after minutes of generation
    settings = GenSettings.from_eval(cfg, system_prompt)
    store = Store(Path(out) / "eval") if out is not None else None
    eval_dir = None
    if store is not None and chosen:
        eval_dir = store.begin(settings_key(cfg, settings, tok, limit, model_id), full=limit is None)
        log.info("evaluation %s: records under %s", eval_dir.name, eval_dir)
    summary: dict[str, Any] = {}
    for suite in chosen:
        items = suite.items(cfg)
        items = items[:limit] if limit is not None else items
        inp = SuiteInputs(model, tok, suite.settings(settings, cfg), cfg.judge, eval_dir, limit)
        summary[suite.name] = suite.run(inp, items)
        if store is not None and eval_dir is not None:
            store.commit(eval_dir, suite.name, summary[suite.name], suite.records_file)
    return summary


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for tables: asr, over_refusal, utility accuracy / nll per domain."""
    row: dict[str, float] = {}
    if "harmful" in summary:
        row["asr"] = summary["harmful"]["asr"]
    if "over_refusal" in summary:
        row["over_refusal"] = summary["over_refusal"]["refusal_rate"]
    for k, v in summary.items():
        if k.startswith("utility:"):
            # every utility suite has accuracy but one whose lm-eval metric is no share of items (its score
            # then); only those scored by generating against a gold answer have the answer NLL
            if "accuracy" in v:
                row[f"{k}/acc"] = v["accuracy"]
            elif "metric" in v:
                row[f"{k}/{v['metric'].split(',')[0]}"] = v["score"]
            if "answer_nll" in v:
                row[f"{k}/nll"] = v["answer_nll"]
        elif k.startswith("harmful:"):
            row[f"asr:{k.split(':', 1)[1]}"] = v["asr"]
        elif k.startswith("over_refusal:"):
            row[f"over_refusal:{k.split(':', 1)[1]}"] = v["refusal_rate"]
        elif k == "humaneval":
            row["humaneval/pass@1"] = v["pass@1"]
    return row
