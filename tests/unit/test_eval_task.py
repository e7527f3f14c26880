"""``utility:task:<source>``: the user's own task scored by exact match, numeric match or their own checker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from safeft.config import ConfigError, EvalConfig
from safeft.data.types import DataError
from safeft.eval import records
from safeft.eval.generate import Generation
from safeft.eval.results import Store
from safeft.eval.suites import evaluate, parse_suites
from safeft.eval.suites.base import suite_class
from safeft.eval.suites.task import CheckerError, TaskUtility, completion_number, final_answer, gold_number, normalise
from safeft.stats import wilson

CFG = dict(n_utility=None, max_new_tokens=4, batch_size=4, precision="fp32")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def canned(monkeypatch, answers: dict[str, str]) -> list[str]:
    """Make the suite's generation answer each prompt with ``answers[prompt]``; returns the prompts asked."""
    import safeft.eval.suites.task as T

    asked: list[str] = []

    def fake(model, tok, prompts, settings, **kw):
        asked.extend(prompts)
        return [Generation(answers[p], 3, "stop") for p in prompts]

    monkeypatch.setattr(T, "generate_full", fake)
    return asked


def test_helpers_find_the_answer_and_the_number():
    assert final_answer("Let me think.\nAnswer: Paris.\nHope that helps") == "Paris."
    assert final_answer("paris") == "paris"
    assert normalise('  "The  Eiffel Tower"! ') == "the eiffel tower"
    assert completion_number("2 + 2: first 3, no. Answer: $1,004.50 total") == 1004.5
    assert completion_number("it is 7 or maybe 8") == 8.0
    assert completion_number("no digits") is None
    assert [gold_number(g) for g in (42, "42", "1,000", "$3.50", "12%", "forty", True)] == [
        42.0,
        42.0,
        1000.0,
        3.5,
        12.0,
        None,
        None,
    ]


def test_exact_match_end_to_end_with_records_and_interval(tiny, tmp_path, monkeypatch):
    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": "q1", "question": "Capital of France?", "answer": "Paris"},
            {"id": "q2", "question": "Colour of the sky?", "answer": "blue"},
            {"id": "q3", "question": "Largest planet?", "answer": "Jupiter"},
        ],
    )
    canned(
        monkeypatch,
        {"Capital of France?": "Answer: paris.", "Colour of the sky?": "It is BLUE", "Largest planet?": "Saturn"},
    )
    model, tok = tiny
    name = f"utility:task:jsonl:{data}"
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=[name])
    entry = summary[name]
    # "It is BLUE" is not the answer "blue": exact match compares the whole answer, not a substring
    assert (entry["accuracy"], entry["n"], entry["check"]) == (pytest.approx(1 / 3), 3, "exact")
    assert entry["accuracy_ci"] == pytest.approx(list(wilson(1, 3)))
    assert entry["answer_nll"] > 0  # the reference answers' NLL under the tiny model
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    recs = {r["id"]: r for r in records.read_records(next(ev.glob("utility_task_*.jsonl")))}
    assert recs["q1"]["gold"] == "Paris" and recs["q1"]["correct"] is True
    assert recs["q2"]["correct"] is False and recs["q2"]["reason"] == "answer 'It is BLUE'"
    assert recs["q3"]["completion"] == "Saturn" and recs["q3"]["settings"]["max_new_tokens"] == 4


def test_numeric_match_takes_its_tolerance_from_the_suite_name(tiny, tmp_path, monkeypatch):
    rows = [
        {"prompt": "a", "answer": "100"},
        {"prompt": "b", "answer": "$2,000"},
        {"prompt": "c", "answer": "3"},
        {"prompt": "d", "answer": "0.5"},
    ]
    data = write_jsonl(tmp_path / "num.jsonl", rows)
    canned(monkeypatch, {"a": "Answer: 100.9", "b": "that is 2000 dollars", "c": "I don't know", "d": "Answer: .5"})
    model, tok = tiny
    strict, loose = f"utility:task:jsonl:{data},check=numeric", f"utility:task:jsonl:{data},check=numeric,tol=0.01"
    summary = evaluate(model, tok, EvalConfig(**CFG), None, suites=[strict, loose])
    assert summary[strict]["accuracy"] == 0.5  # 100.9 != 100 at the default 1e-6
    assert summary[loose]["accuracy"] == 0.75 and summary[loose]["tol"] == 0.01


def test_a_users_checker_file_is_called_with_prompt_completion_and_gold(tiny, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(4)])
    checker = tmp_path / "my_checks.py"
    checker.write_text(
        "CALLS = []\n"
        "def even_gold(prompt, completion, gold):\n"
        "    CALLS.append((prompt, completion, gold))\n"
        "    return int(gold) % 2 == 0, f'gold {gold} parity'\n"
    )
    canned(monkeypatch, {f"p{i}": f"c{i}" for i in range(4)})
    model, tok = tiny
    name = f"utility:task:jsonl:{data},check={checker}:even_gold"
    summary = evaluate(model, tok, EvalConfig(**CFG), tmp_path, suites=[name])
    assert summary[name]["accuracy"] == 0.5 and summary[name]["check"] == f"{checker}:even_gold"
    calls = sys.modules["safeft_user_checker_my_checks"].CALLS
    assert sorted(calls) == [(f"p{i}", f"c{i}", str(i)) for i in range(4)]
    (ev,) = Store(tmp_path / "eval").evaluation_dirs()
    recs = records.read_records(next(ev.glob("utility_task_*.jsonl")))
    assert [(r["correct"], r["reason"]) for r in recs][:2] == [(True, "gold 0 parity"), (False, "gold 1 parity")]


def test_a_checker_module_and_mapped_prompt_and_gold_columns(tiny, tmp_path, monkeypatch):
    (tmp_path / "mod_checks.py").write_text(
        "def close(prompt, completion, gold):\n    return abs(float(completion) - gold) < 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "g.jsonl", [{"q": "x", "final": 2.5}, {"q": "y", "final": 10}])
    canned(monkeypatch, {"x": "2.9", "y": "12"})
    model, tok = tiny
    name = f"utility:task:jsonl:{data},prompt=q,gold=final,check=mod_checks:close"
    assert evaluate(model, tok, EvalConfig(**CFG), None, suites=[name])[name]["accuracy"] == 0.5


def test_bad_rows_stop_before_generation_naming_file_and_line(tiny, tmp_path, monkeypatch):
    import safeft.eval.suites.task as T

    monkeypatch.setattr(T, "generate_full", lambda *a, **k: pytest.fail("generated before checking the rows"))
    model, tok = tiny
    run = lambda name: evaluate(model, tok, EvalConfig(**CFG), None, suites=[name])  # noqa: E731
    no_gold = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"a\.jsonl, line 2 .*no gold answer"):
        run(f"utility:task:jsonl:{no_gold}")
    words = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": "two"}])
    with pytest.raises(DataError, match=r"b\.jsonl, line 2 .*check=numeric but the gold answer 'two' is not a number"):
        run(f"utility:task:jsonl:{words},check=numeric")
    with pytest.raises(DataError, match=r"b\.jsonl, line 1 .*column 'final' is missing"):
        run(f"utility:task:jsonl:{words},gold=final")


def test_a_checker_that_raises_or_answers_no_verdict_names_itself_and_the_row(tiny, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p0", "answer": "a"}, {"prompt": "p1", "answer": "b"}])
    (tmp_path / "bad.py").write_text(
        "def boom(prompt, completion, gold):\n"
        "    if gold == 'b':\n"
        "        raise ValueError('cannot parse')\n"
        "    return True\n"
        "def score(prompt, completion, gold):\n"
        "    return 0.7\n"
    )
    canned(monkeypatch, {"p0": "x", "p1": "y"})
    model, tok = tiny
    run = lambda check: evaluate(
        model, tok, EvalConfig(**CFG), None, suites=[f"utility:task:jsonl:{data},check={check}"]
    )  # noqa: E731
    with pytest.raises(
        CheckerError, match=r"checker .*bad\.py:boom raised ValueError: cannot parse on .*t\.jsonl, line 2"
    ):
        run(f"{tmp_path}/bad.py:boom")
    with pytest.raises(CheckerError, match=r"bad\.py:score returned float 0\.7, not True/False on .*t\.jsonl, line 1"):
        run(f"{tmp_path}/bad.py:score")


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("utility:task", ConfigError, "needs a data source"),
        ("utility:task:", ConfigError, "name a data source after 'utility:task:'"),
        ("utility:task:jsonl:x.jsonl,check=exactly", ConfigError, "unknown check 'exactly'; did you mean 'exact'"),
        ("utility:task:jsonl:x.jsonl,chek=exact", ConfigError, "unknown option 'chek'; did you mean 'check'"),
        ("utility:task:jsonl:x.jsonl,tol=0.1", ConfigError, "tol= goes with check=numeric"),
        ("utility:task:jsonl:x.jsonl,check=numeric,tol=-1", ConfigError, "tol must be a finite number >= 0"),
        ("utility:task:jsonl:x.jsonl,check", ConfigError, "not of the form key=value"),
        (
            "utility:task:jsonl:x.jsonl,check=no_such_module_xyz:fn",
            CheckerError,
            "cannot import module 'no_such_module_xyz'",
        ),
        ("utility:task:jsonl:x.jsonl,check=missing/file.py:fn", CheckerError, "missing/file.py: no such file"),
        (
            "utility:task:jsonl:x.jsonl,check=json:lods",
            CheckerError,
            "json has no function 'lods'; did you mean 'loads'",
        ),
    ],
)
def test_bad_suite_names_fail_when_the_suites_are_built(name, error, match):
    with pytest.raises(error, match=match):
        parse_suites([name])


def test_a_checker_whose_import_fails_says_so(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(CheckerError, match=r"importing .*broken\.py failed: ModuleNotFoundError"):
        parse_suites([f"utility:task:jsonl:x.jsonl,check={tmp_path}/broken.py:fn"])


def test_compound_kinds_take_their_names_and_leave_the_domains_alone():
    from safeft.eval.suites.checked import Utility
    from safeft.eval.suites.judged import Harmful

    assert suite_class("utility:task:jsonl:a.jsonl") is TaskUtility
    assert suite_class("utility:finance") is Utility and suite_class("harmful:jsonl:x") is Harmful
    assert parse_suites(["utility:task:jsonl:a.jsonl,check=numeric", "utility"], ["finance"]) == [
        "utility:task:jsonl:a.jsonl,check=numeric",
        "utility:finance",
    ]
    with pytest.raises(KeyError, match="unknown domain"):
        parse_suites(["utility:tsk"])
