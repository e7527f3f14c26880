"""Shared fixtures: a tiny random chat model built from a config, no downloads.

The tokenizer is a byte-level BPE trained in milliseconds on a few sentences (so any text encodes), with a
ChatML chat template like SmolLM2's; the model is a 2-layer, hidden-64 Llama with random weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

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


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model + tokenizer saved like any HF checkpoint, so ``models.load(path)`` works on it."""
    d = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer()
    model = build_model(len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def tiny(tiny_dir):
    """A fresh (model, tokenizer) pair for each test, loaded through our own loader."""
    from safeft import models

    return models.load(str(tiny_dir))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # No test may write to the user's cache or read a stale one.
    monkeypatch.setenv("SAFEFT_CACHE", str(tmp_path / "cache"))
    logging.getLogger("safeft").setLevel(logging.INFO)
