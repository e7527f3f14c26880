"""Generation time with frozen weights (a fine-tuned LoRA model's base, as train() returns it) with and without
generate's flagging of them, side by side in one process, and whether the completions agree.

    .venv/bin/python benchmarks/gen_frozen.py [MODEL] [--reps 2]

Greedy, 48 new tokens, batch 128, on HarmBench's dev half (never the held-out half). Three models per rep: the
model as loaded (weights flagged, the fast case), the same weights frozen with generate's flagging off (the
code before it), and frozen with it on (today's).
"""

from __future__ import annotations

import argparse
import time

from safeft import models
from safeft.data.sources import load_source
from safeft.eval import generate as G


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2-135m", help="model spec (default: the embedded model)")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    model, tok = models.load(args.model)
    prompts = [e.prompt for e in load_source("harmbench:dev")]
    settings = G.GenSettings(48, 128)

    def timed(frozen: bool, flag: bool) -> tuple[float, list[str]]:
        for w in model.parameters():
            w.requires_grad_(not frozen)
        G.FLAG_FROZEN_WEIGHTS = flag
        try:
            t = time.perf_counter()
            texts = G.generate(model, tok, prompts, settings, progress=False)
            return time.perf_counter() - t, texts
        finally:
            G.FLAG_FROZEN_WEIGHTS = True

    cases = {"weights flagged": (False, True), "frozen, not flagged": (True, False), "frozen, flagged": (True, True)}
    secs: dict[str, list[float]] = {k: [] for k in cases}
    texts: dict[str, list[str]] = {}
    for rep in range(args.reps):
        for label, (frozen, flag) in cases.items():
            dt, out = timed(frozen, flag)
            secs[label].append(dt)
            texts.setdefault(label, out)
            print(f"rep {rep} {label}: {dt:.1f} s for {len(prompts)} prompts", flush=True)
    ref = min(secs["weights flagged"])
    for label in cases:
        same = sum(a == b for a, b in zip(texts["weights flagged"], texts[label], strict=True))
        print(f"{label}: best {min(secs[label]):.1f} s = {min(secs[label]) / ref:.2f}x; {same}/{len(prompts)} equal")


if __name__ == "__main__":
    main()
