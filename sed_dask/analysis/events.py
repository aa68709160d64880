"""Event study: does the edge collapse precede the stabilisation of the validation loss? (docs/method.md §5.5)

Per (run, W[, group]) series and collapse threshold τ: the collapse step of the edge
(:func:`sed_dask.analysis.phases.collapse_step`), the first step at or after it where the target's
smoothed step-to-step change falls below a threshold set by its own early noise, and
stab_delay = stab_step − collapse_step (positive = the loss settles after the collapse).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from sed_dask.analysis._series import EDGE, STEP, Collector, at, describe, finite, iter_series, pair_series
from sed_dask.analysis.defaults import DEFAULT_TAU, SUSTAIN
from sed_dask.analysis.phases import collapse_step
from sed_dask.errors import AnalysisError

ROBUSTNESS_TAUS = (1.15, 1.20, 1.25, 1.30)  # the reference's robustness set (docs/method.md §5.5)


def smoothed_change(y) -> np.ndarray:
    """dvl_smooth of docs/method.md §5.5 steps 1–2 on the target at the windows (NaN = missing).

    dvl_t = |y_{t+1} − y_t| (NaN when either is missing, and for the last t: gaps are not bridged);
    dvl_smooth_t = mean of the finite dvl among t−1, t, t+1 (NaN when none is).
    """
    y = np.asarray(y, dtype=float)
    dvl = np.full(y.size, np.nan)
    dvl[:-1] = np.abs(np.diff(y))
    pad = np.concatenate([[np.nan], dvl, [np.nan]])
    nb = np.stack([pad[:-2], pad[1:-1], pad[2:]])
    n = np.isfinite(nb).sum(axis=0)
    s = np.nansum(nb, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def stabilisation_threshold(
    dvl_smooth, *, baseline: int = 10, factor: float = 0.3, fallback: float = 0.01
) -> tuple[float, int]:
    """``(threshold, n used)``: ``factor`` × median of the finite values among the first ``baseline``
    dvl_smooth entries, or ``fallback`` when there are none (docs/method.md §5.5 step 3). Fewer than
    ``baseline`` entries (a short series) use what there is, as the reference's slice does."""
    head = np.asarray(dvl_smooth, dtype=float)[:baseline]
    head = head[np.isfinite(head)]
    if head.size == 0:
        return float(fallback), 0
    return float(factor * np.median(head)), int(head.size)


def event_study(
    ds: xr.Dataset,
    variable=EDGE,
    target="val_loss",
    *,
    taus=DEFAULT_TAU,
    baseline: int = 10,
    factor: float = 0.3,
    fallback: float = 0.01,
    sustain: int = SUSTAIN,
    label: str = "center",
    after: str = "emergence",
    sv=None,
    target_sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Collapse → target-stabilisation delay (docs/method.md §5.5): how long after the edge collapses the
    validation loss settles. It is *not* a lead before grokking (that is
    :func:`sed_dask.analysis.early_warning`'s ``lead``): a positive ``stab_delay`` means the loss
    settled after the collapse.

    The collapse is :func:`collapse_step`'s, with the same defaults (fixed-k ``edge``,
    ``tau='auto'``, ``sustain``, ``label``, ``after``); a scalar ``taus`` gives one value per
    series (``tau`` variable), a list of numbers adds a ``tau`` dim (the reference's robustness set
    is ``ROBUSTNESS_TAUS``; its rule is ``variable='edge_ratio', sustain=1, label='newest', after='peak'``).

    Time axis: the windows where ``variable`` is finite, in step order (the reference's
    ``pc2_noise_test.json`` holds only valid windows); the target is read at exactly those steps
    (NaN where it was not evaluated). Then, per series, :func:`smoothed_change` (dvl_smooth),
    threshold = :func:`stabilisation_threshold` (``factor`` 0.3 × median of the finite values among
    the first ``baseline`` = 10 dvl_smooth entries, whether or not they are finite; ``fallback``
    0.01 if none — an absolute level in the target's units, flagged in ``threshold_fallback``;
    a series shorter than ``baseline`` uses what it has, see ``n_baseline``), and per τ: collapse_step as in
    :func:`collapse_step`, stab_step = first window at or after the collapse window with
    dvl_smooth < threshold (missing dvl_smooth never qualifies), stab_delay = stab_step −
    collapse_step in steps. NaN when there is no collapse or no stabilisation after it.

    Returns a Dataset with ``collapse_step``, ``stab_step``, ``stab_delay`` on (series[, ``tau``]) and
    ``peak_step``, ``peak_value``, ``threshold``, ``n_baseline``, ``threshold_fallback``,
    ``n_points`` per series. A target with no finite value at the series' windows raises.
    """
    multi = not isinstance(taus, (str, int, float, np.number))
    tlist = list(taus) if multi else [taus]
    if not tlist or (multi and any(isinstance(t, (str, bytes)) or not np.isfinite(float(t)) for t in tlist)):
        raise AnalysisError(f"taus must be 'auto', a number or a list of finite numbers, got {taus!r}")
    if baseline < 1:
        raise AnalysisError(f"baseline must be >= 1, got {baseline}")
    x, y = pair_series(ds, variable, target, sv=sv, target_sv=target_sv, run=run, window=window, group=group)
    xds = x.to_dataset(name=str(x.name))
    if "delta_span" in ds.coords:
        xds = xds.assign_coords(delta_span=ds["delta_span"].sel(run=x["run"]) if "run" in x.dims else ds["delta_span"])
    cs = collapse_step(xds, str(x.name), tau=tlist if multi else taus, sustain=sustain, label=label, after=after)
    # the collapse window's index on the series' own (newest-checkpoint) steps, where the target is read
    cs_idx = (
        cs
        if label == "newest"
        else collapse_step(xds, str(x.name), tau=tlist if multi else taus, sustain=sustain, label="newest", after=after)
    )
    tau_coord = np.asarray(tlist, dtype=float) if multi else None
    col = Collector(x)
    for key, s in iter_series(x):
        st, _ = finite(s)
        yt = at(y, key)
        yv = np.asarray(yt.reindex({STEP: st}).values, dtype=float)
        if not np.isfinite(yv).any():
            raise AnalysisError(
                f"{describe(key, str(y.name))}: no finite value at the {st.size} windows of "
                f"{x.name!r}; the event study needs the target evaluated at window steps"
            )
        dsm = smoothed_change(yv)
        thr, nbase = stabilisation_threshold(dsm, baseline=baseline, factor=factor, fallback=fallback)
        c = cs.sel({d: v for d, v in key.items() if d in cs.dims})
        csteps = np.atleast_1d(np.asarray(c["collapse_step"].values, dtype=float))
        newest = np.atleast_1d(
            np.asarray(
                cs_idx.sel({d: v for d, v in key.items() if d in cs_idx.dims})["collapse_step"].values, dtype=float
            )
        )
        stab = np.full(csteps.size, np.nan)
        for j, cstep in enumerate(newest):
            if not np.isfinite(cstep):
                continue
            ci = int(np.searchsorted(st, cstep))
            hit = np.nonzero(dsm[ci:] < thr)[0]  # NaN < thr is False
            if hit.size:
                stab[j] = float(st[ci + hit[0]])
        if multi:
            col.add(key, along=("tau", tau_coord), collapse_step=csteps, stab_step=stab, stab_delay=stab - csteps)
        else:
            col.add(
                key, collapse_step=csteps[0], stab_step=stab[0], stab_delay=stab[0] - csteps[0], tau=float(c["tau"])
            )
        col.add(
            key,
            peak_step=float(c["peak_step"]),
            peak_value=float(c["peak_value"]),
            threshold=thr,
            n_baseline=nbase,
            threshold_fallback=nbase == 0,
            n_points=int(st.size),
        )
    out = col.dataset(
        source_variable=str(x.name),
        target=str(y.name),
        baseline=int(baseline),
        factor=float(factor),
        fallback=float(fallback),
        tau_rule=str(taus),
        sustain=int(sustain),
        step_label=label,
        meaning="stab_delay = steps from the edge collapse to the target settling; not a lead before grokking",
    )
    notes = {
        "collapse_step": (
            f"collapse_step(): first of {sustain} windows below tau after the edge "
            f"{'emerged' if after == 'emergence' else 'peaked'} ({label} step label)",
            "steps",
        ),
        "stab_step": (
            "first window (newest-checkpoint step, where the target is read) at/after the collapse "
            "window with smoothed |d target| < threshold",
            "steps",
        ),
        "stab_delay": (
            "stab_step - collapse_step: the target settles this long after the collapse (not a grokking lead)",
            "steps",
        ),
        "peak_step": ("step of the variable's maximum (in its first episode with after='emergence')", "steps"),
        "peak_value": ("the variable's maximum there", str(x.attrs.get("units", "1"))),
        "threshold": (
            f"{factor:g} x median of the first {baseline} smoothed |d target| values (fallback {fallback:g})",
            "target units",
        ),
        "n_baseline": ("finite smoothed |d target| values the threshold used", "1"),
        "threshold_fallback": ("the threshold is the absolute fallback (no baseline values)", None),
        "n_points": ("windows on the time axis (variable finite)", "1"),
    }
    for v, (long_name, units) in notes.items():
        if v in out:
            out[v].attrs.update(long_name=long_name, **({"units": units} if units else {}))
    out["tau"].attrs.update(long_name="collapse threshold tau", units="1")
    return out


__all__ = ["event_study", "smoothed_change", "stabilisation_threshold", "ROBUSTNESS_TAUS"]
