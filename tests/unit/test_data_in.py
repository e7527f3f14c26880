"""User data in TRL's formats trains end to end on the tiny model: a ``messages`` JSONL, and a CSV whose
columns are mapped with ``data.columns`` (rendered with ``data.chat_template`` on a tokenizer without one)."""

from __future__ import annotations

import csv
import json
import math

import yaml

from safeft.data.chat import IGNORE, render_task, use_chat_template
from safeft.data.sources import load_task
from safeft.testing import tiny_run_config
from safeft.train import train


def _conv(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "You do sums."},
        {"role": "user", "content": f"What is {i} plus 7?"},
        {"role": "assistant", "content": f"Answer: {i + 7}"},
        {"role": "user", "content": "And times 2?"},
        {"role": "assistant", "content": f"Answer: {2 * (i + 7)}"},
    ]


def _changed_lora(res) -> list[str]:
    return [n for n, p in res.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]


def test_messages_jsonl_trains_on_every_assistant_turn(tmp_path, tiny):
    model, tok = tiny
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": _conv(i)}) + "\n" for i in range(4)))
    cfg = tiny_run_config(tmp_path / "runs", f"data.task=jsonl:{path}", "train.steps=2", "train.batch_size=4")
    res = train(cfg, model=model, tokenizer=tok, progress=False)  # the loop's own loader reads the file
    assert res.steps == 2 and all(math.isfinite(m["loss"]) for m in res.metrics) and _changed_lora(res)
    # One batch holds all 4 rows, so the step's labelled tokens are both answers of every conversation.
    rows, _ = render_task(tok, load_task(cfg.data))
    labelled = sum(sum(t != IGNORE for t in r.labels) for r in rows)
    final_only = sum(
        len(tok(f"Answer: {2 * (i + 7)}<|im_end|>", add_special_tokens=False)["input_ids"]) for i in range(4)
    )
    assert res.metrics[0]["tokens"] == labelled > final_only


def test_column_mapped_csv_trains_with_a_named_chat_template(tmp_path, tiny):
    model, tok = tiny
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer", "topic"])
        w.writerows([f"What is {i} plus 7?", f"Answer: {i + 7}", "sums"] for i in range(6))
    cfg = tiny_run_config(
        tmp_path / "runs", f"data.task=csv:{path}", "data.columns.prompt=question", "data.columns.response=answer",
        "data.chat_template=chatml", "train.steps=2", "train.batch_size=3",
    )  # fmt: skip
    tok.chat_template = None  # a model without a template of its own
    use_chat_template(tok, cfg.data.chat_template)
    examples = load_task(cfg.data)
    assert [e.prompt for e in examples][:2] == ["What is 0 plus 7?", "What is 1 plus 7?"]
    res = train(cfg, examples=examples, model=model, tokenizer=tok, progress=False)
    assert res.steps == 2 and all(math.isfinite(m["loss"]) for m in res.metrics) and _changed_lora(res)
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())["data"]
    assert saved["columns"] == {"prompt": "question", "response": "answer"} and saved["chat_template"] == "chatml"
