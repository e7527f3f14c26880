"""Data parallelism on CPU: two processes (gloo) launched by ``accelerate launch`` train like one.

One launch (``dp_driver.py``, ~40 s on a loaded 2-core machine, most of it importing torch in three
processes) runs SFT, SBR and Vaccine for three steps at 2 rows per process, and an SFT run killed after a
checkpoint and resumed. The same scenarios run here in one process with 2 accumulated micro-batches of 2:
the same global batch of 4, and the same rows in each micro-batch (micro-batch m of process r is chunk
m x P + r of the global order). Per-step losses, loss terms and learning rates must agree to 1e-5 relative:
the two differ only in the order the two micro-batches' gradients are summed (DDP averages after the
backward; one process scales each backward by 1/2 and accumulates).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_driver import KILLED_AFTER, SCENARIOS, run

import safeft

pytestmark = pytest.mark.parallel

DRIVER = Path(__file__).with_name("dp_driver.py")
REL = 1e-5


def _free_port() -> int:
    # concurrent test runs on one machine must not meet on accelerate's default port 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    src = str(Path(safeft.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, str(DRIVER.parent), os.environ.get("PYTHONPATH", "")]),
        "SAFEFT_CACHE": str(out / "cache"),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(DRIVER), "--tiny-dir", str(tiny_dir), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def _result(out: Path, rank: int) -> dict:
    rec = json.loads((out / f"result-{rank}.json").read_text())
    for rows in rec["metrics"].values():  # wall time is each process's own
        for r in rows:
            r.pop("time/step_s")
    return rec


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-7)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_one_process_at_the_same_global_batch(launched, tiny_dir, tmp_path, name):
    two = _result(launched, 0)["metrics"][name]
    assert _result(launched, 1)["metrics"][name] == two, "every process must log the same reduced numbers"
    one = run(str(tiny_dir), tmp_path, name, SCENARIOS[name], grad_accum=2).metrics
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        terms = sorted(k for k in b if k.startswith("loss"))
        assert sorted(k for k in a if k.startswith("loss")) == terms
        bad = {k: (a[k], b[k]) for k in terms if not _close(a[k], b[k])}
        assert not bad, f"{name} step {a['step']}: 2 processes vs 1 differ beyond {REL}: {bad}"
        assert a["lr"] == b["lr"], "the LR schedule advances once per optimizer step, whatever the process count"
        assert a["tokens"] == b["tokens"] and a["passes/forward"] == b["passes/forward"]
    summary = json.loads((launched / "runs" / name / name / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4


def test_the_schedule_decays_over_the_run_not_twice_as_fast(launched):
    lrs = [r["lr"] for r in _result(launched, 0)["metrics"]["sft"]]
    assert lrs == pytest.approx([0.01, 0.01 * 2 / 3, 0.01 / 3])


def test_a_killed_two_process_run_resumes_to_the_same_weights(launched):
    from safetensors.torch import load_file

    def final(name: str) -> dict[str, torch.Tensor]:
        ckpts = sorted((launched / "runs" / name / name / "checkpoints").glob("step-*"))
        return load_file(str(ckpts[-1] / "trainable.safetensors"))

    straight, resumed = final("resume-straight"), final("resume-cut")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "resumed weights differ"
    logged = [json.loads(x) for x in (launched / "runs" / "resume-cut" / "resume-cut" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4], f"steps after {KILLED_AFTER - 1} are logged once"
    m = _result(launched, 0)["metrics"]
    assert [r["loss"] for r in m["resume-cut"]] == [r["loss"] for r in m["resume-straight"]][2:]


def test_only_the_main_process_writes_the_run_directory(launched):
    main, other = _result(launched, 0), _result(launched, 1)
    assert (main["rank"], other["rank"], main["processes"]) == (0, 1, 2)
    assert other["writes"] == [], f"process 1 wrote: {other['writes'][:5]}"
    written = {Path(p).name for _, p in main["writes"]}
    assert {"metrics.jsonl", "train_summary.json"} <= written
    # the checkpoint's trainer state and every process's RNG, as safetensors + JSON (nothing pickled)
    assert any(n.startswith("trainer.") for n in written) and any(n.startswith("rng_ranks.") for n in written)
    assert any(n.startswith(".config.yaml") for n in written)  # the atomic writer's temp name
