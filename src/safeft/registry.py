"""A tiny name -> object registry with strict lookups.

Every pluggable family (defenses, judges, data sources, domains) is a ``Registry``. Unknown names raise
with a "did you mean" hint instead of silently falling back to a default: a typo in a defense name must
never turn a run into plain SFT.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._hidden: set[str] = set()

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
        key = name.lower()
        if key not in self._items:
            hint = difflib.get_close_matches(key, list(self._items), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}{extra} (known: {', '.join(sorted(self._items))})")
        return self._items[key]

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def describe(self, include_hidden: bool = True) -> dict[str, str]:
        return {k: self._docs[k] for k in sorted(self._items) if include_hidden or k not in self._hidden}
