"""Nested trainer state stored without pickle: tensors in safetensors, everything else as JSON.

A checkpoint's trainer state (optimizer, scheduler, every RNG, a defense's ``state_dict``) is a tree of
dicts, lists and tuples over tensors, numpy arrays and Python scalars. ``torch.save`` would pickle it, and
unpickling a file from a run directory someone else wrote runs whatever code that file names. Here the
tree becomes two files that can only ever be read as data:

* ``<stem>.safetensors``: every tensor, under keys ``"0"``, ``"1"``, ...
* ``<stem>.json``: the tree, each node tagged, so reading gives back exactly the types that were written::

      {"t": "3"}                      the tensor stored under key "3"
      {"nd": [...], "dtype": "uint32", "shape": [624]}    a numpy array (numpy's RNG state)
      {"np": "float64", "v": 0.5}     a numpy scalar
      {"tuple": [...]}                a tuple (Python's and numpy's RNG states are tuples)
      {"dict": [[key, value], ...]}   a dict, keys encoded like values (optimizer state is keyed by int)
      [...], 1, 2.5, NaN, "x", true, null     lists and scalars as themselves

Anything else (an arbitrary object) is an error at save time naming where in the tree it sits, so a
defense that starts keeping such state learns it at its first checkpoint, not at a resume months later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "safeft-tensortree-1"


class StateFormatError(ValueError):
    """A state tree that cannot be stored, or files that do not hold one."""


def _encode(node: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    # bool before int (bool is an int), numpy scalars before float (np.float64 is a float)
    if node is None or isinstance(node, bool | str):
        return node
    if isinstance(node, np.generic):
        return {"np": node.dtype.name, "v": node.item()}
    if isinstance(node, int | float):
        return node
    if isinstance(node, torch.Tensor):
        key = str(len(tensors))
        # safetensors wants contiguous tensors that share no memory with each other
        tensors[key] = node.detach().to("cpu").clone().contiguous()
        return {"t": key}
    if isinstance(node, np.ndarray):
        if node.dtype == object:
            raise StateFormatError(f"{where}: numpy array of Python objects cannot be stored")
        return {"nd": node.ravel().tolist(), "dtype": node.dtype.name, "shape": list(node.shape)}
    if isinstance(node, tuple):
        return {"tuple": [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {
            "dict": [
                [_encode(k, f"{where} key", tensors), _encode(v, f"{where}[{k!r}]", tensors)] for k, v in node.items()
            ]
        }
    raise StateFormatError(
        f"{where}: a {type(node).__module__}.{type(node).__qualname__} cannot be stored in a checkpoint "
        "(only tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts)"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict) and len(node) >= 1:
        if set(node) == {"t"}:
            if node["t"] not in tensors:
                raise StateFormatError(f"{where}: tensor {node['t']!r} is missing from the .safetensors file")
            return tensors[node["t"]]
        if set(node) == {"nd", "dtype", "shape"}:
            return np.asarray(node["nd"], dtype=np.dtype(node["dtype"])).reshape(node["shape"])
        if set(node) == {"np", "v"}:
            return np.dtype(node["np"]).type(node["v"])
        if set(node) == {"tuple"}:
            return tuple(_decode(v, tensors, where) for v in node["tuple"])
        if set(node) == {"dict"}:
            return {_hashable(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in node["dict"]}
    raise StateFormatError(f"{where}: unexpected node {str(node)[:80]!r}")


def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # cannot happen for trees we wrote (list keys are unhashable in Python)
        raise StateFormatError(f"dict key {key!r} is not hashable")
    return key


def save(tree: Any, directory: Path, stem: str) -> list[Path]:
    """Write ``tree`` as ``<stem>.safetensors`` + ``<stem>.json`` in ``directory`` (call it inside an atomic
    directory: the pair is only meaningful together). Return the two paths."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, stem, tensors)
    st, js = Path(directory) / f"{stem}.safetensors", Path(directory) / f"{stem}.json"
    save_file(tensors, str(st), metadata={"format": FORMAT})
    js.write_text(json.dumps({"format": FORMAT, "tree": skeleton}) + "\n")
    return [st, js]


def load(directory: Path, stem: str) -> Any:
    """Read back what ``save`` wrote. Only data is parsed: no file content can name code to run."""
    from safetensors.torch import load_file

    st, js = Path(directory) / f"{stem}.safetensors", Path(directory) / f"{stem}.json"
    try:
        doc = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise StateFormatError(f"{js}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFormatError(f"{js}: not a {FORMAT} file")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise StateFormatError(f"{st}: cannot read tensors ({e})") from None
    return _decode(doc["tree"], tensors, str(js))


def exists(directory: Path, stem: str) -> bool:
    return (Path(directory) / f"{stem}.safetensors").is_file() and (Path(directory) / f"{stem}.json").is_file()
