"""Every conclusion against planted truth (sed_dask.testing.PlantedTrajectory), through the engine's
own window code (planted_results) and, once, through real checkpoint files, ingest and spectrum.

Each test names the round-1 behaviour it catches; benchmarks/fidelity.py measures the same
estimators over a whole grid (benchmarks/README.md "Fidelity").
"""

from __future__ import annotations

import numpy as np
import pytest

from sed_dask import analysis as A
from sed_dask.testing import PlantedTrajectory, planted_results

TEXTBOOK = dict(
    n_deltas=40, n_params=20_000, rank=3, strengths=None, decay=4.0, snr=2.0, coefficients="fourier"
)  # strengths 4 : 2 : 1 (geometric 4x decay), s_r = 2 x noise edge


@pytest.mark.parametrize("W", [5, 10])
def test_textbook_rank3_k_star_and_count(W):
    # catches round 1's denominator rule (sigma_(k+1) >= floor): it never gave 3 on this trajectory
    t = PlantedTrajectory(**{**TEXTBOOK, "snr_window": W})
    ds = planted_results({"a": t}, windows=(W,))
    r = A.signal_rank(ds).sel(run="a", window=W)
    assert int(r.k_mode) == 3 and float(r.k_mode_freq) >= 0.95
    assert int(r.count_mode) == 3 and float(r.count_mode_freq) >= 0.9
    assert bool(r.agree) and A.rank_notes(A.signal_rank(ds)) == []
    # the same spectra under round 1's rule: the boundary sigma_3/sigma_4 was never a candidate
    from sed_dask.engine.windows import k_star_rules

    f = ds.sel(run="a", window=W)
    ok = np.isfinite(f.k_star.values)
    old = k_star_rules(f.sigma.values[ok][:, :W], floor=f.noise_floor.values[ok], n_signal=f.n_signal.values[ok])
    assert np.mean(old["denominator"] == 3) < 0.5


def test_strengths_8_4_2_with_noise_at_the_floor():
    # the case: three directions 8:4:2 over isotropic noise whose top value sits at the floor
    t = PlantedTrajectory(
        n_deltas=40, n_params=20_000, rank=3, strengths=(8.0, 4.0, 2.0), coefficients="fourier", snr_window=5, seed=3
    )
    unit = t.noise_edge(5) / np.sqrt(5)  # strength that puts a signal value at the noise edge
    t = PlantedTrajectory(
        n_deltas=40,
        n_params=20_000,
        rank=3,
        strengths=(8 * unit, 4 * unit, 2 * unit),
        coefficients="fourier",
        snr_window=5,
        seed=3,
    )
    ds = planted_results({"a": t}, windows=(5, 10))
    r = A.signal_rank(ds)
    assert (r.k_mode == 3).all()
    assert (r.count_mode == 3).all()


def test_count_recovers_rank_under_decay_where_k_star_may_not():
    # decaying strengths (4x): the largest gap can sit inside the signal; the count still finds r
    hits, total = 0, 0
    for seed in range(3):
        t = PlantedTrajectory(n_deltas=50, n_params=50_000, rank=4, decay=4.0, snr=3.5, snr_window=10, seed=seed)
        ds = planted_results({"a": t}, windows=(10,))
        ok = t.signal_sigma(10)[:, -1] >= 2 * t.noise_edge(10)
        ns = ds.n_signal.sel(run="a", window=10).values[9:]
        hits += int((ns[ok] == 4).sum())
        total += int(ok.sum())
    assert total > 50 and hits / total >= 0.95


def test_count_on_pure_noise_is_zero_mostly():
    t = PlantedTrajectory(n_deltas=60, n_params=20_000, rank=0, seed=5)
    ds = planted_results({"a": t}, windows=(10,))
    ns = ds.n_signal.sel(run="a", window=10).values[9:]
    assert np.mean(ns == 0) >= 0.95


def test_phases_recover_rise_collapse_and_rebound_within_half_W():
    # catches round 1: 'peak' segmentation around the global maximum (here in the rebound) and a
    # collapse at tau = 1.20 on the per-window edge_ratio; rebound shaded as more collapse
    W = 10
    t = PlantedTrajectory(
        n_deltas=120,
        n_params=20_000,
        rank=2,
        snr=3.0,
        snr_window=W,
        coefficients="fourier",
        rise_end=25,
        rise_level=0.05,
        collapse_at=60,
        rebound_at=90,
        seed=1,
    )
    ds = planted_results({"a": t}, windows=(W,))
    truth = t.truth()
    ph = A.phases(ds).sel(run="a", window=W)
    for name, true in (
        ("collapse_step", truth["collapse_step"]),
        ("rebound_step", truth["rebound_step"]),
        ("plateau_start_step", truth["rise_end_step"]),
    ):
        assert abs(float(ph[name]) - true) <= W / 2 * t.step_spacing, name
    assert int(ph.edge_k) == 2
    codes = ph.phase.values[np.isfinite(ph.phase.values)]
    assert set(np.unique(codes)) == {0.0, 1.0, 2.0, 3.0} and codes[-1] == 3.0  # the rebound is its own phase
    assert float(A.collapse_step(ds).collapse_step.sel(run="a", window=W)) == float(ph.collapse_step)
    # the newest-checkpoint label is late by ~W - k spacings; the centre label halves that
    newest = A.phases(ds, label="newest").sel(run="a", window=W)
    assert float(newest.collapse_step) - float(ph.collapse_step) == pytest.approx((W - 1) / 2 * t.step_spacing)


def test_collapse_uses_one_fixed_k():
    # catches the per-window edge_ratio switching k mid-collapse: the fixed-k edge keeps one ratio
    W = 10
    t = PlantedTrajectory(
        n_deltas=90, n_params=20_000, rank=2, snr=3.0, snr_window=W, rise_end=10, rise_level=0.1, collapse_at=55, seed=2
    )
    ds = planted_results({"a": t}, windows=(W,))
    e = A.resolve(ds, "edge").sel(run="a", window=W)
    k = int(e.edge_k)
    ratio_k = ds.ratio.sel(run="a", window=W, sv=k)
    np.testing.assert_array_equal(np.isnan(e.values), np.isnan(ratio_k.values))
    np.testing.assert_allclose(e.values[np.isfinite(e.values)], ratio_k.values[np.isfinite(e.values)])


def test_warning_fires_on_a_planted_collapse_and_is_causal():
    # catches round 1's `query warning` default (10x rise over the first 3 windows, floor 20): it could
    # never fire on a collapse
    W = 10
    t = PlantedTrajectory(
        n_deltas=100,
        n_params=20_000,
        rank=1,
        snr=3.0,
        snr_window=W,
        rise_end=20,
        rise_level=0.05,
        collapse_at=60,
        seed=4,
    )
    ds = planted_results({"a": t}, windows=(W,))
    ew = A.early_warning(ds, event=None).sel(run="a", window=W)
    c = t.truth()["collapse_step"]
    for d in ("below_noise", "peak_drop", "cusum"):
        step = float(ew.alarm_step.sel(detector=d))
        assert c - 2 * t.step_spacing <= step <= c + W * t.step_spacing, d
    # causal: truncating the trajectory after the alarm does not change it
    first = float(ew.first_alarm_step)
    cut = ds.sel(step=ds.step[ds.step <= first])
    assert float(A.early_warning(cut, event=None).first_alarm_step.sel(run="a", window=W)) == first
    old = A.onset(ds, "edge_ratio", k=10.0, baseline=3).onset_step.sel(run="a", window=W)
    assert np.isnan(float(old))  # the companion rule has nothing to say here


def test_no_alarm_on_a_strong_plateau_without_collapse():
    W = 20
    t = PlantedTrajectory(
        n_deltas=100, n_params=20_000, rank=1, snr=3.0, snr_window=W, rise_end=20, rise_level=0.05, seed=6
    )
    ew = A.early_warning(planted_results({"a": t}, windows=(W,)), event=None).sel(run="a", window=W)
    assert np.isnan(ew.alarm_step.sel(detector="below_noise")) and np.isnan(ew.alarm_step.sel(detector="peak_drop"))


def test_planted_shift_is_seen_by_the_direction_turning():
    # the signal moves to new directions at delta 45: kappa (turning of v1) spikes there
    W = 10
    t = PlantedTrajectory(n_deltas=90, n_params=20_000, rank=2, snr=3.0, snr_window=W, shift_at=45, seed=0)
    ds = planted_results({"a": t}, windows=(W,))
    r = A.detect_shift(ds, "kappa", methods="maxderiv", true_step=t.truth()["shift_step"]).sel(run="a", window=W)
    assert abs(float(r.error.sel(detector="maxderiv"))) <= W / 2 * t.step_spacing


def test_planted_rank_through_real_files_ingest_and_spectrum(tmp_path):
    # real torch checkpoints -> ingest -> spectrum -> query: the textbook case end to end
    import sed_dask

    t = PlantedTrajectory(**{**TEXTBOOK, "n_deltas": 24, "n_params": 6_000, "snr_window": 5})
    t.write_checkpoints(tmp_path / "ckpts")
    store = tmp_path / "traj.zarr"
    sed_dask.ingest(
        str(tmp_path / "ckpts"),
        str(store),
        "a",
        metrics=str(tmp_path / "ckpts" / "metrics.json"),
        scheduler="sync",
        progress=False,
    )
    ds = sed_dask.spectrum(str(store), windows=[5], scheduler="sync", progress=False)
    r = A.signal_rank(ds).sel(run="a", window=5)
    assert int(r.k_mode) == 3 and int(r.count_mode) == 3
    # the engine's sigma agrees with the planted float64 deltas up to the float32 checkpoint rounding
    f = planted_results({"a": t}, windows=(5,))
    np.testing.assert_allclose(
        ds.sigma.sel(run="a", window=5).values[4:], f.sigma.sel(run="a", window=5).values[4:], rtol=1e-4
    )
