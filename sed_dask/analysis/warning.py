"""Early-warning onset detection and lead time to an event (docs/method.md §13).

The companion papers' onset: first point exceeding k × the baseline median of the first m points
AND an absolute floor (k = 10, m = 3, floor = 20 for the commutator defect). Here it applies to any
series (edge ratio, gap, an external defect series), and ``direction="drop"`` detects collapses
(e.g. the g₂₃ gap compression: x < baseline / k).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from sed_dask.analysis._series import (
    Collector,
    at,
    describe,
    finite,
    iter_series,
    need,
    require_metric,
    resolve_target,
    select,
)
from sed_dask.errors import AnalysisError

_DEFAULT = "default"


def _floor_for(floor, direction):
    if floor == _DEFAULT:
        return 20.0 if direction == "rise" else None
    return None if floor is None else float(floor)


def onset_index(
    x, *, k: float = 10.0, baseline: int = 3, floor=_DEFAULT, direction: str = "rise"
) -> tuple[int | None, float, float]:
    """(index of onset or None, baseline median, relative threshold).

    rise: x > k·b and x > floor; drop: x < b/k and x < floor; b = median of the first
    ``baseline`` points. ``floor`` defaults to 20 for a rise (spec) and to none for a drop (an
    absolute level is series-specific); None disables it. The whole series is scanned, baseline
    points included, as in the companion's "first step where …".
    """
    if direction not in ("rise", "drop"):
        raise AnalysisError(f"direction must be 'rise' or 'drop', got {direction!r}")
    if k <= 1:
        raise AnalysisError(f"k must be > 1, got {k}")
    x = np.asarray(x, dtype=float)
    if baseline < 1 or x.size <= baseline:
        raise AnalysisError(f"onset needs more than baseline={baseline} points, got {x.size}")
    b = float(np.median(x[:baseline]))
    if not b > 0:
        raise AnalysisError(f"onset baseline median is {b:g}; a ratio threshold needs a positive baseline")
    fl = _floor_for(floor, direction)
    if direction == "rise":
        thr = k * b
        hit = (x > thr) & (x > fl if fl is not None else True)
    else:
        thr = b / k
        hit = (x < thr) & (x < fl if fl is not None else True)
    idx = np.nonzero(hit)[0]
    return (int(idx[0]) if idx.size else None), b, thr


def event_index(y, *, threshold: float = 0.9, sustain: int = 1, direction: str = "above") -> int | None:
    """First index where y ≥ threshold (``"above"``) or ≤ (``"below"``) for ``sustain``
    consecutive evaluations (0.9 once: modular-arithmetic grokking; 0.98 × 3: Dyck/SCAN)."""
    if direction not in ("above", "below"):
        raise AnalysisError(f"event direction must be 'above' or 'below', got {direction!r}")
    if sustain < 1:
        raise AnalysisError(f"sustain must be >= 1, got {sustain}")
    y = np.asarray(y, dtype=float)
    ok = y >= threshold if direction == "above" else y <= threshold
    run = 0
    for i, v in enumerate(ok):
        run = run + 1 if v else 0
        if run >= sustain:
            return i - sustain + 1
    return None


def onset(
    ds: xr.Dataset,
    variable="edge_ratio",
    *,
    k: float = 10.0,
    baseline: int = 3,
    floor=_DEFAULT,
    direction: str = "rise",
    sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Onset step per series (see :func:`onset_index`): ``onset_step`` (NaN if none),
    ``baseline_value`` and ``threshold``. NaNs are dropped before taking the baseline."""
    da = select(resolve_target(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(da)
    for key, s in iter_series(da):
        st, x = finite(s)
        need(x.size, baseline + 1, "onset detection", key, da.name)
        try:
            i, b, thr = onset_index(x, k=k, baseline=baseline, floor=floor, direction=direction)
        except AnalysisError as exc:
            raise AnalysisError(f"{describe(key, da.name)}: {exc}") from None
        col.add(key, onset_step=np.nan if i is None else float(st[i]), baseline_value=b, threshold=thr)
    fl = _floor_for(floor, direction)
    return col.dataset(
        variable=str(da.name), k=k, baseline=baseline, direction=direction, floor="none" if fl is None else fl
    )


def lead_time(
    ds: xr.Dataset,
    variable="edge_ratio",
    *,
    event="val_acc",
    event_threshold: float = 0.9,
    sustain: int = 1,
    event_direction: str = "above",
    k: float = 10.0,
    baseline: int = 3,
    floor=_DEFAULT,
    direction: str = "rise",
    sv=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Lead time = event_step − onset_step (positive: the warning precedes the event).

    The event is the first step where metric ``event`` (default val_acc) crosses
    ``event_threshold`` for ``sustain`` consecutive evaluations, on the metric's own finite steps.
    """
    out = onset(
        ds,
        variable,
        k=k,
        baseline=baseline,
        floor=floor,
        direction=direction,
        sv=sv,
        run=run,
        window=window,
        group=group,
    )
    ev = select(resolve_target(ds, event), run=run, window=window, group=group)
    x = select(resolve_target(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(x)
    for key, _ in iter_series(x):
        st, y = finite(at(ev, key))
        i = event_index(y, threshold=event_threshold, sustain=sustain, direction=event_direction)
        col.add(key, event_step=np.nan if i is None else float(st[i]))
    out["event_step"] = col.dataset()["event_step"]
    out["lead_time"] = out["event_step"] - out["onset_step"]
    out["lead_time"].attrs.update(long_name="event_step - onset_step (positive = early warning)", units="steps")
    out.attrs.update(
        event=str(ev.name), event_threshold=event_threshold, sustain=sustain, event_direction=event_direction
    )
    return out


# ------------------------------------------------------------------------ causal early warning
def _window_inputs(ds: xr.Dataset, key: dict, rank: str):
    """(steps, ratios (n, W-1), k*) of one series' valid windows, in step order."""
    ratio = at(ds["ratio"], key)
    k = at(ds[rank], key)
    W = int(key["window"]) if "window" in key else int(ratio["sv"].max()) + 1
    r = ratio.sel(sv=slice(1, W - 1)).transpose("step", "sv").values.astype(float)
    kv = np.asarray(k.values, dtype=float)
    ok = np.isfinite(r[:, 0]) & np.isfinite(kv)
    return np.asarray(ratio["step"].values)[ok], r[ok], kv[ok], W


def early_warning(
    ds: xr.Dataset,
    *,
    detectors=None,
    tau=None,
    rank: str = "k_star",
    event: str | None = None,
    event_threshold: float = 0.9,
    sustain_event: int = 1,
    run=None,
    window=None,
    group=None,
    **params,
) -> xr.Dataset:
    """Causal alarms of every detector on every (run, W[, group]) edge series, and their lead.

    Runs :class:`sed_dask.analysis.detectors.EdgeWatch` window by window (so an alarm at step t
    used nothing after t). ``params``: drop, drift, h, arm, sustain, min_windows (defaults in
    ``detectors.DEFAULTS``). Returns ``alarm_step``, ``alarm_value``, ``alarm_threshold`` and
    ``n_alarms`` on (series, ``detector``), ``first_alarm_step`` (earliest detector), ``edge_k`` (the
    frozen k) and, with an ``event`` metric (default: val_acc when the dataset has it), ``event_step`` (first step with
    event >= event_threshold for ``sustain_event`` evaluations; grokking = val_acc >= 0.9) and
    ``lead`` = event_step - alarm_step (positive: the alarm came first). The attrs carry each
    detector's definition at each W.
    """
    from sed_dask.analysis.defaults import DEFAULT_TAU
    from sed_dask.analysis.detectors import DETECTORS, EdgeWatch, describe_detectors

    tau = DEFAULT_TAU if tau is None else tau
    dets = tuple(DETECTORS if detectors is None else ([detectors] if isinstance(detectors, str) else detectors))
    if "ratio" not in ds.data_vars or rank not in ds.data_vars:
        raise AnalysisError(f"early_warning needs 'ratio' and {rank!r} (result_schema.md)")
    base = select(ds[rank], run=run, window=window, group=group)
    ev = None
    if event is None and "val_acc" in ds.data_vars:
        event = "val_acc"
    if event is not None:
        ev = select(require_metric(ds, event), run=run, window=window, group=group)
    col = Collector(base)
    definitions = {}
    for key, _ in iter_series(base):
        steps, ratios, ks, W = _window_inputs(ds, key, rank)
        watch = EdgeWatch(window=W, tau=tau, detectors=dets, **params)
        alerts = []
        for st, r, k in zip(steps.tolist(), ratios, ks):
            alerts += watch.update(st, r, k)
        first = {d: next((a for a in alerts if a.detector == d), None) for d in dets}
        col.add(
            key,
            along=("detector", list(dets)),
            alarm_step=np.array([np.nan if a is None else a.step for a in first.values()], float),
            alarm_value=np.array([np.nan if a is None else a.value for a in first.values()], float),
            alarm_threshold=np.array([np.nan if a is None else a.threshold for a in first.values()], float),
            n_alarms=np.array([sum(a.detector == d for a in alerts) for d in dets]),
        )
        steps_first = [a.step for a in first.values() if a is not None]
        estep = np.nan
        if ev is not None:
            es, ey = finite(at(ev, key))
            i = event_index(ey, threshold=event_threshold, sustain=sustain_event)
            estep = np.nan if i is None else float(es[i])
        col.add(
            key,
            first_alarm_step=float(min(steps_first)) if steps_first else np.nan,
            edge_k=np.nan if watch.k is None else float(watch.k),
            event_step=estep,
            tau_value=watch.threshold,
            n_windows=int(steps.size),
        )
        definitions[f"W{W}"] = describe_detectors(window=W, tau=tau, **params)
    out = col.dataset(
        tau=str(tau),
        event="" if ev is None else str(event),
        event_threshold=event_threshold,
        definitions=json.dumps(definitions),
        causal="alarm at step t uses windows up to t only",
    )
    out["lead"] = out["event_step"] - out["alarm_step"]
    notes = {
        "alarm_step": ("step of the detector's first alarm (decided from windows up to it)", "steps"),
        "alarm_value": ("the detector's value at the alarm (edge, or CUSUM sum)", "1"),
        "alarm_threshold": ("the threshold it crossed", "1"),
        "n_alarms": ("alarms over the run (re-armed after a rebound)", "1"),
        "first_alarm_step": ("earliest alarm of any detector", "steps"),
        "edge_k": ("k of the watched edge sigma_k/sigma_(k+1), frozen when the detector armed", "1"),
        "event_step": (
            f"first step with {event} >= {event_threshold:g}" if ev is not None else "no event metric",
            "steps",
        ),
        "lead": ("event_step - alarm_step (positive: the alarm came first)", "steps"),
        "tau_value": ("numeric tau at this W", "1"),
    }
    for v, (ln, u) in notes.items():
        out[v].attrs.update(long_name=ln, units=u)
    return out
