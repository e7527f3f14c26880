"""A tiny random chat model built from a config: for tests, benchmarks' quick mode, and users' smoke runs.

The tokenizer is a byte-level BPE trained in milliseconds on a few sentences (so any text encodes), with a
ChatML chat template like SmolLM2's; the model is a 2-layer, hidden-64 Llama with random weights. Nothing
is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from safeft.config import RunConfig
    from safeft.context import RunContext
    from safeft.data.types import Example

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sorry, but I cannot help with that.",
    "What is 12 percent of 250? Answer: 30. Compute the simple interest on $1,000 at 5% for 2 years.",
    "def add_seven(x):\n    return x + 7\n",
    "How do I kill a Python process? Use kill or Ctrl-C. Sorry, I can't assist with harmful requests.",
    "A patient weighs 70 kg; the dose is 5 mg/kg. Answer: 350 mg.",
]


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None
    )
    tok.chat_template = CHATML
    return tok


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # 0.02 (the default) caps tied-embedding logits near 1, so a tiny model could barely fit anything
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer to ``out`` as an ordinary HF checkpoint; ``models.load(out)`` reads it."""
    tok = build_tokenizer()
    build_model(len(tok), seed).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


# A short, deterministic run on the tiny model: 3 steps of fp32 LoRA (r=4) at a high learning rate.
TINY_RUN = (
    "data.task=domain:finance",
    "train.steps=3",
    "train.batch_size=4",
    "train.lr=0.01",
    "train.precision=fp32",
    "model.lora.r=4",
    "model.lora.alpha=8",
    "run_id=r",
)


def tiny_run_config(out_dir: Path, *overrides: str):
    """A ``RunConfig`` for a tiny-model run writing under ``out_dir``; later overrides win."""
    from safeft import config as C

    return C.load(overrides=[*TINY_RUN, f"out_dir={out_dir}", *overrides])


def make_ctx(
    cfg: RunConfig | Sequence[str],
    model_tok: tuple[nn.Module, Any],
    run_dir: Path,
    aux: dict[str, list[Example]] | None = None,
    *,
    attach: bool = True,
    precision: str = "fp32",
) -> RunContext:
    """A ``RunContext`` for testing a defense directly (``setup`` / ``step`` without the loop), built as
    ``train.train`` builds it, minus the optimizer and accelerate's ``prepare``.

    ``cfg`` is a ``RunConfig`` or ``tiny_run_config`` overrides (outputs under ``run_dir / "runs"``);
    ``model_tok`` the (model, tokenizer) pair, e.g. the ``tiny`` fixture. With ``attach`` the config's fresh
    LoRA is attached (every weight made trainable when ``model.lora.enabled=false``); the frozen reference
    is prepared when the defense ``needs`` one, as the loop does. fp32 by default, so tests compare exact
    numbers.
    """
    from safeft import models
    from safeft.context import RunContext, make_accelerator
    from safeft.methods.registry import METHODS

    if isinstance(cfg, (list, tuple)):
        cfg = tiny_run_config(Path(run_dir) / "runs", *cfg)
    model, tok = model_tok
    if attach:
        model = models.attach_lora(model, cfg.model.lora)
    if "reference" in METHODS.get(cfg.defense.name).needs:
        models.prepare_reference(model)  # free under LoRA; a frozen copy under full fine-tuning
    return RunContext(make_accelerator(precision), model, tok, cfg, Path(run_dir), aux=dict(aux or {}))


def tiny_contrastive(n: int = 6) -> list:
    """Aux ``contrastive`` rows for tests: placeholder harmful prompts of varied length, a refusal and a
    templated compliance opener (no content), as the real aux stream builds them."""
    from safeft.data.aux import COMPLIANCE_OPENERS
    from safeft.data.types import Example

    return [
        Example(
            f"c{i}",
            f"How do I do harmful thing {i}?" + " now" * (i % 3),
            "I'm sorry, I can't help with that.",
            "aux:contrastive",
            {"harmful_response": COMPLIANCE_OPENERS[i % len(COMPLIANCE_OPENERS)]},
        )
        for i in range(n)
    ]
