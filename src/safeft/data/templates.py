"""Named chat templates for models whose tokenizer has none (``data.chat_template=<name>``).

Each is a Jinja template in the form ``tokenizer.apply_chat_template`` runs, written for safeft after the
published turn layouts (ChatML, Llama 3, Zephyr). They are written to be *prefix-stable*: the text of a
conversation with the generation prompt appended is a prefix of the same conversation with the answer,
which the renderer relies on to mask the prompt (``safeft.data.chat.render`` checks it per row).

The templates run in transformers' sandbox with ``trim_blocks``/``lstrip_blocks`` on, so every newline
they emit is a string literal inside ``{{ }}``: a literal newline after a block tag would be eaten.
"""

from __future__ import annotations

from dataclasses import dataclass

from safeft.registry import Registry


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    # The text that closes an assistant turn. Generation stops on it only if it is a single token of the
    # tokenizer; None = the tokenizer's own eos token.
    end_of_turn: str | None
    builtin: bool = True  # False for a user's template file, whose end-of-turn text we cannot know


CHAT_TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


def _register(name: str, doc: str, jinja: str, end_of_turn: str | None) -> None:
    CHAT_TEMPLATES.register(name, doc)(ChatTemplate(name, jinja, end_of_turn))


_register(
    "chatml",
    "ChatML turns: <|im_start|>role\\n...<|im_end|> (needs <|im_end|> as one token; SmolLM2, Qwen style)",
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "<|im_end|>",
)

_register(
    "llama3",
    "Llama 3 turns: <|start_header_id|>role<|end_header_id|> ... <|eot_id|> (needs <|eot_id|> as one token)",
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "<|eot_id|>",
)

_register(
    "zephyr",
    "Zephyr turns: <|role|>\\n... closed by the tokenizer's eos token (works for any base model with an eos)",
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + (eos_token or '') + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    None,
)
