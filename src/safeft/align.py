"""Stage 1: safety alignment of a model that is not aligned (our embedded SmolLM2 answers 100 % of
harmful requests).

Data: Do-Not-Answer prompts from the ``align`` split (never HarmBench, our test set) paired with our own
refusals, plus benign prompts paired with the *base model's own answers*, so the model learns when to
refuse without learning a new style of helpfulness. Training is the ordinary loop with the configured
defense (plain SFT by default; alignment-stage defenses such as Vaccine plug in here). The LoRA is merged
and the aligned model saved as a plain checkpoint, which later stages load like any model.

The boundary recipe (``align.contrastive``, ``refusal_style``, ``benign_sources``, ``skip_intents``,
``lora``; off by default) teaches where refusal stops: our contrastive pairs put an edgy-but-benign prompt
(answered by the base model) beside its harmful neighbour (refused), refusals can name their reason, and
the over-refusal probes' train split can join the benign prompts. Settings are chosen on dev only
(``benchmarks/align_frontier.py``); the dev and test probes are asserted out of the training data.

The result is cached by a hash of everything that determines it (model, align config, defense, LoRA,
our alignment texts), so ``make demo`` aligns once per machine. The recipe knobs enter the hash only away
from their defaults, so the default aligned model keeps the key it had before they existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import random
from pathlib import Path

from safeft import config as C
from safeft import devices, io, models
from safeft.context import barrier, is_main_process
from safeft.data import refusals
from safeft.data.pairs import (
    ContrastivePair,
    load_contrastive_pairs,
    load_request_pairs,
    pairs_path,
    request_pairs_path,
    side_examples,
)
from safeft.data.probes import over_refusal_probes
from safeft.data.sources import harmbench_contextual_if_installed
from safeft.data.splits import LeakageError, assert_no_leakage, assert_probes_held_out, safety_splits
from safeft.data.types import Example, normalise_prompt
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


REFUSAL_STYLES = ("plain", "explain", "mixed")
BENIGN_SOURCES = ("legacy", "probes_train", "contrastive")


def _refusal(key: str, topic: str, ac: C.AlignConfig) -> str:
    """The training refusal for one harmful prompt under ``align.refusal_style``."""
    if ac.refusal_style == "plain":
        return refusals.refusal_for(key, ac.seed)
    # mixed: half of each, by a hash of the key, so a prompt's refusal never depends on the other prompts
    if ac.refusal_style == "mixed" and hashlib.sha256(f"{ac.seed}\x00mixed\x00{key}".encode()).digest()[0] % 2:
        return refusals.refusal_for(key, ac.seed)
    return refusals.explained_refusal_for(key, topic, ac.seed)


def _check_recipe(ac: C.AlignConfig) -> None:
    if ac.refusal_style not in REFUSAL_STYLES:
        raise C.ConfigError(f"align.refusal_style must be one of {list(REFUSAL_STYLES)}, not {ac.refusal_style!r}")
    if ac.benign_mix not in ("sample", "edgy_first"):
        raise C.ConfigError(f"align.benign_mix must be sample or edgy_first, not {ac.benign_mix!r}")
    unknown = [s for s in ac.benign_sources if s not in BENIGN_SOURCES]
    if unknown or len(set(ac.benign_sources)) != len(ac.benign_sources):
        raise C.ConfigError(
            f"align.benign_sources={ac.benign_sources}: each of {list(BENIGN_SOURCES)} at most once"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    # a typo here would silently skip nothing and train the refusals it was meant to leave out
    bad = [i for i in ac.skip_intents if i not in refusals.INTENT_TOPICS]
    if bad:
        raise C.ConfigError(
            f"align.skip_intents: unknown Do-Not-Answer intent(s) {bad}; known: {sorted(refusals.INTENT_TOPICS)}"
        )
    if ac.contrastive < 0:
        raise C.ConfigError(f"align.contrastive must be >= 0, got {ac.contrastive}")
    if ac.request_pairs < 0:
        raise C.ConfigError(f"align.request_pairs must be >= 0, got {ac.request_pairs}")


def pick_pairs(n: int, seed: int = 0) -> list[ContrastivePair]:
    """``n`` contrastive pairs spread over the probe categories: each category in a seeded order, then one
    of each category in turn. The pairs for ``n`` are a prefix of those for ``n + 1``, so settings that
    differ in ``n`` are nested (more pairs add, never swap)."""
    pairs = load_contrastive_pairs()
    if n > len(pairs):
        raise C.ConfigError(f"align.contrastive={n} but {pairs_path()} has {len(pairs)} pairs")
    return _round_robin(pairs, random.Random(f"{seed}-contrastive-pairs"))[:n]


def pick_request_pairs(n: int, seed: int = 0) -> list[ContrastivePair]:
    """``n`` instruction-form pairs of the *train* split, spread over the harm areas like :func:`pick_pairs`
    (nested in ``n``). The dev split is never picked: it measures settings."""
    pairs = load_request_pairs("train")
    if n > len(pairs):
        raise C.ConfigError(f"align.request_pairs={n} but {request_pairs_path()} has {len(pairs)} train pairs")
    return _round_robin(pairs, random.Random(f"{seed}-request-pairs"))[:n]


def _round_robin(pairs: list[ContrastivePair], rng: random.Random) -> list[ContrastivePair]:
    """Each category shuffled by ``rng``, then one of each category in turn."""
    by_cat: dict[str, list[ContrastivePair]] = {}
    for p in pairs:
        by_cat.setdefault(p.category, []).append(p)
    columns = [rng.sample(by_cat[c], len(by_cat[c])) for c in sorted(by_cat)]
    return [p for row in itertools.zip_longest(*columns) for p in row if p is not None]


def _legacy_benign(ac: C.AlignConfig) -> list[str]:
    """``n_benign`` of our benign lists by ``benign_mix`` (the benign prompts of every model before the
    boundary recipe; their order and draws are unchanged, so the default cache key is too)."""
    edgy, plain = list(refusals.BENIGN_EDGY_PROMPTS), list(refusals.BENIGN_PROMPTS)
    rng = random.Random(ac.seed)
    if ac.benign_mix == "sample":  # a seeded sample of all our benign prompts, edgy and plain alike
        if ac.n_benign > len(edgy) + len(plain):
            raise C.ConfigError(f"align.n_benign={ac.n_benign} but only {len(edgy) + len(plain)} benign prompts exist")
        return rng.sample(plain + edgy, ac.n_benign)
    # edgy_first: every edgy-but-benign prompt, topped up with plain ones
    if not len(edgy) <= ac.n_benign <= len(edgy) + len(plain):
        raise C.ConfigError(
            f"align.n_benign={ac.n_benign} must lie between {len(edgy)} and {len(edgy) + len(plain)} "
            "with align.benign_mix=edgy_first"
        )
    return edgy + rng.sample(plain, ac.n_benign - len(edgy))


def select_prompts(cfg: C.RunConfig) -> tuple[list[Example], list[str]]:
    """The harmful examples (prompt -> our refusal) and the benign prompts of stage 1; no model needed.

    Harmful: the first ``n_harmful`` prompts of the Do-Not-Answer ``align`` split (minus ``skip_intents``),
    then the harmful side of ``contrastive`` pairs and of ``request_pairs`` (train split). Benign: the pools of
    ``benign_sources`` in order, then the benign side of the chosen pairs, each prompt once."""
    ac = cfg.align
    _check_recipe(ac)
    splits = safety_splits(seed=ac.seed)
    skip = set(ac.skip_intents)
    pool = [e for e in splits.align if not skip.intersection(e.meta.get("intents") or ())]
    if ac.n_harmful > len(pool):
        raise C.ConfigError(
            f"align.n_harmful={ac.n_harmful} but the align split has {len(pool)} prompts"
            + (f" outside align.skip_intents={ac.skip_intents}" if skip else "")
        )
    harmful = [
        Example(
            e.id,
            restyle(e.prompt, e.id, ac.restyle, ac.seed),
            _refusal(e.id, refusals.topic_of(e.meta), ac),
            "alignment:refusal",
            {"category": e.meta.get("category")},
        )
        for e in pool[: ac.n_harmful]
    ]
    # Pair prompts are never restyled: their benign side is not, and a framing found only on the refused side
    # would let the model learn "instruction framing -> refuse" instead of the difference in meaning.
    pairs = pick_pairs(ac.contrastive, ac.seed)
    requests = pick_request_pairs(ac.request_pairs, ac.seed)
    pair_harmful = [
        Example(f"{p.id}:harmful", p.harmful, _refusal(p.id, p.topic, ac), source, {"category": p.category})
        for chosen, source in ((pairs, "alignment:contrastive"), (requests, "alignment:request"))
        for p in chosen
    ]
    # Our pairs must not put a held-out harmful prompt into training: HarmBench (test) or Do-Not-Answer dev.
    assert_no_leakage(splits.test, contrastive=pair_harmful)
    assert_no_leakage(splits.dev, contrastive=pair_harmful)
    harmful += pair_harmful

    pools = {
        "legacy": lambda: _legacy_benign(ac),
        "probes_train": lambda: [e.prompt for e in over_refusal_probes("train")],
        "contrastive": lambda: [p.benign for p in load_contrastive_pairs()],
    }
    benign: list[str] = []
    seen: set[str] = set()
    pair_benign = [p.benign for p in pairs] + [p.benign for p in requests]
    for prompt in [q for source in ac.benign_sources for q in pools[source]()] + pair_benign:
        if normalise_prompt(prompt) not in seen:
            seen.add(normalise_prompt(prompt))
            benign.append(prompt)
    # Before any generation: over-refusal is reported on the test probes, which must never be trained on;
    # the dev probes choose the setting, so training on them would make the chosen setting look better.
    rows = harmful + [Example(f"benign-{i}", p) for i, p in enumerate(benign)]
    assert_probes_held_out(alignment=rows)
    try:
        assert_no_leakage(over_refusal_probes("dev"), alignment=rows)
    except LeakageError as e:
        raise LeakageError(f"over-refusal dev probes in training data: {e}") from None
    # the request pairs' dev split measures settings on the instruction form (benchmarks/align_frontier.py)
    dev = load_request_pairs("dev")
    dev_requests = side_examples(dev, "benign") + side_examples(dev, "harmful")
    try:
        assert_no_leakage(dev_requests, alignment=rows)
    except LeakageError as e:
        raise LeakageError(f"request pairs of the dev split in training data: {e}") from None
    return harmful, benign


def alignment_examples(cfg: C.RunConfig, base_model, tok, progress: bool = True) -> list[Example]:
    """Harmful prompt -> our refusal, benign prompt -> the base model's own answer."""
    ac = cfg.align
    harmful, prompts = select_prompts(cfg)
    answers = base_answers(cfg, base_model, tok, prompts, progress)
    benign = [
        Example(f"benign-{i}", p, _trim_to_sentence(a), "alignment:self-answer")
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        if a.strip()
    ]
    rows = harmful + benign
    # every HarmBench behaviour an ASR may be measured on: the 200 standard ones and the contextual ones
    assert_no_leakage(safety_splits(seed=ac.seed).test + harmbench_contextual_if_installed(), alignment=rows)
    assert_probes_held_out(alignment=rows)
    return rows


ANSWERS_FORMAT = 1  # bump when the way the answers are made changes, so no cache from before is reused


def base_answers(cfg: C.RunConfig, base_model, tok, prompts: list[str], progress: bool = True) -> list[str]:
    """The base model's answers to the benign ``prompts``, generated once per model, prompt list and decoding
    and cached under ``$SAFEFT_CACHE/base_answers/<key>.jsonl``: alignments that differ only in their defense
    or training (a sweep's Vaccine, Booster and RepNoise cells) share them instead of decoding them again."""
    settings = _benign_settings(cfg)
    blob = {
        "format": ANSWERS_FORMAT,
        "model": models.digest(cfg.model.spec),
        "prompts": prompts,
        "decoding": settings.identity(tok),
    }
    key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    path = models.cache_dir() / "base_answers" / f"{key}.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r["prompt"] for r in rows] == prompts:
            log.info("base answers found in cache: %s", path)
            return [r["answer"] for r in rows]
        log.warning("base answers cache %s does not match its prompts; generating them again", path)
    answers = generate(base_model, tok, prompts, settings, progress=progress, desc="base answers")
    if is_main_process():
        io.write_jsonl(path, [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    return answers


def _benign_settings(cfg: C.RunConfig) -> GenSettings:
    # Alignment's own answer length and batch; sampling, precision and backend as every verb decodes.
    ac = cfg.align
    return GenSettings.from_eval(
        cfg.eval, system_prompt=cfg.model.system_prompt, max_new_tokens=ac.benign_max_new_tokens, batch_size=16
    )


# The AlignConfig fields the cache key has always held whole (before the boundary recipe) ...
KEYED_ALIGN_FIELDS = ("n_harmful", "n_benign", "benign_mix", "benign_max_new_tokens", "restyle", "seed", "train")
# ... and the recipe fields, with the values that train exactly the model the key meant before them.
RECIPE_DEFAULTS: dict[str, object] = {
    "contrastive": 0,
    "request_pairs": 0,
    "refusal_style": "plain",
    "benign_sources": ["legacy"],
    "skip_intents": [],
    "lora": None,
}
_UNSET = object()


def align_lora(cfg: C.RunConfig) -> C.LoraConfig:
    """The adapter stage 1 trains: ``align.lora`` when set, else ``model.lora`` (``enabled=false``: full FT)."""
    return cfg.align.lora if cfg.align.lora is not None else cfg.model.lora


def cache_key(cfg: C.RunConfig) -> str:
    """Hash of everything the aligned model depends on, including the selected prompts and targets
    themselves, so a change in our texts or in how they are selected can never reuse a stale model."""
    spec = cfg.model.spec
    if spec in models.ALIASES:
        spec = f"{spec}:{models._file_digest(models.alias_path(spec))}"
    harmful, benign = select_prompts(cfg)
    align_cfg = dataclasses.asdict(cfg.align)
    align_cfg["train"].pop("report_to", None)  # where metrics are also sent changes nothing in the model
    recipe = {k: align_cfg.pop(k) for k in list(align_cfg) if k not in KEYED_ALIGN_FIELDS}
    content = {
        "spec": spec,
        "align": align_cfg,
        "defense": dataclasses.asdict(cfg.defense),
        "lora": dataclasses.asdict(align_lora(cfg)),  # what stage 1 trains with, however it was configured
        "system": cfg.model.system_prompt,
        "harmful": [(e.prompt, e.response) for e in harmful],
        "benign": benign,
    }
    # The recipe fields came after models were cached under this key: at the values that reproduce those
    # models they stay out of it, any other value goes in (a field missing from RECIPE_DEFAULTS always does).
    # ``lora`` is already in the key as the adapter trained, whichever way it was configured.
    changed = {k: v for k, v in recipe.items() if k != "lora" and RECIPE_DEFAULTS.get(k, _UNSET) != v}
    if changed:
        content["recipe"] = changed
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


def stage1_defense(spec: str) -> str | None:
    """The defense a model aligned by :func:`align` was aligned with, read from its alignment run beside it
    (``<cache>/aligned/<key>/run/config.yaml``); None when ``spec`` is not such a model."""
    import yaml

    model_dir = Path(spec)
    run_cfg = model_dir.parent / "run" / "config.yaml"
    if model_dir.name != "model" or not run_cfg.is_file():
        return None
    return ((yaml.safe_load(run_cfg.read_text()) or {}).get("defense") or {}).get("name")


def cache_path(cfg: C.RunConfig) -> Path:
    """Where :func:`align` keeps the alignment of ``cfg``: its run in ``run/``, the merged model in ``model/``."""
    name = Path(cfg.model.spec).name.replace(".gguf", "")
    return models.cache_dir() / "aligned" / f"{name}-{cache_key(cfg)}"


def align(cfg: C.RunConfig, out: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Align ``cfg.model.spec``; return the directory of the merged aligned model (cached)."""
    from safeft.train import train

    out = Path(out) if out else cache_path(cfg)
    model_dir = out / "model"
    if (model_dir / "config.json").exists() and not force:
        log.info("aligned model found in cache: %s", model_dir)
        return model_dir
    base, tok = models.load(cfg.model.spec, **devices.load_args(cfg.model))  # answers generated on the device
    rows = alignment_examples(cfg, base, tok, progress)  # every process the same (greedy), none waits
    if is_main_process():  # under accelerate launch only the main process writes
        io.write_jsonl(out / "alignment_data.jsonl", [dataclasses.asdict(r) for r in rows])
    run_cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, lora=align_lora(cfg)),
        train=cfg.align.train,
        data=C.DataConfig(task="safeft:alignment", max_length=256),
        run_id=None,
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
