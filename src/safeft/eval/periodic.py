"""The ASR the training loop logs along the way (``train.eval_every``): a curve of a run, not a final number.

Kept out of the loop module: it is evaluation (the ``harmful`` suite's own pipeline on a fixed subset),
called by the loop at its steps. The RNG is restored around it, so evaluating never changes training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from safeft import config as C
from safeft import io
from safeft.data.types import Example
from safeft.eval import suites
from safeft.eval.generate import GenSettings
from safeft.runs import rng_state, set_rng_state

if TYPE_CHECKING:
    from safeft.context import RunContext


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

            ev = self.cfg.eval
            test = suites.subset(safety_splits(seed=ev.seed).test, ev.n_harmful, ev.seed)
            self._items = test[: self.cfg.train.eval_n_harmful]
        return self._items

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and step % every == 0

    def run(self, ctx: RunContext) -> dict[str, Any]:
        ev = self.cfg.eval
        settings = GenSettings.from_eval(ev, system_prompt=self.cfg.model.system_prompt)
        out = self.run_dir / "eval_steps" / f"step-{ctx.step:06d}"
        # Sampled decoding (eval.do_sample) seeds torch's global RNG, and a judge may draw from it too:
        # restore the RNG afterwards so evaluating never changes the training trajectory.
        rng = rng_state()
        try:
            res = suites.harmful(ctx.unwrapped, ctx.tokenizer, self.items(), settings, ev.judge, out)
        finally:
            set_rng_state(rng)
        line = {"step": ctx.step, **res}
        io.append_jsonl(self.path, line)
        return line
