"""benchmarks/align_frontier.py: dev-only selection of the alignment setting, end to end on the tiny model."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from safeft.data.pairs import load_request_pairs
from safeft.data.probes import over_refusal_probes
from safeft.data.sources import load_source
from safeft.data.splits import LeakageError, safety_splits
from safeft.stats import Rate

ROOT = Path(__file__).parents[2]
BENCH = ROOT / "benchmarks" / "align_frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("align_frontier", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grid(tmp_path: Path, tiny_dir: Path) -> Path:
    overrides = [
        f"model.spec={tiny_dir}",
        "model.lora.r=4",
        "model.lora.alpha=8",
        "align.n_harmful=4",
        "align.n_benign=2",
        "align.contrastive=2",  # a small slice of the default recipe, so the test stays quick
        "align.request_pairs=2",
        "align.benign_sources=[legacy]",
        "align.benign_max_new_tokens=4",
        "align.train.steps=1",
        "align.train.batch_size=2",
        "align.train.precision=fp32",
        "eval.n_harmful=5",
        "eval.n_over_refusal=6",
        "eval.max_new_tokens=4",
        "eval.precision=fp32",
    ]
    grid = {
        "overrides": overrides,
        "grids": [
            {"align.contrastive": [0]},  # today's recipe
            {  # the boundary recipe, trained as full fine-tuning
                "align.contrastive": [6],
                "align.refusal_style": ["explain"],
                "align.benign_sources": [["legacy", "probes_train"]],
                "align.lora.enabled": [False],
            },
        ],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def test_two_settings_end_to_end_on_dev_only(frontier, tiny_dir, tmp_path, monkeypatch, capsys):
    grid, out = _grid(tmp_path, tiny_dir), tmp_path / "out"
    assert frontier.main([str(grid), "--out", str(out), "--max-asr", "1.0"]) == 0
    printed = capsys.readouterr().out

    md = (out / "frontier.md").read_text()
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert len(rows) == 2 and md in printed and "(pick)" in md
    assert "align.contrastive=0" in md and 'align.refusal_style="explain"' in md
    assert rows[0]["aligned_key"] != rows[1]["aligned_key"]
    for r in rows:  # every rate with its interval and n, under both judges
        for k in ("asr/refusal_layered", "over_refusal/refusal_layered", "asr/refusal_keywords"):
            assert float(r[f"{k}_ci_low"]) <= float(r[k]) <= float(r[f"{k}_ci_high"])
        assert r["asr/refusal_layered_n"] == "5" and r["over_refusal/refusal_layered_n"] == "6"
    assert md.count("(n=6)") == 6  # dev over-refusal, bare and framed, and the second judge's bare one
    # dev ASR without the advice questions: the same records minus the advice intents' prompts
    advice = {e.id for e in safety_splits().dev if frontier.ADVICE_INTENTS & set(e.meta.get("intents") or ())}
    for cell, r in zip(sorted((out / "cells").iterdir()), rows, strict=True):
        recs = [json.loads(x) for x in (cell / "dev_harmful.jsonl").read_text().splitlines()]
        kept = [x for x in recs if x["id"] not in advice]
        assert r["asr_no_advice/refusal_layered_n"] == str(len(kept))
        complied = sum(not x["verdicts"]["refusal_layered"]["refused"] for x in kept)
        assert float(r["asr_no_advice/refusal_layered"]) == pytest.approx(complied / max(len(kept), 1), abs=1e-4)

    # what was generated on: Do-Not-Answer dev prompts and dev probes, never a test probe or HarmBench
    dev_dna = {e.id for e in safety_splits().dev}
    dev_probes = {e.id for e in over_refusal_probes("dev")}
    test_probes = {e.id for e in over_refusal_probes("test")} | {e.id for e in safety_splits().test}
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == 2
    for cell in cells:
        harm = [json.loads(x)["id"] for x in (cell / "dev_harmful.jsonl").read_text().splitlines()]
        probes = [json.loads(x)["id"] for x in (cell / "dev_over_refusal.jsonl").read_text().splitlines()]
        assert len(harm) == 5 and set(harm) <= dev_dna
        # the framed column asks the same dev prompts inside held-out framings
        framed = [json.loads(x) for x in (cell / "dev_harmful_framed.jsonl").read_text().splitlines()]
        assert [r["id"] for r in framed] == [f"{i}~framed" for i in harm]
        framed = [json.loads(x) for x in (cell / "dev_over_refusal_framed.jsonl").read_text().splitlines()]
        assert [r["id"] for r in framed] == [f"{i}~framed" for i in probes]
        # the request pairs' dev split, both sides; never a train pair
        dev_pairs = [p.id for p in load_request_pairs("dev")]
        for suite, side in (("dev_requests", "harmful"), ("dev_requests_benign", "benign")):
            got = [json.loads(x)["id"] for x in (cell / f"{suite}.jsonl").read_text().splitlines()]
            assert got == [f"{i}:{side}" for i in dev_pairs]
        assert len(probes) == 6 and set(probes) <= dev_probes and not set(probes + harm) & test_probes
        # HarmBench's dev half (eval.n_harmful of it), never its held-out half, the demo's test set
        hb = [json.loads(x)["id"] for x in (cell / "dev_harmbench.jsonl").read_text().splitlines()]
        assert len(hb) == 5 and set(hb) <= {e.id for e in load_source("harmbench:dev")}
        assert not set(hb) & {e.id for e in load_source("harmbench:heldout")}

    # the full-FT setting trained every weight: its alignment run had no adapter
    key = rows[1]["aligned_key"]
    (aligned,) = [d for d in (Path(tmp_path / "cache") / "aligned").iterdir() if d.name.endswith(key)]
    assert "enabled: false" in (aligned / "run" / "config.yaml").read_text()
    assert any(json.loads(x)["source"] == "alignment:contrastive" for x in (aligned / "alignment_data.jsonl").open())

    # a second run finds every aligned model and every dev evaluation done: nothing is generated again
    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr("safeft.eval.suites.judged.generate_full", no_generation)
    monkeypatch.setattr("safeft.align.generate", no_generation)
    assert frontier.main([str(grid), "--out", str(out), "--max-asr", "1.0"]) == 0
    assert (out / "frontier.md").read_text() == md


def test_dev_probe_guard_rejects_a_test_probe(frontier):
    dev = over_refusal_probes("dev")
    frontier.assert_dev_probes(dev)
    with pytest.raises(LeakageError, match="dev probes only"):
        frontier.assert_dev_probes([*dev[:3], over_refusal_probes("test")[0]])


def _row(name, asr, over, n=100):
    return {
        "setting": name,
        "judge": "j",
        "asr/j": Rate(round(asr * n), n),
        "over_refusal/j": Rate(round(over * n), n),
        "asr_no_advice/j": Rate(max(round(asr * n) - 2, 0), n - 9),  # two of the compliances were advice Qs
        "asr_framed/j": Rate(min(round(asr * n) * 3, n), n),  # framed requests get through 3x as often
    }


def test_mark_frontier_and_pick_by_the_dev_rule(frontier):
    rows = [_row("a", 0.02, 0.80), _row("b", 0.04, 0.30), _row("c", 0.05, 0.35), _row("d", 0.20, 0.05)]
    frontier.mark_frontier(rows)
    assert [r["frontier"] for r in rows] == [True, True, False, True]  # c is beaten by b on both
    assert frontier.pick(rows, 0.05)["setting"] == "b"
    assert frontier.pick(rows, 0.03)["setting"] == "a"
    assert frontier.pick(rows, 0.01) is None
    # a 3.5 % bound: on all prompts only a passes; without the advice questions b (2 of 91) and c pass too
    assert frontier.pick(rows, 0.035)["setting"] == "a"
    assert frontier.pick(rows, 0.035, on="asr_no_advice")["setting"] == "b"
    assert frontier.pick(rows, 0.12, on="asr_framed")["setting"] == "b"  # b: 12 %, c: 15 %
    assert frontier.pick(rows, 0.06, on="asr_framed")["setting"] == "a"
    # HarmBench's dev half: a row that did not measure it (n = 0) is never picked on it, and the frontier's
    # ASR axis follows the column picked on
    for r, k in zip(rows, (9, 3, 1, 30), strict=True):
        r["asr_harmbench_dev/j"] = Rate(k, 100)
    rows[1]["asr_harmbench_dev/j"] = Rate(0, 0)
    assert frontier.pick(rows, 0.10, on="asr_harmbench_dev")["setting"] == "c"
    frontier.mark_frontier(rows, on="asr_harmbench_dev")
    assert [r["frontier"] for r in rows if r["setting"] != "b"] == [False, True, True]  # c beats a on both


def test_pooling_seeds_compares_recipes_not_seeds(frontier):
    def row(name, overrides, asr, over):
        r = _row(name, asr, over)
        r.update(overrides=overrides, key=name, align_s=1.0)
        for col in ("over_refusal_framed", "asr_requests", "over_refusal_requests", "asr_harmbench_dev"):
            r[f"{col}/j"] = Rate(0, 0)  # columns not measured, as evaluate_setting leaves them
        r["asr/refusal_keywords"], r["over_refusal/refusal_keywords"] = r["asr/j"], r["over_refusal/j"]
        return r

    seed = frontier.SEED_KEY
    rows = [
        row("a0", {"steps": 96, seed: 0}, 0.02, 0.15),  # a lucky seed of recipe a ...
        row("a1", {"steps": 96, seed: 1}, 0.20, 0.33),
        row("a2", {"steps": 96, seed: 2}, 0.19, 0.32),
        row("b0", {"steps": 240, seed: 0}, 0.05, 0.25),
        row("b1", {"steps": 240, seed: 1}, 0.03, 0.19),
        row("c", {"steps": 48}, 0.50, 0.10),  # no seed key: passes through
    ]
    # ... wins on one seed per setting
    assert frontier.pick(rows, 0.05)["setting"] == "a0"
    pooled = frontier.pool_seeds(rows)
    assert [r["overrides"] for r in pooled] == [{"steps": 96}, {"steps": 240}, {"steps": 48}]
    a, b, c = pooled
    assert a["asr/j"] == Rate(2 + 20 + 19, 300) and b["asr/j"] == Rate(8, 200) and c is rows[-1]
    assert a["seeds"] == [0, 1, 2] and a["per_seed"]["asr/j"] == [Rate(2, 100), Rate(20, 100), Rate(19, 100)]
    assert frontier.pick(pooled, 0.05)["overrides"] == {"steps": 240}  # the recipe, over its seeds
    frontier.mark_frontier(pooled)
    md = frontier.markdown(pooled, None)
    assert "× 3 seeds (align.train.seed=0,1,2)" in md and "; seeds 2 / 20 / 19 %" in md
    text = frontier.csv_text(pooled)
    assert '"[0, 1, 2]"' in text.splitlines()[1]


def test_dev_framings_are_held_out_from_the_training_framings(frontier):
    from safeft.align import REQUEST_STYLES

    assert not set(frontier.DEV_FRAMINGS) & set(REQUEST_STYLES)
    dev = safety_splits().dev[:20]
    out = frontier.framed(dev)
    assert out == frontier.framed(dev)  # deterministic
    for e, f in zip(dev, out, strict=True):
        assert f.id == f"{e.id}~framed" and e.prompt in f.prompt and f.prompt != e.prompt
        assert any(f.prompt == style.format(q=e.prompt) for style in frontier.DEV_FRAMINGS)
    assert len({f.prompt.replace(e.prompt, "") for e, f in zip(dev, out, strict=True)}) > 1  # not one framing


def test_the_round2_grid_builds_every_setting(frontier):
    cells, configs, _ = frontier.load_grid(ROOT / "benchmarks" / "align_frontier_round2.yaml")
    assert cells and all(configs[c.name].align.contrastive == 132 for c in cells)


@pytest.mark.parametrize("grid", sorted(p.name for p in (ROOT / "benchmarks").glob("align_frontier*.yaml")))
def test_every_shipped_frontier_grid_builds(frontier, grid):
    cells, configs, _ = frontier.load_grid(ROOT / "benchmarks" / grid)
    assert cells and len(configs) == len(cells)


def test_round5_grids_spell_out_what_they_vary(frontier):
    # round 5's rows name their lr: a grid that overrode one align.train key once trained at TrainConfig's lr
    cells, configs, _ = frontier.load_grid(ROOT / "benchmarks" / "align_frontier_round5.yaml")
    lrs = {c.name: configs[c.name].align.train.lr for c in cells}
    assert sorted(set(lrs.values())) == [3e-4, 6e-4, 1e-3]
    cells, configs, _ = frontier.load_grid(ROOT / "benchmarks" / "align_frontier_round5_seeds.yaml")
    assert [configs[c.name].align.train.seed for c in cells] == [0, 1, 2]
    assert {(configs[c.name].align.train.steps, configs[c.name].align.train.lr) for c in cells} == {(96, 6e-4)}


def test_the_shipped_grid_builds_every_setting(frontier):
    cells, configs, out = frontier.load_grid(ROOT / "benchmarks" / "align_frontier.yaml")
    assert len(cells) == len(configs) >= 5 and out == Path("runs/align_frontier")
    assert {configs[c.name].align.contrastive for c in cells} >= {0, 132}
    assert any(configs[c.name].align.refusal_style == "explain" for c in cells)


def test_a_bad_grid_fails_before_anything_runs(frontier, tmp_path):
    from safeft.config import ConfigError

    bad = tmp_path / "g.yaml"
    bad.write_text("grids:\n  - align.refusal_styel: [explain]\n")
    with pytest.raises(ConfigError, match="did you mean 'align.refusal_style'"):
        frontier.load_grid(bad)
