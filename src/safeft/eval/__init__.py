"""Evaluation, split into generation (``generate``), judges (``judges``) and suites (``suites``)."""
