"""Run a defense's extra sequences inside the task forward: one wider pass instead of a second small one.

On a CPU (and on a GPU at small batch) a forward + backward of a handful of short anchor prompts costs
far more than their tokens: every pass pays the same per-layer dispatch, autocast casts and LoRA
bookkeeping. So a defense that anchors a few prompts per step (SBR, RepAnchor, SAFT's outer pass) is
cheaper if its prompts ride along in the task batch. ``pack`` lays them out in the padding of the task
rows (widening the batch, or adding rows, only as much as needed) and builds a 4-D attention mask under
which every sequence sees exactly what it would see alone:

* a task row attends causally to itself, as in a plain right-padded batch;
* a segment attends causally to itself and, when it shares a prefix with its host row (the chat
  template's system prompt and user header), to the host's first ``shared`` positions instead of a copy
  of them. Under a causal mask those positions' states do not depend on anything after them, so they are
  the states the segment's own prefix would have; its position ids continue from ``shared``;
* padding attends to itself only (a fully masked row would give NaN in some kernels).

Labels are the task's at host positions and ignored elsewhere, so the task CE is the same sum over the
same tokens. Everything is exact in real arithmetic; in floating point the kernels see other shapes, so
results match a plain pass to rounding (fp32 ~1e-6). ``packing_works`` measures that on the real model before a
defense relies on it: an architecture that ignores a custom 4-D mask or explicit position ids fails the
check, and the defense then runs its anchors in a separate pass (same objective, slower) and says so.

``forward_at`` is the other half of a cheap pass: the unembedding (d x vocabulary, ~1/5 of SmolLM2-135M's
forward per position, plus the fp32 softmax over the vocabulary behind it) runs only at the positions a
loss reads: SAFT's KL positions, none of SBR's or RepAnchor's anchor positions, every task position for the
task CE (as SFT's own step does, so a ratio to SFT measures what a defense adds). The model's own forward
still runs (final-logit soft-capping and the like apply); its output embeddings just receive the gathered
states. ``task_loss`` is the task CE unembedded at the response positions only (for a defense's extra
passes): the mean over the same tokens as transformers' loss, the same value and gradient to rounding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safeft.data.chat import IGNORE
from safeft.hooks import eval_mode, hooked, unembedding_input
from safeft.models import ModelError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# attention implementations whose custom 4-D mask format we build (transformers passes a 4-D mask through
# unchanged): SDPA takes a boolean "may attend" mask, eager an additive float mask.
MASK_FORMATS = ("sdpa", "eager")


@dataclass(frozen=True)
class Placement:
    """Where segment positions live in the packed batch: positions < ``shared`` are the host row's own
    (identical tokens), the rest start at column ``start``."""

    row: int
    start: int
    shared: int
    length: int  # the segment's full length, shared prefix included

    def columns(self, t: torch.Tensor) -> torch.Tensor:
        """Packed columns of segment positions ``t`` (a LongTensor of indices into the segment)."""
        return torch.where(t < self.shared, t, self.start + t - self.shared)


@dataclass
class Packed:
    batch: Batch  # input_ids or inputs_embeds, attention_mask (B, 1, W, W), position_ids, labels
    placements: list[Placement]
    n_task: int  # the first n_task rows are the task batch's rows, in order

    def take(self, x: torch.Tensor, segment: int, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` (B, W, ...) at positions ``t`` of ``segment``."""
        p = self.placements[segment]
        return x[p.row, p.columns(t.to(x.device))]

    def take_last(self, x: torch.Tensor) -> torch.Tensor:
        """(n_segments, ...) ``x`` at each segment's last position (where a prompt's reply starts)."""
        rows = [p.row for p in self.placements]
        cols = [p.start + p.length - p.shared - 1 for p in self.placements]
        return x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)]


def attention_format(model: nn.Module) -> str | None:
    """The mask format ``pack`` must build for ``model``, or None if its attention takes no custom 4-D mask."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if impl in MASK_FORMATS else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _place(lengths: list[int], seg_len: list[int], shared: list[list[int]], width: int, extra: int):
    """Best-fit placement of segments at a given width and number of extra (empty) rows, or None.

    ``shared[j][r]`` is how many leading tokens segment j may read from task row r.
    """
    used = list(lengths) + [0] * extra
    placements: list[Placement | None] = [None] * len(seg_len)
    for j in sorted(range(len(seg_len)), key=lambda j: -seg_len[j]):
        best = None
        for r in range(len(used)):
            c = shared[j][r] if r < len(lengths) else 0
            own = seg_len[j] - c
            left = width - used[r] - own
            # fewest own tokens first (most sharing), then the tightest fit
            if left >= 0 and (best is None or (own, left) < (best[0], best[1])):
                best = (own, left, r, c)
        if best is None:
            return None
        own, _, r, c = best
        placements[j] = Placement(r, used[r], c, seg_len[j])
        used[r] += own
    return placements


def layout(
    lengths: list[int], hosts: list[list[int]], segs: list[list[int]], share: Sequence[bool], width: int
) -> tuple[list[Placement], int, int]:
    """(placements, width, extra rows) with the fewest packed positions (rows x width), by best fit."""
    seg_len = [len(s) for s in segs]
    # at least the last token is the segment's own: its state is what a defense reads
    shared = [[min(_common_prefix(h, s), len(s) - 1) if share[j] else 0 for h in hosts] for j, s in enumerate(segs)]
    best = None
    for extra in range(len(segs) + 1):
        rows = len(lengths) + extra
        need = sum(lengths) + sum(n - max(c, default=0) for n, c in zip(seg_len, shared, strict=True))
        w = max(width, -(-need // rows))  # a lower bound: every row full
        while (placements := _place(lengths, seg_len, shared, w, extra)) is None:
            w += 1
        cost = rows * w
        if best is None or cost < best[0]:
            best = (cost, placements, w, extra)
        if w == width:  # it fits in the padding: an extra row can only add positions
            break
    assert best is not None
    return best[1], best[2], best[3]


def pack(
    task: Batch,
    segments: Sequence[torch.Tensor],
    *,
    pad_id: int,
    share: Sequence[bool] | bool = True,
    fmt: str = "sdpa",
    embed: nn.Module | None = None,
    segment_embeds: Sequence[torch.Tensor | None] | None = None,
) -> Packed:
    """Pack the 1-D token id tensors ``segments`` into the right-padded task batch.

    ``share[j]`` lets segment j read a shared prefix from its host row. With ``segment_embeds`` (one
    (n_j, d) tensor or None per segment; e.g. embeddings plus an adversarial δ) the packed batch carries
    ``inputs_embeds`` built with ``embed`` (the model's input embeddings) and those rows written in; a
    segment with its own embeddings must not share (its prefix differs from the host's).
    """
    if fmt not in MASK_FORMATS:
        raise ValueError(f"no custom 4-D attention mask format for attention implementation {fmt!r}")
    mask2d = task["attention_mask"]
    lengths = mask2d.sum(1).tolist()
    if not all(bool(mask2d[i, :n].all()) for i, n in enumerate(lengths)):
        raise ValueError("pack() needs a right-padded task batch (real tokens first in every row)")
    n_seg = len(segments)
    share = [share] * n_seg if isinstance(share, bool) else list(share)
    embeds = list(segment_embeds) if segment_embeds is not None else [None] * n_seg
    if any(e is not None and s for e, s in zip(embeds, share, strict=True)):
        raise ValueError("a segment with its own input embeddings cannot share its host's prefix")
    ids = task["input_ids"]
    hosts = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    segs = [s.tolist() for s in segments]
    placements, width, extra = layout(lengths, hosts, segs, share, ids.shape[1])

    b, dev = len(lengths) + extra, ids.device
    out_ids = torch.full((b, width), pad_id, dtype=ids.dtype, device=dev)
    labels = torch.full((b, width), IGNORE, dtype=torch.long, device=dev)
    pos = torch.zeros((b, width), dtype=torch.long, device=dev)
    allow = torch.zeros((b, width, width), dtype=torch.bool, device=dev)
    for i, n in enumerate(lengths):
        out_ids[i, :n] = ids[i, :n]
        labels[i, :n] = task["labels"][i, :n]
        pos[i, :n] = torch.arange(n, device=dev)
        allow[i, :n, :n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    for p, seg in zip(placements, segments, strict=True):
        own = p.length - p.shared
        cols = slice(p.start, p.start + own)
        out_ids[p.row, cols] = seg[p.shared :].to(dev)
        pos[p.row, cols] = torch.arange(p.shared, p.length, device=dev)
        allow[p.row, cols, : p.shared] = True
        allow[p.row, cols, cols] = torch.ones(own, own, dtype=torch.bool, device=dev).tril()
    idle = ~allow.any(-1)  # padding: attend to itself
    allow |= torch.diag_embed(idle)
    allow = allow.unsqueeze(1)
    if fmt == "eager":
        attn = torch.zeros(allow.shape, dtype=torch.float32, device=dev)
        attn = attn.masked_fill(~allow, torch.finfo(torch.float32).min)
    else:
        attn = allow
    batch: Batch = {"attention_mask": attn, "position_ids": pos, "labels": labels}
    if any(e is not None for e in embeds):
        if embed is None:
            raise ValueError("segment_embeds needs embed (the model's input embeddings)")
        x = embed(out_ids)  # a fresh tensor: writing the segments' rows into it is safe under autograd
        for p, e in zip(placements, embeds, strict=True):
            if e is not None:
                x[p.row, p.start : p.start + p.length] = e.to(x.dtype)
        batch["inputs_embeds"] = x
    else:
        batch["input_ids"] = out_ids
    return Packed(batch, placements, len(lengths))


# ----------------------------------------------------------------------------- logits only where a loss reads them


@contextlib.contextmanager
def unembedding_at(
    model: nn.Module, rows: torch.Tensor, cols: torch.Tensor, shape: Sequence[int]
) -> Iterator[list[torch.Tensor]]:
    """Inside the block, ``model``'s output embeddings run only at positions ``(rows[i], cols[i])`` of their
    (B, W, d) input, (B, W) = ``shape``: a forward returns logits (N, V) in that order instead of (B, W, V).
    Yields the full inputs the output embeddings received (the final, post-norm states), one per call. An
    input of another shape (a model that unembeds only some positions) passes untouched, for the caller to see.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "its logits cannot be restricted to the positions a loss reads"
        )
    seen: list[torch.Tensor] = []

    def make(_key: Any):
        def gather(_module: nn.Module, args: tuple) -> tuple | None:
            h = args[0]
            seen.append(h)
            if tuple(h.shape[:2]) != tuple(shape):
                return None
            return (h[rows.to(h.device), cols.to(h.device)], *args[1:])

        return gather

    with hooked([head], make, pre=True):
        yield seen


def forward_at(
    ctx, batch: Batch, rows: torch.Tensor, cols: torch.Tensor, model: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A counted forward of ``batch`` (labels ignored: no loss is computed) through ``model`` (default θ)
    whose unembedding runs only at ``(rows, cols)``: (logits (N, V) at those positions, in that order; the
    final states (B, W, d) at every position). Raises where the model unembeds otherwise (e.g. only the last
    position, or not through its output embeddings), since the logits would then belong to other positions.
    """
    net = ctx.unwrapped if model is None else ctx.accelerator.unwrap_model(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    x = inputs.get("input_ids", inputs.get("inputs_embeds"))
    with unembedding_at(net, rows, cols, x.shape[:2]) as seen:
        out = ctx.forward(inputs, model=model)
    if len(seen) != 1:
        raise ModelError(f"the output embeddings ran {len(seen)} times in one forward; expected exactly once")
    logits = out.logits
    if seen[0].shape[:2] != x.shape[:2] or logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ModelError(
            f"{type(net).__name__} unembedded hidden states of shape {tuple(seen[0].shape)} into logits of shape "
            f"{tuple(logits.shape)} for a batch of {tuple(x.shape[:2])}; restricting the logits to {len(rows)} "
            "positions needs every position to reach the output embeddings"
        )
    return logits, seen[0]


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets): the positions whose logits predict a label (column t scores label t + 1),
    row-major (the order of ``logits[:, :-1][labels[:, 1:] != IGNORE]``), and those labels."""
    nxt = labels[:, 1:]
    rows, cols = torch.nonzero(nxt != IGNORE, as_tuple=True)
    return rows, cols, nxt[rows, cols]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss exactly as transformers computes it from logits (B, T, V) at every position (fp32,
    labels shifted by one, mean over the labelled tokens): the same numbers as ``model(**batch).loss``."""
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE)


def task_loss(ctx, batch: Batch, model: nn.Module | None = None) -> torch.Tensor:
    """``ctx.forward(batch).loss`` with the unembedding run only at the response positions, through ``model``
    (default θ): the same mean over the same tokens, so the same value and gradient to rounding. For a
    defense's extra passes (SAP's pass at W + ΔW); the task's own CE is computed as SFT computes it."""
    rows, cols, targets = label_positions(batch["labels"])
    return F.cross_entropy(forward_at(ctx, batch, rows, cols, model)[0].float(), targets)


@contextlib.contextmanager
def _no_grad(model: nn.Module) -> Iterator[nn.Module]:
    # eval mode too: dropout (LoRA's) would make the packed and the plain pass differ by more than rounding
    with torch.no_grad(), eval_mode(model):
        yield model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def tolerance(precision: str) -> float:
    """Largest relative error between a packed and a plain pass that is still float rounding.

    A mask the model ignored lets a segment attend to the task row before it: an O(1) change. bf16
    rounding differences across kernels stay near 1e-2 on the final states; fp32 near 1e-6.
    """
    return 5e-2 if precision == "bf16" else 1e-4


def packing_works(
    ctx,
    segments: Sequence,
    share: bool | Sequence[bool],
    who: str,
    hosts: Sequence | None = None,
    model: nn.Module | None = None,
) -> bool:
    """Whether packing ``segments`` (rendered rows) into ``hosts`` (default: the run's first task rows)
    reproduces plain passes.

    Checked once, in setup, on the reference (or on ``model`` without grad, e.g. θ for a defense that keeps
    no reference): the final (unembedding-input) states at every real position of the host rows and of the
    segments, packed against plain right-padded batches. Returns False, with a warning that names the reason,
    when the model cannot take a custom mask or the states disagree by more than rounding; the caller then
    keeps its separate passes.
    """
    fmt = attention_format(ctx.unwrapped)
    hosts = list(ctx.task_rows[: ctx.cfg.train.batch_size] if hosts is None else hosts)
    if fmt is None or not hosts:
        why = "no task rows to check it on" if fmt is not None else "its attention takes no custom 4-D mask"
        log.warning("%s: its extra rows run in a separate forward (%s)", who, why)
        return False
    if ctx.unwrapped.get_output_embeddings() is None:
        log.warning("%s: its extra rows run in a separate forward (no output embeddings to check at)", who)
        return False
    host = ctx.batch(hosts, "right")
    alone = ctx.batch(list(segments), "right")
    packed = pack(
        host,
        [torch.tensor(r.input_ids) for r in segments],
        pad_id=ctx.tokenizer.pad_token_id,
        share=share,
        fmt=fmt,
    )
    # the module that runs: the same network under LoRA, a frozen copy under full fine-tuning (or the one given,
    # e.g. θ for a defense without a reference)
    with ctx.reference() if model is None else _no_grad(model) as ref, unembedding_input(ref) as seen:
        for b in (packed.batch, host, alone):
            ctx.forward(b, model=ref)
    got, task, seg = (x.float() for x in seen)
    real = host["attention_mask"].bool()
    err_task = relative_error(got[: packed.n_task, : real.shape[1]][real], task[real])
    got_seg = torch.cat([packed.take(got, j, torch.arange(len(r.input_ids))) for j, r in enumerate(segments)])
    err_seg = relative_error(got_seg, seg[alone["attention_mask"].bool()])
    tol = tolerance(ctx.accelerator.mixed_precision)
    log.info("%s: packed vs plain passes: relative error %.1e (packed rows), %.1e (hosts)", who, err_seg, err_task)
    if max(err_seg, err_task) > tol:
        log.warning(
            "%s: %s does not reproduce a plain pass with rows packed into the host batch (relative error %.2g "
            "packed rows, %.2g hosts > %.0e); its extra rows run in a separate forward",
            who,
            type(ctx.unwrapped).__name__,
            err_seg,
            err_task,
            tol,
        )
        return False
    return True
