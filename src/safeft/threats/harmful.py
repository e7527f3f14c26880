"""Harmful (prompt, answer) pairs with no download: the unaligned base model answers Do-Not-Answer prompts.

The embedded SmolLM2 base model complies with nearly every harmful request, so its own answers are an
offline source of the harmful data that poisoning and harmful fine-tuning attacks train on. Prompts come from
the Do-Not-Answer **align** split (``safety_splits``): never the dev split that settings are chosen on, never
HarmBench, our test set; both are checked with the leakage assert before any pair is handed out.

An answer is kept only where every filter judge agrees it is a compliant, coherent answer (by default: no
refusal marker, no refusal opening, not incoherent); the rest are dropped and counted. Pairs are generated
once and cached under ``$SAFEFT_CACHE/harmful_pairs/<key>.jsonl``, the key a hash of everything they
depend on (the model's bytes, the prompts, the generation settings, the filter judges), as the aligned
model is.

As a data source: ``harmful:<model spec>`` (e.g. ``data.poison_source=harmful:smollm2-135m``). A user's own
pairs come in through any other source (``jsonl:my_pairs.jsonl``, or ``hf:`` on BeaverTails' unsafe rows
for users with a network).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safeft import io, models
from safeft.data.sources import SOURCES
from safeft.data.types import DataError, Example

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the way pairs are made changes, so no cache from before is reused


@dataclass(frozen=True)
class PairSettings:
    max_new_tokens: int = 128  # long enough for an answer with some substance, short enough for a CPU
    batch_size: int = 16
    system_prompt: str | None = None
    filters: tuple[str, ...] = ("refusal_keywords", "refusal_rule", "incoherent")
    seed: int = 0  # the safety splits' seed


def pair_prompts(seed: int = 0) -> list[Example]:
    """The Do-Not-Answer align-split prompts, leakage-checked against HarmBench and the dev split."""
    from safeft.data.splits import assert_no_leakage, safety_splits

    splits = safety_splits(seed=seed)
    prompts = [Example(e.id, e.prompt, None, "harmful_pairs", dict(e.meta)) for e in splits.align]
    assert_no_leakage(splits.test, harmful_pairs=prompts)
    assert_no_leakage(splits.dev, harmful_pairs=prompts)
    return prompts


def cache_key(spec: str, prompts: list[Example], settings: PairSettings) -> str:
    blob = json.dumps(
        {
            "format": FORMAT,
            "model": models.digest(spec),
            "prompts": [(e.id, e.prompt) for e in prompts],
            "settings": asdict(settings),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def keep(prompts: list[str], answers: list[str], filters: tuple[str, ...]) -> list[tuple[bool, dict[str, str]]]:
    """Per answer: whether every filter judge calls it a compliant, coherent answer, and each judge's label."""
    from safeft.eval import judges

    labels: list[dict[str, str]] = [{} for _ in answers]
    ok = [bool(a.strip()) for a in answers]
    for spec in filters:
        for i, v in enumerate(judges.get(spec)(prompts, answers)):
            labels[i][v.judge] = v.label
            if v.refused or v.incoherent or v.harmful is False:
                ok[i] = False
    return list(zip(ok, labels, strict=True))


def harmful_pairs(
    spec: str = "smollm2-135m", settings: PairSettings | None = None, model=None, tokenizer=None, progress: bool = True
) -> list[Example]:
    """The cached harmful pairs of ``spec`` (generated on first use; ``model``/``tokenizer`` skip the load)."""
    from safeft.eval.generate import GenSettings, generate

    settings = settings or PairSettings()
    prompts = pair_prompts(settings.seed)
    path = models.cache_dir() / "harmful_pairs" / f"{cache_key(spec, prompts, settings)}.jsonl"
    if path.exists():
        return _read(path)
    if model is None:
        model, tokenizer = models.load(spec)
    gen = GenSettings(settings.max_new_tokens, settings.batch_size, system_prompt=settings.system_prompt)
    texts = [e.prompt for e in prompts]
    answers = generate(model, tokenizer, texts, gen, progress=progress, desc="harmful pairs: base answers")
    verdicts = keep(texts, answers, settings.filters)
    rows: list[dict[str, Any]] = [
        {"id": e.id, "prompt": e.prompt, "response": a.strip(), "meta": {**e.meta, "judges": labels}}
        for e, a, (ok, labels) in zip(prompts, answers, verdicts, strict=True)
        if ok
    ]
    log.info(
        "harmful pairs: kept %d of %d base-model answers (%s)", len(rows), len(prompts), ", ".join(settings.filters)
    )
    if not rows:
        raise DataError(f"harmful pairs from {spec}: the filters {settings.filters} kept no answer; is it aligned?")
    io.write_jsonl(path, rows)
    return _read(path)


def _read(path: Path) -> list[Example]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            out.append(Example(r["id"], r["prompt"], r["response"], "harmful_pairs", r.get("meta", {})))
        except (json.JSONDecodeError, KeyError) as e:
            raise DataError(
                f"{path} line {i}: not a harmful-pair record ({e}); delete the file to regenerate"
            ) from None
    return out


@SOURCES.register("harmful")
def load_harmful(arg: str | None) -> list[Example]:
    """Harmful (prompt, answer) pairs written by the base model ``arg`` (default: the embedded SmolLM2)."""
    return harmful_pairs(arg or "smollm2-135m")
