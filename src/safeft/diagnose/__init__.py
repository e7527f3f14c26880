"""Diagnosis of safety collapse: representation similarity (CKA) between an aligned and a fine-tuned model.

Every analysis here is a pure function tested against a naive reference on random tensors.
"""

from safeft.diagnose.cka import (
    StreamingCKA,
    center_gram,
    gram_linear,
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    linear_cka_gram,
    minibatch_cka,
    ucenter,
)

__all__ = [
    "StreamingCKA",
    "ucenter",
    "center_gram",
    "gram_linear",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "linear_cka_gram",
    "minibatch_cka",
]
