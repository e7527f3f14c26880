"""benchmarks/gpu_check.py runs end to end on the CPU with --tiny, so the GPU run has been exercised."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_check_runs_in_tiny_mode_and_reports_every_section(tmp_path):
    path = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    assert res["sft"]["tiny"]["s_per_step"] > 0 and res["sft"]["tiny"]["tokens_per_s"] > 0
    assert res["ratios_to_sft"]["sbr"] > 0 and res["ratios_to_sft"]["saft+repanchor"] > 0
    gen = res["generate"]["tiny"]
    assert gen["batch_1"]["new_tokens"] == 4 * 4 and gen["batch_4"]["new_tokens"] == 4 * 4  # random weights: no stop
    assert {"tiny: fp32 weights", "tiny: bf16 weights", "tiny: bf16 + gradient checkpointing"} <= set(res["levers"])
    assert "needs a CUDA GPU" in res["levers"]["tiny: 4-bit QLoRA"]
    assert all(r["ok"] for r in res["rounding"].values()), res["rounding"]
    assert res["rounding"]["bf16_vs_fp32"]["rel_change"] > 0  # bf16 weights really were bf16
