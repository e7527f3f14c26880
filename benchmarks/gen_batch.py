"""Generation time per eval batch size, side by side in one process (the demo's eval batch comes from here).

    .venv/bin/python benchmarks/gen_batch.py [MODEL] [--sizes 64 128 256] [--reps 2]

Greedy, 48 new tokens, on HarmBench's dev half and 156 dev over-refusal probes (256 prompts; never the held-out
half or the test probes). Prints seconds per batch size and rep, the ratio to the first size, and how many
completions equal the first size's: on CPU the batch size changes some greedy completions (rounding differs
with the padded shapes and moves near-ties), so rates are comparable at one batch size only.
"""

from __future__ import annotations

import argparse
import time

from safeft import models
from safeft.data.probes import over_refusal_probes
from safeft.data.sources import load_source
from safeft.eval.generate import GenSettings, generate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2-135m", help="model spec (default: the embedded model)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    model, tok = models.load(args.model)
    prompts = [e.prompt for e in load_source("harmbench:dev") + over_refusal_probes("dev")[:156]]
    first, secs, texts = args.sizes[0], {}, {}
    for rep in range(args.reps):
        for bs in args.sizes:  # interleaved, so a slow spell of the machine hits every size alike
            t = time.perf_counter()
            out = generate(model, tok, prompts, GenSettings(48, bs), progress=False)
            secs.setdefault(bs, []).append(time.perf_counter() - t)
            texts.setdefault(bs, out)
            print(f"rep {rep} batch {bs}: {secs[bs][-1]:.1f} s for {len(prompts)} prompts", flush=True)
    for bs in args.sizes:
        best = min(secs[bs])
        same = sum(a == b for a, b in zip(texts[first], texts[bs], strict=True))
        print(
            f"batch {bs}: best {best:.1f} s, {best / min(secs[first]):.2f}x batch {first}'s; "
            f"{same}/{len(prompts)} completions equal to batch {first}'s"
        )


if __name__ == "__main__":
    main()
