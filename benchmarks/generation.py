"""Batched generation vs the one-prompt-at-a-time loop of the paper repos, same model, prompts and settings.

64 prompts (half HarmBench test behaviours, half benign: our over-refusal probes and finance questions),
greedy, the same max_new_tokens and dtype in both modes. Both modes go through ``generate_full`` (chat
template, stop tokens, KV cache); the only difference is ``batch_size`` (64 vs 1), so the ratio measures
batching and nothing else. Throughput counts only real new tokens (up to and including the stop token),
never padding. It also counts how many completions are identical between the two modes: in bf16, left
padding changes the shapes of the matrix products and therefore the rounding, so greedy paths can part
ways; ``--dtype float32`` checks that they agree where the arithmetic is (nearly) exact.

    .venv/bin/python benchmarks/generation.py --tiny                 # quick check, tiny random model
    .venv/bin/python benchmarks/generation.py   # SmolLM2-135M (the default)
    .venv/bin/python benchmarks/generation.py --dtype float32 --out results.json

Timings are only comparable within one run of this script, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time

import torch

from safeft import models
from safeft.data import refusals
from safeft.data.domains import load_domain
from safeft.data.splits import safety_splits
from safeft.eval.generate import GenSettings, generate_full
from safeft.testing import save_tiny_model

DTYPES = {"bfloat16": "bf16", "float32": "fp32", "auto": "auto"}


def prompts_mix(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts, half harmful (HarmBench test split) and half benign, in a seeded shuffled order."""
    rng = random.Random(seed)
    harmful = [e.prompt for e in safety_splits(seed=0).test]
    benign = list(refusals.OVER_REFUSAL_PROBES) + [e.prompt for e in load_domain("finance", "test", n=50)]
    mix = rng.sample(harmful, n // 2) + rng.sample(benign, n - n // 2)
    rng.shuffle(mix)
    return mix


def timed(model, tok, prompts: list[str], settings: GenSettings):
    start = time.perf_counter()
    gens = generate_full(model, tok, prompts, settings, progress=False)
    return gens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec (alias, directory, .gguf, hub id)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES), help="auto: bf16 where the CPU has bf16 units")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (quick check)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        spec = str(save_tiny_model(tmp)) if args.tiny else args.model
        model, tok = models.load(spec)
    prompts = prompts_mix(args.prompts)
    batched = GenSettings(args.max_new_tokens, batch_size=len(prompts), precision=DTYPES[args.dtype])
    single = GenSettings(args.max_new_tokens, batch_size=1, precision=DTYPES[args.dtype])
    timed(model, tok, prompts[:2], batched)  # warm-up: first-call allocations and kernel selection

    b_gens, b_s = timed(model, tok, prompts, batched)
    s_gens, s_s = timed(model, tok, prompts, single)
    b_tok, s_tok = sum(g.n_tokens for g in b_gens), sum(g.n_tokens for g in s_gens)
    same = sum(a.text == b.text for a, b in zip(b_gens, s_gens, strict=True))
    res = {
        "model": "tiny" if args.tiny else args.model,
        "prompts": len(prompts),
        "settings": batched.record(tok) | {"batch_size": f"{len(prompts)} vs 1"},
        "threads": torch.get_num_threads(),
        "batched": {"seconds": round(b_s, 2), "new_tokens": b_tok, "tokens_per_s": round(b_tok / b_s, 1)},
        "one_at_a_time": {"seconds": round(s_s, 2), "new_tokens": s_tok, "tokens_per_s": round(s_tok / s_s, 1)},
        "throughput_ratio": round((b_tok / b_s) / (s_tok / s_s), 2),
        "wall_ratio": round(s_s / b_s, 2),
        "identical_completions": f"{same}/{len(prompts)}",
        "finished_by_stop_token": f"{sum(g.finish == 'stop' for g in b_gens)}/{len(prompts)}",
    }
    print(
        f"model {res['model']}, {len(prompts)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
        f"dtype={res['settings']['dtype']}, {res['threads']} threads"
    )
    print(f"  batched (64 per call): {b_tok} new tokens in {b_s:.1f} s = {b_tok / b_s:.1f} tokens/s")
    print(f"  one prompt at a time:  {s_tok} new tokens in {s_s:.1f} s = {s_tok / s_s:.1f} tokens/s")
    print(
        f"  throughput ratio {res['throughput_ratio']}x (wall-clock ratio {res['wall_ratio']}x); "
        f"identical completions {res['identical_completions']}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
