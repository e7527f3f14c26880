"""The command line: verbs exist, bad input exits non-zero with a message naming file and row."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safeft.cli import main


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safeft", *args], capture_output=True, text=True, cwd=cwd)


def test_ls_lists_defenses_judges_sources_domains(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for word in (
        "defenses:",
        "sft",
        "judges:",
        "refusal_keywords",
        "data sources:",
        "harmbench",
        "donotanswer",
        "domains:",
        "finance",
        "medical",
        "code",
    ):
        assert word in out


def test_validate_reports_bad_row_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine", "response": "ok"}\n{"prompt": "x", "response": 3}\n')
    r = run("validate", f"data.task=jsonl:{bad}")
    assert r.returncode == 2
    assert "bad.jsonl" in r.stderr and "line 2" in r.stderr


def test_bad_config_key_exits_nonzero_naming_the_file(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("train:\n  stepz: 3\n")
    r = run("train", "--config", str(f))
    assert r.returncode == 2
    assert "cfg.yaml" in r.stderr and "train.stepz" in r.stderr and "did you mean 'train.steps'" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_validate_accepts_good_config(capsys, tmp_path):
    assert main(["validate", "data.task=domain:code"]) == 0
    assert "1200 rows OK" in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["align", "train", "eval", "demo", "ls", "validate", "diagnose"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
