"""What a defense sees of a run: ``RunContext`` (model, reference, counted passes, aux data and streams).

This module is the defense API. Methods import it, never the loop (``safeft.train``), so the loop can change
without touching a defense and a defense can be written from this file and ``methods/base.py`` alone.

Every forward and backward a defense runs goes through ``ctx.forward`` / ``ctx.backward`` / ``ctx.grad``,
which count passes and token positions, so each run reports its real cost. ``ctx.step`` is the number of
optimizer steps completed; ``ctx.micro`` the index of the micro-batch within the current optimizer step and
``ctx.last_micro`` whether it is the last one, so a defense that updates its own state once per optimizer
step (SAP's probe) needs no counter of its own.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft import config as C
from safeft import models
from safeft.data.chat import Rendered, collate, render
from safeft.data.types import Example


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps process-wide state; a second run in the same process (tests, the demo's several
    # stages) may ask for another precision, so start from a clean state each time.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")


class Stream:
    """An endless, deterministic stream of micro-batches over ``rows``.

    Epoch e is a permutation seeded by (seed, e); the stream is the concatenation of epochs, cut into
    consecutive chunks, so no row is ever dropped and the whole state is one integer (the position).
    """

    def __init__(self, rows: list[Rendered], batch_size: int, seed: int, name: str = "task") -> None:
        if not rows:
            raise ValueError(f"data stream {name!r} is empty")
        self.rows, self.batch_size, self.seed, self.name = rows, batch_size, seed, name
        self.pos = 0
        self._perm_epoch, self._perm = -1, []

    def _at(self, p: int) -> Rendered:
        epoch, i = divmod(p, len(self.rows))
        if epoch != self._perm_epoch:
            self._perm = list(range(len(self.rows)))
            random.Random(f"{self.name}-{self.seed}-{epoch}").shuffle(self._perm)
            self._perm_epoch = epoch
        return self.rows[self._perm[i]]

    def next(self) -> list[Rendered]:
        out = [self._at(self.pos + k) for k in range(self.batch_size)]
        self.pos += self.batch_size
        return out


@dataclass
class RunContext:
    """What a defense sees: the model, its reference, aux data, streams, pass counters, the step."""

    accelerator: Any
    model: nn.Module
    tokenizer: Any
    cfg: C.RunConfig
    run_dir: Path
    aux: dict[str, list[Example]] = field(default_factory=dict)
    step: int = 0  # optimizer steps completed
    micro: int = 0  # index of the current micro-batch within its optimizer step (0 .. grad_accum - 1)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    positions: int = 0  # token positions (padding included) run through forward passes this step
    streams: dict[str, Stream] = field(default_factory=dict)
    task_rows: list[Rendered] = field(default_factory=list)  # the rendered task data (e.g. for probe sets)
    # aux stream positions read from a checkpoint, applied as the defense (re)creates its streams in setup
    resume_streams: dict[str, int] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> nn.Module:
        """The model without accelerate's wrapper (DDP and the like): for hooks, embeddings, parameters."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.model.system_prompt

    @property
    def last_micro(self) -> bool:
        """True on the micro-batch after which the optimizer steps."""
        return self.micro == self.cfg.train.grad_accum - 1

    def count(self, kind: str, positions: int = 0) -> None:
        """Count a pass run outside ``forward``/``backward`` (e.g. inside a library call)."""
        self.passes[kind] += 1
        self.positions += positions

    def forward(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None, *, autocast: bool = True, **kw):
        """A counted forward pass, under the run's autocast unless ``autocast=False`` (fp32 passes such as
        a Fisher estimate, whose squared bf16 gradients would underflow). Non-tensor keys are ignored."""
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        x = inputs.get("input_ids", inputs.get("inputs_embeds"))
        # what a pass costs grows with its positions, padding included, not with its count
        self.count("forward", 0 if x is None else x.shape[0] * x.shape[1])
        net = model or self.model
        if autocast:
            with self.accelerator.autocast():
                return net(**inputs, **kw)
        device_type = (x.device.type if x is not None else self.device.type) or "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return net(**inputs, **kw)

    def backward(self, loss: torch.Tensor, **kw: Any) -> None:
        """A counted backward pass, scaled for gradient accumulation."""
        self.count("backward")
        self.accelerator.backward(loss / self.cfg.train.grad_accum, **kw)

    def grad(self, loss: torch.Tensor, inputs, **kw: Any) -> tuple[torch.Tensor, ...]:
        """A counted backward pass that returns gradients instead of accumulating them into ``.grad``.

        For auxiliary gradients (an adversarial perturbation, a probe direction) that must never reach the
        optimizer. Not scaled for gradient accumulation: callers use these as directions.
        """
        self.count("backward")
        return torch.autograd.grad(loss, inputs, **kw)

    def reference(self) -> AbstractContextManager[nn.Module]:
        """The frozen aligned reference (adapter disabled under LoRA, a frozen copy under full FT), no grad."""
        return models.reference(self.unwrapped)

    def batch(self, rows: list[Rendered], side: str = "right") -> dict[str, torch.Tensor]:
        out = collate(rows, self.tokenizer.pad_token_id, side)
        return {k: v.to(self.device) for k, v in out.items()}

    def render(self, examples: list[Example], max_length: int | None = None) -> list[Rendered]:
        ml = max_length or (self.cfg.data.max_length if self.cfg.data else None)
        return [render(self.tokenizer, ex, self.system_prompt, ml) for ex in examples]

    def aux_data(self, name: str) -> list[Example]:
        if name not in self.aux or not self.aux[name]:
            raise KeyError(f"this defense needs aux data {name!r}; the run provides {sorted(self.aux)}")
        return self.aux[name]

    def stream(self, name: str, rows: list[Rendered], batch_size: int) -> Stream:
        """A named aux stream whose position the loop checkpoints, so defenses resume exactly."""
        if name not in self.streams:
            self.streams[name] = Stream(rows, batch_size, self.cfg.train.seed, name)
        return self.streams[name]

    def restore_streams(self) -> None:
        """After setup: put every aux stream back where the checkpoint had it (a draw setup made from a
        stream is thereby undone, as on the uninterrupted run, whose setup drew the same)."""
        for name, pos in self.resume_streams.items():
            if name not in self.streams:
                raise RuntimeError(f"checkpoint has aux stream {name!r} that the defense did not create in setup")
            self.streams[name].pos = pos
