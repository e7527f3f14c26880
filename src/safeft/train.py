"""The one training loop, on HF Accelerate.

Readable top to bottom: build the model, the data stream and the defense; then for each optimizer step,
hand ``grad_accum`` micro-batches to ``defense.step`` (which does its own forward/backward passes through
``ctx``), clip, step, log every loss term, and checkpoint. The loop never looks at the defense's name.

Resume is exact: a checkpoint holds the trainable weights (adapter or full), optimizer, scheduler, every
RNG, the data position of the task stream and of every aux stream, and the defense's own state. A run
killed after step k and resumed ends with the same weights and the same metrics as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safeft import config as C
from safeft import methods, models
from safeft import precision as P
from safeft.data.aux import SERVICES, build_aux
from safeft.data.chat import Rendered, collate, render
from safeft.data.types import Example

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps process-wide state; a second run in the same process (tests, the demo's several
    # stages) may ask for another precision, so start from a clean state each time.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")


# ----------------------------------------------------------------------------- data streams


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


# ----------------------------------------------------------------------------- context


@dataclass
class RunContext:
    """What a defense sees: the model, its reference, aux data, pass counters."""

    accelerator: Any
    model: nn.Module
    tokenizer: Any
    cfg: C.RunConfig
    run_dir: Path
    aux: dict[str, list[Example]] = field(default_factory=dict)
    step: int = 0
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    positions: int = 0  # token positions (padding included) run through forward passes this step
    streams: dict[str, Stream] = field(default_factory=dict)
    task_rows: list[Rendered] = field(default_factory=list)  # the rendered task data (e.g. for probe sets)
    post_hoc_done: bool = False  # after_train has run and its result is in the final checkpoint

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.model.system_prompt

    def forward(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None, **kw: Any):
        """A counted forward pass under the run's autocast. Extra keys (e.g. ``ids``) are ignored."""
        self.passes["forward"] += 1
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        x = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if x is not None:  # what a pass costs grows with its positions, padding included, not with its count
            self.positions += x.shape[0] * x.shape[1]
        with self.accelerator.autocast():
            return (model or self.model)(**inputs, **kw)

    def backward(self, loss: torch.Tensor, **kw: Any) -> None:
        """A counted backward pass, scaled for gradient accumulation."""
        self.passes["backward"] += 1
        self.accelerator.backward(loss / self.cfg.train.grad_accum, **kw)

    def grad(self, loss: torch.Tensor, inputs, **kw: Any) -> tuple[torch.Tensor, ...]:
        """A counted backward pass that returns gradients instead of accumulating them into ``.grad``.

        For auxiliary gradients (an adversarial perturbation, a probe direction) that must never reach the
        optimizer. Not scaled for gradient accumulation: callers use these as directions.
        """
        self.passes["backward"] += 1
        return torch.autograd.grad(loss, inputs, **kw)

    def reference(self) -> AbstractContextManager[nn.Module]:
        return models.reference(self.accelerator.unwrap_model(self.model))

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


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its ``state.json`` exists)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ctx: RunContext, optimizer, scheduler, defense, task: Stream) -> Path:
    from safetensors.torch import save_file

    root = ctx.run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ctx.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    model = ctx.accelerator.unwrap_model(ctx.model)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "defense": defense.state_dict(),
        },
        tmp / "trainer.pt",
    )
    streams = {name: s.pos for name, s in ctx.streams.items()}
    state = {"step": ctx.step, "task_pos": task.pos, "streams": streams, "post_hoc_done": ctx.post_hoc_done}
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Only the newest checkpoint needs optimizer state to resume; older ones keep their weights for
    # diagnosis (CKA over training) at a third of the size.
    for old in checkpoints(ctx.run_dir)[:-1]:
        (old / "trainer.pt").unlink(missing_ok=True)
    return final


def load_trainable(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _resume(ctx: RunContext, optimizer, scheduler, defense, task: Stream, ckpt: Path) -> None:
    load_trainable(ctx.accelerator.unwrap_model(ctx.model), ckpt)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    defense.load_state_dict(trainer["defense"])
    state = json.loads((ckpt / "state.json").read_text())
    ctx.step, task.pos = state["step"], state["task_pos"]
    ctx.post_hoc_done = state.get("post_hoc_done", False)
    ctx._resume_streams = state["streams"]  # applied as defenses (re)create their streams in setup


def _truncate_metrics(path: Path, step: int) -> None:
    # Lines logged after the checkpoint we resume from will be logged again.
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------- periodic ASR


class PeriodicASR:
    """ASR on a fixed harmful subset at step 0 and every ``train.eval_every`` steps.

    Generic: it evaluates whatever model the loop trains, whatever the defense. One line per evaluation goes
    to ``evals.jsonl`` (step, asr, n, judge, max_new_tokens) and the per-sample records to
    ``eval_steps/step-N/harmful.jsonl``, so the curve can be re-scored with another judge. Prompts: the
    first ``train.eval_n_harmful`` of the HarmBench test subset the final evaluation uses (same seed), so
    the last point of the curve is comparable with (a subset of) ``safeft eval``.
    """

    def __init__(self, cfg: C.RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.path = run_dir / "evals.jsonl"
        self._items: list[Example] | None = None

    def items(self) -> list[Example]:
        if self._items is None:
            from safeft.data.splits import safety_splits
            from safeft.eval.suites import subset

            ev = self.cfg.eval
            test = subset(safety_splits(seed=ev.seed).test, ev.n_harmful, ev.seed)
            self._items = test[: self.cfg.train.eval_n_harmful]
        return self._items

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and step % every == 0

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from safeft.eval.generate import GenSettings
        from safeft.eval.suites import harmful

        ev = self.cfg.eval
        settings = GenSettings(
            ev.max_new_tokens, ev.batch_size, system_prompt=self.cfg.model.system_prompt, precision=ev.precision
        )
        out = self.run_dir / "eval_steps" / f"step-{ctx.step:06d}"
        # Greedy generation draws no random numbers, but isolate the RNG anyway: a sampled judge or a
        # future setting must not change the training trajectory.
        rng = _rng_state()
        try:
            res = harmful(ctx.accelerator.unwrap_model(ctx.model), ctx.tokenizer, self.items(), settings, ev.judge, out)
        finally:
            _set_rng_state(rng)
        line = {"step": ctx.step, **res}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return line


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    tokenizer: Any
    steps: int
    final_loss: float
    metrics: list[dict[str, Any]]


def make_run_dir(cfg: C.RunConfig) -> Path:
    run_id = cfg.run_id or f"{cfg.defense.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir) / run_id


def _load_task_examples(cfg: C.RunConfig) -> list[Example]:
    from safeft.data.sources import load_source

    if cfg.data is None:
        raise C.ConfigError("training needs data.task (e.g. data.task=domain:finance)")
    rows = load_source(cfg.data.task)
    if cfg.data.n_train is not None:
        if cfg.data.n_train > len(rows):
            raise C.ConfigError(f"data.n_train={cfg.data.n_train} but {cfg.data.task} has {len(rows)} rows")
        rows = rows[: cfg.data.n_train]
    missing = [ex.id for ex in rows if ex.response is None]
    if missing:
        raise C.ConfigError(f"{cfg.data.task}: {len(missing)} rows have no response (first: {missing[0]})")
    return rows


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _schedule(optimizer, cfg: C.TrainConfig):
    from transformers import get_scheduler

    if cfg.schedule not in ("constant", "linear", "cosine"):
        raise C.ConfigError(f"train.schedule must be constant, linear or cosine, not {cfg.schedule!r}")
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    warmup = int(round(cfg.warmup_ratio * cfg.steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps)


def train(
    cfg: C.RunConfig,
    *,
    examples: list[Example] | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    aux: dict[str, list[Example]] | None = None,
    run_dir: Path | None = None,
    resume: bool = True,
    interrupt_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``cfg.model`` on the task data with ``cfg.defense``.

    ``model``/``tokenizer`` may be passed in (tests, the demo) instead of loaded from ``cfg.model.spec``;
    the model must not have an adapter yet. ``interrupt_after`` stops after that step, as a kill would
    (tests use it to check resume).
    """
    tc = cfg.train
    # Everything that can reject bad input runs before anything is written: a bad config or data row
    # must not leave a half-made run directory behind.
    P.pick(tc.precision)
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise C.ConfigError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    if tc.eval_every < 0 or tc.eval_n_harmful < 1:
        raise C.ConfigError("train.eval_every must be >= 0 (0 = off) and train.eval_n_harmful >= 1")
    defense = methods.build(cfg.defense)
    examples = examples if examples is not None else _load_task_examples(cfg)
    # Aux data the defense declares and the caller did not pass in (the CLI path) comes from the splits.
    aux = dict(aux or {})
    missing_aux = [n for n in defense.needs if n not in aux and n not in SERVICES]
    aux.update(build_aux(missing_aux, seed=cfg.train.seed))
    # A defense may change the task data itself (safety-data mixing); still before anything is written.
    examples = defense.task_examples(examples, aux)
    run_dir = Path(run_dir) if run_dir else make_run_dir(cfg)
    _check_same_config(run_dir, cfg)
    if model is None:
        model, tokenizer = models.load(cfg.model.spec)
    max_len = cfg.data.max_length if cfg.data else None
    rows = [render(tokenizer, ex, cfg.model.system_prompt, max_len) for ex in examples]
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save(cfg, run_dir / "config.yaml")
    _seed_all(tc.seed)
    model = models.attach_lora(model, cfg.model.lora)
    if "reference" in defense.needs:
        models.prepare_reference(model)
    model.train()

    precision = P.pick(tc.precision)
    accelerator = make_accelerator(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: check model.lora")
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = _schedule(optimizer, tc)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ctx = RunContext(accelerator, model, tokenizer, cfg, run_dir, aux=aux, task_rows=rows)
    task = Stream(rows, tc.batch_size, tc.seed, "task")
    metrics_path = run_dir / "metrics.jsonl"
    done = checkpoints(run_dir) if resume else []
    if done:
        _resume(ctx, optimizer, scheduler, defense, task, done[-1])
        _truncate_metrics(metrics_path, ctx.step)
        log.info("resuming %s from step %d", run_dir, ctx.step)
    elif metrics_path.exists():
        metrics_path.unlink()
    asr = PeriodicASR(cfg, run_dir)
    if done:
        _truncate_metrics(asr.path, ctx.step)
    elif asr.path.exists():
        asr.path.unlink()

    setup_passes = dict(ctx.passes)
    # setup may draw random numbers (a PGD init, a sample of probes). It runs on a fresh run after seeding
    # and on a resumed run after the RNG was restored, so isolate it: otherwise the two would diverge.
    rng = _rng_state()
    defense.setup(ctx)
    _set_rng_state(rng)
    for name, pos in getattr(ctx, "_resume_streams", {}).items():
        if name not in ctx.streams:
            raise RuntimeError(f"checkpoint has aux stream {name!r} that the defense did not create in setup")
        ctx.streams[name].pos = pos
    setup_cost = {k: ctx.passes[k] - setup_passes[k] for k in ctx.passes}

    history: list[dict[str, Any]] = []
    last_loss = float("nan")
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=ctx.step, desc=f"train {cfg.defense.name}", disable=not progress)
    try:
        if ctx.step == 0 and asr.due(0):  # the starting point of the ASR curve (the aligned model)
            asr.run(ctx)
        with metrics_path.open("a") as mf:
            while ctx.step < tc.steps:
                t0 = time.perf_counter()
                ctx.passes = {"forward": 0, "backward": 0}
                ctx.positions = 0
                sums: dict[str, float] = {}
                diags: dict[str, float] = {}
                total, tokens = 0.0, 0
                for _ in range(tc.grad_accum):
                    batch = ctx.batch(task.next())
                    tokens += int((batch["labels"] != -100).sum())
                    out = defense.step(ctx, batch)
                    total += float(out.loss) / tc.grad_accum
                    for k, v in out.terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / tc.grad_accum
                    diags.update(out.diagnostics)  # the last micro-batch's values
                if not np.isfinite(total):  # before the update: a NaN must never reach the weights
                    raise FloatingPointError(f"step {ctx.step + 1}: loss is {total}; terms {sums}")
                row: dict[str, Any] = {"step": ctx.step + 1, "lr": scheduler.get_last_lr()[0], "loss": total}
                if tc.max_grad_norm is not None:
                    row["grad_norm"] = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ctx.step += 1
                row.update({f"loss/{k}": v for k, v in sums.items()})
                row.update({f"diag/{k}": v for k, v in diags.items()})
                row.update({f"passes/{k}": v for k, v in ctx.passes.items()})
                row["tokens"] = tokens
                row["positions"] = ctx.positions
                row["time/step_s"] = time.perf_counter() - t0
                if asr.due(ctx.step):
                    row["eval/asr"] = asr.run(ctx)["asr"]
                last_loss = total
                history.append(row)
                if ctx.step % tc.log_every == 0 or ctx.step == tc.steps or "eval/asr" in row:
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
                if (tc.save_every and ctx.step % tc.save_every == 0) or ctx.step == tc.steps:
                    save_checkpoint(ctx, optimizer, scheduler, defense, task)
                if interrupt_after is not None and ctx.step >= interrupt_after and ctx.step < tc.steps:
                    raise TrainingInterrupted(ctx.step)
        if not ctx.post_hoc_done:
            # A post-hoc change (Safe LoRA's projection) must be what the final checkpoint holds, and must
            # not be applied twice when a finished run is resumed: save again, marked as done. The save
            # before it (inside the loop) keeps the trained weights should after_train fail.
            defense.after_train(ctx)
            ctx.post_hoc_done = True
            save_checkpoint(ctx, optimizer, scheduler, defense, task)
    finally:
        bar.close()
        defense.close()  # hooks never outlive the run, even a crashed one
    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "steps": ctx.step,
        "final_loss": last_loss,
        "precision": precision,
        "defense": cfg.defense.name,
        "setup_passes": setup_cost,
        "reference_extra_bytes": models.reference_extra_bytes(unwrapped),
        "trainable_params": sum(p.numel() for p in params),
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(run_dir, unwrapped, tokenizer, ctx.step, last_loss, history)


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int) -> None:
        super().__init__(f"training interrupted after step {step}")
        self.step = step


def _check_same_config(run_dir: Path, cfg: C.RunConfig) -> None:
    """Refuse to resume a run directory that was started with a different config."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or not checkpoints(run_dir):
        return
    import yaml

    old = yaml.safe_load(saved.read_text())
    new = C.to_dict(cfg)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise C.ConfigError(
            f"{run_dir} holds a run with a different config (sections differ: {', '.join(diff)}); "
            "use another run_id, or delete the directory to start over"
        )


def load_run_model(run_dir: Path, step: int | None = None) -> tuple[nn.Module, Any]:
    """Rebuild a trained model from its run directory: base model + the checkpoint's trainable weights."""
    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.yaml")
    done = checkpoints(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    ckpt = done[-1] if step is None else run_dir / "checkpoints" / f"step-{step:06d}"
    model, tok = models.load(cfg.model.spec)
    model = models.attach_lora(model, cfg.model.lora)
    load_trainable(model, ckpt)
    model.eval()
    return model, tok


def iter_checkpoints(run_dir: Path) -> Iterator[tuple[int, Path]]:
    for p in checkpoints(run_dir):
        yield int(p.name.split("-")[1]), p
