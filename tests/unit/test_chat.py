"""The one renderer: prompt masked, template shared with generation, padding handled both ways."""

from __future__ import annotations

import pytest
import torch

from safeft.data.chat import IGNORE, collate, last_prompt_index, prompt_ids, render
from safeft.data.types import DataError, Example


def test_prompt_is_masked_and_response_is_labelled(tiny):
    _, tok = tiny
    ex = Example("a", "What is 2 plus 2?", "Answer: 4")
    r = render(tok, ex)
    p = prompt_ids(tok, ex.prompt)
    assert r.input_ids[: len(p)] == p  # training sees exactly the generation prompt
    assert all(x == IGNORE for x in r.labels[: len(p)])
    resp = [t for t in r.labels if t != IGNORE]
    assert tok.decode(resp).startswith("Answer: 4")
    assert resp[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the model learns to stop


def test_system_prompt_changes_the_rendered_prompt(tiny):
    _, tok = tiny
    assert prompt_ids(tok, "hi") != prompt_ids(tok, "hi", system="Be terse.")


def test_truncation_keeps_prompt_and_cuts_response(tiny):
    _, tok = tiny
    ex = Example("a", "Tell me a story.", "word " * 200)
    n_prompt = len(prompt_ids(tok, ex.prompt))
    r = render(tok, ex, max_length=n_prompt + 5)
    assert len(r.input_ids) == n_prompt + 5 and r.prompt_len == n_prompt
    assert r.input_ids[:n_prompt] == prompt_ids(tok, ex.prompt)
    with pytest.raises(DataError, match="row 'a'"):
        render(tok, ex, max_length=n_prompt)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_and_last_prompt_index(tiny, side):
    _, tok = tiny
    rows = [render(tok, Example(str(i), "x" * (i + 1))) for i in range(3)]
    b = collate(rows, tok.pad_token_id, side)
    idx = last_prompt_index(b)
    for i, r in enumerate(rows):
        assert b["input_ids"][i, idx[i]] == r.input_ids[-1]
        assert int(b["attention_mask"][i].sum()) == len(r.input_ids)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    if side == "left":
        assert (idx == b["input_ids"].shape[1] - 1).all()
    else:
        assert torch.equal(idx, torch.tensor([len(r.input_ids) - 1 for r in rows]))
