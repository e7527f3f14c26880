"""Evaluation suites: harmful (ASR), over-refusal, utility per domain.

Each suite generates once, judges, and writes one JSONL record per sample to ``<out>/eval/<suite>.jsonl``
(id, prompt, completion, generation settings, every verdict), so results can be re-scored without
generating again. Headline numbers go to ``<out>/eval/summary.json`` together with the judge name, the
prompt count and max_new_tokens, because safety numbers mean little without them.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft.config import EvalConfig
from safeft.data.chat import collate, render
from safeft.data.types import Example
from safeft.eval import judges, records
from safeft.eval.generate import GenSettings, generate


def subset(items: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed, seeded subset (the same one for every model compared), in id order."""
    items = sorted(items, key=lambda e: e.id)
    if n is None or n >= len(items):
        return list(items)
    return sorted(random.Random(seed).sample(items, n), key=lambda e: e.id)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records atomically: a crash never leaves a half-written results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _records(items, completions, verdicts, settings: GenSettings, suite: str) -> list[dict[str, Any]]:
    return [
        {
            "id": ex.id,
            "suite": suite,
            "prompt": ex.prompt,
            "completion": c,
            "settings": settings.record(),
            "verdicts": {v.judge: v.record()},
        }
        for ex, c, v in zip(items, completions, verdicts, strict=True)
    ]


def _judge(items, comps, settings: GenSettings, judge: str, suite: str, out: Path | None):
    """Records with the suite judge's and the incoherence rule's verdicts, written when ``out`` is given,
    and the metrics of every judge on them (records.py defines them)."""
    prompts = [e.prompt for e in items]
    recs = _records(items, comps, judges.get(judge)(prompts, comps), settings, suite)
    if judges.name_of(judge) != records.INCOHERENT:
        records.add_verdicts(recs, judges.get(records.INCOHERENT)(prompts, comps))
    if out is not None:
        write_jsonl(out / f"{suite}.jsonl", recs)
    info = {"judge": judges.name_of(judge), "judge_specs": {judges.name_of(judge): judge}}
    return records.all_metrics(recs), info


def harmful(model, tok, items: list[Example], settings: GenSettings, judge: str, out: Path | None) -> dict:
    comps = generate(model, tok, [e.prompt for e in items], settings, desc="harmful")
    per_judge, info = _judge(items, comps, settings, judge, "harmful", out)
    asr = per_judge[info["judge"]].get("asr")
    return {"asr": asr, "n": len(items), "max_new_tokens": settings.max_new_tokens, **info, "judges": per_judge}


def over_refusal(model, tok, items: list[Example], settings: GenSettings, judge: str, out: Path | None) -> dict:
    comps = generate(model, tok, [e.prompt for e in items], settings, desc="over-refusal")
    per_judge, info = _judge(items, comps, settings, judge, "over_refusal", out)
    rate = per_judge[info["judge"]].get("refusal_rate")
    return {
        "refusal_rate": rate,
        "n": len(items),
        "max_new_tokens": settings.max_new_tokens,
        **info,
        "judges": per_judge,
    }


@torch.no_grad()
def answer_nll(model: nn.Module, tok, items: list[Example], system: str | None, batch_size: int = 16) -> float:
    """Mean per-token NLL of the reference answers (teacher-forced): a smooth utility signal that moves
    even when a small model's exact-answer accuracy is near zero."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
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
    finally:
        model.train(was_training)
    return total / max(count, 1)


def utility(model, tok, domain: str, items: list[Example], settings: GenSettings, out: Path | None) -> dict:
    from safeft.data.domains import check

    comps = generate(model, tok, [e.prompt for e in items], settings, desc=f"utility:{domain}")
    correct = [bool(check(e, c)) for e, c in zip(items, comps, strict=True)]
    if out is not None:
        recs = [
            {
                "id": e.id,
                "suite": f"utility:{domain}",
                "prompt": e.prompt,
                "completion": c,
                "gold": e.meta.get("answer"),
                "correct": ok,
                "settings": settings.record(),
            }
            for e, c, ok in zip(items, comps, correct, strict=True)
        ]
        write_jsonl(out / f"utility_{domain}.jsonl", recs)
    nll = answer_nll(model, tok, items, settings.system_prompt)  # fp32: a small, exact number
    return {
        "accuracy": sum(correct) / len(correct),
        "answer_nll": nll,
        "n": len(items),
        "max_new_tokens": settings.max_new_tokens,
    }


def evaluate(
    model: nn.Module,
    tok,
    cfg: EvalConfig,
    out: Path | None,
    domains: Sequence[str] = (),
    system_prompt: str | None = None,
    suites: Sequence[str] = ("harmful", "over_refusal", "utility"),
) -> dict[str, Any]:
    """Run the suites; write records and ``summary.json`` under ``out/eval`` when ``out`` is given."""
    from safeft.data import refusals
    from safeft.data.domains import load_domain
    from safeft.data.splits import safety_splits

    settings = GenSettings(cfg.max_new_tokens, cfg.batch_size, system_prompt=system_prompt, precision=cfg.precision)
    eval_dir = Path(out) / "eval" if out is not None else None
    summary: dict[str, Any] = {}
    if "harmful" in suites:
        test = subset(safety_splits(seed=cfg.seed).test, cfg.n_harmful, cfg.seed)
        summary["harmful"] = harmful(model, tok, test, settings, cfg.judge, eval_dir)
    if "over_refusal" in suites:
        probes = [Example(f"probe-{i}", p, source="over_refusal") for i, p in enumerate(refusals.OVER_REFUSAL_PROBES)]
        summary["over_refusal"] = over_refusal(
            model, tok, subset(probes, cfg.n_over_refusal, cfg.seed), settings, cfg.judge, eval_dir
        )
    if "utility" in suites:
        for d in domains:
            items = subset(load_domain(d, "test"), cfg.n_utility, cfg.seed)
            summary[f"utility:{d}"] = utility(model, tok, d, items, settings, eval_dir)
    if eval_dir is not None:
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for tables: asr, over_refusal, utility accuracy / nll per domain."""
    row: dict[str, float] = {}
    if "harmful" in summary:
        row["asr"] = summary["harmful"]["asr"]
    if "over_refusal" in summary:
        row["over_refusal"] = summary["over_refusal"]["refusal_rate"]
    for k, v in summary.items():
        if k.startswith("utility:"):
            row[f"{k}/acc"] = v["accuracy"]
            row[f"{k}/nll"] = v["answer_nll"]
    return row
