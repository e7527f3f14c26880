"""Linear CKA and the unbiased minibatch HSIC estimator: pure functions, computed in fp64.

Sources: Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited"
(ICML 2019) for linear CKA; Nguyen, Raghu, Kornblith, "Do Wide and Deep Networks Learn the Same Things?"
(ICLR 2021, eq. 2-3) and Song et al. 2012 for the unbiased HSIC and minibatch CKA.

``X`` (n x p1) and ``Y`` (n x p2) are the features of the SAME n examples, in the same order, from two
models (or two layers). Every function accepts torch tensors or anything ``torch.as_tensor`` reads (NumPy
arrays), casts to fp64 first (never form Grams or cross-covariances in bf16), and returns a 0-d fp64 tensor.

* ``linear_cka``: feature-space form, ``‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)`` with column-centred
  features; cost O(n·p²), the cheap form when n > p (e.g. tokens as samples).
* ``linear_cka_gram``: the same quantity from Gram matrices K = XXᵀ, L = YYᵀ via the biased HSIC₀
  (``tr(KHLH)/(n-1)²``); cost O(n²), the cheap form when n < p.
* ``hsic_unbiased``: HSIC₁ (diagonal zeroed, no centring), needs n >= 4. It can be slightly negative for
  small n or near-independent features.
* ``minibatch_cka``: averages the three HSIC₁ terms over minibatches, THEN takes the ratio (averaging
  per-batch CKAs would be biased). The 1/(n(n-3)) factor is kept, so batches may differ in size.
  ``ucenter`` is the equivalent U-centring form (Google's ``MinibatchCKA``), used by the tests as a
  second route to HSIC₁.
* ``StreamingCKA``: exact feature-space linear CKA over a stream of (X_b, Y_b) chunks, for token-level
  samples where n is too large to hold: it accumulates XᵀX, YᵀY, XᵀY, the column sums and n in fp64, and
  centres at the end (``X_cᵀY_c = XᵀY - s_X s_Yᵀ / n``). Memory: three d x d fp64 matrices per layer pair
  (d = 576 -> 8 MB). The result equals ``linear_cka`` on the concatenated chunks, to rounding.

Near-zero denominators: the product under the square root is clamped at 0 and the denominator at 1e-12, so
a constant feature matrix gives CKA 0 instead of NaN. Raw values outside [0, 1] (possible for the unbiased
estimator) are returned unclipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

EPS = 1e-12


def _f64(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-d (samples x features), got shape {tuple(t.shape)}")
    return t


def _same_n(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"X and Y must hold the same samples: {a.shape[0]} vs {b.shape[0]} rows")


def _ratio(num: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    den = torch.sqrt(xx.clamp_min(0) * yy.clamp_min(0))
    return num / den.clamp_min(EPS)


def gram_linear(X: Any) -> torch.Tensor:
    """K = X Xᵀ (n x n, fp64)."""
    x = _f64(X, "X")
    return x @ x.T


def center_gram(K: Any) -> torch.Tensor:
    """H K H with H = I - 11ᵀ/n (double centring of a Gram matrix)."""
    k = _f64(K, "K")
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def linear_cka(X: Any, Y: Any) -> torch.Tensor:
    """Linear CKA in feature space (biased HSIC₀; invariant to orthogonal maps and isotropic scaling)."""
    x, y = _f64(X, "X"), _f64(Y, "Y")
    _same_n(x, y)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    num = (y.T @ x).square().sum()
    return _ratio(num, (x.T @ x).square().sum(), (y.T @ y).square().sum())


def hsic_biased(K: Any, L: Any) -> torch.Tensor:
    """HSIC₀(K, L) = tr(K H L H) / (n-1)²."""
    k, l_ = center_gram(K), center_gram(L)
    n = k.shape[0]
    return (k * l_).sum() / (n - 1) ** 2


def linear_cka_gram(K: Any, L: Any) -> torch.Tensor:
    """CKA from Gram matrices: HSIC₀(K,L) / sqrt(HSIC₀(K,K) · HSIC₀(L,L)). Equals ``linear_cka`` for linear K, L."""
    k, l_ = center_gram(K), center_gram(L)
    _same_n(k, l_)
    return _ratio((k * l_).sum(), (k * k).sum(), (l_ * l_).sum())


def hsic_unbiased(K: Any, L: Any) -> torch.Tensor:
    """HSIC₁ (Song et al. 2012):

    1/(n(n-3)) · [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1 ],  K̃, L̃ = K, L with zero diagonal.
    """
    k, l_ = _f64(K, "K").clone(), _f64(L, "L").clone()
    _same_n(k, l_)
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs n >= 4 samples, got {n}")
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    trace = (k * l_.T).sum()
    sums = k.sum() * l_.sum() / ((n - 1) * (n - 2))
    cross = (k.sum(dim=0) @ l_.sum(dim=1)) * 2 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def ucenter(K: Any) -> torch.Tensor:
    """U-centred Gram matrix (zero diagonal): ⟨U(K), U(L)⟩_F / (n(n-3)) = HSIC₁(K, L). Needs n >= 4."""
    k = _f64(K, "K").clone()
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"U-centring needs n >= 4 samples, got {n}")
    k.fill_diagonal_(0)
    means = k.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    k.fill_diagonal_(0)
    return k


def minibatch_cka(pairs: Iterable[tuple[Any, Any]]) -> torch.Tensor:
    """Unbiased minibatch linear CKA over ``(X_i, Y_i)`` feature pairs (each the same n_i examples).

    CKA_mb = mean_i HSIC₁(K_i, L_i) / sqrt( mean_i HSIC₁(K_i, K_i) · mean_i HSIC₁(L_i, L_i) ).
    """
    xy = xx = yy = torch.zeros((), dtype=torch.float64)
    count = 0
    for X, Y in pairs:
        k, l_ = gram_linear(X), gram_linear(Y)
        xy = xy + hsic_unbiased(k, l_)
        xx = xx + hsic_unbiased(k, k)
        yy = yy + hsic_unbiased(l_, l_)
        count += 1
    if count == 0:
        raise ValueError("minibatch_cka needs at least one (X, Y) batch")
    return _ratio(xy / count, xx / count, yy / count)


class StreamingCKA:
    """Exact linear CKA (feature form, biased HSIC₀) accumulated over chunks of samples, in fp64.

    ``update(X_b, Y_b)`` takes the same n_b samples from both representations (n_b x p1, n_b x p2); ``value()``
    is ``linear_cka`` of all chunks stacked. Accumulators live on the device of the first chunk.

    Every chunk is shifted by the first chunk's column means before its products are formed. Centred
    second moments do not depend on a constant shift, so this changes nothing in exact arithmetic, but it
    removes the large common offsets (LLM "massive activations") before the products, so the final
    centring cancels small numbers instead of huge ones. That is what makes ``product_dtype=torch.float32``
    safe (fp32 products are enough here, bf16 never is): the per-chunk products then cost half as much on CPU, while the
    accumulators, sums and the final algebra stay fp64.
    """

    def __init__(self, product_dtype: torch.dtype = torch.float64) -> None:
        if product_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"product_dtype must be float64 or float32 (never bf16), not {product_dtype}")
        self.product_dtype = product_dtype
        self.n = 0
        self.sxx: torch.Tensor | None = None
        self.syy = self.sxy = self.sx = self.sy = self.mx = self.my = torch.zeros(())

    def update(self, X: Any, Y: Any) -> None:
        x, y = _f64(X, "X"), _f64(Y, "Y")
        _same_n(x, y)
        if self.sxx is None:
            self.sxx = x.new_zeros(x.shape[1], x.shape[1])
            self.syy = y.new_zeros(y.shape[1], y.shape[1])
            self.sxy = x.new_zeros(x.shape[1], y.shape[1])
            self.sx, self.sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
            self.mx, self.my = x.mean(dim=0), y.mean(dim=0)
        elif x.shape[1] != self.sxx.shape[0] or y.shape[1] != self.syy.shape[0]:
            raise ValueError(
                f"feature widths changed mid-stream: {x.shape[1]}/{y.shape[1]} "
                f"vs {self.sxx.shape[0]}/{self.syy.shape[0]}"
            )
        x, y = x - self.mx, y - self.my
        # One GEMM of the stacked chunk [X | Y] yields XᵀX, XᵀY and YᵀY together: 4/3 of the flops of three
        # separate products, but one large GEMM runs faster than three smaller ones on CPU (~25 % measured).
        z = torch.cat([x, y], dim=1).to(self.product_dtype)
        g = (z.T @ z).double()
        p = x.shape[1]
        self.sxx += g[:p, :p]
        self.syy += g[p:, p:]
        self.sxy += g[:p, p:]
        self.sx += x.sum(dim=0)
        self.sy += y.sum(dim=0)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.sxx is None or self.n < 2:
            raise ValueError(f"StreamingCKA needs at least 2 samples, got {self.n}")
        n = self.n
        cxx = self.sxx - torch.outer(self.sx, self.sx) / n
        cyy = self.syy - torch.outer(self.sy, self.sy) / n
        cxy = self.sxy - torch.outer(self.sx, self.sy) / n
        xx, yy = cxx.square().sum(), cyy.square().sum()
        # Centring at the end cancels large numbers: a constant feature leaves rounding noise (~1e-16 of the
        # raw second moment), not zero. Treat that noise as the exact zero the direct form would give.
        if xx.sqrt() <= 1e-12 * self.sxx.norm() or yy.sqrt() <= 1e-12 * self.syy.norm():
            return torch.zeros((), dtype=torch.float64)
        return _ratio(cxy.square().sum(), xx, yy).cpu()
