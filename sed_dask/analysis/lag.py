"""Detrended lagged cross-correlation with val loss, W sweep / lag flip, sliding and
phase-specific correlations (docs/method.md §6, §10).

Sign convention (docs/method.md §6.2): at lag ℓ > 0 the pair is (x[t], y[t+ℓ]), i.e. corr(x[0:n−ℓ],
y[ℓ:n]) — **positive lag = the spectral feature leads the target**; ℓ < 0 = the target leads.
Lags are in checkpoint-index units of the run's own step grid.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from sed_dask.analysis._series import (
    STEP,
    Collector,
    at,
    finite,
    iter_series,
    need,
    pair_series,
    paired_grid,
    resolve,
    select,
)
from sed_dask.analysis.phases import phase_intervals, segment
from sed_dask.errors import AnalysisError

DETRENDS = ("cubic", "quadratic", "linear", "none", "cubic_raw")
PEAKS = ("min", "absmax", "max")
_DEG = {"linear": 1, "quadratic": 2, "cubic": 3}


def detrend_series(steps, values, *, method: str = "cubic") -> np.ndarray:
    """Residual of a polynomial trend fitted to the finite points (NaNs stay NaN).

    Default: cubic in normalised time t = (s − s₀)/(s_last − s₀) ∈ [0, 1] — the reference's cubic
    trend (docs/method.md §6.1) without its ill-conditioned fit on raw steps up to 2.6·10⁴ (§15.4).
    ``"cubic_raw"`` reproduces the reference (``np.polyfit`` on raw steps); ``"linear"`` is the
    theory script's variant; ``"none"`` returns the values unchanged.
    """
    v = np.asarray(values, dtype=float).copy()
    if method == "none":
        return v
    if method not in DETRENDS:
        raise AnalysisError(f"unknown detrend {method!r}; choose from {DETRENDS}")
    s = np.asarray(steps, dtype=float)
    ok = np.isfinite(v)
    if method == "cubic_raw":
        deg, t = 3, s
    else:
        deg = _DEG[method]
        span = s[ok].max() - s[ok].min() if ok.any() else 0.0
        t = (s - (s[ok].min() if ok.any() else 0.0)) / (span if span > 0 else 1.0)
    if ok.sum() <= deg:
        raise AnalysisError(f"{method} detrending needs more than {deg} finite points, got {ok.sum()}")
    coef = np.polyfit(t[ok], v[ok], deg)
    v[ok] -= np.polyval(coef, t[ok])
    return v


def pearson(a, b) -> tuple[float, float]:
    """Pearson r and two-sided p (t with n−2 df, as scipy.stats.pearsonr); NaN if a side is constant."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n = a.size
    if n < 3:
        return np.nan, np.nan
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if not den > 0:
        return np.nan, np.nan
    r = float(np.clip(np.dot(a, b) / den, -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * np.sqrt((n - 2) / (1.0 - r * r))
    return r, float(2.0 * stats.t.sf(abs(t), n - 2))


def lagged_corr(x, y, *, lags=range(-5, 8), min_overlap: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """r(ℓ) and the pair count for each lag; pairs with a NaN on either side are excluded.

    ℓ ≥ 0: corr(x[0:n−ℓ], y[ℓ:n]); ℓ < 0: corr(x[|ℓ|:n], y[0:n−|ℓ|]) (docs/method.md §6.2). A lag is
    kept only with ≥ ``min_overlap`` pairs (the reference's n − |ℓ| > 5).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    n = x.size
    lags = np.asarray(list(lags), dtype=int)
    r = np.full(lags.size, np.nan)
    cnt = np.zeros(lags.size, dtype=int)
    for i, lag in enumerate(lags):
        if abs(lag) >= n:
            continue
        a, b = (x[: n - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[: n + lag])
        ok = np.isfinite(a) & np.isfinite(b)
        cnt[i] = ok.sum()
        if cnt[i] >= min_overlap:
            r[i] = pearson(a[ok], b[ok])[0]
    return r, cnt


def peak_lag(lags, r, *, peak: str = "min") -> tuple[float, float]:
    """(lag, r) at the peak. ``"min"``: most negative r — the reference rule (docs/method.md §6.3), which
    assumes a negative edge/val-loss coupling; ``"absmax"``: largest |r| (theory script);
    ``"max"``: largest r. Ties go to the first lag in grid order. This is the grid's extreme, not
    necessarily a located peak: see :func:`peak_resolved`."""
    if peak not in PEAKS:
        raise AnalysisError(f"unknown peak rule {peak!r}; choose from {PEAKS}")
    r = np.asarray(r, dtype=float)
    if not np.isfinite(r).any():
        return np.nan, np.nan
    score = _score(r, peak)
    i = int(np.nanargmax(np.where(np.isfinite(r), score, -np.inf)))
    return float(np.asarray(list(lags))[i]), float(r[i])


def _score(r, peak: str) -> np.ndarray:
    """The quantity the peak rule maximises (larger = stronger peak)."""
    return {"min": -r, "absmax": np.abs(r), "max": r}[peak]


def peak_resolved(lags, r, lag) -> bool:
    """True when ``lag`` is interior to the lags actually evaluated (finite r).

    An extreme on the first or last evaluated lag is no located peak: the coupling may grow
    beyond the grid, and widening the grid moves it to the new edge (issue 12), so its sign
    says nothing about who leads.
    """
    lags = np.asarray(list(lags), dtype=float)
    ok = np.isfinite(np.asarray(r, dtype=float))
    if not np.isfinite(lag) or ok.sum() < 3:
        return False
    return bool(lags[ok].min() < lag < lags[ok].max())


def phase_surrogates(y, n_draws: int, *, seed: int = 0) -> np.ndarray:
    """``n_draws`` Fourier phase-randomised copies of ``y`` (draws × n), NaN holes kept in place.

    Each copy has exactly y's periodogram, hence its circular autocorrelation, with the phases
    drawn uniformly (Theiler et al. 1992): a new series with y's serial dependence and no
    alignment with anything. Holes are filled with the mean for the transform and put back, so
    every draw has the same pairs as y.
    """
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    filled = np.where(ok, y, y[ok].mean() if ok.any() else 0.0)
    spec = np.fft.rfft(filled - filled.mean())
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0.0, 2.0 * np.pi, (n_draws, spec.size))
    phase[:, 0] = 0.0  # keep the (zero) mean real
    if y.size % 2 == 0:
        phase[:, -1] = 0.0  # and the Nyquist term
    out = np.fft.irfft(spec[None, :] * np.exp(1j * phase), n=y.size)
    out[:, ~ok] = np.nan
    return out


def _lagged_corr_many(x: np.ndarray, Y: np.ndarray, lags: np.ndarray, min_overlap: int) -> np.ndarray:
    """:func:`lagged_corr` of one x against every row of Y at once (draws × lags), NaN-aware."""
    n = x.size
    out = np.full((Y.shape[0], lags.size), np.nan)
    for i, lag in enumerate(lags):
        if abs(lag) >= n:
            continue
        a, B = (x[: n - lag], Y[:, lag:]) if lag >= 0 else (x[-lag:], Y[:, : n + lag])
        ok = np.isfinite(a)[None, :] & np.isfinite(B)
        cnt = ok.sum(axis=1)
        A0 = np.where(ok, a[None, :], 0.0)
        B0 = np.where(ok, B, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma = A0.sum(1) / cnt
            mb = B0.sum(1) / cnt
            da = np.where(ok, A0 - ma[:, None], 0.0)
            db = np.where(ok, B0 - mb[:, None], 0.0)
            den = np.sqrt((da * da).sum(1) * (db * db).sum(1))
            r = np.clip((da * db).sum(1) / den, -1.0, 1.0)
        out[:, i] = np.where((cnt >= min_overlap) & (den > 0), r, np.nan)
    return out


def peak_null(
    x,
    y,
    *,
    lags=range(-5, 8),
    peak: str = "min",
    min_overlap: int = 6,
    n_null: int = 999,
    seed: int = 0,
    chunk: int = 250,
) -> tuple[float, int]:
    """(p, draws): the p-value of the peak statistic of r(ℓ) against phase-randomised targets.

    Null: x and y are independent, each with its own serial dependence. Draws replace the
    (detrended) target ``y`` by :func:`phase_surrogates` (same autocorrelation, no alignment);
    each draw recomputes r over the *whole* lag grid and keeps its peak statistic (−min r for
    ``peak="min"``, max |r|, max r), so the look-elsewhere effect of taking the best of the
    grid's lags is in the null. p = (1 + #{null ≥ observed}) / (n_null + 1).

    Why not a circular shift or a block bootstrap: measured on independent cubic-detrended pairs
    (grid −5..7, alpha 0.05, 300–400 seeds), shifting y by every offset ≥ the grid width + 1 gave
    false-positive rates of 0.17 (white noise, n = 60) and 0.22 (AR(1) 0.8, n = 60): neighbouring
    offsets reuse the same effective lags, so the draws are far fewer than they look, and only
    disjoint offsets (n/13 of them, p ≥ 0.09 even at n = 150) would be valid. A moving-block
    bootstrap (blocks of 5 or 10) cuts the autocorrelation at every junction: 0.11–0.24 under
    AR(1) 0.8–0.95. Phase surrogates gave 0.04–0.08 from white noise to AR(1) 0.95, n = 40–150.
    """
    if peak not in PEAKS:
        raise AnalysisError(f"unknown peak rule {peak!r}; choose from {PEAKS}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    lags = np.asarray(list(lags), dtype=int)
    r, _ = lagged_corr(x, y, lags=lags, min_overlap=min_overlap)
    if not np.isfinite(r).any() or n_null <= 0:
        return np.nan, 0
    obs = np.nanmax(_score(r, peak))
    surr = phase_surrogates(y, int(n_null), seed=seed)
    exceed = 0
    for lo in range(0, surr.shape[0], chunk):  # bounded memory on long series
        rn = _lagged_corr_many(x, surr[lo : lo + chunk], lags, min_overlap)
        sc = np.where(np.isfinite(rn), _score(rn, peak), -np.inf).max(axis=1)
        exceed += int(np.sum(sc >= obs - 1e-12))
    return (1.0 + exceed) / (n_null + 1.0), int(n_null)


def lag_correlation(
    ds: xr.Dataset,
    variable="edge_ratio",
    target="val_loss",
    *,
    lags=range(-5, 8),
    detrend: str = "cubic",
    peak: str = "min",
    gaps: str = "keep",
    min_overlap: int = 6,
    n_null: int = 999,
    seed: int = 0,
    alpha: float = 0.05,
    sv=None,
    target_sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Detrended lagged Pearson r between a spectral series and a target (default val_loss).

    Both series are matched by exact step, detrended (``detrend``, default cubic on normalised t)
    on their jointly finite points, and correlated over ``lags`` (default range(−5, 8), the GPT-2
    grid; the TinyStories sweep used range(−3, 6)). Sign: a positive lag ℓ means the variable
    leads, r(ℓ) = corr(x[0:n−ℓ], y[ℓ:n]) (docs/method.md §6.2); lags count the run's own checkpoints.

    Returns ``r`` and ``n_overlap`` on a ``lag`` dim, and per (run, W[, group]):
    ``peak_lag``/``peak_r`` — the grid's extreme under ``peak`` (argmin r by default), which is a
    located peak only when ``peak_resolved`` (interior to the evaluated lags, :func:`peak_resolved`);
    ``peak_p_value`` — p of that peak statistic against phase-randomised detrended targets, the
    peak taken over the whole grid (:func:`peak_null`: ``n_null`` draws with ``seed``;
    ``n_null=0`` skips it: NaN); ``peak_significant`` = p ≤ ``alpha``; ``n_null`` — draws used.
    """
    if not 0.0 < alpha < 1.0:
        raise AnalysisError(f"alpha must lie in (0, 1), got {alpha}")
    if n_null < 0:
        raise AnalysisError(f"n_null must be >= 0, got {n_null}")
    x, y = pair_series(ds, variable, target, sv=sv, target_sv=target_sv, run=run, window=window, group=group)
    lags = np.asarray(list(lags), dtype=int)
    if lags.size == 0:
        raise AnalysisError("lags is empty")
    col = Collector(x)
    for key, xs in iter_series(x):
        steps, xv, yv = paired_grid(xs, at(y, key), gaps=gaps)
        n_pairs = int(np.sum(np.isfinite(xv)))
        need(n_pairs, min_overlap + int(np.abs(lags).min()), f"lagged correlation with {y.name!r}", key, x.name)
        xd = detrend_series(steps, xv, method=detrend)
        yd = detrend_series(steps, yv, method=detrend)
        r, cnt = lagged_corr(xd, yd, lags=lags, min_overlap=min_overlap)
        pl, pr = peak_lag(lags, r, peak=peak)
        p, draws = peak_null(xd, yd, lags=lags, peak=peak, min_overlap=min_overlap, n_null=n_null, seed=seed)
        col.add(key, along=("lag", lags), r=r, n_overlap=cnt)
        col.add(
            key,
            peak_lag=pl,
            peak_r=pr,
            peak_resolved=peak_resolved(lags, r, pl),
            peak_p_value=p,
            peak_significant=bool(p <= alpha),
            n_null=draws,
            n_points=n_pairs,
        )
    null = (
        "x independent of y: Fourier phase-randomised detrended target (same autocorrelation); "
        "statistic = peak over the whole lag grid"
    )
    out = col.dataset(
        variable=str(x.name),
        target=str(y.name),
        detrend=detrend,
        peak=peak,
        gaps=gaps,
        lag_convention="lag>0: variable leads target, corr(x[0:n-l], y[l:n])",
        null=null,
        alpha=alpha,
        seed=seed,
    )
    _describe_peak(out, x.name, y.name, peak, alpha)
    return out


def _describe_peak(out: xr.Dataset, xname, yname, peak: str, alpha: float) -> None:
    rule = {"min": "argmin r", "absmax": "argmax |r|", "max": "argmax r"}[peak]
    out["lag"].attrs.update(units="checkpoints", long_name="lag (positive = variable leads target)")
    out["r"].attrs.update(long_name=f"lagged Pearson r({xname}, {yname})", units="1")
    out["peak_lag"].attrs.update(
        units="checkpoints",
        long_name=(f"lag of the grid's extreme r ({rule}); a located peak only where peak_resolved"),
    )
    out["peak_r"].attrs.update(units="1", long_name=f"r at peak_lag ({rule} over the lag grid)")
    out["peak_resolved"].attrs["long_name"] = (
        "peak_lag is interior to the evaluated lag grid (an extreme on its first/last finite lag is unresolved)"
    )
    out["peak_p_value"].attrs["long_name"] = (
        "p of the peak statistic against phase-randomised detrended targets, peak over the whole "
        "grid (look-elsewhere included); (1 + #null >= obs) / (n_null + 1)"
    )
    out["peak_significant"].attrs["long_name"] = f"peak_p_value <= alpha = {alpha:g}"
    out["n_null"].attrs["long_name"] = "null draws (0 = no null: p NaN, not significant)"


def lag_sweep(ds: xr.Dataset, variable="edge_ratio", target="val_loss", *, windows=None, **options) -> xr.Dataset:
    """:func:`lag_correlation` over every W plus lag-flip flags (docs/method.md §6.4).

    ``peak_sign`` = sign(peak_lag). ``sign_change_next``: the sign differs from the next larger
    W's, both non-zero (the old, uninformative flip rule: it fires on grid-edge extremes).
    ``flip_next``: a sign change where both peaks are also resolved (interior) and significant —
    the only lag flip worth reporting. Use :func:`lag_flips` for the table, with the rejected
    candidates and why.
    """
    out = lag_correlation(ds, variable, target, window=windows, **options)
    if "window" not in out.dims or out.sizes["window"] < 2:
        raise AnalysisError("lag_sweep needs a window dim with at least two W values")
    out = out.sortby("window")
    sign = np.sign(out["peak_lag"])
    change = (sign * sign.shift(window=-1)) < 0
    good = out["peak_resolved"] & out["peak_significant"]
    out["peak_sign"] = sign
    out["sign_change_next"] = change
    out["sign_change_next"].attrs["long_name"] = (
        "sign of peak_lag differs from the next larger W's (whether or not the peaks are resolved)"
    )
    out["flip_next"] = change & good & good.shift(window=-1, fill_value=False)
    out["flip_next"].attrs["long_name"] = (
        "lag flip to the next larger W: opposite non-zero peak-lag signs, both peaks resolved and significant"
    )
    return out


FLIP_COLUMNS = (
    "window_a",
    "window_b",
    "peak_lag_a",
    "peak_lag_b",
    "peak_r_a",
    "peak_r_b",
    "peak_resolved_a",
    "peak_resolved_b",
    "peak_p_value_a",
    "peak_p_value_b",
    "peak_significant_a",
    "peak_significant_b",
    "status",
    "reason",
)


def _flip_verdict(W, row, alpha) -> list[str]:
    """Why one side of a candidate flip does not count (empty = it counts)."""
    why = []
    if not row["peak_resolved"]:
        why.append(f"W={W}: unresolved (peak on grid edge at {int(row['peak_lag']):+d})")
    if not row["peak_significant"]:
        p = row["peak_p_value"]
        why.append(
            f"W={W}: not significant (p={p:.3g} > alpha={alpha:g})"
            if np.isfinite(p)
            else f"W={W}: not significant (no null p)"
        )
    return why


def lag_flips(sweep: xr.Dataset, *, pairs: str = "consecutive", rejected: bool = False) -> pd.DataFrame:
    """Tidy table of lag flips: W pairs with opposite non-zero peak-lag signs whose peaks are
    both resolved (interior to the lag grid) and significant (``peak_significant`` of the sweep).

    ``pairs="consecutive"`` compares neighbouring W values (the README's "W=10→20→30");
    ``"all"`` compares every pair. ``status`` is ``"flip"``; with ``rejected=True`` the sign
    changes that fail are listed too, with ``status`` ``"unresolved"`` (a peak on the grid edge,
    checked first) or ``"not significant"``, and ``reason`` saying which W and why, e.g.
    "W=20: unresolved (peak on grid edge at +7)".
    """
    if pairs not in ("consecutive", "all"):
        raise AnalysisError(f"pairs must be 'consecutive' or 'all', got {pairs!r}")
    need_vars = ("peak_lag", "peak_r", "peak_resolved", "peak_p_value", "peak_significant")
    missing = [v for v in need_vars if v not in sweep.data_vars]
    if missing:
        raise AnalysisError(f"sweep lacks {missing}; compute it with sed_dask.analysis.lag_sweep")
    alpha = float(sweep.attrs.get("alpha", 0.05))
    sweep = sweep.sortby("window")
    Ws = sweep["window"].values.tolist()
    other = [d for d in sweep["peak_lag"].dims if d != "window"]
    rows = []
    stacked = sweep[list(need_vars)].to_dataframe().reset_index()
    for labels, g in stacked.groupby(other, sort=False) if other else [((), stacked)]:
        g = g.set_index("window")
        labels = labels if isinstance(labels, tuple) else (labels,)
        cand = (
            [(Ws[i], Ws[i + 1]) for i in range(len(Ws) - 1)]
            if pairs == "consecutive"
            else [(a, b) for i, a in enumerate(Ws) for b in Ws[i + 1 :]]
        )
        for a, b in cand:
            ra, rb = g.loc[a], g.loc[b]
            la, lb = ra["peak_lag"], rb["peak_lag"]
            if not (np.isfinite(la) and np.isfinite(lb) and np.sign(la) * np.sign(lb) < 0):
                continue
            why = _flip_verdict(a, ra, alpha) + _flip_verdict(b, rb, alpha)
            status = "flip" if not why else "unresolved" if any("unresolved" in w for w in why) else "not significant"
            if why and not rejected:
                continue
            rows.append(
                {
                    **dict(zip(other, labels)),
                    "window_a": a,
                    "window_b": b,
                    "peak_lag_a": int(la),
                    "peak_lag_b": int(lb),
                    "peak_r_a": ra["peak_r"],
                    "peak_r_b": rb["peak_r"],
                    "peak_resolved_a": bool(ra["peak_resolved"]),
                    "peak_resolved_b": bool(rb["peak_resolved"]),
                    "peak_p_value_a": ra["peak_p_value"],
                    "peak_p_value_b": rb["peak_p_value"],
                    "peak_significant_a": bool(ra["peak_significant"]),
                    "peak_significant_b": bool(rb["peak_significant"]),
                    "status": status,
                    "reason": "; ".join(why),
                }
            )
    return pd.DataFrame(rows, columns=list(other) + list(FLIP_COLUMNS))


def sliding_correlation(
    ds: xr.Dataset,
    variable="edge_ratio",
    target="val_loss",
    *,
    align: str = "center",
    width: int | None = None,
    detrend: str = "none",
    gaps: str = "keep",
    sv=None,
    target_sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Local Pearson r(x, y) in a moving window of checkpoints (docs/method.md §10).

    ``align="center"``: width 11 (TinyStories), labelled by the centre step; ``"trailing"``:
    width 8 (GPT-2), labelled by the last step. A window is skipped if either series has a NaN
    in it (the reference checks only val_loss, so its drift NaNs gave r = NaN). Raw series by
    default (``detrend="none"``), as the reference. Also returns per-series summaries: min/max/
    mean r, the number of sign changes, and fractions with |r| > 0.5 and p < 0.05.
    """
    if align not in ("center", "trailing"):
        raise AnalysisError(f"align must be 'center' or 'trailing', got {align!r}")
    width = (11 if align == "center" else 8) if width is None else int(width)
    if align == "center" and width % 2 == 0:
        raise AnalysisError(f"a centred window needs an odd width, got {width}")
    if width < 3:
        raise AnalysisError(f"width must be >= 3, got {width}")
    x, y = pair_series(ds, variable, target, sv=sv, target_sv=target_sv, run=run, window=window, group=group)
    steps_all = x[STEP].values
    pos = {s: i for i, s in enumerate(steps_all.tolist())}
    col = Collector(x)
    for key, xs in iter_series(x):
        steps, xv, yv = paired_grid(xs, at(y, key), gaps=gaps)
        need(int(np.isfinite(xv).sum()), width, f"sliding correlation (width {width})", key, x.name)
        xv = detrend_series(steps, xv, method=detrend)
        yv = detrend_series(steps, yv, method=detrend)
        r = np.full(steps_all.size, np.nan)
        p = np.full(steps_all.size, np.nan)
        for i in range(steps.size):
            lo, hi = (i - width // 2, i + width // 2 + 1) if align == "center" else (i - width + 1, i + 1)
            if lo < 0 or hi > steps.size:
                continue
            a, b = xv[lo:hi], yv[lo:hi]
            if np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
                r[pos[steps[i]]], p[pos[steps[i]]] = pearson(a, b)
        ok = np.isfinite(r)
        sg = np.sign(r[ok])
        col.add(key, along=(STEP, steps_all), r=r, p=p)
        col.add(
            key,
            r_min=np.min(r[ok]) if ok.any() else np.nan,
            r_max=np.max(r[ok]) if ok.any() else np.nan,
            r_mean=np.mean(r[ok]) if ok.any() else np.nan,
            n_sign_changes=int(np.sum(sg[1:] * sg[:-1] < 0)),
            frac_abs_r_gt_0_5=float(np.mean(np.abs(r[ok]) > 0.5)) if ok.any() else np.nan,
            frac_p_lt_0_05=float(np.mean(p[ok] < 0.05)) if ok.any() else np.nan,
        )
    return col.dataset(variable=str(x.name), target=str(y.name), align=align, width=width, detrend=detrend)


def phase_correlation(
    ds: xr.Dataset,
    variable="edge_ratio",
    target="val_loss",
    *,
    method: str = "peak",
    segment_variable=None,
    min_points: int = 4,
    detrend: str = "none",
    sv=None,
    target_sv=None,
    run=None,
    window=None,
    group=None,
    **options,
) -> xr.Dataset:
    """Pearson r(x, y) within each phase of :func:`sed_dask.analysis.phases.segment`
    (docs/method.md §10.1). Phases come from ``segment_variable`` (default: ``variable``) with shared
    boundary points; fewer than ``min_points`` (4) aligned pairs give NaN. Also reports
    Δy = y_start − y_end (positive = improvement for a loss) and x_start / x_end.
    The README's collapse-phase "r = 0.937 ± 0.019" is method="derivative", summarised with
    :func:`cross_seed_summary` over runs.
    """
    x, y = pair_series(ds, variable, target, sv=sv, target_sv=target_sv, run=run, window=window, group=group)
    seg = x if segment_variable is None else select(resolve(ds, segment_variable), run=run, window=window, group=group)
    col = Collector(x)
    names = np.array(["rise", "plateau", "collapse"])
    for key, xs in iter_series(x):
        sst, sx = finite(at(seg, key))
        need(
            sx.size,
            max(min_points, 3 * options.get("min_size", 3) if method == "changepoint" else 1),
            f"phase segmentation ({method})",
            key,
            seg.name,
        )
        a, b = segment(sx, (sst - sst[0]).astype(float) if method == "changepoint" else None, method=method, **options)
        steps, xv, yv = paired_grid(xs, at(y, key), gaps="drop")
        xv = detrend_series(steps, xv, method=detrend)
        yv = detrend_series(steps, yv, method=detrend)
        res = {
            k: np.full(3, np.nan)
            for k in ("r", "p", "n", "start_step", "end_step", "x_start", "x_end", "y_start", "y_end")
        }
        for j, (ph, (s0, s1)) in enumerate(phase_intervals(a, b, sx.size).items()):
            lo, hi = sst[s0], sst[s1 - 1]
            m = (steps >= lo) & (steps <= hi)
            res["start_step"][j], res["end_step"][j] = lo, hi
            res["n"][j] = m.sum()
            if m.sum() >= min_points:
                res["r"][j], res["p"][j] = pearson(xv[m], yv[m])
                res["x_start"][j], res["x_end"][j] = xv[m][0], xv[m][-1]
                res["y_start"][j], res["y_end"][j] = yv[m][0], yv[m][-1]
        col.add(
            key,
            along=("phase", names),
            **res,
            delta_y=res["y_start"] - res["y_end"],
            delta_x=res["x_end"] - res["x_start"],
        )
    return col.dataset(
        variable=str(x.name), target=str(y.name), method=method, detrend=detrend, segment_variable=str(seg.name)
    )
