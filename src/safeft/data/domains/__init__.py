"""Benign fine-tuning domains (finance, medical, code) with checkable answers.

Importing this package registers every built-in domain in ``DOMAINS``.
"""

from safeft.data.domains import code, finance, medical  # noqa: F401 - imported to register the domains
from safeft.data.domains.base import DOMAINS, N_TEST, N_TRAIN, Domain, check, load_domain, run_domain

__all__ = ["DOMAINS", "N_TEST", "N_TRAIN", "Domain", "check", "load_domain", "run_domain"]
