"""Shift detectors on planted change points (arrays and a multi-run Dataset with NaNs and groups)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from synthetic import make_results, with_series

from sed_dask.analysis import cusum, detect_shift, max_derivative, welch_scan
from sed_dask.errors import AnalysisError


def shifted(n=50, at=25, size=1.0, sd=0.1, seed=0):
    """Level shift at index ``at``; seed=None gives bounded deterministic wiggles (sd-scaled
    sine) whose baseline std is representative — a few Gaussian baseline points underestimate
    σ₀ often enough to make the textbook CUSUM false-alarm before the shift."""
    i = np.arange(n)
    wiggle = np.sqrt(2) * np.sin(1.7 * i + 0.3) if seed is None else np.random.default_rng(seed).standard_normal(n)
    return np.where(i < at, 1.5, 1.5 + size) + sd * wiggle


def test_cusum_alarm_and_change_estimate():
    x = shifted(seed=None)
    r = cusum(x)
    # Page's estimate (after the last reset) may start a wiggle or two early
    assert 23 <= r["change"] <= 25 and 25 <= r["alarm"] <= 27 and r["direction"] == 1
    assert r["score"] > 4
    down = cusum(shifted(size=-1.0, seed=None))
    assert 23 <= down["change"] <= 25 and down["direction"] == -1
    quiet = cusum(1 + 0.1 * (-1.0) ** np.arange(40), baseline=5)
    assert quiet["alarm"] is None and quiet["score"] <= 4
    with pytest.raises(AnalysisError, match="constant"):
        cusum(np.ones(20))


def test_welch_scan_matches_scipy_at_the_split():
    x = shifted(sd=0.3, seed=2)
    r = welch_scan(x, min_size=5)
    assert r["change"] == 25
    ref = stats.ttest_ind(x[:25], x[25:], equal_var=False)
    assert r["score"] == pytest.approx(abs(ref.statistic)) and r["p"] == pytest.approx(ref.pvalue)
    assert r["p"] < 1e-10
    for c in range(5, 46):  # it is the maximum over all admissible splits
        assert abs(stats.ttest_ind(x[:c], x[c:], equal_var=False).statistic) <= r["score"] + 1e-12
    with pytest.raises(AnalysisError, match="at least 10"):
        welch_scan(x[:9])


def test_max_derivative():
    x = shifted(sd=0.02)
    assert max_derivative(x)["change"] == 25
    assert max_derivative(x)["score"] == pytest.approx(abs(x[25] - x[24]))
    assert abs(max_derivative(x, smooth=True)["change"] - 25) <= 1


def test_detect_shift_on_dataset():
    ds = make_results(groups=("all", "attn"), windows=(5, 8), n_deltas=50)
    at = {"s1": 25, "s2": 30, "s3": 35}
    d = with_series(ds, "edge_ratio", lambda k, s: shifted(50, at[k["run"]], sd=0.05, seed=None))
    d["edge_ratio"].loc[dict(step=d.step.values[15])] = np.nan
    out = detect_shift(d, true_step=6000, tolerance=200)
    assert out.step.dims == ("run", "window", "group", "detector")
    for r, i in at.items():
        want = d.step.values[i]  # planted on the union grid (s3 lacks step 4000: NaN there)
        got = out.step.sel(run=r)
        assert (np.abs(got.sel(detector=["ttest", "maxderiv"]) - want) <= 200).all(), (r, got.values)
        assert (np.abs(got.sel(detector="cusum") - want) <= 400).all(), (r, got.values)
    assert np.isfinite(out.alarm_step.sel(detector="cusum")).all()
    assert np.isnan(out.alarm_step.sel(detector="ttest")).all()
    assert (out.p_value.sel(detector="ttest") < 1e-6).all()
    assert np.isnan(out.p_value.sel(detector="cusum")).all()
    np.testing.assert_array_equal(out.error, out.step - 6000)
    assert bool(out.hit.sel(run="s2", window=5, group="all", detector="ttest"))  # 6200 vs 6000
    assert not bool(out.hit.sel(run="s3", window=5, group="all", detector="ttest"))
    only = detect_shift(d, methods="maxderiv", smooth=True, run="s2")
    assert only.sizes["detector"] == 1
    with pytest.raises(AnalysisError, match="unknown shift method"):
        detect_shift(d, methods=["bayes"])
    short = make_results(runs=("a",), windows=(5,), n_deltas=12, lacking={})
    with pytest.raises(AnalysisError, match=r"\(run='a', W=5\).*at least 10"):
        detect_shift(short)
