"""Change / distribution-shift detection on a spectral series (docs/method.md §8.2).

None of these detectors exists in the reference code; the definitions are the spec's proposed
ones ([INFERRED]) with textbook defaults. Each returns the detected index, a score, and a p-value
where one is defined. Series are the finite windows (NaNs dropped explicitly), labelled by step.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats
from scipy.ndimage import uniform_filter1d

from sed_dask.analysis._series import Collector, describe, finite, iter_series, need, resolve, select
from sed_dask.errors import AnalysisError

METHODS = ("cusum", "ttest", "maxderiv")


def cusum(x, *, baseline: int = 8, k: float = 0.5, h: float = 4.0) -> dict:
    """Two-sided standardised CUSUM: z = (x − μ₀)/σ₀ with μ₀, σ₀ (ddof=1) from the first
    ``baseline`` points; S⁺ = max(0, S⁺ + z − k), S⁻ = max(0, S⁻ − z − k); alarm at the first
    max(S⁺, S⁻) > h (k = 0.5, h = 4: textbook, for a 1σ shift). The spec suggests B = 5–10;
    B = 8 fits inside GPT-2's 10 pre-shift windows at W=10 (docs/method.md §1.2) while giving σ₀ seven
    degrees of freedom (with B = 5 an underestimated σ₀ makes false alarms common).

    ``alarm`` is the online detection index; ``change`` the change-point estimate = the point
    after the alarming side's last reset (S = 0) before the alarm. ``score`` = the CUSUM at the
    alarm (or its maximum when there is none). No p-value (the CUSUM has no simple null law here).
    """
    x = np.asarray(x, dtype=float)
    if baseline < 2 or x.size <= baseline:
        raise AnalysisError(f"CUSUM needs more than baseline={baseline} >= 2 points, got {x.size}")
    mu, sd = x[:baseline].mean(), x[:baseline].std(ddof=1)
    if not sd > 0:
        raise AnalysisError(f"CUSUM baseline (first {baseline} points) is constant: cannot standardise")
    z = (x - mu) / sd
    sp = np.zeros(x.size)
    sn = np.zeros(x.size)
    a, b = 0.0, 0.0
    for t, zt in enumerate(z):
        a = max(0.0, a + zt - k)
        b = max(0.0, b - zt - k)
        sp[t], sn[t] = a, b
    s = np.maximum(sp, sn)
    over = np.nonzero(s > h)[0]
    if over.size == 0:
        return dict(alarm=None, change=None, score=float(s.max()), p=np.nan, direction=0)
    t = int(over[0])
    side = sp if sp[t] >= sn[t] else sn
    zeros = np.nonzero(side[:t] == 0)[0]
    change = int(zeros[-1]) + 1 if zeros.size else 0
    return dict(alarm=t, change=change, score=float(s[t]), p=np.nan, direction=1 if side is sp else -1)


def welch_scan(x, *, min_size: int = 5) -> dict:
    """Split point c maximising |Welch t| between x[:c] and x[c:], ≥ ``min_size`` per side.

    ``change`` = c (first point of the second segment); ``p`` is the nominal Welch p at c — it
    ignores the scan over c, so it is optimistic (no multiple-testing correction).
    """
    x = np.asarray(x, dtype=float)
    n = x.size
    if n < 2 * min_size:
        raise AnalysisError(f"t-test scan needs at least {2 * min_size} points, got {n}")
    best = (-1.0, None, np.nan)
    for c in range(min_size, n - min_size + 1):
        a, b = x[:c], x[c:]
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        if va + vb <= 0:
            continue
        t = (b.mean() - a.mean()) / np.sqrt(va + vb)
        if abs(t) > best[0]:
            best = (abs(t), c, t)
    if best[1] is None:
        return dict(change=None, score=np.nan, p=np.nan, direction=0)
    c = best[1]
    p = float(stats.ttest_ind(x[:c], x[c:], equal_var=False).pvalue)
    return dict(change=c, score=float(best[0]), p=p, direction=int(np.sign(best[2])))


def max_derivative(x, *, smooth: bool = False) -> dict:
    """Index t of the largest |x_t − x_{t−1}| (the later point), optionally after a 3-point
    centred moving average ('nearest' ends). ``score`` = that absolute jump."""
    x = np.asarray(x, dtype=float)
    if x.size < 3:
        raise AnalysisError(f"max-derivative needs at least 3 points, got {x.size}")
    xs = uniform_filter1d(x, size=3, mode="nearest") if smooth else x
    d = np.diff(xs)
    i = int(np.argmax(np.abs(d)))
    return dict(change=i + 1, score=float(abs(d[i])), p=np.nan, direction=int(np.sign(d[i])))


def detect_shift(
    ds: xr.Dataset,
    variable="edge_ratio",
    *,
    methods=METHODS,
    true_step=None,
    tolerance=None,
    baseline: int = 8,
    k: float = 0.5,
    h: float = 4.0,
    min_size: int = 5,
    smooth: bool = False,
    cusum_estimate: str = "change",
    sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Run the shift detectors on each (run, W[, group]) series.

    Returns ``step`` (detected), ``score``, ``p_value``, ``direction`` (+1 up / −1 down) on a
    ``detector`` dim (not "method", which ``.sel`` would take as its own keyword), plus
    ``alarm_step`` for CUSUM. ``cusum_estimate`` picks CUSUM's reported step:
    the change-point estimate (default, comparable with the other two) or the online ``"alarm"``.
    With ``true_step``: ``error`` = step − true_step and, with ``tolerance`` (e.g. 200 = one
    checkpoint, the README's "±200 steps"), ``hit`` = |error| ≤ tolerance.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AnalysisError(f"unknown shift method(s) {bad}; choose from {METHODS}")
    if cusum_estimate not in ("change", "alarm"):
        raise AnalysisError(f"cusum_estimate must be 'change' or 'alarm', got {cusum_estimate!r}")
    da = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(da)
    for key, s in iter_series(da):
        st, x = finite(s)
        need(
            x.size,
            max(2 * min_size if "ttest" in methods else 3, baseline + 1 if "cusum" in methods else 3),
            "shift detection",
            key,
            da.name,
        )
        res = {v: np.full(len(methods), np.nan) for v in ("step", "score", "p_value", "direction", "alarm_step")}
        for j, m in enumerate(methods):
            try:
                if m == "cusum":
                    r = cusum(x, baseline=baseline, k=k, h=h)
                    if r["alarm"] is not None:
                        res["alarm_step"][j] = st[r["alarm"]]
                        idx = r["change"] if cusum_estimate == "change" else r["alarm"]
                        res["step"][j] = st[idx]
                elif m == "ttest":
                    r = welch_scan(x, min_size=min_size)
                else:
                    r = max_derivative(x, smooth=smooth)
            except AnalysisError as exc:
                raise AnalysisError(f"{describe(key, da.name)}: {exc}") from None
            if m != "cusum" and r["change"] is not None:
                res["step"][j] = st[r["change"]]
            res["score"][j], res["p_value"][j], res["direction"][j] = r["score"], r["p"], r["direction"]
        if true_step is not None:
            res["error"] = res["step"] - float(true_step)
            if tolerance is not None:
                res["hit"] = np.abs(res["error"]) <= float(tolerance)
        col.add(key, along=("detector", np.array(methods)), **res)
    return col.dataset(
        variable=str(da.name),
        baseline=baseline,
        k=k,
        h=h,
        min_size=min_size,
        smooth=int(smooth),
        cusum_estimate=cusum_estimate,
        **({} if true_step is None else {"true_step": float(true_step)}),
    )
