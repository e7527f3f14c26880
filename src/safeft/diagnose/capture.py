"""Capture the outputs of chosen layers during forward passes, with hooks that never outlive the block.

Layers are chosen by decoder-block index (0-based, into ``models.decoder_layers``: the residual stream after
block l, before the final norm for the last block) or by a regular expression over ``named_modules()``
names (any module, e.g. ``r".*\\.mlp$"``). ``None`` means every decoder block.

On an architecture whose decoder stack cannot be found, index selection raises ``ModelError`` (via
``models.decoder_layers``), and a regex that matches no module raises too: a diagnosis that silently
captured nothing would report "no drift".

Each forward overwrites the previous capture: the dict holds the last forward's outputs only. A module
whose output is a tuple (HF decoder blocks in some versions) contributes its first element.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from safeft import models


def select(model: nn.Module, layers: Sequence[int] | str | None) -> dict[int | str, nn.Module]:
    """Resolve a layer selection to ``{key: module}``: int keys for decoder indices, names for a regex."""
    if isinstance(layers, str):
        pattern = re.compile(layers)
        found = {name: m for name, m in model.named_modules() if name and pattern.fullmatch(name)}
        if not found:
            raise models.ModelError(f"no module of {type(model).__name__} matches the layer regex {layers!r}")
        return dict(found)
    blocks = models.decoder_layers(model)
    idx = list(range(len(blocks))) if layers is None else list(layers)
    bad = [i for i in idx if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"decoder layer indices {bad} out of range: the model has {len(blocks)} blocks (0-based)")
    return {i: blocks[i] for i in idx}


@contextlib.contextmanager
def capture(
    model: nn.Module, layers: Sequence[int] | str | None = None, *, detach: bool = False
) -> Iterator[dict[int | str, torch.Tensor]]:
    """Record the chosen layers' outputs during forwards inside the block; hooks are removed in ``finally``.

    ``detach=True`` stores detached tensors (diagnostics); the default keeps the graph (penalties on hidden
    states, as RepAnchor's).
    """
    chosen = select(model, layers)
    out: dict[int | str, torch.Tensor] = {}

    def hook(key: int | str):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            out[key] = h.detach() if detach else h

        return fn

    handles = []
    try:
        for key, module in chosen.items():
            handles.append(module.register_forward_hook(hook(key)))
        yield out
    finally:
        for h in handles:
            h.remove()
