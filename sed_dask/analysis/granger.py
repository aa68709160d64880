"""Granger causality by OLS with AIC lag selection and an F test (docs/method.md §7).

Restricted model: intercept + contemporaneous covariates (e.g. lr) + target lags 1..p.
Unrestricted: + feature lags 1..p — never the contemporaneous feature. p is the lag with the lowest
unrestricted AIC = n·ln(RSS/n) + 2k (k = columns incl. intercept). Plain numpy OLS as the
reference; tests cross-check F, p, RSS and AIC against statsmodels.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

from sed_dask.analysis._series import (
    STEP,
    Collector,
    at,
    describe,
    iter_series,
    pair_series,
    paired_grid,
    resolve_target,
    select,
)
from sed_dask.errors import AnalysisError

DIRECTIONS = ("forward", "reverse")


def lag_matrix(v, p: int) -> np.ndarray:
    """Rows t = p … T−1, columns v[t−1], …, v[t−p] (v may be (T,) or (T, m): m·p columns)."""
    v = np.asarray(v, dtype=float)
    v = v[:, None] if v.ndim == 1 else v
    T = v.shape[0]
    return np.concatenate([v[p - j : T - j] for j in range(1, p + 1)], axis=1)


def ols_rss(y, X) -> tuple[float, int]:
    """RSS and the number of coefficients of an OLS fit of y on [1, X]."""
    Z = np.column_stack([np.ones(len(y)), X]) if X is not None and np.size(X) else np.ones((len(y), 1))
    beta, *_ = np.linalg.lstsq(Z, y, rcond=None)
    e = y - Z @ beta
    return float(e @ e), Z.shape[1]


def aic(rss: float, n: int, k: int) -> float:
    """n·ln(RSS/n) + 2k (∞ if RSS ≤ 0 or n ≤ k), as the reference (docs/method.md §7.1)."""
    if rss <= 0 or n <= k:
        return np.inf
    return n * np.log(rss / n) + 2 * k


def _design(y, x, cov, p, start):
    """y_t, restricted and unrestricted regressors for t ≥ start (start ≥ p), NaN rows dropped."""
    T = y.size
    Y = y[p:]
    R = [lag_matrix(y, p)]
    if cov is not None:
        R.insert(0, cov[p:])
    Xr = np.concatenate(R, axis=1)
    Xu = np.concatenate([Xr, lag_matrix(x, p)], axis=1)
    rows = np.arange(p, T) >= start
    ok = rows & np.isfinite(Y) & np.all(np.isfinite(Xu), axis=1)
    return Y[ok], Xr[ok], Xu[ok]


def _fit(y, x, cov, p, start):
    Y, Xr, Xu = _design(y, x, cov, p, start)
    n = Y.size
    rss_r, k_r = ols_rss(Y, Xr)
    rss_u, k_u = ols_rss(Y, Xu)
    q, df = k_u - k_r, n - k_u
    tss = float(np.sum((Y - Y.mean()) ** 2)) if n else np.nan
    if df > 0 and rss_u > 0:
        F = ((rss_r - rss_u) / q) / (rss_u / df)
        pv = float(stats.f.sf(F, q, df))
    else:
        F, pv = np.nan, np.nan
    return dict(
        lag_order=p,
        n_obs=n,
        F=F,
        p_value=pv,
        df_num=q,
        df_denom=df,
        rss_r=rss_r,
        rss_u=rss_u,
        aic_r=aic(rss_r, n, k_r),
        aic_u=aic(rss_u, n, k_u),
        r2_r=1 - rss_r / tss if tss > 0 else np.nan,
        r2_u=1 - rss_u / tss if tss > 0 else np.nan,
    )


def _perm_null(y, x, cov, p, *, n_perm, rng) -> np.ndarray:
    """F at lag p for circularly shifted x. The restricted fit does not involve x, so it is
    refitted only when a shift moves NaN holes and changes the usable rows."""
    T = y.size
    Y = y[p:]
    Xr = lag_matrix(y, p) if cov is None else np.concatenate([cov[p:], lag_matrix(y, p)], axis=1)
    base = np.isfinite(Y) & np.all(np.isfinite(Xr), axis=1)
    cache: dict[bytes, float] = {}
    out = np.full(n_perm, np.nan)
    for b in range(n_perm):
        Xl = lag_matrix(np.roll(x, int(rng.integers(1, T)), axis=0), p)
        ok = base & np.all(np.isfinite(Xl), axis=1)
        key = ok.tobytes()
        if key not in cache:
            cache[key] = ols_rss(Y[ok], Xr[ok])[0]
        rss_u, k_u = ols_rss(Y[ok], np.concatenate([Xr[ok], Xl[ok]], axis=1))
        df, q = ok.sum() - k_u, Xl.shape[1]
        if df > 0 and rss_u > 0:
            out[b] = ((cache[key] - rss_u) / q) / (rss_u / df)
    return out


def granger_test(
    y,
    x,
    *,
    max_lag: int = 2,
    lag: int | None = None,
    covariate=None,
    min_obs: int = 10,
    aic_sample: str = "per_lag",
    n_perm: int = 0,
    seed: int | None = 0,
) -> dict:
    """Does x (T,) or (T, m) Granger-cause y (T,)? NaNs allowed (rows using them are dropped).

    For p = 1…max_lag (skipped when fewer than ``min_obs`` rows remain) fit both models; pick
    the lowest unrestricted AIC (``lag`` fixes p instead, skipping the selection).
    ``aic_sample="per_lag"`` (reference) compares AICs fitted on
    n = T−p rows; ``"common"`` compares them on the same rows t ≥ max_lag (AICs on different
    samples are not strictly comparable); F and p always come from the chosen p's own fit.
    ``n_perm`` > 0 adds a circular-shift null of F at the chosen p: x is rolled by a uniform
    shift in [1, T−1] (the reference's "block" test, which never used its block size), and
    p_perm = (1 + #{F_null ≥ F}) / (n_perm + 1) (the +1 the reference lacks, docs/method.md §15.4).
    Returns the chosen fit plus ``delta_aic`` = AIC_r − AIC_u, ``delta_r2`` = R²_u − R²_r and
    ``aic_by_lag`` (unrestricted AIC per p, NaN where skipped).
    """
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    if x.shape[0] != y.size:
        raise AnalysisError(f"x and y lengths differ ({x.shape[0]} vs {y.size})")
    cov = None if covariate is None else np.asarray(covariate, dtype=float).reshape(y.size, -1)
    if aic_sample not in ("per_lag", "common"):
        raise AnalysisError(f"aic_sample must be 'per_lag' or 'common', got {aic_sample!r}")
    if max_lag < 1:
        raise AnalysisError(f"max_lag must be >= 1, got {max_lag}")
    fits, sel = {}, {}
    if lag is not None:
        if lag < 1:
            raise AnalysisError(f"lag must be >= 1, got {lag}")
        max_lag, aic_sample = lag, "per_lag"
    for p in range(1, max_lag + 1) if lag is None else [lag]:
        if y.size - p < 2:
            continue
        f = _fit(y, x, cov, p, p)
        if f["n_obs"] < min_obs:
            continue
        fits[p] = f
        sel[p] = f["aic_u"] if aic_sample == "per_lag" else _fit(y, x, cov, p, max_lag)["aic_u"]
    if not fits:
        raise AnalysisError(
            f"Granger test needs at least {min_obs} usable rows (series of {int(np.isfinite(y).sum())} finite points)"
        )
    best = min(sel, key=lambda p: (sel[p], p))
    out = dict(fits[best])
    out["delta_aic"] = out["aic_r"] - out["aic_u"]
    out["delta_r2"] = out["r2_u"] - out["r2_r"]
    out["aic_by_lag"] = np.array([sel.get(p, np.nan) for p in range(1, max_lag + 1)])
    out["selected_by"] = "fixed" if lag is not None else f"aic ({aic_sample})"
    out["p_perm"] = np.nan
    if n_perm > 0 and np.isfinite(out["F"]):
        null = _perm_null(y, x, cov, best, n_perm=n_perm, rng=np.random.default_rng(seed))
        null = null[np.isfinite(null)]
        out["p_perm"] = (1.0 + np.sum(null >= out["F"])) / (null.size + 1.0)
    return out


def residualize(x, nuisance) -> np.ndarray:
    """Residual of x after OLS on [1, nuisance] (contemporaneous; NaN where any input is NaN)."""
    x = np.asarray(x, dtype=float)
    N = np.asarray(nuisance, dtype=float).reshape(x.size, -1)
    ok = np.isfinite(x) & np.all(np.isfinite(N), axis=1)
    out = np.full(x.size, np.nan)
    if ok.sum() <= N.shape[1] + 1:
        raise AnalysisError(f"residualisation needs more than {N.shape[1] + 1} points, got {ok.sum()}")
    Z = np.column_stack([np.ones(ok.sum()), N[ok]])
    beta, *_ = np.linalg.lstsq(Z, x[ok], rcond=None)
    out[ok] = x[ok] - Z @ beta
    return out


_SCALARS = (
    "lag_order",
    "n_obs",
    "F",
    "p_value",
    "df_num",
    "df_denom",
    "rss_r",
    "rss_u",
    "aic_r",
    "aic_u",
    "delta_aic",
    "r2_r",
    "r2_u",
    "delta_r2",
    "p_perm",
)


def _grid_values(ds, name, key, steps, *, run, window, group, sv=None):
    """A series on the given steps (exact match; NaN where absent)."""
    if name == "trend":
        t = (steps - steps.min()) / max(float(np.ptp(steps)), 1.0)
        return np.column_stack([t, t**2, t**3])
    da = at(select(resolve_target(ds, name, sv=sv), run=run, window=window, group=group), key)
    return np.asarray(da.reindex({STEP: steps}).values, dtype=float)


def _series_block(ds, key, xs, y, features, *, gaps, run, window, group, sv):
    steps, xv, yv = paired_grid(xs, at(y, key), gaps="keep")
    cols = [xv] + [_grid_values(ds, f, key, steps, run=run, window=window, group=group, sv=sv) for f in features[1:]]
    X = np.column_stack(cols)
    if gaps == "drop":
        ok = np.isfinite(yv) & np.all(np.isfinite(X), axis=1)
        return steps[ok], X[ok], yv[ok]
    return steps, X, yv


def _covariates(ds, names, key, steps, *, run, window, group):
    if not names:
        return None
    return np.column_stack([_grid_values(ds, c, key, steps, run=run, window=window, group=group) for c in names])


def _listify(v):
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def granger(
    ds: xr.Dataset,
    variable="edge_ratio",
    target="val_loss",
    *,
    max_lag: int = 2,
    lag: int | None = None,
    covariate=None,
    direction: str = "both",
    nuisance=None,
    n_perm: int = 999,
    seed: int | None = 0,
    min_obs: int = 10,
    aic_sample: str = "per_lag",
    gaps: str = "keep",
    sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Univariate Granger tests per (run, W[, group]) and direction (docs/method.md §7.1, §7.2).

    ``direction``: ``"forward"`` (variable → target), ``"reverse"`` (target → variable) or
    ``"both"`` — the lag flip is a statement about directionality. ``covariate``: contemporaneous
    series in both models (e.g. ``"lr"``; the reference always used lr, the GPT-2 claims none;
    default none). ``nuisance``: residualise the feature on these series first (variable names
    and/or ``"trend"`` = cubic in normalised steps) — the "residualised edge" of §7.2, whose
    nuisance the paper does not name. Series are matched by exact step; ``gaps="keep"`` keeps the
    step grid so lags never bridge a missing checkpoint (rows using a NaN are dropped);
    ``"drop"`` compresses NaNs first (reference). ``n_perm``: circular-shift null (seeded).
    """
    x, y = pair_series(ds, variable, target, sv=sv, target_sv=None, run=run, window=window, group=group)
    dirs = list(DIRECTIONS) if direction == "both" else [direction]
    if any(d not in DIRECTIONS for d in dirs):
        raise AnalysisError(f"direction must be 'forward', 'reverse' or 'both', got {direction!r}")
    covs, nuis = _listify(covariate), _listify(nuisance)
    col = Collector(x)
    for key, xs in iter_series(x):
        steps, X, yv = _series_block(ds, key, xs, y, [x.name], gaps=gaps, run=run, window=window, group=group, sv=sv)
        xv = X[:, 0]
        if nuis:
            xv = residualize(
                xv,
                np.column_stack([_grid_values(ds, v, key, steps, run=run, window=window, group=group) for v in nuis]),
            )
        cv = _covariates(ds, covs, key, steps, run=run, window=window, group=group)
        res = {k: np.full(len(dirs), np.nan) for k in _SCALARS}
        for j, d in enumerate(dirs):
            yy, xx = (yv, xv) if d == "forward" else (xv, yv)
            try:
                r = granger_test(
                    yy,
                    xx,
                    max_lag=max_lag,
                    lag=lag,
                    covariate=cv,
                    min_obs=min_obs,
                    aic_sample=aic_sample,
                    n_perm=n_perm,
                    seed=seed,
                )
            except AnalysisError as exc:
                raise AnalysisError(f"{describe(key, str(x.name))} vs {y.name!r}: {exc}") from None
            for k in _SCALARS:
                res[k][j] = r[k]
        col.add(key, along=("direction", np.array(dirs)), **res)
    out = col.dataset(
        variable=str(x.name),
        target=str(y.name),
        max_lag=max_lag,
        covariate=",".join(covs),
        nuisance=",".join(nuis),
        n_perm=n_perm,
        aic_sample=aic_sample,
        gaps=gaps,
        direction_meaning=f"forward: {x.name} -> {y.name}; reverse: {y.name} -> {x.name}",
    )
    out["p_perm"].attrs["long_name"] = "circular-shift permutation p-value of F (+1 corrected)"
    return out


def granger_multivariate(
    ds: xr.Dataset,
    features=("edge_ratio", "k95"),
    target="val_loss",
    *,
    max_lag: int = 2,
    lag: int | None = None,
    covariate=None,
    n_perm: int = 999,
    seed: int | None = 0,
    min_obs: int = 10,
    aic_sample: str = "per_lag",
    gaps: str = "keep",
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Joint Granger test of several features → target: unrestricted = AR(p) of the target +
    lags 1..p of every feature (q = p·m). ``r2_u`` is the share of target variance explained —
    the README's "edge_str + k95 explains 89.5%" is most likely this R² (docs/method.md §7.2,
    inferred). The circular-shift null rolls all features jointly, preserving their coupling.
    """
    feats = _listify(features)
    if len(feats) < 1:
        raise AnalysisError("granger_multivariate needs at least one feature")
    x, y = pair_series(ds, feats[0], target, sv=None, target_sv=None, run=run, window=window, group=group)
    covs = _listify(covariate)
    col = Collector(x)
    for key, xs in iter_series(x):
        steps, X, yv = _series_block(
            ds, key, xs, y, [x.name] + feats[1:], gaps=gaps, run=run, window=window, group=group, sv=None
        )
        cv = _covariates(ds, covs, key, steps, run=run, window=window, group=group)
        try:
            r = granger_test(
                yv,
                X,
                max_lag=max_lag,
                lag=lag,
                covariate=cv,
                min_obs=min_obs,
                aic_sample=aic_sample,
                n_perm=n_perm,
                seed=seed,
            )
        except AnalysisError as exc:
            raise AnalysisError(f"{describe(key, '+'.join(map(str, feats)))} vs {y.name!r}: {exc}") from None
        col.add(key, **{k: r[k] for k in _SCALARS})
    return col.dataset(
        features=",".join(map(str, feats)),
        target=str(y.name),
        max_lag=max_lag,
        covariate=",".join(covs),
        n_perm=n_perm,
        aic_sample=aic_sample,
        gaps=gaps,
    )
