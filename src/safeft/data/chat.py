"""The one chat renderer, shared by training, alignment, defenses and evaluation.

Paper repos often train with one prompt template and evaluate with another, which silently changes the
reported ASR. Here every prompt goes through ``prompt_text`` (the model's own chat template with the
generation prompt appended), and training rows are built by ``render`` on top of exactly that text, so the
token after which a model answers is the same in training, anchoring and generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safeft.data.types import DataError, Example

IGNORE = -100  # label value the loss skips


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def prompt_text(tok, prompt: str, system: str | None = None) -> str:
    """The exact text a model sees before it starts answering ``prompt``."""
    return tok.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    # The template already holds every special token (BOS included, where the model uses one).
    return tok(prompt_text(tok, prompt, system), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions: the loss is on the response only
    prompt_len: int
    id: str = ""


def render(tok, ex: Example, system: str | None = None, max_length: int | None = None) -> Rendered:
    """Render (prompt, response) with the chat template; mask the prompt in the labels.

    Over-long rows keep their whole prompt and lose the end of the response: the prompt decides what the
    model is conditioned on, so cutting it would silently train on a different task.
    """
    p_ids = prompt_ids(tok, ex.prompt, system)
    if ex.response is None:
        return Rendered(p_ids, [IGNORE] * len(p_ids), len(p_ids), ex.id)
    msgs = _messages(ex.prompt, system) + [{"role": "assistant", "content": ex.response}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    if full[: len(p_ids)] != p_ids:
        # Would mean the template renders the conversation prefix differently once an answer follows;
        # masking by length would then put labels on prompt tokens.
        raise DataError(f"{ex.source or 'data'} row {ex.id!r}: chat template is not prefix-stable")
    full = _strip_trailing_whitespace(tok, full)
    if max_length is not None and len(full) > max_length:
        if len(p_ids) >= max_length:
            raise DataError(
                f"{ex.source or 'data'} row {ex.id!r}: prompt is {len(p_ids)} tokens, "
                f"not shorter than max_length={max_length}"
            )
        full = full[:max_length]
    labels = [IGNORE] * len(p_ids) + full[len(p_ids) :]
    return Rendered(full, labels, len(p_ids), ex.id)


def _strip_trailing_whitespace(tok, ids: list[int]) -> list[int]:
    # ChatML-style templates end a turn with "<|im_end|>\n". The newline after end-of-turn is never
    # generated (generation stops at end-of-turn), so training on it would only teach noise.
    while ids and tok.decode(ids[-1:]).strip() == "" and ids[-1] not in tok.all_special_ids:
        ids = ids[:-1]
    return ids


def collate(rows: Sequence[Rendered], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad rows into a batch. Right padding for training, left padding for generation."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(r.input_ids)
        labels[i, sl] = torch.tensor(r.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def last_prompt_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Index of the last real token of each row, correct for left and right padding."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    # position of the last 1 in each row: width - 1 - (index of first 1 in the reversed row)
    return width - 1 - mask.flip(1).argmax(dim=1)
