"""Phase segmentation, collapse step, cross-seed summaries and the collapse -> val-loss event study
on planted series."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from synthetic import make_results, with_series

from sed_dask.analysis import collapse_step, cross_seed_summary, event_study, phase_intervals, phases, segment
from sed_dask.analysis.events import smoothed_change, stabilisation_threshold
from sed_dask.errors import AnalysisError


def three_phase(n, b1, b2, *, lo=1.1, hi=2.0, end=1.0, noise=0.0, rng=None):
    """Linear rise to ``hi`` until b1, flat plateau until b2, linear collapse to ``end``."""
    i = np.arange(n, dtype=float)
    x = np.where(i < b1, lo + (hi - lo) * i / b1, np.where(i < b2, hi, hi - (hi - end) * (i - b2 + 1) / (n - b2)))
    if noise:
        x = x + noise * np.random.default_rng(rng).standard_normal(n)
    return x


def test_peak_method_hand_example():
    x = np.array([1.0, 1.2, 1.5, 2.0, 1.9, 1.8, 1.6, 1.2, 1.0])
    assert segment(x, method="peak") == (3, 5)  # 0.85 * 2.0 = 1.7
    assert segment(x, method="peak", plateau=0.7) == (2, 6)
    assert phase_intervals(3, 5, 9) == {"rise": (0, 4), "plateau": (3, 6), "collapse": (5, 9)}


def test_threshold_method():
    x = np.full(20, 1.1)
    x[5:13] = 1.5
    assert segment(x, method="threshold") == (5, 12)
    assert segment(np.full(7, 1.0), method="threshold") == (0, 6)
    assert segment(x, method="threshold", threshold=1.6) == (0, 19)


def test_derivative_method_finds_decline_start():
    x = np.concatenate([np.linspace(1.0, 2.0, 10), np.full(10, 2.0), 2.0 - 0.05 * np.arange(1, 21)])
    a, b = segment(x, method="derivative")
    assert a == int(np.argmax(x))
    assert 17 <= b <= 20  # the size-5 moving average starts falling 2 points early
    flat = np.concatenate([np.linspace(1, 2, 5), np.full(5, 2.0)])
    assert segment(flat, method="derivative") == (4, 4)  # never falls: collapse starts at the peak


@pytest.mark.parametrize("model", ["linear", "constant"])
def test_changepoint_recovers_planted_breaks(model):
    if model == "constant":
        x = np.concatenate([np.full(12, 1.2), np.full(15, 2.0), np.full(13, 1.05)])
        x = x + 0.02 * np.random.default_rng(0).standard_normal(x.size)
        assert segment(x, method="changepoint", model="constant") == (12, 27)
    else:
        x = three_phase(50, 15, 30, noise=0.02, rng=1)
        a, b = segment(x, method="changepoint", model="linear")
        assert abs(a - 15) <= 1 and abs(b - 30) <= 1


def test_changepoint_exact_against_brute_force():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(16)

    def sse(seg):
        t = np.arange(seg.size)
        c = np.polyfit(t, seg, 1)
        return np.sum((seg - np.polyval(c, t)) ** 2)

    best = min(((sse(x[:i]) + sse(x[i:j]) + sse(x[j:]), (i, j)) for i in range(3, 14) for j in range(i + 3, 14)))
    assert segment(x, method="changepoint", model="linear") == best[1]


def test_phases_on_dataset_with_nans_and_groups():
    ds = make_results(groups=("all", "attn"), windows=(5, 8))
    breaks = {"s1": (14, 26), "s2": (10, 30), "s3": (18, 28)}

    def plant(key, steps):
        b1, b2 = breaks[key["run"]]
        return three_phase(steps.size, b1, b2, noise=0.005, rng=len(key["run"]))

    d = with_series(ds, "edge_ratio", plant)
    d["edge_ratio"].loc[dict(run="s1", step=5000)] = np.nan  # a degenerate window
    out = phases(d, "edge_ratio", method="changepoint", model="linear", label="newest")
    for r, (b1, b2) in breaks.items():
        for w in (5, 8):
            row = out.sel(run=r, window=w, group="attn")
            assert abs(int(row.plateau_start_step) - d.step.values[b1]) <= 200
            assert abs(int(row.collapse_start_step) - d.step.values[b2]) <= 200
    lab = out.phase.sel(run="s2", window=5, group="all")
    assert set(np.unique(lab.values[np.isfinite(lab.values)])) == {0.0, 1.0, 2.0}
    assert np.isnan(out.phase.sel(run="s1", window=5, group="all", step=5000))
    pk = phases(d, "edge_ratio", method="peak")
    assert (pk.peak_value > 1.9).all()
    assert out.phase.attrs["flag_meanings"] == "rise plateau collapse rebound"


REF = dict(sustain=1, label="newest", after="peak")  # the reference's collapse rule (docs/method.md §5.1)
ROBUST = [1.15, 1.20, 1.25, 1.30]


def test_collapse_step_fixed_auto_and_list():
    ds = make_results(runs=("a", "b"), windows=(5, 8), lacking={})
    # plateau at 2.0, then linear decline: crosses 1.684 (auto, W=5), 1.5 (auto, W=8), 1.2 (fixed)
    x = np.concatenate([np.linspace(1.2, 2.0, 10), np.full(10, 2.0), np.linspace(1.95, 1.0, 20)])
    d = with_series(ds, "edge_ratio", lambda k, s: x)
    steps = d.step.values

    def first_below(tau, W):
        idx = np.arange(40) >= W - 1
        p = int(np.argmax(np.where(idx, x, -np.inf)))
        return steps[p + np.nonzero(x[p:] < tau)[0][0]]

    fixed = collapse_step(d, "edge_ratio", tau=1.20, **REF)
    assert int(fixed.collapse_step.sel(run="a", window=5)) == first_below(1.20, 5)
    auto = collapse_step(d, "edge_ratio", tau="auto", **REF)
    assert int(auto.collapse_step.sel(run="a", window=5)) == first_below(1 + 2 * 5 ** (-2 / 3), 5)
    assert int(auto.collapse_step.sel(run="a", window=8)) == first_below(1.5, 8)
    assert float(auto.tau.sel(run="a", window=8)) == pytest.approx(1.5)
    many = collapse_step(d, "edge_ratio", tau=[1.15, 1.20, 1.25, 1.30], **REF)
    assert many.collapse_step.dims == ("run", "window", "tau")
    cs = many.collapse_step.sel(run="b", window=5).values
    assert np.all(np.diff(cs) <= 0)  # a higher tau is crossed earlier
    never = collapse_step(with_series(ds, "edge_ratio", lambda k, s: x + 0.5), "edge_ratio", tau=1.2, **REF)
    assert np.isnan(never.collapse_step).all()
    with pytest.raises(AnalysisError, match="tau"):
        collapse_step(d, "edge_ratio", tau="sometimes")
    with pytest.raises(AnalysisError, match="ratio > 1"):  # a tau <= 1 can never be crossed by a ratio
        collapse_step(d, "edge_ratio", tau=0.5)


def test_cross_seed_summary_population_std():
    ds = make_results(runs=("a", "b", "c", "d"), windows=(5,), lacking={})
    ends = {"a": 20, "b": 24, "c": 28, "d": None}

    def plant(key, steps):
        e = ends[key["run"]]
        if e is None:
            return np.full(steps.size, 2.0)
        return np.where(np.arange(steps.size) < e, 2.0, 1.0)

    cs = collapse_step(with_series(ds, "edge_ratio", plant), "edge_ratio", tau=1.2, **REF)
    got = cross_seed_summary(cs, "collapse_step")
    vals = np.array([ds.step.values[e] for e in (20, 24, 28)], dtype=float)
    assert got.collapse_step_mean.item() == pytest.approx(vals.mean())
    assert got.collapse_step_std.item() == pytest.approx(np.std(vals))  # ddof = 0
    assert got.collapse_step_n.item() == 3
    s1 = cross_seed_summary(cs, "collapse_step", ddof=1)
    assert s1.collapse_step_std.item() == pytest.approx(np.std(vals, ddof=1))
    with pytest.raises(AnalysisError, match="unknown variable"):
        cross_seed_summary(cs, "nope")


def test_too_short_series_names_run_and_window():
    ds = make_results(runs=("a",), windows=(5,), n_deltas=12, lacking={})
    with pytest.raises(AnalysisError, match=r"'edge_ratio' \(run='a', W=5\).*at least 9"):
        phases(ds, "edge_ratio", method="changepoint")
    with pytest.raises(AnalysisError, match=r"unknown variable 'edgy'"):
        phases(ds, "edgy")
    with pytest.raises(AnalysisError, match=r"W=\[7\] not in the dataset"):
        phases(ds, window=7)


# ------------------------------------------------------------------------------------ event study
# Edge: peak 1.6 at index 3; first index >= 3 below tau: 1.30 -> 7, 1.25 -> 8, 1.20 -> 9, 1.15 -> 10.
EDGE = [1.1, 1.3, 1.5, 1.6, 1.5, 1.4, 1.35, 1.28, 1.22, 1.18, 1.12, 1.1, 1.05, 1.0, 1.0, 1.0]
# |d val_loss| per window t (t -> t+1). dvl_smooth (mean of t-1, t, t+1): 0.4 for t <= 5, 0.2667, 0.1333,
# 0 (t=8), 0.1333, 0.1467, 0.15, 0.02 (t=12), 0.01, 0.01, 0.01. Median of the first 10 = 0.4 -> thr 0.12.
DVL = [0.4] * 7 + [0.0, 0.0, 0.0, 0.4, 0.04, 0.01, 0.01, 0.01]


def _event_ds(edges, losses, *, W=10, pad=2):
    """Runs with an edge_ratio and a val_loss series; ``pad`` leading NaN steps (no window yet)."""
    n = max(len(e) for e in edges.values()) + pad
    steps = 100 * np.arange(1 - pad, n + 1 - pad)
    x = np.full((len(edges), 1, n), np.nan)
    y = np.full((len(edges), n), np.nan)
    for i, r in enumerate(edges):
        x[i, 0, pad : pad + len(edges[r])] = edges[r]
        y[i, pad : pad + len(losses[r])] = losses[r]
    return xr.Dataset(
        {"edge_ratio": (("run", "window", "step"), x), "val_loss": (("run", "step"), y)},
        coords={"run": list(edges), "window": [W], "step": steps},
    )


def _loss(dvl, start=5.0):
    return start - np.concatenate([[0.0], np.cumsum(dvl)])


def test_event_study_planted_lead_times():
    ds = _event_ds({"a": EDGE, "flat": EDGE}, {"a": _loss(DVL), "flat": _loss([0.4] * 15)})
    out = event_study(ds, "edge_ratio", taus=[1.15, 1.20, 1.25, 1.30], **REF)
    assert out.collapse_step.dims == ("run", "window", "tau")
    np.testing.assert_array_equal(out.tau.values, [1.15, 1.20, 1.25, 1.30])
    a = out.sel(run="a", window=10)
    # window t sits at step 100 (t + 1)
    np.testing.assert_array_equal(a.collapse_step.values, [1100, 1000, 900, 800])
    np.testing.assert_array_equal(a.stab_step.values, [1300, 1300, 900, 900])
    np.testing.assert_array_equal(a.stab_delay.values, [200, 300, 0, 100])
    assert float(a.threshold) == pytest.approx(0.12)
    assert int(a.n_baseline) == 10 and not bool(a.threshold_fallback) and int(a.n_points) == 16
    assert float(a.peak_step) == 400 and float(a.peak_value) == 1.6
    # the target never stabilises (constant change): collapse defined, stab and lead NaN
    f = out.sel(run="flat", window=10)
    np.testing.assert_array_equal(f.collapse_step.values, a.collapse_step.values)
    assert f.stab_step.isnull().all() and f.stab_delay.isnull().all()
    # collapse steps are collapse_step's
    cs = collapse_step(ds, "edge_ratio", tau=[1.15, 1.20, 1.25, 1.30], **REF)
    xr.testing.assert_equal(out.collapse_step, cs.collapse_step)
    # a scalar tau: one value per series, no tau dim; no collapse (edge never below 1.2 + 0.5) -> NaN
    high = _event_ds({"a": list(np.add(EDGE, 0.5)), "flat": EDGE}, {"a": _loss(DVL), "flat": _loss([0.4] * 15)})
    one = event_study(high, "edge_ratio", taus=1.2, **REF).sel(run="a")
    assert "tau" not in one.dims and one.collapse_step.isnull().all() and one.stab_delay.isnull().all()
    # the accessor forwards
    import sed_dask  # noqa: F401

    xr.testing.assert_identical(ds.sed.event_study("edge_ratio", taus=[1.2]), event_study(ds, "edge_ratio", taus=[1.2]))


def test_event_study_smoothing_rules_and_missing_values():
    # gaps are not bridged: a missing value removes both changes next to it
    dsm = smoothed_change([1.0, 0.5, np.nan, 0.3, 0.2])
    np.testing.assert_allclose(dsm, [0.5, 0.5, 0.1, 0.1, 0.1])
    assert np.isnan(smoothed_change([1.0, np.nan, np.nan, 2.0])).all()
    assert stabilisation_threshold([np.nan, 0.2, 0.4, 0.1, np.nan]) == (pytest.approx(0.06), 3)
    assert stabilisation_threshold([np.nan] * 4) == (0.01, 0)
    assert stabilisation_threshold(np.arange(20.0), baseline=3, factor=0.5) == (0.5, 3)
    # fewer than 10 windows: the threshold uses the dvl it has (n_baseline says how many)
    short_edge = [1.5, 1.6, 1.3, 1.1, 1.0, 1.0]
    short_loss = _loss([0.3, 0.3, 0.3, 0.01, 0.01])  # dvl_smooth 0.3, 0.3, 0.203, 0.107, 0.01, 0.01
    ds = _event_ds({"s": short_edge}, {"s": short_loss})
    s = event_study(ds, "edge_ratio", taus=[1.2], **REF).sel(run="s", window=10, tau=1.2)
    assert int(s.n_baseline) == 6
    assert float(s.threshold) == pytest.approx(0.3 * np.median([0.3, 0.3, 0.61 / 3, 0.32 / 3, 0.01, 0.01]))
    assert float(s.collapse_step) == 400 and float(s.stab_step) == 500 and float(s.stab_delay) == 100
    # one finite val_loss value: no dvl at all -> the 0.01 fallback, flagged; never stabilises
    lone = np.full(16, np.nan)
    lone[5] = 2.0
    r = event_study(_event_ds({"x": EDGE}, {"x": lone}), "edge_ratio", taus=ROBUST, **REF).sel(run="x", window=10)
    assert float(r.threshold) == 0.01 and bool(r.threshold_fallback) and int(r.n_baseline) == 0
    assert r.stab_step.isnull().all() and np.isfinite(r.collapse_step).all()
    # val_loss missing at some windows: only the finite dvl_smooth entries can mark stabilisation
    holes = _loss(DVL)
    holes[8:10] = np.nan  # hides the early dip at t = 8
    h = event_study(_event_ds({"h": EDGE}, {"h": holes}), "edge_ratio", taus=[1.25], **REF).sel(
        run="h", window=10, tau=1.25
    )
    assert float(h.stab_step) == 1300


def test_event_study_errors_name_the_series():
    ds = _event_ds({"a": EDGE, "b": EDGE}, {"a": _loss(DVL), "b": np.full(16, np.nan)})
    with pytest.raises(AnalysisError, match=r"'val_loss' \(run='b', W=10\): no finite value"):
        event_study(ds, "edge_ratio", taus=ROBUST, **REF)
    assert np.isfinite(event_study(ds, "edge_ratio", taus=ROBUST, run="a", **REF).stab_delay).any()
    with pytest.raises(AnalysisError, match="val_acc not in dataset; attach with"):
        event_study(ds, "edge_ratio", target="val_acc", run="a")
    with pytest.raises(AnalysisError, match="taus must be"):
        event_study(ds, "edge_ratio", taus=["auto"], run="a")
    with pytest.raises(AnalysisError, match="taus must be"):
        event_study(ds, "edge_ratio", taus=[], run="a")
    with pytest.raises(AnalysisError, match="the fixed-k edge needs 'ratio'"):  # default series: fixed-k edge
        event_study(ds, run="a")
    nan_edge = ds.copy()
    nan_edge["edge_ratio"] = nan_edge.edge_ratio.where(nan_edge.run != "a")
    with pytest.raises(AnalysisError, match=r"'edge_ratio' \(run='a', W=10\).*at least 1 finite"):
        event_study(nan_edge, "edge_ratio", run="a")
