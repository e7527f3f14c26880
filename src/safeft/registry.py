"""A tiny name -> object registry with strict lookups.

Every pluggable family (defenses, judges, suites, data sources, domains) is a ``Registry``, filled the same
way: each plug-in module decorates its class or function with ``@REGISTRY.register(name)``, and the registry
names the modules that fill it (``plugins``), importing them on its first lookup. So whoever looks a name up
needs no import of the plug-ins (the config needs no import of the defenses), and no module imports its
own plug-ins back: the import graph has no circles.

Unknown names raise with a "did you mean" hint instead of silently falling back to a default: a typo in a
defense name must never turn a run into plain SFT.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, plugins: Sequence[str] = ()) -> None:
        self.kind = kind
        self.plugins = tuple(plugins)  # modules whose import registers the built-in entries
        self._loaded = not self.plugins
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._hidden: set[str] = set()

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a plug-in that looks a name up while it loads must not recurse
            for module in self.plugins:
                importlib.import_module(module)

    def register(self, name: str, doc: str = "", *, hidden: bool = False) -> Callable[[T], T]:
        """Register under ``name``; ``doc`` (default: the object's docstring) gives the summary ``safeft ls``
        prints, its first paragraph. ``hidden`` entries (test doubles) work by name but are not listed."""
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            text = (doc or (getattr(obj, "__doc__", None) or "")).strip()
            # The first paragraph, whole: a summary sentence often wraps onto a second source line.
            self._docs[key] = " ".join(text.split("\n\n")[0].split())
            if hidden:
                self._hidden.add(key)
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load()
        key = name.lower()
        if key not in self._items:
            hint = difflib.get_close_matches(key, list(self._items), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}{extra} (known: {', '.join(sorted(self._items))})")
        return self._items[key]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))

    def describe(self, include_hidden: bool = True) -> dict[str, str]:
        self._load()
        return {k: self._docs[k] for k in sorted(self._items) if include_hidden or k not in self._hidden}
