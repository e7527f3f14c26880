"""The one placement rule, every verb following it, and the memory levers on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from safeft import config as C
from safeft import devices, models
from safeft.data.types import Example
from safeft.testing import tiny_run_config

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]

# -- the rule -------------------------------------------------------------------------------------------


def test_the_rule_takes_the_environment_then_the_local_gpu_then_the_cpu(monkeypatch):
    monkeypatch.delenv("SAFEFT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a launch owns the second GPU
    assert devices.default_device() == torch.device("cuda", 1)
    monkeypatch.setenv("SAFEFT_DEVICE", "cpu")
    assert devices.default_device() == torch.device("cpu")
    monkeypatch.setenv("SAFEFT_DEVICE", "tpu-ish")
    with pytest.raises(C.ConfigError, match="SAFEFT_DEVICE='tpu-ish'"):
        devices.default_device()


def test_place_moves_the_model_and_the_frozen_copy_outside_its_module_tree(tiny):
    model, _ = tiny
    models.prepare_reference(model)  # full fine-tuning's reference: not a submodule, so .to misses it
    placed = devices.place(model, "meta")
    assert {p.device.type for p in placed.parameters()} == {"meta"}
    assert {p.device.type for p in placed._safeft_reference.parameters()} == {"meta"}


# -- every verb follows it ------------------------------------------------------------------------------

RULE = torch.device("cpu", 0)  # a device the CPU runs on but that no code names by accident


@pytest.fixture()
def placed(monkeypatch) -> list[torch.device]:
    """The devices models were placed on; the rule is patched to answer ``RULE``."""
    seen: list[torch.device] = []
    real = devices.place

    def spy(model, device=None):
        seen.append(devices.resolve(device))
        return real(model, "cpu")

    monkeypatch.setattr(devices, "default_device", lambda: RULE)
    monkeypatch.setattr(devices, "place", spy)
    return seen


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from safeft.testing import save_tiny_model
    from safeft.train import train

    root = tmp_path_factory.mktemp("placed")
    spec = save_tiny_model(root / "model")
    cfg = tiny_run_config(root / "runs", f"model.spec={spec}", "train.steps=1", "data.n_train=8")
    return train(cfg, progress=False).run_dir


def test_eval_of_a_model_spec_and_of_a_run_puts_the_model_on_the_rule(placed, tiny_dir, tiny_run, tmp_path):
    from safeft.cli import main

    args = ["eval.max_new_tokens=2", "eval.precision=fp32", f"out_dir={tmp_path}", "--suite", "over_refusal"]
    assert main(["eval", str(tiny_dir), *args, "--limit", "1"]) == 0
    assert main(["eval", str(tiny_run), *args, "--limit", "1"]) == 0
    assert placed == [RULE, RULE]


def test_diagnose_loads_the_run_on_the_rule(placed, tiny_run):
    from safeft.diagnose.drift import open_run

    open_run(tiny_run)
    assert placed == [RULE]


def test_align_generates_on_the_rule_and_trains_on_the_accelerator(placed, tiny_dir, tmp_path):
    from safeft.align import align

    over = ["align.n_harmful=2", "align.n_benign=2", "align.benign_max_new_tokens=2", "align.train.steps=1"]
    over += ["align.contrastive=1", "align.benign_sources=[legacy]", "align.lora=null"]  # quick; model.lora below
    cfg = C.load(overrides=[f"model.spec={tiny_dir}", *over, "align.train.precision=fp32", "model.lora.r=2"])
    align(cfg, out=tmp_path / "aligned", progress=False)
    assert placed[0] == RULE  # the base model, for its own answers and then its training
    assert placed[1].type == "cpu"  # the loop puts it on the accelerator's device (the rule's type)


def test_train_asks_accelerate_for_the_rules_device(monkeypatch, tiny_dir, tmp_path):
    import accelerate

    from safeft import context
    from safeft.train import train

    asked = []

    class Spy(accelerate.Accelerator):
        def __init__(self, *a, **kw):
            asked.append(kw["cpu"])
            super().__init__(*a, **{**kw, "cpu": True})

    chosen = []
    monkeypatch.setattr(accelerate, "Accelerator", Spy)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for rule, cpu in ((torch.device("cuda", 1), False), (torch.device("cpu"), True)):
        monkeypatch.setattr(context, "default_device", lambda rule=rule: rule)
        cfg = tiny_run_config(tmp_path / str(cpu), f"model.spec={tiny_dir}", "train.steps=1", "data.n_train=4")
        train(cfg, progress=False)
        assert asked[-1] is cpu
    assert chosen == [torch.device("cuda", 1)]  # SAFEFT_DEVICE=cuda:1: training on that GPU, as eval


def test_a_model_judge_loads_on_the_rule(monkeypatch, tiny_dir):
    from transformers import LlamaForSequenceClassification

    from safeft.eval import judges, model_judges

    LlamaForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=2).save_pretrained(tiny_dir / "cls")
    models.load(str(tiny_dir))[1].save_pretrained(tiny_dir / "cls")
    asked = []
    monkeypatch.setattr(model_judges, "default_device", lambda: asked.append(1) or torch.device("cpu"))
    j = judges.get(f"hf_classifier:model={tiny_dir / 'cls'},harmful_labels=1")
    j(["a prompt"], ["an answer"])
    assert asked == [1] and next(j.load()[0].parameters()).device.type == "cpu"


# -- memory levers ----------------------------------------------------------------------------------------


def _losses(tiny_dir, tmp_path, *extra: str) -> list[float]:
    from safeft.train import train

    model, tok = models.load(str(tiny_dir))
    cfg = tiny_run_config(tmp_path / "_".join(extra or ("fp32",)), "train.steps=2", *extra)
    res = train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, progress=False)
    return [m["loss"] for m in res.metrics], res.model


@pytest.fixture(scope="module")
def fp32_losses(tiny_dir, tmp_path_factory):
    return _losses(tiny_dir, tmp_path_factory.mktemp("fp32"))[0]


@pytest.mark.parametrize(
    "lever, rel",
    [
        ("model.gradient_checkpointing=true", 1e-6),  # recomputation is exact
        ("model.attn_implementation=eager", 1e-5),  # the same maths, another kernel
        ("model.dtype=bf16", 3e-2),  # 8-bit mantissa weights: ~0.4 % per rounding
        ("model.dtype=fp16", 5e-3),  # 11-bit mantissa
    ],
)
def test_each_lever_trains_and_stays_within_its_rounding_of_fp32(tiny_dir, tmp_path, fp32_losses, lever, rel):
    losses, model = _losses(tiny_dir, tmp_path, lever)
    assert losses == pytest.approx(fp32_losses, rel=rel)
    key, value = lever.split("=")
    if key == "model.dtype":
        base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        assert base == {devices.DTYPES[value]}
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # adapters fp32
    if key == "model.gradient_checkpointing":
        assert model.get_base_model().is_gradient_checkpointing
    if key == "model.attn_implementation":
        assert model.config._attn_implementation == "eager"


def test_levers_that_cannot_work_here_say_why_naming_the_key_and_the_extra(monkeypatch):
    def cfg(*o):
        return C.load(overrides=list(o)).model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(C.ConfigError, match="load_in_4bit.*needs a CUDA GPU"):
        devices.load_args(cfg("model.load_in_4bit=true"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(C.ConfigError, match=r"needs bitsandbytes.*pip install 'safeft\[qlora\]'"):
        devices.load_args(cfg("model.load_in_4bit=true"))
    with pytest.raises(C.ConfigError, match="flash_attention_2 needs the flash-attn package"):
        devices.load_args(cfg("model.attn_implementation=flash_attention_2"))
    with pytest.raises(C.ConfigError, match="load_in_4bit=true trains LoRA"):
        devices.check_levers(cfg("model.load_in_4bit=true", "model.lora.enabled=false"))
    with pytest.raises(C.ConfigError, match="model.dtype=fp16 needs LoRA"):
        devices.check_levers(cfg("model.dtype=fp16", "model.lora.enabled=false"))
    with pytest.raises(C.ConfigError, match="model.dtype must be one of fp32, bf16, fp16"):
        devices.check_levers(cfg("model.dtype=int8"))
    with pytest.raises(C.ConfigError, match="attn_implementation must be one of"):
        devices.check_levers(cfg("model.attn_implementation=paged"))


def test_4bit_without_a_gpu_stops_the_run_before_anything_is_written(tiny_dir, tmp_path):
    from safeft.train import train

    cfg = tiny_run_config(tmp_path / "runs", f"model.spec={tiny_dir}", "model.load_in_4bit=true")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for machines without one")
    with pytest.raises(C.ConfigError, match="load_in_4bit=true .* needs a CUDA GPU"):
        train(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_defense_that_hooks_outside_the_backward_refuses_gradient_checkpointing(tiny_dir, tmp_path):
    with pytest.raises(C.ConfigError, match="'vaccine' cannot run with model.gradient_checkpointing=true: adds"):
        _losses(tiny_dir, tmp_path, "defense.name=vaccine", "model.gradient_checkpointing=true")


def test_the_run_records_the_levers_it_used(tiny_dir, tmp_path):
    _, model = _losses(tiny_dir, tmp_path, "model.dtype=bf16")
    saved = json.loads(json.dumps(C.to_dict(C.load(tmp_path / "model.dtype=bf16" / "r" / "config.yaml"))))
    assert saved["model"]["dtype"] == "bf16"
