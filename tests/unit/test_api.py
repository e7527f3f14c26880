"""The Python API: cheap import, callable submodules, config helpers, and the docs/api.md example, run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import safeft
from safeft import config as C

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_import_is_cheap():
    code = "import sys, safeft; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_api_names_are_callable_and_the_submodules_still_modules():
    import inspect

    import safeft.train as train_module

    for name in ("train", "align", "diagnose", "export", "evaluate", "load_config", "load_model", "config_yaml"):
        assert callable(getattr(safeft, name)), name
    assert safeft.train is train_module and safeft.train.TrainResult is train_module.TrainResult
    assert "resume" in inspect.signature(safeft.train).parameters  # the API function's, not a module's
    from safeft import align

    assert align.cache_key is not None  # `from safeft import align` is still the module
    assert safeft.__version__ == "0.1.0" or re.fullmatch(r"\d+\.\d+\.\d+.*", safeft.__version__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = safeft.nope


def test_load_config_takes_lists_mappings_files_and_run_configs(tmp_path):
    a = safeft.load_config(overrides=["train.steps=3", "train.lr=1e-4"])
    b = safeft.load_config(overrides={"train.steps": 3, "train.lr": 1e-4})
    assert a == b and a.train.steps == 3 and a.train.lr == 1e-4
    path = safeft.save_config(
        safeft.load_config(overrides={"data.task": "domain:code"}, defense="sbr"), tmp_path / "c.yaml"
    )
    c = safeft.load_config(path, {"defense.lam": 2.0})
    assert c.defense.name == "sbr" and c.defense.lam == 2.0 and c.data.task == "domain:code"
    d = safeft.load_config(c, ["train.steps=7"])  # a RunConfig plus overrides
    assert d.train.steps == 7 and d.defense.lam == 2.0
    e = safeft.load_config(c, defense="ewc")  # another method: the sbr settings go, ewc's defaults come
    assert e.defense.name == "ewc" and e.defense.lam == 1.0 and not hasattr(e.defense, "n_anchors")
    assert safeft.config_dict(d)["train"]["steps"] == 7
    with pytest.raises(C.ConfigError, match="did you mean 'train.steps'"):
        safeft.load_config(overrides={"train.stepz": 1})
    with pytest.raises(C.ConfigError, match="list of 'key=value'"):
        safeft.load_config(overrides="train.steps=3")


def test_evaluate_an_in_memory_model_needs_its_tokenizer(tiny):
    model, _ = tiny
    with pytest.raises(C.ConfigError, match="tokenizer="):
        safeft.evaluate(model)


def python_blocks(md: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", md, flags=re.S | re.M)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks(DOCS.read_text())
    assert blocks, "docs/api.md has no python block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in blocks:
        exec(compile(code, str(DOCS), "exec"), scope)
    assert (tmp_path / "runs" / "api-demo" / "eval" / "index.json").exists()
    assert (tmp_path / "api-demo-adapter" / "adapter_config.json").exists()
    assert scope["harmful"]["n"] == 8 and "verdict" in scope["report"]


def test_evaluate_a_run_takes_the_runs_settings_under_the_overrides(tmp_path, tiny_dir):
    from safeft.testing import tiny_run_config

    cfg = tiny_run_config(tmp_path, f"model.spec={tiny_dir}", "train.steps=1", "eval.max_new_tokens=3")
    run = safeft.train(cfg, progress=False)
    a = safeft.evaluate(run.run_dir, suites=["harmful"], limit=2, overrides={"eval.precision": "fp32"})
    assert a["harmful"]["max_new_tokens"] == 3  # the run's eval section, not the default 64
    b = safeft.evaluate(run.run_dir, suites=["harmful"], limit=2, overrides={"eval.max_new_tokens": 2})
    assert b["harmful"]["max_new_tokens"] == 2
