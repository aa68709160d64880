"""Edge queries: signal rank, edge summary, matched-norm null (synthetic data, known answers)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from sed_dask.analysis import edge_null, edge_summary, null_distribution, signal_rank, window_statistic
from sed_dask.analysis.edge import null_gram
from sed_dask.errors import AnalysisError
from synthetic import make_results, with_series

FIG1A = np.array([198.58, 169.08, 122.47, 110.73, 106.22, 92.66, 78.30, 61.27, 44.58, 22.79])
P_TS = 163_150_848


@pytest.fixture(scope="module")
def ds():
    return make_results(groups=("all", "attn", "mlp"))


def test_signal_rank_matches_counter_with_smallest_tie(ds):
    rng = np.random.default_rng(1)

    def plant(key, steps):
        if key["run"] == "s2" and key["window"] == 5:      # exact tie 2 vs 3 -> 2
            return np.where(np.arange(steps.size) % 2 == 0, 3.0, 2.0)
        return rng.choice([1, 2, 2, 2, 3], size=steps.size).astype(float)

    d = with_series(ds, "k_star", plant)
    got = signal_rank(d)
    for r in d.run.values:
        for w in d.window.values:
            for g in d.group.values:
                v = d.k_star.sel(run=r, window=w, group=g).values
                v = v[np.isfinite(v)].astype(int)
                c = Counter(v.tolist())
                best = max(c.values())
                mode = min(k for k, n in c.items() if n == best)
                sel = got.sel(run=r, window=w, group=g)
                assert int(sel.k_mode) == mode
                assert int(sel.k_mode_count) == best
                assert int(sel.n_windows) == v.size
                assert float(sel.k_mode_freq) == pytest.approx(best / v.size)
    tie = got.sel(run="s2", window=5, group="all")
    assert int(tie.k_mode) == 2


def test_signal_rank_selects_by_role_and_rejects_non_integers(ds):
    assert signal_rank(ds, run="s1", window=8).sizes == {"run": 1, "window": 1, "group": 3}
    bad = with_series(ds, "k_star", lambda k, s: np.full(s.size, 2.5))
    with pytest.raises(AnalysisError, match="integer"):
        signal_rank(bad)


def test_edge_summary_against_manual(ds):
    out = edge_summary(ds, group="all")
    e = ds.edge_ratio.sel(run="s3", window=8, group="all")
    s, v = e.step.values[np.isfinite(e.values)], e.values[np.isfinite(e.values)]
    row = out.sel(run="s3", window=8, group="all")
    assert float(row.edge_max) == pytest.approx(v.max())
    assert int(row.edge_max_step) == s[np.argmax(v)]
    assert float(row.edge_median) == pytest.approx(np.median(v))
    mp = 1 + 2 * 8 ** (-2 / 3)
    assert float(row.mp_adjacent_ratio) == pytest.approx(mp)
    assert int(row.n_above_mp) == int(np.sum(v > mp))


def test_window_statistic_fig1a_restricted_rule():
    # sed_spec §3.2: restricted argmax gives k* = 2 (ratio 1.3806); the naive argmax picks the tail.
    assert window_statistic(FIG1A, n_params=P_TS) == pytest.approx(169.08 / 122.47)
    assert window_statistic(FIG1A, n_params=P_TS, statistic=9) == pytest.approx(44.58 / 22.79)
    pc2 = window_statistic(FIG1A, n_params=P_TS, statistic="pc2")
    assert pc2 == pytest.approx(100 * 169.08 ** 2 / np.sum(FIG1A ** 2))
    with pytest.raises(AnalysisError):
        window_statistic(FIG1A, n_params=P_TS, statistic=10)


def test_observed_statistic_equals_engine_edge_ratio(ds):
    out = edge_null(ds, n_null=19, window=5)
    ref = ds.edge_ratio.sel(window=[5])
    np.testing.assert_allclose(out.observed.transpose(*ref.dims).values, ref.values, rtol=1e-12)


def test_bartlett_null_matches_brute_force_random_directions():
    rng = np.random.default_rng(0)
    P, W, B = 12, 4, 4000
    norms = np.array([3.0, 2.0, 1.5, 1.0])
    G = null_gram(norms, n_params=P, n_null=B, rng=rng)
    Z = rng.standard_normal((B, W, P))
    Z /= np.linalg.norm(Z, axis=-1, keepdims=True)
    Z *= norms[:, None]
    Gb = Z @ np.swapaxes(Z, 1, 2)
    np.testing.assert_allclose(np.einsum("bii->bi", G), np.tile(norms ** 2, (B, 1)))
    for i, j in [(0, 1), (1, 3)]:
        assert stats.ks_2samp(G[:, i, j], Gb[:, i, j]).pvalue > 1e-3
    lam = lambda g: np.sqrt(np.clip(np.linalg.eigvalsh(g)[..., ::-1], 0, None))  # noqa: E731
    a = window_statistic(lam(G), n_params=P)
    b = window_statistic(lam(Gb), n_params=P)
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    # large P: off-diagonal cosines ~ N(0, 1/P) (the spec's approximation)
    C = null_gram(np.ones(3), n_params=10**6, n_null=3000, rng=rng)
    assert np.std(C[:, 0, 1]) * 1e3 == pytest.approx(1.0, rel=0.06)


def test_edge_null_separates_signal_from_noise():
    d = make_results(runs=("sig", "noise"), noise_runs=("noise",), windows=(6,), n_deltas=60,
                     lacking={})
    out = edge_null(d, n_null=199, seed=3)
    assert float(out.frac_significant.sel(run="sig", window=6)) > 0.9
    noise = out.sel(run="noise", window=6)
    assert float(noise.frac_significant) < 0.2
    p = noise.p_value.values[np.isfinite(noise.p_value.values)]
    assert 0.3 < p.mean() < 0.7                     # calibrated: roughly uniform under the null
    assert np.nanmin(out.p_value.values) >= 1 / 200  # +1 correction: never 0
    again = edge_null(d, n_null=199, seed=3)
    xr.testing.assert_identical(out, again)


def test_edge_null_groups_use_param_count_and_missing_inputs(ds):
    out = edge_null(ds, n_null=49, run="s1", window=5)
    assert set(out.frac_significant.dims) == {"run", "window", "group"}
    assert (out.frac_significant > 0.8).all()
    eq = edge_null(ds.drop_vars("delta_norm"), norms="equal", n_null=49, run="s1", window=5)
    assert np.isfinite(eq.p_value).sum() == np.isfinite(out.p_value).sum()
    with pytest.raises(AnalysisError, match="delta_norm not in dataset"):
        edge_null(ds.drop_vars("delta_norm"), n_null=9)
    with pytest.raises(AnalysisError, match="parameter count P unknown.*group='attn'"):
        edge_null(ds.drop_vars("param_count"), n_null=9, run="s1", window=5)
    # without groups, P comes from the n_params attr
    flat = make_results(runs=("a",), windows=(5,), n_deltas=12, lacking={})
    assert json.loads(flat.attrs["n_params"]) == {"a": 300}
    assert edge_null(flat, n_null=9).n_windows.item() == 8


def test_null_distribution_needs_p_at_least_w():
    with pytest.raises(AnalysisError, match="P >= W"):
        null_distribution(np.ones(5), n_params=3, n_null=5)
