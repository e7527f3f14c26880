"""Aux data for defenses: the right shapes, and never a HarmBench prompt."""

from __future__ import annotations

import pytest

from safeft.data.aux import COMPLIANCE_OPENERS, build_aux
from safeft.data.splits import safety_splits
from safeft.data.types import normalise_prompt


def test_builds_each_kind_and_skips_services():
    aux = build_aux(["reference", "harmful_prompts", "alignment", "contrastive"])
    assert set(aux) == {"harmful_prompts", "alignment", "contrastive"}
    assert all(e.response is None for e in aux["harmful_prompts"])
    assert all(e.response for e in aux["alignment"])
    assert all(e.meta["harmful_response"] in COMPLIANCE_OPENERS for e in aux["contrastive"])
    test = {normalise_prompt(e.prompt) for e in safety_splits().test}
    for rows in aux.values():
        assert not {normalise_prompt(e.prompt) for e in rows} & test


def test_deterministic():
    assert build_aux(["contrastive"]) == build_aux(["contrastive"])
    a, b = build_aux(["contrastive"])["contrastive"], build_aux(["contrastive"])["contrastive"]
    assert [e.meta for e in a] == [e.meta for e in b]


def test_unknown_need_is_an_error():
    with pytest.raises(KeyError, match="unknown aux data 'harmfull'"):
        build_aux(["harmfull"])
