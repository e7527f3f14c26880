"""The one training loop, on HF Accelerate.

Readable top to bottom: build the model, the data stream and the defense; then for each optimizer step,
hand ``grad_accum`` micro-batches to ``defense.step`` (which does its own forward/backward passes through
``ctx``), clip, step, log every loss term, and checkpoint. The loop never looks at the defense's name.

Resume is exact: a checkpoint holds the trainable weights (adapter or full), optimizer, scheduler, every
RNG, the data position of the task stream and of every aux stream, and the defense's own state. A run
killed after step k and resumed ends with the same weights and the same metrics as one that never stopped.

Around the loop, and kept apart from it: ``safeft.validate.check`` runs every input check first (nothing
is written or loaded before it passes), ``safeft.runs`` holds the run directory's lock and decides fresh /
resume / finished, and a step whose loss, gradients or updated weights are non-finite stops the run
before anything non-finite is saved (``TrainingDiverged``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from safeft import config as C
from safeft import devices, io, models, parallel, runs, trackers, validate
from safeft import precision as P
from safeft.context import (
    RunContext,
    Stream,
    broadcast,
    check_same_on_every_process,
    check_supported,
    gather,
    make_accelerator,
    run_features,
    shards_parameters,
)
from safeft.data.chat import render, render_task, use_chat_template
from safeft.data.types import Example
from safeft.eval.periodic import PeriodicASR
from safeft.runs import (
    TrainingDiverged,
    checkpoints,
    load_checkpoint,
    load_trainable,
    make_run_dir,
    rng_state,
    save_checkpoint,
    seed_all,
    set_rng_state,
    truncate_log,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    tokenizer: Any
    steps: int
    final_loss: float
    metrics: list[dict[str, Any]]
    finished_before: bool = False  # the run directory held this run finished already; nothing was trained


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
    overwrite: bool = False,
    interrupt_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``cfg.model`` on the task data with ``cfg.defense``.

    ``model``/``tokenizer`` may be passed in (tests, the demo) instead of loaded from ``cfg.model.spec``;
    the model must not have an adapter yet. An existing run in ``run_dir`` is resumed (same config and
    data, else refused); ``resume=False`` refuses it unless ``overwrite``, which deletes it first; a
    finished one is returned as it is, untouched (``finished_before``). ``interrupt_after`` stops after
    that step, as a kill would (tests use it to check resume).
    """
    # (a) Every check of the inputs runs before anything is written or loaded; `safeft validate` runs the same.
    checked = validate.check(cfg, examples=examples, model=model, tokenizer=tokenizer, aux=aux)
    # The accelerator comes before the run directory: under data parallelism it says which process writes
    # (the main one; the others wait at barriers), and it knows the engine, which a defense may be unable
    # to run under (refused here, before anything is written).
    accelerator = make_accelerator(P.pick(cfg.train.precision))
    check_supported(checked.defense, run_features(accelerator, cfg))
    if (ds := getattr(accelerator.state, "deepspeed_plugin", None)) is not None:
        # no dataloader is prepared, so DeepSpeed's per-device batch cannot be inferred ("auto"); the loop
        # accumulates itself (ctx.micro_sync marks the boundary), so DeepSpeed's own accumulation stays 1
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    devices.check_levers(cfg.model)
    run_dir = broadcast(accelerator, Path(run_dir) if run_dir else make_run_dir(cfg))  # a time-stamped id: main's
    parallel.check_engine(accelerator, cfg, run_dir, resume)
    # (b) One directory, one run: the main process holds its lock and decides fresh / resume / finished.
    with runs.claim(accelerator, run_dir, cfg, checked.fingerprint, resume=resume, overwrite=overwrite) as (
        mode,
        point,
    ):
        if mode == "finished":
            return _finished(cfg, run_dir, model, tokenizer)
        return _train(cfg, checked, accelerator, model, tokenizer, run_dir, point, interrupt_after, progress)


def _finished(cfg: C.RunConfig, run_dir: Path, model: nn.Module | None, tokenizer: Any) -> TrainResult:
    """A run that already ran to its end: its final weights and logs, nothing rewritten."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    log.info("%s: finished already (%s steps); left as it is", run_dir, summary.get("steps"))
    if model is None:
        model, tokenizer = models.load(cfg.model.spec, allow_pickle=cfg.model.allow_pickle)
    model = models.attach_lora(model, cfg.model.lora)
    load_trainable(model, checkpoints(run_dir)[-1])
    model.eval()
    metrics = runs.read_log(run_dir / "metrics.jsonl")
    return TrainResult(run_dir, model, tokenizer, summary["steps"], summary["final_loss"], metrics, True)


def _diverged(ctx: RunContext, what: str, terms: dict[str, float]) -> TrainingDiverged:
    done = checkpoints(ctx.run_dir)
    terms_text = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "none"
    return TrainingDiverged(
        f"step {ctx.step + 1}: {what} (loss terms: {terms_text}). Stopped before saving anything non-finite: "
        f"the newest checkpoint ({done[-1].name if done else 'none yet'}) is the last finite one. "
        "Lower train.lr or set train.max_grad_norm"
    )


def _train(
    cfg: C.RunConfig,
    checked: validate.Checked,
    accelerator,
    model: nn.Module | None,
    tokenizer: Any,
    run_dir: Path,
    point: tuple[Path, dict[str, Any], dict[str, Any]] | None,
    interrupt_after: int | None,
    progress: bool,
) -> TrainResult:
    tc = cfg.train
    defense, examples, aux = checked.defense, checked.examples, checked.aux
    # Straight onto this process's device, except under engines that shard the weights as they wrap them.
    here = None if shards_parameters(accelerator) else accelerator.device
    if model is None:
        model, tokenizer = models.load(
            cfg.model.spec, allow_pickle=cfg.model.allow_pickle, **devices.load_args(cfg.model, here)
        )
    model = devices.apply_levers(model, cfg.model, training=True)
    if here is not None:  # a model handed in (tests, align, the demo) sits on the CPU
        model = devices.place(model, here)
    if cfg.data is not None:
        use_chat_template(tokenizer, cfg.data.chat_template)
        # rows cut at max_length are counted and logged (validate.check refused too many already)
        rows, rendered = render_task(
            tokenizer, examples, cfg.model.system_prompt, cfg.data.max_length, cfg.data.max_truncated
        )
    else:
        rows, rendered = [render(tokenizer, ex, cfg.model.system_prompt) for ex in examples], None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.save(cfg, run_dir / "config.yaml")
        runs.record_fingerprint(run_dir, *checked.fingerprint, cfg.data.task if cfg.data else None)
    seed_all(tc.seed)
    model = models.attach_lora(model, cfg.model.lora)
    if "reference" in defense.needs:
        models.prepare_reference(model)
    model.train()

    precision = P.pick(tc.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: check model.lora")
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = _schedule(optimizer, tc)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    ctx = RunContext(accelerator, model, tokenizer, cfg, run_dir, aux=aux, task_rows=rows)
    # Each process takes its slice of every global batch (Stream); the position is global, so one integer.
    task = Stream(rows, tc.batch_size, tc.seed, "task", rank=ctx.rank, processes=ctx.processes)
    post_hoc_done = False  # after_train has run and its result is in the final checkpoint
    global_batch = tc.batch_size * ctx.processes * tc.grad_accum
    log.info(
        "global batch %d rows per optimizer step = %d per device x %d processes x %d accumulation",
        global_batch,
        tc.batch_size,
        ctx.processes,
        tc.grad_accum,
    )

    def save() -> Path | None:
        """Every process calls it (the gathers are collective); the main process writes, the others wait."""
        state = {"step": ctx.step, "task_pos": task.pos, "streams": {n: s.pos for n, s in ctx.streams.items()}}
        state["processes"] = ctx.processes
        sharded = shards_parameters(accelerator)
        weights = parallel.gathered_trainable(accelerator, ctx) if sharded else None
        if not sharded:  # a replica that drifted (a gradient written outside DDP's all-reduce) stops the run here
            check_same_on_every_process(ctx, "the trainable weights", models.trainable_parameters(ctx.unwrapped))
        check_same_on_every_process(ctx, f"defense {cfg.defense.name!r}'s state", defense)
        rngs = gather(accelerator, rng_state()) if ctx.processes > 1 else None
        path = None
        if ctx.is_main:
            path = save_checkpoint(
                ctx.run_dir,
                ctx.unwrapped,
                None if sharded else optimizer,  # sharded optimizer state: weights-only checkpoints
                scheduler,
                defense.state_dict(),
                {**state, "post_hoc_done": post_hoc_done},
                weights=weights,
                rng_ranks=rngs,
            )
        accelerator.wait_for_everyone()  # nobody runs ahead of (or resumes from) a half-written checkpoint
        return path

    def run_asr() -> dict[str, Any] | None:
        """The periodic ASR, generated and written by the main process while the others wait."""
        res = asr.run(ctx) if ctx.is_main else None
        accelerator.wait_for_everyone()
        return res

    metrics_path = run_dir / "metrics.jsonl"
    asr = PeriodicASR(cfg, run_dir)
    resumed_loss = float("nan")
    if point is not None:  # (b) the newest checkpoint with readable trainer state (runs.open_run)
        ckpt, _, trainer = point
        state, defense_state = load_checkpoint(ckpt, ctx.unwrapped, optimizer, scheduler, trainer)
        defense.load_state_dict(defense_state)
        ctx.step, task.pos, ctx.resume_streams = state["step"], state["task_pos"], state["streams"]
        post_hoc_done = state.get("post_hoc_done", False)
        for path in (metrics_path, asr.path) if ctx.is_main else ():
            truncate_log(path, ctx.step)
        # a run resumed at its last step trains nothing more; its summary keeps the loss it logged
        resumed_loss = next((r["loss"] for r in reversed(runs.read_log(metrics_path)) if "loss" in r), resumed_loss)
        log.info("resuming %s from step %d", run_dir, ctx.step)
    else:
        for path in (metrics_path, asr.path) if ctx.is_main else ():
            path.unlink(missing_ok=True)

    setup_passes = dict(ctx.passes)
    # setup may draw random numbers (a PGD init, a sample of probes). It runs on a fresh run after seeding
    # and on a resumed run after the RNG was restored, so isolate it: otherwise the two would diverge.
    rng = rng_state()
    defense.setup(ctx)
    set_rng_state(rng)
    ctx.restore_streams()
    setup_cost = {k: ctx.passes[k] - setup_passes[k] for k in ctx.passes}
    # Every process computed the defense's caches itself from the same weights and data: check they agree.
    check_same_on_every_process(ctx, f"defense {cfg.defense.name!r}'s caches after setup", defense)
    parallel.own_random_stream(ctx, point[0] if point is not None else None)

    history: list[dict[str, Any]] = []
    last_loss = resumed_loss
    from tqdm.auto import tqdm

    bar = tqdm(
        total=tc.steps, initial=ctx.step, desc=f"train {cfg.defense.name}", disable=not progress or not ctx.is_main
    )
    tracked = trackers.Trackers(cfg, run_dir, ctx.is_main)
    try:
        if ctx.step == 0 and asr.due(0):  # the starting point of the ASR curve (the aligned model)
            run_asr()
        with io.AppendLog(metrics_path) if ctx.is_main else contextlib.nullcontext() as mf:
            while ctx.step < tc.steps:
                t0 = time.perf_counter()
                ctx.passes = {"forward": 0, "backward": 0}
                ctx.positions = 0
                sums: dict[str, float] = {}
                diags: dict[str, float] = {}
                total, tokens = 0.0, 0
                for ctx.micro in range(tc.grad_accum):
                    batch = ctx.batch(task.next())
                    tokens += int((batch["labels"] != -100).sum())
                    with ctx.micro_sync(ctx.last_micro):
                        out = defense.step(ctx, batch)
                    total += float(out.loss) / tc.grad_accum
                    for k, v in out.terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / tc.grad_accum
                    diags.update(out.diagnostics)  # the last micro-batch's values
                # One number per step for the global batch (means over processes; tokens and positions summed),
                # the same on every process, so a non-finite loss stops them all together.
                total, sums, diags, tokens, positions, passes = parallel.reduce_step(ctx, total, sums, diags, tokens)
                if not np.isfinite(total):  # (c) before the update: a NaN must never reach the weights
                    raise _diverged(ctx, f"the loss is {total}", sums)
                row: dict[str, Any] = {"step": ctx.step + 1, "lr": scheduler.get_last_lr()[0], "loss": total}
                if tc.max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    if norm is not None:  # DeepSpeed clips inside its engine and may not report it
                        row["grad_norm"] = float(norm)
                        if not np.isfinite(row["grad_norm"]):  # (c)
                            raise _diverged(ctx, f"the gradient norm is {row['grad_norm']}", sums)
                optimizer.step()
                if (bad := models.first_nonfinite(ctx.unwrapped)) is not None:  # (c) a finite loss, a too-large step
                    raise _diverged(ctx, f"the update made {bad} non-finite", sums)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ctx.step += 1
                row.update({f"loss/{k}": v for k, v in sums.items()})
                row.update({f"diag/{k}": v for k, v in diags.items()})
                row.update({f"passes/{k}": v for k, v in passes.items()})
                row["tokens"] = tokens
                row["positions"] = positions
                row["time/step_s"] = time.perf_counter() - t0
                if asr.due(ctx.step) and (res := run_asr()) is not None:
                    row["eval/asr"] = res["asr"]
                last_loss = total
                history.append(row)
                if mf is not None and (ctx.step % tc.log_every == 0 or ctx.step == tc.steps or "eval/asr" in row):
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                    tracked.log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
                if (tc.save_every and ctx.step % tc.save_every == 0) or ctx.step == tc.steps:
                    save()
                if interrupt_after is not None and ctx.step >= interrupt_after and ctx.step < tc.steps:
                    raise TrainingInterrupted(ctx.step)
        if not post_hoc_done:
            # A post-hoc change (Safe LoRA's projection) must be what the final checkpoint holds, and must
            # not be applied twice when a finished run is resumed: save again, marked as done. The save
            # before it (inside the loop) keeps the trained weights should after_train fail.
            defense.after_train(ctx)
            if (bad := models.first_nonfinite(ctx.unwrapped)) is not None:  # (c)
                raise TrainingDiverged(f"{cfg.defense.name}'s post-hoc step made {bad} non-finite; not saved")
            post_hoc_done = True
            save()
    finally:
        bar.close()
        tracked.close()
        defense.close()  # hooks never outlive the run, even a crashed one
    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "steps": ctx.step,
        "final_loss": last_loss,
        "precision": precision,
        "defense": cfg.defense.name,
        "poison": cfg.data.poison if cfg.data else 0.0,
        "data": rendered.record() if rendered is not None else None,
        "setup_passes": setup_cost,
        "reference_extra_bytes": models.reference_extra_bytes(unwrapped),
        "trainable_params": sum(p.numel() for p in params),
        "processes": ctx.processes,
        "global_batch": global_batch,
    }
    if ctx.is_main:
        io.write_json(run_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()  # train() returns once the run directory is complete, on every process
    return TrainResult(run_dir, unwrapped, tokenizer, ctx.step, last_loss, history)


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int) -> None:
        super().__init__(f"training interrupted after step {step}")
        self.step = step
