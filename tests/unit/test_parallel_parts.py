"""The parts of data parallelism that need no second process: sharded streams, the start-up refusal of what
a defense cannot run under, and the fingerprints that check every process holds the same caches."""

from __future__ import annotations

import pytest
import torch

from safeft import config as C
from safeft.context import FEATURES, Stream, check_supported, fingerprint, first_difference
from safeft.data.chat import Rendered
from safeft.methods import METHODS
from safeft.testing import tiny_run_config

ROWS = [Rendered([i], [i], 1, f"r{i}") for i in range(10)]


def _ids(rows) -> list[str]:
    return [r.id for r in rows]


def test_processes_take_disjoint_slices_of_what_one_process_would_read_in_turn():
    one = Stream(ROWS, 3, seed=0)
    shards = [Stream(ROWS, 3, seed=0, rank=r, processes=2) for r in range(2)]
    for _ in range(5):  # across epoch boundaries (10 rows, 6 per global step)
        a, b = (s.next() for s in shards)
        assert _ids(a) == _ids(one.next()) and _ids(b) == _ids(one.next())
        assert shards[0].pos == shards[1].pos == one.pos  # one integer, the same on every process


def test_a_stream_refuses_a_rank_outside_the_process_count():
    with pytest.raises(ValueError, match="rank 2"):
        Stream(ROWS, 2, seed=0, rank=2, processes=2)


class _Refuses:
    name = "x"
    unsupported = {"processes": "keeps a probe outside the model"}


def test_a_defense_is_refused_at_start_up_with_its_name_and_reason():
    check_supported(_Refuses(), ["gradient_checkpointing"])  # not declared: runs
    with pytest.raises(C.ConfigError, match=r"defense 'x' cannot run with data parallelism .*: keeps a probe"):
        check_supported(_Refuses(), ["processes"])


def test_every_declared_limit_names_a_feature_the_loop_detects():
    for name in METHODS.describe():
        method = METHODS.get(name)
        assert set(method.unsupported) <= set(FEATURES), name
        assert all(len(reason) > 20 for reason in method.unsupported.values()), name


def test_the_seed_defenses_that_can_run_sharded_are_not_refused():
    for name in ("sft", "sbr", "saft", "vaccine", "mixing", "ewc", "lisa", "repnoise"):
        assert "processes" not in METHODS.get(name).unsupported, name
    for name in ("booster", "sap", "repanchor", "saft+repanchor"):
        assert "processes" in METHODS.get(name).unsupported, name


def test_the_loop_refuses_before_writing_anything(tmp_path, tiny, monkeypatch):
    from safeft.train import train

    monkeypatch.setattr("safeft.train.run_features", lambda acc, cfg: ["processes"])  # as under a launch
    model, tok = tiny
    cfg = tiny_run_config(tmp_path / "runs", "defense.name=booster")
    with pytest.raises(C.ConfigError, match="'booster' cannot run with data parallelism"):
        train(cfg, model=model, tokenizer=tok, aux={"contrastive": []}, progress=False)
    assert not (tmp_path / "runs").exists()


def test_fingerprints_see_a_changed_cache_and_ignore_rounding():
    class Cache:  # stands in for a defense: safeft objects are summarised by their attributes
        __module__ = "safeft.methods.fake"

        def __init__(self, h: torch.Tensor) -> None:
            self.h_ref, self.layers, self.stream = h, [1, 2], Stream(ROWS, 2, 0, rank=0, processes=2)

    h = torch.randn(4, 8)
    a = fingerprint(Cache(h))
    other_rank = Cache(h.clone())
    other_rank.stream = Stream(ROWS, 2, 0, rank=1, processes=2)  # the rank differs by design
    assert first_difference(a, fingerprint(other_rank)) is None
    assert first_difference(a, fingerprint(Cache(h * (1 + 1e-7)))) is None
    assert "h_ref" in first_difference(a, fingerprint(Cache(h + 0.01)))
    moved = Cache(h)
    moved.layers = [1, 3]
    assert "layers" in first_difference(a, fingerprint(moved))
