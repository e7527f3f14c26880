"""Safety-data mixing: the mixed set holds exactly the safety share asked for, the loop trains on it, the
per-step variant adds λ·CE of a separate safety batch, and every "amount 0" reproduces plain SFT exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from safeft import config as C
from safeft import models
from safeft.data.chat import IGNORE
from safeft.data.types import Example
from safeft.methods.mixing import Mixing, MixingConfig, n_mixed
from safeft.runs import checkpoints
from safeft.testing import make_ctx, tiny_run_config
from safeft.train import train

EXAMPLES = [Example(f"e{i}", f"What is {i} plus 7?", f"Answer: {i + 7}") for i in range(12)]
ALIGN = [Example(f"a{i}", f"How do I do harmful thing {i}?", "I'm sorry, I can't help.") for i in range(40)]


def _cfg(tmp_path, *extra: str) -> C.RunConfig:
    return tiny_run_config(tmp_path / "runs", "train.steps=4", "defense.name=mixing", *extra)


@pytest.mark.parametrize(
    ("fraction", "n_task", "want"), [(0.03, 600, 19), (0.5, 12, 12), (0.2, 12, 3), (0.01, 12, 1), (0.0, 12, 0)]
)
def test_dataset_variant_mixes_the_asked_share(fraction, n_task, want):
    assert n_mixed(fraction, n_task) == want
    task = [Example(f"t{i}", "q", "a") for i in range(n_task)]
    pool = [Example(f"s{i}", "harm", "no") for i in range(100)]
    mixed = Mixing(MixingConfig(fraction=fraction)).task_examples(task, {"alignment": pool})
    safety = [ex for ex in mixed if ex.id.startswith("s")]
    assert len(safety) == want and len(mixed) == n_task + want
    assert mixed[:n_task] == task and safety == pool[:want]  # the task data whole, the first X safety rows
    if want:
        assert abs(want / len(mixed) - fraction) <= 0.5 / len(mixed) or want == 1  # rounding only


def test_append_variant_adds_exactly_n_safety():
    mixed = Mixing(MixingConfig(variant="append", n_safety=7)).task_examples(EXAMPLES, {"alignment": ALIGN})
    assert len(mixed) == len(EXAMPLES) + 7 and mixed[len(EXAMPLES) :] == ALIGN[:7]


def test_too_few_safety_examples_is_an_error_before_anything_is_written(tmp_path, tiny):
    model, tok = tiny
    cfg = _cfg(tmp_path, "defense.variant=append", "defense.n_safety=41")
    with pytest.raises(C.ConfigError, match="41 safety examples"):
        train(cfg, examples=EXAMPLES, model=model, tokenizer=tok, aux={"alignment": ALIGN}, progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_loop_trains_on_the_mixed_set(tmp_path, tiny, monkeypatch):
    import safeft.train as T

    seen = []
    real = T.Stream.__init__

    def spy(self, rows, batch_size, seed, name="task", **shard):
        if name == "task":
            seen.append([r.id for r in rows])
        real(self, rows, batch_size, seed, name, **shard)

    monkeypatch.setattr(T.Stream, "__init__", spy)
    model, tok = tiny
    train(
        _cfg(tmp_path, "defense.variant=append", "defense.n_safety=5"),
        examples=EXAMPLES,
        model=model,
        tokenizer=tok,
        aux={"alignment": ALIGN},
        progress=False,
    )
    assert seen == [[e.id for e in EXAMPLES] + [e.id for e in ALIGN[:5]]]


@pytest.mark.parametrize(
    "extra",
    [
        ("defense.fraction=0",),
        ("defense.variant=append", "defense.n_safety=0"),
        ("defense.variant=batch", "defense.lam=0"),
    ],
)
def test_amount_zero_reproduces_plain_sft_exactly(extra, tmp_path, tiny_dir):
    from safetensors.torch import load_file

    runs = {}
    for name, ov in (("sft", ("defense.name=sft",)), ("mix", extra)):
        m, tok = models.load(str(tiny_dir))
        runs[name] = train(
            _cfg(tmp_path / name, *ov),
            examples=EXAMPLES,
            model=m,
            tokenizer=tok,
            aux={"alignment": ALIGN},
            progress=False,
        )
    assert [r["loss"] for r in runs["mix"].metrics] == [r["loss"] for r in runs["sft"].metrics]
    assert all(r["passes/forward"] == 1 for r in runs["mix"].metrics)
    a, b = (load_file(str(checkpoints(runs[n].run_dir)[-1] / "trainable.safetensors")) for n in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_variant_adds_lambda_times_the_safety_batch_ce(tiny, tmp_path):
    cfg = _cfg(tmp_path, "defense.variant=batch", "defense.lam=0.5", "defense.safety_batch=3")
    ctx = make_ctx(cfg, tiny, tmp_path, {"alignment": ALIGN})
    d = Mixing(cfg.defense)
    d.setup(ctx)
    stream = ctx.streams["mixing_safety"]
    task = ctx.batch(ctx.render(EXAMPLES[:4]))
    out = d.step(ctx, task)
    with torch.no_grad():
        want_task = ctx.model(**task).loss
        want_safety = ctx.model(**ctx.batch([stream._at(k) for k in range(3)])).loss
    torch.testing.assert_close(out.terms["task"], want_task)
    torch.testing.assert_close(out.terms["safety"], 0.5 * want_safety)
    assert stream.pos == 3 and ctx.passes == {"forward": 2, "backward": 1}


def test_train_on_inputs_puts_labels_on_prompt_tokens_but_not_padding(tiny, tmp_path):
    cfg = _cfg(tmp_path, "defense.train_on_inputs=true")
    ctx = make_ctx(cfg, tiny, tmp_path)
    d = Mixing(cfg.defense)
    captured = {}

    def fake_forward(batch, **kw):  # record what the model would see
        captured["b"] = batch
        return SimpleNamespace(loss=torch.ones((), requires_grad=True))

    ctx.forward = fake_forward
    task = ctx.batch(ctx.render([EXAMPLES[0], Example("x", "A much longer question " * 5, "Answer: 1")]))
    d.step(ctx, task)
    labels = captured["b"]["labels"]
    real = task["attention_mask"] == 1
    assert torch.equal(labels[real], task["input_ids"][real]) and bool((labels[~real] == IGNORE).all())
    assert int((labels != IGNORE).sum()) > int((task["labels"] != IGNORE).sum())


def test_bad_config_is_rejected():
    # the Config checks its values as it is built (from YAML or here), before any defense exists
    for bad in (
        {"variant": "both"},
        {"fraction": 1.0},
        {"fraction": -0.1},
        {"n_safety": -1},
        {"lam": -1},
        {"safety_batch": 0},
        {"variant": "batch", "train_on_inputs": True},
    ):
        with pytest.raises(C.ConfigError):
            Mixing(MixingConfig(**bad))
