"""Edge queries: signal rank, edge summary, matched-norm null (synthetic data, known answers)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import xarray as xr
from scipy import stats
from synthetic import make_results, with_series

from sed_dask.analysis import edge_null, edge_summary, null_distribution, pc2_summary, signal_rank, window_statistic
from sed_dask.analysis.edge import null_gram
from sed_dask.errors import AnalysisError

FIG1A = np.array([198.58, 169.08, 122.47, 110.73, 106.22, 92.66, 78.30, 61.27, 44.58, 22.79])
P_TS = 163_150_848


@pytest.fixture(scope="module")
def ds():
    return make_results(groups=("all", "attn", "mlp"))


def test_signal_rank_matches_counter_with_smallest_tie(ds):
    rng = np.random.default_rng(1)

    def plant(key, steps):
        if key["run"] == "s2" and key["window"] == 5:  # exact tie 2 vs 3 -> 2
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
    # docs/method.md §3.2: restricted argmax gives k* = 2 (ratio 1.3806); the naive argmax picks the tail.
    assert window_statistic(FIG1A, n_params=P_TS) == pytest.approx(169.08 / 122.47)
    assert window_statistic(FIG1A, n_params=P_TS, statistic=9) == pytest.approx(44.58 / 22.79)
    pc2 = window_statistic(FIG1A, n_params=P_TS, statistic="pc2")
    assert pc2 == pytest.approx(100 * 169.08**2 / np.sum(FIG1A**2))
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
    np.testing.assert_allclose(np.einsum("bii->bi", G), np.tile(norms**2, (B, 1)))
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
    d = make_results(runs=("sig", "noise"), noise_runs=("noise",), windows=(6,), n_deltas=60, lacking={})
    out = edge_null(d, n_null=199, seed=3)
    assert float(out.frac_significant.sel(run="sig", window=6)) > 0.9
    noise = out.sel(run="noise", window=6)
    assert float(noise.frac_significant) < 0.2
    p = noise.p_value.values[np.isfinite(noise.p_value.values)]
    assert 0.3 < p.mean() < 0.7  # calibrated: roughly uniform under the null
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


# ------------------------------------------------------------------------------ PC2 noise transition
STRONG = np.array([3.0, 2.5, 0.1, 0.1, 0.1])  # pc2 = 100 * 6.25 / 15.28 ~ 41%: far above the null
WEAK = np.array([3.0, 0.1, 0.1, 0.1, 0.1])  # pc2 ~ 0.11%: far below it
# equal-norm null, P = 1e6, W = 5: null Gram ~ ||d||^2 (I + O(1e-3)), so null pc2 ~ 20% for every window


def _pc2_ds(pattern, *, P=10**6, split=None):
    """One run, W=5: NaN for the first 4 steps (no window), then a window per letter of ``pattern``
    (S = STRONG, w = WEAK, . = degenerate all-NaN window)."""
    W = 5
    n = W - 1 + len(pattern)
    sig = np.full((1, 1, n, W), np.nan)
    for i, c in enumerate(pattern):
        if c != ".":
            sig[0, 0, W - 1 + i] = STRONG if c == "S" else WEAK
    steps = 100 * np.arange(1, n + 1)
    ds = xr.Dataset(
        {"sigma": (("run", "window", "step", "sv"), sig)},
        coords={"run": ["r"], "window": [W], "step": steps, "sv": np.arange(1, W + 1)},
        attrs={"n_params": json.dumps({"r": P})},
    )
    if split is not None:
        sh = np.full((1, 1, n, W), np.nan)
        sh[0, 0, W - 1 :, 1] = split
        sh[0, 0, W - 1 :, 0] = 0.99
        ds["split_half"] = (("run", "window", "step", "sv"), sh)
    return ds, steps


def test_pc2_summary_planted_transition_cv_and_split_half():
    pattern = "SSSwS.SSwwwS"
    split = np.array([0.9, 0.8, 0.7, 0.1, 0.6, 0.99, 0.5, 0.4, 0.2, np.nan, 0.2, 0.3])
    ds, steps = _pc2_ds(pattern, split=split)
    out = pc2_summary(ds, norms="equal", n_null=99).sel(run="r", window=5)
    win = steps[4:]  # steps of the windows, one per letter
    pc2 = {c: 100 * v[1] ** 2 / np.sum(v**2) for c, v in (("S", STRONG), ("w", WEAK))}
    obs = np.array([pc2[c] for c in pattern if c != "."])
    valid = np.array([c != "." for c in pattern])
    # default sustain 2: the first two consecutive windows not above the null after PC2 held above it
    assert float(out.noise_transition_step) == win[8] and int(out.transition_kind) == 1
    assert float(out.pc2_emerge_step) == win[0]
    assert pc2_summary(ds, norms="equal", n_null=99, sustain=1).noise_transition_step.item() == win[3]
    four = pc2_summary(ds, norms="equal", n_null=99, sustain=4)
    assert four.noise_transition_step.isnull().item() and int(four.transition_kind.item()) == 0  # never 4 above
    assert float(out.pc2_cv) == pytest.approx(np.std(obs) / np.mean(obs), rel=1e-12)  # ddof = 0
    assert pc2_summary(ds, norms="equal", n_null=99, ddof=1).pc2_cv.item() == pytest.approx(
        np.std(obs, ddof=1) / np.mean(obs), rel=1e-12
    )
    assert float(out.pc2_mean) == pytest.approx(obs.mean(), rel=1e-12)
    assert int(out.n_above_null) == pattern.count("S") and int(out.n_windows) == valid.sum()
    np.testing.assert_array_equal(out.pc2_above_null.values[4:], [c == "S" for c in pattern])
    assert not out.pc2_above_null.values[:4].any()
    # the degenerate window (.) is not a window: its split-half value (0.99) does not count
    assert float(out.split_half_k2_mean) == pytest.approx(np.nanmean(np.where(valid, split, np.nan)))
    np.testing.assert_allclose(out.split_half_k2.values[4:], np.where(valid, split, np.nan))
    # the null and its quantile are edge_null's (same seed, same draws)
    ref = edge_null(ds, statistic="pc2", norms="equal", n_null=99).sel(run="r", window=5)
    np.testing.assert_array_equal(out.null_pc2.values, ref.null_quantile.values)
    np.testing.assert_array_equal(out.pc2_pct.values, ref.observed.values)
    assert 19 < float(out.null_pc2_mean) < 22
    assert float(out.null_pc2_mean) == pytest.approx(np.nanmean(ref.null_quantile.values))
    assert out.attrs["ddof"] == 0 and "ddof=0" in out.pc2_cv.attrs["long_name"]


def test_pc2_transition_is_a_downward_crossing_never_the_first_window():
    # catches round 1's rule (first window not above the null): on real runs PC2 starts below its
    # null, so it returned the first window every time
    ds, steps = _pc2_ds("wwwSSSSwwww")
    out = pc2_summary(ds, norms="equal", n_null=99, split_half=None).sel(run="r", window=5)
    win = steps[4:]
    assert float(out.pc2_emerge_step) == win[3]
    assert float(out.noise_transition_step) == win[7] and int(out.transition_kind) == 1
    never, _ = _pc2_ds("wwwwwww")
    n = pc2_summary(never, norms="equal", n_null=99, split_half=None)
    assert n.noise_transition_step.isnull().all() and int(n.transition_kind.item()) == 0  # "no transition"


def test_pc2_summary_never_in_noise_groups_and_errors(ds):
    always, _ = _pc2_ds("SSSS")
    out = pc2_summary(always, norms="equal", n_null=19, split_half=None)
    assert out.noise_transition_step.isnull().all() and "split_half_k2_mean" not in out
    assert out.attrs["split_half_variable"] == ""
    with pytest.raises(AnalysisError, match="split_half not in dataset.*split_half=None"):
        pc2_summary(always, norms="equal", n_null=19)
    with pytest.raises(AnalysisError, match="sustain"):
        pc2_summary(always, norms="equal", sustain=0, split_half=None)
    with pytest.raises(AnalysisError, match="ddof"):
        pc2_summary(always, norms="equal", ddof=2, split_half=None)
    # a real multi-group Dataset with the matched-norm null: series dims kept, step along
    r = pc2_summary(ds, n_null=19, split_half=None, run=["s1", "s3"], window=8)
    assert r.noise_transition_step.dims == ("run", "window", "group")
    assert r.pc2_pct.dims == ("run", "window", "group", "step")
    assert (r.n_windows.sel(run="s1") == 33).all() and (r.n_windows.sel(run="s3") == 32).all()
    assert np.isfinite(r.pc2_cv).all()
