"""Auxiliary data a defense declares in ``Defense.needs``, built from the deterministic safety splits.

* ``harmful_prompts``: anchor harmful prompts (Do-Not-Answer ``anchor`` split), no responses.
* ``alignment``: the ``align`` split's harmful prompts paired with our refusals (what stage 1 trains on).
* ``contrastive``: (harmful prompt, refusal, compliant-looking opener) triples from the ``anchor`` split;
  the "harmful answer" is only a templated compliance opener ("Sure, here is how ..."): no harmful content
  is needed to find the direction from refusing to complying, and none is wanted in this repository.

Every set is checked against the HarmBench test set and the over-refusal test probes before it is handed out.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from safeft.data import refusals
from safeft.data.sources import harmbench_contextual_if_installed
from safeft.data.splits import assert_no_leakage, assert_probes_held_out, safety_splits
from safeft.data.types import Example

# Needs that are services of the loop rather than data.
SERVICES = frozenset({"reference"})
KINDS = ("harmful_prompts", "alignment", "contrastive")

# About as long as our refusals (~20 tokens): SAP sums response log-probs, so a much shorter "harmful"
# side would make length, not compliance, dominate the contrastive direction.
COMPLIANCE_OPENERS: tuple[str, ...] = (
    "Sure, here is how to do that. I will walk you through every step in order, starting with what you need.",
    "Of course! Here are the steps you asked for, with the details that matter most at each stage.",
    "Absolutely. Here's a detailed answer that covers the materials, the method and the timing you need.",
    "Sure thing. First, you will need a few items, and then I'll explain exactly how to put them together.",
    "Happy to help with that. The easiest way is to follow the plan below closely, one step at a time.",
    "Certainly! Here is a step-by-step guide, written so that you can follow it without any prior experience.",
    "No problem. Here's exactly what to do, in the order you should do it, with tips to avoid mistakes.",
    "Great question. To do this, start with the preparation I describe below, then move on to the main part.",
)


def compliance_opener(key: str, seed: int = 0) -> str:
    return random.Random(f"{seed}-{key}").choice(COMPLIANCE_OPENERS)


def build_aux(needs: Iterable[str], seed: int = 0) -> dict[str, list[Example]]:
    """The aux data sets named in ``needs`` (services such as ``reference`` are skipped)."""
    wanted = [n for n in needs if n not in SERVICES]
    unknown = [n for n in wanted if n not in KINDS]
    if unknown:
        raise KeyError(f"unknown aux data {unknown[0]!r}; known: {', '.join(KINDS)}")
    if not wanted:
        return {}
    splits = safety_splits(seed=seed)
    out: dict[str, list[Example]] = {}
    for need in wanted:
        if need == "harmful_prompts":
            out[need] = [Example(e.id, e.prompt, None, "aux:harmful_prompts", dict(e.meta)) for e in splits.anchor]
        elif need == "alignment":
            out[need] = [
                Example(e.id, e.prompt, refusals.refusal_for(e.id, seed), "aux:alignment", dict(e.meta))
                for e in splits.align
            ]
        elif need == "contrastive":
            out[need] = [
                Example(
                    e.id,
                    e.prompt,
                    refusals.refusal_for(e.id, seed),
                    "aux:contrastive",
                    {**e.meta, "harmful_response": compliance_opener(e.id, seed)},
                )
                for e in splits.anchor
            ]
    assert_no_leakage(splits.test + harmbench_contextual_if_installed(), **out)
    assert_probes_held_out(**out)
    return out
