"""The registry of defenses and the one way a defense joins it.

A method declares its name ONCE, as the default of its Config's ``name`` field (the value a YAML file's
``defense.name`` selects, so it has to live there anyway), and decorates its class with ``@register``::

    @dataclass
    class LisaConfig(DefenseConfig):
        name: str = "lisa"
        ...

    @register
    class Lisa(Defense):
        stage = "finetune"
        needs = ("alignment",)
        Config = LisaConfig

``register`` reads the name from the Config, sets ``Lisa.name`` from it and files the class under it. It
checks what a typo would otherwise turn into a silent fallback: the Config declares its own ``name`` (one
inherited from another method's Config would register the class under that method's name), the name is
lower case, ``stage`` is one of ``STAGES``. The older form, ``@METHODS.register("lisa")`` with ``name`` also
written on the class, still works and gets the same checks, so the three spellings cannot disagree.

Kept apart from ``methods/__init__`` so that method files can import it; it imports no method and not
``safeft.config`` (which looks defenses up here), so the import graph has no circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from safeft.registry import Registry

STAGES = ("align", "finetune", "post")

T = TypeVar("T", bound=type)


def declared_name(cls: type) -> str:
    """The name ``cls.Config`` declares as its own ``name`` default; raises if it declares none."""
    config = cls.__dict__.get("Config")
    if config is None or not dataclasses.is_dataclass(config):
        raise TypeError(f"defense {cls.__name__} needs its own Config (a DefenseConfig dataclass): Config = ...")
    # Only this class's own annotations: a Config that inherits `name` would reuse its parent method's name.
    if "name" not in config.__dict__.get("__annotations__", {}):
        raise TypeError(
            f'{config.__name__} must declare the method\'s name itself, as `name: str = "..."` '
            f"(it inherits {getattr(config, 'name', None)!r})"
        )
    name = next(f.default for f in dataclasses.fields(config) if f.name == "name")
    if not isinstance(name, str) or not name or name != name.lower() or name != name.strip():
        raise TypeError(f"{config.__name__}.name must be a non-empty lower-case string, not {name!r}")
    return name


def check_defense(cls: type, name: str) -> None:
    """Check that ``cls`` is a well-formed defense to register under ``name``; set ``cls.name`` to it."""
    declared = declared_name(cls)
    if declared != name:
        raise TypeError(f"defense {cls.__name__} is registered as {name!r} but its Config declares {declared!r}")
    own = cls.__dict__.get("name")
    if own is not None and own != name:  # the older form writes the name on the class as well
        raise TypeError(f"defense {cls.__name__} says name = {own!r} but is registered as {name!r}")
    if getattr(cls, "stage", None) not in STAGES:
        raise TypeError(f"defense {cls.__name__}.stage must be one of {', '.join(STAGES)}")
    needs = getattr(cls, "needs", ())
    if not isinstance(needs, tuple) or not all(isinstance(n, str) for n in needs):
        raise TypeError(f"defense {cls.__name__}.needs must be a tuple of names, not {needs!r}")
    cls.name = name


class DefenseRegistry(Registry):
    """A ``Registry`` of defense classes whose every entry passes ``check_defense``."""

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        file = super().register(name, doc)

        def deco(cls: T) -> T:
            check_defense(cls, name)
            return file(cls)

        return deco

    def add(self, cls: T) -> T:
        """Class decorator: register ``cls`` under the name its Config declares."""
        return self.register(declared_name(cls))(cls)


METHODS = DefenseRegistry("defense", plugins=("safeft.methods",))

# The decorator every method file uses: ``@register`` above the defense class.
register = METHODS.add
