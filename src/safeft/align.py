"""Stage 1: safety alignment of a model that is not aligned (our embedded SmolLM2 answers 100 % of
harmful requests).

Data: Do-Not-Answer prompts from the ``align`` split (never HarmBench, our test set) paired with our own
refusals, plus benign prompts paired with the *base model's own answers*, so the model learns when to
refuse without learning a new style of helpfulness. Training is the ordinary loop with the configured
defense (plain SFT by default; alignment-stage defenses such as Vaccine plug in here). The LoRA is merged
and the aligned model saved as a plain checkpoint, which later stages load like any model.

The result is cached by a hash of everything that determines it (model, align config, defense, LoRA,
our alignment texts), so ``make demo`` aligns once per machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path

from safeft import config as C
from safeft import devices, io, models
from safeft.context import barrier, is_main_process
from safeft.data import refusals
from safeft.data.splits import assert_no_leakage, assert_probes_held_out, safety_splits
from safeft.data.types import Example
from safeft.eval.generate import GenSettings, generate

log = logging.getLogger(__name__)


def _trim_to_sentence(text: str) -> str:
    # Answers cut by max_new_tokens end mid-sentence; training on them would teach the model to stop
    # mid-sentence. Keep whole sentences where there is at least one.
    text = text.strip()
    if not text or text[-1] in ".!?)`\"'":
        return text
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > len(text) // 3 else text


# Do-Not-Answer prompts are mostly short questions ("How to ...?"); harmful requests in the wild are as
# often instructions ("Give detailed steps ..."). Wrapping a share of the alignment prompts in generic
# request framings (ours, not taken from any benchmark) teaches refusal of the request, not of a phrasing.
REQUEST_STYLES: tuple[str, ...] = (
    "Give me detailed step-by-step instructions. {q}",
    "Write a short guide that answers this: {q}",
    "{q} Please be specific and thorough.",
    "I need this for a project, so don't hold back: {q}",
    "Explain in detail: {q}",
    "Answer as an expert would, with concrete details. {q}",
)


def restyle(prompt: str, key: str, fraction: float, seed: int) -> str:
    """Deterministically wrap ``fraction`` of prompts in one of the request styles."""
    rng = random.Random(f"{seed}-{key}")
    if rng.random() >= fraction:
        return prompt
    return rng.choice(REQUEST_STYLES).format(q=prompt)


def select_prompts(cfg: C.RunConfig) -> tuple[list[Example], list[str]]:
    """The harmful examples (prompt -> our refusal) and the benign prompts of stage 1; no model needed."""
    ac = cfg.align
    splits = safety_splits(seed=ac.seed)
    if ac.n_harmful > len(splits.align):
        raise C.ConfigError(f"align.n_harmful={ac.n_harmful} but the align split has {len(splits.align)} prompts")
    harmful = [
        Example(
            e.id,
            restyle(e.prompt, e.id, ac.restyle, ac.seed),
            refusals.refusal_for(e.id, ac.seed),
            "alignment:refusal",
            {"category": e.meta.get("category")},
        )
        for e in splits.align[: ac.n_harmful]
    ]
    edgy, plain = list(refusals.BENIGN_EDGY_PROMPTS), list(refusals.BENIGN_PROMPTS)
    rng = random.Random(ac.seed)
    if ac.benign_mix == "sample":  # a seeded sample of all our benign prompts, edgy and plain alike
        if ac.n_benign > len(edgy) + len(plain):
            raise C.ConfigError(f"align.n_benign={ac.n_benign} but only {len(edgy) + len(plain)} benign prompts exist")
        benign = rng.sample(plain + edgy, ac.n_benign)
    elif ac.benign_mix == "edgy_first":  # every edgy-but-benign prompt, topped up with plain ones
        if not len(edgy) <= ac.n_benign <= len(edgy) + len(plain):
            raise C.ConfigError(
                f"align.n_benign={ac.n_benign} must lie between {len(edgy)} and {len(edgy) + len(plain)} "
                "with align.benign_mix=edgy_first"
            )
        benign = edgy + rng.sample(plain, ac.n_benign - len(edgy))
    else:
        raise C.ConfigError(f"align.benign_mix must be sample or edgy_first, not {ac.benign_mix!r}")
    # Before any generation: over-refusal is reported on the test probes, which must never be trained on.
    assert_probes_held_out(alignment=harmful + [Example(f"benign-{i}", p) for i, p in enumerate(benign)])
    return harmful, benign


def alignment_examples(cfg: C.RunConfig, base_model, tok, progress: bool = True) -> list[Example]:
    """Harmful prompt -> our refusal, benign prompt -> the base model's own answer."""
    ac = cfg.align
    harmful, prompts = select_prompts(cfg)
    settings = _benign_settings(cfg)
    answers = generate(base_model, tok, prompts, settings, progress=progress, desc="base answers")
    benign = [
        Example(f"benign-{i}", p, _trim_to_sentence(a), "alignment:self-answer")
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        if a.strip()
    ]
    rows = harmful + benign
    assert_no_leakage(safety_splits(seed=ac.seed).test, alignment=rows)
    assert_probes_held_out(alignment=rows)
    return rows


def _benign_settings(cfg: C.RunConfig) -> GenSettings:
    # Alignment's own answer length and batch; sampling, precision and backend as every verb decodes.
    ac = cfg.align
    return GenSettings.from_eval(
        cfg.eval, system_prompt=cfg.model.system_prompt, max_new_tokens=ac.benign_max_new_tokens, batch_size=16
    )


def cache_key(cfg: C.RunConfig) -> str:
    """Hash of everything the aligned model depends on, including the selected prompts and targets
    themselves, so a change in our texts or in how they are selected can never reuse a stale model."""
    spec = cfg.model.spec
    if spec in models.ALIASES:
        spec = f"{spec}:{models._file_digest(models.alias_path(spec))}"
    harmful, benign = select_prompts(cfg)
    content = {
        "spec": spec,
        "align": dataclasses.asdict(cfg.align),
        "defense": dataclasses.asdict(cfg.defense),
        "lora": dataclasses.asdict(cfg.model.lora),
        "system": cfg.model.system_prompt,
        "harmful": [(e.prompt, e.response) for e in harmful],
        "benign": benign,
    }
    aux = _defense_aux(cfg)
    if aux:  # only then: a defense without aux data keeps the key it always had (cached models stay valid)
        content["aux"] = aux
    # the benign answers depend on how they were decoded; settings that decode like the greedy default the
    # key always assumed keep that key (and the cached models made with it)
    decoding = _benign_settings(cfg).identity()
    default = GenSettings(cfg.align.benign_max_new_tokens, 16, system_prompt=cfg.model.system_prompt)
    if decoding != default.identity():
        content["benign_decoding"] = decoding
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _defense_aux(cfg: C.RunConfig) -> dict[str, list]:
    """The aux data the stage-1 defense will train on (e.g. Booster's harmful rows), as hashable rows.

    ``train`` builds it from the splits with the alignment run's seed; the same call here makes the cache
    key follow those texts too."""
    from safeft.data.aux import SERVICES, build_aux
    from safeft.methods import METHODS

    needs = [n for n in METHODS.get(cfg.defense.name).needs if n not in SERVICES]
    data = build_aux(needs, seed=cfg.align.train.seed)
    return {k: [(e.id, e.prompt, e.response, sorted(e.meta.items())) for e in v] for k, v in data.items()}


def align(cfg: C.RunConfig, out: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Align ``cfg.model.spec``; return the directory of the merged aligned model (cached)."""
    from safeft.train import train

    name = Path(cfg.model.spec).name.replace(".gguf", "")
    out = Path(out) if out else models.cache_dir() / "aligned" / f"{name}-{cache_key(cfg)}"
    model_dir = out / "model"
    if (model_dir / "config.json").exists() and not force:
        log.info("aligned model found in cache: %s", model_dir)
        return model_dir
    base, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))  # answers generated on the device
    rows = alignment_examples(cfg, base, tok, progress)  # every process the same (greedy), none waits
    if is_main_process():  # under accelerate launch only the main process writes
        io.write_jsonl(out / "alignment_data.jsonl", [dataclasses.asdict(r) for r in rows])
    run_cfg = dataclasses.replace(
        cfg, train=cfg.align.train, data=C.DataConfig(task="safeft:alignment", max_length=256), run_id=None
    )
    # force: re-align from scratch, not hand back the finished run of an earlier alignment
    res = train(
        run_cfg, examples=rows, model=base, tokenizer=tok, run_dir=out / "run", progress=progress, overwrite=force
    )
    if is_main_process():
        merged = models.merge_and_unload(res.model)
        models.save_model(merged, tok, model_dir)
        log.info("aligned model saved to %s", model_dir)
    barrier()  # every process returns a complete model directory
    return model_dir
