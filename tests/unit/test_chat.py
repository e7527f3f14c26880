"""The one renderer: prompt masked, template shared with generation, padding handled both ways."""

from __future__ import annotations

import pytest
import torch

from safeft.config import ConfigError
from safeft.data.chat import (
    IGNORE,
    collate,
    conversation,
    example_prompt_ids,
    last_prompt_index,
    prompt_ids,
    prompt_text,
    render,
    render_task,
    use_chat_template,
)
from safeft.data.templates import CHAT_TEMPLATES
from safeft.data.types import DataError, Example, Turn


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


# -- multi-turn rows --------------------------------------------------------------------------------------


def labelled_spans(tok, r) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans, cur = [], []
    for t, lab in zip(r.input_ids, r.labels, strict=True):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


CONTEXT = (Turn("system", "Be brief."), Turn("user", "What is 2+2?"), Turn("assistant", "4."))


def test_messages_rows_train_every_assistant_turn(tiny):
    _, tok = tiny
    r = render(tok, Example("m", "And 3+3?", "6.", context=CONTEXT, train_context=True), system="ignored")
    assert labelled_spans(tok, r) == ["4.<|im_end|>", "6.<|im_end|>"]
    text = tok.decode(r.input_ids)
    assert "Be brief." in text and "ignored" not in text  # the row's own system turn wins
    assert r.untrained_turns == 0 and r.input_ids[: r.prompt_len] == tok(
        tok.apply_chat_template(conversation(Example("m", "And 3+3?", context=CONTEXT)), add_generation_prompt=True,
                                tokenize=False), add_special_tokens=False)["input_ids"]  # fmt: skip


def test_generation_prompt_of_a_row_keeps_its_context(tiny):
    _, tok = tiny
    plain = Example("a", "Hi")
    assert example_prompt_ids(tok, plain, "Sys.") == prompt_ids(tok, "Hi", "Sys.")
    multi = Example("m", "And 3+3?", "6.", context=CONTEXT, train_context=True)
    r = render(tok, multi)
    assert example_prompt_ids(tok, multi) == r.input_ids[: r.prompt_len]
    assert "What is 2+2?" in tok.decode(example_prompt_ids(tok, multi))


def test_prompt_completion_rows_train_the_completion_only(tiny):
    _, tok = tiny
    r = render(tok, Example("m", "And 3+3?", "6.", context=CONTEXT[1:], train_context=False), system="Sys.")
    assert labelled_spans(tok, r) == ["6.<|im_end|>"]
    assert "Sys." in tok.decode(r.input_ids)  # no system turn in the row: the run's applies


def test_earlier_turns_a_template_rewrites_stay_unlabelled_and_are_counted(tiny, caplog):
    _, tok = tiny
    # A template that hides earlier assistant turns (as reasoning templates drop old thoughts).
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n[earlier]<|im_end|>\\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    ex = Example("m", "And 3+3?", "6.", context=CONTEXT, train_context=True)
    rows, report = render_task(tok, [ex, ex])
    assert labelled_spans(tok, rows[0]) == ["6.<|im_end|>"] and report.untrained_turns == 2
    assert "2 earlier assistant turns are rendered differently" in caplog.text


# -- truncation: counted, reported, and refused past data.max_truncated -----------------------------------


def _rows(n_long: int, n: int = 10) -> list[Example]:
    return [
        Example(f"r{i}", "Tell me a story.", "word " * (60 if i < n_long else 2), where=f"d.jsonl, line {i + 1}")
        for i in range(n)
    ]


def test_truncation_is_counted_and_logged(tiny, caplog):
    _, tok = tiny
    limit = len(prompt_ids(tok, "Tell me a story.")) + 20
    rows, report = render_task(tok, _rows(1), max_length=limit, max_truncated=0.1)
    assert [r.truncated > 0 for r in rows] == [True] + [False] * 9
    assert report.truncated_rows == 1 and report.truncated_share == 0.1 and report.longest > limit
    assert report.truncated_tokens == report.longest - limit and len(rows[0].input_ids) == limit
    assert f"task data: 1 of 10 rows (10.0%) are longer than data.max_length={limit} tokens" in caplog.text
    assert "first: d.jsonl, line 1" in caplog.text
    caplog.clear()
    render_task(tok, _rows(0), max_length=limit)
    assert "longer than" not in caplog.text  # nothing cut, nothing said


def test_truncating_too_many_rows_is_an_error(tiny):
    _, tok = tiny
    limit = len(prompt_ids(tok, "Tell me a story.")) + 20
    with pytest.raises(DataError) as err:
        render_task(tok, _rows(3), max_length=limit, max_truncated=0.1)
    msg = str(err.value)
    assert "3 of 10 rows (30.0%)" in msg and "data.max_truncated=0.1" in msg and "first: d.jsonl, line 1" in msg
    assert f"the longest row has {render_task(tok, _rows(3))[1].longest} tokens" in msg
    render_task(tok, _rows(3), max_length=limit, max_truncated=0.3)  # the user's threshold decides
    with pytest.raises(ConfigError, match="max_truncated"):
        render_task(tok, _rows(0), max_truncated=1.5)


# -- data.chat_template ------------------------------------------------------------------------------------


def test_named_template_is_installed_and_used_by_training_and_generation(tiny):
    import hashlib

    from safeft.eval.generate import GenSettings

    _, tok = tiny
    tok.chat_template = None
    use_chat_template(tok, "chatml")
    assert prompt_text(tok, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    r = render(tok, Example("a", "Hi", "Hello."))
    assert r.input_ids[: r.prompt_len] == prompt_ids(tok, "Hi")  # what eval feeds generate()
    assert labelled_spans(tok, r) == ["Hello.<|im_end|>"]
    want = hashlib.sha256(CHAT_TEMPLATES.get("chatml").jinja.encode()).hexdigest()[:16]
    assert GenSettings().record(tok)["chat_template_sha256"] == want  # eval records the template in use


def test_zephyr_ends_turns_with_the_eos_token(tiny):
    _, tok = tiny
    use_chat_template(tok, "zephyr")
    r = render(tok, Example("a", "Hi", "Hello."))
    assert labelled_spans(tok, r) == ["Hello.<|im_end|>"]  # the tiny tokenizer's eos is <|im_end|>
    assert tok.decode(r.input_ids).startswith("<|user|>\nHi<|im_end|>\n<|assistant|>\n")


def test_llama3_template_on_a_tokenizer_with_its_tokens(tiny):
    from safeft.eval.generate import _stop_ids

    _, tok = tiny
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    use_chat_template(tok, "llama3")
    r = render(tok, Example("a", "Hi", "Hello."), system="Sys.")
    assert tok.decode(r.input_ids[: r.prompt_len]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert labelled_spans(tok, r) == ["Hello.<|eot_id|>"]
    assert tok.convert_tokens_to_ids("<|eot_id|>") in _stop_ids(tok)  # generation stops where training ends


def test_a_template_whose_end_of_turn_is_not_one_token_is_refused(tiny):
    _, tok = tiny
    before = tok.chat_template
    with pytest.raises(ConfigError, match=r"'<\|eot_id\|>', which is \d+ tokens .* use data.chat_template=zephyr"):
        use_chat_template(tok, "llama3")
    assert tok.chat_template == before  # nothing installed


def test_template_file_and_bad_specs(tiny, tmp_path):
    from safeft.testing import CHATML

    _, tok = tiny
    f = tmp_path / "t.jinja"
    f.write_text(CHATML.replace("tiny test model", "file template"))
    use_chat_template(tok, str(f))
    assert "file template" in prompt_text(tok, "Hi")
    with pytest.raises(ConfigError, match="did you mean 'chatml'"):
        use_chat_template(tok, "chatmk")
    (tmp_path / "empty.jinja").write_text(" ")
    with pytest.raises(ConfigError, match="empty.jinja: the template file is empty"):
        use_chat_template(tok, str(tmp_path / "empty.jinja"))
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="broken.jinja: the template fails on a sample conversation"):
        use_chat_template(tok, str(tmp_path / "broken.jinja"))
    (tmp_path / "unstable.jinja").write_text("{% if add_generation_prompt %}A{% else %}B{% endif %}")
    with pytest.raises(ConfigError, match="not prefix-stable"):
        use_chat_template(tok, str(tmp_path / "unstable.jinja"))
    use_chat_template(tok, None)  # None keeps what is there
    assert "file template" in prompt_text(tok, "Hi")
