"""Early-warning onset detection and lead time to an event (sed_spec §13).

The companion papers' onset: first point exceeding k × the baseline median of the first m points
AND an absolute floor (k = 10, m = 3, floor = 20 for the commutator defect). Here it applies to any
series (edge ratio, gap, an external defect series), and ``direction="drop"`` detects collapses
(e.g. the g₂₃ gap compression: x < baseline / k).
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import AnalysisError
from ._series import Collector, at, describe, finite, iter_series, need, resolve_target, select

_DEFAULT = "default"


def _floor_for(floor, direction):
    if floor == _DEFAULT:
        return 20.0 if direction == "rise" else None
    return None if floor is None else float(floor)


def onset_index(x, *, k: float = 10.0, baseline: int = 3, floor=_DEFAULT,
                direction: str = "rise") -> tuple[int | None, float, float]:
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


def onset(ds: xr.Dataset, variable="edge_ratio", *, k: float = 10.0, baseline: int = 3,
          floor=_DEFAULT, direction: str = "rise", sv=None, run=None, window=None,
          group=None) -> xr.Dataset:
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
    return col.dataset(variable=str(da.name), k=k, baseline=baseline, direction=direction,
                       floor="none" if fl is None else fl)


def lead_time(ds: xr.Dataset, variable="edge_ratio", *, event="val_acc",
              event_threshold: float = 0.9, sustain: int = 1, event_direction: str = "above",
              k: float = 10.0, baseline: int = 3, floor=_DEFAULT, direction: str = "rise", sv=None,
              run=None, window=None, group=None) -> xr.Dataset:
    """Lead time = event_step − onset_step (positive: the warning precedes the event).

    The event is the first step where metric ``event`` (default val_acc) crosses
    ``event_threshold`` for ``sustain`` consecutive evaluations, on the metric's own finite steps.
    """
    out = onset(ds, variable, k=k, baseline=baseline, floor=floor, direction=direction, sv=sv,
                run=run, window=window, group=group)
    ev = select(resolve_target(ds, event), run=run, window=window, group=group)
    x = select(resolve_target(ds, variable, sv=sv), run=run, window=window, group=group)
    col = Collector(x)
    for key, _ in iter_series(x):
        st, y = finite(at(ev, key))
        i = event_index(y, threshold=event_threshold, sustain=sustain, direction=event_direction)
        col.add(key, event_step=np.nan if i is None else float(st[i]))
    out["event_step"] = col.dataset()["event_step"]
    out["lead_time"] = out["event_step"] - out["onset_step"]
    out["lead_time"].attrs.update(long_name="event_step - onset_step (positive = early warning)",
                                  units="steps")
    out.attrs.update(event=str(ev.name), event_threshold=event_threshold, sustain=sustain,
                     event_direction=event_direction)
    return out
