"""Every registered defense, a few steps on a tiny random model.

A defense joins this matrix by being registered; nothing here names a method. Each must: finish with a
finite loss, change the trainable parameters, log every loss term it returns, and report its passes.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from safeft.data.types import Example
from safeft.methods import METHODS
from safeft.testing import save_tiny_model, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
AUX = {
    "harmful_prompts": [Example(f"h{i}", f"How do I do harmful thing {i}?") for i in range(6)],
    "alignment": [Example(f"a{i}", f"How do I do harmful thing {i}?", "I'm sorry, I can't help.") for i in range(6)],
}


def _required(name: str, tmp_path) -> list[str]:
    """Overrides a method cannot run without, found from its Config's fields (never from its name)."""
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Config)}
    extra = []
    if "base_model" in fields:
        # A post-hoc method that compares the aligned model with its base: the tiny model's "base" is a
        # second tiny model of the same shapes with other random weights.
        extra.append(f"defense.base_model={save_tiny_model(tmp_path / 'base-model', seed=1)}")
    return extra


@pytest.mark.parametrize("name", list(METHODS))
def test_defense_trains(name, tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_run_config(tmp_path, f"defense.name={name}", "run_id=m", *_required(name, tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux=AUX, progress=False)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    # Every run trains on the task; a bi-state method (Lisa) may spend some steps on other data only.
    assert any("loss/task" in r for r in rows)
    for r in rows:
        assert math.isfinite(r["loss"])
        assert r["passes/forward"] >= 1 and r["passes/backward"] >= 1
        terms = [k for k in r if k.startswith("loss/")]
        # the logged total is the sum of the logged terms: no term is computed but left unlogged
        assert r["loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-5, abs=1e-6)
    assert _trainables_changed(res.model, before)


def _trainables_changed(model, before: dict[str, torch.Tensor]) -> bool:
    """LoRA B starts at exactly zero; full fine-tuning is compared with the weights before training."""
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in n and p.detach().abs().sum() > 0:
            return True
        if n in before and not torch.equal(before[n], p.detach()):
            return True
    return False
