"""``safeft sweep`` and ``safeft report`` end to end on a tiny model: every table cell matches the runs' own
summaries, the interval arithmetic matches a direct computation, a killed sweep finishes with the same table
as an uninterrupted one, and a failing cell is recorded while the others run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safeft import config as C
from safeft.experiments import report as R
from safeft.experiments import sweep as S
from safeft.stats import wilson

EVAL = ["eval.n_harmful=4", "eval.n_over_refusal=3", "eval.n_utility=3", "eval.max_new_tokens=4", "eval.batch_size=8"]


def write_sweep(tmp_path: Path, model_dir: Path, grid: dict, extra: list[str] = ()) -> Path:
    overrides = [
        f"model.spec={model_dir}",
        "data.n_train=16",
        "train.steps=4",
        "train.batch_size=4",
        "train.precision=fp32",
        "train.save_every=1",
        "model.lora.r=4",
        "model.lora.alpha=8",
        *EVAL,
        *extra,
    ]
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps({"overrides": overrides, "grid": grid}))  # JSON is YAML
    return path


GRID = {"defense.name": ["sft", "sbr"], "data.task": ["domain:finance", "domain:code"]}


def test_grid_expansion_names_and_dry_run(tmp_path, tiny_dir):
    sweep = S.load_sweep(write_sweep(tmp_path, tiny_dir, GRID), tmp_path / "sw")
    assert len(sweep.cells) == 4 and len({c.name for c in sweep.cells}) == 4
    assert all(c.name.startswith("name-") for c in sweep.cells)
    assert sweep.configs[sweep.cells[1].name].data.task == "domain:code"
    rows = S.plan(sweep)
    assert [r["state"] for r in rows] == ["todo"] * 4 and all(r["est_min"] > 0 for r in rows)
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing


def test_dry_run_lists_each_stage_one_alignment_once_with_its_cost(tmp_path, tiny_dir, monkeypatch):
    # an alignment-stage defense IS stage 1: its alignment is a cost of its own, often the largest of the grid
    monkeypatch.setenv("SAFEFT_CACHE", str(tmp_path / "cache"))
    path = write_sweep(tmp_path, tiny_dir, {"defense.name": ["sft", "sbr", "vaccine"], "data.task": ["domain:finance"]})
    spec = json.loads(path.read_text())
    path.write_text(json.dumps({**spec, "align": True}))
    sweep = S.load_sweep(path, tmp_path / "sw")
    stage1 = S.alignments(sweep)
    assert [a["defense"] for a in stage1] == ["sft", "vaccine"]  # sft and sbr fine-tune the same aligned model
    assert not any(a["cached"] for a in stage1) and stage1[1]["est_min"] > stage1[0]["est_min"] > 0
    model = Path(stage1[1]["path"]) / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert [(a["cached"], a["est_min"]) for a in S.alignments(sweep)][1] == (True, 0.0)
    assert not (tmp_path / "sw").exists()


def test_a_bad_cell_fails_before_any_cell_runs(tmp_path, tiny_dir):
    grid = {"defense.name": ["sft", "sbr"], "defense.lam": [1.0], "data.task": ["domain:finance"]}
    path = write_sweep(tmp_path, tiny_dir, grid)
    with pytest.raises(C.ConfigError, match=r"cell name-sft_lam-1.0_task-finance_.*unknown key 'defense.lam'"):
        S.load_sweep(path, tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = S.load_sweep(write_sweep(tmp, tiny_dir, GRID), tmp / "sw")
    index = S.run_sweep(sweep, progress=False)
    return tmp, sweep, index


def test_sweep_runs_every_cell_and_report_matches_the_runs(finished):
    tmp, sweep, index = finished
    assert [c["state"] for c in index["cells"]] == ["done"] * 4
    out = tmp / "report"
    res = R.report([sweep.out_dir], out)
    assert res["runs"] == 4 and not res["skipped"]
    for name in ("table.md", "table.csv", "table.tex", "report.md", "report.html", "pareto.svg", "pareto_nll.svg"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert {r["method"] for r in rows} == {"sft", "sbr"} and {r["column"] for r in rows} == {"finance", "code"}
    for r in rows:
        cell = next(
            c
            for c in sweep.cells
            if c.overrides["defense.name"] == r["method"] and c.overrides["data.task"].endswith(r["column"])
        )
        summary = json.loads((sweep.cell_dir(cell) / "eval" / "summary.json").read_text())
        entry = {"asr": ("harmful", "asr"), "over_refusal": ("over_refusal", "refusal_rate")}.get(r["metric"])
        if entry:
            rate, n = summary[entry[0]][entry[1]], summary[entry[0]]["n"]
        else:
            util = next(v for k, v in summary.items() if k.startswith("utility:"))
            rate, n = util["accuracy"], util["n"]
        low, high = wilson(round(rate * n), n)
        assert float(r["mean"]) == pytest.approx(rate) and int(r["n"]) == n
        assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((low, high), abs=1e-6)
    text = (out / "report.md").read_text()
    assert "max_new_tokens" in text and "chat template sha256" in text and "commit" in text


def test_finished_cells_are_skipped_on_rerun(finished):
    tmp, sweep, _ = finished
    before = {c.name: (sweep.cell_dir(c) / "done.json").stat().st_mtime_ns for c in sweep.cells}
    S.run_sweep(sweep, progress=False)
    assert before == {c.name: (sweep.cell_dir(c) / "done.json").stat().st_mtime_ns for c in sweep.cells}


def test_kill_mid_cell_then_rerun_gives_the_same_table(tmp_path, tiny_dir, finished):
    _, done_sweep, _ = finished
    path = write_sweep(tmp_path, tiny_dir, GRID)
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "safeft", "sweep", str(path), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = S.load_sweep(path, out).cells[1]
    target = out / "cells" / second.name / "checkpoints" / "step-000002" / "state.json"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the sweep never reached the second cell's step 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "cells" / second.name / "done.json").exists()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    a = R.to_csv(*R.table(R.collect([out])[0]))
    b = R.to_csv(*R.table(R.collect([done_sweep.out_dir])[0]))
    assert a == b


def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path, tiny_dir, monkeypatch):
    grid = {"defense.name": ["sft"], "train.seed": [0, 1], "data.task": ["domain:finance"]}
    sweep = S.load_sweep(write_sweep(tmp_path, tiny_dir, grid), tmp_path / "sw")
    real = S.run_cell

    def flaky(sw, cell, progress=True):
        if cell.overrides["train.seed"] == 0:
            raise RuntimeError("boom")
        return real(sw, cell, progress)

    monkeypatch.setattr(S, "run_cell", flaky)
    index = S.run_sweep(sweep, progress=False)
    assert [c["state"] for c in index["cells"]] == ["failed", "done"]
    err = json.loads((sweep.cell_dir(sweep.cells[0]) / "error.json").read_text())
    assert "boom" in err["error"] and "Traceback" in err["traceback"]
    res = R.report([sweep.out_dir], tmp_path / "rep")
    assert res["runs"] == 1 and "failed" in res["skipped"][0]


def test_seeds_are_aggregated_with_a_t_interval():
    cell = R.aggregate([(3, 10), (5, 10), (4, 10)])
    rates = [0.3, 0.5, 0.4]
    m = sum(rates) / 3
    sd = math.sqrt(sum((r - m) ** 2 for r in rates) / 2)
    assert cell.mean == pytest.approx(m) and cell.seeds == 3
    assert cell.high - cell.mean == pytest.approx(4.303 * sd / math.sqrt(3))
    one = R.aggregate([(3, 10)])
    assert (one.low, one.high) == pytest.approx(wilson(3, 10))


def test_pareto_front():
    pts = [(0.1, 0.1), (0.2, 0.3), (0.05, 0.5), (0.2, 0.2), (0.3, 0.9)]
    assert sorted(R.pareto_front(pts)) == [0, 3, 4]


@pytest.mark.parametrize(
    ("text", "extra", "error"),
    [
        ("grid: {a.b: [1]}\nbogus: 1\n", (), r"unknown key\(s\) \['bogus'\]"),
        ("grid: {a.b: [1]}\nalign: true\n", (), r"unknown key\(s\) \['align'\]"),  # a frontier file has no align
        ("grid: {a.b: [1]}\ngrids: [{a.b: [2]}]\n", (), "either grid"),
        ("base: missing.yaml\ngrid: {a.b: [1]}\n", (), "base config .*missing.yaml not found"),
        ("overrides: 3\ngrid: {a.b: [1]}\n", (), "overrides must be"),
        ("overrides: [x=1]\n", ("align",), "needs grid"),
        ("grid: [unclosed\n", (), "not valid YAML"),
    ],
)
def test_grid_file_errors_name_the_file(tmp_path: Path, text: str, extra: tuple, error: str) -> None:
    # The one reader behind `safeft sweep` files and the alignment frontier's grid files.
    f = tmp_path / "g.yaml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=error) as e:
        S.read_grid_file(f, extra)
    assert str(f) in str(e.value)


def test_grid_file_reads_base_overrides_and_cells(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train: {steps: 3}\n")
    f = tmp_path / "g.yaml"
    f.write_text("base: base.yaml\noverrides: {train.lr: 0.001}\ngrids:\n  - {defense.name: [sft, sbr]}\n")
    spec, base, overrides, cells = S.read_grid_file(f)
    assert base == (tmp_path / "base.yaml").resolve()
    assert overrides == ["train.lr=0.001"]
    assert [c.overrides for c in cells] == [{"defense.name": "sft"}, {"defense.name": "sbr"}]
    assert spec["base"] == "base.yaml"


def test_report_settings_of_runs_without_a_utility_suite(tmp_path):
    # persistent-HFT runs evaluate ASR only: the settings header must skip utility, not crash
    run = R.Run(path=tmp_path, cfg={"defense": {"name": "sft"}}, summary={"harmful": {"n": 100}})
    assert R.settings([run])["utility items (n)"] == []


def _fake_run(root: Path, name: str, spec: str, asr: float, summary: dict | None = None) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = {"model": {"spec": spec}, "defense": {"name": "sft"}, "data": {"task": "domain:finance", "poison": 0.1}}
    (run / "config.yaml").write_text(json.dumps(cfg))
    (run / "eval" / "summary.json").write_text(json.dumps(summary or {"harmful": {"asr": asr, "n": 50}}))
    return run


def test_an_alignment_stage_defense_is_its_own_row_not_pooled_with_sft(tmp_path):
    # A sweep's Vaccine cell fine-tunes with plain SFT the model Vaccine aligned: its config says defense sft.
    # Labelled by that alone, it would be averaged with the SFT row as if it were another seed.
    models = {}
    for key, defense in (("a1", "sft"), ("a2", "vaccine")):
        (tmp_path / "aligned" / key / "model").mkdir(parents=True)
        (tmp_path / "aligned" / key / "run").mkdir()
        (tmp_path / "aligned" / key / "run" / "config.yaml").write_text(json.dumps({"defense": {"name": defense}}))
        models[defense] = str(tmp_path / "aligned" / key / "model")
    runs_dir = tmp_path / "runs"
    _fake_run(runs_dir, "sft", models["sft"], 0.8)
    _fake_run(runs_dir, "vaccine", models["vaccine"], 0.6)
    _fake_run(runs_dir, "plain", str(tmp_path / "elsewhere"), 0.9)  # not an aligned model: its own name
    runs, skipped = R.collect([runs_dir / n for n in ("sft", "vaccine", "plain")])
    assert not skipped
    assert [r.method for r in runs] == ["sft", "vaccine (align) + sft", "sft"]
    rows, cols, cells = R.table(runs[:2])
    assert rows == ["sft", "vaccine (align) + sft"]
    assert cells[("vaccine (align) + sft", cols[0], "asr")].mean == pytest.approx(0.6)
    assert cells[("sft", cols[0], "asr")].seeds == 1


def test_report_by_another_judge_reads_its_stored_verdicts(tmp_path):
    # `safeft eval RUN --rescore --judge refusal_keywords` stores a second judge's verdicts beside the default's
    def suite(rate_key: str, default: float, keywords: float | None, n: int) -> dict:
        judges = {"refusal_layered": {"judge": "refusal_layered", rate_key: default, "n": n}}
        if keywords is not None:
            judges["refusal_keywords"] = {"judge": "refusal_keywords", rate_key: keywords, "n": n}
        return {"judge": "refusal_layered", rate_key: default, "n": n, "judges": judges}

    scored = {"harmful": suite("asr", 0.2, 0.3, 50), "over_refusal": suite("refusal_rate", 0.1, 0.25, 60)}
    _fake_run(tmp_path, "a", "m", 0, scored)
    unscored = {"harmful": suite("asr", 0.4, None, 50), "over_refusal": suite("refusal_rate", 0.1, None, 60)}
    _fake_run(tmp_path, "b", "m", 0, unscored)
    [run], _ = R.collect([tmp_path / "a"])
    assert run.counts == {"asr": (10, 50), "over_refusal": (6, 60)} and run.judge == "refusal_layered"
    [run], _ = R.collect([tmp_path / "a"], judge="refusal_keywords")
    assert run.counts == {"asr": (15, 50), "over_refusal": (15, 60)} and run.judge == "refusal_keywords"
    assert R.settings([run])["judge"] == ["refusal_keywords"]
    # a run never scored by that judge is listed with the command that scores it, never filled by another judge
    runs, skipped = R.collect([tmp_path / "b"], judge="refusal_keywords")
    assert runs == [] and "safeft eval" in skipped[0] and "--rescore --judge refusal_keywords" in skipped[0]


def _pareto_run(tmp_path: Path, name: str, task: str, lam: float, asr: int, acc: int, nll: float, seed: int = 0):
    cfg = {"defense": {"name": "sbr", "lam": lam}, "data": {"task": task}, "train": {"seed": seed}}
    run = R.Run(path=tmp_path / name, cfg=cfg, summary={}, nll=nll)
    run.counts = {"asr": (asr, 50), "utility": (acc, 50), "over_refusal": (6, 60)}
    return run


def test_pareto_panels_are_per_column_with_the_cells_intervals_and_both_utilities(tmp_path):
    runs = [
        _pareto_run(tmp_path, "f1", "domain:finance", 1, asr=40, acc=10, nll=0.20),
        _pareto_run(tmp_path, "f2", "domain:finance", 10, asr=10, acc=6, nll=0.30),
        _pareto_run(tmp_path, "f3", "domain:finance", 100, asr=20, acc=4, nll=0.50),  # dominated by lam=10
        # code: accuracies on another scale; a frontier across the two domains would let these dominate
        _pareto_run(tmp_path, "c1", "domain:code", 1, asr=45, acc=50, nll=0.01),
        _pareto_run(tmp_path, "c2", "domain:code", 10, asr=30, acc=48, nll=0.02),
    ]
    panels = R.pareto_panels(runs)
    assert list(panels) == ["code", "finance"]
    fin = {p.row: p for p in panels["finance"]}
    assert {r: p.on_front for r, p in fin.items()} == {
        "sbr (lam=1)": True,
        "sbr (lam=10)": True,
        "sbr (lam=100)": False,
    }
    assert all(p.on_front for p in panels["code"])
    p = fin["sbr (lam=10)"]
    assert (p.asr.low, p.asr.high) == pytest.approx(wilson(10, 50))
    assert (p.utility.low, p.utility.high) == pytest.approx(wilson(6, 50))
    assert p.over_refusal == pytest.approx(0.1)
    # against answer NLL lower is better: lam=100 (NLL 0.50) is still dominated, lam=1 (0.20) is on the front
    nll = {p.row: (p.utility, p.on_front) for p in R.pareto_panels(runs, "nll")["finance"]}
    assert nll == {"sbr (lam=1)": (0.20, True), "sbr (lam=10)": (0.30, True), "sbr (lam=100)": (0.50, False)}
    # seeds of one cell are one point: the mean with the t-interval of the table
    seeds = [
        _pareto_run(tmp_path, f"s{i}", "domain:finance", 1, asr=k, acc=5, nll=0.2, seed=i)
        for i, k in enumerate((10, 14))
    ]
    (point,) = R.pareto_panels(seeds)["finance"]
    assert point.asr == R.aggregate([(10, 50), (14, 50)]) and point.asr.seeds == 2
    with pytest.raises(ValueError, match="utility must be"):
        R.pareto_panels(runs, "f1")
    assert [q.name for q in R.plot_pareto(runs, tmp_path, "nll")] == [
        "pareto_nll.png",
        "pareto_nll.svg",
        "pareto_nll.pdf",
    ]


def test_rows_order_numbers_by_value(tmp_path):
    runs = [
        _pareto_run(tmp_path, f"r{lam}", "domain:finance", lam, asr=5, acc=5, nll=0.3) for lam in (15.0, 150.0, 5.0)
    ]
    sft = _pareto_run(tmp_path, "sft", "domain:finance", 0, asr=9, acc=5, nll=0.3)
    sft.cfg["defense"] = {"name": "sft"}
    rows, _, _ = R.table([*runs, sft])
    assert rows == ["sft", "sbr (lam=5.0)", "sbr (lam=15.0)", "sbr (lam=150.0)"]


def test_a_report_drops_the_plots_of_an_earlier_report_these_runs_no_longer_make(tmp_path):
    # runs without a utility suite make no Pareto plot: one left by an earlier report must not pass for theirs
    _fake_run(tmp_path / "runs", "a", "m", 0.2)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "pareto_nll.svg").write_text("<svg>an earlier report's</svg>")
    R.report([tmp_path / "runs" / "a"], out)
    assert not (out / "pareto_nll.svg").exists() and (out / "table.md").exists()
