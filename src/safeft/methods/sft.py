"""Plain supervised fine-tuning: the undefended baseline every defense is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from safeft.config import DefenseConfig
from safeft.methods.base import Defense
from safeft.methods.registry import register


@dataclass
class SFTConfig(DefenseConfig):
    name: str = "sft"


@register
class SFT(Defense):
    """Plain SFT: minimise the task cross-entropy on response tokens.

    Objective: L(θ) = CE(θ; b_task), the mean token cross-entropy over response positions (prompt masked).
    Hyperparameters: none beyond the optimiser's (``train.*``).
    Data: the task data only.
    Cost: 1 forward + 1 backward per micro-batch (the unit every other method is measured in).
    """

    stage = "finetune"
    needs = ()
    Config = SFTConfig
