"""Planted 1-D series with a known answer: a lead/lag pair and a distribution-shift step.

Used by tests and benchmarks to check that the lag and shift queries recover what was put in
(issue 12). Steps are on a regular checkpoint grid (``spacing`` apart, first at ``spacing``),
so lags and shift positions are in checkpoint-index units, as in :mod:`sed_dask.analysis.lag`.
"""

from __future__ import annotations

import numpy as np

from sed_dask.errors import AnalysisError

__all__ = ["planted_lag_family", "planted_lag_pair", "planted_shift_series"]


def _steps(n: int, spacing: int) -> np.ndarray:
    if spacing <= 0:
        raise AnalysisError(f"spacing must be > 0, got {spacing}")
    return spacing * np.arange(1, n + 1, dtype=np.int64)


def _driver(m: int, ar: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance AR(1) noise: real edge series are autocorrelated (windows overlap), and a
    lag null that ignores this is too liberal, so tests need to be able to plant it."""
    if not -1.0 < ar < 1.0:
        raise AnalysisError(f"ar must lie in (-1, 1), got {ar}")
    e = rng.standard_normal(m)
    s = np.empty(m)
    s[0] = e[0]
    scale = np.sqrt(1.0 - ar * ar)
    for t in range(1, m):
        s[t] = ar * s[t - 1] + scale * e[t]
    return s


def planted_lag_pair(
    n: int,
    lag: int,
    *,
    coupling: float = -0.8,
    noise: float = 0.5,
    trend: float = 1.0,
    ar: float = 0.0,
    spacing: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, x, y)`` where y follows x by ``lag`` checkpoints: y[t + lag] = coupling·s[t] + …

    x[t] = s[t] + trend·(smooth curve), y[t] = coupling·s[t − lag] + noise·e[t] + trend·(a
    decaying loss curve), with s a shared unit-variance AR(1) driver (``ar``) and e white.
    So **positive lag = x leads y**, the sign convention of :mod:`sed_dask.analysis.lag`; the
    lagged r at ``lag`` is coupling/√(coupling² + noise²) before detrending. The default coupling
    is negative because the lag module's default peak rule (argmin r, docs/method.md §6.3) assumes a
    negative edge/val-loss coupling. The trends are smooth but not cubic, so detrending is
    exercised, not bypassed. ``coupling=0`` gives an independent pair (a null).
    """
    steps, X, y = planted_lag_family(
        n, [lag], coupling=coupling, noise=noise, trend=trend, ar=ar, spacing=spacing, seed=seed
    )
    return steps, X[0], y


def planted_lag_family(
    n: int,
    lags,
    *,
    coupling: float = -0.8,
    noise: float = 0.5,
    trend: float = 1.0,
    ar: float = 0.0,
    spacing: int = 200,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, X, y)``: one target y and one series X[i] per entry of ``lags``, X[i] leading y
    by ``lags[i]`` checkpoints (as :func:`planted_lag_pair`), all driven by the same s.

    One shared target is what a W sweep sees (one val loss, one edge series per W), so a
    planted lag flip is e.g. ``lags=[-1, 2]``.
    """
    lags = [int(v) for v in lags]
    m = max([abs(v) for v in lags], default=0)
    if not lags or n < 8 or m >= n // 2:
        raise AnalysisError(f"planted lags need n >= 8 and |lag| < n/2, got n={n}, lags={lags}")
    if noise < 0:
        raise AnalysisError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    s = _driver(n + 2 * m, ar, rng)
    t = np.linspace(0.0, 1.0, n)
    X = np.stack([s[m + v : m + v + n] + trend * (1.5 + np.sin(2.5 * t)) for v in lags])
    y = coupling * s[m : m + n] + noise * rng.standard_normal(n) + trend * (1.0 + 3.0 * np.exp(-3.0 * t))
    return _steps(n, spacing), X, y


def planted_shift_series(
    n: int,
    shift_index: int,
    *,
    size: float = 1.0,
    noise: float = 0.1,
    level: float = 1.0,
    spacing: int = 200,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)``: ``level`` + noise before ``shift_index``, ``level + size`` from it on.

    A mean shift of known position and size (``size`` in the series' units; size/noise is the
    shift in noise standard deviations) for :mod:`sed_dask.analysis.shift`. ``values[shift_index]``
    is the first shifted point, so ``steps[shift_index]`` is the true change step. ``seed=None``
    gives bounded deterministic wiggles (a sine of amplitude ``noise``) instead of Gaussian noise,
    for tests that need no chance false alarm at all.
    """
    shift_index = int(shift_index)
    if not 0 < shift_index < n:
        raise AnalysisError(f"shift_index must lie in 1..n-1 (n={n}), got {shift_index}")
    if noise < 0:
        raise AnalysisError(f"noise must be >= 0, got {noise}")
    if seed is None:
        e = np.sin(1.7 * np.arange(n))
    else:
        e = np.random.default_rng(seed).standard_normal(n)
    values = level + noise * e + np.where(np.arange(n) >= shift_index, size, 0.0)
    return _steps(n, spacing), values
