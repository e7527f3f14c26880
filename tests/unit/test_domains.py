"""The benign domains: split sizes, determinism, leakage, and that each checker means what it says."""

from __future__ import annotations

import re

import pytest

from safeft.data.domains import DOMAINS, N_TEST, N_TRAIN, check, load_domain
from safeft.data.domains.base import fmt, parse_answer
from safeft.data.domains.code import normalise_code, reference_passes_tests
from safeft.data.types import DataError, Example, normalise_prompt

NAMES = ("finance", "medical", "code")
NUMERIC = ("finance", "medical")


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[list[Example], list[Example]]]:
    return {name: (load_domain(name, "train"), load_domain(name, "test")) for name in NAMES}


def _fingerprint(items: list[Example]) -> list[tuple[str, str, str | None, str]]:
    # Example equality ignores meta, so compare the gold answer explicitly.
    return [(e.id, e.prompt, e.response, repr(e.meta)) for e in items]


def test_builtin_domains_are_registered() -> None:
    assert set(NAMES) <= set(DOMAINS)


@pytest.mark.parametrize("name", NAMES)
def test_split_sizes_ids_and_meta(name: str, splits: dict) -> None:
    train, test = splits[name]
    assert N_TRAIN >= 1000 and len(train) == N_TRAIN
    assert N_TEST == 200 and len(test) == N_TEST
    assert [e.id for e in test] == [f"{name}-test-{i}" for i in range(N_TEST)]
    assert [e.id for e in train] == [f"{name}-train-{i}" for i in range(N_TRAIN)]
    for e in train + test:
        assert e.source == name and e.meta["domain"] == name and e.response
    tasks = {e.meta["task"] for e in train}
    assert len(tasks) >= 6
    assert {e.meta["task"] for e in test} == tasks


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_items_other_seed_other_items(name: str, splits: dict) -> None:
    train, test = splits[name]
    assert _fingerprint(load_domain(name, "train")) == _fingerprint(train)
    assert _fingerprint(load_domain(name, "test")) == _fingerprint(test)
    other = load_domain(name, "test", seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in test]


@pytest.mark.parametrize("name", NAMES)
def test_n_takes_a_prefix(name: str, splits: dict) -> None:
    train, test = splits[name]
    assert _fingerprint(load_domain(name, "train", n=37)) == _fingerprint(train[:37])
    assert _fingerprint(load_domain(name, "test", n=5)) == _fingerprint(test[:5])
    with pytest.raises(ValueError, match="asked for"):
        load_domain(name, "test", n=N_TEST + 1)
    with pytest.raises(ValueError, match="asked for"):
        load_domain(name, "train", n=-1)


@pytest.mark.parametrize("name", NAMES)
def test_no_duplicate_prompts_and_train_test_disjoint(name: str, splits: dict) -> None:
    train, test = splits[name]
    train_keys = [normalise_prompt(e.prompt) for e in train]
    test_keys = [normalise_prompt(e.prompt) for e in test]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(test_keys)) == len(test_keys)
    assert not set(train_keys) & set(test_keys)
    # Disjointness must hold across seeds' own pairs too, not just the default one.
    assert not {normalise_prompt(e.prompt) for e in load_domain(name, "train", n=300, seed=3)} & {
        normalise_prompt(e.prompt) for e in load_domain(name, "test", seed=3)
    }


@pytest.mark.parametrize("name", NAMES)
def test_reference_response_is_correct_and_short(name: str, splits: dict) -> None:
    train, test = splits[name]
    for e in train + test:
        assert check(e, e.response), e
        # A rough token proxy: the brief is "under ~50 tokens" so a small model can reproduce it.
        assert len(e.response.split()) <= 40, e.response


@pytest.mark.parametrize("name", NUMERIC)
def test_response_format_and_gold_agree(name: str, splits: dict) -> None:
    train, test = splits[name]
    for e in train + test:
        working, last = e.response.split("\n")
        assert working and last.startswith("Answer: ")
        assert isinstance(e.meta["answer"], float) and e.meta["answer"] > 0
        assert parse_answer(e.response) == pytest.approx(e.meta["answer"], abs=1e-9)


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_checker_rejects_wrong_answers(name: str, splits: dict) -> None:
    _, test = splits[name]
    for e in test:
        gold = e.meta["answer"]
        working = e.response.split("\n")[0]
        assert not check(e, f"{working}\nAnswer: {fmt(gold * 1.5)}")
        assert not check(e, f"Answer: {fmt(gold * 0.9)}")
        assert not check(e, "I am not sure how to work this out.")
        assert not check(e, "Answer: banana")


def _numeric(domain: str, gold: float) -> Example:
    return Example(id="t-0", prompt="q", meta={"domain": domain, "answer": gold})


def test_numeric_parsing_handles_currency_percent_and_separators() -> None:
    assert parse_answer("Answer: $1,234.50") == 1234.5
    assert parse_answer("The margin is 12.5%.") == 12.5
    assert parse_answer("Answer: -20") == -20
    assert parse_answer("Answer: 300, give or take") == 300
    assert parse_answer("Answer: 3\nWait, no.\nAnswer: 5") == 5
    assert parse_answer("Total is 7.\nAnswer:") == 7
    assert parse_answer("no digits here") is None
    assert check(_numeric("finance", 1234.5), "Answer: $1,234.50")
    assert check(_numeric("finance", 12.5), "It went up by 12.5%")
    assert check(_numeric("medical", 1234.5), "The total is 1,234.5 mg.")


def test_numeric_tolerances_differ_per_domain() -> None:
    # 1.5% off: inside medical's 2% band, outside finance's 1%.
    assert check(_numeric("medical", 200.0), "Answer: 203")
    assert not check(_numeric("finance", 200.0), "Answer: 203")
    assert check(_numeric("finance", 200.0), "Answer: 201")
    # Tiny golds get an absolute 0.01 allowance, so rounding to cents is not punished.
    assert check(_numeric("finance", 0.2), "Answer: 0.21")
    assert not check(_numeric("finance", 0.2), "Answer: 0.25")


def test_code_references_pass_their_own_tests(splits: dict) -> None:
    train, test = splits["code"]
    for e in train + test:
        assert e.meta["tests"] and e.meta["entry_point"] in e.meta["answer"]
        assert e.response == f"```python\n{e.meta['answer']}\n```"
        assert reference_passes_tests(e), e.meta


def test_reference_passes_tests_detects_a_broken_reference(splits: dict) -> None:
    e = splits["code"][1][0]
    broken = re.sub(r"return .*", "return None", e.meta["answer"])
    bad = Example(id=e.id, prompt=e.prompt, meta={**e.meta, "answer": broken})
    assert not reference_passes_tests(bad)


def test_code_checker_ignores_whitespace_but_not_content(splits: dict) -> None:
    # Wrong answers run in the sandbox (~50 ms each), so two items of each task kind rather than all 200.
    for e in splits["code"][1][:34]:
        ref = e.meta["answer"]
        header, body = ref.split("\n")
        # Tab indentation, trailing spaces, blank lines and chatter around the fence.
        messy = f"Sure! Here it is:\n```python\n\n{header}   \n\t{body.strip()}  \n\n```\nDone."
        assert check(e, messy)
        assert check(e, f"\n{ref}\n")  # no fence at all
        assert check(e, f"```\n{ref}")  # fence cut off by the generation limit
        assert not check(e, ref.replace("return ", "return 1 + "))
        assert not check(e, f"```python\n{header}\n    pass\n```")
        assert not check(e, "I don't know.")


def test_code_checker_runs_the_tests_so_other_correct_code_passes(splits: dict) -> None:
    e = next(x for x in splits["code"][1] if x.meta["task"] == "add")
    name, param = e.meta["entry_point"], e.meta["answer"].split("(")[1].split(")")[0]
    k = int(e.meta["answer"].rsplit("+", 1)[1])
    other = f"```python\ndef {name}({param}):\n    total = {param}\n    total += {k}\n    return total\n```"
    ok, why = DOMAINS.get("code")().check_detail(e, other)
    assert ok and why == "passed", why
    ok, why = DOMAINS.get("code")().check_detail(e, f"```python\ndef {name}({param}):\n    while True: pass\n```")
    assert not ok and ("timeout" in why or "cpu" in why)


def test_normalise_code_keeps_indentation_structure() -> None:
    four = "def f(x):\n    if x:\n        return 1\n    return 2"
    two = "def f(x):\n  if x:\n    return 1\n  return 2"
    flat = "def f(x):\nif x:\nreturn 1\nreturn 2"
    assert normalise_code(four) == normalise_code(two)
    assert normalise_code(four) != normalise_code(flat)


def test_unknown_domain_and_bad_split() -> None:
    with pytest.raises(KeyError, match="unknown domain 'nope'"):
        load_domain("nope", "train")
    # The registry only suggests a name when one is close enough to be a plausible typo.
    with pytest.raises(KeyError, match="did you mean 'finance'"):
        load_domain("finanse", "train")
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_domain("finance", "validation")


def test_check_needs_a_domain_in_meta() -> None:
    with pytest.raises(DataError, match="meta has no 'domain'"):
        check(Example(id="x-1", prompt="q", source="x"), "Answer: 1")
