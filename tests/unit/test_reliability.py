"""Reliability and security of a run directory, one defect class at a time (the catalogue of single inputs
and faults is tests/unit/test_bad_inputs.py).

* nothing safeft loads runs code: trainer state is safetensors + JSON; a crafted pickle is refused;
* one directory, one run: a lock across processes, a fresh start that is fresh, a finished run left alone;
* non-finite training stops before anything non-finite is saved;
* a resume recovers from a torn log line, a lost checkpoint, a full disk, and ends where an uninterrupted
  run ends;
* files get the modes the umask gives.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safeft import io, runs, tensortree
from safeft.cli import main
from safeft.data.types import Example
from safeft.methods import METHODS
from safeft.methods.base import Defense
from safeft.testing import save_tiny_model, tiny_run_config
from safeft.train import TrainingDiverged, TrainingInterrupted, train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(16)]
AUX = {
    "harmful_prompts": [Example(f"h{i}", f"How do I do harmful thing {i}?") for i in range(6)],
    "alignment": [Example(f"a{i}", f"How do I do harmful thing {i}?", "I'm sorry, I can't help.") for i in range(6)],
}


def cfg_for(tmp_path, *extra: str):
    return tiny_run_config(tmp_path / "runs", "train.steps=4", "train.save_every=1", "train.batch_size=2", *extra)


def run(cfg, tiny_dir, **kw):
    from safeft import models

    m, tok = models.load(str(tiny_dir))
    return train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, aux=AUX, progress=False, **kw)


def interrupted(cfg, tiny_dir, after: int) -> Path:
    with pytest.raises(TrainingInterrupted):
        run(cfg, tiny_dir, interrupt_after=after)
    return Path(cfg.out_dir) / cfg.run_id


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(runs.checkpoints(run_dir)[-1] / "trainable.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in runs.read_log(run_dir / "metrics.jsonl")]


# ----------------------------------------------------------------------------- no code runs from a loaded file


def test_trainer_state_round_trips_without_pickle(tmp_path):
    from transformers import get_scheduler

    p = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    opt = torch.optim.AdamW(p, lr=0.1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=5)
    for _ in range(2):
        sum((x.float() ** 2).sum() for x in p).backward()
        opt.step()
        sched.step()
    tree = {
        "optimizer": opt.state_dict(),  # int keys, 0-d step tensors, bf16 moments
        "scheduler": sched.state_dict(),
        "rng": runs.rng_state(),  # numpy's tuple with a uint32 array, python's nested tuple
        "defense": {"ema": [0.5, float("nan"), float("inf")], "state": "align", "none": None, "x": np.float64(2.5)},
        "empty": torch.zeros(0),
    }
    tensortree.save(tree, tmp_path, "trainer")
    assert sorted(os.listdir(tmp_path)) == ["trainer.json", "trainer.safetensors"]
    back = tensortree.load(tmp_path, "trainer")

    opt2 = torch.optim.AdamW(p, lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() == {0, 1}
    assert all(torch.equal(a[k][n], b[k][n]) and a[k][n].dtype == b[k][n].dtype for k in a for n in a[k])
    assert back["scheduler"] == sched.state_dict()
    assert back["defense"]["state"] == "align" and back["defense"]["none"] is None
    assert back["defense"]["x"] == 2.5 and isinstance(back["defense"]["x"], np.float64)
    assert np.isnan(back["defense"]["ema"][1]) and back["defense"]["ema"][2] == float("inf")
    # the RNG state restores: the same draws follow
    runs.set_rng_state(back["rng"])
    draws = (torch.rand(3), random.random(), np.random.rand())
    runs.set_rng_state(tree["rng"])
    assert torch.equal(draws[0], torch.rand(3)) and draws[1] == random.random() and draws[2] == np.random.rand()


def test_state_that_cannot_be_stored_as_data_is_refused_at_save(tmp_path):
    with pytest.raises(tensortree.StateFormatError, match=r"trainer\['defense'\]\['probe'\].*cannot be stored"):
        tensortree.save({"defense": {"probe": object()}}, tmp_path, "trainer")


def test_a_crafted_legacy_trainer_pt_does_not_execute(tmp_path, tiny_dir):
    """The issue's attack: a trainer.pt whose unpickling runs a command, in a run someone resumes."""
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cfg = cfg_for(tmp_path)
    run_dir = interrupted(cfg, tiny_dir, after=2)
    for ckpt in runs.checkpoints(run_dir):
        for name in ("trainer.safetensors", "trainer.json"):
            (ckpt / name).unlink(missing_ok=True)
        torch.save({"optimizer": Evil()}, ckpt / "trainer.pt")
    with pytest.raises(runs.RunError, match="trainer.pt: refused.*GLOBAL posix.system"):
        run(cfg, tiny_dir)
    assert not marker.exists()
    # the same file does run code when unpickled the unsafe way: the test above can fail
    torch.load(runs.checkpoints(run_dir)[-1] / "trainer.pt", weights_only=False)
    assert marker.exists()


def test_a_legacy_trainer_pt_of_plain_data_still_resumes(tmp_path, tiny_dir):
    """Runs written before the safetensors format resume: their trainer.pt is read with weights_only."""
    straight = run(cfg_for(tmp_path / "a"), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b")
    run_dir = interrupted(cfg, tiny_dir, after=2)
    for ckpt in runs.checkpoints(run_dir):
        if tensortree.exists(ckpt, "trainer"):
            torch.save(tensortree.load(ckpt, "trainer"), ckpt / "trainer.pt")  # what the old code wrote
            (ckpt / "trainer.safetensors").unlink()
            (ckpt / "trainer.json").unlink()
    assert isinstance(runs.read_trainer_state(runs.checkpoints(run_dir)[-1])["rng"]["numpy"][1], np.ndarray)
    resumed = run(cfg, tiny_dir).run_dir
    assert same_weights(straight, resumed)


def test_a_pickle_only_model_directory_needs_opting_in(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file

    from safeft import models

    d = tmp_path / "pickled"
    shutil.copytree(tiny_dir, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(models.ModelError, match=r"pytorch_model.bin.*model.allow_pickle=true"):
        models.load(str(d))
    model, _ = models.load(str(d), allow_pickle=True)
    ref, _ = models.load(str(tiny_dir))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_defense_resumes_exactly_from_its_stored_state(name, tmp_path, tiny_dir):
    """Each defense's state_dict goes through the safetensors + JSON format and back: an interrupted run
    resumes to the weights and metrics of an uninterrupted one."""
    extra = [f"defense.name={name}", "train.steps=3"]
    if "base_model" in {f.name for f in dataclasses.fields(METHODS.get(name).Config)}:
        extra.append(f"defense.base_model={save_tiny_model(tmp_path / 'base', seed=1)}")
    straight = run(cfg_for(tmp_path / "a", *extra), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b", *extra)
    ckpt = runs.checkpoints(interrupted(cfg, tiny_dir, after=2))[-1]
    assert not (ckpt / "trainer.pt").exists() and tensortree.exists(ckpt, "trainer")
    resumed = run(cfg, tiny_dir).run_dir
    assert same_weights(straight, resumed)
    assert metrics(straight) == metrics(resumed)
    stateful = METHODS.get(name).state_dict is not Defense.state_dict
    assert stateful or tensortree.load(ckpt, "trainer")["defense"] == {}


# ----------------------------------------------------------------------------- one directory, one run

HOLDER = """
import sys
from safeft import runs
with runs.lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_is_refused_and_a_killed_holder_s_lock_is_taken_over(tmp_path, tiny_dir, capsys, caplog):
    out = tmp_path / "runs"
    run_dir = out / "r"
    args = ["train", f"model.spec={tiny_dir}", "data.task=domain:finance", "data.n_train=8", "train.steps=2"]
    args += ["train.batch_size=2", "train.precision=fp32", "model.lora.r=2", f"out_dir={out}", "run_id=r"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by pid {holder.pid} on {socket.gethostname()}" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the refused run wrote nothing
        holder.send_signal(signal.SIGKILL)  # a run killed hard: no clean-up, the lock file stays behind
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (run_dir / ".lock").exists()
    assert main(args) == 0
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert [r["step"] for r in runs.read_log(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / ".lock").exists()


def test_no_resume_is_refused_over_a_run_and_overwrite_really_starts_fresh(tmp_path, tiny_dir):
    straight = run(cfg_for(tmp_path / "a"), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b")
    run_dir = interrupted(cfg, tiny_dir, after=3)
    (run_dir / "evals.jsonl").write_text('{"step": 0, "asr": 1.0}\n')  # a stale eval of the old run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(runs.RunError, match="--overwrite"):
        run(cfg, tiny_dir, resume=False)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    fresh = run(cfg, tiny_dir, resume=False, overwrite=True).run_dir
    assert not (fresh / "evals.jsonl").exists()
    assert same_weights(straight, fresh) and metrics(straight) == metrics(fresh)
    assert [c.name for c in runs.checkpoints(fresh)] == [f"step-00000{i}" for i in range(1, 5)]


def test_a_finished_run_is_returned_untouched(tmp_path, tiny_dir, capsys):
    cfg = cfg_for(tmp_path)
    first = run(cfg, tiny_dir)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.run_dir.rglob("*") if p.is_file()}
    again = run(cfg, tiny_dir)
    assert again.finished_before and again.steps == 4 and again.final_loss == first.final_loss
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.run_dir.rglob("*") if p.is_file()} == files
    final = weights(first.run_dir)
    assert all(torch.equal(p.detach(), final[n]) for n, p in again.model.named_parameters() if n in final)
    assert json.loads((first.run_dir / "train_summary.json").read_text())["final_loss"] == first.final_loss


def test_resume_is_refused_when_the_data_changed(tmp_path, tiny_dir):
    from safeft import models

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in EXAMPLES))
    cfg = cfg_for(tmp_path, f"data.task=jsonl:{data}")
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(TrainingInterrupted):
        train(cfg, model=m, tokenizer=tok, progress=False, interrupt_after=2)
    good = data.read_text()
    data.write_text(good.replace("Answer: 7", "Answer: 70"))
    m, tok = models.load(str(tiny_dir))
    with pytest.raises(runs.RunError, match="training data changed since this run started"):
        train(cfg, model=m, tokenizer=tok, progress=False)
    data.write_text(good)
    m, tok = models.load(str(tiny_dir))
    assert train(cfg, model=m, tokenizer=tok, progress=False).steps == 4


# ----------------------------------------------------------------------------- non-finite training


def test_a_non_finite_update_stops_before_it_is_saved(tmp_path, tiny_dir, monkeypatch):
    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):  # the third update puts an inf into one weight
        out = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    cfg = cfg_for(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"step 3: the update made .*lora.* non-finite.*step-000002"):
        run(cfg, tiny_dir)
    run_dir = Path(cfg.out_dir) / cfg.run_id
    assert [c.name for c in runs.checkpoints(run_dir)] == ["step-000001", "step-000002"]
    assert all(torch.isfinite(t).all() for t in weights(run_dir).values())
    assert [r["step"] for r in runs.read_log(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "train_summary.json").exists()


def test_lr_inf_is_refused_up_front_and_a_diverging_lr_exits_non_zero(tmp_path, tiny_dir, capsys):
    base = [f"model.spec={tiny_dir}", "data.task=domain:finance", "data.n_train=8", "train.steps=3"]
    base += ["train.batch_size=2", "train.save_every=1", "train.precision=fp32", f"out_dir={tmp_path / 'runs'}"]
    assert main(["train", *base, "train.lr=inf", "run_id=inf"]) == 2
    assert "train.lr=inf: must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["train", *base, "train.lr=1e30", "run_id=big"]) == 3
    err = capsys.readouterr().err
    assert "step 2: the loss is nan (loss terms: task=nan)" in err and "Traceback" not in err
    run_dir = tmp_path / "runs" / "big"
    assert [c.name for c in runs.checkpoints(run_dir)] == ["step-000001"]
    assert all(torch.isfinite(t).all() for t in weights(run_dir).values())


# ----------------------------------------------------------------------------- a resume that recovers


def test_a_torn_metrics_line_is_dropped_and_the_resume_matches(tmp_path, tiny_dir, caplog):
    straight = run(cfg_for(tmp_path / "a"), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b")
    run_dir = interrupted(cfg, tiny_dir, after=2)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of a line
    assert [r["step"] for r in runs.read_log(run_dir / "metrics.jsonl")] == [1, 2]
    assert "torn last line" in caplog.text
    resumed = run(cfg, tiny_dir).run_dir
    assert metrics(straight) == metrics(resumed) and same_weights(straight, resumed)


def test_a_lost_newest_checkpoint_falls_back_and_the_resume_matches(tmp_path, tiny_dir):
    import shutil

    straight = run(cfg_for(tmp_path / "a"), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b")
    run_dir = interrupted(cfg, tiny_dir, after=3)
    # the newest two keep trainer state; older ones only their weights
    assert [runs.has_trainer_state(c) for c in runs.checkpoints(run_dir)] == [False, True, True]
    shutil.rmtree(runs.checkpoints(run_dir)[-1])
    resumed = run(cfg, tiny_dir).run_dir
    assert metrics(straight) == metrics(resumed) and same_weights(straight, resumed)


def test_a_full_disk_names_the_path_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    io.write_json(target, {"old": True})

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(io.WriteError, match=rf"cannot write {target}: No space left on device") as e:
        io.write_json(target, {"new": True})
    assert e.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_a_full_disk_while_logging_is_resumable(tmp_path, tiny_dir, monkeypatch, caplog):
    straight = run(cfg_for(tmp_path / "a"), tiny_dir).run_dir
    cfg = cfg_for(tmp_path / "b")
    write = io.AppendLog.write

    def full_at_step_3(self, text):
        if '"step": 3' in text:
            write(self, text[:30])  # what reached the disk before it filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, text)

    monkeypatch.setattr(io.AppendLog, "write", full_at_step_3)
    with pytest.raises(OSError, match="No space left on device"):
        run(cfg, tiny_dir)
    monkeypatch.undo()
    resumed = run(cfg, tiny_dir).run_dir
    assert "torn last line" in caplog.text
    assert metrics(straight) == metrics(resumed) and same_weights(straight, resumed)


# ----------------------------------------------------------------------------- inputs


def test_a_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from safeft.validate import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct") and not looks_like_path("gpt2")
    for spec in ("./m", "../m", "/m", "~/m", "a/b/c", "m/", "model.gguf", "weights.bin", "a\\b", "a b/c"):
        assert looks_like_path(spec), spec
    (tmp_path / "models").mkdir()  # "models/x" is a path once ./models exists
    assert looks_like_path("models/x")


def test_gguf_header_gives_depth_and_context_without_loading_weights():
    from safeft import models
    from safeft.validate import gguf_metadata

    try:
        path = models.alias_path("smollm2-135m")
    except models.ModelError:
        pytest.skip("the embedded model's package is not installed")
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.context_length"]) == (30, 8192)


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_files_and_checkpoint_dirs_get_the_umask_modes(mask, tmp_path, tiny_dir):
    old = os.umask(mask)
    try:
        extra = ("train.steps=2", "train.eval_every=2", "train.eval_n_harmful=2")
        extra += ("eval.max_new_tokens=2", "eval.judge=dummy", "eval.precision=fp32")
        res = run(cfg_for(tmp_path, *extra), tiny_dir)
    finally:
        os.umask(old)
    rd = res.run_dir
    dirs = [rd / "checkpoints", *runs.checkpoints(rd), rd / "eval_steps" / "step-000002"]
    files = [
        rd / n for n in ("config.yaml", "metrics.jsonl", "evals.jsonl", "train_summary.json", "data_fingerprint.json")
    ]
    files += list(runs.checkpoints(rd)[-1].iterdir()) + [rd / "eval_steps" / "step-000002" / "harmful.jsonl"]
    # a saved model (the aligned model, a GGUF conversion) goes through the same writer
    from safeft import models

    old = os.umask(mask)
    try:
        models.save_model(models.merge_and_unload(res.model), res.tokenizer, tmp_path / "merged")
    finally:
        os.umask(old)
    dirs.append(tmp_path / "merged")
    files += list((tmp_path / "merged").iterdir())
    assert {oct(d.stat().st_mode & 0o777) for d in dirs} == {oct(0o777 & ~mask)}
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}
