"""Threat models: poisoning is exact and deterministic, harmful pairs never leak the test or dev prompts,
their cache follows every input, and bad poisoning input fails before anything is written."""

from __future__ import annotations

import json

import pytest

from safeft import config as C
from safeft.data.splits import safety_splits
from safeft.data.types import Example
from safeft.testing import tiny_run_config
from safeft.threats import harmful as H
from safeft.threats.poison import n_poison, poison
from safeft.train import train

TASK = [Example(f"t{i}", f"What is {i} plus 7?", f"Answer: {i + 7}", "task") for i in range(40)]
HARM = [Example(f"h{i}", f"harmful request {i}", f"harmful answer {i}", "pairs") for i in range(30)]


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.3, 0.5, 1.0])
def test_poisoned_fraction_is_exact_and_the_row_count_unchanged(p):
    out = poison(TASK, HARM[:30] + [Example(f"x{i}", "q", "a") for i in range(20)], p, seed=0)
    assert len(out) == len(TASK)
    got = sum(ex.id.startswith("poison:") for ex in out)
    assert got == n_poison(len(TASK), p) == round(p * len(TASK))
    kept = [ex for ex in out if not ex.id.startswith("poison:")]
    assert all(ex in TASK for ex in kept)  # task rows are only removed, never changed


def test_poisoning_is_deterministic_by_seed_and_tags_its_rows():
    a, b, c = (poison(TASK, HARM, 0.25, seed=s) for s in (0, 0, 1))
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    assert {e.source for e in a if e.id.startswith("poison:")} == {"poison:pairs"}


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_fraction_outside_zero_one_names_the_key(p):
    with pytest.raises(C.ConfigError, match=r"data\.poison must be a fraction in \[0, 1\]"):
        poison(TASK, HARM, p, seed=0)


def test_a_source_without_answers_or_too_small_names_itself():
    with pytest.raises(C.ConfigError, match="my.jsonl: 30 of 30 rows have no answer"):
        poison(TASK, [Example(e.id, e.prompt) for e in HARM], 0.1, seed=0, where="my.jsonl")
    with pytest.raises(C.ConfigError, match=r"needs 20 harmful pairs, but data.poison_source my.jsonl has only 5"):
        poison(TASK, HARM[:5], 0.5, seed=0, where="my.jsonl")


def test_pair_prompts_are_the_align_split_and_never_test_or_dev():
    splits = safety_splits()
    got = {e.prompt for e in H.pair_prompts()}
    assert got == {e.prompt for e in splits.align}
    assert not got & {e.prompt for e in splits.test} and not got & {e.prompt for e in splits.dev}


def test_the_leakage_assert_fires_when_a_test_or_dev_prompt_is_injected(monkeypatch):
    real = safety_splits()
    for leaked in (real.test[3], real.dev[5]):
        bad = type(real)(align=[*real.align, leaked], anchor=real.anchor, dev=real.dev, test=real.test)
        monkeypatch.setattr("safeft.data.splits.safety_splits", lambda seed=0, bad=bad: bad)
        with pytest.raises(Exception, match="(?i)leak"):
            H.pair_prompts()


def test_cache_key_changes_with_every_input(tiny_dir):
    prompts = H.pair_prompts()[:5]
    base = H.cache_key(str(tiny_dir), prompts, H.PairSettings())
    assert base == H.cache_key(str(tiny_dir), prompts, H.PairSettings())
    other_weights = tiny_dir.parent / "other"
    from safeft.testing import save_tiny_model

    save_tiny_model(other_weights, seed=1)
    changed = [
        H.cache_key(str(other_weights), prompts, H.PairSettings()),
        H.cache_key(str(tiny_dir), prompts[:4], H.PairSettings()),
        H.cache_key(str(tiny_dir), [Example(prompts[0].id, "edited", None), *prompts[1:]], H.PairSettings()),
        H.cache_key(str(tiny_dir), prompts, H.PairSettings(max_new_tokens=64)),
        H.cache_key(str(tiny_dir), prompts, H.PairSettings(system_prompt="Be brief.")),
        H.cache_key(str(tiny_dir), prompts, H.PairSettings(filters=("refusal_keywords",))),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_pairs_are_generated_once_filtered_and_cached(tiny, tiny_dir, monkeypatch):
    model, tok = tiny
    few = H.pair_prompts()[:6]
    monkeypatch.setattr(H, "pair_prompts", lambda seed=0: few)
    # the dummy judge refuses completions that start with REFUSE: make the model "refuse" two prompts
    import safeft.eval.generate as G

    def fake_generate(model, tok, prompts, settings, progress=True, desc=""):
        return [("REFUSE no" if i < 2 else f"here is how {i}") for i in range(len(prompts))]

    monkeypatch.setattr(G, "generate", fake_generate)
    settings = H.PairSettings(filters=("dummy",))
    pairs = H.harmful_pairs(str(tiny_dir), settings, model=model, tokenizer=tok, progress=False)
    assert [p.id for p in pairs] == [e.id for e in few[2:]]
    assert all(p.response.startswith("here is how") for p in pairs)
    monkeypatch.setattr(G, "generate", lambda *a, **k: pytest.fail("cached pairs must not be regenerated"))
    assert H.harmful_pairs(str(tiny_dir), settings, model=model, tokenizer=tok) == pairs


def test_a_poisoned_run_trains_and_states_p(tmp_path, tiny):
    model, tok = tiny
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in HARM))
    cfg = tiny_run_config(tmp_path / "runs", "data.n_train=20", "data.poison=0.25", f"data.poison_source=jsonl:{src}")
    res = train(cfg, model=model, tokenizer=tok, progress=False)
    assert C.load(res.run_dir / "config.yaml").data.poison == 0.25
    assert json.loads((res.run_dir / "train_summary.json").read_text())["poison"] == 0.25


def test_bad_poisoning_fails_before_anything_is_written(tmp_path, tiny):
    model, tok = tiny
    src = tmp_path / "prompts_only.jsonl"
    src.write_text("".join(json.dumps({"prompt": e.prompt}) + "\n" for e in HARM))
    for extra, msg in [
        (("data.poison=1.5",), "data.poison must be a fraction"),
        (("data.poison=0.5", f"data.poison_source=jsonl:{src}"), "rows have no answer"),
    ]:
        cfg = tiny_run_config(tmp_path / "runs", "data.n_train=20", *extra)
        with pytest.raises(C.ConfigError, match=msg):
            train(cfg, model=model, tokenizer=tok, progress=False)
        assert not (tmp_path / "runs").exists()
