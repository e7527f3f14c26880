"""train.report_to: a TensorBoard run writes event files holding the same loss terms as metrics.jsonl; an
unknown or missing tracker is refused before anything is written."""

from __future__ import annotations

import json

import pytest

from safeft import config as C
from safeft.testing import tiny_run_config
from safeft.train import train


def _scalars(run_dir):
    """(tag, step, value) of every scalar in the run's event files, read with tensorboardX's own reader."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in (run_dir / "tensorboard").rglob("events.out.tfevents*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            n = int.from_bytes(data[pos : pos + 8], "little")
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.append((v.tag, ev.step, v.simple_value))
    return out


def test_the_event_files_hold_the_metrics_lines(tmp_path, tiny):
    pytest.importorskip("tensorboardX")
    model, tok = tiny
    cfg = tiny_run_config(tmp_path / "runs", "train.report_to=[tensorboard]", "defense.name=sbr", "train.steps=3")
    res = train(cfg, model=model, tokenizer=tok, progress=False)
    got = {(tag, step): value for tag, step, value in _scalars(res.run_dir)}
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for row in lines:
        for key in ("loss", "loss/task", "loss/sbr", "lr"):
            assert got[(key, row["step"])] == pytest.approx(row[key], rel=1e-6), key


@pytest.mark.parametrize(
    "value, msg",
    [("[tensorbord]", "'tensorbord' is not a tracker"), ("[none, tensorboard]", "'none' together with")],
)
def test_bad_trackers_are_refused_before_anything_is_written(tmp_path, tiny, value, msg):
    model, tok = tiny
    cfg = tiny_run_config(tmp_path / "runs", f"train.report_to={value}")
    with pytest.raises(C.ConfigError, match=msg):
        train(cfg, model=model, tokenizer=tok, progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_missing_backend_names_the_extra(tmp_path, tiny, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    model, tok = tiny
    with pytest.raises(C.ConfigError, match=r"pip install 'safeft\[trackers\]'"):
        train(tiny_run_config(tmp_path / "runs", "train.report_to=[wandb]"), model=model, tokenizer=tok, progress=False)
