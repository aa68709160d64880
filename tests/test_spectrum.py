"""``sed_dask.spectrum``: sigma vs numpy SVD of every window, the Dataset contract, errors, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from sed_oracle import deltas, planted, random_walk, stack_with_spectrum, window_svds

import sed_dask
from sed_dask.errors import StoreError
from sed_dask.results.spectra import SpacingWarning
from sed_dask.store.trajectory import ParamIndex, open_store, write_trajectory

FIG1A = [198.58, 169.08, 122.47, 110.73, 106.22, 92.66, 78.30, 61.27, 44.58, 22.79]

TENSORS = [
    ("transformer.wte.weight", (16, 8)),
    ("transformer.h.0.attn.c_attn.weight", (8, 24)),
    ("transformer.h.0.mlp.c_fc.weight", (8, 32)),
    ("transformer.h.1.attn.c_attn.weight", (8, 24)),
    ("transformer.h.1.mlp.c_fc.weight", (8, 32)),
    ("transformer.ln_f.weight", (8,)),
]


def _check_sigma(ds, run, X, steps_run, windows, *, group="all", cols=None, spans=None):
    """Every window's sigma equals numpy SVD of the explicit float64 delta stack (rtol 1e-8)."""
    D = deltas(X)
    if cols is not None:
        D = D[:, cols]
    if spans is not None:
        D = D / spans[:, None]
    steps = ds.step.values
    n_checked = 0
    for W in windows:
        sel = ds.sigma.sel(run=run, window=W)
        if "group" in sel.dims:
            sel = sel.sel(group=group)
        for k, s, _ in window_svds(D, W):
            got = sel.isel(step=int(np.searchsorted(steps, steps_run[k + 1]))).values
            big = s >= 1e-6 * s[0]
            np.testing.assert_allclose(got[:W][big], s[big], rtol=1e-8, err_msg=f"{run} W={W} end={k}")
            assert np.isnan(got[W:]).all()
            n_checked += 1
    assert n_checked


def _check_split_half(ds, run, X, steps_run, windows, *, group="all", cols=None):
    """split_half equals |v_A^k . v_B^k| of numpy SVDs of the explicit halves (docs/method.md §4.5)."""
    D = deltas(X)
    if cols is not None:
        D = D[:, cols]
    steps = ds.step.values
    for W in windows:
        sel = ds.split_half.sel(run=run, window=W)
        if "group" in sel.dims:
            sel = sel.sel(group=group)
        a, b = (W + 1) // 2, W // 2
        for k in range(W - 1, D.shape[0]):
            Xw = D[k - W + 1 : k + 1]
            _, sa, va = np.linalg.svd(Xw[:a], full_matrices=False)
            _, sb, vb = np.linalg.svd(Xw[a:], full_matrices=False)
            got = sel.isel(step=int(np.searchsorted(steps, steps_run[k + 1]))).values
            # a Gram resolves the direction of a small sigma_k only to ~eps (sigma_1/sigma_k)^2 / gap
            tol = 1e-9 + 1e-12 * np.maximum(sa[0] / sa[:b], sb[0] / sb[:b]) ** 2
            want = np.abs(np.sum(va[:b] * vb[:b], axis=1))
            assert np.all(np.abs(got[:b] - want) <= 1e-7 * want + tol), (run, W, k, got[:b], want)
            assert np.isnan(got[b:]).all()


SHAPES = [
    # maker, n checkpoints, P, chunk_bytes, shard_bytes, windows, tile_bytes, block_steps
    (random_walk, 26, 1301, 512, None, (3, 10, 15), 6000, 5),  # tiles < chunk, step halos
    (planted, 31, 2500, 1024, 4096, (5, 10, 15), None, None),  # one tile, sharded store
    (planted, 31, 2500, 1024, None, (2, 30), 20_000, 7),  # W = N: every window edge case
    (random_walk, 7, 333, 400, None, (4, 6), 2_000, 2),  # run shorter than W_max + 1
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0].__name__}-n{s[1]}-P{s[2]}" for s in SHAPES])
def test_sigma_matches_numpy_svd(tmp_path, shape):
    maker, n, P, cb, sb, windows, tb, bs = shape
    X = maker(np.random.default_rng(n + P), n, P)
    steps = np.arange(n) * 50
    write_trajectory(tmp_path / "s.zarr", "r", steps, X, chunk_bytes=cb, **({"shard_bytes": sb} if sb else {}))
    ds = sed_dask.spectrum(
        tmp_path / "s.zarr", windows=windows, tile_bytes=tb, block_steps=bs, scheduler="threads", progress=False
    )
    _check_sigma(ds, "r", X, steps, windows)
    _check_split_half(ds, "r", X, steps, windows)
    # windows that do not exist (fewer than W deltas before the step) are NaN, none are dropped
    for W in windows:
        k = ds.k_star.sel(run="r", window=W).values
        assert np.isnan(k[: W - 1]).all() and np.isfinite(k[W - 1 :]).all()


def test_planted_rank_and_fig1a_through_the_store(tmp_path):
    # rank 2 + isotropic noise: the signal/noise boundary is the largest ratio everywhere
    X = planted(np.random.default_rng(1), 41, 3000, rank=2, noise=1e-3)
    write_trajectory(tmp_path / "s.zarr", "r", np.arange(41), X)
    # the paper's Fig 1A spectrum as one W=10 window: restricted k* = 2, naive = 9 (docs/method.md §3.2)
    D = stack_with_spectrum(FIG1A, 2000, np.random.default_rng(2))
    X2 = np.concatenate([np.zeros((1, 2000)), np.cumsum(D, axis=0)])
    write_trajectory(tmp_path / "s.zarr", "fig1a", np.arange(0, 2200, 200), X2)
    ds = sed_dask.spectrum(tmp_path / "s.zarr", windows=(10,), scheduler="threads", progress=False)
    r = ds.sel(run="r", window=10).dropna("step", subset=["k_star"])
    assert r.sizes["step"] == 31
    assert (r.k_star_naive == 2).all() and (r.ratio.sel(sv=2) > 100).all()
    assert r.k_star.isin([1, 2]).all()  # k=2 only where sigma_3 clears the MP floor (small P)
    f = ds.sel(run="fig1a", window=10, step=2000)
    np.testing.assert_allclose(f.sigma.values, FIG1A, rtol=1e-5)  # float32 checkpoints
    assert int(f.k_star) == 2 and int(f.k_star_naive) == 9
    assert float(f.edge_ratio) == pytest.approx(169.08 / 122.47, rel=1e-5)


def test_multi_run_groups_metrics_and_zarr_roundtrip(tmp_path, client):
    idx = ParamIndex.from_tensors([(n, s, "float32") for n, s in TENSORS])
    P = idx.n_params
    rng = np.random.default_rng(2)
    runs = {"seed1": np.arange(0, 2200, 200), "seed2": np.array([1, 200, 400, 600, 800, 1000, 1300])}
    Xs = {}
    for name, st in runs.items():
        Xs[name] = random_walk(rng, st.size, P)
        metrics = {"val_loss": 3.0 - st / 1000.0, "lr": np.full(st.size, 1e-3)}
        write_trajectory(tmp_path / "s.zarr", name, st, Xs[name], index=idx, chunk_bytes=256, metrics=metrics)
    with pytest.warns(SpacingWarning, match="run 'seed2': uneven checkpoint spacing"):
        ds = sed_dask.spectrum(
            tmp_path / "s.zarr",
            windows=(3, 5),
            groups="blocks",
            client=client,
            output=tmp_path / "out.zarr",
            progress=False,
            tile_bytes=2048,
            block_steps=4,
        )
    # dims, coords and order per docs/result_schema.md
    assert ds.sigma.dims == ("run", "window", "group", "step", "sv")
    assert ds.k_star.dims == ("run", "window", "group", "step")
    assert ds.val_loss.dims == ("run", "step") and ds.delta_span.dims == ("run", "step")
    assert list(ds.run.values) == ["seed1", "seed2"] and list(ds.window.values) == [3, 5]
    assert list(ds.group.values) == ["all", "embeddings", "block0", "block1", "final_norm"]
    assert list(ds.sv.values) == [1, 2, 3, 4, 5]
    union = np.union1d(runs["seed1"][1:], runs["seed2"][1:])
    np.testing.assert_array_equal(ds.step.values, union)
    assert ds.step.dtype == np.int64 and ds.window.dtype == np.int64
    np.testing.assert_allclose(ds.mp_adjacent_ratio.values, 1 + 2 * np.array([3.0, 5.0]) ** (-2 / 3))
    # metrics aligned by exact step; steps a run lacks are NaN; delta_span -1 there
    for name, st in runs.items():
        vl = ds.val_loss.sel(run=name)
        for s in union:
            want = 3.0 - s / 1000.0 if s in st else np.nan
            np.testing.assert_equal(float(vl.sel(step=s)), want)
            span = int(ds.delta_span.sel(run=name, step=s))
            assert span == (int(st[np.searchsorted(st, s)] - st[np.searchsorted(st, s) - 1]) if s in st else -1)
    assert float(ds.lr.sel(run="seed1", step=200)) == 1e-3
    # per-group sigma against the group's own columns
    for name in runs:
        _check_sigma(ds, name, Xs[name], runs[name], (3, 5))
        for g, tensors in {
            "block1": ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"],
            "embeddings": ["transformer.wte.weight"],
        }.items():
            cols = np.concatenate([np.arange(idx[t].offset, idx[t].offset + idx[t].size) for t in tensors])
            _check_sigma(ds, name, Xs[name], runs[name], (3, 5), group=g, cols=cols)
            _check_split_half(ds, name, Xs[name], runs[name], (3, 5), group=g, cols=cols)
            dn = ds.delta_norm.sel(run=name, group=g, step=runs[name][1:]).values
            np.testing.assert_allclose(dn, np.linalg.norm(deltas(Xs[name])[:, cols], axis=1), rtol=1e-12)
    assert ds.delta_norm.dims == ("run", "group", "step") and ds.delta_norm.attrs["sed_role"] == "delta_norm"
    assert np.isnan(ds.delta_norm.sel(run="seed2", step=1200)).all()
    assert int(ds.param_count.sel(run="seed1", group="block0")) == 8 * 24 + 8 * 32
    # attrs: CF-like per variable, JSON-safe provenance
    for v in ds.data_vars:
        assert "long_name" in ds[v].attrs and "units" in ds[v].attrs
    assert ds.ratio.attrs["units"] == "1" and ds.k_star.attrs["sed_role"] == "signal_rank"
    assert ds.sigma.attrs["sed_role"] == "singular_values" and ds.val_loss.attrs["sed_role"] == "metric"
    assert ds.split_half.dims == ds.sigma.dims and ds.split_half.attrs["sed_role"] == "split_half_stability"
    assert ds.split_half.attrs["units"] == "1"
    a = ds.attrs
    assert a["windows"] == [3, 5] and a["runs"] == ["seed1", "seed2"] and a["step_normalised"] == 0
    assert json.loads(a["n_params"]) == {"seed1": P, "seed2": P}
    assert json.loads(a["param_index_hash"])["seed1"] == idx.hash
    assert json.loads(a["selection_policy"])["seed2"] == {"name": "array"}
    assert set(json.loads(a["groups"])) == set(ds.group.values)
    assert a["precision"] == "float64" and a["sed_dask_version"] == sed_dask.__version__ and a["created"]
    json.dumps(dict(a))
    # plain xr.open_zarr returns the same Dataset
    back = xr.open_zarr(tmp_path / "out.zarr")
    xr.testing.assert_identical(back.load(), ds)
    # the same request on the threaded scheduler gives bit-identical values
    with pytest.warns(SpacingWarning):
        ds2 = sed_dask.spectrum(
            tmp_path / "s.zarr",
            windows=(3, 5),
            groups="blocks",
            scheduler="threads",
            progress=False,
            tile_bytes=2048,
            block_steps=4,
        )
    for v in ds.data_vars:
        np.testing.assert_array_equal(ds[v].values, ds2[v].values, err_msg=v)


def test_spacing_normalisation_and_warning(tmp_path):
    X = random_walk(np.random.default_rng(3), 12, 400)
    uneven = np.array([1, 200, 400, 600, 800, 1000, 1200, 1600, 1800, 2000, 2100, 2200])
    write_trajectory(tmp_path / "s.zarr", "u", uneven, X)
    write_trajectory(tmp_path / "s.zarr", "e", np.arange(12) * 100, X)
    with pytest.warns(SpacingWarning, match=r"run 'u'.*\[100, 199, 200, 400\].*NOT normalised"):
        raw = sed_dask.spectrum(tmp_path / "s.zarr", runs="u", windows=(4,), scheduler="sync", progress=False)
    with pytest.warns(SpacingWarning, match=r"run 'u'.*divided by their step spans"):
        ds = sed_dask.spectrum(
            tmp_path / "s.zarr", runs=["u"], windows=(4,), scheduler="sync", progress=False, normalize_spacing=True
        )
    _check_sigma(ds, "u", X, uneven, (4,), spans=np.diff(uneven).astype(float))
    assert ds.attrs["step_normalised"] == 1 and ds.sigma.attrs["units"] == "parameter units per training step"
    np.testing.assert_allclose(
        ds.delta_norm.sel(run="u", step=uneven[1:]).values,
        np.linalg.norm(deltas(X), axis=1) / np.diff(uneven),
        rtol=1e-12,
    )
    assert not np.allclose(raw.sigma.values, ds.sigma.values, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpacingWarning)
        sed_dask.spectrum(tmp_path / "s.zarr", runs="e", windows=(4,), scheduler="sync", progress=False)


def test_errors_name_run_window_and_group(tmp_path):
    X = random_walk(np.random.default_rng(4), 6, 100)
    store = tmp_path / "s.zarr"
    write_trajectory(store, "short", np.arange(6), X)
    write_trajectory(store, "long", np.arange(12), random_walk(np.random.default_rng(5), 12, 100))
    kw = dict(scheduler="sync", progress=False)
    with pytest.raises(StoreError, match=r"run 'short' has only 5 deltas \(6 checkpoints\); window\(s\) W=\[10\]"):
        sed_dask.spectrum(store, windows=(3, 10), **kw)
    ok = sed_dask.spectrum(store, runs="long", windows=(3, 10), **kw)
    assert list(ok.run.values) == ["long"]
    with pytest.raises(StoreError, match=r"unknown run 'seed9'.*runs present: \['long', 'short'\]"):
        sed_dask.spectrum(store, runs=["long", "seed9"], **kw)
    with pytest.raises(StoreError, match=r"run 'long': group\(s\) \['attn'\] match no parameter"):
        sed_dask.spectrum(store, runs="long", windows=(3,), groups={"attn": "attn"}, **kw)
    with pytest.raises(StoreError, match=r"run 'long': unknown group\(s\) \['block3'\]"):
        sed_dask.spectrum(store, runs="long", windows=(3,), groups=["block3"], **kw)
    with pytest.raises(ValueError, match="W must be an integer >= 2"):
        sed_dask.spectrum(store, windows=(1, 3), **kw)
    open_store(tmp_path / "empty.zarr")
    with pytest.raises(StoreError, match="holds no runs|no runs"):
        sed_dask.spectrum(tmp_path / "empty.zarr", **kw)
    with pytest.raises(StoreError, match="no trajectory store"):
        sed_dask.spectrum(tmp_path / "missing.zarr", **kw)
    rs = open_store(store).run("long")
    rs.params[7, 5] = np.inf
    with pytest.raises(StoreError, match=r"run 'long': NaN/Inf in the store at step\(s\) \[7\]"):
        sed_dask.spectrum(store, runs="long", windows=(3,), **kw)
    rs.allocate([12])
    with pytest.raises(StoreError, match=r"run 'long': ingestion is incomplete for steps \[12\]"):
        sed_dask.spectrum(store, runs="long", windows=(3,), **kw)


def test_cli_spectrum(tmp_path, local_cluster, capsys):
    from sed_dask.cli import main

    idx = ParamIndex.from_tensors([(n, s, "float32") for n, s in TENSORS])
    X = random_walk(np.random.default_rng(6), 9, idx.n_params)
    write_trajectory(tmp_path / "s.zarr", "a", np.arange(9) * 10, X, index=idx, metrics={"val_loss": np.arange(9.0)})
    out = tmp_path / "res.zarr"
    rc = main(
        [
            "spectrum",
            str(tmp_path / "s.zarr"),
            "--windows",
            "3,4",
            "--groups",
            "emb=wte,attn=attn",
            "-o",
            str(out),
            "--scheduler-address",
            local_cluster.scheduler_address,
        ]
    )
    assert rc == 0, capsys.readouterr()
    assert "wrote" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    assert list(ds.group.values) == ["all", "emb", "attn", "other"]
    assert list(ds.window.values) == [3, 4]
    _check_sigma(ds.load(), "a", X, np.arange(9) * 10, (3, 4))
    rc = main(
        [
            "spectrum",
            str(tmp_path / "s.zarr"),
            "--windows",
            "20",
            "-o",
            str(out),
            "--overwrite",
            "--threads",
            "--no-progress",
        ]
    )
    assert rc == 2 and "has only 8 deltas" in capsys.readouterr().err
    rc = main(["spectrum", str(tmp_path / "s.zarr"), "--runs", "b", "-o", str(out), "--overwrite", "--threads"])
    assert rc == 2 and "unknown run 'b'" in capsys.readouterr().err
