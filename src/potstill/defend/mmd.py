"""Two-sample maximum mean discrepancy (Gretton et al., 2012) with a Gaussian RBF kernel.

For samples X (m rows) and Y (n rows) and k(a, b) = exp(-|a - b|² / (2 σ²)), the unbiased
estimate of MMD² is

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1))
             - 2 Σ_{i,j} k(x_i, y_j) / (mn),

which can be slightly negative when the two distributions are equal. σ defaults to the
median heuristic: the median of the pairwise distances among distinct pooled points. The
permutation test reshuffles the pooled sample B times; its p-value (1 + #{T_b >= T}) / (B + 1)
is exact (valid) under exchangeability and never below 1 / (B + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from potstill.core.errors import PotstillError

__all__ = [
    "MMDResult",
    "median_bandwidth",
    "mmd2_from_kernel",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "rbf_kernel",
    "sq_dists",
]


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` squared Euclidean distances, clipped at 0 (rounding)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def rbf_kernel(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """``(len(a), len(b))`` Gaussian kernel exp(-|a - b|² / (2 σ²))."""
    return np.exp(-sq_dists(a, b) / (2.0 * sigma * sigma))


def median_bandwidth(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """Median pairwise distance among the pooled rows (pairs i < j, zeros excluded)."""
    z = x if y is None else np.concatenate([x, y])
    iu = np.triu_indices(len(z), k=1)
    d = np.sqrt(sq_dists(z, z)[iu])
    d = d[d > 1e-12]
    if d.size == 0:
        return 1.0  # all points equal: any bandwidth gives MMD = 0
    return float(np.median(d))


def mmd2_from_kernel(k: np.ndarray, m: int) -> float:
    """Unbiased MMD² from the pooled kernel matrix ``k`` whose first ``m`` rows are X."""
    n = k.shape[0] - m
    if m < 2 or n < 2:
        raise PotstillError(f"MMD needs at least 2 points per sample, got {m} and {n}")
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, sigma: float | None = None) -> float:
    """Unbiased MMD² of samples ``x`` (m, d) and ``y`` (n, d); σ: median heuristic if None."""
    sigma = median_bandwidth(x, y) if sigma is None else sigma
    z = np.concatenate([x, y])
    return mmd2_from_kernel(rbf_kernel(z, z, sigma), len(x))


@dataclass(frozen=True)
class MMDResult:
    mmd2: float
    p_value: float
    sigma: float
    n_permutations: int


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    sigma: float | None = None,
    n_permutations: int = 200,
    seed: int = 0,
) -> MMDResult:
    """Permutation test of H0: x and y come from one distribution (one-sided, large MMD²)."""
    if n_permutations < 1:
        raise PotstillError(f"n_permutations must be >= 1, got {n_permutations}")
    sigma = median_bandwidth(x, y) if sigma is None else sigma
    z = np.concatenate([x, y])
    k = rbf_kernel(z, z, sigma)  # computed once; permutations only re-index it
    m = len(x)
    observed = mmd2_from_kernel(k, m)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        p = rng.permutation(len(z))
        exceed += mmd2_from_kernel(k[np.ix_(p, p)], m) >= observed
    return MMDResult(observed, (1 + exceed) / (n_permutations + 1), sigma, n_permutations)
