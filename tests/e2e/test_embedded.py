"""End to end on the embedded SmolLM2-135M: align, fine-tune, evaluate, a few steps each.

Slow (GGUF conversion ~25 s, then a few CPU steps) but run by CI: it is the only test that touches the
real model, the real chat template and the real data files together.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from safeft import config as C
from safeft import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("safeft-cache")


@pytest.fixture(autouse=True)
def _all_cores():
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def test_embedded_align_train_eval(tmp_path, shared_cache, monkeypatch):
    from safeft.align import align
    from safeft.eval.suites import evaluate
    from safeft.runs import load_run_model
    from safeft.train import train

    monkeypatch.setenv("SAFEFT_CACHE", str(shared_cache))
    cfg = C.load(
        overrides=[
            "data.task=domain:finance",
            "data.n_train=16",
            "align.n_harmful=8",
            "align.n_benign=4",
            "align.contrastive=2",  # a small slice of the default recipe, so the test stays quick
            "align.benign_sources=[legacy]",
            "align.benign_max_new_tokens=8",
            "align.train.steps=2",
            "align.train.batch_size=4",
            "train.steps=2",
            "train.batch_size=4",
            "train.save_every=1",
            "eval.n_harmful=4",
            "eval.n_over_refusal=4",
            "eval.n_utility=4",
            "eval.max_new_tokens=12",
            f"out_dir={tmp_path}",
            "run_id=ft",
        ]
    )
    # the alias converts once into the cache and is reused
    first = models.resolve("smollm2-135m")
    assert models.resolve("smollm2-135m") == first
    assert (shared_cache / "models").exists()

    aligned = align(cfg, out=tmp_path / "aligned", progress=False)
    assert (aligned / "config.json").exists() and (aligned / "model.safetensors").exists()
    rows = [json.loads(x) for x in (tmp_path / "aligned" / "alignment_data.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "alignment:refusal" for r in rows) == 8
    assert sum(r["source"] == "alignment:self-answer" for r in rows) >= 1

    ft = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, spec=str(aligned)))
    res = train(ft, progress=False)
    assert res.steps == 2 and res.metrics[-1]["passes/forward"] == 1
    summary = evaluate(res.model, res.tokenizer, cfg.eval, res.run_dir, ["finance"])
    assert 0.0 <= summary["harmful"]["asr"] <= 1.0 and summary["harmful"]["n"] == 4
    assert summary["utility:finance"]["n"] == 4

    # the run directory alone rebuilds the same model
    again, _ = load_run_model(res.run_dir)
    a = {n: p for n, p in res.model.named_parameters() if "lora" in n}
    b = dict(again.named_parameters())
    assert all((a[n] == b[n]).all() for n in a)
