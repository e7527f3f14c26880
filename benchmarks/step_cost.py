"""Step cost of every registered defense relative to plain SFT, measured side by side in ONE process.

Each method runs the real training loop (``safeft.train.train``, what users run) for ``--warmup + --steps``
steps on the same model, the same finance examples and the same seed, so every method sees the same task
batches. Reported per method: the mean ``time/step_s`` over the timed steps (warm-up excluded), its ratio to
SFT, the forward / backward passes per step the loop counted (``passes/*`` in metrics.jsonl) and the token
positions those forwards ran (``positions``, padding included: a defense that packs its anchors into the
task forward runs one wider pass instead of a second one). It also
prints the extra parameter bytes the frozen reference costs (``models.reference_extra_bytes``; 0 under
LoRA, where the reference is the same network with its adapter disabled) and each method's one-off setup
passes.

    .venv/bin/python benchmarks/step_cost.py --tiny                        # quick check, tiny random model
    .venv/bin/python benchmarks/step_cost.py --methods sft saft repanchor  # SmolLM2-135M (the default)
    .venv/bin/python benchmarks/step_cost.py --lengths demo long           # the demo's rows and ~512-token rows
    .venv/bin/python benchmarks/step_cost.py --methods sbr saft+repanchor saft+repanchor:pgd_mode=free

A method is a registered name, optionally with ``:key=value,key=value`` defense overrides, measured as a row of
its own: ``saft+repanchor:pgd_mode=free`` is SAFT+RepAnchor with the amortised PGD, beside exact PGD's
``saft+repanchor`` in the same run (the default list has both).

Two task lengths: ``demo`` is the demo's finance rows (~105 tokens each); ``long`` joins consecutive finance
rows into realistic instruction-tuning rows of about 512 tokens (``data.max_length`` 576), where a defense's
fixed extra work (anchors, PGD on short anchor rows) is a smaller share of the step. The CPU's model name and
matrix features (AMX, AVX512-BF16, ...) and torch's CPU capability are printed first: bf16 kernels differ
between CPUs, so ratios are only comparable on one machine.

Timings are only comparable within one run of this script, on an otherwise idle machine. SFT is measured
before the first method and after every method, and each ratio is to the mean of the two SFT runs around
it, so a machine whose speed drifts during the run does not bias the methods measured late.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

# Every defense module, imported explicitly so it registers; ones not written yet are skipped.
for _name in (
    "saft",
    "repanchor",
    "saft_repanchor",
    "sbr",
    "sap",
    "vaccine",
    "ewc",
    "repnoise",
    "lisa",
    "booster",
    "safelora",
    "mixing",
):
    try:
        importlib.import_module(f"safeft.methods.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"safeft.methods.{_name}":  # a real missing dependency inside an existing module
            raise

from safeft import config as C  # noqa: E402
from safeft import models  # noqa: E402
from safeft.data.domains import load_domain  # noqa: E402
from safeft.demo import run_dir_name  # noqa: E402
from safeft.methods import METHODS  # noqa: E402
from safeft.testing import save_tiny_model  # noqa: E402
from safeft.train import train  # noqa: E402

FREE_PGD = "saft+repanchor:pgd_mode=free"  # the amortised PGD option, measured beside exact PGD


def cpu_features() -> str:
    """The CPU's model name, the matrix/vector features that decide bf16 speed, and torch's capability."""
    import platform

    import torch

    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown CPU", platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    have = [f for f in wanted if f in flags] or ["(none of " + ", ".join(wanted) + ")"]
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{name}; features {' '.join(have)}; torch CPU capability {cap}; {torch.get_num_threads()} threads"


def long_rows(examples: list, target_tokens: int = 512, tok=None) -> list:
    """Realistic instruction-tuning rows: consecutive finance rows joined until ~``target_tokens`` each."""
    from safeft.data.types import Example

    out, prompts, answers, size = [], [], [], 0
    for ex in examples:
        prompts.append(ex.prompt)
        answers.append(ex.response)
        size += len(tok(ex.prompt + ex.response)["input_ids"]) if tok else (len(ex.prompt) + len(ex.response)) // 4
        if size >= target_tokens:
            q = "Answer each of these questions in turn.\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
            a = "\n".join(f"{i + 1}. {r}" for i, r in enumerate(answers))
            out.append(Example(f"long-{len(out)}", q, a, "finance-long"))
            prompts, answers, size = [], [], 0
    return out


def method_defense(spec: str, base: str) -> C.DefenseConfig:
    """``name[:key=value,...]`` -> its defense config (``config.defense_from_spec``), with what the method cannot
    run without: a post-hoc method that compares the model with its unaligned base (Safe LoRA) gets
    ``--base-model``. An unknown name or option exits."""
    name = spec.partition(":")[0]
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r} in {spec!r}; registered: {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Config)}
    try:
        return C.defense_from_spec(spec, f"method {spec!r}", [f"base_model={base}"] if "base_model" in fields else [])
    except C.ConfigError as e:
        raise SystemExit(str(e)) from None


def _measure(
    method: str, spec: str, args: argparse.Namespace, examples: list, root: Path, base: str, run_id: str = ""
) -> dict:
    defense = method_defense(method, base)
    cfg = C.load(
        overrides=[
            f"model.spec={spec}",
            "data.task=domain:finance",
            f"train.steps={args.warmup + args.steps}",
            f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}",
            f"out_dir={root / 'runs'}",
            # a fresh directory: an existing one would be resumed
            f"run_id={run_id or run_dir_name(method)}",
            f"data.max_length={args.max_length}",
        ]
    )
    cfg = dataclasses.replace(cfg, defense=defense)
    print(f"measuring {method} ({args.warmup} + {args.steps} steps) ...", file=sys.stderr, flush=True)
    model, tok = models.load(spec)
    res = train(cfg, examples=examples, model=model, tokenizer=tok, progress=False)
    timed = res.metrics[args.warmup :]
    summary = json.loads((res.run_dir / "train_summary.json").read_text())
    return {
        "s_per_step": statistics.mean(r["time/step_s"] for r in timed),
        "fwd": statistics.mean(r["passes/forward"] for r in timed),
        "bwd": statistics.mean(r["passes/backward"] for r in timed),
        "positions": statistics.mean(r["positions"] for r in timed),
        "setup": summary["setup_passes"],
        "ref_bytes": summary["reference_extra_bytes"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, directory, .gguf, hub id)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    default = [*METHODS, FREE_PGD]
    p.add_argument(
        "--methods",
        nargs="+",
        default=default,
        help=f"name[:key=value,...]; default: all, and SAFT+RepAnchor with the amortised PGD ({', '.join(default)})",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (quick check)")
    p.add_argument(
        "--base-model",
        default="smollm2-135m",
        help="the unaligned base of --model, for methods that need one (Safe LoRA); with --tiny, another tiny model",
    )
    p.add_argument("--lengths", nargs="+", default=["demo"], choices=("demo", "long"), help="task row lengths")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"CPU: {cpu_features()}")
    for length in args.lengths:
        run_length(args, length)


def run_length(args: argparse.Namespace, length: str) -> None:
    for m in args.methods:  # an unknown name or option exits before anything runs
        method_defense(m, args.base_model)
    methods = ["sft"] + [m for m in args.methods if m != "sft"]  # SFT first: everything is a ratio to it

    examples = load_domain("finance", "train")
    args.max_length = 256
    with tempfile.TemporaryDirectory(prefix="safeft-step-cost-") as tmp:
        root = Path(tmp)
        spec, base = args.model, args.base_model
        if args.tiny:
            spec = str(save_tiny_model(root / "tiny-model"))
            base = str(save_tiny_model(root / "tiny-base", seed=1))
        if length == "long":  # sized with the model's own tokenizer
            # a batch pads to its longest row, not to max_length: 1024 only keeps any row from being cut
            examples, args.max_length = long_rows(examples, 512, models.load(spec)[1]), 1024
        # SFT brackets every method: sft, m1, sft, m2, ..., sft. On a shared or throttling machine the speed
        # drifts over a long run (+10-20 % over 13 methods here); each method's ratio is to the mean of the
        # SFT runs just before and after it, so slow drift cancels instead of landing on late methods.
        others = [m for m in methods if m != "sft"]
        sft_runs = [_measure("sft", spec, args, examples, root, base, run_id="sft-0")]
        results: dict[str, dict] = {"sft": sft_runs[0]}
        failed: dict[str, str] = {}
        for m in others:
            # One method that cannot run here (Safe LoRA on a model identical to its base, say) must not throw
            # away the rows measured before it: it is reported as failed, with its error, and the run goes on.
            try:
                results[m] = _measure(m, spec, args, examples, root, base)
                print(f"  {m}: {results[m]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - reported in the table, never silently dropped
                failed[m] = f"{type(e).__name__}: {e}"
                print(f"  {m}: FAILED ({failed[m]})", file=sys.stderr, flush=True)
            gc.collect()  # the last method's model and optimizer are not the next run's memory pressure
            sft_runs.append(_measure("sft", spec, args, examples, root, base, run_id=f"sft-{len(sft_runs)}"))

    sft_times = [r["s_per_step"] for r in sft_runs]
    # SFT against itself: its first run against the mean of all of them (the noise floor of this table)
    local = {"sft": statistics.mean(sft_times)}
    for i, m in enumerate(others):
        local[m] = (sft_times[i] + sft_times[i + 1]) / 2  # failed methods keep their slot: SFT ran around them
    print(
        f"\n{length} rows: step cost on {'a tiny random model' if args.tiny else args.model}, batch {args.batch_size}, "
        f"mean of {args.steps} steps after {args.warmup} warm-up\n"
    )
    pos = results["sft"]["positions"]
    head = "| s/step | SFT s/step around it | ratio to SFT | fwd/step | bwd/step | positions/step (x SFT) |"
    print(f"| {'method':<30} {head}")
    print(f"|{'-' * 32}|--------|----------------------|--------------|----------|----------|------------------------|")
    for m, r in results.items():
        print(
            f"| {m:<30} | {r['s_per_step']:6.3f} | {local[m]:20.3f} | {r['s_per_step'] / local[m]:12.2f} "
            f"| {r['fwd']:8.1f} | {r['bwd']:8.1f} | {r['positions']:14.0f} ({r['positions'] / pos:4.2f}) |"
        )
    for m, err in failed.items():
        print(f"| {m:<30} | failed: {err}")
    if len(sft_times) > 1:
        print(
            f"\nSFT measured {len(sft_times)} times, around every method: {min(sft_times):.3f}-{max(sft_times):.3f} "
            f"s/step (spread {100 * (max(sft_times) / min(sft_times) - 1):.0f}%). Each ratio is to the mean of the SFT "
            "runs just before and after the method; plain-SFT-step methods (mixing, safelora) show the remaining noise."
        )
    print("\nsetup passes (one-off): " + ", ".join(f"{m} {r['setup']['forward']}F" for m, r in results.items()))
    ref = {m: r["ref_bytes"] for m, r in results.items()}
    print(f"reference extra parameter bytes under LoRA (target 0): {ref}")


if __name__ == "__main__":
    main()
