"""``safeft report``: the seed papers' table, Pareto fronts and curves from a sweep or any set of run dirs.

* ``table.md`` / ``table.csv`` / ``table.tex``: rows = methods (with the hyperparameters that vary among
  the runs), columns = domains (and poison fractions p when they vary), cells = ASR / over-refusal /
  utility accuracy as mean with a 95 % interval: Wilson on the pooled counts for one seed, a t-interval
  across seeds when there are several (the seed-to-seed spread is then the honest uncertainty).
* ``pareto.{png,svg,pdf}``: ASR against utility accuracy, one panel per table column (a domain, or a
  domain at one p: a frontier across domains would compare finance accuracy with code accuracy), one point
  per table cell with its 95 % intervals as error bars, the panel's frontier (no other point is both safer
  and more useful) marked, over-refusal as the colour, each point labelled with its row.
* ``pareto_nll.{png,svg,pdf}``: the same against the utility items' answer NLL (lower is better), for the
  cells whose utility suite records one: at a few dozen items accuracy moves in steps of several points,
  the NLL of the reference answers moves continuously, so a trade-off through a weight shows there first.
* ``asr_curves.{png,svg,pdf}``: ASR against training step per method, from ``evals.jsonl``.
* CKA heatmaps of runs that were diagnosed (``<run>/diagnose/heatmaps.png``), side by side.
* ``report.md`` and a self-contained ``report.html`` (images inlined) that state first every setting that
  changes the numbers: judges, prompt counts, max_new_tokens, sampling, chat-template hash, seeds, commit.

Every number comes from the runs' own files (``config.yaml``, ``eval/summary.json``, ``evals.jsonl``); a run
without a full evaluation (or with only a ``--limit`` smoke evaluation) is listed as such, never averaged in.
"""

from __future__ import annotations

import base64
import csv
import io as _io
import json
import math
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safeft import io
from safeft.stats import wilson

METRICS = (("asr", "ASR ↓"), ("over_refusal", "over-refusal ↓"), ("utility", "utility ↑"))

# t quantiles (0.975) for small numbers of seeds; beyond the table the normal quantile is close enough.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Run:
    path: Path
    cfg: dict[str, Any]
    summary: dict[str, Any]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # metric -> (k, n)
    curve: list[tuple[int, float]] = field(default_factory=list)
    nll: float | None = None  # mean answer NLL of the reference answers of the utility suite, if it has one
    stage1: str | None = None  # the alignment-stage defense of the model the run fine-tuned, if any
    judge: str | None = None  # whose verdicts the ASR and over-refusal counts are

    @property
    def method(self) -> str:
        """The fine-tuning defense, preceded by the alignment-stage one when the run fine-tuned a model that
        :func:`safeft.align.align` aligned with a defense (a sweep's Vaccine, Booster, RepNoise cells): their
        fine-tune is plain SFT, and labelled by it alone they would be pooled with the SFT row as seeds."""
        name = self.cfg.get("defense", {}).get("name", "sft")
        return f"{self.stage1} (align) + {name}" if self.stage1 and self.stage1 != "sft" else name

    @property
    def domain(self) -> str:
        task = (self.cfg.get("data") or {}).get("task", "")
        return task.split(":", 1)[1] if task.startswith("domain:") else task

    @property
    def poison(self) -> float:
        return float((self.cfg.get("data") or {}).get("poison", 0.0) or 0.0)

    @property
    def seed(self) -> int:
        return int(self.cfg.get("train", {}).get("seed", 0))


def _count(rate: float, n: int) -> tuple[int, int]:
    return int(round(rate * n)), n


class MissingJudge(LookupError):
    """The run has a full evaluation, but not scored by the judge the report asks for."""


def load_run(path: Path, judge: str | None = None) -> Run | None:
    """A run with a full evaluation, or None (with the reason logged by the caller) when it has none.

    ``judge``: take ASR and over-refusal from that judge's verdicts (``safeft eval RUN --rescore --judge J``
    adds them beside the default judge's) instead of the judge the run was evaluated with; a run without them
    raises :class:`MissingJudge`."""
    from safeft.align import stage1_defense  # here: align pulls in torch, which the rest of a report never needs

    cfg_path, summary_path = path / "config.yaml", path / "eval" / "summary.json"
    if not cfg_path.exists() or not summary_path.exists():
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    summary = json.loads(summary_path.read_text())
    run = Run(path, cfg, summary, stage1=stage1_defense(str((cfg.get("model") or {}).get("spec", ""))))
    full = lambda entry: entry.get("limit") is None  # noqa: E731 - a --limit smoke number is never a result

    def judged(suite: str) -> dict[str, Any]:
        entry = summary[suite]
        if judge is None:
            return entry
        if judge not in entry.get("judges", {}):
            raise MissingJudge(f"no {judge} verdicts on {suite}: safeft eval {path} --rescore --judge {judge}")
        return entry["judges"][judge]

    if "harmful" in summary and full(summary["harmful"]):
        scored = judged("harmful")
        run.counts["asr"] = _count(scored["asr"], scored["n"])
        run.judge = scored.get("judge")
    if "over_refusal" in summary and full(summary["over_refusal"]):
        scored = judged("over_refusal")
        run.counts["over_refusal"] = _count(scored["refusal_rate"], scored["n"])
        run.judge = scored.get("judge")
    util = [v for k, v in summary.items() if k.startswith("utility:") and full(v)]
    if util:
        run.counts["utility"] = _count(util[0]["accuracy"], util[0]["n"])
        run.nll = util[0].get("answer_nll")
    evals = path / "evals.jsonl"
    if evals.exists():
        for line in evals.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an append-only log
            run.curve.append((int(rec["step"]), float(rec["asr"])))
    return run if run.counts else None


def collect(targets: list[Path], judge: str | None = None) -> tuple[list[Run], list[str]]:
    """Runs under ``targets`` (sweep dirs — their ``cells/*`` — or run dirs); and what was skipped and why."""
    runs, skipped = [], []
    for t in targets:
        dirs = sorted(p for p in (t / "cells").iterdir() if p.is_dir()) if (t / "cells").is_dir() else [t]
        for d in dirs:
            try:
                r = load_run(d, judge)
            except MissingJudge as e:
                skipped.append(f"{d}: {e}")
                continue
            if r is None:
                why = "failed: see error.json" if (d / "error.json").exists() else "no full evaluation"
                skipped.append(f"{d}: {why}")
            else:
                runs.append(r)
    return runs, skipped


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def varying_keys(runs: list[Run]) -> list[str]:
    """Dotted config keys whose values differ among the runs (run_id and out_dir excepted)."""
    flats = [_flat(r.cfg) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    skip = {"run_id", "out_dir"}
    return [k for k in keys if k not in skip and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def row_label(run: Run, runs: list[Run]) -> str:
    """The method, with the defense hyperparameters that vary among the runs of that method."""
    same = [r for r in runs if r.method == run.method]
    flat = _flat(run.cfg)
    keys = [k for k in varying_keys(same) if k.startswith("defense.") and k in flat]
    extra = [f"{k.split('.', 1)[1]}={flat[k]}" for k in keys]
    return run.method + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class Cell:
    mean: float
    low: float
    high: float
    n: int  # prompts (one seed) or seeds
    seeds: int

    def fmt(self) -> str:
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def aggregate(counts: list[tuple[int, int]]) -> Cell:
    """One seed: the rate with its Wilson interval. Several: the mean over seeds with a t-interval."""
    if len(counts) == 1:
        k, n = counts[0]
        low, high = wilson(k, n)
        return Cell(k / n, low, high, n, 1)
    rates = [k / n for k, n in counts]
    m, s = statistics.fmean(rates), statistics.stdev(rates)
    half = T975.get(len(rates) - 1, 1.96) * s / math.sqrt(len(rates))
    return Cell(m, max(0.0, m - half), min(1.0, m + half), len(rates), len(rates))


def _groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """The runs of each table cell, by (row, column); columns are domains, with p when p varies."""
    by_p = "data.poison" in varying_keys(runs)

    def col(r: Run) -> str:
        return f"{r.domain} (p={r.poison:g})" if by_p else r.domain

    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((row_label(r, runs), col(r)), []).append(r)
    return groups


def _natural(label: str) -> list:
    """Sort key that orders numbers by value: ``lam=5.0`` before ``lam=15.0`` before ``lam=150.0``."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)", label)
    return [(0, float(x), "") if i % 2 else (1, 0.0, x) for i, x in enumerate(parts)]


def table(runs: list[Run]) -> tuple[list[str], list[str], dict[tuple[str, str, str], Cell]]:
    """(rows, columns, {(row, column, metric): Cell}); columns are domains, with p when p varies."""
    groups = _groups(runs)
    rows = sorted({k[0] for k in groups}, key=lambda s: (s.split(" ")[0] != "sft", _natural(s)))
    cols = sorted({k[1] for k in groups})
    cells = {}
    for (row, c), members in groups.items():
        for metric, _ in METRICS:
            counts = [m.counts[metric] for m in members if metric in m.counts]
            if counts:
                cells[(row, c, metric)] = aggregate(counts)
    return rows, cols, cells


def to_markdown(rows, cols, cells) -> str:
    head = "| method | " + " | ".join(f"{c} {label}" for c in cols for _, label in METRICS) + " |"
    lines = [head, "|---|" + "---|" * (len(cols) * len(METRICS))]
    for row in rows:
        vals = [cells[(row, c, m)].fmt() if (row, c, m) in cells else "–" for c in cols for m, _ in METRICS]
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def to_csv(rows, cols, cells) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "column", "metric", "mean", "ci_low", "ci_high", "n", "seeds"])
    for row in rows:
        for c in cols:
            for m, _ in METRICS:
                if (row, c, m) in cells:
                    x = cells[(row, c, m)]
                    w.writerow([row, c, m, f"{x.mean:.6f}", f"{x.low:.6f}", f"{x.high:.6f}", x.n, x.seeds])
    return buf.getvalue()


def to_latex(rows, cols, cells) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
    spec = "l" + "c" * (len(cols) * len(METRICS))
    out = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    out.append(" & " + " & ".join(rf"\multicolumn{{{len(METRICS)}}}{{c}}{{{esc(c)}}}" for c in cols) + r" \\")
    out.append(
        "method & " + " & ".join(["ASR$\\downarrow$", "OR$\\downarrow$", "Util$\\uparrow$"] * len(cols)) + r" \\"
    )
    out.append(r"\midrule")
    for row in rows:
        vals = []
        for c in cols:
            for m, _ in METRICS:
                x = cells.get((row, c, m))
                vals.append(f"{100 * x.mean:.1f}$_{{\\pm {50 * (x.high - x.low):.1f}}}$" if x else "--")
        out.append(esc(row) + " & " + " & ".join(vals) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (utility ↑, ASR ↓) that no other point beats on both (ties do not dominate)."""
    front = []
    for i, (u, a) in enumerate(points):
        dominated = any((u2 >= u and a2 <= a) and (u2 > u or a2 < a) for j, (u2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOT_FORMATS = ("png", "svg", "pdf")  # every plot is written in each; PNG is what the reports embed
PLOTS = ("pareto", "pareto_nll", "asr_curves")  # the stems report() draws


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext in PLOT_FORMATS:
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=100, bbox_inches="tight")
        paths.append(p)
    _plt().close(fig)
    return paths


@dataclass
class Point:
    """One table cell on a Pareto panel: utility (accuracy, or answer NLL) against ASR."""

    row: str
    utility: Cell | float  # accuracy with its interval, or the mean answer NLL over the cell's runs
    asr: Cell
    over_refusal: float  # nan when the runs have no over-refusal suite
    on_front: bool = False

    @property
    def x(self) -> float:
        """Where the point sits on the utility axis: the accuracy's mean, or the NLL itself."""
        return self.utility.mean if isinstance(self.utility, Cell) else self.utility


def pareto_panels(runs: list[Run], utility: str = "accuracy") -> dict[str, list[Point]]:
    """Per table column, one point per row that has ASR and the utility, the column's frontier marked.

    ``utility``: ``accuracy`` (higher is better) or ``nll`` (the utility items' answer NLL, lower is better).
    A frontier is drawn within a column only: the domains' accuracies are not on one scale."""
    if utility not in ("accuracy", "nll"):
        raise ValueError(f"utility must be 'accuracy' or 'nll', got {utility!r}")
    panels: dict[str, list[Point]] = {}
    for (row, col), members in sorted(_groups(runs).items(), key=lambda kv: kv[0][1]):
        asr = [m.counts["asr"] for m in members if "asr" in m.counts]
        if len(asr) != len(members):
            continue
        if utility == "accuracy":
            counts = [m.counts["utility"] for m in members if "utility" in m.counts]
            if len(counts) != len(members):
                continue
            u: Cell | float = aggregate(counts)
        else:
            nlls = [m.nll for m in members if m.nll is not None]
            if len(nlls) != len(members):
                continue
            u = statistics.fmean(nlls)
        refusals = [m.counts["over_refusal"] for m in members if "over_refusal" in m.counts]
        over = aggregate(refusals).mean if len(refusals) == len(members) else math.nan
        panels.setdefault(col, []).append(Point(row, u, aggregate(asr), over))
    for points in panels.values():
        # pareto_front takes (utility ↑, ASR ↓): an NLL enters negated
        xy = [(p.x if utility == "accuracy" else -p.x, p.asr.mean) for p in points]
        for i in pareto_front(xy):
            points[i].on_front = True
    return panels


def plot_pareto(runs: list[Run], out: Path, utility: str = "accuracy") -> list[Path]:
    """``pareto.*`` (accuracy) or ``pareto_nll.*``: one panel per column, 95 % intervals as error bars."""
    panels = pareto_panels(runs, utility)
    if not panels:
        return []
    plt = _plt()
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows), squeeze=False, layout="constrained")
    sc = None
    for ax, (col, points) in zip(axes.flat, panels.items(), strict=False):
        xs = [p.x for p in points]
        for p in points:
            u = p.utility
            xerr = [[u.mean - u.low], [u.high - u.mean]] if isinstance(u, Cell) else None  # an NLL has no interval
            yerr = [[p.asr.mean - p.asr.low], [p.asr.high - p.asr.mean]]
            ax.errorbar(p.x, p.asr.mean, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.75", lw=0.8, zorder=1)
            ax.annotate(p.row, (p.x, p.asr.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
        sc = ax.scatter(xs, [p.asr.mean for p in points], c=[p.over_refusal for p in points], cmap="viridis_r",
                        vmin=0, vmax=1, s=36, zorder=3, edgecolors="k", linewidths=0.4)  # fmt: skip
        front = sorted((i for i, p in enumerate(points) if p.on_front), key=lambda i: xs[i])
        ax.plot(
            [xs[i] for i in front], [points[i].asr.mean for i in front], "r--", lw=1, label="Pareto front", zorder=2
        )
        ax.set_title(col, fontsize=9)
        if utility == "accuracy":
            ax.set_xlabel("utility (accuracy) ↑")
        else:
            ax.set_xlabel("answer NLL ↓ (better to the right)")
            ax.invert_xaxis()
        ax.set_ylabel("ASR ↓")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(sc, ax=axes, label="over-refusal (colour)", shrink=0.8, pad=0.02)
    return _save(fig, out, "pareto" if utility == "accuracy" else "pareto_nll")


def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    plt = _plt()
    with_curve = [r for r in runs if len(r.curve) > 1]
    if not with_curve:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in with_curve:
        steps, asr = zip(*sorted(r.curve), strict=True)
        label = row_label(r, runs) + (f" / {r.domain}" if len({x.domain for x in with_curve}) > 1 else "")
        ax.plot(steps, asr, marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("ASR (periodic subset)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out, "asr_curves")


def settings(runs: list[Run]) -> dict[str, Any]:
    """Every setting that changes the numbers, as found in the runs (a set of values where they differ)."""

    def values(get) -> list:
        found = []
        for r in runs:
            try:
                v = get(r)
            except (KeyError, TypeError, IndexError, StopIteration):  # StopIteration: no such suite
                continue
            if v not in found:
                found.append(v)
        return found

    def template_hash(r: Run):
        for f in sorted((r.path / "eval").rglob("*.jsonl")):
            with f.open() as fh:
                first = fh.readline()
            if first:
                return json.loads(first)["settings"].get("chat_template_sha256")
        raise KeyError

    return {
        "judge": values(lambda r: r.judge or r.summary["harmful"]["judge"]),
        "harmful prompts (n)": values(lambda r: r.summary["harmful"]["n"]),
        "over-refusal prompts (n)": values(lambda r: r.summary["over_refusal"]["n"]),
        "utility items (n)": values(lambda r: next(v["n"] for k, v in r.summary.items() if k.startswith("utility:"))),
        "max_new_tokens": values(lambda r: r.cfg["eval"]["max_new_tokens"]),
        "sampling": values(
            lambda r: (
                "greedy"
                if not r.cfg["eval"].get("do_sample")
                else f"T={r.cfg['eval']['temperature']}, top_p={r.cfg['eval']['top_p']}"
            )
        ),  # fmt: skip
        "chat template sha256": values(template_hash),
        "seeds": sorted({r.seed for r in runs}),
        "models": values(lambda r: r.cfg["model"]["spec"]),
        "commit": [_commit()],
    }


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except OSError:
        return "unknown"


def report(targets: list[Path], out: Path, judge: str | None = None) -> dict[str, Any]:
    """Write the table, plots and report for ``targets`` under ``out``; return what was written. ``judge``:
    ASR and over-refusal by that judge's stored verdicts (see :func:`load_run`); the ASR curves stay the
    training-time judge's."""
    runs, skipped = collect([Path(t) for t in targets], judge)
    if not runs:
        raise FileNotFoundError(f"no run with a full evaluation under {', '.join(map(str, targets))}: {skipped}")
    out.mkdir(parents=True, exist_ok=True)
    rows, cols, cells = table(runs)
    md = to_markdown(rows, cols, cells)
    io.write_text(out / "table.md", md + "\n")
    io.write_text(out / "table.csv", to_csv(rows, cols, cells))
    io.write_text(out / "table.tex", to_latex(rows, cols, cells))
    for stem in PLOTS:  # an earlier report's plot these runs no longer make
        for ext in PLOT_FORMATS:
            (out / f"{stem}.{ext}").unlink(missing_ok=True)
    images = plot_pareto(runs, out) + plot_pareto(runs, out, "nll") + plot_curves(runs, out)
    heatmaps = [
        (r, r.path / "diagnose" / "heatmaps.png") for r in runs if (r.path / "diagnose" / "heatmaps.png").exists()
    ]
    found = settings(runs)
    text = _report_md(md, found, [p for p in images if p.suffix == ".png"], heatmaps, skipped, len(runs), out)
    io.write_text(out / "report.md", text)
    io.write_text(
        out / "report.html", _report_html(md, found, [p for p in images if p.suffix == ".png"], heatmaps, skipped)
    )
    return {
        "runs": len(runs),
        "skipped": skipped,
        "rows": rows,
        "columns": cols,
        "files": sorted(str(p) for p in out.iterdir()),
    }


def _settings_lines(found: dict[str, Any]) -> list[str]:
    return [f"- **{k}**: {', '.join(map(str, v)) if v else 'not recorded'}" for k, v in found.items()]


def _report_md(md, found, images, heatmaps, skipped, n_runs, out: Path) -> str:
    note = "Cells: percent, mean with 95 % interval (Wilson for one seed; t across seeds for several)."
    lines = ["# safeft report", "", "## Settings that change the numbers", "", *_settings_lines(found), "",
             f"## Table ({n_runs} runs)", "", note, "", md, ""]  # fmt: skip
    for p in images:
        lines += [f"![{p.stem}]({p.relative_to(out)})", ""]
    if heatmaps:
        lines += ["## CKA drift (1 − CKA, layer × step)", ""]
        lines += [f"![{r.path.name}]({_rel(hm, out)})" for r, hm in heatmaps] + [""]
    if skipped:
        lines += ["## Runs not in the table", "", *[f"- {s}" for s in skipped], ""]
    return "\n".join(lines)


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:48%">'


def _report_html(md, found, images, heatmaps, skipped) -> str:
    import html

    rows = [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    thead = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    tbody = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
    setting = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(', '.join(map(str, v)) or 'not recorded')}</li>"
                      for k, v in found.items())  # fmt: skip
    parts = ["<!doctype html><meta charset='utf-8'><title>safeft report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:12px}table{border-collapse:collapse}</style>",
             "<h1>safeft report</h1><h2>Settings that change the numbers</h2><ul>", setting, "</ul>",
             "<h2>Table</h2><p>Percent, mean with 95 % interval (Wilson for one seed; t across seeds).</p>",
             f"<table><tr>{thead}</tr>{tbody}</table>", "<h2>Figures</h2>", *[_img(p) for p in images]]  # fmt: skip
    if heatmaps:
        parts += ["<h2>CKA drift</h2>"] + [f"<h3>{html.escape(r.path.name)}</h3>{_img(hm)}" for r, hm in heatmaps]
    if skipped:
        parts += ["<h2>Runs not in the table</h2><ul>", *[f"<li>{html.escape(s)}</li>" for s in skipped], "</ul>"]
    return "".join(parts) + "\n"
