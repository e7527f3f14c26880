"""safeft: safety-preserving fine-tuning of aligned language models.

The Python API (``safeft.api``, documented in ``docs/api.md``)::

    import safeft
    cfg = safeft.load_config("configs/demo.yaml", {"train.steps": 10})
    run = safeft.train(cfg, defense="sbr")
    summary = safeft.evaluate(run.run_dir, suites=["harmful"])

Everything is imported on first use, so ``import safeft`` stays cheap (no torch, no transformers).

``train``, ``align``, ``diagnose`` and ``export`` are also the names of submodules (``safeft.train`` is
the training loop). Python binds a package attribute to a submodule whenever that submodule is imported,
which would shadow an API function of the same name, so instead those four submodules are made callable:
``safeft.train(cfg)`` calls ``safeft.api.train(cfg)`` while ``from safeft.train import train`` and
``safeft.train.load_run_model`` keep working.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Submodules that double as API functions (see the module docstring).
_CALLABLE_MODULES = frozenset({"train", "align", "diagnose", "export"})
_API = ("evaluate", "load_config", "save_config", "config_dict", "config_yaml", "load_model")

__all__ = [
    "__version__",
    "align",
    "config_dict",
    "config_yaml",
    "diagnose",
    "evaluate",
    "export",
    "load_config",
    "load_model",
    "save_config",
    "train",
]

if TYPE_CHECKING:
    from safeft.api import config_dict, config_yaml, evaluate, load_config, load_model, save_config


def _api_function(name: str):
    return getattr(importlib.import_module("safeft.api"), name)


class _CallableModule(types.ModuleType):
    """A submodule that, called, runs the API function of its own name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _api_function(self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what help() and IDEs show for safeft.train(...)
        return inspect.signature(_api_function(self.__name__.rpartition(".")[2]))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets `safeft.<child> = <module>` after importing a child; make the four callable.
        if name in _CALLABLE_MODULES and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _API:
        return _api_function(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package
