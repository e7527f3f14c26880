"""The anchor family's shared parts: anchor sets, masks, and the protocol by which anchor rows ride in a step.

SBR, SAFT and RepAnchor (and their combination) all do the same thing each step: run a few anchor rows (harmful
prompts, with the reference's own answers or without) through θ beside the task batch, read something off that
pass (a final hidden state, block outputs, logits) and score it against the frozen aligned reference. They
differ only in what they read and how they score it. So a defense in this family is written as one or more
``Part``s, each of which says two things:

* ``segments(ctx, batch, rows) -> Request``: the sequences it wants run this micro-batch (``Segment``: token
  ids, or ids with input embeddings of its own such as SAFT's emb + δ*), what it wants captured of the pass
  (decoder block outputs, the unembedding input, the logits at the positions it names) and any data its
  terms will need back;
* ``terms(ctx, out) -> {name: weighted loss}``: its loss terms, given the pass's ``Outputs``, whose ``take``
  finds the part's segments in it;
* optionally ``after_backward(ctx)``: state carried across steps, updated from the gradients the step's
  backward left on its segments' inputs (SAFT's free PGD).

A pass runs the unembedding only at the positions some term reads (``packing.forward_at``): the logits a
part named, and every task position for the task CE (as SFT's own step does). A segment should end at the
last position its terms read: under the causal mask nothing read depends on what follows.

``anchor_step`` runs a list of parts for one micro-batch. Packed (``safeft.packing``): every part's segments
ride in the task forward (one wider forward with the union of the captures, one backward of the fp32 sum of
the task CE and every term). Separate: the task forward, then each part's segments in a forward of their own
(``forward_alone``), with the same terms; ``backward`` says whether the sum is back-propagated once at the end
or each pass as soon as it ran. ``packs`` decides once, in setup, whether a defense's parts may be packed: it
was asked for (``defense.fuse``), every part can ride along, and the model passes ``packing.packing_works``.
Parts of several methods on one anchor stream (SAFT+RepAnchor) are just a longer list: they get the same rows.

Nothing here knows a method by name. ``docs/design.md`` ("The anchor-family protocol") walks through a new
anchor-style defense; ``tests/unit/test_anchor_protocol.py`` writes one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from safeft import packing
from safeft.config import ConfigError
from safeft.context import RunContext, Stream
from safeft.data.chat import IGNORE, Rendered
from safeft.data.types import Example
from safeft.hooks import capture
from safeft.methods.base import Batch, StepOutput, backward_terms
from safeft.packing import Placement

log = logging.getLogger(__name__)

BACKWARD = ("once", "each")


# ----------------------------------------------------------------------------- config checks


def require(cfg: Any, key: str, ok: bool, allowed: str) -> None:
    """Raise a ``ConfigError`` naming ``defense.<key>``, its allowed range and the value, unless ``ok``."""
    if not ok:
        raise ConfigError(f"defense.{key} must be {allowed} ({cfg.name}), got {getattr(cfg, key)!r}")


def check_anchor_fields(cfg: Any, min_new_tokens: int) -> None:
    """The fields every config built on an ``AnchorSet`` with answers has: ``n_anchors``, ``anchor_batch``,
    ``ref_max_new_tokens`` (at least ``min_new_tokens`` when a term is measured on the answers)."""
    require(cfg, "n_anchors", cfg.n_anchors >= 1, ">= 1")
    require(cfg, "anchor_batch", cfg.anchor_batch >= 1, ">= 1")
    why = " (the anchor KL is measured on y_ref's tokens)" if min_new_tokens else ""
    require(cfg, "ref_max_new_tokens", cfg.ref_max_new_tokens >= min_new_tokens, f">= {min_new_tokens}{why}")


# ----------------------------------------------------------------------------- masks


def inputs_only(batch: Batch) -> Batch:
    """The batch without labels, so the model does not compute a loss nobody reads."""
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def prompt_mask(batch: Batch) -> torch.Tensor:
    """(B, T) bool: real prompt tokens (not pad, not response)."""
    return batch["attention_mask"].bool() & (batch["labels"] == IGNORE)


def response_mask(batch: Batch) -> torch.Tensor:
    """(B, T-1) bool: positions whose logits predict a response token (labels shifted by one)."""
    return batch["labels"][:, 1:] != IGNORE


def response_positions(row: Rendered) -> torch.Tensor:
    """Positions of ``row`` whose logits predict one of its response tokens (labels shifted by one)."""
    return torch.nonzero(torch.tensor(row.labels[1:]) != IGNORE).squeeze(1)


# ----------------------------------------------------------------------------- the anchor set


class AnchorSet:
    """The anchor prompts with the reference's greedy answers, rendered once, served each micro-batch.

    The anchors are the first ``n`` aux ``harmful_prompts`` (all of them if fewer are given); each gets the
    reference's greedy answer of up to ``max_new_tokens`` tokens (0: prompts only, nothing generated). Rows
    get ids "0".."n-1", so per-row caches are plain list lookups (``int(row.id)``). ``batch_size`` rows per
    micro-batch come from a checkpointed stream named ``stream`` (reshuffled every epoch); ``None`` serves
    every row every micro-batch, in order, and makes no stream. ``y_ref`` is restored from a checkpoint
    before ``build``, so a resumed run anchors on exactly the same text.
    """

    def __init__(self, n: int, max_new_tokens: int, batch_size: int | None, stream: str = "anchor") -> None:
        self.n, self.max_new_tokens, self.batch_size, self.stream_name = n, max_new_tokens, batch_size, stream
        self.y_ref: list[str] | None = None  # restored from a checkpoint, or generated in build
        self.rows: list[Rendered] = []
        self._stream: Stream | None = None

    def build(self, ctx: RunContext) -> list[Rendered]:
        from safeft.eval.generate import GenSettings, generate

        prompts = [ex.prompt for ex in ctx.aux_data("harmful_prompts")[: self.n]]
        if len(prompts) < self.n:
            log.warning("anchors: %d harmful prompts given, fewer than n_anchors=%d; using all", len(prompts), self.n)
        if self.y_ref is None:
            if self.max_new_tokens > 0:
                settings = GenSettings.from_eval(  # the one way every verb decodes (eval.* sampling settings)
                    ctx.cfg.eval,
                    system_prompt=ctx.system_prompt,
                    max_new_tokens=self.max_new_tokens,
                    precision=ctx.cfg.train.precision,
                )
                with ctx.reference() as ref:
                    self.y_ref = generate(ref, ctx.tokenizer, prompts, settings, desc="anchors: reference answers")
            else:
                self.y_ref = []
        if self.y_ref and len(self.y_ref) != len(prompts):
            raise RuntimeError(f"checkpoint holds {len(self.y_ref)} anchor answers for {len(prompts)} prompts")
        answers = self.y_ref or [None] * len(prompts)
        examples = [Example(str(i), p, y, "anchor") for i, (p, y) in enumerate(zip(prompts, answers, strict=True))]
        self.rows = ctx.render(examples)
        if self.batch_size is not None:
            self._stream = ctx.stream(self.stream_name, self.rows, self.batch_size)
        return self.rows

    def next(self) -> list[Rendered]:
        """This micro-batch's anchor rows."""
        if self._stream is not None:
            return self._stream.next()
        assert self.rows, "AnchorSet.build(ctx) runs in setup"
        return self.rows


# ----------------------------------------------------------------------------- the protocol


@dataclass
class Segment:
    """One sequence a part wants run: token ids (n,), optionally with input embeddings of its own (n, d).

    Packed, a segment of ids reads the chat template's prefix from its host task row (exact under a causal
    mask: those positions depend on nothing after them); one with its own embeddings shares nothing, since
    they are not the host's embeddings of the same tokens.
    """

    ids: torch.Tensor
    embeds: torch.Tensor | None = None

    @staticmethod
    def of(row: Rendered) -> Segment:
        return Segment(torch.tensor(row.input_ids))

    @property
    def shares_prefix(self) -> bool:
        return self.embeds is None


@dataclass
class Request:
    """What a part asks of the pass that carries its segments this micro-batch."""

    segments: list[Segment]
    layers: Sequence[int] = ()  # decoder blocks whose outputs it reads (``Outputs.hidden``, 0-based)
    final: bool = False  # the unembedding input, post-norm, at every position (``Outputs.final``)
    # per segment, the positions whose logits its terms read (``Outputs.logits``); None: no logits. The
    # unembedding runs only there (``packing.forward_at``): at every position it would be ~1/5 of the pass.
    logits: Sequence[torch.Tensor] | None = None
    data: Any = None  # anything the part's ``terms`` needs back (targets, rows), handed back untouched


@dataclass
class Outputs:
    """What a part sees of the pass that ran its segments: the pass's tensors and where its segments are.

    ``final`` (B, W, d) and ``hidden`` (layer -> (B, W, d)) are the pass's full tensors, read with ``take``;
    ``logits`` (N, V) are the logits at exactly the positions the request named, segment by segment in order.
    Each is None / empty unless the part's request asked for it.
    """

    request: Request
    logits: torch.Tensor | None
    final: torch.Tensor | None
    hidden: dict[int, torch.Tensor]
    placements: list[Placement]  # one per segment of the request, in order

    def take(self, x: torch.Tensor, j: int, t: torch.Tensor | None = None) -> torch.Tensor:
        """(len(t), ...): ``x`` (B, W, ...) at positions ``t`` of segment ``j`` (default: all of them)."""
        p = self.placements[j]
        t = torch.arange(p.length) if t is None else t
        return x[p.row, p.columns(t.to(x.device))]

    def take_last(self, x: torch.Tensor) -> torch.Tensor:
        """(n_segments, ...): ``x`` at each segment's last position (where a prompt's reply starts)."""
        rows = [p.row for p in self.placements]
        cols = [p.start + p.length - p.shared - 1 for p in self.placements]
        return x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)]


class Part:
    """One anchor-style loss (one or a few named terms) computed on sequences that ride along the task pass.

    Subclasses implement ``segments`` and ``terms``; a defense may be its own single part.
    """

    # its segments carry input embeddings of their own (so they share no prefix with a host row); the setup
    # check packs its rows the same way
    own_embeddings: ClassVar[bool] = False
    # False for segments that must run in a pass of their own (e.g. the task rows themselves, attacked)
    packable: bool = True

    def segments(self, ctx: RunContext, batch: Batch, rows: list[Rendered]) -> Request:
        """The sequences to run this micro-batch (``batch``: the task batch; ``rows``: the anchor rows)."""
        raise NotImplementedError

    def terms(self, ctx: RunContext, out: Outputs) -> dict[str, torch.Tensor]:
        """Weighted loss terms (with grad) from the pass that ran this micro-batch's request."""
        raise NotImplementedError

    def after_backward(self, ctx: RunContext) -> None:
        """Called once the step's backward has run: a part that carries state across steps reads the gradients
        its segments' inputs received (SAFT's free PGD takes δ's ascent step here). Default: nothing."""


def packs(ctx: RunContext, fuse: bool, parts: Sequence[Part], rows: list[Rendered], who: str) -> bool:
    """Whether ``parts`` ride in the task forward: asked for (``fuse``), every part can, and the model passes
    ``packing.packing_works`` on ``rows`` packed as the parts will pack them (checked once, in setup)."""
    if not fuse or not parts or not all(p.packable for p in parts):
        return False
    segments = [r for _ in parts for r in rows]
    share = [not p.own_embeddings for p in parts for _ in rows]
    return packing.packing_works(ctx, segments, share=share, who=who)


def anchor_step(
    ctx: RunContext,
    batch: Batch,
    parts: Sequence[Part],
    rows: list[Rendered],
    *,
    packed: bool,
    backward: str = "once",
) -> StepOutput:
    """Task CE plus every part's terms on this micro-batch, back-propagated; the ``StepOutput`` to log.

    ``packed``: one forward of the task batch with every part's segments packed in, one backward. Otherwise
    the task forward, then each part's segments in a forward of their own, with the same terms:
    ``backward="once"`` back-propagates the sum after the last pass, ``"each"`` each pass as soon as it ran
    (the task's, then each part's), so only one pass's graph is alive at a time. Parts run in order; terms
    of the same name from several parts are added.
    """
    if backward not in BACKWARD:
        raise ValueError(f"backward must be one of {', '.join(BACKWARD)}, not {backward!r}")
    if packed:
        out = _packed_step(ctx, batch, parts, rows)
    else:
        out = _separate_step(ctx, batch, parts, rows, backward)
    for part in parts:
        part.after_backward(ctx)
    return out


def _separate_step(
    ctx: RunContext, batch: Batch, parts: Sequence[Part], rows: list[Rendered], backward: str
) -> StepOutput:
    task = ctx.forward(batch).loss  # the task's own pass: exactly SFT's
    if backward == "once":
        terms = {"task": task}
        for part in parts:
            _add(terms, terms_alone(ctx, part, batch, rows))
        return backward_terms(ctx, terms)
    ctx.backward(task)
    terms = {"task": task.detach().float()}
    for part in parts:
        got = terms_alone(ctx, part, batch, rows)
        ctx.backward(_total(got))
        _add(terms, {k: v.detach().float() for k, v in got.items()})
    return StepOutput(_total(terms), terms)


def terms_alone(ctx: RunContext, part: Part, batch: Batch, rows: list[Rendered]) -> dict[str, torch.Tensor]:
    """A part's terms from its segments in a forward of their own (no backward)."""
    return part.terms(ctx, forward_alone(ctx, part.segments(ctx, batch, rows)))


def forward_alone(ctx: RunContext, request: Request, model: nn.Module | None = None) -> Outputs:
    """Run ``request``'s segments as one right-padded batch through ``model`` (default: θ), with its captures.

    Also the way to compute a part's reference quantities in setup: the same request, ``model`` the reference.
    """
    net = ctx.unwrapped if model is None else model
    segs = request.segments
    lengths = [len(s.ids) for s in segs]
    ids = torch.full((len(segs), max(lengths)), ctx.tokenizer.pad_token_id, dtype=torch.long, device=ctx.device)
    mask = torch.zeros_like(ids)
    for i, (s, n) in enumerate(zip(segs, lengths, strict=True)):
        ids[i, :n], mask[i, :n] = s.ids.to(ctx.device), 1
    inputs: Batch = {"attention_mask": mask}
    if any(s.embeds is not None for s in segs):
        x = net.get_input_embeddings()(ids)  # a fresh tensor: writing rows into it is safe under autograd
        for i, (s, n) in enumerate(zip(segs, lengths, strict=True)):
            if s.embeds is not None:
                x[i, :n] = s.embeds.to(x.dtype)
        inputs["inputs_embeds"] = x
    else:
        inputs["input_ids"] = ids
    placements = [Placement(i, 0, 0, n) for i, n in enumerate(lengths)]
    at_rows, at_cols = _logit_positions(request, placements, ctx.device)
    with _captured(net, request.layers) as hidden:
        logits, final = packing.forward_at(ctx, inputs, at_rows, at_cols, model=model)
    return Outputs(
        request, logits if request.logits is not None else None, final if request.final else None, hidden, placements
    )


# ----------------------------------------------------------------------------- internals


def _packed_step(ctx: RunContext, batch: Batch, parts: Sequence[Part], rows: list[Rendered]) -> StepOutput:
    model = ctx.unwrapped
    requests = [part.segments(ctx, batch, rows) for part in parts]
    for part, req in zip(parts, requests, strict=True):
        if any(s.shares_prefix == part.own_embeddings for s in req.segments):
            raise ValueError(f"{type(part).__name__}: own_embeddings={part.own_embeddings} but its segments differ")
    segs = [s for req in requests for s in req.segments]
    packed = packing.pack(
        batch,
        [s.ids for s in segs],
        pad_id=ctx.tokenizer.pad_token_id,
        share=[s.shares_prefix for s in segs],
        fmt=packing.attention_format(model),
        embed=model.get_input_embeddings(),
        segment_embeds=[s.embeds for s in segs],
    )
    layers = sorted({i for req in requests for i in req.layers})
    # logits at every task position (what SFT's own step unembeds: the task CE is computed as SFT computes
    # it), then only at the positions each part asked for, in order
    n_task, width = batch["input_ids"].shape
    grid = torch.arange(n_task * width, device=ctx.device)
    at = [(grid // width, grid % width)]
    first = 0
    for req in requests:
        at.append(_logit_positions(req, packed.placements[first : first + len(req.segments)], ctx.device))
        first += len(req.segments)
    at_rows, at_cols = (torch.cat(x) for x in zip(*at, strict=True))
    with _captured(model, layers) as hidden:
        logits, final = packing.forward_at(ctx, packed.batch, at_rows, at_cols)
    terms = {"task": packing.causal_lm_loss(logits[: len(grid)].view(n_task, width, -1), batch["labels"])}
    first, start = 0, len(grid)
    for part, req, (r, _) in zip(parts, requests, at[1:], strict=True):
        where = packed.placements[first : first + len(req.segments)]
        mine = logits[start : start + len(r)] if req.logits is not None else None
        _add(terms, part.terms(ctx, Outputs(req, mine, final if req.final else None, hidden, where)))
        first, start = first + len(req.segments), start + len(r)
    return backward_terms(ctx, terms)


def _logit_positions(
    request: Request, placements: Sequence[Placement], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) in the pass of the positions ``request.logits`` names, segment by segment."""
    rows, cols = [torch.zeros(0, dtype=torch.long, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    if request.logits is not None:
        if len(request.logits) != len(placements):
            raise ValueError(f"a request names logit positions for {len(request.logits)} of {len(placements)} segments")
        for p, t in zip(placements, request.logits, strict=True):
            t = t.to(device)
            rows.append(torch.full_like(t, p.row))
            cols.append(p.columns(t))
    return torch.cat(rows), torch.cat(cols)


@contextlib.contextmanager
def _captured(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    if not layers:
        yield {}
        return
    with capture(model, list(layers)) as hidden:
        yield hidden


def _add(terms: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    if "task" in new:
        raise ValueError("a part's loss term cannot be named 'task' (the task CE's name)")
    for k, v in new.items():
        terms[k] = terms[k] + v if k in terms else v


def _total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in terms.values()]).sum()
