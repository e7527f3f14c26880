"""Stage-1 data selection and the aligned-model cache key (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest

from safeft import align
from safeft import config as C
from safeft.data import refusals
from safeft.data.pairs import load_contrastive_pairs
from safeft.data.splits import LeakageError, safety_splits
from safeft.data.types import normalise_prompt


def cfg(*extra: str) -> C.RunConfig:
    # The legacy recipe (128 + 48 rows, plain refusals): the knobs below are tested against the model they
    # were added to; the default recipe (the dev-chosen boundary recipe) has tests of its own.
    return C.load(overrides=["model.spec=/some/model/dir", *C.LEGACY_ALIGN, *extra])


def default_cfg(*extra: str) -> C.RunConfig:
    return C.load(overrides=["model.spec=/some/model/dir", *extra])


def test_selection_is_deterministic_and_never_holds_a_test_prompt():
    h1, b1 = align.select_prompts(cfg())
    h2, b2 = align.select_prompts(cfg())
    assert [e.prompt for e in h1] == [e.prompt for e in h2] and b1 == b2
    assert len(h1) == 128 and len(b1) == 48
    assert all(e.response in refusals.REFUSALS for e in h1)
    test = {normalise_prompt(e.prompt) for e in safety_splits().test}
    assert not any(normalise_prompt(e.prompt) in test for e in h1)


def test_restyle_wraps_about_the_requested_share():
    harmful, _ = align.select_prompts(cfg("align.restyle=0.5"))
    raw = {e.id: e.prompt for e in safety_splits().align}
    wrapped = sum(e.prompt != raw[e.id] for e in harmful)
    assert 40 <= wrapped <= 88  # 128 draws at p = 0.5
    plain, _ = align.select_prompts(cfg("align.restyle=0"))
    assert all(e.prompt == raw[e.id] for e in plain)


def test_edgy_first_takes_every_edgy_prompt():
    _, benign = align.select_prompts(cfg("align.benign_mix=edgy_first", "align.n_benign=40"))
    assert set(refusals.BENIGN_EDGY_PROMPTS) <= set(benign) and len(benign) == 40
    with pytest.raises(C.ConfigError, match="must lie between"):
        align.select_prompts(cfg("align.benign_mix=edgy_first", "align.n_benign=10"))
    with pytest.raises(C.ConfigError, match="benign_mix must be"):
        align.select_prompts(cfg("align.benign_mix=random"))


def test_cache_key_follows_the_data_not_just_the_config(monkeypatch):
    base = align.cache_key(cfg())
    assert align.cache_key(cfg()) == base
    assert align.cache_key(cfg("align.train.lr=1e-4")) != base
    # same config, different texts: the key must change (a stale aligned model is never reused)
    monkeypatch.setattr(refusals, "BENIGN_PROMPTS", tuple(p + " Please." for p in refusals.BENIGN_PROMPTS))
    assert align.cache_key(cfg()) != base


def test_trim_to_sentence():
    assert align._trim_to_sentence("One. Two. Three is cut") == "One. Two."
    assert align._trim_to_sentence("Complete.") == "Complete."
    assert align._trim_to_sentence("no stop at all") == "no stop at all"


# ----------------------------------------------------------------------------- the boundary recipe

# The keys of the first aligned models (computed before the recipe fields existed): the legacy recipe must
# keep them, so models cached under them stay valid. DEFAULT_KEY is the default recipe's, chosen on dev in
# docs/results.md: a default config that hashes differently would silently make the default another model.
# Change these only on purpose, with docs/results.md.
LEGACY_KEY = "7df6a2c549df"
EDGY_FIRST_80_KEY = "3b00ad10f20b"
DEFAULT_KEY = "9a500d9293f2"  # round 5's pick (96 steps, answers of up to 40 tokens)
ROUND2_KEY = "02a635a561aa"  # round 2's pick, the default until round 5: every earlier table stands on it
ROUND4_KEY = "5e685f2a2bba"  # round 4's dev choice, never the default (docs/results.md)


def test_default_config_is_the_dev_chosen_recipe():
    assert align.cache_key(default_cfg()) == DEFAULT_KEY
    assert align.cache_key(default_cfg(*C.ROUND2_ALIGN)) == ROUND2_KEY
    assert align.cache_key(default_cfg(*C.ROUND4_ALIGN)) == ROUND4_KEY
    a = default_cfg().align
    assert (a.n_harmful, a.contrastive, a.refusal_style, a.train.steps, a.lora.r) == (320, 132, "explain", 96, 32)
    assert (a.benign_max_new_tokens, a.train.lr) == (40, 6e-4)
    assert (a.request_pairs, a.restyle) == (0, 0.5)
    harmful, benign = align.select_prompts(default_cfg())
    assert len(harmful) == 320 + 132 and 48 + 118 < len(benign) <= 48 + 118 + 132


def test_round4_recipe_adds_the_request_pairs_and_no_framings():
    harmful, benign = align.select_prompts(default_cfg(*C.ROUND4_ALIGN))
    # benign: our 48, the probes' 118 train prompts, both pair files' benign sides (each prompt once)
    assert len(harmful) == 320 + 132 + 168 and 48 + 118 + 168 < len(benign) <= 48 + 118 + 132 + 168
    raw = {e.prompt for e in safety_splits().align}  # restyle 0: Do-Not-Answer prompts as asked
    assert all(e.prompt in raw for e in harmful if e.source == "alignment:refusal")


def test_legacy_recipe_keeps_the_key_of_the_first_aligned_models():
    assert align.cache_key(cfg()) == LEGACY_KEY
    assert align.cache_key(cfg("align.benign_mix=edgy_first", "align.n_benign=80")) == EDGY_FIRST_80_KEY
    # the recipe's "off" values spelled out are the default, and so is an align.lora equal to model.lora
    spelled = cfg(
        "align.contrastive=0",
        "align.refusal_style=plain",
        "align.benign_sources=[legacy]",
        "align.skip_intents=[]",
        "align.lora.r=16",
        "align.lora.alpha=32",
    )
    assert align.cache_key(spelled) == LEGACY_KEY


def test_recipe_defaults_are_the_legacy_values_and_every_field_is_keyed():
    legacy = dataclasses.asdict(cfg().align)
    assert {k: legacy[k] for k in align.RECIPE_DEFAULTS} == align.RECIPE_DEFAULTS
    defaults = dataclasses.asdict(C.AlignConfig())
    # a field in neither list would enter the key at its default value and move the default key
    assert set(defaults) == set(align.KEYED_ALIGN_FIELDS) | set(align.RECIPE_DEFAULTS)


@pytest.mark.parametrize(
    "override",
    [
        "align.contrastive=12",
        "align.request_pairs=12",
        "align.refusal_style=explain",
        "align.refusal_style=mixed",
        "align.benign_sources=[legacy,probes_train]",
        "align.benign_sources=[probes_train]",
        "align.skip_intents=[S002med]",
        "align.lora.r=32",
        "align.lora.enabled=false",
    ],
)
def test_every_recipe_knob_enters_the_key(override):
    assert align.cache_key(cfg(override)) != LEGACY_KEY


def test_align_lora_is_what_stage_one_trains():
    assert align.align_lora(cfg()) == cfg().model.lora
    assert align.align_lora(cfg("align.lora.enabled=false")).enabled is False
    assert align.align_lora(cfg("align.lora.r=8")).r == 8 and cfg("align.lora.r=8").model.lora.r == 16


def test_pick_pairs_is_seeded_nested_and_spread_over_categories():
    all_pairs = load_contrastive_pairs()
    twelve = align.pick_pairs(12)
    assert len({p.category for p in twelve}) == 12  # one of each category first
    assert align.pick_pairs(40)[:12] == twelve and align.pick_pairs(12) == twelve
    assert align.pick_pairs(12, seed=1) != twelve
    assert sorted(p.id for p in align.pick_pairs(len(all_pairs))) == sorted(p.id for p in all_pairs)
    with pytest.raises(C.ConfigError, match="align.contrastive"):
        align.pick_pairs(len(all_pairs) + 1)


def test_contrastive_pairs_add_a_refused_and_an_answered_prompt_each():
    base_h, base_b = align.select_prompts(cfg())
    harmful, benign = align.select_prompts(cfg("align.contrastive=24"))
    pairs = align.pick_pairs(24)
    assert harmful[: len(base_h)] == base_h and benign[: len(base_b)] == base_b
    added = harmful[len(base_h) :]
    assert [e.prompt for e in added] == [p.harmful for p in pairs]  # never restyled
    assert all(e.source == "alignment:contrastive" and e.response in refusals.REFUSALS for e in added)
    assert benign[len(base_b) :] == [p.benign for p in pairs]


def test_request_pairs_add_train_pairs_only_spread_nested_and_checked():
    from safeft.data.pairs import load_request_pairs

    base_h, base_b = align.select_prompts(cfg())
    harmful, benign = align.select_prompts(cfg("align.request_pairs=24"))
    pairs = align.pick_request_pairs(24)
    assert len({p.category for p in pairs[:12]}) == 12 and align.pick_request_pairs(48)[:24] == pairs
    assert all(p.split == "train" for p in align.pick_request_pairs(len(load_request_pairs("train"))))
    assert harmful[: len(base_h)] == base_h and benign[: len(base_b)] == base_b
    added = harmful[len(base_h) :]
    assert [e.prompt for e in added] == [p.harmful for p in pairs]
    assert all(e.source == "alignment:request" and e.response in refusals.REFUSALS for e in added)
    assert benign[len(base_b) :] == [p.benign for p in pairs]
    with pytest.raises(C.ConfigError, match="align.request_pairs"):
        align.pick_request_pairs(len(load_request_pairs("train")) + 1)
    with pytest.raises(C.ConfigError, match="align.request_pairs must be >= 0"):
        align.select_prompts(cfg("align.request_pairs=-1"))


def test_a_dev_request_pair_in_training_data_fails(monkeypatch):
    from safeft.data.pairs import load_request_pairs

    # a dev pair filed under train by mistake (same prompts, new id) is caught by its text
    train, dev = load_request_pairs("train"), load_request_pairs("dev")
    moved = dataclasses.replace(dev[0], id="moved", split="train")
    monkeypatch.setattr(align, "load_request_pairs", lambda split=None: [*train, moved] if split == "train" else dev)
    with pytest.raises(LeakageError, match="request pairs of the dev split"):
        align.select_prompts(cfg(f"align.request_pairs={len(train) + 1}"))


def test_explain_style_names_the_topic_and_mixed_uses_both():
    harmful, _ = align.select_prompts(cfg("align.refusal_style=explain", "align.contrastive=24"))
    raw = {e.id: e for e in safety_splits().align}
    topics = {p.id + ":harmful": p.topic for p in load_contrastive_pairs()}
    for e in harmful:
        topic = topics[e.id] if e.id in topics else refusals.topic_of(raw[e.id].meta)
        assert e.response in refusals.EXPLAINED_REFUSALS[topic], (e.id, topic, e.response)
    mixed, _ = align.select_prompts(cfg("align.refusal_style=mixed"))
    explained = {t for texts in refusals.EXPLAINED_REFUSALS.values() for t in texts}
    n_explained = sum(e.response in explained for e in mixed)
    assert 40 <= n_explained <= 88 and all(e.response in explained or e.response in refusals.REFUSALS for e in mixed)


def test_benign_sources_add_the_probe_train_split_and_never_dev_or_test():
    from safeft.data.probes import over_refusal_probes

    _, benign = align.select_prompts(cfg("align.benign_sources=[legacy,probes_train]"))
    train = [e.prompt for e in over_refusal_probes("train")]
    assert benign[48:] == train
    held_out = {normalise_prompt(e.prompt) for s in ("dev", "test") for e in over_refusal_probes(s)}
    assert not held_out & {normalise_prompt(p) for p in benign}
    _, only_pairs = align.select_prompts(cfg("align.benign_sources=[contrastive]"))
    assert only_pairs == [p.benign for p in load_contrastive_pairs()]
    _, none = align.select_prompts(cfg("align.benign_sources=[]"))
    assert none == []


def test_skip_intents_leaves_those_prompts_out():
    harmful, _ = align.select_prompts(cfg("align.skip_intents=[S002med,S002legal,S002fin]"))
    raw = {e.id: e for e in safety_splits().align}
    assert len(harmful) == 128
    assert not any({"S002med", "S002legal", "S002fin"} & set(raw[e.id].meta["intents"]) for e in harmful)
    base, _ = align.select_prompts(cfg())
    assert any("S002med" in raw[e.id].meta["intents"] for e in base)  # the knob did something
    with pytest.raises(C.ConfigError, match="unknown Do-Not-Answer intent"):
        align.select_prompts(cfg("align.skip_intents=[S002medx]"))
    with pytest.raises(C.ConfigError, match="outside align.skip_intents"):
        align.select_prompts(cfg("align.n_harmful=400", "align.skip_intents=[S007]"))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("align.refusal_style=polite", "refusal_style must be one of"),
        ("align.benign_sources=[legacy,legacy]", "at most once"),
        ("align.benign_sources=[probes_test]", "unknown"),
        ("align.contrastive=-1", ">= 0"),
    ],
)
def test_recipe_config_errors(override, match):
    with pytest.raises(C.ConfigError, match=match):
        align.select_prompts(cfg(override))


def test_selection_refuses_held_out_prompts_in_training(monkeypatch):
    from safeft.data import probes
    from safeft.data.splits import LeakageError
    from safeft.data.types import Example

    # a dev probe that is also a training prompt: dev numbers would be training numbers
    _, benign = align.select_prompts(cfg())

    def with_a_trained_dev_probe(split="test", source=None):
        extra = [Example("or-x", benign[0], meta={"split": "dev"})] if split == "dev" else []
        return probes.over_refusal_probes(split) + extra

    monkeypatch.setattr(align, "over_refusal_probes", with_a_trained_dev_probe)
    with pytest.raises(LeakageError, match="dev probes"):
        align.select_prompts(cfg())
    monkeypatch.undo()
    # a harmful pair prompt that is a HarmBench behaviour
    hb = safety_splits().test[0].prompt
    written = load_contrastive_pairs()
    bad = [dataclasses.replace(written[0], harmful=hb), *written[1:]]
    monkeypatch.setattr(align, "load_contrastive_pairs", lambda path=None: bad)
    with pytest.raises(LeakageError, match="contrastive"):
        align.select_prompts(cfg(f"align.contrastive={len(written)}"))


def test_base_answers_are_generated_once_per_model_prompts_and_decoding(tmp_path, monkeypatch):
    # a sweep's Vaccine, Booster and RepNoise alignments differ only in the defense: one generation serves them
    monkeypatch.setenv("SAFEFT_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    calls = []

    def fake_generate(model, tok, prompts, settings, **kw):
        calls.append(list(prompts))
        return [f"{p} / {settings.max_new_tokens}" for p in prompts]

    monkeypatch.setattr(align, "generate", fake_generate)
    c = C.load(overrides=[f"model.spec={model_dir}"])
    first = align.base_answers(c, None, None, ["a", "b"], progress=False)
    vaccine = dataclasses.replace(c, defense=C.build(C.DefenseConfig, {"name": "vaccine"}, "defense"))
    assert (
        align.base_answers(vaccine, None, None, ["a", "b"], progress=False) == first == ["a / 40", "b / 40"]
    )  # align.benign_max_new_tokens
    assert len(calls) == 1
    # anything the answers depend on makes new ones: the prompts, the decoding, the model's weights
    align.base_answers(c, None, None, ["a", "c"], progress=False)
    longer = C.load(overrides=[f"model.spec={model_dir}", "align.benign_max_new_tokens=32"])
    assert align.base_answers(longer, None, None, ["a", "b"], progress=False) == ["a / 32", "b / 32"]
    (model_dir / "config.json").write_text('{"changed": 1}')
    align.base_answers(c, None, None, ["a", "b"], progress=False)
    assert len(calls) == 4
