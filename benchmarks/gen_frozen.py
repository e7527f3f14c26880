"""Generation time with frozen weights (a fine-tuned LoRA model's base, as train() returns it) with and without
generate's flagging of them, and of a LoRA model with and without its merge in the bf16 copy, side by side in one
process, and whether the completions agree.

    .venv/bin/python benchmarks/gen_frozen.py [MODEL] [--reps 2]

Greedy, 48 new tokens, batch 128, on HarmBench's dev half (never the held-out half). Per rep: the model as loaded
(weights flagged, the fast case), the same weights frozen with generate's flagging off (the code before it) and
on (today's); then the model under a fresh r=32 LoRA adapter (train()'s kind of model; B = 0, so its completions
are the model's) decoded with the adapter's own products (the code before) and merged (today's).
"""

from __future__ import annotations

import argparse
import time

from safeft import models
from safeft.config import LoraConfig
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

    secs: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}

    def run(label: str, rep: int, net, flag: bool = True, merge: bool = True) -> None:
        G.FLAG_FROZEN_WEIGHTS, G.MERGE_LORA = flag, merge
        try:
            t = time.perf_counter()
            out = G.generate(net, tok, prompts, settings, progress=False)
            dt = time.perf_counter() - t
        finally:
            G.FLAG_FROZEN_WEIGHTS = G.MERGE_LORA = True
        secs.setdefault(label, []).append(dt)
        texts.setdefault(label, out)
        print(f"rep {rep} {label}: {dt:.1f} s for {len(prompts)} prompts", flush=True)

    for rep in range(args.reps):
        for label, frozen, flag in (
            ("weights flagged", False, True),
            ("frozen, not flagged", True, False),
            ("frozen, flagged", True, True),
        ):
            for w in model.parameters():
                w.requires_grad_(not frozen)
            run(label, rep, model, flag=flag)
    # PEFT injects its layers into ``model`` itself, so the adapter goes on only after the plain cases ran
    lora = models.attach_lora(model, LoraConfig(r=32, alpha=64))
    for rep in range(args.reps):
        run("LoRA, adapter products", rep, lora, merge=False)
        run("LoRA, merged", rep, lora)
    ref = min(secs["weights flagged"])
    for label in secs:
        same = sum(a == b for a, b in zip(texts["weights flagged"], texts[label], strict=True))
        print(f"{label}: best {min(secs[label]):.1f} s = {min(secs[label]) / ref:.2f}x; {same}/{len(prompts)} equal")


if __name__ == "__main__":
    main()
