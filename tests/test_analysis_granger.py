"""Granger tests: statsmodels agreement, known causal direction, lag selection, permutation null,
residualised and multivariate variants, on arrays and on a multi-run Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from statsmodels.tsa.stattools import grangercausalitytests
from synthetic import make_results, with_series

from sed_dask.analysis import granger, granger_multivariate, granger_test, residualize
from sed_dask.analysis.granger import lag_matrix
from sed_dask.errors import AnalysisError


def ar_pair(n, *, seed=0, coupling=0.8, lag=1):
    """x AR(1); y_t = 0.4 y_{t-1} + coupling x_{t-lag} + noise: x -> y, not y -> x."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    y = np.zeros(n)
    for t in range(1, n):
        x[t] = 0.5 * x[t - 1] + rng.standard_normal()
        y[t] = 0.4 * y[t - 1] + (coupling * x[t - lag] if t >= lag else 0) + 0.5 * rng.standard_normal()
    return x, y


@pytest.mark.parametrize("p", [1, 2, 3])
def test_f_test_rss_aic_match_statsmodels(p):
    rng = np.random.default_rng(p)
    y, x = rng.standard_normal(60), rng.standard_normal(60)
    ours = granger_test(y, x, lag=p)
    res = grangercausalitytests(np.column_stack([y, x]), [p])[p]
    F, pv, df_denom, df_num = res[0]["ssr_ftest"]
    r_fit, u_fit = res[1][0], res[1][1]
    assert ours["F"] == pytest.approx(F, rel=1e-8)
    assert ours["p_value"] == pytest.approx(pv, rel=1e-8)
    assert (ours["df_denom"], ours["df_num"]) == (df_denom, df_num)
    assert ours["rss_r"] == pytest.approx(r_fit.ssr, rel=1e-8)
    assert ours["rss_u"] == pytest.approx(u_fit.ssr, rel=1e-8)
    n = ours["n_obs"]
    assert n == u_fit.nobs
    const = n * (1 + np.log(2 * np.pi))  # statsmodels AIC = -2 llf + 2k
    assert ours["aic_u"] + const == pytest.approx(u_fit.aic, rel=1e-8)
    assert ours["aic_r"] + const == pytest.approx(r_fit.aic, rel=1e-8)
    assert ours["r2_u"] == pytest.approx(u_fit.rsquared, rel=1e-8)


def test_covariate_design_matches_statsmodels_ols():
    rng = np.random.default_rng(7)
    y, x, lr = rng.standard_normal(40), rng.standard_normal(40), rng.uniform(0, 1, 40)
    p = 2
    ours = granger_test(y, x, lag=p, covariate=lr)
    Xr = np.column_stack([lr[p:], lag_matrix(y, p)])
    Xu = np.column_stack([Xr, lag_matrix(x, p)])
    fr = sm.OLS(y[p:], sm.add_constant(Xr)).fit()
    fu = sm.OLS(y[p:], sm.add_constant(Xu)).fit()
    assert ours["rss_r"] == pytest.approx(fr.ssr, rel=1e-8)
    assert ours["rss_u"] == pytest.approx(fu.ssr, rel=1e-8)
    f_sm = fu.compare_f_test(fr)
    assert ours["F"] == pytest.approx(f_sm[0], rel=1e-8)
    assert ours["p_value"] == pytest.approx(f_sm[1], rel=1e-8)
    assert ours["df_num"] == p and ours["df_denom"] == 40 - p - (1 + 1 + 2 * p)


def test_known_direction_and_lag_selection():
    fwd_p, rev_p = [], []
    for seed in range(20):
        x, y = ar_pair(200, seed=seed)
        fwd = granger_test(y, x, max_lag=3)
        assert fwd["delta_r2"] > 0.2 and fwd["delta_aic"] > 0
        fwd_p.append(fwd["p_value"])
        rev_p.append(granger_test(x, y, max_lag=3)["p_value"])
    assert max(fwd_p) < 1e-10
    assert np.mean(np.array(rev_p) < 0.05) <= 0.2  # y -> x is false: near-nominal rejections
    assert np.median(rev_p) > 0.2
    # y depends on x_{t-2} only: AIC never picks p = 1 and mostly picks 2 (it may overfit to 3)
    for sample in ("per_lag", "common"):
        orders = [
            granger_test(y2, x2, max_lag=3, aic_sample=sample)["lag_order"]
            for x2, y2 in (ar_pair(200, seed=s, lag=2) for s in range(10))
        ]
        assert min(orders) == 2 and orders.count(2) >= 6, (sample, orders)
    x2, y2 = ar_pair(200, seed=2, lag=2)
    per, com = (granger_test(y2, x2, max_lag=3, aic_sample=a) for a in ("per_lag", "common"))
    assert com["selected_by"] == "aic (common)"
    assert per["aic_by_lag"][2] == com["aic_by_lag"][2]  # same sample at p = max_lag
    assert per["aic_by_lag"][0] != com["aic_by_lag"][0]


def test_permutation_null_is_seeded_and_corrected():
    x, y = ar_pair(80, seed=3)
    a = granger_test(y, x, n_perm=199, seed=11)
    b = granger_test(y, x, n_perm=199, seed=11)
    assert a["p_perm"] == b["p_perm"] == pytest.approx(1 / 200)  # never 0
    r = granger_test(x, y, n_perm=199, seed=11)
    assert r["p_perm"] > 0.05


def test_residualize_matches_statsmodels():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((30, 2))
    x = 1 + z @ [0.5, -2.0] + rng.standard_normal(30)
    x[4] = np.nan
    got = residualize(x, z)
    ok = np.isfinite(x)
    ref = sm.OLS(x[ok], sm.add_constant(z[ok])).fit().resid
    np.testing.assert_allclose(got[ok], ref, atol=1e-10)
    assert np.isnan(got[4])


def _planted_ds(seed=0):
    ds = make_results(groups=("all", "attn"), windows=(5, 8), n_deltas=60)
    rng = np.random.default_rng(seed)
    series = {}
    for r in ds.run.values:
        x, y = ar_pair(60, seed=int(rng.integers(1000)))
        z = rng.standard_normal(60)
        series[r] = (x, y, z)
    d = with_series(ds, "edge_ratio", lambda k, s: 2 + 0.1 * series[k["run"]][0])
    d = with_series(d, "val_loss", lambda k, s: 3 + series[k["run"]][1])
    d = with_series(d, "k95", lambda k, s: 4 + series[k["run"]][2])
    return d


def test_granger_on_dataset_both_directions_with_nans_and_groups():
    d = _planted_ds()
    out = granger(d, n_perm=99)
    assert out.F.dims == ("run", "window", "group", "direction")
    assert (out.p_value.sel(direction="forward") < 1e-4).all()
    assert (out.p_value.sel(direction="reverse") > 0.01).all()
    assert (out.p_perm.sel(direction="forward") <= 0.02).all()
    # s3 lacks a checkpoint and all runs miss one val_loss eval: rows using them are dropped
    n = out.n_obs.sel(direction="forward", group="all")
    assert int(n.sel(run="s3", window=5)) < int(n.sel(run="s1", window=5))
    drop = granger(d, n_perm=0, gaps="drop", direction="forward")
    assert (drop.n_obs.sel(run="s1") > out.n_obs.sel(run="s1", direction="forward")).all()
    assert out.attrs["direction_meaning"].startswith("forward: edge_ratio -> val_loss")


def test_residualised_and_covariate_variants():
    d = _planted_ds()
    # the feature is the nuisance plus noise: residualising on it removes the causal part
    d = d.assign(drift_speed=d.edge_ratio + 0.0 * d.k95)
    d["edge_ratio"] = d.drift_speed + 1e-3 * d.k95
    plain = granger(d, n_perm=0, direction="forward", window=5, group="all")
    res = granger(d, n_perm=0, direction="forward", nuisance="drift_speed", window=5, group="all")
    assert (plain.p_value < 1e-4).all()
    assert (res.p_value > 1e-3).all()
    trend = granger(d, n_perm=0, direction="forward", nuisance=["trend"], covariate="lr", window=5)
    assert (trend.p_value < 1e-3).all()
    assert trend.attrs["covariate"] == "lr" and trend.attrs["nuisance"] == "trend"


def test_multivariate():
    rng = np.random.default_rng(4)
    n = 120
    x1, x2 = rng.standard_normal(n), rng.standard_normal(n)
    y = np.zeros(n)
    for t in range(1, n):
        y[t] = 0.3 * y[t - 1] + 0.7 * x1[t - 1] + 0.7 * x2[t - 1] + 0.3 * rng.standard_normal()
    joint = granger_test(y, np.column_stack([x1, x2]), lag=1)
    single = granger_test(y, x1, lag=1)
    assert joint["df_num"] == 2 and joint["r2_u"] > single["r2_u"] + 0.2
    d = _planted_ds()
    out = granger_multivariate(d, ["edge_ratio", "k95"], n_perm=49)
    assert out.F.dims == ("run", "window", "group")
    assert (out.df_num == 2 * out.lag_order).all()
    assert (out.p_value < 1e-3).all() and (out.r2_u > out.r2_r).all()


def test_errors():
    d = _planted_ds()
    with pytest.raises(AnalysisError, match="val_loss not in dataset"):
        granger(d.drop_vars("val_loss"))
    with pytest.raises(AnalysisError, match="lr not in dataset"):
        granger(d.drop_vars("lr"), covariate="lr")
    short = make_results(runs=("a",), windows=(5,), n_deltas=12, lacking={})
    with pytest.raises(AnalysisError, match=r"'edge_ratio' \(run='a', W=5\).*at least 10 usable rows"):
        granger(short, n_perm=0)
    with pytest.raises(AnalysisError, match="direction"):
        granger(d, direction="sideways")


def test_fast_permutation_null_equals_full_refits():
    from sed_dask.analysis.granger import _fit, _perm_null

    x, y = ar_pair(50, seed=9)
    x[7] = np.nan  # holes move with the shift: restricted rows change
    cov = np.linspace(0, 1, 50)[:, None]
    fast = _perm_null(y, x, cov, 2, n_perm=40, rng=np.random.default_rng(1))
    rng = np.random.default_rng(1)
    slow = [_fit(y, np.roll(x, int(rng.integers(1, 50))), cov, 2, 2)["F"] for _ in range(40)]
    np.testing.assert_allclose(fast, slow, rtol=1e-10)
