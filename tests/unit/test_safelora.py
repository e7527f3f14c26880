"""Safe LoRA: modules above the threshold are left exactly as trained, the rest get B ← C·B with C and cos
computed naively from the two checkpoints; the exact projector is a true projector; the final checkpoint
holds the projected weights (and a resumed finished run does not project twice); a mismatched or identical
base model raises; projecting nothing is plain SFT exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safeft import config as C
from safeft import models
from safeft.context import RunContext
from safeft.data.types import Example
from safeft.methods.safelora import SafeLoRA, SafeLoRAConfig, projector
from safeft.runs import checkpoints, load_trainable
from safeft.testing import build_tokenizer, make_ctx, save_tiny_model, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The "unaligned base": the tiny model's shapes with other random weights."""
    return save_tiny_model(tmp_path_factory.mktemp("base"), seed=1)


def _cfg(tmp_path, base, *extra: str) -> C.RunConfig:
    return tiny_run_config(
        tmp_path / "runs", "train.steps=4", "defense.name=safelora", f"defense.base_model={base}", *extra
    )


def _trained_ctx(tiny, tmp_path, base, *extra: str) -> RunContext:
    """A context whose LoRA looks trained (random A and B), as after_train finds it."""
    ctx = make_ctx(_cfg(tmp_path, base, *extra), tiny, tmp_path)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return ctx


def _naive(aligned_dir, base_dir, lora_state: dict[str, torch.Tensor]):
    """Per module: (C, cos) from the two checkpoints read independently; C = V Vᵀ/‖V‖_F (reference)."""
    al = AutoModelForCausalLM.from_pretrained(str(aligned_dir)).state_dict()
    ba = AutoModelForCausalLM.from_pretrained(str(base_dir)).state_dict()
    out = {}
    for n, b in lora_state.items():
        if ".lora_B." not in n:
            continue
        module = n.split(".lora_B.")[0]
        a = lora_state[n.replace("lora_B", "lora_A")]
        key = module.removeprefix("base_model.model.") + ".weight"
        v = al[key] - ba[key]
        c = v @ v.T / v.norm()
        dw = b @ a
        cos = torch.nn.functional.cosine_similarity((c @ dw).flatten(), dw.flatten(), dim=0)
        out[n] = (c, float(cos))
    return out


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_threshold_projects_exactly_the_modules_at_or_below_it(tiny, tiny_dir, base_dir, tmp_path):
    ctx = _trained_ctx(tiny, tmp_path, base_dir)
    before = _lora(ctx.model)
    naive = _naive(tiny_dir, base_dir, before)
    coses = sorted(cos for _, cos in naive.values())
    tau = (coses[len(coses) // 2 - 1] + coses[len(coses) // 2]) / 2  # half the modules on each side
    ctx.cfg.defense.threshold = tau
    d = SafeLoRA(ctx.cfg.defense)
    d.setup(ctx)
    d.after_train(ctx)
    after = _lora(ctx.model)
    projected = kept = 0
    for n, (c, cos) in naive.items():
        if cos > tau:
            assert torch.equal(after[n], before[n]), n  # untouched, bit for bit
            kept += 1
        else:
            torch.testing.assert_close(after[n], c @ before[n], rtol=1e-5, atol=1e-7)
            projected += 1
        a = n.replace("lora_B", "lora_A")
        assert torch.equal(after[a], before[a])  # A is never changed
    assert projected > 0 and kept > 0
    report = json.loads((tmp_path / "safelora.json").read_text())
    assert report["projected"] == projected and report["modules"] == projected + kept
    by_name = {r["module"]: r for r in report["per_module"]}
    for n, (_, cos) in naive.items():
        assert by_name[n.split(".lora_B.")[0]]["cos"] == pytest.approx(cos, abs=1e-5)


def test_number_mode_projects_the_k_lowest_cosines(tiny, tiny_dir, base_dir, tmp_path):
    ctx = _trained_ctx(tiny, tmp_path, base_dir, "defense.select=number", "defense.num_proj_layers=3")
    before = _lora(ctx.model)
    naive = _naive(tiny_dir, base_dir, before)
    lowest = sorted(naive, key=lambda n: naive[n][1])[:3]
    d = SafeLoRA(ctx.cfg.defense)
    d.setup(ctx)
    d.after_train(ctx)
    after = _lora(ctx.model)
    changed = {n for n in naive if not torch.equal(after[n], before[n])}
    assert changed == set(lowest)


def test_exact_projector_is_the_orthogonal_projector_onto_the_column_space():
    torch.manual_seed(0)
    v = torch.randn(12, 3) @ torch.randn(3, 20)  # rank 3, as an aligned model made by merging a rank-3 LoRA
    c = projector(v, exact=True)
    torch.testing.assert_close(c @ c, c, atol=1e-5, rtol=1e-5)  # idempotent
    torch.testing.assert_close(c, c.T)
    assert torch.linalg.matrix_rank(c) == 3
    torch.testing.assert_close(c @ v, v, atol=1e-4, rtol=1e-4)  # identity on col(V)
    approx = projector(v, exact=False)
    assert not torch.allclose(approx @ approx, approx, atol=1e-3)  # the reference's C is not a projector


def test_final_checkpoint_holds_the_projected_weights_and_resume_does_not_reproject(tiny_dir, base_dir, tmp_path):
    m, tok = models.load(str(tiny_dir))
    cfg = _cfg(tmp_path, base_dir, "defense.threshold=1.0")  # every module projected
    res = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, progress=False)
    projected = _lora(res.model)
    reloaded, _ = models.load(str(tiny_dir))
    reloaded = models.attach_lora(reloaded, cfg.model.lora)
    load_trainable(reloaded, checkpoints(res.run_dir)[-1])
    saved = _lora(reloaded)
    assert all(torch.equal(saved[k], projected[k]) for k in projected)
    assert json.loads((res.run_dir / "safelora.json").read_text())["projected"] > 0
    # a finished run, started again, resumes at the end and must not project a second time
    m, tok = models.load(str(tiny_dir))
    again = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, progress=False)
    assert all(torch.equal(_lora(again.model)[k], projected[k]) for k in projected)


def test_projecting_nothing_reproduces_plain_sft_exactly(tiny_dir, base_dir, tmp_path):
    from safetensors.torch import load_file

    cfgs = {
        "sft": tiny_run_config(tmp_path / "sft" / "runs", "train.steps=4", "defense.name=sft"),
        "safelora": _cfg(tmp_path / "safelora", base_dir, "defense.select=number", "defense.num_proj_layers=0"),
    }
    runs = {}
    for name, cfg in cfgs.items():
        m, tok = models.load(str(tiny_dir))
        runs[name] = train(cfg, examples=EXAMPLES, model=m, tokenizer=tok, progress=False)
    a, b = (load_file(str(checkpoints(runs[n].run_dir)[-1] / "trainable.safetensors")) for n in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in runs["safelora"].metrics] == [r["loss"] for r in runs["sft"].metrics]


def test_a_base_model_with_other_shapes_is_refused_before_training(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    ctx = _trained_ctx(tiny, tmp_path, tmp_path / "other")
    with pytest.raises(models.ModelError, match="does not match"):
        SafeLoRA(ctx.cfg.defense).setup(ctx)


def test_an_identical_base_model_is_refused(tiny, tiny_dir, tmp_path):
    ctx = _trained_ctx(tiny, tmp_path, tiny_dir)
    d = SafeLoRA(ctx.cfg.defense)
    d.setup(ctx)
    with pytest.raises(models.ModelError, match="identical"):
        d.after_train(ctx)


def test_full_fine_tuning_is_refused(tiny, base_dir, tmp_path):
    cfg = _cfg(tmp_path, base_dir, "model.lora.enabled=false")
    ctx = make_ctx(cfg, tiny, tmp_path)
    with pytest.raises(C.ConfigError, match="LoRA"):
        SafeLoRA(cfg.defense).setup(ctx)


def test_bad_config_is_rejected():
    # the Config checks its values as it is built (from YAML or here), before any defense exists
    for bad in (
        {},  # no base model
        {"base_model": "x", "select": "all"},
        {"base_model": "x", "threshold": 2.0},
        {"base_model": "x", "num_proj_layers": -1},
    ):
        with pytest.raises(C.ConfigError):
            SafeLoRA(SafeLoRAConfig(**bad))
