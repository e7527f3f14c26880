"""``utility:lm_eval:<task>``: an lm-evaluation-harness task run on the very model object safeft evaluates.

The lm-eval runs need the optional extra (``pip install 'safeft[lm_eval]'``) and skip without it; they use a
task YAML and a JSONL dataset written here, so nothing comes from a hub. The missing-extra error and the
option checks run everywhere.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from safeft.config import ConfigError, EvalConfig
from safeft.eval import records
from safeft.eval.results import Store
from safeft.eval.suites import evaluate, headline, parse_suites
from safeft.eval.suites.harness import HarnessError
from safeft.stats import wilson

CFG = dict(max_new_tokens=4, batch_size=4, precision="fp32")

CHOICE_ROWS = [
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1},
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "A patient weighs", "choices": ["70 kg", "5 mg", "a lot"], "label": 0},
    {"question": "def add_seven(x):", "choices": ["return x + 7", "pass"], "label": 0},
]


def write_task(tmp_path: Path, name: str, rows: list[dict], body: str) -> Path:
    """A task YAML reading a local JSONL file (datasets' own json loader; its cache under tmp_path)."""
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = tmp_path / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf-cache'}\n"
        "test_split: test\n" + body
    )
    return yaml


CHOICE = (
    "output_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\n'
    'doc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{label}}"\n'
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
)


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), the way lm-eval splits the pair: the whole string encoded once."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(HarnessError, match=r"not installed; install it with: pip install 'safeft\[lm_eval\]'"):
        parse_suites(["utility:lm_eval:gsm8k"])


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("utility:lm_eval", "needs an lm-eval task"),
        ("utility:lm_eval:gsm8k,num_fewshot=five", "num_fewshot must be a whole number"),
        ("utility:lm_eval:gsm8k,chat=yes", "chat must be true or false"),
        ("utility:lm_eval:gsm8k,fewshot=5", "unknown option 'fewshot'; did you mean 'num_fewshot'"),
        ("utility:lm_eval:gsm8k,include=/no/such/dir", "include=/no/such/dir: no such folder"),
    ],
)
def test_bad_options_fail_when_the_suites_are_built(name, match):
    with pytest.raises(ConfigError, match=match):
        parse_suites([name])


def test_a_local_task_runs_on_the_same_model_object_lora_included(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from safeft import models
    from safeft.config import LoraConfig

    model, tok = tiny
    model = models.attach_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # move the adapter off zero, so numbers of the base model alone would differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model.train()
    yaml = write_task(tmp_path, "tiny_choice", CHOICE_ROWS, CHOICE)
    random.seed(123)
    torch.manual_seed(123)
    name = f"utility:lm_eval:{yaml}"
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=[name])
    assert model.training  # lm-eval puts the model in eval mode; we put it back
    assert random.random() == random.Random(123).random()  # lm-eval reseeds the global generators; restored
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))

    model.eval()
    want = []
    for row in CHOICE_ROWS:
        lls = [loglik(model, tok, row["question"], " " + c) for c in row["choices"]]
        want.append((lls, max(range(len(lls)), key=lls.__getitem__)))
    k = sum(best == row["label"] for (_, best), row in zip(want, CHOICE_ROWS, strict=True))

    entry = summary[name]
    assert (entry["task"], entry["metric"], entry["n"], entry["num_fewshot"]) == ("tiny_choice", "acc,none", 4, 0)
    assert entry["score"] == entry["accuracy"] == k / 4 and entry["accuracy_ci"] == pytest.approx(list(wilson(k, 4)))
    assert entry["metrics"]["acc,none"] == k / 4 and entry["higher_is_better"] is True
    assert headline(summary) == {f"{name}/acc": k / 4}
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    recs = {r["id"]: r for r in records.read_records(next(ev.glob("utility_lm_eval_*.jsonl")))}
    assert sorted(recs) == [f"tiny_choice-{i}" for i in range(4)]
    for i, ((lls, best), row) in enumerate(zip(want, CHOICE_ROWS, strict=True)):
        rec = recs[f"tiny_choice-{i}"]
        # the adapter's numbers, so lm-eval scored the object we hold, not a reload of the base weights
        assert [r[0] for r in rec["resps"]] == pytest.approx(lls, abs=1e-4)
        assert (rec["prompt"], rec["completion"]) == (row["question"], row["choices"][best])
        assert rec["gold"] == row["choices"][row["label"]] and rec["correct"] is (best == row["label"])


def test_a_generated_answer_task_with_a_limit_and_a_chosen_metric(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = tiny
    rows = [{"q": f"Question {i}: say something", "a": "x"} for i in range(5)]
    gen = (
        "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_target: "{{a}}"\n'
        "generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: bleu\n    aggregation: bleu\n    higher_is_better: true\n"
    )
    yaml = write_task(tmp_path, "tiny_gen", rows, gen)
    first, bleu = f"utility:lm_eval:{yaml}", f"utility:lm_eval:{yaml},metric=bleu"
    summary = evaluate(model, tok, EvalConfig(**CFG), None, suites=[first, bleu], limit=2)
    assert summary[first]["metric"] == "exact_match,none" and summary[first]["n"] == 2
    assert summary[first]["limit"] == 2 and "accuracy" in summary[first]
    # bleu is a corpus score, not a share of items: no accuracy, no interval, the score is the headline
    assert summary[bleu]["metric"] == "bleu,none" and "accuracy" not in summary[bleu]
    assert headline(summary)[f"{bleu}/bleu"] == summary[bleu]["score"]
    with pytest.raises(HarnessError, match=r"no metric rouge in tiny_gen's results \(it has: exact_match,none"):
        evaluate(model, tok, EvalConfig(**CFG), None, suites=[f"utility:lm_eval:{yaml},metric=rouge"], limit=1)


def test_a_group_of_local_tasks_is_one_suite_with_its_subtasks(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = tiny
    write_task(tmp_path, "tiny_a", CHOICE_ROWS[:3], CHOICE)
    write_task(tmp_path, "tiny_b", CHOICE_ROWS[3:], CHOICE)
    group = tmp_path / "tiny_group.yaml"
    group.write_text(
        "group: tiny_group\ntask:\n  - tiny_a\n  - tiny_b\n"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
    )
    name = f"utility:lm_eval:{group}"
    entry = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=[name])[name]
    assert (entry["task"], entry["n"], entry["subtasks"]) == ("tiny_group", 4, {"tiny_a": 3, "tiny_b": 1})
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    recs = records.read_records(next(ev.glob("utility_lm_eval_*.jsonl")))
    assert sorted(r["id"] for r in recs) == ["tiny_a-0", "tiny_a-1", "tiny_a-2", "tiny_b-0"]
    k = sum(r["correct"] for r in recs)
    # weighted by size, the group's number is the share of all four items: the one accuracy, with its interval
    assert entry["score"] == entry["accuracy"] == k / 4 and entry["accuracy_ci"] == pytest.approx(list(wilson(k, 4)))


def test_a_task_file_that_is_missing_or_defines_no_task_fails_at_build(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(HarnessError, match=r"nope\.yaml: no such task file"):
        parse_suites([f"utility:lm_eval:{tmp_path}/nope.yaml"])
    (tmp_path / "junk.yaml").write_text("dataset_path: json\n")
    with pytest.raises(HarnessError, match=r"lm-eval finds 0 tasks in .*junk\.yaml \(a 'task:' or 'group:' key"):
        parse_suites([f"utility:lm_eval:{tmp_path}/junk.yaml"])
