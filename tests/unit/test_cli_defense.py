"""``--defense NAME`` on ``safeft align`` and ``safeft train``: a shortcut for defense.name=NAME that puts the
defense into the run it starts (for align: the alignment-stage training, with its own cache key)."""

from __future__ import annotations

import pytest
import yaml

from safeft import config as C
from safeft.align import cache_key
from safeft.cli import main
from safeft.testing import TINY_RUN


def test_load_with_defense_selects_the_method_and_keeps_overrides(tmp_path):
    cfg = C.load(None, ["defense.rho=3"], defense="vaccine")
    assert cfg.defense.name == "vaccine" and cfg.defense.rho == 3.0
    # a file configuring another method: its (foreign) keys are dropped, not reported as unknown
    f = tmp_path / "cfg.yaml"
    f.write_text("defense:\n  name: sbr\n  lam: 10\n")
    cfg = C.load(f, [], defense="vaccine")
    assert cfg.defense.name == "vaccine" and cfg.defense.rho == 2.0
    # the same method: the file's settings are kept
    f.write_text("defense:\n  name: vaccine\n  rho: 7\n")
    assert C.load(f, [], defense="vaccine").defense.rho == 7.0
    with pytest.raises(C.ConfigError, match="defense.name"):
        C.load(None, [], defense="no-such-defense")


def test_align_cache_key_includes_the_defense_config():
    keys = {
        cache_key(C.load(None, [], defense="sft")),
        cache_key(C.load(None, [], defense="vaccine")),
        cache_key(C.load(None, ["defense.rho=5"], defense="vaccine")),
    }
    assert len(keys) == 3


def test_train_defense_flag_runs_that_defense(tiny_dir, tmp_path, capsys):
    overrides = [*TINY_RUN, "train.steps=1", "data.n_train=8", f"model.spec={tiny_dir}", f"out_dir={tmp_path}"]
    assert main(["train", "--defense", "vaccine", *overrides]) == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["defense"] == {"name": "vaccine", "rho": 2.0, "perturb_site": "attn_out"}


def test_align_defense_flag_puts_the_defense_into_the_alignment_run(tiny_dir, tmp_path, capsys):
    overrides = [
        f"model.spec={tiny_dir}",
        "model.lora.r=4",
        "align.n_harmful=4",
        "align.n_benign=2",
        "align.contrastive=2",  # a small slice of the default recipe, so the test stays quick
        "align.benign_sources=[legacy]",
        "align.benign_max_new_tokens=4",
        "align.train.steps=1",
        "align.train.batch_size=2",
        "align.train.precision=fp32",
        "defense.rho=0.5",
    ]
    out = tmp_path / "aligned"
    assert main(["align", "--defense", "vaccine", "--out", str(out), *overrides]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "model"))
    saved = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert saved["defense"]["name"] == "vaccine" and saved["defense"]["rho"] == 0.5
    rows = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"passes/forward": 2' in rows[0]  # Vaccine's two passes ran in stage 1


def test_unknown_defense_exits_nonzero(capsys):
    assert main(["train", "--defense", "vacine", "data.task=domain:finance"]) == 2
    assert "vacine" in capsys.readouterr().err


def test_align_cache_key_follows_the_defense_aux_data(monkeypatch):
    from safeft.data import aux

    cfg = C.load(None, [], defense="booster")
    sft_key, key = cache_key(C.load(None, [])), cache_key(cfg)
    monkeypatch.setattr(aux, "COMPLIANCE_OPENERS", tuple(o + " Go." for o in aux.COMPLIANCE_OPENERS))
    assert cache_key(cfg) != key  # Booster's harmful rows changed: a cached Booster model is stale
    assert cache_key(C.load(None, [])) == sft_key  # plain alignment does not depend on them


def test_overrides_after_options_reach_eval(tmp_path, capsys):
    f = tmp_path / "cfg.yaml"
    f.write_text("eval:\n  max_new_tokens: 8\n")
    # formerly an argparse error ("unrecognized arguments: out_dir=..."); now the overrides are read and
    # the run gets as far as loading the (missing) model
    code = main(["eval", str(tmp_path / "missing-model"), "--config", str(f), f"out_dir={tmp_path}", "run_id=x"])
    assert code == 2
    assert "missing-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "missing-model"), "--bogus-flag"])
