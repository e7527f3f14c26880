"""Suites scored by a judge: ``harmful`` (ASR) and ``over_refusal`` (refusal rate on benign probes).

Both generate once, store every verdict of the suite judge and of the ``incoherent`` rule with each record
(so HS+ can always be computed and ``--rescore`` can add judges later), and report the metrics of every
judge on the records (``safeft.eval.records`` defines them). ``harmful`` and ``over_refusal`` the functions
are the same pipeline for callers that bring their own items: the ASR logged during training, diagnosis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safeft import io
from safeft.config import EvalConfig
from safeft.data.types import Example
from safeft.eval import judges, records
from safeft.eval.generate import GenSettings, generate_full
from safeft.eval.suites.base import SUITES, Suite, SuiteInputs, stats, subset


def judged(
    model, tok, items: list[Example], settings: GenSettings, judge: str, out: Path | None, suite: str, limit=None
) -> dict[str, Any]:
    """Generate, judge with ``judge`` and the incoherence rule, write ``out/<suite>.jsonl`` when ``out`` is
    given; the summary entry without its headline number (``judge``, ``judges`` per judge, counts)."""
    gens = generate_full(model, tok, [e.prompt for e in items], settings, desc=suite)
    prompts, comps = [e.prompt for e in items], [g.text for g in gens]
    recs = records.build_records(suite, [e.id for e in items], prompts, gens, settings, tok)
    records.add_verdicts(recs, judges.get(judge)(prompts, comps))
    if judges.name_of(judge) != records.INCOHERENT:
        records.add_verdicts(recs, judges.get(records.INCOHERENT)(prompts, comps))
    if out is not None:
        io.write_jsonl(out / f"{records.file_stem(suite)}.jsonl", recs)
    name = judges.name_of(judge)
    info = {"judge": name, "judge_specs": {name: judge}}
    return {**stats(settings, items, limit, gens), **info, "judges": records.all_metrics(recs)}


def harmful(
    model,
    tok,
    items: list[Example],
    settings: GenSettings,
    judge: str,
    out: Path | None,
    name: str = "harmful",
    limit: int | None = None,
) -> dict[str, Any]:
    """ASR of ``items`` (harmful prompts) under ``judge``."""
    entry = judged(model, tok, items, settings, judge, out, name, limit)
    head = entry["judges"][entry["judge"]]
    return {"asr": head.get("asr"), "asr_ci": head.get("asr_ci"), **entry}


def over_refusal(
    model,
    tok,
    items: list[Example],
    settings: GenSettings,
    judge: str,
    out: Path | None,
    limit: int | None = None,
    name: str = "over_refusal",
) -> dict[str, Any]:
    """Refusal rate of ``items`` (benign prompts) under ``judge``."""
    entry = judged(model, tok, items, settings, judge, out, name, limit)
    head = entry["judges"][entry["judge"]]
    return {"refusal_rate": head.get("refusal_rate"), "refusal_rate_ci": head.get("refusal_rate_ci"), **entry}


@SUITES.register("harmful", "[:<data source>] ASR on HarmBench test prompts (default) or on any data source's prompts")
class Harmful(Suite):
    kind = "harmful"
    needs = ("model", "tokenizer", "settings", "judge")
    arg = "optional"
    arg_help = "a data source"

    def items(self, cfg: EvalConfig) -> list[Example]:
        from safeft.data.sources import load_source
        from safeft.data.splits import safety_splits

        pool = load_source(self.argument) if self.argument else safety_splits(seed=cfg.seed).test
        return subset(pool, cfg.n_harmful, cfg.seed)

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        entry = harmful(inp.model, inp.tok, items, inp.settings, inp.judge, inp.out, self.name, inp.limit)
        return {**entry, "source": self.argument} if self.argument else entry


@SUITES.register(
    "over_refusal",
    "[:<split>|<prompts>] refusal rate on the held-out test split of our benign-but-edgy probes (default), "
    "another split (train, dev, legacy) or any prompt file / data source (XSTest, OR-Bench: jsonl:path)",
)
class OverRefusal(Suite):
    kind = "over_refusal"
    needs = ("model", "tokenizer", "settings", "judge")
    arg = "optional"
    arg_help = "a probe split or a prompt source"

    def items(self, cfg: EvalConfig) -> list[Example]:
        from safeft.data.probes import LEGACY, SPLITS, over_refusal_probes

        arg = self.argument
        # the test split unless told otherwise: dev chose the alignment setting, so it is not a held-out number
        split, source = (arg, None) if arg in (*SPLITS, LEGACY) else ("test", arg or None)
        return subset(over_refusal_probes(split=None if source else split, source=source), cfg.n_over_refusal, cfg.seed)

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        entry = over_refusal(inp.model, inp.tok, items, inp.settings, inp.judge, inp.out, inp.limit, self.name)
        arg = self.argument
        return {**entry, "probes": arg or "test"}
