"""``safeft demo``: the whole chain on the embedded model, in one command.

base model --align--> aligned model --fine-tune on a benign domain, per method--> evaluate all of them,
print one table (ASR, over-refusal, utility) and write everything under ``runs/demo-<time>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from safeft import config as C
from safeft import devices, io, models
from safeft.align import align
from safeft.eval.suites import evaluate, headline
from safeft.train import train

log = logging.getLogger(__name__)


def _domain(cfg: C.RunConfig) -> str:
    task = cfg.data.task if cfg.data else ""
    if not task.startswith("domain:"):
        raise C.ConfigError(f"the demo fine-tunes on one of our domains (data.task=domain:<name>), not {task!r}")
    return task.split(":")[1]


# What `safeft demo` runs when no --config is given; configs/demo.yaml holds the same (a test keeps them equal).
DEMO_DEFAULTS: dict[str, Any] = {
    "data": {"task": "domain:finance", "n_train": 600},
    # 48 new tokens: refusal markers appear in the first sentence and finance answers are ~30 tokens;
    # it keeps the whole demo inside 15 minutes on 2 CPU cores.
    "eval": {"max_new_tokens": 48},
    "demo": {"methods": ["sft"]},
}


def demo(cfg: C.RunConfig, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    methods = cfg.demo.methods
    domain = _domain(cfg)
    out = Path(cfg.out_dir) / (cfg.run_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.yaml")
    rows: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}

    def _eval(label: str, model, tok) -> None:
        t = time.perf_counter()
        summary = evaluate(model, tok, cfg.eval, out / label, [domain], cfg.model.system_prompt)
        rows[label] = headline(summary)
        timings[f"eval:{label}"] = time.perf_counter() - t
        log.info("%s: %s", label, rows[label])

    t = time.perf_counter()
    aligned_dir = align(cfg, progress=progress)
    timings["align"] = time.perf_counter() - t

    base, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))
    _eval("base", base, tok)
    del base
    aligned, tok = models.load(str(aligned_dir), **devices.load_args(cfg.model))
    _eval("aligned", aligned, tok)
    del aligned

    for name in methods:
        t = time.perf_counter()
        ft_cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, spec=str(aligned_dir)),
            defense=C.build(C.DefenseConfig, {"name": name}, "defense"),
            run_id=None,
        )
        res = train(ft_cfg, run_dir=out / name, progress=progress)
        timings[f"train:{name}"] = time.perf_counter() - t
        _eval(name, res.model, res.tokenizer)

    timings["total"] = time.perf_counter() - t0
    result = {
        "domain": domain,
        "aligned_model": str(aligned_dir),
        "rows": rows,
        "timings_s": timings,
        "eval": dataclasses.asdict(cfg.eval),
    }
    io.write_json(out / "summary.json", result)
    table = format_table(rows, domain, cfg.eval)
    io.write_text(out / "summary.md", table + "\n")
    print(table)
    print(f"\nwritten under {out}  (total {timings['total'] / 60:.1f} min)")
    return result


def format_table(rows: dict[str, dict[str, float]], domain: str, ev: C.EvalConfig) -> str:
    head = f"| model | ASR ↓ | over-refusal ↓ | {domain} acc ↑ | {domain} answer NLL ↓ |"
    lines = [head, "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r.get('asr', float('nan')):.1%} | {r.get('over_refusal', float('nan')):.1%} | "
            f"{r.get(f'utility:{domain}/acc', float('nan')):.1%} | {r.get(f'utility:{domain}/nll', float('nan')):.3f} |"
        )
    n_h = ev.n_harmful if ev.n_harmful is not None else 200
    lines.append(
        f"\nASR: HarmBench test prompts (n={n_h}), judge {ev.judge}, greedy, max_new_tokens={ev.max_new_tokens}. "
        "Over-refusal: our benign edgy probes. Utility: the domain's test split."
    )
    return "\n".join(lines)
