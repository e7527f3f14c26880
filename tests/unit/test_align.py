"""Stage-1 data selection and the aligned-model cache key (no model needed)."""

from __future__ import annotations

import pytest

from safeft import align
from safeft import config as C
from safeft.data import refusals
from safeft.data.splits import safety_splits
from safeft.data.types import normalise_prompt


def cfg(*extra: str) -> C.RunConfig:
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
