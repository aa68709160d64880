"""Fits to a weight matrix's empirical spectral density (ESD): Marchenko-Pastur bulk, outliers, power-law tail.

Conventions: an ``m x n`` matrix has ``N = max(m, n)`` and ``M = min(m, n)``; its ESD is the ``M``
eigenvalues ``lam = sigma**2`` of the small-side Gram. Under the null "iid entries of variance s2"
``lam / N`` follows Marchenko-Pastur with ratio ``q = M / N``, so the bulk ends at
``lam_+ = s2 (sqrt(N) + sqrt(M))**2`` and the singular-value edge is ``s (sqrt(N) + sqrt(M))``.

* **Bulk (MP) fit** - s2 by quantile matching: the geometric mean of ``lam_(p) / (N x_p(q))`` over the
  bulk's 10 %..90 % quantiles ``p`` (``x_p`` the MP quantiles at unit variance). Quantiles, not the
  trace, so that outliers and a heavy tail barely move the fit; iterated with the outliers removed.
* **Outliers** - eigenvalues above ``s2 (mu + t sigma)``, Johnstone's (2001) centring and scale of the
  largest eigenvalue of a real Wishart matrix (``mu = (sqrt(N-1) + sqrt(M))**2``,
  ``sigma = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))**(1/3)``) and ``t`` the Tracy-Widom
  (beta = 1) quantile at ``1 - outlier_alpha``: a finite-size margin, so an edge eigenvalue of pure
  noise is counted with probability ~alpha and a spike below the BBP threshold (strength
  ``theta < s (N M)**(1/4)``, which does not separate from the bulk) is not counted.
* **Heavy tail** - alpha of ``p(lam) ~ lam**(-alpha)`` on ``lam >= xmin`` by Clauset, Shalizi & Newman
  (2009) as WeightWatcher (via ``powerlaw``) does: for every candidate ``xmin`` among the eigenvalues
  (leaving at least ``min_tail`` of them) the continuous MLE ``alpha = 1 + n / sum(ln(lam / xmin))``,
  and the ``xmin`` whose fitted CDF is nearest the empirical tail in KS distance. Standard error
  ``(alpha - 1) / sqrt(n)``.
"""

from __future__ import annotations

import math

import numpy as np

# Tracy-Widom beta=1 upper quantiles (Bornemann 2010 tables): P(TW1 <= t) = 1 - alpha
TW1_QUANTILES = {0.1: 0.4501, 0.05: 0.9793, 0.01: 2.0234, 0.005: 2.4224, 0.001: 3.2724}
_BULK_Q = np.linspace(0.1, 0.9, 17)
_GRID = 4097
_mp_cache: dict = {}


def tw_quantile(alpha: float) -> float:
    """Upper Tracy-Widom (beta = 1) quantile for ``alpha`` in :data:`TW1_QUANTILES`."""
    a = float(alpha)
    for k, v in TW1_QUANTILES.items():
        if math.isclose(a, k):
            return v
    raise ValueError(f"outlier_alpha={alpha!r}: use one of {sorted(TW1_QUANTILES)} (Tracy-Widom table)")


def mp_cdf_table(q: float) -> tuple[np.ndarray, np.ndarray]:
    """``(x, F(x))`` of the unit-variance MP law with ratio ``q`` in (0, 1] on a fine grid.

    x = a + (b - a)(1 - cos th)/2 takes the square-root endpoints away: the density times dx is
    ((b - a)/2)^2 sin^2 th / (2 pi q x) d th, smooth on [0, pi] (finite at x -> 0 when q = 1).
    """
    key = round(float(q), 12)
    if key not in _mp_cache:
        if not 0 < q <= 1:
            raise ValueError(f"MP ratio q must be in (0, 1], got {q}")
        a, b = (1 - math.sqrt(q)) ** 2, (1 + math.sqrt(q)) ** 2
        th = np.linspace(0.0, math.pi, _GRID)
        x = a + (b - a) * (1 - np.cos(th)) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            g = ((b - a) / 2) ** 2 * np.sin(th) ** 2 / (2 * math.pi * q * x)
        g[~np.isfinite(g)] = 0.0
        if q == 1:  # x -> 0: sin^2 th / x -> 4 / (b - a) at th -> 0, so g -> (b - a) / (2 pi)
            g[0] = (b - a) / (2 * math.pi)
        F = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(th))])
        F /= F[-1]
        _mp_cache[key] = (x, F)
    return _mp_cache[key]


def mp_quantile(p, q: float) -> np.ndarray:
    """Unit-variance MP quantiles (in units of ``lam / (s2 N)``)."""
    x, F = mp_cdf_table(q)
    return np.interp(np.asarray(p, float), F, x)


def mp_cdf(xs, q: float) -> np.ndarray:
    x, F = mp_cdf_table(q)
    return np.interp(np.asarray(xs, float), x, F, left=0.0, right=1.0)


def tw_scale(N: int, M: int) -> tuple[float, float]:
    """Johnstone's ``(mu, sigma)`` of the largest eigenvalue of X^T X, X (N x M) iid N(0, 1)."""
    a, b = math.sqrt(max(N - 1, 1)), math.sqrt(M)
    return (a + b) ** 2, (a + b) * (1 / a + 1 / b) ** (1 / 3)


def mp_fit(lam: np.ndarray, m: int, n: int, *, outlier_alpha: float = 0.01, max_iter: int = 20) -> dict:
    """MP bulk fit and outlier count of an ESD (any order, ``M = min(m, n)`` values).

    Returns ``s2`` (element variance), ``edge`` (singular-value bulk edge ``s (sqrt N + sqrt M)``),
    ``threshold`` (singular-value outlier threshold: edge + TW margin), ``n_outliers`` and ``ks``
    (KS distance of the bulk's ESD from the fitted MP law).
    """
    N, M = max(m, n), min(m, n)
    lam = np.sort(np.clip(np.asarray(lam, np.float64), 0.0, None))[::-1]
    if lam.size != M:
        raise ValueError(f"an ESD of a {m} x {n} matrix has {M} eigenvalues, got {lam.size}")
    q = M / N
    t = tw_quantile(outlier_alpha)
    mu, sg = tw_scale(N, M)
    xq = mp_quantile(_BULK_Q, q) * N
    k = 0
    s2 = math.nan
    for _ in range(max_iter):
        bulk = lam[k:]
        if bulk.size < 4 or not (bulk > 0).any():
            break
        emp = np.quantile(bulk, _BULK_Q)
        ok = (emp > 0) & (xq > 0)
        s2 = float(np.exp(np.mean(np.log(emp[ok] / xq[ok])))) if ok.any() else math.nan
        thr = s2 * (mu + t * sg)
        k_new = int((lam > thr).sum())
        if k_new == k:
            break
        k = min(k_new, M - 4)
    if not math.isfinite(s2) or s2 <= 0:
        return {"s2": math.nan, "edge": math.nan, "threshold": math.nan, "n_outliers": -1, "ks": math.nan}
    bulk = np.sort(lam[k:])
    emp_cdf = np.arange(1, bulk.size + 1) / bulk.size
    model = mp_cdf(bulk / (s2 * N), q)
    ks = float(max(np.abs(emp_cdf - model).max(), np.abs(emp_cdf - 1 / bulk.size - model).max()))
    return {
        "s2": s2,
        "edge": math.sqrt(s2) * (math.sqrt(N) + math.sqrt(M)),
        "threshold": math.sqrt(s2 * (mu + t * sg)),
        "n_outliers": k,
        "ks": ks,
    }


def mp_fit_trace(
    top_sigma: np.ndarray, frobenius: float, m: int, n: int, *, outlier_alpha: float = 0.01, max_iter: int = 20
) -> dict:
    """MP fit without the ESD (matrices beyond ``esd-max-dim``): s2 from the trace with the outliers'
    energy taken out, ``(||A||_F^2 - sum_{i<=k} sigma_i^2) / (N (M - k))``, iterated on the top-k values.

    ``n_outliers`` can only count among the ``len(top_sigma)`` values known; ``censored`` says all were outliers.
    """
    N, M = max(m, n), min(m, n)
    lam = np.sort(np.asarray(top_sigma, np.float64) ** 2)[::-1]
    t = tw_quantile(outlier_alpha)
    mu, sg = tw_scale(N, M)
    k = 0
    s2 = math.nan
    for _ in range(max_iter):
        s2 = (frobenius**2 - lam[:k].sum()) / (N * (M - k))
        k_new = int((lam > s2 * (mu + t * sg)).sum())
        if k_new == k:
            break
        k = k_new
    return {
        "s2": s2,
        "edge": math.sqrt(s2) * (math.sqrt(N) + math.sqrt(M)),
        "threshold": math.sqrt(s2 * (mu + t * sg)),
        "n_outliers": k,
        "ks": math.nan,
        "censored": bool(k == lam.size),
    }


def powerlaw_alpha(lam: np.ndarray, *, min_tail: int = 10) -> dict:
    """CSN power-law fit of the ESD tail: ``alpha``, ``xmin``, ``ks`` (KS distance), ``n_tail``, ``sigma``
    (standard error). ``xmin`` candidates are the positive eigenvalues leaving >= ``min_tail`` above
    them; NaN when fewer than ``min_tail`` eigenvalues are positive."""
    x = np.sort(np.asarray(lam, np.float64))
    x = x[x > 0]
    nan = {"alpha": math.nan, "xmin": math.nan, "ks": math.nan, "n_tail": 0, "sigma": math.nan}
    if x.size < max(int(min_tail), 2):
        return nan
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # sum_{i >= j} ln x_i
    js = np.arange(x.size - int(min_tail) + 1)
    js = js[(js == 0) | (x[js] != x[js - 1])]  # one candidate per distinct value
    n = x.size - js
    s = suffix[js] - n * logs[js]
    keep = s > 0
    js, n, s = js[keep], n[keep], s[keep]
    if not js.size:
        return nan
    a = 1.0 + n / s
    D = np.empty(js.size)
    i = np.arange(x.size)
    for b0 in range(0, js.size, 256):  # (256 x M) at a time: bounded memory for M up to 4096
        jb, ab, nb = js[b0 : b0 + 256, None], a[b0 : b0 + 256, None], n[b0 : b0 + 256, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            model = 1.0 - (x[None, :] / x[jb]) ** (1.0 - ab)
        emp = (i[None, :] - jb) / nb
        dev = np.maximum(np.abs(model - emp), np.abs(model - emp - 1.0 / nb))
        D[b0 : b0 + 256] = np.where(i[None, :] >= jb, dev, -np.inf).max(axis=1)
    best = int(np.argmin(D))  # first minimum: the smallest xmin among ties
    d, a, xm, n = float(D[best]), float(a[best]), float(x[js[best]]), int(n[best])
    return {"alpha": a, "xmin": xm, "ks": d, "n_tail": n, "sigma": (a - 1) / math.sqrt(n)}
