"""Onset detection (rise / drop) and lead time to an event."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import make_results, with_series

from sed_dask.analysis import event_index, lead_time, onset, onset_index
from sed_dask.errors import AnalysisError


def test_onset_rise_needs_ratio_and_floor():
    x = np.array([1.0, 1.0, 1.0, 2.0, 5.0, 15.0, 25.0, 30.0])
    assert onset_index(x)[0] == 6  # 15 > 10x baseline but below the floor 20
    assert onset_index(x, floor=None)[0] == 5
    assert onset_index(x, k=3, floor=None)[0] == 4
    i, b, thr = onset_index(x, baseline=4, floor=None)
    assert b == 1.0 and thr == 10.0 and i == 5
    assert onset_index(np.ones(6))[0] is None


def test_onset_drop():
    x = np.array([100.0, 120.0, 90.0, 50.0, 9.0, 5.0])
    i, b, thr = onset_index(x, direction="drop")
    assert (i, b, thr) == (4, 100.0, 10.0)
    assert onset_index(x, direction="drop", floor=6.0)[0] == 5
    with pytest.raises(AnalysisError, match="positive baseline"):
        onset_index(np.array([0.0, 0.0, 0.0, 1.0]))
    with pytest.raises(AnalysisError, match="direction"):
        onset_index(x, direction="up")


def test_event_index_sustained():
    y = [0.5, 0.91, 0.85, 0.92, 0.95, 0.99]
    assert event_index(y) == 1
    assert event_index(y, sustain=3) == 3
    assert event_index(y, threshold=0.995) is None
    assert event_index([2.0, 1.0, 0.4], threshold=0.5, direction="below") == 2


def test_lead_time_on_dataset_with_groups():
    ds = make_results(groups=("all", "attn"), windows=(5, 8), n_deltas=40)
    on = {"s1": 12, "s2": 15, "s3": 18}
    ev = {"s1": 20, "s2": 26, "s3": 30}

    def gap(key, steps):  # gap compression: collapses 20x at on[run]
        i = np.arange(steps.size)
        return np.where(i < on[key["run"]], 40.0, 2.0) + 0.1 * np.sin(i)

    def acc(key, steps):
        return np.where(np.arange(steps.size) < ev[key["run"]], 0.3, 0.95)

    d = with_series(ds, "edge_gap", gap)
    d = with_series(d, "val_acc", acc)
    d["val_acc"].loc[dict(run="s1", step=d.step.values[5])] = np.nan
    out = lead_time(d, "edge_gap", direction="drop")
    steps = d.step.values
    for r in on:
        assert (out.onset_step.sel(run=r) == steps[on[r]]).all()
        assert (out.event_step.sel(run=r) == steps[ev[r]]).all()
        assert (out.lead_time.sel(run=r) == steps[ev[r]] - steps[on[r]]).all()
    assert out.lead_time.dims == ("run", "window", "group")
    # onset on a metric series (no window/group dims), e.g. an external defect measurement
    d2 = with_series(d, "lr", lambda k, s: np.where(np.arange(s.size) < 10, 1.0, 30.0))
    o = onset(d2, "lr")
    assert o.onset_step.dims == ("run",) and (o.onset_step == steps[10]).all()


def test_missing_event_metric_and_short_series():
    ds = make_results(runs=("a",), windows=(5,), n_deltas=12, lacking={})
    with pytest.raises(AnalysisError, match="val_acc not in dataset; attach with"):
        lead_time(ds.drop_vars("val_acc"))
    with pytest.raises(AnalysisError, match=r"'edge_ratio' \(run='a', W=5\).*at least 4"):
        onset(ds.isel(step=slice(0, 6)))
