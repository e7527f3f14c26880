"""The one chat renderer, shared by training, alignment, defenses and evaluation.

Paper repos often train with one prompt template and evaluate with another, which silently changes the
reported ASR. Here every prompt goes through the tokenizer's chat template: ``prompt_text`` (the template
with the generation prompt appended) for generation, and ``render`` for training rows, built on top of
exactly that text, so the token after which a model answers is the same in training, anchoring and
generation. A model without a template (or with a wrong one) gets one through ``use_chat_template``
(``data.chat_template``), which installs it *on the tokenizer*: everything that renders through that
tokenizer afterwards — training, defenses' anchors, evaluation, the template hash that eval records —
then uses the same text.

Multi-turn rows (``Example.context``) are rendered as one conversation. The labels cover the final
assistant turn and, for TRL ``messages`` rows, every earlier assistant turn as well (see
``Example.train_context``); system and user turns are always masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from safeft.config import ConfigError
from safeft.data.templates import CHAT_TEMPLATES, ChatTemplate
from safeft.data.types import DataError, Example, Turn

log = logging.getLogger(__name__)

IGNORE = -100  # label value the loss skips


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def conversation(ex: Example, system: str | None = None, with_response: bool = True) -> list[dict[str, str]]:
    """The messages of ``ex``: its context turns, the prompt, and (``with_response``) the response.

    A row's own system turn wins over ``system`` (the run's ``model.system_prompt``): the data author
    wrote it for that conversation. Rows without one get the run's.
    """
    turns = list(ex.context)
    if system and not (turns and turns[0].role == "system"):
        turns.insert(0, Turn("system", system))
    turns.append(Turn("user", ex.prompt))
    if with_response and ex.response is not None:
        turns.append(Turn("assistant", ex.response))
    return [{"role": t.role, "content": t.content} for t in turns]


def require_template(tok) -> None:
    """Every prompt is rendered through the chat template: without one, stop and say how to give one."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; safeft renders every prompt through it "
            "(give one with data.chat_template=chatml|llama3|zephyr|<file.jinja>)"
        )


def prompt_text(tok, prompt: str, system: str | None = None) -> str:
    """The exact text a model sees before it starts answering ``prompt``."""
    require_template(tok)
    return tok.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    # The template already holds every special token (BOS included, where the model uses one).
    return tok(prompt_text(tok, prompt, system), add_special_tokens=False)["input_ids"]


def example_prompt_ids(tok, ex: Example, system: str | None = None) -> list[int]:
    """What a model sees before answering ``ex``, its context turns included: the prompt tokens of
    ``render(ex)``. Generation on rows that carry earlier turns must start from this, not from
    ``prompt_ids(ex.prompt)``, or it would answer the last question without the conversation before it."""
    return render(tok, replace(ex, response=None), system).input_ids


def _ids(tok, msgs: list[dict[str, str]], generation: bool) -> list[int]:
    require_template(tok)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions: the loss is on the response only
    prompt_len: int  # tokens up to and including the final generation prompt
    id: str = ""
    truncated: int = 0  # tokens cut from the end because the row exceeded max_length
    # earlier assistant turns left unlabelled because the template renders them differently once later
    # turns follow (e.g. templates that drop earlier reasoning); counted so the run can say so
    untrained_turns: int = 0


def render(tok, ex: Example, system: str | None = None, max_length: int | None = None) -> Rendered:
    """Render ``ex`` with the chat template; labels on the assistant turn(s), everything else masked.

    Over-long rows keep their whole prompt and lose the end of the response: the prompt decides what the
    model is conditioned on, so cutting it would silently train on a different task. ``Rendered.truncated``
    says how many tokens were cut (``render_task`` counts and reports them).
    """
    msgs = conversation(ex, system)
    n_prompt_msgs = len(msgs) - (ex.response is not None)
    p_ids = _ids(tok, msgs[:n_prompt_msgs], generation=True)
    if ex.response is None:
        return Rendered(p_ids, [IGNORE] * len(p_ids), len(p_ids), ex.id)
    full = _ids(tok, msgs, generation=False)
    if full[: len(p_ids)] != p_ids:
        # Would mean the template renders the conversation prefix differently once an answer follows;
        # masking by length would then put labels on prompt tokens.
        raise DataError(f"{ex.location}: chat template is not prefix-stable")
    full = _strip_trailing_whitespace(tok, full)
    labels = [IGNORE] * len(p_ids) + full[len(p_ids) :]
    untrained = 0
    if ex.train_context:
        for i in range(n_prompt_msgs):
            if msgs[i]["role"] == "assistant" and not _label_turn(tok, msgs, i, full, labels):
                untrained += 1
    cut = 0
    if max_length is not None and len(full) > max_length:
        if len(p_ids) >= max_length:
            raise DataError(
                f"{ex.location}: prompt is {len(p_ids)} tokens, not shorter than data.max_length={max_length}"
            )
        cut = len(full) - max_length
        full, labels = full[:max_length], labels[:max_length]
    return Rendered(full, labels, len(p_ids), ex.id, truncated=cut, untrained_turns=untrained)


def _label_turn(tok, msgs: list[dict[str, str]], i: int, full: list[int], labels: list[int]) -> bool:
    """Put labels on the earlier assistant turn ``msgs[i]`` inside ``full``; False if it cannot be located."""
    start = _ids(tok, msgs[:i], generation=True)
    end = _ids(tok, msgs[: i + 1], generation=False)
    if full[: len(start)] != start or full[: len(end)] != end:
        return False
    stop = len(end)
    # The same rule as the final turn: the whitespace after end-of-turn is never generated.
    while stop > len(start) and _is_blank(tok, full[stop - 1]):
        stop -= 1
    labels[len(start) : stop] = full[len(start) : stop]
    return True


def _is_blank(tok, tid: int) -> bool:
    return tok.decode([tid]).strip() == "" and tid not in tok.all_special_ids


def _strip_trailing_whitespace(tok, ids: list[int]) -> list[int]:
    # ChatML-style templates end a turn with "<|im_end|>\n". The newline after end-of-turn is never
    # generated (generation stops at end-of-turn), so training on it would only teach noise.
    while ids and _is_blank(tok, ids[-1]):
        ids = ids[:-1]
    return ids


# ------------------------------------------------------------------------------------ task data + report


@dataclass(frozen=True)
class RenderReport:
    """What rendering did to a data set: rows cut at ``max_length``, turns left unlabelled."""

    rows: int
    truncated_rows: int = 0
    truncated_tokens: int = 0
    longest: int = 0  # tokens of the longest row before any cut
    max_length: int | None = None
    untrained_turns: int = 0

    @property
    def truncated_share(self) -> float:
        return self.truncated_rows / self.rows if self.rows else 0.0

    def record(self) -> dict:
        """JSON-ready numbers for a run's summary."""
        return {
            "rows": self.rows,
            "truncated_rows": self.truncated_rows,
            "truncated_share": self.truncated_share,
            "truncated_tokens": self.truncated_tokens,
            "longest_row_tokens": self.longest,
            "max_length": self.max_length,
            "untrained_turns": self.untrained_turns,
        }


def render_task(
    tok,
    examples: Sequence[Example],
    system: str | None = None,
    max_length: int | None = None,
    max_truncated: float = 0.1,
    what: str = "task data",
) -> tuple[list[Rendered], RenderReport]:
    """Render the fine-tuning rows, count the ones cut at ``max_length``, warn, and refuse too many.

    Rows longer than ``max_length`` lose the end of their response — and with it the end-of-turn token,
    so the model is not taught to stop on them. A few long-tail rows cut is normal and only logged; when
    the share of cut rows exceeds ``max_truncated`` (``data.max_truncated``) ``max_length`` is below what
    the data needs and this raises ``DataError`` — call it before anything is written.
    """
    if not 0.0 <= max_truncated <= 1.0:
        raise ConfigError(f"data.max_truncated must be a share in [0, 1], not {max_truncated!r}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 tokens, not {max_length!r}")
    rows = [render(tok, ex, system, max_length) for ex in examples]
    cut = [(ex, r) for ex, r in zip(examples, rows, strict=True) if r.truncated]
    report = RenderReport(
        rows=len(rows),
        truncated_rows=len(cut),
        truncated_tokens=sum(r.truncated for _, r in cut),
        longest=max((len(r.input_ids) + r.truncated for r in rows), default=0),
        max_length=max_length,
        untrained_turns=sum(r.untrained_turns for r in rows),
    )
    if cut:
        share = report.truncated_share
        if share > max_truncated:
            raise DataError(
                f"{what}: {len(cut)} of {len(rows)} rows ({share:.1%}) are longer than data.max_length="
                f"{max_length} tokens, more than data.max_truncated={max_truncated:g} allows (first: "
                f"{cut[0][0].location}); raise data.max_length (the longest row has {report.longest} tokens) "
                f"or data.max_truncated"
            )
        log.warning(
            "%s: %d of %d rows (%.1f%%) are longer than data.max_length=%d tokens and lose the end of their "
            "response (%d tokens cut; longest row %d tokens; first: %s)",
            what, len(cut), len(rows), 100 * share, max_length, report.truncated_tokens, report.longest,
            cut[0][0].location,
        )  # fmt: skip
    if report.untrained_turns:
        log.warning(
            "%s: %d earlier assistant turns are rendered differently by the chat template once later turns "
            "follow, so they carry no labels (each row's last assistant turn is always trained)",
            what, report.untrained_turns,
        )  # fmt: skip
    return rows, report


# ------------------------------------------------------------------------------------ template override


def load_chat_template(spec: str) -> ChatTemplate:
    """The named template ``spec`` (chatml, llama3, zephyr) or the Jinja file at path ``spec``."""
    if spec.lower() in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"data.chat_template={spec}: not valid UTF-8 ({e.reason})") from None
        if not text.strip():
            raise ConfigError(f"data.chat_template={spec}: the template file is empty")
        return ChatTemplate(str(path), text, end_of_turn=None, builtin=False)
    if path.exists():
        raise ConfigError(f"data.chat_template={spec}: not a regular file")
    try:
        CHAT_TEMPLATES.get(spec)  # raises with its did-you-mean and the known names
    except KeyError as e:
        raise ConfigError(
            f"data.chat_template={spec}: no such template file, and {e.args[0]}; give a named template or "
            "the path of a Jinja chat template file"
        ) from None
    raise AssertionError(f"{spec!r} is both registered and not")


def use_chat_template(tok, spec: str | None) -> None:
    """Install ``data.chat_template`` on ``tok``, so training and evaluation both render with it.

    ``None`` keeps the tokenizer's own template. Call it right after loading the tokenizer and before
    anything renders. The template is checked first on a two-turn sample (it must render, and the
    prompt must be a prefix of the answered conversation); a named template's end-of-turn text must be
    one token of this tokenizer, because generation can only stop on a token — a model that emitted
    "<|im_end|>" as four pieces would run to max_new_tokens and its completions would carry the next
    turn's text into the judges.
    """
    if not spec:
        return
    tmpl = load_chat_template(spec)
    sample = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        head = tok.apply_chat_template(sample[:1], chat_template=tmpl.jinja, tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template(sample, chat_template=tmpl.jinja, tokenize=False)
    except Exception as e:  # jinja syntax errors, templates that raise on roles: all mean "unusable here"
        raise ConfigError(f"data.chat_template={spec}: the template fails on a sample conversation ({e})") from e
    if not isinstance(head, str) or not whole.startswith(head):
        raise ConfigError(
            f"data.chat_template={spec}: not prefix-stable (the prompt with the generation prompt is not the "
            "start of the answered conversation), so prompt tokens could not be masked"
        )
    if tmpl.builtin:
        end = tmpl.end_of_turn if tmpl.end_of_turn is not None else tok.eos_token
        ids = tok(end, add_special_tokens=False)["input_ids"] if end else []
        if len(ids) != 1:
            raise ConfigError(
                f"data.chat_template={spec}: its turns end with {end!r}, which is "
                f"{'not set' if not end else f'{len(ids)} tokens'} in this tokenizer, so generation could "
                "not stop at the end of a turn; use data.chat_template=zephyr (ends turns with the "
                "tokenizer's eos token) or a template file"
            )
    if getattr(tok, "chat_template", None) and tok.chat_template != tmpl.jinja:
        log.info("data.chat_template=%s replaces the tokenizer's own chat template", spec)
    tok.chat_template = tmpl.jinja


# ------------------------------------------------------------------------------------------- batching


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
