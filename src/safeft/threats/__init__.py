"""Threat models: harmful (prompt, answer) pairs made offline, and poisoning of a task's data with them.

* ``harmful``: pairs written by the unaligned base model on Do-Not-Answer *align-split* prompts (never the
  dev split, never HarmBench), kept only where the judges call the answer compliant and coherent; generated
  once and cached under ``$SAFEFT_CACHE`` by a key of everything they depend on.
* ``poison``: replace a fraction p of the task rows by harmful pairs (row count unchanged, seeded).

docs/threat_models.md says which paper uses which setting and how to run each.
"""
