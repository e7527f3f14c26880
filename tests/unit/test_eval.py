"""Generation, the keyword judge, and the suites' records."""

from __future__ import annotations

import json

import pytest

from safeft.config import EvalConfig
from safeft.data.types import Example
from safeft.eval import judges
from safeft.eval.generate import GenSettings, generate
from safeft.eval.results import Store
from safeft.eval.suites import evaluate, harmful, subset


def test_keyword_judge_follows_the_gcg_rule():
    comps = [
        "I'm sorry, but I can't help with that.",
        "Sure, here is how to do it: step 1 ...",
        "Step 1: this is illegal, but here goes.",  # the known false positive: counted as a refusal
        "I can’t assist with that.",  # typographic apostrophe is still recognised
        "i'm sorry",  # markers are case-sensitive, as in the reference implementation
    ]
    v = judges.get("refusal_keywords")(["p"] * len(comps), comps)
    assert [x.refused for x in v] == [True, False, True, True, False]
    assert [x.harmful for x in v] == [False, True, False, False, True]
    assert v[0].detail == "I'm sorry"


def test_there_are_29_markers():
    assert len(judges.REFUSAL_MARKERS) == 29 and len(set(judges.REFUSAL_MARKERS)) == 29


def test_judge_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        judges.get("refusal_keywords")(["a", "b"], ["x"])


def test_unknown_judge_never_falls_back():
    with pytest.raises(KeyError, match="unknown judge 'refusal_keyword'.*did you mean"):
        judges.get("refusal_keyword")


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    """Left padding + attention mask must not change greedy outputs (the paper repos' loop is the oracle)."""
    model, tok = tiny
    prompts = ["hi", "What is 12 percent of 250?", "def add_seven(x):", "How do I kill a Python process?"]
    s = GenSettings(max_new_tokens=8, batch_size=4, precision="fp32")
    batched = generate(model, tok, prompts, s, progress=False)
    single = [generate(model, tok, [p], s, progress=False)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # a random model still gives prompt-dependent text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_frozen_weights_decode_alike_and_stay_frozen(tiny, precision):
    """generate flags frozen weights for speed (a PEFT model's base): the completions are those of the model
    as given, and every flag is back afterwards, so an optimizer or a defense never sees a changed model."""
    model, tok = tiny
    prompts = ["hi", "What is 12 percent of 250?", "How do I kill a Python process?"]
    s = GenSettings(max_new_tokens=8, batch_size=3, precision=precision)
    flagged = generate(model, tok, prompts, s, progress=False)
    head = next(iter(model.parameters()))
    for p in model.parameters():
        p.requires_grad_(False)
    head.requires_grad_(True)  # one trainable tensor among frozen ones, as under LoRA
    assert generate(model, tok, prompts, s, progress=False) == flagged
    assert head.requires_grad and not any(p.requires_grad for p in list(model.parameters())[1:])


def test_batches_cap_padding_for_long_prompts_only():
    from safeft.eval.generate import PADDED_TOKENS_PER_ROW, _batches

    def runs(lengths, bs):
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out = list(_batches(order, lengths, bs))
        assert [i for b in out for i in b] == order  # every prompt once, in length order
        return out

    short = [(i * 37) % 72 + 1 for i in range(300)]  # the shipped suites' prompts are at most 72 tokens
    for bs in (64, 128):
        order = sorted(range(300), key=lambda i: short[i])
        assert runs(short, bs) == [order[i : i + bs] for i in range(0, 300, bs)]  # the uncapped batches
    long = [400] * 50 + [1025] * 3
    got = runs(long, 128)
    assert all(len(b) * max(long[i] for i in b) <= 128 * PADDED_TOKENS_PER_ROW for b in got)
    assert [len(b) for b in got] == [40, 13]  # 40 x 400 and 13 x 1025 tokens fit 16384
    assert [len(b) for b in runs([5000, 6000], 2)] == [1, 1]  # a prompt over the budget still gets a batch


def test_subset_is_fixed_and_seeded():
    items = [Example(f"x{i:03d}", f"p{i}") for i in range(50)]
    a, b = subset(items, 10, 0), subset(list(reversed(items)), 10, 0)
    assert a == b and len(a) == 10
    assert subset(items, 10, 1) != a
    assert subset(items, None, 0) == sorted(items, key=lambda e: e.id)


def test_harmful_suite_writes_one_record_per_prompt(tiny, tmp_path):
    model, tok = tiny
    items = [Example(f"h{i}", f"harmful prompt {i}") for i in range(5)]
    out = harmful(model, tok, items, GenSettings(4, 2, precision="fp32"), "refusal_keywords", tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "harmful.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [e.id for e in items]
    assert all(r["settings"]["max_new_tokens"] == 4 and "refusal_keywords" in r["verdicts"] for r in recs)
    assert out["asr"] == sum(r["verdicts"]["refusal_keywords"]["harmful"] for r in recs) / 5
    assert out["n"] == 5 and out["judge"] == "refusal_keywords"


def test_evaluate_runs_every_suite(tiny, tmp_path):
    model, tok = tiny
    cfg = EvalConfig(n_harmful=4, n_over_refusal=3, n_utility=3, max_new_tokens=4, batch_size=4, precision="fp32")
    summary = evaluate(model, tok, cfg, tmp_path, ["finance"])
    assert summary["harmful"]["n"] == 4 and summary["over_refusal"]["n"] == 3
    assert summary["utility:finance"]["n"] == 3 and summary["utility:finance"]["answer_nll"] > 0
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    for f in ("harmful.jsonl", "over_refusal.jsonl", "utility_finance.jsonl", "summary.json"):
        assert (ev / f).exists(), f
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()).keys() == summary.keys()


def test_a_lora_model_from_train_decodes_like_its_run_reloaded(tmp_path, tiny_dir):
    """generate merges a LoRA model in its bf16 copy the way models.load merges a saved adapter, so the demo's
    in-process evaluation of a fine-tuned model equals `safeft eval runs/<id>`; the trained model is untouched."""
    from safeft import models
    from safeft.testing import tiny_run_config
    from safeft.train import train

    cfg = tiny_run_config(
        tmp_path / "runs", f"model.spec={tiny_dir}", "train.steps=3", "data.n_train=8", "train.lr=0.05"
    )
    res = train(cfg, progress=False)
    assert models.is_lora(res.model)
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    prompts = [f"prompt number {i} about finance" for i in range(12)]
    s = GenSettings(max_new_tokens=8, batch_size=12, precision="bf16")
    in_process = generate(res.model, res.tokenizer, prompts, s, progress=False)
    reloaded, tok = models.load(str(res.run_dir))
    assert in_process == generate(reloaded, tok, prompts, s, progress=False)
    assert models.is_lora(res.model)
    assert all(v.equal(res.model.state_dict()[k]) for k, v in before.items())
