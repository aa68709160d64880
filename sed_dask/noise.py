"""Marchenko-Pastur / BBP noise-floor quantities of a window spectrum (sed_spec §4.1-4.3).

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
    return lam[..., W // 2:].mean(axis=-1)


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
