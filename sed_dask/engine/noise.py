"""Marchenko-Pastur / BBP noise-floor quantities of a window spectrum (docs/method.md §4.1-4.3).

All take descending, clamped eigenvalues ``lam`` (``sigma**2``) of W x W window Grams, batched
over the leading axis, and ``P`` = the parameter count of the vector (or layer group) analysed.
Because sqrt(W/P) is ~1e-4 for real models, the MP "edge" is essentially the root-mean of the
bottom-half eigenvalues; it is what the paper's Fig 1A greys out as "below MP".
"""

from __future__ import annotations

import numpy as np


def mp_adjacent_ratio(W) -> np.ndarray:
    """1 + 2 W^(-2/3): Tracy-Widom-spacing heuristic for a noise-level adjacent ratio (§4.3)."""
    return 1.0 + 2.0 * np.asarray(W, dtype=np.float64) ** (-2.0 / 3.0)


def noise_energy(lam: np.ndarray) -> np.ndarray:
    """n-bar: mean of the bottom-half eigenvalues, zero-based indices W//2 .. W-1 (§4.1)."""
    W = lam.shape[-1]
    return lam[..., W // 2 :].mean(axis=-1)


def mp_edge(lam: np.ndarray, P: int) -> np.ndarray:
    """sigma_MP = sqrt(n-bar (1 + sqrt(W/P))^2), the singular-value noise floor (§4.2)."""
    W = lam.shape[-1]
    return np.sqrt(noise_energy(lam)) * (1.0 + np.sqrt(W / P))


def bbp_ratio(lam: np.ndarray, P: int) -> np.ndarray:
    """sigma_W / d_crit with d_crit = nu (P (W-1))^(1/4), nu^2 = n-bar / P (§4.1); NaN if undefined."""
    W = lam.shape[-1]
    nu = np.sqrt(noise_energy(lam) / P)
    d_crit = nu * (P * (W - 1)) ** 0.25
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(lam[..., -1]) / d_crit
    return np.where(d_crit > 0, r, np.nan)


# ------------------------------------------------------------------------------- signal count
COUNT_ALPHA = 0.01  # per-step false-positive rate of the sequential test (benchmarks/fidelity.py)
_NULL_DRAWS = 4000
_quantile_cache: dict = {}


def noise_ratio_quantile(m: int, P: float, *, alpha: float = COUNT_ALPHA, n_draws: int = _NULL_DRAWS) -> float:
    """1 - alpha quantile of lambda_1 / mean(lambda) for m deltas of pure isotropic noise in R^P.

    The m x m Gram of Gaussian noise is Wishart(P, nu^2 I_m); the statistic is scale-free, so one
    Monte-Carlo table per (m, P) serves every window (Bartlett draws in m-space: exact for any P,
    no P-dimensional vector). Fixed seed: the threshold is part of the estimator's definition.
    Tracy-Widom gives the same to O(m^(-2/3)) but is poor at the m = 2..5 that small W needs.
    """
    key = (int(m), float(P), float(alpha), int(n_draws))
    if key not in _quantile_cache:
        if m < 2:
            raise ValueError(f"the noise test needs m >= 2 values, got {m}")
        rng = np.random.Generator(np.random.Philox(key=[0x5ED, int(m)]))
        L = np.tril(rng.standard_normal((n_draws, m, m)), k=-1)
        idx = np.arange(m)
        L[:, idx, idx] = np.sqrt(rng.chisquare(float(P) - idx, size=(n_draws, m)))
        lam = np.linalg.eigvalsh(L @ np.swapaxes(L, -1, -2))
        t = lam[:, -1] / lam.mean(axis=1)
        _quantile_cache[key] = float(np.quantile(t, 1.0 - alpha))
    return _quantile_cache[key]


def signal_count(lam: np.ndarray, P: float, *, alpha: float = COUNT_ALPHA) -> np.ndarray:
    """Number of values above the noise with a finite-size margin: a sequential noise test.

    For k = 0, 1, ...: treat lambda_(k+1..W) as noise and ask whether the largest of them is too
    big for m = W - k noise values: lambda_(k+1) / mean(lambda_(k+1..W)) > the 1 - alpha quantile
    of the same statistic for pure Wishart noise (:func:`noise_ratio_quantile`). The count is the
    number of consecutive rejections (at most W - 1: the last value has nothing to compare with).
    Projecting out the k signal directions leaves Wishart(P, I_(W-k)) noise exactly, and the
    interlacing inequalities make the test conservative there (Kritchman & Nadler's scheme, with
    an exact small-m null instead of Tracy-Widom). Assumes isotropic noise: anisotropic noise has
    fewer effective degrees of freedom, a wider bulk, and is over-counted (docs/method.md).
    NaN for an all-zero window.
    """
    lam = np.asarray(lam, dtype=float)
    n, W = lam.shape
    count = np.zeros(n)
    going = np.ones(n, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(W - 1):
            tail = lam[:, k:]
            stat = tail[:, 0] / tail.mean(axis=1)
            rej = going & (stat > noise_ratio_quantile(W - k, P, alpha=alpha))
            count += rej
            going = rej
            if not going.any():
                break
    return np.where(lam[:, 0] > 0, count, np.nan)
