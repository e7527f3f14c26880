"""Your own defenses, judges, data sources and domains on the command line: ``SAFEFT_PLUGINS``.

A plugin is an ordinary Python file or module that registers something (``@METHODS.register(...)``,
``@JUDGES.register(...)``, ...; ``docs/extending.md``). In Python, importing it is enough. The command line
imports the ones named in the environment variable ``SAFEFT_PLUGINS`` before it runs a verb: a
comma-separated list of module names (importable from ``sys.path``) or paths to ``.py`` files::

    SAFEFT_PLUGINS=my_defense.py,my_lab.judges safeft train --defense mine data.task=domain:finance

Only what the user names is imported; nothing is discovered or downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from safeft.config import ConfigError

ENV = "SAFEFT_PLUGINS"


def load_plugins(spec: str | None = None) -> list[ModuleType]:
    """Import each plugin named in ``spec`` (default: ``$SAFEFT_PLUGINS``); return the modules."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if item:
            out.append(_import(item))
    return out


def _import(item: str) -> ModuleType:
    if item.endswith(".py"):
        path = Path(item).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{ENV}: {item}: no such file")
        name = f"safeft_plugin_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]  # imported already: registering twice would raise
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"{ENV}: {item}: cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(item)
    except ModuleNotFoundError as e:
        if e.name == item or item.startswith(f"{e.name}."):
            raise ConfigError(f"{ENV}: no module named {item!r} (name a module on sys.path or a .py file)") from e
        raise
