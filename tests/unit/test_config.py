"""Config: YAML + dotted overrides are strict views of the dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safeft import config as C

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides_are_typed():
    cfg = C.load(overrides=["train.lr=1e-4", "train.steps=7", "data.task=domain:code", "model.lora.enabled=false"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.data.task == "domain:code" and cfg.data.max_length == 256
    assert cfg.model.lora.enabled is False


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 0.001\n  steps: 3\ndata:\n  task: domain:finance\n")
    cfg = C.load(f, ["train.steps=5"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.steps == 5


def test_a_partial_section_overrides_the_fields_default_not_its_classs(tmp_path):
    # AlignConfig's train and lora sections default to values of their own (steps, LoRA alpha 64), not to
    # TrainConfig's and LoraConfig's: one dotted key must change that key only (it once reset the rest to the
    # class defaults, so align.train.steps=120 trained at TrainConfig's lr)
    default = C.load().align
    cfg = C.load(overrides=["align.train.lr=1e-4", "align.lora.r=8"]).align
    assert (cfg.train.lr, cfg.train.steps, cfg.train.schedule) == (1e-4, default.train.steps, default.train.schedule)
    assert (cfg.lora.r, cfg.lora.alpha) == (8, default.lora.alpha)
    assert default.train.steps != C.TrainConfig().steps and default.lora.alpha != C.LoraConfig().alpha  # a real test
    f = tmp_path / "c.yaml"
    f.write_text("align:\n  train:\n    lr: 1.0e-4\n")
    assert C.load(f).align.train.steps == default.train.steps  # YAML sections too
    # a defense section is built from its name, never merged with SFT's default
    assert C.load(overrides=["defense.name=sbr"]).defense.name == "sbr"


def test_unknown_key_names_file_and_key_with_hint(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(f)
    msg = str(e.value)
    assert str(f) in msg and "train.lrr" in msg and "did you mean 'train.lr'" in msg


def test_unknown_override_names_command_line():
    with pytest.raises(C.ConfigError, match=r"command line: unknown key 'trian'"):
        C.load(overrides=["trian.lr=1"])


def test_missing_required_field(tmp_path):
    f = tmp_path / "nodata.yaml"
    f.write_text("data:\n  n_train: 10\n")
    with pytest.raises(C.ConfigError, match=r"nodata.yaml: missing required field 'data.task'"):
        C.load(f)


@pytest.mark.parametrize(
    "override, fragment",
    [("train.steps=ten", "train.steps: expected an integer"), ("model.lora.enabled=3", "expected true/false")],
)
def test_bad_types(override, fragment):
    with pytest.raises(C.ConfigError, match=fragment):
        C.load(overrides=[override])


def test_unknown_defense_gets_did_you_mean():
    with pytest.raises(C.ConfigError, match=r"defense.name: unknown defense 'sfft'.*did you mean 'sft'"):
        C.load(overrides=["defense.name=sfft"])


def test_defense_keys_are_checked_against_the_method_config():
    with pytest.raises(C.ConfigError, match=r"unknown key 'defense.lam'"):
        C.load(overrides=["defense.name=sft", "defense.lam=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = C.load(overrides=["data.task=domain:medical", "train.lr=2e-5", "eval.n_harmful=null"])
    C.save(cfg, tmp_path / "config.yaml")
    assert C.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    tree = yaml.safe_load(path.read_text())
    if "grid" in tree or "grids" in tree:  # a sweep: every cell's config must build
        from safeft.experiments.sweep import load_sweep

        assert load_sweep(path, tmp_path / "sweep").cells
    else:
        C.load(path)


def test_demo_yaml_matches_the_cli_defaults():
    from safeft.demo import DEMO_DEFAULTS

    shipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for section, values in DEMO_DEFAULTS.items():
        assert shipped[section] == values, section


def test_defense_from_spec_builds_the_methods_config_with_options() -> None:
    d = C.defense_from_spec("saft+repanchor:pgd_mode=free,lam=0.3")
    assert (d.name, d.pgd_mode, d.lam) == ("saft+repanchor", "free", 0.3)
    assert C.defense_from_spec("sft").name == "sft"


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("sbr:lam", r"demo.methods\[2\]: 'sbr:lam' is not name\[:key=value"),
        (":lam=1", "is not name"),
        ("sbr:no_such_key=1", "no_such_key"),
        ("not-a-method", "not-a-method"),
    ],
)
def test_defense_from_spec_errors_name_the_key(spec: str, error: str) -> None:
    with pytest.raises(C.ConfigError, match=error):
        C.defense_from_spec(spec, "demo.methods[2]")
