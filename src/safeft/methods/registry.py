"""The registry of defenses, kept apart from ``methods/__init__`` so method files can import it."""

from safeft.registry import Registry

METHODS: Registry = Registry("defense", plugins=("safeft.methods",))
