"""A catalogue of malformed inputs and faults, each run through the real command line on the tiny model.

Every case asserts the exit status, a message naming the key or file, and that nothing half-written is left
(no run directory at all for a bad input; for a fault, the run directory as it was or recovered, and no
temp or lock files). Inputs (config values, data files, model directories) also go through
``safeft validate``, which must agree with ``safeft train``: both fail with the same message, or both pass.

Model loads are shared: the tiny model and its damaged variants are written once per module, and a run
interrupted at step 2 and a finished run are trained once and copied for each fault.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from safeft import config as C
from safeft import io, runs
from safeft.cli import main

BASE = (
    "model.spec={tiny}",
    "data.task=jsonl:{data}",
    "train.steps=3",
    "train.batch_size=2",
    "train.save_every=1",
    "train.lr=0.01",
    "train.precision=fp32",
    "model.lora.r=2",
    "model.lora.alpha=4",
    "run_id=r",
)
ROWS = [{"prompt": f"What is {i} plus 7?", "response": f"Answer: {i + 7}"} for i in range(8)]


class Evil:
    """A pickle payload: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- shared inputs, written once


def _write_inputs(root: Path, tiny: Path) -> dict[str, str]:
    f = root / "files"
    f.mkdir()
    lines = [json.dumps(r) for r in ROWS]
    (f / "good.jsonl").write_text("\n".join(lines) + "\n")
    (f / "empty.jsonl").write_text("")
    (f / "blank.jsonl").write_text("\n   \n\n")
    (f / "empty.csv").write_text("")
    # the bad byte on line 3, after more than a read-ahead block of good text
    long_ok = json.dumps({"prompt": "p" * 9000, "response": "r"})
    (f / "badutf8.jsonl").write_bytes(
        (lines[0] + "\n" + long_ok + "\n").encode() + b'{"prompt": "caf\xe9", "response": "x"}\n'
    )
    (f / "badutf8.csv").write_bytes(b"prompt,response\nq1,a1\nq2,a2\nq\xff3,a3\n")
    (f / "emptyresp.jsonl").write_text(lines[0] + "\n" + json.dumps({"prompt": "q", "response": "  "}) + "\n")
    (f / "malformed.jsonl").write_text(lines[0] + '\n{"prompt": "q", "response": }\n')
    (f / "noresp.jsonl").write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    (f / "dupid.jsonl").write_text(
        json.dumps({"id": 1, "prompt": "a", "response": "b"})
        + "\n"
        + json.dumps({"id": 1, "prompt": "c", "response": "d"})
        + "\n"
    )
    (f / "respint.jsonl").write_text(json.dumps({"prompt": "a", "response": 3}) + "\n")
    (f / "longprompt.jsonl").write_text(json.dumps({"prompt": "word " * 200, "response": "ok"}) + "\n")
    (f / "notyaml.yaml").write_text("train: [unclosed\n")
    (f / "afile").write_text("not a directory\n")

    def variant(name: str, drop: tuple[str, ...] = (), edit: Callable[[Path], None] | None = None) -> Path:
        d = root / name
        shutil.copytree(tiny, d)
        for x in drop:
            (d / x).unlink()
        if edit:
            edit(d)
        return d

    def to_pickle(d: Path) -> None:
        from safetensors.torch import load_file

        torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def no_template(d: Path) -> None:
        (d / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    paths = {
        "tiny": str(tiny),
        "data": str(f / "good.jsonl"),
        "notok": str(variant("notok", ("tokenizer.json",))),
        "noconfig": str(variant("noconfig", ("config.json",))),
        "noweights": str(variant("noweights", ("model.safetensors",))),
        "pickled": str(variant("pickled", edit=to_pickle)),
        "notemplate": str(variant("notemplate", edit=no_template)),
    }
    paths.update({p.name.replace(".", "_"): str(p) for p in f.iterdir()})
    return paths


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("catalogue")
    paths = _write_inputs(root, tiny_dir)
    paths["root"] = str(root)
    # Two runs every fault starts from: one killed after step 2 of 3, one finished.
    from safeft.train import TrainingInterrupted, train

    def cfg(out: Path):
        return C.load(overrides=[a.format(**paths) for a in BASE] + [f"out_dir={out}"])

    with pytest.raises(TrainingInterrupted):
        train(cfg(root / "interrupted"), interrupt_after=2, progress=False)
    train(cfg(root / "finished"), progress=False)
    return paths


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(root: Path) -> dict[str, str]:
    """Every file of a run directory and its content hash (the lock is the holder's, not the run's)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def leftovers(root: Path) -> list[str]:
    """Temp files, temp dirs and locks: what a write cut short or a run that did not clean up leaves."""
    return [str(p) for p in root.rglob(".*")] if root.exists() else []


# ----------------------------------------------------------------------------- the catalogue


@dataclass
class Case:
    id: str
    args: tuple[str, ...]  # CLI arguments after the verb (BASE first, these win); "{name}" = a path of env
    expect: tuple[str, ...]  # substrings of the message (stderr; stdout when rc == 0)
    rc: int = 2
    base: bool = True  # start from BASE
    # Faults: train only. ``start`` copies a prepared run ("interrupted" / "finished") to the run dir;
    # ``fault`` damages it (or the environment) and returns what undoes it; ``check`` looks at the result.
    start: str | None = None
    fault: Callable[[Path, dict, pytest.MonkeyPatch], Callable[[], None] | None] | None = None
    check: Callable[[Path, dict[str, str], dict[str, str]], None] | None = None
    logs: tuple[str, ...] = ()  # substrings of the log (warnings) a fault must produce
    untouched: bool = False  # the run directory must be exactly as before
    is_input: bool = True  # an input (config, data, model); False: a fault of the run or the machine


def I(id: str, *args: str, expect: tuple[str, ...] | str, rc: int = 2, base: bool = True) -> Case:  # noqa: E743
    return Case(id, args, (expect,) if isinstance(expect, str) else expect, rc, base)


INPUTS = [
    # --- train values
    I("lr negative", "train.lr=-1e-4", expect=("train.lr=-0.0001", "finite number > 0")),
    I("lr nan", "train.lr=nan", expect=("train.lr=nan", "finite number > 0")),
    I("lr inf", "train.lr=inf", expect=("train.lr=inf", "finite number > 0")),
    I("lr zero", "train.lr=0", expect="train.lr=0.0"),
    I("lr not a number", "train.lr=fast", expect=("train.lr", "expected a number")),
    I("steps zero", "train.steps=0", expect=("train.steps=0", ">= 1")),
    I("steps negative", "train.steps=-5", expect=("train.steps=-5", ">= 1")),
    I("batch size zero", "train.batch_size=0", expect="train.batch_size=0"),
    I("grad accum zero", "train.grad_accum=0", expect="train.grad_accum=0"),
    I("log_every zero", "train.log_every=0", expect=("train.log_every=0", ">= 1")),
    I("save_every negative", "train.save_every=-1", expect=("train.save_every=-1", ">= 0")),
    I("eval_every negative", "train.eval_every=-1", expect="train.eval_every=-1"),
    I("warmup above 1", "train.warmup_ratio=1.5", expect=("train.warmup_ratio=1.5", "[0, 1]")),
    I("warmup negative", "train.warmup_ratio=-0.1", expect="train.warmup_ratio=-0.1"),
    I("unknown schedule", "train.schedule=exponential", expect=("train.schedule='exponential'", "cosine")),
    I("unknown precision", "train.precision=fp16", expect=("train.precision='fp16'", "auto, fp32, bf16")),
    I("unknown eval precision", "eval.precision=half", expect="eval.precision='half'"),
    I("grad norm zero", "train.max_grad_norm=0", expect="train.max_grad_norm=0.0"),
    I("weight decay negative", "train.weight_decay=-1", expect="train.weight_decay=-1.0"),
    I("seed negative", "train.seed=-1", expect=("train.seed=-1", "2**32")),
    I("unknown key", "train.stepz=3", expect="did you mean 'train.steps'"),
    I("periodic eval, unknown judge", "train.eval_every=1", "eval.judge=nosuchjudge", expect="nosuchjudge"),
    I(
        "periodic eval, too many prompts",
        "train.eval_every=1",
        "train.eval_n_harmful=500",
        expect="train.eval_n_harmful=500",
    ),
    I("eval top_p zero", "eval.top_p=0", expect="eval.top_p=0.0"),
    # --- LoRA
    I("lora rank zero", "model.lora.r=0", expect=("model.lora.r=0", ">= 1")),
    I("lora alpha zero", "model.lora.alpha=0", expect="model.lora.alpha=0"),
    I("lora dropout 1", "model.lora.dropout=1.0", expect=("model.lora.dropout=1.0", "[0, 1)")),
    I(
        "lora targets match nothing",
        "model.lora.targets=[nosuch_proj]",
        expect=("model.lora.targets", "matches none", "q_proj"),
    ),
    I("lora targets not linear", "model.lora.targets=[layers]", expect=("model.lora.targets", "ModuleList")),
    I("lora targets empty list", "model.lora.targets=[]", expect="model.lora.targets=[]"),
    # --- data values and the data
    I("max_length beyond context", "data.max_length=100000", expect=("data.max_length=100000", "context (512")),
    I("max_length 1", "data.max_length=1", expect="data.max_length=1"),
    I("n_train zero", "data.n_train=0", expect=("data.n_train=0", ">= 1")),
    I("n_train above rows", "data.n_train=1000", expect=("data.n_train=1000", "8 rows")),
    I("no data section", "data=null", expect="training needs data"),
    I("unknown data source", "data.task=jsnl:{good_jsonl}", expect=("data.task", "unknown data source", "jsonl")),
    I("unknown domain", "data.task=domain:finanse", expect=("finanse", "finance")),
    I("data file missing", "data.task=jsonl:{root}/nope.jsonl", expect=("nope.jsonl", "no such file")),
    I("empty jsonl", "data.task=jsonl:{empty_jsonl}", expect=("empty.jsonl", "no rows")),
    I("blank-lines jsonl", "data.task=jsonl:{blank_jsonl}", expect=("blank.jsonl", "no rows")),
    I("empty csv", "data.task=csv:{empty_csv}", expect=("empty.csv", "empty file")),
    I("non-UTF-8 byte, jsonl", "data.task=jsonl:{badutf8_jsonl}", expect=("badutf8.jsonl, line 3", "UTF-8", "0xe9")),
    I("non-UTF-8 byte, csv", "data.task=csv:{badutf8_csv}", expect=("badutf8.csv, line 4", "UTF-8", "0xff")),
    I("empty response", "data.task=jsonl:{emptyresp_jsonl}", expect=("emptyresp.jsonl, line 2", "empty response")),
    I("malformed JSON", "data.task=jsonl:{malformed_jsonl}", expect=("malformed.jsonl, line 2", "malformed JSON")),
    I("row without response", "data.task=jsonl:{noresp_jsonl}", expect=("noresp.jsonl", "no response")),
    I("duplicate id", "data.task=jsonl:{dupid_jsonl}", expect=("dupid.jsonl, line 2", "duplicate id")),
    I("response not a string", "data.task=jsonl:{respint_jsonl}", expect=("respint.jsonl, line 1", "must be a string")),
    I(
        "prompt too long",
        "data.task=jsonl:{longprompt_jsonl}",
        "data.max_length=16",
        expect=("longprompt.jsonl", "data.max_length=16"),
    ),
    # --- the model
    I("model path missing", "model.spec={root}/no/such/model", expect=("no/such/model", "no such file or directory")),
    I("model path relative typo", "model.spec=./tiny-typo", expect=("./tiny-typo", "not tried as a hub id")),
    I("model spec with two slashes", "model.spec=org/sub/model", expect=("org/sub/model", "looks like a local path")),
    I(
        "model name a typo of a local model",
        "model.spec=tiny-modle",
        expect=("tiny-modle", "did you mean 'tiny-model'"),
    ),
    I("gguf missing", "model.spec={root}/model.gguf", expect=("model.gguf", "GGUF file not found")),
    I("model spec is a file", "model.spec={afile}", expect=("afile", "is a file")),
    I("model dir without tokenizer", "model.spec={notok}", expect=("notok", "no tokenizer files")),
    I("model dir without config", "model.spec={noconfig}", expect=("noconfig", "no config.json")),
    I("model dir without weights", "model.spec={noweights}", expect=("noweights", "no weights")),
    I(
        "model dir, pickle weights only",
        "model.spec={pickled}",
        expect=("pytorch_model.bin", "model.allow_pickle=true"),
    ),
    I("tokenizer without chat template", "model.spec={notemplate}", expect="chat template"),
    # --- the defense
    I("unknown defense", "defense.name=sftt", expect=("defense.name", "did you mean 'sft'")),
    I(
        "sap layers beyond depth",
        "defense.name=sap",
        "defense.layers=[0,7]",
        expect=("defense.layers=[0, 7]", "has 2 layers", "[7]"),
    ),
    I("sap negative layer", "defense.name=sap", "defense.layers=[-1]", expect=("defense.layers=[-1]", "0..1")),
    I("repanchor layers beyond depth", "defense.name=repanchor", "defense.layers=[5]", expect="defense.layers=[5]"),
    I("defense value out of range", "defense.name=sap", "defense.probe_lr=0", expect="defense.probe_lr"),
    # --- where the run goes; the config file itself
    I("run_id escapes out_dir", "run_id=../escape", expect=("run_id='../escape'", "plain directory name")),
    I("out_dir is a file", "out_dir={afile}", expect=("out_dir", "is a file")),
    I("config file missing", "--config", "{root}/nope.yaml", expect=("nope.yaml", "not found")),
    I("config not YAML", "--config", "{notyaml_yaml}", expect=("notyaml.yaml", "not valid YAML")),
    # --- inputs that are fine: both verbs pass
    I("good input", expect="", rc=0),
    I("pickle weights, opted in", "model.spec={pickled}", "model.allow_pickle=true", expect="", rc=0),
]


# ----------------------------------------------------------------------------- faults


def _damage(rel: str, text: str | bytes):
    def fault(run: Path, env, mp):
        p = run / rel
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return fault


def _append(rel: str, text: str):
    def fault(run: Path, env, mp):
        with (run / rel).open("a") as f:
            f.write(text)

    return fault


def _remove(*rels: str):
    def fault(run: Path, env, mp):
        for rel in rels:
            for p in run.glob(rel):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    return fault


def _hold_lock(run: Path, env, mp):
    cm = runs.lock(run)
    cm.__enter__()
    return lambda: cm.__exit__(None, None, None)


def _stale_lock(run: Path, env, mp):
    (run / ".lock").write_text(json.dumps({"pid": 4_000_000, "host": socket.gethostname(), "since": "yesterday"}))


def _change_data(run: Path, env, mp):
    path = Path(env["data"])
    before = path.read_text()
    path.write_text(before.replace("Answer: 7", "Answer: 8"))
    return lambda: path.write_text(before)


def _crafted_pickle(run: Path, env, mp):
    for ckpt in (run / "checkpoints").glob("step-*"):
        for name in ("trainer.safetensors", "trainer.json"):
            (ckpt / name).unlink(missing_ok=True)
        torch.save({"optimizer": Evil(run.parent / "PWNED")}, ckpt / "trainer.pt")


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_on_checkpoint(run: Path, env, mp):
    import safetensors.torch

    mp.setattr(safetensors.torch, "save_file", _enospc)


def _full_disk_on_fsync(run: Path, env, mp):
    mp.setattr(io.os, "fsync", _enospc)


def _full_disk_on_metrics(run: Path, env, mp):
    init = io.AppendLog.__init__

    class FullDisk:  # the disk fills in the middle of step 3's line
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if '"step": 3' in text:
                self.f.write(text[:25])
                self.f.flush()
                _enospc()
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def patched(self, path):
        init(self, path)
        if Path(path).name == "metrics.jsonl":
            self._f = FullDisk(self._f)

    mp.setattr(io.AppendLog, "__init__", patched)


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in runs.read_log(run / "metrics.jsonl")]


def _finite_checkpoints(run: Path) -> list[str]:
    from safetensors.torch import load_file

    out = []
    for ckpt in runs.checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())
        out.append(ckpt.name)
    return out


def _fresh_and_complete(run: Path, before, after) -> None:
    assert _steps(run) == [1, 2, 3]
    assert (run / "train_summary.json").exists()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # not NaN


def F(
    id: str,
    *args: str,
    expect,
    rc: int,
    start: str | None = "interrupted",
    fault=None,
    check=None,
    logs=(),
    untouched=False,
    base=True,
) -> Case:
    expect = (expect,) if isinstance(expect, str) else expect
    return Case(id, args, expect, rc, base, start, fault, check, tuple(logs), untouched, is_input=False)


FAULTS = [
    F(
        "run dir held by another writer",
        expect=("in use by pid", socket.gethostname()),
        rc=2,
        fault=_hold_lock,
        untouched=True,
    ),
    F(
        "stale lock of a killed run",
        expect="steps=3",
        rc=0,
        fault=_stale_lock,
        logs=("taking over the lock of pid 4000000",),
        check=_fresh_and_complete,
    ),
    F("finished run", expect="finished already", rc=0, start="finished", untouched=True),
    F("--no-resume over a run", "--no-resume", expect=("already holds a run", "--overwrite"), rc=2, untouched=True),
    F("--no-resume --overwrite", "--no-resume", "--overwrite", expect="steps=3", rc=0, check=_fresh_and_complete),
    F("resume with another config", "train.lr=0.02", expect=("different config", "train"), rc=2, untouched=True),
    F("resume on changed data", expect=("training data changed", "8 rows"), rc=2, fault=_change_data, untouched=True),
    F(
        "torn last metrics line",
        expect="steps=3",
        rc=0,
        fault=_append("metrics.jsonl", '{"step": 3, "lo'),
        logs=("torn last line",),
        check=_fresh_and_complete,
    ),
    F(
        "damaged middle metrics line",
        expect=("metrics.jsonl, line 1", "damaged log line"),
        rc=2,
        fault=_damage("metrics.jsonl", 'garbage\n{"step": 2, "loss": 1.0}\n'),
        untouched=True,
    ),
    F(
        "newest checkpoint deleted",
        expect="steps=3",
        rc=0,
        fault=_remove("checkpoints/step-000002"),
        check=_fresh_and_complete,
    ),
    F(
        "newest trainer state damaged",
        expect="steps=3",
        rc=0,
        fault=_damage("checkpoints/step-000002/trainer.json", "{"),
        logs=("cannot resume from step-000002",),
        check=_fresh_and_complete,
    ),
    F(
        "no trainer state anywhere",
        expect="no checkpoint can be resumed exactly",
        rc=2,
        fault=_remove("checkpoints/*/trainer.*"),
        untouched=True,
    ),
    F(
        "crafted trainer.pt",
        expect=("trainer.pt: refused", "does not unpickle"),
        rc=2,
        fault=_crafted_pickle,
        untouched=True,
        check=lambda run, b, a: not (run.parent / "PWNED").exists() or pytest.fail("the pickle ran"),
    ),
    F(
        "damaged config.yaml",
        expect=("config.yaml", "cannot read the config"),
        rc=2,
        fault=_damage("config.yaml", "train: [\n"),
        untouched=True,
    ),
    F(
        "disk full during a checkpoint",
        expect=("cannot write", "step-000003", "No space left on device"),
        rc=1,
        fault=_full_disk_on_checkpoint,
        check=lambda run, b, a: (
            _finite_checkpoints(run) == ["step-000001", "step-000002"] or pytest.fail("checkpoints")
        ),
    ),
    F(
        "disk full on a fresh run's config",
        expect=("config.yaml", "No space left on device"),
        rc=1,
        start=None,
        fault=_full_disk_on_fsync,
        check=lambda run, b, a: not run.exists() or pytest.fail(str(list(run.iterdir()))),
    ),
    F(
        "disk full while logging",
        expect=("metrics.jsonl", "No space left on device"),
        rc=1,
        fault=_full_disk_on_metrics,
        check=lambda run, b, a: _steps(run) == [1, 2] or pytest.fail("log"),
    ),
    F(
        "loss diverges (lr=1e30)",
        "train.lr=1e30",
        "run_id=div",
        expect=("step 2", "loss terms: task=nan", "step-000001"),
        rc=3,
        start=None,
        check=lambda run, b, a: _finite_checkpoints(run.parent / "div") == ["step-000001"] or pytest.fail("ckpt"),
    ),
]

CATALOGUE = INPUTS + FAULTS


def test_the_catalogue_is_large():
    assert len(CATALOGUE) >= 40 and len(INPUTS) >= 40


def _args(case: Case, env: dict[str, str], out: Path) -> list[str]:
    # the case's arguments last: a later override wins, and flags (--config F, --overwrite) go anywhere
    base = [a.format(**env) for a in BASE] if case.base else []
    return [*base, f"out_dir={out}", *(a.format(**env) for a in case.args)]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input(case: Case, env, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-model").symlink_to(env["tiny"])  # a local model a typo can resemble
    out = tmp_path / "runs"
    run = out / "r"
    if case.start:
        shutil.copytree(Path(env["root"]) / case.start / "r", run)
    undo = case.fault(run, env, monkeypatch) if case.fault else None
    before = snapshot(run) if run.exists() else {}
    try:
        rc, stdout, stderr = cli(capsys, "train", *_args(case, env, out))
    finally:
        if undo:
            undo()
        monkeypatch.undo()
    message = stdout if case.rc == 0 else stderr
    assert rc == case.rc, (rc, stdout[-500:], stderr[-1500:])
    for s in case.expect:
        assert s in message, (s, message[-1500:])
    assert "Traceback" not in stderr
    for s in case.logs:
        assert s in caplog.text, (s, caplog.text[-1500:])
    if case.is_input and case.rc != 0:
        assert not out.exists(), f"a refused input left {sorted(map(str, out.rglob('*')))}"
    assert not leftovers(out), leftovers(out)
    if case.untouched:
        assert snapshot(run) == before
    if case.check:
        case.check(run, before, snapshot(run) if run.exists() else {})


@pytest.mark.parametrize("case", INPUTS, ids=[c.id for c in INPUTS])
def test_validate_and_train_agree(case: Case, env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-model").symlink_to(env["tiny"])
    out = tmp_path / "runs"
    args = _args(case, env, out)
    rc_v, out_v, err_v = cli(capsys, "validate", *args)
    rc_t, out_t, err_t = cli(capsys, "train", *args)
    assert (rc_v == 0) == (rc_t == 0), (err_v, err_t)
    if rc_v:
        assert rc_v == rc_t
        assert err_v.split("error:", 1)[1] == err_t.split("error:", 1)[1]
    else:
        assert "config OK" in out_v


def test_the_crafted_pickle_is_live(tmp_path):
    """The payload the catalogue feeds safeft does run code when unpickled the unsafe way: so the
    'crafted trainer.pt' case can fail."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()
