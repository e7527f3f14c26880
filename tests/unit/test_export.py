"""Models out and in: export a run as a PEFT adapter or a merged model, load it with plain peft /
transformers and with safeft (run dirs and adapter dirs are model specs), the model card, hub upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from safeft import export as E
from safeft import models
from safeft.cli import main
from safeft.runs import load_run_model
from safeft.stats import wilson
from safeft.testing import tiny_run_config
from safeft.train import train

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8], [1, 2, 3, 4, 5, 6, 7]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LoRA run and a tiny full fine-tuning run, trained once for the whole module."""
    from safeft.testing import save_tiny_model

    root = tmp_path_factory.mktemp("export")
    tiny = save_tiny_model(root / "tiny")
    lora = train(tiny_run_config(root, f"model.spec={tiny}", "run_id=lora"), progress=False).run_dir
    full = train(
        tiny_run_config(root, f"model.spec={tiny}", "run_id=full", "model.lora.enabled=false", "train.lr=0.001"),
        progress=False,
    ).run_dir
    return {"tiny": tiny, "lora": lora, "full": full, "root": root}


def test_adapter_export_loads_with_plain_peft_and_gives_the_same_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapter"
    res = E.export(runs["lora"], out, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(res.files)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        runs["tiny"].resolve()
    )
    own, tok = load_run_model(runs["lora"])
    base = AutoModelForCausalLM.from_pretrained(str(runs["tiny"]), dtype=torch.float32)
    base_logits = logits(base)
    plain = PeftModel.from_pretrained(base, str(out))
    want = logits(own)
    assert not torch.allclose(want, base_logits, atol=1e-3)  # the adapter was trained: it matters
    torch.testing.assert_close(logits(plain), want, atol=1e-5, rtol=0)
    plain_tok = AutoTokenizer.from_pretrained(str(out))
    assert plain_tok("What is 12 percent of 250?")["input_ids"] == tok("What is 12 percent of 250?")["input_ids"]
    assert plain_tok.chat_template == tok.chat_template
    # ... and both directories are safeft model specs giving the same model
    for spec in (out, runs["lora"]):
        m, t = models.load(str(spec))
        assert not models.is_lora(m)  # merged: one kind of model for every caller
        torch.testing.assert_close(logits(m), want, atol=1e-5, rtol=0)
        assert t.chat_template == tok.chat_template


@pytest.mark.parametrize("which", ["lora", "full"])
def test_merged_export_loads_with_plain_transformers(runs, tmp_path, which):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    res = E.export(runs[which], out, "merged")
    assert "model.safetensors" in res.files and "config.json" in res.files and res.base_model is None
    want = logits(load_run_model(runs[which])[0])
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(models.load(str(runs[which]))[0]), want, atol=1e-5, rtol=0)


def test_full_finetuning_run_has_no_adapter(runs, tmp_path):
    with pytest.raises(E.ExportError, match="full fine-tuning run.*--merged"):
        E.export(runs["full"], tmp_path / "a", "adapter")
    assert not (tmp_path / "a").exists()
    assert main(["export", str(runs["full"]), "--adapter", str(tmp_path / "a")]) == 2


def test_existing_output_is_kept_unless_forced_and_a_failed_write_leaves_it(runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(E.ExportError, match="not empty.*--force"):
        E.export(runs["lora"], out, "adapter")
    assert (out / "mine.txt").read_text() == "keep me"

    def broken(self, *a, **k):
        raise OSError("disk full")

    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        E.export(runs["lora"], out, "adapter", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    monkeypatch.undo()
    E.export(runs["lora"], out, "adapter", force=True)
    assert not (out / "mine.txt").exists() and (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_run_itself_is_never_an_output(runs):
    for out in (runs["lora"], runs["lora"].parent):
        with pytest.raises(E.ExportError, match="is the run directory or holds it"):
            E.export(runs["lora"], out, "merged", force=True)
    assert E.is_run_dir(runs["lora"])


def test_an_empty_output_directory_is_fine(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert E.export(runs["lora"], tmp_path / "empty", "adapter").out == tmp_path / "empty"


def test_wilson_interval_known_values():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and round(hi, 4) == 0.1611
    assert wilson(20, 20)[1] == 1.0


def test_model_card_records_defense_settings_and_safety_numbers_with_intervals(runs, tmp_path):
    from safeft.config import EvalConfig
    from safeft.eval.suites import evaluate

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    card = E.model_card(*_card_args(run))
    assert "claims no safety numbers" in card and "defense `sft`" in card

    model, tok = load_run_model(run)
    ev = EvalConfig(n_harmful=5, max_new_tokens=4, batch_size=6, precision="fp32", suites=["harmful"])
    summary = evaluate(model, tok, ev, run, model_id={"checkpoint_step": 3})
    # a smoke run (--limit) and an evaluation of another checkpoint must not reach the card
    evaluate(model, tok, ev, run, limit=2, model_id={"checkpoint_step": 3})
    evaluate(model, tok, ev, run, suites=["over_refusal"], model_id={"checkpoint_step": 2})
    E.export(run, tmp_path / "adapter", "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    asr, n = summary["harmful"]["asr"], summary["harmful"]["n"]
    assert n == 5
    lo, hi = wilson(round(asr * n), n)
    judge = summary["harmful"]["judge"]
    row = f"| harmful | {judge} | asr | {100 * asr:.1f} % | {100 * lo:.1f} % – {100 * hi:.1f} % | 5 | 4 |"
    assert row in card
    assert "| 2 |" not in card  # the smoke run's n
    assert "Left out, evaluated at another checkpoint than this export's: over_refusal (step 2)." in card
    assert "| over_refusal |" not in card
    assert "library_name: peft" in card and "LoRA r=4, alpha=8" in card and "| 0.01, cosine |" in card
    assert (tmp_path / "adapter" / "safeft_config.yaml").exists()


def test_model_card_lists_the_defense_settings(runs, tmp_path):
    from safeft import config as C

    cfg = C.load(runs["lora"] / "config.yaml", ["defense.name=sbr", "defense.lam=7.5"])
    card = E.model_card(cfg, runs["lora"], "merged", 3, None)
    assert "defense `sbr`" in card and "lam: 7.5" in card and "n_anchors: 8" in card
    assert "library_name: transformers" in card


def _card_args(run: Path):
    from safeft import config as C

    return C.load(run / "config.yaml"), run, "adapter", 3, "base"


class FakeHub:
    """A local stand-in for huggingface_hub.HfApi: 'uploads' copy the folder under ``root``."""

    root: Path
    calls: list

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        FakeHub.calls.append(("upload_folder", repo_id, kw))
        shutil.copytree(folder_path, FakeHub.root / repo_id)


def test_push_to_hub_uploads_the_export_through_hfapi(runs, tmp_path, monkeypatch):
    import huggingface_hub
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    FakeHub.root, FakeHub.calls = tmp_path / "hub", []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    out = tmp_path / "adapter"
    assert main(["export", str(runs["lora"]), "--adapter", str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "upload_folder"]
    assert FakeHub.calls[0][2]["private"] is True and FakeHub.calls[0][2]["exist_ok"] is True
    uploaded = FakeHub.root / "me/tiny"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in out.iterdir())
    base = AutoModelForCausalLM.from_pretrained(str(runs["tiny"]), dtype=torch.float32)
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(base, str(uploaded))),
        logits(load_run_model(runs["lora"])[0]),
        atol=1e-5,
        rtol=0,
    )


def test_a_failed_push_names_the_repo_and_keeps_the_export(runs, tmp_path, monkeypatch):
    import huggingface_hub

    class Offline(FakeHub):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    out = tmp_path / "m"
    E.export(runs["lora"], out, "merged")
    with pytest.raises(E.ExportError, match="'me/tiny' failed.*no network.*intact"):
        E.push_to_hub(out, "me/tiny")
    assert (out / "model.safetensors").exists()


def test_exported_adapter_is_a_model_spec_for_eval_and_for_further_training(runs, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(runs["lora"]), "--adapter", str(out)]) == 0
    args = ["eval", str(out), "--suite", "harmful", "--limit", "2", "eval.max_new_tokens=4"]
    assert main([*args, "eval.precision=fp32", f"out_dir={tmp_path / 'evals'}"]) == 0
    eval_dir = tmp_path / "evals" / "eval-adapter" / "eval"
    (eid,) = json.loads((eval_dir / "index.json").read_text())["evaluations"]  # a --limit run: not merged
    summary = json.loads((eval_dir / eid / "summary.json").read_text())
    assert summary["harmful"]["n"] == 2
    # Fine-tuning an adapter spec: the loaded adapter is merged, a fresh one trains on top, and the
    # reference of that run is the loaded model.
    res = train(tiny_run_config(tmp_path, f"model.spec={out}", "run_id=again", "train.steps=1"), progress=False)
    with models.reference(res.model) as ref:
        torch.testing.assert_close(logits(ref), logits(load_run_model(runs["lora"])[0]), atol=1e-5, rtol=0)
    chained, _ = models.load(str(res.run_dir))  # run -> adapter -> base, resolved recursively
    assert not torch.allclose(logits(chained), logits(load_run_model(runs["lora"])[0]), atol=1e-4)


def test_bad_specs_fail_clearly(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(models.ModelError, match="no base_model_name_or_path"):
        models.load(str(d))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run_id: x\n")
    with pytest.raises(models.ModelError, match="run directory without a complete checkpoint"):
        models.load(str(run))
    with pytest.raises(E.ExportError, match="not a safeft run directory"):
        E.export(tmp_path, tmp_path / "o", "adapter")


def test_step_and_dtype_options(runs, tmp_path):
    from safetensors import safe_open

    with pytest.raises(E.ExportError, match=r"no complete checkpoint at step 1 \(have: 3\)"):
        E.export(runs["lora"], tmp_path / "a", "merged", step=1)
    with pytest.raises(E.ExportError, match="dtype applies to --merged"):
        E.export(runs["lora"], tmp_path / "a", "adapter", dtype="bfloat16")
    res = E.export(runs["lora"], tmp_path / "bf16", "merged", step=3, dtype="bfloat16")
    with safe_open(str(res.out / "model.safetensors"), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}


def test_the_runs_chat_template_travels_with_the_export(runs, tmp_path):
    from transformers import AutoTokenizer

    from safeft.data.chat import load_chat_template
    from safeft.testing import CHATML

    jinja = tmp_path / "plain.jinja"
    jinja.write_text(CHATML.replace("You are a tiny test model.", "You are an exported model."))
    cfg = tiny_run_config(
        tmp_path, f"model.spec={runs['tiny']}", "run_id=tmpl", "train.steps=1", f"data.chat_template={jinja}"
    )
    run = train(cfg, progress=False).run_dir
    want = load_chat_template(str(jinja)).jinja
    E.export(run, tmp_path / "out", "merged")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == want  # not the base's own
    assert models.load(str(run))[1].chat_template == want


def test_safety_rows_take_stored_intervals_and_recompute_only_true_shares():
    summary = {
        "harmful": {"n": 4, "judge": "j", "judges": {"j": {"n": 4, "asr": 0.25, "asr_ci": [0.1, 0.2]}}},
        "old": {"n": 4, "judge": "j", "judges": {"j": {"n": 4, "asr": 0.25, "refusal_rate": 0.3}}},
        "utility:finance": {"n": 10, "accuracy": 0.5, "answer_nll": 1.25},
    }
    rows = {(r["suite"], r["metric"]): r for r in E.safety_rows(summary)}
    assert rows["harmful", "asr"]["ci95"] == (0.1, 0.2)  # the summary's own interval
    assert rows["old", "asr"]["ci95"] == wilson(1, 4)  # recomputed from k = 0.25 x 4
    assert "ci95" not in rows["old", "refusal_rate"]  # 0.3 is not k/4: no made-up interval
    assert rows["utility:finance", "accuracy"]["ci95"] == wilson(5, 10)
    assert (
        "ci95" not in rows["utility:finance", "answer_nll"] and rows["utility:finance", "answer_nll"]["value"] == 1.25
    )
