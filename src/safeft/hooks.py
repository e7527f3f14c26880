"""The one place that attaches hooks to a model: every hook here is removed in ``finally``.

Defenses and diagnosis read hidden states (a block's output, the unembedding's input), add to them (SAP's
probe, Vaccine's perturbation) or switch dropout off for a pass. Each of those used to carry its own hook
context manager; they differ only in what the hook does, so this module owns the register/remove pairing
and callers pass the hook body. A hook that outlived its block would silently change every later forward.

Layers are chosen by decoder-block index (0-based, into ``models.decoder_layers``: the residual stream after
block l, before the final norm for the last block) or by a regular expression over ``named_modules()``
names (any module, e.g. ``r".*\\.mlp$"``). ``None`` means every decoder block. An architecture whose decoder
stack cannot be found raises (``models.decoder_layers``), and so does a regex that matches nothing: a
diagnosis that silently captured nothing would report "no drift".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from safeft import models

Key = Any  # an int (decoder index, list position) or a module name


def first(output: Any) -> torch.Tensor:
    """The hidden state in a module's output: HF decoder blocks return a tuple in some versions."""
    return output[0] if isinstance(output, tuple) else output


def with_first(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced by ``value`` (tuple or tensor, as it came)."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


@contextlib.contextmanager
def hooked(
    modules: Mapping[Key, nn.Module] | Sequence[nn.Module], make_hook: Callable[[Key], Callable], *, pre: bool = False
) -> Iterator[None]:
    """Forward hooks ``make_hook(key)`` on each module for the block (pre-hooks with ``pre``); always removed.

    ``modules`` is a mapping ``{key: module}`` or a list (keys are positions). The hook has torch's
    signature: ``(module, args, output)``, or ``(module, args)`` for a pre-hook; returning a value replaces
    the output (or the args).
    """
    items = modules.items() if isinstance(modules, Mapping) else enumerate(modules)
    handles = []
    try:
        for key, module in items:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(make_hook(key)))
        yield
    finally:
        for h in handles:
            h.remove()


def select(model: nn.Module, layers: Sequence[int] | str | None) -> dict[Key, nn.Module]:
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
def capture_modules(
    modules: Mapping[Key, nn.Module] | Sequence[nn.Module], *, detach: bool = False
) -> Iterator[dict[Key, torch.Tensor]]:
    """Record each module's output (its hidden state) during forwards inside the block.

    Each forward overwrites the previous capture: the dict holds the last forward's outputs. ``detach``
    stores detached tensors (diagnostics); the default keeps the graph (penalties on hidden states).
    """
    out: dict[Key, torch.Tensor] = {}

    def make(key: Key):
        def fn(_module, _args, output):
            h = first(output)
            out[key] = h.detach() if detach else h

        return fn

    with hooked(modules, make):
        yield out


@contextlib.contextmanager
def capture(
    model: nn.Module, layers: Sequence[int] | str | None = None, *, detach: bool = False
) -> Iterator[dict[Key, torch.Tensor]]:
    """Record the chosen layers' outputs (see the module doc for ``layers``) during forwards in the block."""
    with capture_modules(select(model, layers), detach=detach) as out:
        yield out


@contextlib.contextmanager
def capture_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every input (first positional argument) ``module`` receives during the block, in call order."""
    seen: list[torch.Tensor] = []
    with hooked([module], lambda _k: lambda _m, args: seen.append(args[0]), pre=True):
        yield seen


@contextlib.contextmanager
def unembedding_input(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The input of ``model``'s output embeddings (``lm_head``) during the block: one tensor per call.

    That input is the final, post-norm hidden state for any architecture, whereas ``hidden_states[-1]`` is
    post-norm only where transformers happens to make it so.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise models.ModelError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "its final hidden state cannot be read"
        )
    with capture_input(head) as seen:
        yield seen


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout (LoRA's included) off for the block; the previous mode is restored even on error."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
