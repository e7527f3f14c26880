"""Defenses, one file each, registered by name. Every method is imported explicitly here."""

from __future__ import annotations

from safeft.config import DefenseConfig

# Explicit imports: each registers its method(s) by name.
from safeft.methods import (  # noqa: F401
    booster,
    ewc,
    lisa,
    mixing,
    repanchor,
    repnoise,
    safelora,
    saft,
    saft_repanchor,
    sap,
    sbr,
    sft,
    vaccine,
)
from safeft.methods.base import Batch, Defense, StepOutput
from safeft.methods.registry import METHODS


def config_class(name: str) -> type[DefenseConfig]:
    return METHODS.get(name).Config


def build(cfg: DefenseConfig) -> Defense:
    return METHODS.get(cfg.name)(cfg)


__all__ = ["METHODS", "Batch", "Defense", "StepOutput", "build", "config_class"]
