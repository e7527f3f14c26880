"""Linear CKA and unbiased HSIC against naive NumPy references, and the invariances CKA must (not) have."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safeft.diagnose.cka import (
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    linear_cka_gram,
    minibatch_cka,
)


def naive_hsic0(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def naive_cka(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return naive_hsic0(K, L) / np.sqrt(naive_hsic0(K, K) * naive_hsic0(L, L))


def naive_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """The U-centring form (Székely & Rizzo), written with explicit loops: a different route to HSIC₁."""
    n = K.shape[0]

    def ucenter(M):
        M = M.copy()
        np.fill_diagonal(M, 0)
        U = np.zeros_like(M)
        for i in range(n):
            for j in range(n):
                if i != j:
                    U[i, j] = M[i, j] - M[i].sum() / (n - 2) - M[:, j].sum() / (n - 2) + M.sum() / ((n - 1) * (n - 2))
        return U

    return float((ucenter(K) * ucenter(L)).sum()) / (n * (n - 3))


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_linear_cka_matches_the_naive_reference(rng):
    X = rng.normal(size=(40, 7))
    Y = X @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(40, 5))
    ref = naive_cka(X, Y)
    assert float(linear_cka(X, Y)) == pytest.approx(ref, abs=1e-10)
    assert float(linear_cka_gram(X @ X.T, Y @ Y.T)) == pytest.approx(ref, abs=1e-10)
    assert float(hsic_biased(X @ X.T, Y @ Y.T)) == pytest.approx(naive_hsic0(X @ X.T, Y @ Y.T), rel=1e-10)
    # torch input (fp32) gives the same fp64 answer
    assert float(linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y))) == pytest.approx(ref, abs=1e-6)


def test_hsic_unbiased_matches_the_u_centring_form(rng):
    X, Y = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))
    K, L = X @ X.T, Y @ Y.T
    assert float(hsic_unbiased(K, L)) == pytest.approx(naive_hsic1(K, L), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="n >= 4"):
        hsic_unbiased(K[:3, :3], L[:3, :3])


def test_cka_of_a_representation_with_itself_is_one(rng):
    X = rng.normal(size=(30, 12))
    assert float(linear_cka(X, X)) == pytest.approx(1.0, abs=1e-12)
    assert float(minibatch_cka([(X, X)])) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_general_linear_maps(rng):
    X = rng.normal(size=(50, 8))
    Y = np.tanh(X @ rng.normal(size=(8, 8)))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = float(linear_cka(X, Y))
    assert float(linear_cka(3.7 * X @ Q, Y)) == pytest.approx(base, abs=1e-10)
    assert float(linear_cka(X, 0.01 * Y @ Q.T + 5.0)) == pytest.approx(base, abs=1e-10)  # + a constant shift
    A = np.diag([10.0, 1, 1, 1, 1, 1, 1, 0.1]) @ Q  # invertible but anisotropic
    assert abs(float(linear_cka(X @ A, Y)) - base) > 1e-3


def test_constant_features_give_zero_not_nan(rng):
    X = np.ones((10, 4))
    assert float(linear_cka(X, rng.normal(size=(10, 3)))) == 0.0


def test_minibatch_cka_approaches_the_full_data_cka_as_batches_grow(rng):
    n, d = 4096, 16
    X = rng.normal(size=(n, d))
    Y = X @ rng.normal(size=(d, d)) + 2.0 * rng.normal(size=(n, d))
    full = float(linear_cka(X, Y))

    def mb(size: int) -> float:
        return float(minibatch_cka((X[i : i + size], Y[i : i + size]) for i in range(0, n, size)))

    errors = {size: abs(mb(size) - full) for size in (8, 512)}
    assert errors[512] < errors[8]
    assert errors[512] < 0.005
    # averaging *biased* per-batch CKAs at small batches is far off: that is why the HSIC terms are averaged
    naive_mean = np.mean([naive_cka(X[i : i + 8], Y[i : i + 8]) for i in range(0, n, 8)])
    assert abs(naive_mean - full) > 5 * errors[8]


def test_ucentring_form_gives_the_same_unbiased_hsic(rng):
    from safeft.diagnose.cka import ucenter

    X, Y = rng.normal(size=(12, 5)), rng.normal(size=(12, 4))
    K, L = X @ X.T, Y @ Y.T
    via_u = float((ucenter(K) * ucenter(L)).sum()) / (12 * 9)
    assert via_u == pytest.approx(float(hsic_unbiased(K, L)), rel=1e-10)
    with pytest.raises(ValueError, match="n >= 4"):
        ucenter(K[:3, :3])
    with pytest.raises(ValueError, match="n >= 4"):
        minibatch_cka([(X[:3], Y[:3])])


def test_streaming_cka_equals_full_data_cka_whatever_the_chunking(rng):
    from safeft.diagnose.cka import StreamingCKA

    # large offsets and unequal chunks: the centring-at-the-end algebra must stay exact in fp64
    X = rng.normal(size=(1000, 9)) + 50.0
    Y = np.tanh(X @ rng.normal(size=(9, 6))) + 0.3 * rng.normal(size=(1000, 6))
    full = naive_cka(X, Y)
    s = StreamingCKA()
    cuts = [0, 1, 7, 300, 301, 999, 1000]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        s.update(torch.tensor(X[a:b]), Y[a:b])
    assert s.n == 1000
    assert float(s.value()) == pytest.approx(full, abs=1e-9)
    same = StreamingCKA()
    same.update(X, X)
    assert float(same.value()) == pytest.approx(1.0, abs=1e-12)


def test_streaming_cka_guards(rng):
    from safeft.diagnose.cka import StreamingCKA

    s = StreamingCKA()
    with pytest.raises(ValueError, match="at least 2"):
        s.value()
    s.update(np.ones((5, 3)), rng.normal(size=(5, 2)))
    assert float(s.value()) == 0.0  # constant features: zero, not NaN
    with pytest.raises(ValueError, match="widths changed"):
        s.update(np.ones((5, 4)), rng.normal(size=(5, 2)))
    with pytest.raises(ValueError, match="same samples"):
        s.update(np.ones((5, 3)), rng.normal(size=(4, 2)))


def test_gram_form_and_minibatch_share_the_invariances(rng):
    X = rng.normal(size=(64, 8))
    Y = np.tanh(X @ rng.normal(size=(8, 8)))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    Xt = 0.2 * X @ Q
    assert float(linear_cka_gram(Xt @ Xt.T, Y @ Y.T)) == pytest.approx(float(linear_cka(X, Y)), abs=1e-10)
    mb = float(minibatch_cka([(X[:32], Y[:32]), (X[32:], Y[32:])]))
    assert float(minibatch_cka([(Xt[:32], Y[:32]), (Xt[32:], Y[32:])])) == pytest.approx(mb, abs=1e-10)
    A = np.diag([10.0, 1, 1, 1, 1, 1, 1, 0.1]) @ Q
    assert abs(float(minibatch_cka([(X[:32] @ A, Y[:32]), (X[32:] @ A, Y[32:])])) - mb) > 1e-3


def test_streaming_cka_with_fp32_products_stays_close_despite_massive_offsets(rng):
    from safeft.diagnose.cka import StreamingCKA

    # a few huge, nearly constant channels (LLM massive activations) on top of the informative ones
    X = rng.normal(size=(3000, 32))
    X[:, :3] += np.array([800.0, -300.0, 150.0])
    Y = X @ rng.normal(size=(32, 32)) * 0.1 + 0.5 * rng.normal(size=(3000, 32))
    Y[:, 5] += 1000.0
    full = naive_cka(X, Y)
    s64, s32 = StreamingCKA(), StreamingCKA(torch.float32)
    for i in range(0, 3000, 250):
        s64.update(X[i : i + 250], Y[i : i + 250])
        s32.update(X[i : i + 250], Y[i : i + 250])
    assert float(s64.value()) == pytest.approx(full, abs=1e-8)
    assert float(s32.value()) == pytest.approx(full, abs=1e-5)
    with pytest.raises(ValueError, match="never bf16"):
        StreamingCKA(torch.bfloat16)
