"""Independent oracles for the spectrum tests: explicit deltas, numpy SVD, loops.

Nothing here imports sed_dask's Gram or window code, so a shared bug cannot hide.
"""

from __future__ import annotations

import numpy as np


def deltas(X) -> np.ndarray:
    """float32 differences (docs/method.md §2.3), then float64."""
    X = np.asarray(X, dtype=np.float32)
    return (X[1:] - X[:-1]).astype(np.float64)


def band_of(D: np.ndarray, width: int) -> np.ndarray:
    """band[i, k] = <D_i, D_{i-k}> by explicit dot products; NaN where i-k < 0."""
    N = D.shape[0]
    out = np.full((N, width), np.nan)
    for i in range(N):
        for k in range(min(width, i + 1)):
            out[i, k] = float(np.dot(D[i], D[i - k]))
    return out


def window_svds(D: np.ndarray, W: int):
    """[(end index, sigma, v1), ...] from numpy SVD of each explicit W x P window."""
    out = []
    for k in range(W - 1, D.shape[0]):
        _, s, vt = np.linalg.svd(D[k - W + 1 : k + 1], full_matrices=False)
        out.append((k, s, vt[0]))
    return out


def random_walk(rng, n: int, P: int, scale: float = 1e-2) -> np.ndarray:
    X = rng.standard_normal((1, P)) * 0.1
    steps = rng.standard_normal((n - 1, P)) * scale
    return np.concatenate([X, X + np.cumsum(steps, axis=0)]).astype(np.float32)


def planted(rng, n: int, P: int, rank: int = 3, noise: float = 1e-3) -> np.ndarray:
    """Deltas = rank-r drift with decaying strengths + isotropic noise (a clear spectral edge)."""
    A = rng.standard_normal((n - 1, rank)) * (4.0 ** -np.arange(rank))
    B = rng.standard_normal((rank, P)) / np.sqrt(P)
    D = A @ B + noise * rng.standard_normal((n - 1, P)) / np.sqrt(P)
    X0 = rng.standard_normal((1, P)) * 0.05
    return np.concatenate([X0, X0 + np.cumsum(D, axis=0)]).astype(np.float32)


def stack_with_spectrum(sigma, P: int, rng) -> np.ndarray:
    """W deltas whose window Gram is diag(sigma^2): rows sigma_j * (orthonormal q_j)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    Q, _ = np.linalg.qr(rng.standard_normal((P, sigma.size)))
    return sigma[:, None] * Q.T
