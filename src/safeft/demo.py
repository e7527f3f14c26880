"""``safeft demo``: the whole chain on the embedded model, in one command.

base model --align--> aligned model --fine-tune on a benign domain, per method--> evaluate all of them,
print one table (ASR, over-refusal, utility) and write everything under ``runs/demo-<time>/``.

Every rate in the table carries its 95 % Wilson interval and n (``safeft.stats``). ASR and over-refusal are
shown under the configured judge and, re-judged from the stored completions (no generation), under the
29-marker keyword list the field reports, so a change of judge can never hide inside one number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from safeft import config as C
from safeft import devices, io, models
from safeft.align import align
from safeft.eval.records import rescore
from safeft.eval.suites import evaluate, headline
from safeft.stats import Rate, rate_in
from safeft.train import train

log = logging.getLogger(__name__)

# The judge most papers report ASR with; the demo shows it beside the configured one.
SECOND_OPINION = "refusal_keywords"


def _domain(cfg: C.RunConfig) -> str:
    from safeft.data.domains import run_domain

    domain = run_domain(cfg)
    if domain is None:
        task = cfg.data.task if cfg.data else ""
        raise C.ConfigError(f"the demo fine-tunes on one of our domains (data.task=domain:<name>), not {task!r}")
    return domain


# What `safeft demo` runs when no --config is given; configs/demo.yaml holds the same (a test keeps them equal).
DEMO_DEFAULTS: dict[str, Any] = {
    # 320 rows, one epoch of 40 steps: the grids' finance cell (configs/seeds_table_cpu.yaml), ~1.5 min less than
    # 600 rows / 75 steps, and SFT still takes ASR from ~10 % to ~80 % (docs/results.md)
    "data": {"task": "domain:finance", "n_train": 320},
    "train": {"steps": 40},
    # 48 new tokens: refusal markers appear in the first sentence and finance answers are ~30 tokens.
    # ASR on HarmBench's held-out half: the other half chose the stage-1 recipe (safeft.data.sources.HARMBENCH_PARTS).
    # Its 100 contextual behaviours too (configs/demo_contextual.yaml) add ~2 min: a fresh clone's demo would pass 10.
    # Batch 128: ~15 % faster than 64 on 2 cores (benchmarks/gen_batch.py); on CPU it changes 21 % (aligned model)
    # to 50 % (base model) of greedy completions' text (rounding moves near-ties): compare at one batch size only.
    "eval": {
        "max_new_tokens": 48,
        "batch_size": 128,
        "suites": ["harmful:harmbench:heldout", "over_refusal", "utility"],
    },
    "demo": {"methods": ["sft"]},
}


def demo(cfg: C.RunConfig, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    methods = cfg.demo.methods
    # a method is name[:key=value,...] (``saft+repanchor:pgd_mode=free``), built before anything is aligned or
    # trained, so a typo in the last method fails in a second
    defenses = {name: C.defense_from_spec(name, f"demo.methods[{i}]") for i, name in enumerate(methods)}
    dirs = [run_dir_name(m) for m in methods]
    if len(set(dirs)) < len(dirs):  # a second run into the same directory would resume or overwrite the first
        raise C.ConfigError(f"demo.methods: {methods} name the same run directory twice ({dirs})")
    domain = _domain(cfg)
    out = Path(cfg.out_dir) / (cfg.run_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.yaml")
    rows: dict[str, dict[str, float]] = {}
    cells: dict[str, dict[str, Rate | float]] = {}
    judged_by = _judges(cfg.eval)  # the configured judge, then the keyword list if that is another one
    timings: dict[str, float] = {}

    def _eval(label: str, model, tok, run_cfg: C.RunConfig = cfg) -> None:
        t = time.perf_counter()
        # the records go into the method's run directory: a label like saft+repanchor:pgd_mode=free is not a
        # directory name the train step would make
        summary = evaluate_twice(model, tok, run_cfg, out / run_dir_name(label), domain)
        rows[label] = headline(summary)
        cells[label] = table_cells(summary, domain, judged_by)
        timings[f"eval:{label}"] = time.perf_counter() - t
        log.info("%s: %s", label, rows[label])

    t = time.perf_counter()
    aligned_dir = align(cfg, progress=progress)
    timings["align"] = time.perf_counter() - t

    if cfg.demo.base_eval != "none":
        base, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))
        _eval("base", base, tok, base_suites(cfg))
        del base
    aligned, tok = models.load(str(aligned_dir), **devices.load_args(cfg.model))
    _eval("aligned", aligned, tok)
    del aligned

    for name in methods:
        t = time.perf_counter()
        ft_cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, spec=str(aligned_dir)), defense=defenses[name], run_id=None
        )
        res = train(ft_cfg, run_dir=out / run_dir_name(name), progress=progress)
        timings[f"train:{name}"] = time.perf_counter() - t
        _eval(name, res.model, res.tokenizer)

    timings["total"] = time.perf_counter() - t0
    result = {
        "domain": domain,
        "aligned_model": str(aligned_dir),
        "rows": rows,
        "rates": {label: {k: v.record() for k, v in c.items() if isinstance(v, Rate)} for label, c in cells.items()},
        "timings_s": timings,
        "eval": dataclasses.asdict(cfg.eval),
    }
    table = format_table(cells, domain, cfg.eval)
    if (suite := _harmful_suite(cfg.eval)) and (parts := harmbench_parts(suite)):
        by_part = {
            label: rates_by_part(_harmful_records(out / run_dir_name(label), suite), parts, judged_by)
            for label in cells
        }
        result["rates_by_part"] = {
            label: {part: {j: r.record() for j, r in per.items()} for part, per in bp.items()}
            for label, bp in by_part.items()
        }
        table += "\n\n" + format_parts(by_part, judged_by)
    io.write_json(out / "summary.json", result)
    io.write_text(out / "summary.md", table + "\n")
    print(table)
    print(f"\nwritten under {out}  (total {timings['total'] / 60:.1f} min)")
    return result


def base_suites(cfg: C.RunConfig) -> C.RunConfig:
    """``cfg`` with the eval suites ``demo.base_eval`` runs on the base model (all, or the harmful ones only)."""
    if cfg.demo.base_eval == "all":
        return cfg
    suites = [s for s in cfg.eval.suites if _of_kind(s, "harmful")]
    if not suites:
        raise C.ConfigError(f"demo.base_eval=harmful, but eval.suites {cfg.eval.suites} has no harmful suite")
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, suites=suites))


def run_dir_name(method: str) -> str:
    """A method spec as a directory name: ``saft+repanchor:pgd_mode=free`` -> ``saft+repanchor-pgd_mode-free``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", method)


def evaluate_twice(model, tok, cfg: C.RunConfig, out: Path, domain: str) -> dict[str, Any]:
    """Evaluate under ``cfg.eval.judge``, then re-judge the stored completions with the keyword list (text only,
    no generation; ``eval/summary.json`` and the records gain its verdicts)."""
    summary = evaluate(model, tok, cfg.eval, out, [domain], cfg.model.system_prompt)
    second = _judges(cfg.eval)[1:]
    if second and any(k.startswith(("harmful", "over_refusal")) for k in summary):
        rescore(out, second)
        # the run's merged summary now holds both judges' metrics for the evaluation just made
        merged = json.loads((Path(out) / "eval" / "summary.json").read_text())
        summary = {k: merged.get(k, v) for k, v in summary.items()}
    return summary


def _judges(ev: C.EvalConfig) -> list[str]:
    """The judges the table shows: the configured one first, then the keyword list if that is another."""
    from safeft.eval.judges import name_of

    return [ev.judge] + ([SECOND_OPINION] if name_of(ev.judge) != SECOND_OPINION else [])


def table_cells(summary: dict[str, Any], domain: str, judged_by: list[str]) -> dict[str, Rate | float]:
    """One table row: ``asr@<judge>`` and ``over_refusal@<judge>`` per judge, ``acc`` (Rates) and ``nll``."""
    from safeft.eval.judges import name_of

    out: dict[str, Rate | float] = {}
    for kind, key, col in (("harmful", "asr", "asr"), ("over_refusal", "refusal_rate", "over_refusal")):
        suite = _suite_of(summary, kind)
        per_judge = summary.get(suite, {}).get("judges", {}) if suite else {}
        for spec in judged_by:
            r = rate_in(per_judge.get(name_of(spec), {}), key)
            if r is not None:
                out[f"{col}@{name_of(spec)}"] = r
    util = summary.get(f"utility:{domain}", {})
    if (acc := rate_in(util, "accuracy")) is not None:
        out["acc"] = acc
    if "answer_nll" in util:
        out["nll"] = util["answer_nll"]
    return out


def _of_kind(suite: str, kind: str) -> bool:
    """``harmful`` and ``harmful:<source>`` are suites of kind ``harmful``."""
    return suite.split(":", 1)[0] == kind


def _suite_of(summary: dict[str, Any], kind: str) -> str | None:
    """The one suite of ``kind`` in ``summary`` (``harmful`` or ``harmful:<source>``); two would make the table's
    column ambiguous, so that raises."""
    found = [k for k in summary if _of_kind(k, kind)]
    if len(found) > 1:
        raise C.ConfigError(f"the demo's table has one {kind} column, but eval.suites runs {found}")
    return found[0] if found else None


def _harmful_suite(ev: C.EvalConfig) -> str | None:
    """The harmful suite in ``eval.suites`` (the table's ASR column), or None."""
    return next((s for s in ev.suites if _of_kind(s, "harmful")), None)


def _harmful_text(ev: C.EvalConfig) -> str:
    """What the ASR column was measured on, in words, from the harmful suite in ``eval.suites``."""
    name = _harmful_suite(ev) or "harmful"
    if name == "harmful":
        return "HarmBench test prompts (a fixed seeded subset)"
    if name == "harmful:harmbench:heldout":
        return "HarmBench's held-out half (harmful:harmbench:heldout; its other half chose the stage-1 recipe)"
    if name == "harmful:harmbench:heldout+contextual":
        return (
            "HarmBench's held-out behaviours (harmful:harmbench:heldout+contextual): the standard half that chose "
            "nothing and the 100 contextual ones"
        )
    return f"the prompts of {name}"


def harmbench_parts(suite: str) -> dict[str, set[str]]:
    """The HarmBench parts a harmful suite joins (``harmful:harmbench:heldout+contextual``) and each part's
    ids, so the table can say what each part contributed; empty for any other harmful suite."""
    from safeft.data.sources import load_source

    source = suite.split(":", 1)[1] if ":" in suite else ""
    if not source.startswith("harmbench:") or "+" not in source:
        return {}
    return {p: {e.id for e in load_source(f"harmbench:{p}")} for p in source.split(":", 1)[1].split("+")}


def _harmful_records(run_dir: Path, suite: str) -> list[dict[str, Any]]:
    from safeft.eval.records import file_stem, read_records

    found = sorted((run_dir / "eval").glob(f"*/{file_stem(suite)}.jsonl"))
    if len(found) != 1:  # a demo directory is new each run, so one evaluation per model; say so if not
        raise C.ConfigError(f"{run_dir}/eval: expected one records file of {suite}, found {len(found)}")
    return read_records(found[0])


def rates_by_part(records: list[dict[str, Any]], parts: dict[str, set[str]], judges: list[str]) -> dict:
    """``{part: {judge: Rate}}``: each judge's ASR over the records of each part (ids in ``parts``), counted the
    way the suite's own rate is (``safeft.eval.records.metrics``: unanswered items apart). Every record must
    fall in exactly one part, or the parts would not add up to the rate in the table."""
    from safeft.eval.judges import name_of
    from safeft.eval.records import metrics

    owners = {r["id"]: [p for p, ids in parts.items() if r["id"] in ids] for r in records}
    if stray := [i for i, ps in owners.items() if len(ps) != 1]:
        raise ValueError(f"records in no part or in several: {stray[:5]}")
    out: dict[str, dict[str, Rate]] = {}
    for part in parts:
        mine = [r for r in records if owners[r["id"]] == [part]]
        out[part] = {}
        for j in judges:
            r = rate_in(metrics(mine, name_of(j)), "asr") if mine else None
            if r is not None:
                out[part][name_of(j)] = r
    return out


def format_parts(by_part: dict[str, dict[str, dict[str, Rate]]], judges: list[str]) -> str:
    """The ASR column split by HarmBench part, one line per model."""
    from safeft.eval.judges import name_of

    lines = ["ASR by HarmBench part (" + " / ".join(name_of(j) for j in judges) + "):"]
    for label, bp in by_part.items():
        cells = [f"{part} " + " / ".join(r.format() for r in per.values()) for part, per in bp.items()]
        lines.append(f"- {label}: " + "; ".join(cells))
    return "\n".join(lines)


def format_table(cells: dict[str, dict[str, Rate | float]], domain: str, ev: C.EvalConfig) -> str:
    """Markdown table; each rate as "8.0 % [4.1, 15.0]" with its n in the header (or the cell, if n varies)."""
    from safeft.eval.judges import name_of

    judged_by = [name_of(j) for j in _judges(ev)]
    cols: list[tuple[str, str]] = []  # (cell key, header)
    for col, title in (("asr", "ASR ↓"), ("over_refusal", "over-refusal ↓")):
        for j in judged_by:
            cols.append((f"{col}@{j}", title if len(judged_by) == 1 else f"{title} ({j})"))
    cols += [("acc", f"{domain} acc ↑"), ("nll", f"{domain} answer NLL ↓")]
    ns = {key: {c[key].n for c in cells.values() if isinstance(c.get(key), Rate)} for key, _ in cols}
    heads = [h + (f" n={next(iter(ns[key]))}" if len(ns[key]) == 1 else "") for key, h in cols]
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, c in cells.items():
        row = []
        for key, _ in cols:
            v = c.get(key)
            if isinstance(v, Rate):
                text = v.format()
                row.append(text if len(ns[key]) > 1 else text.rsplit(" (n=", 1)[0])
            else:
                row.append("–" if v is None else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append(
        f"\nASR: {_harmful_text(ev)}, greedy, max_new_tokens={ev.max_new_tokens}; judges: {', '.join(judged_by)} "
        "(the first decides eval/summary.json's headline). Over-refusal: our benign-but-edgy probes. Utility: "
        "the domain's test split. Brackets: 95 % Wilson intervals."
    )
    return "\n".join(lines)
