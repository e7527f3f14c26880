"""Shared fixtures: a tiny random chat model built from a config (``safeft.testing``), no downloads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from safeft.testing import build_model, build_tokenizer, save_tiny_model  # noqa: F401  (re-exported)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # On 2-layer, hidden-64 models torch's thread pool costs more than it saves (the unit suite runs ~4x
    # faster on one thread); tests on the real model take every core back (tests/e2e).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model + tokenizer saved like any HF checkpoint, so ``models.load(path)`` works on it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


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
