"""What a defense sees of a run: ``RunContext`` (model, reference, counted passes, aux data and streams).

This module is the defense API. Methods import it, never the loop (``safeft.train``), so the loop can change
without touching a defense and a defense can be written from this file and ``methods/base.py`` alone.

Every forward and backward a defense runs goes through ``ctx.forward`` / ``ctx.backward`` / ``ctx.grad``,
which count passes and token positions, so each run reports its real cost. ``ctx.step`` is the number of
optimizer steps completed; ``ctx.micro`` the index of the micro-batch within the current optimizer step and
``ctx.last_micro`` whether it is the last one, so a defense that updates its own state once per optimizer
step (SAP's probe) needs no counter of its own.

Under data parallelism (``accelerate launch`` with several processes) every process runs this same code on
its own slice of each global batch: streams are sharded by rank (``Stream``), ``ctx.rank`` /
``ctx.processes`` / ``ctx.is_main`` say where a process stands, ``reduce_mean`` and ``fingerprints`` are the
collectives the loop uses to log one number per step and to check that every process holds the same
caches (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import zlib
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
from safeft.devices import default_device


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps process-wide state; a second run in the same process (tests, the demo's several
    # stages) may ask for another precision, so start from a clean state each time (the process group of
    # a multi-process launch survives this: only accelerate's bookkeeping is reset).
    AcceleratorState._reset_state(reset_partial_state=True)
    rule = default_device()
    if rule.type == "cuda" and rule.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(rule)  # one process: SAFEFT_DEVICE=cuda:1 trains on GPU 1 (a launcher sets its own)
    return Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        # the placement rule (safeft.devices): SAFEFT_DEVICE=cpu keeps training off a GPU too
        cpu=rule.type == "cpu",
        # The loop steps the scheduler once per optimizer step, and train.steps counts optimizer steps. By
        # default accelerate's prepared scheduler steps num_processes times per call (it assumes a schedule
        # written for one process's batches), which ran the LR schedule P times too fast.
        step_scheduler_with_optimizer=False,
    )


# Settings a defense may be unable to honour (``Defense.unsupported``), as the loop detects them.
FEATURES = {
    "processes": "data parallelism over more than one process",
    "fsdp": "FSDP (parameters sharded across processes)",
    "deepspeed": "DeepSpeed ZeRO (optimizer state, gradients or parameters sharded; the engine steps in backward)",
    "gradient_checkpointing": "model.gradient_checkpointing=true",
}


def run_features(accelerator, cfg: C.RunConfig) -> list[str]:
    """The keys of ``FEATURES`` this run uses."""
    from accelerate.utils import DistributedType

    out = []
    if accelerator.num_processes > 1:
        out.append("processes")
    if accelerator.distributed_type == DistributedType.FSDP:
        out.append("fsdp")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        out.append("deepspeed")
    if cfg.model.gradient_checkpointing:
        out.append("gradient_checkpointing")
    return out


def check_supported(defense, features: list[str]) -> None:
    """Refuse, before anything is written, a run setting the defense declares it cannot honour."""
    unknown = sorted(set(defense.unsupported) - set(FEATURES))
    if unknown:  # a typo in a method's declaration must not silently allow what it meant to refuse
        raise RuntimeError(f"defense {defense.name!r} declares unknown features {unknown}; known: {sorted(FEATURES)}")
    for f in features:
        if f in defense.unsupported:
            raise C.ConfigError(f"defense {defense.name!r} cannot run with {FEATURES[f]}: {defense.unsupported[f]}")


def is_main_process() -> bool:
    """Whether this process writes, usable before an accelerator exists: rank 0 of a ``torchrun`` /
    ``accelerate launch`` (they set RANK), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of a multi-process launch (nothing to wait for otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shards_parameters(accelerator) -> bool:
    """True under engines that keep parameters sharded outside their own forward (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def broadcast(accelerator, obj: Any) -> Any:
    """The main process's ``obj`` on every process (a picklable value)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(accelerator, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


class Stream:
    """An endless, deterministic stream of micro-batches over ``rows``.

    Epoch e is a permutation seeded by (seed, e); the stream is the concatenation of epochs, cut into
    consecutive chunks, so no row is ever dropped and the whole state is one integer (the position).

    Sharded by rank under data parallelism: each call of ``next`` consumes ``batch_size x processes`` rows
    of the global order, and process ``rank`` takes the ``rank``-th slice of them. ``pos`` is that global
    position, the same on every process, so it stays the whole state and a checkpoint holds it once. With
    one process this is the unsharded stream; P processes at accumulation A see, slice for slice, what one
    process sees at accumulation P x A (micro-batch m of rank r = chunk m x P + r).
    """

    def __init__(
        self, rows: list[Rendered], batch_size: int, seed: int, name: str = "task", rank: int = 0, processes: int = 1
    ) -> None:
        if not rows:
            raise ValueError(f"data stream {name!r} is empty")
        if not 0 <= rank < processes:
            raise ValueError(f"data stream {name!r}: rank {rank} is not in 0..{processes - 1}")
        self.rows, self.batch_size, self.seed, self.name = rows, batch_size, seed, name
        self.rank, self.processes = rank, processes
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
        start = self.pos + self.rank * self.batch_size
        out = [self._at(start + k) for k in range(self.batch_size)]
        self.pos += self.batch_size * self.processes
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
    def rank(self) -> int:
        """This process's index under data parallelism (0 with one process)."""
        return self.accelerator.process_index

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        """The one process that writes the run directory (logs, checkpoints, evaluations)."""
        return self.accelerator.is_main_process

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over processes (one collective for the dict); every process gets the result.

        Every process must pass the same keys: they come from the same code path on each.
        """
        if self.processes == 1 or not values:
            return dict(values)
        keys = sorted(values)
        # a checksum of the key names rides along: processes that logged different terms must not be mixed
        names = float(zlib.crc32("|".join(keys).encode()))
        t = torch.tensor([float(values[k]) for k in keys] + [names], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum") / self.processes
        if t[-1].item() != names:
            raise RuntimeError(f"processes logged different loss terms or diagnostics this step (here: {keys})")
        return dict(zip(keys, t[:-1].tolist(), strict=True))

    def micro_sync(self, last: bool) -> AbstractContextManager:
        """The context of one micro-batch: gradients are reduced across processes only on the ``last`` one.

        Correct either way (DDP averages the accumulated gradient, and averaging is linear); skipping the
        all-reduce on earlier micro-batches saves P-1 of them per step. Under DeepSpeed it also tells the
        engine where the accumulation ends, since accelerate's backward steps the engine there.
        """
        self.accelerator.gradient_state._set_sync_gradients(last)
        if last or self.processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

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
        emb = inputs.get("inputs_embeds")
        if emb is not None and emb.is_floating_point():
            # Embeddings built outside the model (SAFT's emb + δ, kept in fp32) enter in the dtype the model
            # holds its weights in (model.dtype=bf16/fp16): a no-op for fp32 weights, and under autocast the
            # first matmul would round them the same way.
            want = self.unwrapped.get_input_embeddings().weight.dtype
            if emb.dtype != want:
                inputs["inputs_embeds"] = emb.to(want)
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
        """The frozen aligned reference (adapter disabled under LoRA, a frozen copy under full FT), no grad.

        Under FSDP / DeepSpeed the LoRA reference is run through the engine's wrapper (its adapters disabled
        on the module inside), since only the wrapper gathers the sharded weights for a forward.
        """
        if models.is_lora(self.unwrapped) and shards_parameters(self.accelerator):
            return _through_wrapper(models.reference(self.unwrapped), self.model)
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
            self.streams[name] = Stream(
                rows, batch_size, self.cfg.train.seed, name, rank=self.rank, processes=self.processes
            )
        return self.streams[name]

    def restore_streams(self) -> None:
        """After setup: put every aux stream back where the checkpoint had it (a draw setup made from a
        stream is thereby undone, as on the uninterrupted run, whose setup drew the same)."""
        for name, pos in self.resume_streams.items():
            if name not in self.streams:
                raise RuntimeError(f"checkpoint has aux stream {name!r} that the defense did not create in setup")
            self.streams[name].pos = pos


@contextlib.contextmanager
def _through_wrapper(inner: AbstractContextManager[nn.Module], wrapper: nn.Module):
    with inner:
        yield wrapper


# ----------------------------------------------------------------------------- consistency across processes


def fingerprint(obj: Any, _depth: int = 0, _seen: set[int] | None = None) -> Any:
    """A small comparable summary of ``obj``: tensors become (shape, dtype, sum, sum of squares) in fp64;
    numbers, strings, lists and dicts stay as they are; safeft objects (a defense, its anchor sets, their
    streams) are summarised by their attributes. Modules, optimizers and other foreign objects are skipped.
    """
    seen = _seen if _seen is not None else set()
    if isinstance(obj, Stream):  # its rank differs by design; the shared state is the position
        return ("stream", obj.name, obj.pos, obj.batch_size, len(obj.rows))
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1)
        s = q = 0.0
        for chunk in t.split(1 << 22):  # fp64 a chunk at a time: an embedding matrix is never copied whole
            c = chunk.to(torch.float64)
            s, q = s + float(c.sum()), q + float(c.square().sum())
        return ("tensor", tuple(obj.shape), str(obj.dtype), s, q)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if _depth > 6 or id(obj) in seen or isinstance(obj, nn.Module | torch.optim.Optimizer):
        return None
    seen.add(id(obj))
    if isinstance(obj, list | tuple):
        return [fingerprint(x, _depth + 1, seen) for x in obj]
    if isinstance(obj, dict):
        return {str(k): fingerprint(v, _depth + 1, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if type(obj).__module__.startswith("safeft") and hasattr(obj, "__dict__"):
        return {k: fingerprint(v, _depth + 1, seen) for k, v in sorted(vars(obj).items()) if k != "cfg"}
    return None


def first_difference(a: Any, b: Any, path: str = "", rel: float = 1e-4) -> str | None:
    """Where fingerprints ``a`` and ``b`` differ (None if they agree); floats within ``rel`` count as equal,
    since two GPUs may reduce a sum in a different order."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path or '.'}: keys {sorted(set(a) ^ set(b))}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{path}.{k}", rel))), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        pairs = enumerate(zip(a, b, strict=True))
        return next((d for i, (x, y) in pairs if (d := first_difference(x, y, f"{path}[{i}]", rel))), None)
    if isinstance(a, float) and isinstance(b, float):
        same = math.isclose(a, b, rel_tol=rel, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
        return None if same else f"{path}: {a!r} vs {b!r}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def check_same_on_every_process(ctx: RunContext, what: str, obj: Any) -> None:
    """Raise when ``obj`` (a defense, the trainable weights) is not the same on every process.

    Each process computes its defense's caches itself, from the same weights and data; this is the check
    that they agree (a nondeterministic kernel, a rank-dependent draw or a per-process update would show).
    """
    if ctx.processes == 1:
        return
    prints = gather(ctx.accelerator, fingerprint(obj))
    for r in range(1, len(prints)):
        diff = first_difference(prints[0], prints[r])
        if diff is not None:
            raise RuntimeError(f"{what} differs between process 0 and process {r} at {diff}")
