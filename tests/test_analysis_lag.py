"""Lagged cross-correlation, sign convention, W sweep / lag flip, sliding and phase correlations."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats
from synthetic import make_results, with_series
from synthetic import plant_lag as planted

from sed_dask.analysis import (
    detrend_series,
    lag_correlation,
    lag_flips,
    lag_sweep,
    lagged_corr,
    peak_lag,
    pearson,
    phase_correlation,
    sliding_correlation,
)
from sed_dask.analysis.lag import peak_resolved, phase_surrogates
from sed_dask.errors import AnalysisError
from sed_dask.testing.series import planted_lag_family, planted_lag_pair, planted_shift_series

LEADS = {5: 2, 8: -1}  # planted: edge leads val_loss by 2 at W=5, lags it by 1 at W=8


@pytest.fixture(scope="module")
def ds():
    return planted(make_results(groups=("all", "mlp"), windows=(5, 8), n_deltas=50), LEADS)


def test_sign_convention_on_arrays():
    rng = np.random.default_rng(0)
    e = rng.standard_normal(60)
    for L in (3, -2):
        x = -np.roll(e, -L)  # x[t] = -e[t+L]
        r, n = lagged_corr(x, e, lags=range(-5, 8))
        lag, rmin = peak_lag(range(-5, 8), r)
        assert lag == L and rmin < -0.95
        assert n[list(range(-5, 8)).index(L)] == 60 - abs(L)
    r, n = lagged_corr(np.arange(8.0), np.arange(8.0), lags=[0, 2, 3])
    assert np.isfinite(r[:2]).all() and np.isnan(r[2]) and n[2] == 5  # overlap must exceed 5


def test_peak_rules():
    lags = [-1, 0, 1, 2]
    r = [0.2, -0.5, 0.9, np.nan]
    assert peak_lag(lags, r, peak="min") == (0, -0.5)
    assert peak_lag(lags, r, peak="absmax") == (1, 0.9)
    assert peak_lag(lags, r, peak="max") == (1, 0.9)
    with pytest.raises(AnalysisError):
        peak_lag(lags, r, peak="median")


def test_pearson_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(15), rng.standard_normal(15)
    r, p = pearson(a, b)
    ref = stats.pearsonr(a, b)
    assert r == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert np.isnan(pearson(np.ones(5), a[:5])[0])


def test_detrend_variants():
    steps = np.arange(200, 26001, 200).astype(float)
    t = steps / 1e4
    cubic = 1 + 2 * t - 0.3 * t**2 + 0.05 * t**3
    assert np.abs(detrend_series(steps, cubic)).max() < 1e-9
    assert np.abs(detrend_series(steps, cubic, method="cubic_raw")).max() < 1e-6
    noisy = cubic + np.random.default_rng(0).standard_normal(steps.size)
    np.testing.assert_allclose(
        detrend_series(steps, noisy), detrend_series(steps, noisy, method="cubic_raw"), atol=1e-6
    )
    lin = detrend_series(steps, cubic, method="linear")
    assert np.abs(lin).max() > 1e-3 and abs(lin.mean()) < 1e-9
    v = noisy.copy()
    v[5] = np.nan
    out = detrend_series(steps, v)
    assert np.isnan(out[5]) and np.isfinite(out[6])
    np.testing.assert_array_equal(detrend_series(steps, v, method="none"), v)


def test_planted_lead_and_lag_on_multi_run_dataset(ds):
    out = lag_correlation(ds)
    assert out.r.dims == ("run", "window", "group", "lag")
    for W, L in LEADS.items():
        pl = out.peak_lag.sel(window=W)
        assert (pl == L).all(), (W, pl.values)
        assert (out.peak_r.sel(window=W) < -0.9).all()
    # the missing val_loss eval leaves a hole: kept on the grid, the lag stays exact ...
    assert int(out.n_overlap.sel(run="s1", window=5, group="all", lag=2)) < int(
        out.n_points.sel(run="s1", window=5, group="all")
    )
    # ... while the reference's compression shifts part of the pairs
    drop = lag_correlation(ds, gaps="drop")
    assert (drop.peak_r.sel(window=5) > out.peak_r.sel(window=5)).all()
    # s3 lacks step 4000: lags count its own checkpoints, not the union grid
    assert int(out.peak_lag.sel(run="s3", window=8, group="mlp")) == -1
    absmax = lag_correlation(ds, peak="absmax", lags=range(-3, 6), detrend="linear")
    assert (absmax.peak_lag.sel(window=5) == 2).all()


def test_w_sweep_lag_flip(ds):
    sw = lag_sweep(ds)
    assert sw.flip_next.sel(window=5).all() and not sw.flip_next.sel(window=8).any()
    table = lag_flips(sw)
    assert len(table) == 3 * 2
    assert set(table.columns) >= {"run", "group", "window_a", "window_b", "peak_lag_a", "peak_lag_b"}
    assert (table.peak_lag_a == 2).all() and (table.peak_lag_b == -1).all()
    same = planted(make_results(runs=("a",), windows=(5, 8), lacking={}), leads={5: 2, 8: 1})
    assert lag_flips(lag_sweep(same)).empty
    with pytest.raises(AnalysisError, match="at least two W"):
        lag_sweep(ds, windows=[5])


def test_sliding_correlation_center_and_trailing():
    ds = make_results(runs=("a", "b"), windows=(5,), n_deltas=60, lacking={})
    rng = np.random.default_rng(5)
    e = rng.standard_normal(60)
    sign = np.where(np.arange(60) < 35, 1.0, -1.0)
    d = with_series(ds, "val_loss", lambda k, s: e)
    d = with_series(d, "edge_ratio", lambda k, s: sign * e + 0.05 * rng.standard_normal(60))
    c = sliding_correlation(d)
    r = c.r.sel(run="a", window=5).values
    first = np.nonzero(np.isfinite(r))[0][0]
    # first window W-1=4; the missing eval at index 33 blocks centres 28..38
    assert first == 4 + 5
    assert r[first] > 0.9 and np.nanmin(r) < -0.9
    assert np.all(np.isnan(r[28:39]))
    assert int(c.n_sign_changes.sel(run="a", window=5)) == 1
    t = sliding_correlation(d, align="trailing")
    rt = t.r.sel(run="a", window=5).values
    assert np.nonzero(np.isfinite(rt))[0][0] == 4 + 7
    with pytest.raises(AnalysisError, match="odd"):
        sliding_correlation(d, width=10)


def test_phase_correlation_collapse_phase():
    ds = make_results(runs=("a", "b", "c"), windows=(5,), n_deltas=50, lacking={})
    i = np.arange(50.0)
    edge = np.where(i < 15, 1.1 + 0.06 * i, np.where(i < 30, 2.0, 2.0 - 0.045 * (i - 29)))
    rng = np.random.default_rng(0)
    d = with_series(ds, "edge_ratio", lambda k, s: edge + 0.001 * rng.standard_normal(50))
    d = with_series(d, "val_loss", lambda k, s: 1 + 0.8 * edge + 0.002 * rng.standard_normal(50))
    for method in ("peak", "derivative", "threshold", "changepoint"):
        pc = phase_correlation(d, method=method)
        assert pc.r.dims == ("run", "window", "phase")
        assert (pc.r.sel(phase="collapse") > 0.99).all(), method
        assert (pc.delta_y.sel(phase="collapse") > 0).all()
    from sed_dask.analysis import cross_seed_summary

    s = cross_seed_summary(phase_correlation(d, method="derivative").r.sel(phase="collapse", drop=True))
    assert s.r_mean.item() > 0.99 and s.r_n.item() == 3


def test_errors_name_the_problem(ds):
    with pytest.raises(
        AnalysisError,
        match=r"val_loss not in dataset; attach with "
        r"sed_dask.analysis.attach_metrics or ingest --metrics",
    ):
        lag_correlation(ds.drop_vars("val_loss"))
    with pytest.raises(AnalysisError, match="unknown variable 'sigma_9'"):
        lag_correlation(ds, "sigma_9")
    with pytest.raises(AnalysisError, match="has an 'sv' dimension"):
        lag_correlation(ds, "ratio")
    short = make_results(runs=("a",), windows=(5,), n_deltas=10, lacking={})
    with pytest.raises(AnalysisError, match=r"\(run='a', W=5\).*at least"):
        lag_correlation(short)
    r23 = lag_correlation(ds, "r23", run="s1", window=5)
    assert r23.attrs["variable"] == "r23"
    with pytest.raises(AnalysisError, match=r"run=\['s9'\] not in the dataset"):
        lag_correlation(ds, run="s9")


# ---- issue 12 item 5: a lag is a peak only when interior and significant ---------------------


def _dataset(steps, X, y, windows=None):
    """One run: edge_ratio per W (rows of X) and a shared val_loss, on a regular step grid."""
    X = np.atleast_2d(X)
    windows = list(range(5, 5 + X.shape[0])) if windows is None else list(windows)
    return xr.Dataset(
        {"edge_ratio": (("run", "window", "step"), X[None]), "val_loss": (("run", "step"), np.asarray(y)[None])},
        coords={"run": ["a"], "window": windows, "step": steps},
    )


def _one(out):
    return out.isel(run=0, window=0)


@pytest.mark.parametrize("L", [2, -3])
def test_planted_lag_recovered_with_sign_and_size_and_significant(L):
    steps, x, y = planted_lag_pair(120, L, ar=0.5, seed=3)
    o = _one(lag_correlation(_dataset(steps, x, y)))
    assert int(o.peak_lag) == L and float(o.peak_r) < -0.7
    assert bool(o.peak_resolved) and bool(o.peak_significant)
    assert float(o.peak_p_value) == pytest.approx(1 / 1000) and int(o.n_null) == 999
    # the module's sign convention: positive = the spectral series (x) leads the target
    assert "variable leads" in lag_correlation(_dataset(steps, x, y)).attrs["lag_convention"]


def test_pure_noise_false_positive_rate_within_two_alpha():
    # both sides autocorrelated (AR(1) 0.8), like overlapping-window series: a naive Pearson p at
    # the best of 13 lags would call most of these significant
    hits = naive = 0
    for seed in range(50):
        steps, x, _ = planted_lag_pair(60, 0, coupling=0.0, ar=0.8, seed=seed)
        _, z, _ = planted_lag_pair(60, 0, coupling=0.0, ar=0.8, seed=1000 + seed)
        o = _one(lag_correlation(_dataset(steps, x, z), n_null=199))
        hits += bool(o.peak_significant)
        xd, zd = detrend_series(steps, x), detrend_series(steps, z)
        lag = int(o.peak_lag)
        a, b = (xd[: 60 - lag], zd[lag:]) if lag >= 0 else (xd[-lag:], zd[: 60 + lag])
        naive += pearson(a, b)[1] < 0.05
    assert hits <= 5, hits  # ≤ 2·alpha·50 (measured: 2/50)
    assert naive >= 15, naive  # naive Pearson p at the peak: 26/50 significant


def test_peak_on_grid_edge_is_unresolved_and_widening_moves_it():
    steps, x, y = planted_lag_pair(150, 7, ar=0.8, seed=1)  # true lead 7, outside −3..5
    narrow = _one(lag_correlation(_dataset(steps, x, y), lags=range(-3, 6)))
    assert int(narrow.peak_lag) == 5 and not bool(narrow.peak_resolved)
    wide = _one(lag_correlation(_dataset(steps, x, y), lags=range(-5, 11)))
    assert int(wide.peak_lag) == 7 and bool(wide.peak_resolved) and bool(wide.peak_significant)
    assert not peak_resolved([-1, 0, 1, 2], [np.nan, 0.1, -0.5, np.nan], 1)  # edge of the *finite* lags
    assert peak_resolved([-1, 0, 1, 2], [0.3, 0.1, -0.5, 0.2], 1)


def test_widening_the_grid_does_not_move_a_resolved_peak():
    steps, x, y = planted_lag_pair(150, -2, ar=0.6, seed=4)
    d = _dataset(steps, x, y)
    for lags in (range(-3, 6), range(-5, 8), range(-9, 13)):
        o = _one(lag_correlation(d, lags=lags))
        assert int(o.peak_lag) == -2 and bool(o.peak_resolved) and bool(o.peak_significant), lags


def test_flip_reported_only_when_both_peaks_interior_and_significant():
    steps, X, y = planted_lag_family(120, [-1, 2], ar=0.5, seed=2)
    sw = lag_sweep(_dataset(steps, X, y, windows=[10, 20]))
    assert bool(sw.flip_next.sel(run="a", window=10)) and bool(sw.sign_change_next.sel(run="a", window=10))
    t = lag_flips(sw)
    assert len(t) == 1 and t.status.iloc[0] == "flip" and t.reason.iloc[0] == ""
    assert (t.peak_lag_a.iloc[0], t.peak_lag_b.iloc[0]) == (-1, 2)
    assert t.peak_resolved_a.iloc[0] and t.peak_significant_b.iloc[0] and t.peak_p_value_a.iloc[0] < 0.01
    # W=20 replaced by an independent series: look for a seed whose noise peak is interior and of
    # the opposite sign, so only the significance test stands between it and a "flip"
    for seed in range(40):
        _, z, _ = planted_lag_pair(120, 0, coupling=0.0, ar=0.5, seed=100 + seed)
        sw = lag_sweep(_dataset(steps, np.stack([X[0], z]), y, windows=[10, 20]))
        o = sw.sel(run="a", window=20)
        if int(o.peak_lag) > 0 and bool(o.peak_resolved) and not bool(o.peak_significant):
            break
    else:
        pytest.fail("no noise seed with an interior positive non-significant peak")
    assert bool(sw.sign_change_next.sel(run="a", window=10)) and not bool(sw.flip_next.sel(run="a", window=10))
    assert lag_flips(sw).empty
    rej = lag_flips(sw, rejected=True)
    assert list(rej.status) == ["not significant"]
    assert rej.reason.iloc[0].startswith("W=20: not significant (p=") and "alpha=0.05" in rej.reason.iloc[0]


def test_edge_peak_sign_change_is_no_flip():
    # catches the old rule (sign(peak_lag) changes -> flip): it reported W=10→20 here, where the
    # W=20 "peak" is only the +7 end of the grid (the planted lead of 9 lies beyond it)
    steps, X, y = planted_lag_family(150, [-2, 9], ar=0.8, seed=5)
    sw = lag_sweep(_dataset(steps, X, y, windows=[10, 20]))
    o = sw.sel(run="a", window=20)
    assert int(o.peak_lag) == 7 and not bool(o.peak_resolved)
    assert bool(sw.sign_change_next.sel(run="a", window=10)) and not bool(sw.flip_next.sel(run="a", window=10))
    assert lag_flips(sw).empty
    rej = lag_flips(sw, rejected=True)
    assert list(rej.status) == ["unresolved"]
    assert "W=20: unresolved (peak on grid edge at +7)" in rej.reason.iloc[0]
    assert set(rej.columns) >= {
        "run",
        "window_a",
        "window_b",
        "peak_lag_a",
        "peak_lag_b",
        "peak_r_a",
        "peak_r_b",
        "peak_p_value_a",
        "peak_p_value_b",
    }


def test_null_is_deterministic_and_checks_its_arguments():
    steps, x, y = planted_lag_pair(60, 1, coupling=-0.3, noise=1.0, seed=7)
    d = _dataset(steps, x, y)
    a, b = lag_correlation(d, n_null=99), lag_correlation(d, n_null=99)
    xr.testing.assert_identical(a, b)
    for alpha in (0.05, 0.5):
        o = _one(lag_correlation(d, n_null=99, seed=1, alpha=alpha))
        p = float(o.peak_p_value)
        assert 0.01 <= p <= 1 and bool(o.peak_significant) == (p <= alpha) and int(o.n_null) == 99
    off = _one(lag_correlation(d, n_null=0))
    assert np.isnan(float(off.peak_p_value)) and not bool(off.peak_significant) and int(off.n_null) == 0
    with pytest.raises(AnalysisError, match="alpha"):
        lag_correlation(d, alpha=1.5)
    with pytest.raises(AnalysisError, match="n_null"):
        lag_correlation(d, n_null=-1)
    with pytest.raises(AnalysisError, match="sweep lacks"):
        lag_flips(a.drop_vars("peak_resolved"))
    s = phase_surrogates(np.where(np.arange(60) == 3, np.nan, y), 4, seed=0)
    assert s.shape == (4, 60) and np.isnan(s[:, 3]).all() and np.isfinite(np.delete(s, 3, axis=1)).all()


def test_planted_shift_series():
    steps, v = planted_shift_series(50, 20, size=2.0, noise=0.1, seed=0)
    assert steps[0] == 200 and steps.size == 50
    assert v[20:].mean() - v[:20].mean() == pytest.approx(2.0, abs=0.15)
    _, w = planted_shift_series(50, 20, size=-1.0, noise=0.1, seed=None)
    assert np.all(np.abs(w[:20] - 1.0) <= 0.1) and np.all(np.abs(w[20:] - 0.0) <= 0.1)
    with pytest.raises(AnalysisError, match="shift_index"):
        planted_shift_series(50, 0)
