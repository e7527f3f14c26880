"""Cost of all-layer CKA between two models over a probe set, relative to the two plain forward passes.

``safeft diagnose`` compares each checkpoint with its reference by running both over the probe prompts and,
on top, capturing every decoder block, pooling two kinds of samples, accumulating the token-level streaming
CKA (three d x d fp64 products per layer per batch) and the next-token KL. This measures that total against
the floor any such comparison pays: the same two models' forward passes over the same batches, no hooks.

    .venv/bin/python benchmarks/cka_cost.py --tiny          # quick check, tiny random models
    .venv/bin/python benchmarks/cka_cost.py                 # SmolLM2-135M, 64 harmful + 64 benign probes

The second model is the first with every weight perturbed by 1 % noise (a stand-in checkpoint: the cost
does not depend on the weights); ``--model2`` takes a real one. Timings alternate (plain, CKA, plain, ...)
and the median of ``--repeats`` is reported, so a background load hits both sides alike. Target: <= 1.15x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from safeft import config as C
from safeft import models
from safeft.data.chat import collate, render
from safeft.diagnose.drift import DriftConfig, compare_models, probe_examples
from safeft.testing import save_tiny_model


@torch.no_grad()
def plain(m1, m2, rows, pad_id: int, batch_size: int) -> None:
    for start in range(0, len(rows), batch_size):
        b = collate(rows[start : start + batch_size], pad_id)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        m1(**inputs)
        m2(**inputs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="reference model spec")
    p.add_argument("--model2", help="second model (default: the first with 1%% weight noise)")
    p.add_argument("--n-harmful", type=int, default=64)
    p.add_argument("--n-benign", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny random models (quick check)")
    p.add_argument("--fp32", action="store_true", help="also time fp32 token-level products (--fp32-products)")
    args = p.parse_args(argv)

    spec = args.model
    if args.tiny:
        spec = str(save_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    ref, tok = models.load(spec)
    if args.model2:
        mod, _ = models.load(args.model2)
    else:
        mod, _ = models.load(spec)
        torch.manual_seed(0)
        with torch.no_grad():
            for q in mod.parameters():
                q.mul_(1 + 0.01 * torch.randn_like(q))
    ref.eval()
    mod.eval()
    cfg = C.load(overrides=[f"model.spec={spec}", "data.task=domain:finance"])
    ex = probe_examples(cfg, DriftConfig(args.n_harmful, args.n_benign))
    sets = {k: [render(tok, e) for e in v] for k, v in ex.items()}
    n_layers = len(models.decoder_layers(ref))
    n_tok = sum(len(r.input_ids) for v in sets.values() for r in v)
    print(
        f"model {spec}: {n_layers} layers; probes {len(sets['harmful'])} harmful + {len(sets['benign'])} benign, "
        f"{n_tok} tokens; batch {args.batch_size}; {torch.get_num_threads()} threads"
    )

    def run_plain() -> float:
        t = time.perf_counter()
        for rows in sets.values():
            plain(ref, mod, rows, tok.pad_token_id, args.batch_size)
        return time.perf_counter() - t

    def run_cka(fp32: bool) -> float:
        t = time.perf_counter()
        for rows in sets.values():
            compare_models(mod, ref, rows, tok.pad_token_id, batch_size=args.batch_size, fp32_products=fp32)
        return time.perf_counter() - t

    run_plain(), run_cka(False)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"plain": [], "fp64": [], "fp32": []}
    for _ in range(args.repeats):
        times["plain"].append(run_plain())
        times["fp64"].append(run_cka(False))
        if args.fp32:
            times["fp32"].append(run_cka(True))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    labels = {
        "plain": "plain forwards (2 models)",
        "fp64": "all-layer CKA + KL (fp64)",
        "fp32": "same, fp32 token products",
    }
    for k, m in med.items():
        print(f"{labels[k]:<27} {m:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    for k in ("fp64", "fp32"):
        if k in med:
            ratio = med[k] / med["plain"]
            print(f"ratio {k}: {ratio:.3f}x  (target <= 1.15x) -> {'OK' if ratio <= 1.15 else 'OVER'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
