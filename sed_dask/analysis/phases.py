"""Three-phase segmentation (rise / plateau / collapse), collapse step, cross-seed summaries.

Segmentations return two window indices (a, b) on the NaN-free series, a ≤ b: rise = [0, a+1),
plateau = [a, b+1), collapse = [b, n) — neighbouring phases share their boundary point, as in the
reference (sed_spec §5.2). The per-step ``phase`` label gives a shared point to the later phase.
"""
from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.ndimage import uniform_filter1d

from ..errors import AnalysisError
from ._series import (STEP, Collector, describe, finite, iter_series, mp_adjacent_ratio, need,
                      resolve, select)

METHODS = ("peak", "derivative", "threshold", "changepoint")
PHASES = ("rise", "plateau", "collapse")


def _peak(x, *, plateau=0.85):
    p = int(np.argmax(x))
    thr = plateau * x[p]
    a = p
    while a > 0 and x[a - 1] >= thr:
        a -= 1
    b = p
    while b < x.size - 1 and x[b + 1] >= thr:
        b += 1
    return a, b


def _derivative(x, *, smooth=5, slope=-0.01):
    p = int(np.argmax(x))
    d = np.gradient(uniform_filter1d(x, size=smooth, mode="reflect"))
    hit = np.nonzero(d[p:] < slope)[0]
    return p, (p + int(hit[0]) if hit.size else p)


def _threshold(x, *, threshold=1.30):
    above = np.nonzero(x > threshold)[0]
    if above.size == 0:
        return 0, x.size - 1
    return int(above[0]), int(above[-1])


def _segment_sse(t, x, model):
    """SSE[i, j] of the least-squares fit of x[i:j] (constant or straight line in t)."""
    n = x.size
    t = (t - t.mean()) / (np.ptp(t) or 1.0)
    x0 = x - x.mean()

    def cs(v):
        return np.concatenate([[0.0], np.cumsum(v)])

    C = {k: cs(v) for k, v in (("1", np.ones(n)), ("x", x0), ("xx", x0 * x0), ("t", t),
                                ("tt", t * t), ("tx", t * x0))}
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]

    def S(k):
        return C[k][j] - C[k][i]

    with np.errstate(divide="ignore", invalid="ignore"):
        m = S("1")
        sse = S("xx") - S("x") ** 2 / m
        if model == "linear":
            stt = S("tt") - S("t") ** 2 / m
            stx = S("tx") - S("t") * S("x") / m
            sse = sse - np.where(stt > 1e-15, stx ** 2 / stt, 0.0)
    return np.where(j > i, np.maximum(sse, 0.0), np.inf)


def _changepoint(x, t=None, *, model="linear", min_size=3):
    """Exact least-squares 2-breakpoint segmentation: exhaustive over (b1, b2) in O(n²)."""
    n = x.size
    if n < 3 * min_size:
        raise ValueError(f"changepoint segmentation needs >= {3 * min_size} points, got {n}")
    t = np.arange(n, dtype=float) if t is None else np.asarray(t, dtype=float)
    S = _segment_sse(t, np.asarray(x, dtype=float), model)
    b1 = np.arange(n + 1)[:, None]
    b2 = np.arange(n + 1)[None, :]
    total = S[0, :][:, None] + S + S[:, n][None, :]
    ok = (b1 >= min_size) & (b2 - b1 >= min_size) & (n - b2 >= min_size)
    total = np.where(ok, total, np.inf)
    i, j = np.unravel_index(np.argmin(total), total.shape)
    return int(i), int(j)


def segment(x, t=None, *, method: str = "peak", plateau: float = 0.85, smooth: int = 5,
            slope: float = -0.01, threshold: float = 1.30, model: str = "linear",
            min_size: int = 3) -> tuple[int, int]:
    """Phase boundaries (a, b) of a NaN-free 1-D series (indices; see module docstring).

    * ``peak`` (primary, sed_spec §5.2): plateau = contiguous run around argmax with
      x ≥ ``plateau``·x_peak (0.85 in the code; its comment says 90%).
    * ``derivative``: a = argmax; b = first i ≥ a where the gradient of a size-``smooth`` moving
      average ('reflect' boundary) is < ``slope`` (−0.01, per window index), else a.
    * ``threshold``: a = first i with x > ``threshold`` (1.30), b = last such i (0 / n−1 if none).
    * ``changepoint``: optimal two-breakpoint least-squares fit, piecewise ``model`` =
      ``"linear"`` or ``"constant"`` in ``t`` (steps; index if None), each segment ≥ ``min_size``
      points, exact (exhaustive over all breakpoint pairs). a = first plateau point, b = first
      collapse point. Not in the reference: its three rules hinge on absolute levels that do
      not transfer across W (sed_spec §15.4); this one is scale-free.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("segment needs a non-empty, finite 1-D series")
    if method == "peak":
        return _peak(x, plateau=plateau)
    if method == "derivative":
        return _derivative(x, smooth=smooth, slope=slope)
    if method == "threshold":
        return _threshold(x, threshold=threshold)
    if method == "changepoint":
        if model not in ("linear", "constant"):
            raise ValueError(f"model must be 'linear' or 'constant', got {model!r}")
        return _changepoint(x, t, model=model, min_size=min_size)
    raise ValueError(f"unknown phase method {method!r}; choose from {METHODS}")


def phase_intervals(a: int, b: int, n: int) -> dict[str, tuple[int, int]]:
    """Half-open index intervals with shared boundaries (sed_spec §5.2)."""
    return {"rise": (0, a + 1), "plateau": (a, b + 1), "collapse": (b, n)}


def phases(ds: xr.Dataset, variable="edge_ratio", *, method: str = "peak", sv=None, run=None,
           window=None, group=None, min_points: int = 5, **options) -> xr.Dataset:
    """Segment each (run, W[, group]) series into rise / plateau / collapse.

    ``options`` go to :func:`segment` (plateau, smooth, slope, threshold, model, min_size).
    Indices refer to the finite windows only (degenerate windows are dropped explicitly).
    Returns ``peak_step``, ``peak_value``, ``plateau_start_step``, ``collapse_start_step``,
    ``n_points`` and ``phase(…, step)`` (0 rise, 1 plateau, 2 collapse; CF flag attrs).
    """
    da = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(da)
    steps_all = da[STEP].values
    for key, s in iter_series(da):
        st, x = finite(s)
        need(x.size, max(min_points, 3 * options.get("min_size", 3) if method == "changepoint" else 1),
             f"phase segmentation ({method})", key, da.name)
        tt = (st - st[0]).astype(float) if method == "changepoint" else None
        a, b = segment(x, tt, method=method, **options)
        p = int(np.argmax(x))
        label = np.full(steps_all.size, np.nan)
        idx = np.nonzero(np.isfinite(s.values.astype(float)))[0]
        code = np.where(np.arange(x.size) < a, 0, np.where(np.arange(x.size) < b, 1, 2))
        label[idx] = code
        col.add(key, peak_step=st[p], peak_value=x[p], plateau_start_step=st[a],
                collapse_start_step=st[b], n_points=x.size)
        col.add(key, along=(STEP, steps_all), phase=label)
    out = col.dataset(method=method, source_variable=str(da.name))
    out["phase"].attrs.update(flag_values=[0, 1, 2], flag_meanings="rise plateau collapse",
                              long_name="training phase of the window (shared boundaries -> later phase)")
    return out


def _tau_values(tau, W):
    if isinstance(tau, str):
        if tau != "auto":
            raise AnalysisError(f"tau must be a number, a list of numbers or 'auto', got {tau!r}")
        return float(mp_adjacent_ratio(W))
    return float(tau)


def collapse_step(ds: xr.Dataset, variable="edge_ratio", *, tau=1.20, sv=None, run=None,
                  window=None, group=None) -> xr.Dataset:
    """Peak and collapse of the edge series (sed_spec §5.1).

    peak = first argmax; collapse = first step at or after the peak with x < τ (NaN if never).
    τ = 1.20 reproduces the paper's "7500 ± 300"; a list adds a ``tau`` dim (robustness set
    {1.15, 1.20, 1.25, 1.30}). ``tau="auto"`` uses the MP adjacent-ratio noise level
    1 + 2W^(−2/3) per W: an absolute τ does not transfer across W because the noise-level ratio
    itself falls with W (1.43 at W=10, 1.27 at W=20; sed_spec §4.3, §15.4).
    """
    da = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    multi = not isinstance(tau, (str, int, float, np.number))
    taus = list(tau) if multi else [tau]
    if multi and any(isinstance(t, str) for t in taus):
        raise AnalysisError("a list of tau values must be numeric; use tau='auto' alone")
    col = Collector(da)
    for key, s in iter_series(da):
        st, x = finite(s)
        need(x.size, 1, "collapse_step", key, da.name)
        p = int(np.argmax(x))
        W = key.get("window")
        if tau == "auto" and W is None:
            raise AnalysisError(f"tau='auto' needs a window dim ({describe(key, da.name)})")
        cs, tv = [], []
        for t in taus:
            tval = _tau_values(t, W)
            hit = np.nonzero(x[p:] < tval)[0]
            cs.append(float(st[p + hit[0]]) if hit.size else np.nan)
            tv.append(tval)
        col.add(key, peak_step=st[p], peak_value=x[p])
        if multi:
            col.add(key, along=("tau", np.asarray(taus, dtype=float)), collapse_step=np.array(cs))
        else:
            col.add(key, collapse_step=cs[0], tau=tv[0])
    out = col.dataset(source_variable=str(da.name), tau=str(tau))
    out["collapse_step"].attrs.update(long_name="first step at/after the peak with edge < tau")
    return out


def cross_seed_summary(result: xr.Dataset | xr.DataArray, variables=None, *, dim: str = "run",
                       ddof: int = 0) -> xr.Dataset:
    """Mean ± std over ``dim`` (seeds) of each variable, using the seeds where it is defined.

    ``ddof=0`` (population std) matches the reference's ``np.std`` (sed_spec §5.1); pass
    ``ddof=1`` for the sample std. Returns ``<var>_mean``, ``<var>_std``, ``<var>_n``.
    """
    if isinstance(result, xr.DataArray):
        result = result.to_dataset(name=result.name or "value")
    if dim not in result.dims:
        raise AnalysisError(f"cross_seed_summary: dim {dim!r} not in {tuple(result.dims)}")
    names = list(result.data_vars) if variables is None else (
        [variables] if isinstance(variables, str) else list(variables))
    out = xr.Dataset()
    for v in names:
        if v not in result.data_vars:
            raise AnalysisError(f"cross_seed_summary: unknown variable {v!r}")
        da = result[v]
        if dim not in da.dims or da.dtype.kind not in "biuf":
            continue
        da = da.astype(float)
        n = da.notnull().sum(dim)
        out[f"{v}_mean"] = da.mean(dim, skipna=True)
        std = da.std(dim, ddof=ddof, skipna=True)
        out[f"{v}_std"] = std.where(n > ddof)
        out[f"{v}_n"] = n
    out.attrs.update(dim=dim, ddof=ddof)
    return out


__all__ = ["segment", "phase_intervals", "phases", "collapse_step", "cross_seed_summary", "METHODS",
           "PHASES"]
