"""Three-phase segmentation (rise / plateau / collapse), collapse step, cross-seed summaries.

Segmentations return two window indices (a, b) on the NaN-free series, a ≤ b: rise = [0, a+1),
plateau = [a, b+1), collapse = [b, n) — neighbouring phases share their boundary point, as in the
reference (docs/method.md §5.2). The per-step ``phase`` label gives a shared point to the later phase.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.ndimage import uniform_filter1d

from sed_dask.analysis._series import (
    EDGE,
    STEP,
    Collector,
    finite,
    first_sustained,
    iter_series,
    need,
    resolve,
    select,
    window_steps,
)
from sed_dask.analysis.defaults import ARM, DEFAULT_TAU, PLATEAU, SUSTAIN, tau_value
from sed_dask.errors import AnalysisError

METHODS = ("episode", "peak", "derivative", "threshold", "changepoint")
PHASES = ("rise", "plateau", "collapse", "rebound")
LABELS = {
    "center": "centre of the window (mean step of its W deltas)",
    "newest": "step of the newest checkpoint in the window",
}


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

    C = {k: cs(v) for k, v in (("1", np.ones(n)), ("x", x0), ("xx", x0 * x0), ("t", t), ("tt", t * t), ("tx", t * x0))}
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
            sse = sse - np.where(stt > 1e-15, stx**2 / stt, 0.0)
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


def segment(
    x,
    t=None,
    *,
    method: str = "peak",
    plateau: float = 0.85,
    smooth: int = 5,
    slope: float = -0.01,
    threshold: float = 1.30,
    model: str = "linear",
    min_size: int = 3,
) -> tuple[int, int]:
    """Phase boundaries (a, b) of a NaN-free 1-D series (indices; see module docstring).

    * ``peak`` (primary, docs/method.md §5.2): plateau = contiguous run around argmax with
      x ≥ ``plateau``·x_peak (0.85 in the code; its comment says 90%).
    * ``derivative``: a = argmax; b = first i ≥ a where the gradient of a size-``smooth`` moving
      average ('reflect' boundary) is < ``slope`` (−0.01, per window index), else a.
    * ``threshold``: a = first i with x > ``threshold`` (1.30), b = last such i (0 / n−1 if none).
    * ``changepoint``: optimal two-breakpoint least-squares fit, piecewise ``model`` =
      ``"linear"`` or ``"constant"`` in ``t`` (steps; index if None), each segment ≥ ``min_size``
      points, exact (exhaustive over all breakpoint pairs). a = first plateau point, b = first
      collapse point. Not in the reference: its three rules hinge on absolute levels that do
      not transfer across W (docs/method.md §15.4); this one is scale-free.
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
    """Half-open index intervals with shared boundaries (docs/method.md §5.2)."""
    return {"rise": (0, a + 1), "plateau": (a, b + 1), "collapse": (b, n)}


def first_run(x, start: int, *, below: float | None = None, above: float | None = None, sustain: int = 1) -> int | None:
    """First index i >= start where ``sustain`` consecutive points are < ``below`` (or >= ``above``)."""
    return first_sustained((x < below) if below is not None else (x >= above), start, sustain)


def episode(x, thr: float, *, plateau: float = PLATEAU, sustain: int = SUSTAIN, rebound: float = ARM):
    """Indices (rise_end a, plateau_end b, peak p, collapse c, rebound r) of the first signal episode.

    The episode starts when the edge first holds >= ``rebound`` x thr for ``sustain`` windows (it
    emerges from the noise) and ends at the collapse c, the first of ``sustain`` windows below thr
    after that. Its peak p is the maximum inside the episode, not the global one (a rebound can
    climb higher); the plateau runs from the first of ``sustain`` windows >= ``plateau`` x the
    episode's median to the last window that high (a median, not the peak: one spike must not
    shrink the plateau to a point). The rebound
    r is the first emergence after c. c, r are None when they do not happen; with no emergence at
    all the global maximum is the peak and c, r are None.
    """
    e = first_run(x, 0, above=rebound * thr, sustain=sustain)
    c = None if e is None else first_run(x, e, below=thr, sustain=sustain)
    r = None if c is None else first_run(x, c, above=rebound * thr, sustain=sustain)
    end = x.size if c is None else c
    lo = 0 if e is None else e
    p = lo + int(np.argmax(x[lo:end]))
    level = plateau * float(np.median(x[lo:end]))  # robust to a single spike at the peak
    above = np.nonzero(x[lo:end] >= level)[0] + lo
    a = first_run(x, lo, above=level, sustain=min(sustain, end - lo)) if above.size else p
    a = p if a is None or a >= end else a
    b = int(above[-1]) if above.size else p
    return a, b, p, c, r


def _check_label(label):
    if label not in LABELS:
        raise AnalysisError(f"label must be one of {LABELS}, got {label!r}")


def phases(
    ds: xr.Dataset,
    variable=EDGE,
    *,
    method: str = "episode",
    tau=DEFAULT_TAU,
    sustain: int = SUSTAIN,
    rebound: float = ARM,
    label: str = "center",
    sv=None,
    run=None,
    window=None,
    group=None,
    min_points: int = 5,
    **options,
) -> xr.Dataset:
    """Segment each (run, W[, group]) series into rise / plateau / collapse / rebound.

    ``variable`` defaults to the fixed-k edge (``edge``: the ratio at k = the series' mode of k*, so
    a change of k* cannot move a boundary). ``method="episode"`` (default, :func:`episode`): the
    first signal episode, from the edge's emergence above ``rebound`` x tau to its collapse below tau
    (tau = the noise-level ratio; ``'auto'`` = 1 + 2 W^(-2/3)), peak and 0.85 plateau inside it; a
    rebound above ``rebound`` x tau after the collapse is its own segment, not more collapse. The
    reference's rules (``peak``, ``derivative``, ``threshold``, ``changepoint``; ``options``:
    plateau, smooth, slope, threshold, model, min_size) segment around the global peak, with the
    collapse and rebound found after it.

    ``label="center"`` reports boundary steps at the centre of each window (the mean step of its W
    deltas): a window labelled by its newest checkpoint sees a collapse W - k deltas late
    (benchmarks/README.md "Fidelity"), the centre halves that. ``"newest"`` keeps the dataset's step
    labels (causal: what was known at that step). ``phase(..., step)`` is on the dataset's steps:
    0 rise, 1 plateau, 2 collapse, 3 rebound.
    """
    _check_label(label)
    da = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(da)
    steps_all = da[STEP].values
    for key, s in iter_series(da):
        st, x = finite(s)
        need(
            x.size,
            max(min_points, 3 * options.get("min_size", 3) if method == "changepoint" else 1),
            f"phase segmentation ({method})",
            key,
            da.name,
        )
        W = key.get("window")
        thr = tau_value(tau, W)
        if method == "episode":
            a, b, p, c, r = episode(x, thr, plateau=options.get("plateau", PLATEAU), sustain=sustain, rebound=rebound)
        else:
            tt = (st - st[0]).astype(float) if method == "changepoint" else None
            a, b = segment(x, tt, method=method, **options)
            p = int(np.argmax(x))
            c = first_run(x, p, below=thr, sustain=sustain)
            r = None if c is None else first_run(x, c, above=rebound * thr, sustain=sustain)
        lab = window_steps(ds, key, st, label=label)
        label_codes = np.full(steps_all.size, np.nan)
        idx = np.nonzero(np.isfinite(s.values.astype(float)))[0]
        i = np.arange(x.size)
        code = np.where(i < a, 0, np.where(i < b, 1, 2))
        if r is not None:
            code = np.where(i >= r, 3, code)
        label_codes[idx] = code

        def at_(j):
            return np.nan if j is None else float(lab[j])

        col.add(
            key,
            peak_step=at_(p),
            peak_value=x[p],
            plateau_start_step=at_(a),
            collapse_start_step=at_(b),
            collapse_step=at_(c),
            rebound_step=at_(r),
            tau_value=thr,
            n_points=x.size,
            edge_k=float(s["edge_k"]) if "edge_k" in s.coords else np.nan,
        )
        col.add(key, along=(STEP, steps_all), phase=label_codes)
    out = col.dataset(
        method=method,
        source_variable=str(da.name),
        tau=str(tau),
        sustain=int(sustain),
        rebound=float(rebound),
        step_label=LABELS[label],
    )
    out["phase"].attrs.update(
        flag_values=[0, 1, 2, 3],
        flag_meanings="rise plateau collapse rebound",
        long_name="training phase of the window (shared boundaries -> later phase)",
    )
    notes = {
        "collapse_start_step": "end of the plateau: the edge starts falling",
        "collapse_step": f"first of {sustain} windows after the peak with the edge < tau",
        "rebound_step": f"first of {sustain} windows after the collapse with the edge >= {rebound:g} x tau",
        "plateau_start_step": "first window of the plateau",
        "peak_step": "window of the edge's maximum",
    }
    for v, ln in notes.items():
        out[v].attrs.update(long_name=ln, units="steps", step_label=LABELS[label])
    out["edge_k"].attrs.update(long_name="k of the edge sigma_k / sigma_(k+1) (NaN: not the fixed-k edge)")
    return out


def collapse_step(
    ds: xr.Dataset,
    variable=EDGE,
    *,
    tau=DEFAULT_TAU,
    sustain: int = SUSTAIN,
    label: str = "center",
    after: str = "emergence",
    sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Peak and collapse of the edge series (docs/method.md §5.1, with the defaults of docs/method.md).

    collapse = first of ``sustain`` consecutive windows with x < tau after the edge emerged
    (``after="emergence"``: held >= 1.25 tau for ``sustain`` windows, as :func:`episode`; a later,
    higher rebound does not move it) or after its global maximum (``after="peak"``, the
    reference); NaN if never. Defaults: the fixed-k ``edge``, ``tau='auto'`` (1 + 2 W^(-2/3), the
    noise-level ratio: an absolute tau does not transfer across W), ``sustain=2``, centre-of-window
    step labels. The reference rule is ``variable='edge_ratio', tau=1.20, sustain=1,
    label='newest', after='peak'``. A list of numeric taus adds a ``tau`` dim (robustness set {1.15, 1.20, 1.25, 1.30}).
    """
    _check_label(label)
    if after not in ("emergence", "peak"):
        raise AnalysisError(f"after must be 'emergence' or 'peak', got {after!r}")
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
        lab = window_steps(ds, key, st, label=label)
        cs, tv = [], []
        peak = p
        for i, t in enumerate(taus):
            tval = tau_value(t, W)
            if after == "emergence":
                _, _, pe, hit, _ = episode(x, tval, sustain=sustain)
                peak = pe if i == 0 else peak  # the peak reported is the first (primary) tau's
            else:
                hit = first_run(x, p, below=tval, sustain=sustain)
            cs.append(np.nan if hit is None else float(lab[hit]))
            tv.append(tval)
        col.add(
            key,
            peak_step=float(lab[peak]),
            peak_value=x[peak],
            edge_k=float(s["edge_k"]) if "edge_k" in s.coords else np.nan,
        )
        if multi:
            col.add(key, along=("tau", np.asarray(taus, dtype=float)), collapse_step=np.array(cs))
        else:
            col.add(key, collapse_step=cs[0], tau=tv[0])
    out = col.dataset(
        source_variable=str(da.name), tau=str(tau), sustain=int(sustain), step_label=LABELS[label], after=after
    )
    out["collapse_step"].attrs.update(
        long_name=f"first of {sustain} windows at/after the peak with edge < tau",
        units="steps",
        step_label=LABELS[label],
    )
    return out


def cross_seed_summary(
    result: xr.Dataset | xr.DataArray, variables=None, *, dim: str = "run", ddof: int = 0
) -> xr.Dataset:
    """Mean ± std over ``dim`` (seeds) of each variable, using the seeds where it is defined.

    ``ddof=0`` (population std) matches the reference's ``np.std`` (docs/method.md §5.1); pass
    ``ddof=1`` for the sample std. Returns ``<var>_mean``, ``<var>_std``, ``<var>_n``.
    Where the runs carry a ``seed`` coordinate (results do), two runs of one seed are refused (a mean
    over seeds needs one run per seed: select the runs of one configuration first), and the seeds
    used are recorded in the attrs.
    """
    if isinstance(result, xr.DataArray):
        result = result.to_dataset(name=result.name or "value")
    if dim not in result.dims:
        raise AnalysisError(f"cross_seed_summary: dim {dim!r} not in {tuple(result.dims)}")
    seeds = None
    if "seed" in result.coords and result["seed"].dims == (dim,):
        seeds = [int(x) for x in result["seed"].values]
        known = [x for x in seeds if x >= 0]
        dup = sorted({x for x in known if known.count(x) > 1})
        if dup:
            runs = [str(r) for r, x in zip(result[dim].values, seeds) if x == dup[0]]
            raise AnalysisError(
                f"cross_seed_summary: runs {runs} share seed {dup[0]}; a mean over seeds needs one "
                f"run per seed (select one configuration's runs first, e.g. ds.sel(run=[...]))"
            )
    names = (
        list(result.data_vars)
        if variables is None
        else ([variables] if isinstance(variables, str) else list(variables))
    )
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
    if seeds is not None:
        out.attrs["seeds"] = seeds
    return out


__all__ = [
    "segment",
    "phase_intervals",
    "phases",
    "collapse_step",
    "cross_seed_summary",
    "first_run",
    "METHODS",
    "PHASES",
    "LABELS",
]
