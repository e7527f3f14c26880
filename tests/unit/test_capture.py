"""Layer capture: the right tensors, by index or regex, and hooks that are gone after the block, always."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeft import models
from safeft.hooks import capture


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_block_outputs_by_index_equal_to_hidden_states(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("What is 12 percent of 250?")["input_ids"]])
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers installs output recorders lazily
    before = _hooks(model)
    with torch.no_grad(), capture(model, [0, 1], detach=True) as h:
        out = model(input_ids=ids, output_hidden_states=True)
    # hidden_states[l + 1] is block l's output, except the last, which HF returns after the final norm
    assert torch.allclose(h[0], out.hidden_states[1])
    assert torch.allclose(model.model.norm(h[1]), out.hidden_states[2], atol=1e-6)
    assert _hooks(model) == before


def test_captures_by_name_regex(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.no_grad(), capture(model, r"model\.layers\.\d+\.mlp") as h:
        model(input_ids=ids)
    assert sorted(h) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert h["model.layers.0.mlp"].shape == (1, ids.shape[1], 64)
    with pytest.raises(models.ModelError, match="matches the layer regex"), capture(model, r"nothing\.like\.this"):
        pass


def test_hooks_are_removed_after_the_block_even_on_an_exception(tiny):
    model, _ = tiny
    before = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"), capture(model, None):
        assert _hooks(model) == before + 2
        raise RuntimeError("boom")
    assert _hooks(model) == before
    with pytest.raises(ValueError, match="out of range"), capture(model, [0, 5]):
        pass
    assert _hooks(model) == before


def test_raises_on_an_architecture_without_a_decoder_stack():
    odd = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(models.ModelError, match="decoder layer stack"), capture(odd, [0]):
        pass
    with capture(odd, r"0") as h:  # a regex still works on any module tree
        odd(torch.zeros(1, 4))
    assert h["0"].shape == (1, 4)
