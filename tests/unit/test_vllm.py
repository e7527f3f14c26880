"""The vLLM backend's engine cache on a fake ``vllm`` (the real one needs a CUDA GPU and is not installed
here): one engine per process across suites, LoRA adapters written once and served by LoRARequest, a new
engine only for another base model, dtype or LoRA size."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from safeft import models
from safeft.config import LoraConfig
from safeft.eval import generate as G
from safeft.eval.generate import GenSettings, generate_full


@dataclass
class FakeLLM:
    kwargs: dict
    calls: list = field(default_factory=list)

    def generate(self, inputs, params, lora_request=None):
        self.calls.append((len(inputs), lora_request))
        out = types.SimpleNamespace(token_ids=[5, 6], finish_reason="length")
        return [types.SimpleNamespace(outputs=[out]) for _ in inputs]


@dataclass(frozen=True)
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture()
def engines(monkeypatch) -> list[FakeLLM]:
    """Install a fake vllm (LLM, SamplingParams, lora.request.LoRARequest); return the engines built."""
    built: list[FakeLLM] = []
    vllm = types.ModuleType("vllm")
    vllm.LLM = lambda **kw: built.append(FakeLLM(kw)) or built[-1]
    vllm.SamplingParams = lambda **kw: kw
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (40 << 30, 80 << 30))
    G.release_vllm()
    yield built
    G.release_vllm()


SETTINGS = GenSettings(max_new_tokens=2, backend="vllm", precision="bf16")


def _lora(tiny_dir, r: int = 4):
    model, tok = models.load(str(tiny_dir))
    return models.attach_lora(model, LoraConfig(r=r, alpha=2 * r)), tok


def test_one_engine_serves_every_suite_and_the_adapter_is_written_once(engines, tiny_dir, monkeypatch):
    model, tok = _lora(tiny_dir)
    writes = []
    real = type(model).save_pretrained
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, out, **k: writes.append(out) or real(self, out))
    for _suite in ("harmful", "over_refusal", "utility"):
        got = generate_full(model, tok, ["a", "b"], SETTINGS)
        assert [g.n_tokens for g in got] == [2, 2] and got[0].finish == "length"
    assert len(engines) == 1 and len(writes) == 1
    eng = engines[0]
    assert eng.kwargs["model"] == str(tiny_dir)  # the base, from where it was loaded: never merged
    assert eng.kwargs["enable_lora"] and eng.kwargs["max_lora_rank"] == 8 and eng.kwargs["dtype"] == "bfloat16"
    assert eng.kwargs["gpu_memory_utilization"] == pytest.approx(0.85 * 0.5)
    requests = {c[1] for c in eng.calls}
    assert len(requests) == 1 and (Path(next(iter(requests)).lora_path) / "adapter_config.json").exists()


def test_two_runs_of_one_base_share_the_engine_with_their_own_adapters(engines, tiny_dir):
    a, tok = _lora(tiny_dir)
    b, _ = _lora(tiny_dir)
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # trained differently
    generate_full(a, tok, ["x"], SETTINGS)
    generate_full(b, tok, ["x"], SETTINGS)
    generate_full(a, tok, ["x"], SETTINGS)
    assert len(engines) == 1
    ids = [c[1].lora_int_id for c in engines[0].calls]
    assert ids == [1, 2, 1] and engines[0].calls[0][1].lora_path != engines[0].calls[1][1].lora_path


def test_another_base_dtype_or_lora_size_builds_a_new_engine(engines, tiny_dir, tmp_path):
    from safeft.testing import save_tiny_model

    model, tok = _lora(tiny_dir)
    generate_full(model, tok, ["x"], SETTINGS)
    generate_full(model, tok, ["x"], GenSettings(max_new_tokens=2, backend="vllm", precision="fp32"))
    big, _ = _lora(tiny_dir, r=12)
    generate_full(big, tok, ["x"], SETTINGS)
    other = save_tiny_model(tmp_path / "other", seed=1)
    generate_full(str(other), tok, ["x"], SETTINGS)  # a path: served as it is, no adapter
    kinds = [(e.kwargs["model"], e.kwargs["dtype"], e.kwargs.get("max_lora_rank")) for e in engines]
    assert kinds == [
        (str(tiny_dir), "bfloat16", 8),
        (str(tiny_dir), "float32", 8),
        (str(tiny_dir), "bfloat16", 16),
        (str(other), "bfloat16", None),
    ]
    assert engines[-1].calls == [(1, None)]


def test_a_model_without_adapter_is_written_once_per_weights(engines, tiny_dir):
    model, tok = models.load(str(tiny_dir))  # e.g. after full fine-tuning: its weights exist only here
    generate_full(model, tok, ["x"], SETTINGS)
    generate_full(model, tok, ["y"], SETTINGS)
    assert len(engines) == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    generate_full(model, tok, ["x"], SETTINGS)
    assert len(engines) == 2 and engines[0].kwargs["model"] != engines[1].kwargs["model"]
    assert all((Path(e.kwargs["model"]) / "config.json").exists() for e in engines)


def test_release_frees_the_engine_and_the_written_files(engines, tiny_dir):
    model, tok = _lora(tiny_dir)
    generate_full(model, tok, ["x"], SETTINGS)
    adapter = Path(engines[0].calls[0][1].lora_path)
    G.release_vllm()
    assert G._VLLM.engine is None and not adapter.exists()
    generate_full(model, tok, ["x"], SETTINGS)
    assert len(engines) == 2
