"""Window features from a band against direct computations on explicit deltas (docs/method.md §3-4)."""

from __future__ import annotations

import numpy as np
import pytest
from sed_oracle import band_of, deltas, planted, random_walk, stack_with_spectrum, window_svds

from sed_dask.engine.noise import bbp_ratio, mp_adjacent_ratio, mp_edge
from sed_dask.engine.windows import normalise_spacing, window_features

FIG1A = [198.58, 169.08, 122.47, 110.73, 106.22, 92.66, 78.30, 61.27, 44.58, 22.79]
P_TS = 163_150_848


def _direct(D, W, P):
    """Every feature by its textbook definition, from explicit vectors (v1, mean delta)."""
    rows = []
    prev_v1 = None
    for k, s, v1 in window_svds(D, W):
        X = D[k - W + 1 : k + 1]
        lam = s**2
        mean = X.mean(axis=0)
        drift = np.linalg.norm(mean)
        a = float(mean @ v1)
        last = X[-1]
        nbar = lam[W // 2 :].mean()
        rho = s[:-1] / s[1:]
        nf = np.sqrt(nbar * (1 + np.sqrt(W / P)) ** 2)
        cand = [j for j in range(W - 1) if s[j] >= nf] or list(range(W // 2))  # numerator rule
        cum = np.cumsum(lam) / lam.sum()
        rows.append(
            dict(
                sigma=s,
                ratio=rho,
                pc_frac=lam / lam.sum(),
                k95=float(next(i for i, c in enumerate(cum) if c >= 0.95) + 1),
                k_star=float(max(cand, key=lambda j: (rho[j], -j)) + 1),
                k_star_naive=float(int(np.argmax(rho)) + 1),
                k_star_weighted=float(int(np.argmax(s[:-1] / s.sum() * rho)) + 1),
                drift_speed=drift,
                a_speed=abs(a),
                r_speed=np.linalg.norm(mean - a * v1),
                align_u=abs(last @ v1) / np.linalg.norm(last),
                gamma=np.nan if prev_v1 is None else min(1.0, abs(v1 @ prev_v1)),
                noise_floor=nf,
                bbp_ratio=s[-1] / (np.sqrt(nbar / P) * (P * (W - 1)) ** 0.25),
            )
        )
        prev_v1 = v1
    return rows


@pytest.mark.parametrize("maker,W", [(random_walk, 4), (planted, 6), (planted, 10)])
def test_features_match_direct_computation(maker, W):
    rng = np.random.default_rng(W)
    X = maker(rng, 18, 900)
    D = deltas(X)
    band = band_of(D, W + 1)
    f = window_features(band, W, n_params=900)
    ref = _direct(D, W, 900)
    assert f["sigma"].shape == (len(ref), W)
    for t, r in enumerate(ref):
        # a Gram resolves lambda to ~eps * lambda_1, so small values get absolute, not relative, accuracy
        for name in ("sigma", "drift_speed", "a_speed", "noise_floor", "bbp_ratio"):
            np.testing.assert_allclose(f[name][t], r[name], rtol=1e-8, err_msg=f"{name} window {t}")
        np.testing.assert_allclose(f["pc_frac"][t], r["pc_frac"], rtol=0, atol=1e-13)
        np.testing.assert_allclose(f["ratio"][t], r["ratio"], rtol=1e-8)
        for name in ("align_u", "gamma"):
            np.testing.assert_allclose(f[name][t], r[name], rtol=1e-7, atol=1e-9, err_msg=f"{name} window {t}")
        np.testing.assert_allclose(f["r_speed"][t], r["r_speed"], rtol=1e-6, atol=1e-9 * r["drift_speed"])
        for name in ("k95", "k_star", "k_star_naive", "k_star_weighted"):
            assert f[name][t] == r[name], (name, t)
        k = int(f["k_star"][t]) - 1
        assert f["edge_ratio"][t] == pytest.approx(r["sigma"][k] / r["sigma"][k + 1], rel=1e-8)
        assert f["edge_gap"][t] == pytest.approx(r["sigma"][k] - r["sigma"][k + 1], rel=1e-8)
    np.testing.assert_allclose(f["kappa"][1:], 1 - f["gamma"][1:])
    assert np.isnan(f["gamma"][0])
    # a band exactly W wide has no cross-window entries: gamma is NaN, everything else unchanged
    g = window_features(band[:, :W], W, n_params=900)
    assert np.isnan(g["gamma"]).all()
    np.testing.assert_array_equal(g["sigma"], f["sigma"])


def test_fig1a_spectrum_k_star_variants_and_noise_floor():
    """docs/method.md §3.2 / §4.1-4.2: restricted k* = 2 with the MP edge 64.8, naive argmax = 9."""
    D = stack_with_spectrum(FIG1A, 64, np.random.default_rng(0))
    f = window_features(band_of(D, 10), 10, n_params=P_TS)
    np.testing.assert_allclose(f["sigma"][0], FIG1A, rtol=1e-12)
    assert f["k_star"][0] == 2
    assert f["k_star_naive"][0] == 9
    assert f["k_star_weighted"][0] == 2  # 169.08^2/122.47 = 233.4 > 198.58^2/169.08 = 233.2
    assert f["noise_floor"][0] == pytest.approx(64.789, abs=5e-3)  # §4.2
    assert f["bbp_ratio"][0] == pytest.approx(22.96, abs=5e-3)  # §4.1
    assert f["edge_ratio"][0] == pytest.approx(169.08 / 122.47, rel=1e-10)
    np.testing.assert_allclose(
        f["ratio"][0], [1.1745, 1.3806, 1.1060, 1.0425, 1.1463, 1.1834, 1.2780, 1.3744, 1.9561], atol=5e-5
    )


def test_noise_helpers():
    lam = np.array(FIG1A) ** 2
    assert lam[5:].mean() == pytest.approx(4195.51, abs=0.01)
    assert mp_edge(lam, P_TS) ** 2 == pytest.approx(4197.59, abs=0.01)
    assert bbp_ratio(lam, P_TS) == pytest.approx(22.96, abs=5e-3)
    np.testing.assert_allclose(
        mp_adjacent_ratio([10, 15, 20, 25, 30]), [1.4309, 1.3288, 1.2714, 1.2339, 1.2071], atol=5e-5
    )


@pytest.mark.parametrize(
    "spectrum,P,expect",
    [
        # the signal->noise boundary sigma_2/sigma_3 = 5: its numerator is above the floor (2), its denominator
        # below; round 1's denominator rule could not pick it and said k* = 1 (issue 12)
        ([10, 5, 1, 1, 1, 1], 6, (2, 2, 2)),
        ([3, 2.9, 2.8, 2.7], 4, (2, 3, 1)),  # nothing above the floor (5.5): fallback to k <= W/2
        ([8, 4, 2.1, 1.9, 1.8], 10**9, (1, 1, 1)),
        ([9, 8.5, 3, 1, 0.25, 0.2], 10**9, (4, 4, 2)),  # sigma_4 = 1 >= floor 0.61: rho_4 = 4 is a candidate
    ],
)
def test_k_star_on_hand_made_spectra(spectrum, P, expect):
    D = stack_with_spectrum(spectrum, 40, np.random.default_rng(1))
    f = window_features(band_of(D, len(spectrum)), len(spectrum), n_params=P)
    assert (f["k_star"][0], f["k_star_naive"][0], f["k_star_weighted"][0]) == expect


def test_k95_hand_made():
    D = stack_with_spectrum(np.sqrt([60, 30, 6, 3, 1]), 30, np.random.default_rng(2))
    f = window_features(band_of(D, 5), 5, n_params=30)
    assert f["k95"][0] == 3
    np.testing.assert_allclose(f["pc_frac"][0], [0.6, 0.3, 0.06, 0.03, 0.01], rtol=1e-12)


def test_degenerate_windows_are_kept_with_nan():
    rng = np.random.default_rng(3)
    D = rng.standard_normal((9, 50))
    D[3:6] = 0.0  # window of three zero deltas
    D[8] = 0.0  # a zero last delta
    f = window_features(band_of(D, 4), 3, n_params=50)
    assert f["sigma"].shape == (7, 3)  # no window dropped
    z = 3  # window ending at delta 5: all zero
    np.testing.assert_array_equal(f["sigma"][z], 0.0)
    for name in (
        "k_star",
        "k_star_naive",
        "k_star_weighted",
        "edge_ratio",
        "k95",
        "noise_floor",
        "bbp_ratio",
        "align_u",
        "gamma",
    ):
        assert np.isnan(f[name][z]), name
    assert np.isnan(f["ratio"][z]).all() and np.isnan(f["pc_frac"][z]).all()
    assert f["drift_speed"][z] == 0 and f["a_speed"][z] == 0 and f["r_speed"][z] == 0
    assert np.isnan(f["gamma"][z + 1])  # the previous window has no v1
    # windows containing one non-zero delta: rank 1, the other sigmas are (numerically) zero
    r1 = 2  # deltas 2, 3, 4
    assert np.isnan(f["ratio"][r1]).all()  # sigma_2 <= 1e-7 sigma_1 counts as 0
    assert f["sigma"][r1][0] == pytest.approx(np.linalg.norm(D[2]), rel=1e-12)
    assert np.isnan(f["align_u"][6])  # last delta zero: undefined, not 0
    assert np.isfinite(f["sigma"]).all()


def test_window_longer_than_deltas_and_bad_w():
    band = band_of(np.random.default_rng(0).standard_normal((4, 10)), 5)
    with pytest.raises(ValueError, match="W=5 is longer than the 4 deltas"):
        window_features(band, 5, n_params=10)
    with pytest.raises(ValueError, match="W >= 2"):
        window_features(band, 1, n_params=10)
    f = window_features(band, 4, n_params=10)  # exactly one window
    assert f["sigma"].shape == (1, 4)


def test_normalise_spacing_equals_scaled_deltas():
    rng = np.random.default_rng(4)
    D = rng.standard_normal((7, 20))
    spans = np.array([199, 200, 200, 400, 200, 100, 200])
    np.testing.assert_allclose(normalise_spacing(band_of(D, 3), spans), band_of(D / spans[:, None], 3), rtol=1e-13)


def _split_half_oracle(D, W, *, tol=False):
    """|v_A^k . v_B^k| from numpy SVDs of the explicit halves of every window (rows: windows).

    ``tol=True`` also returns the absolute tolerance per entry: a Gram resolves the direction of a
    small sigma_k only to ~eps (sigma_1/sigma_k)^2 / gap, so noise-level k get a looser bound.
    """
    a, b = (W + 1) // 2, W // 2
    out, tols = [], []
    for k in range(W - 1, D.shape[0]):
        X = D[k - W + 1 : k + 1]
        _, sa, va = np.linalg.svd(X[:a], full_matrices=False)
        _, sb, vb = np.linalg.svd(X[a:], full_matrices=False)
        c = np.abs(np.sum(va[:b] * vb[:b], axis=1))
        ok = (sa[:b] > 1e-7 * sa[0]) & (sb[:b] > 1e-7 * sb[0]) if sa[0] > 0 and sb[0] > 0 else np.zeros(b, bool)
        out.append(np.where(ok, c, np.nan))
        with np.errstate(divide="ignore", invalid="ignore"):
            tols.append(1e-9 + 1e-12 * np.maximum(sa[0] / sa[:b], sb[0] / sb[:b]) ** 2)
    return (np.array(out), np.array(tols)) if tol else np.array(out)


@pytest.mark.parametrize("maker,W", [(random_walk, 2), (random_walk, 5), (planted, 6), (planted, 7), (planted, 10)])
def test_split_half_matches_svd_of_explicit_halves(maker, W):
    rng = np.random.default_rng(100 + W)
    D = deltas(maker(rng, 16, 700))
    got = window_features(band_of(D, W + 1), W, n_params=700)["split_half"]
    want, tol = _split_half_oracle(D, W, tol=True)
    assert got.shape == want.shape == (16 - W, W // 2)
    assert np.isfinite(want).all()
    assert np.all(np.abs(got - want) <= 1e-7 * want + tol), np.max(np.abs(got - want) / tol)
    if maker is planted:
        # a persistent rank-3 drift: the top directions of the two halves nearly coincide
        assert np.median(got[:, 0]) > 0.9


def test_split_half_planted_directions_and_degenerate_halves():
    rng = np.random.default_rng(7)
    P = 200
    Q = np.linalg.qr(rng.standard_normal((P, 6)))[0].T
    # W = 5: half A = deltas 0-2 spans (q0, q1) with strengths 3 > 1; half B = deltas 3-4 spans
    # (q0, q1') with q1' = (q1 + q2)/sqrt(2): cos_1 = 1, cos_2 = 1/sqrt(2)
    q1b = (Q[1] + Q[2]) / np.sqrt(2)
    A = np.array([[3, 0], [0, 1], [0, 0]], float) @ Q[:2]
    B = np.array([[3, 0], [0, 1]], float) @ np.stack([Q[0], q1b])
    D = np.concatenate([A, B])
    f = window_features(band_of(D, 5), 5, n_params=P)
    np.testing.assert_allclose(f["split_half"][0], [1.0, 1 / np.sqrt(2)], rtol=1e-12)
    # an all-zero half, a rank-1 half: NaN where that half's sigma_k is zero; the rest still defined
    D = rng.standard_normal((10, P))
    D[2:4] = 0.0  # W=4 window over deltas 2..5: half A all zero
    D[7] = 2.5 * D[6]  # window over 4..7: half B (6, 7) has rank 1
    f = window_features(band_of(D, 4), 4, n_params=P)
    sh = f["split_half"]  # rows = windows ending at 3..9
    assert sh.shape == (7, 2)
    assert np.isnan(sh[2]).all()  # ends at 5: half A = deltas 2, 3 (zero)
    assert np.isnan(sh[0]).all()  # ends at 3: half B = deltas 2, 3 (zero)
    assert np.isfinite(sh[4, 0]) and np.isnan(sh[4, 1])  # ends at 7: half B rank 1
    np.testing.assert_allclose(sh, _split_half_oracle(D, 4), rtol=1e-7, atol=1e-9)
    # all-zero window: everything NaN, nothing raised
    z = window_features(band_of(np.zeros((6, 20)), 5), 5, n_params=20)["split_half"]
    assert z.shape == (2, 2) and np.isnan(z).all()
