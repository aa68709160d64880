"""JL sketches: operator statistics, bit-exact chunking invariance, sketch spectra, JL error report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import dask
import numpy as np
import pytest
import xarray as xr
from scipy import stats
from sed_oracle import window_svds
from synthetic import make_deltas

import sed_dask
from sed_dask.engine.jl import Operator
from sed_dask.engine.sketch import (
    ROW_BLOCK,
    SketchAccumulator,
    merge_nodes,
    reduce_nodes,
    root_key,
    sketch,
    tile_product,
)
from sed_dask.results.sketch_spectra import jl_error_report, jl_table, sketch_band, spectra_from_sketch
from sed_dask.results.spectra import spectrum
from sed_dask.store.trajectory import write_trajectory

N_CKPT, P, T, D = 40, 5003, 1000, 24  # P odd, T divides neither P nor any store chunk below


def _trajectory(seed=0, n=N_CKPT, p=P):
    deltas = make_deltas(n - 1, p, rank=2, signal=(6.0, 3.0), bulk=6, noise=0.3, rng=seed)
    theta0 = np.random.default_rng(seed + 100).standard_normal(p)
    return np.vstack([theta0, theta0 + np.cumsum(deltas, axis=0)]).astype(np.float32)


def _deltas(X):
    return np.diff(X, axis=0).astype(np.float64)  # float32 differences, as the engine forms them


@pytest.fixture(scope="module")
def traj():
    return _trajectory()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, traj):
    """The same run written with unrelated chunkings (333, 1024, 8192 float32 per chunk); the last
    one zstd-compressed, so it is read through zarr rather than the raw positioned reader."""
    root = tmp_path_factory.mktemp("sketch_stores")
    steps = 50 * np.arange(N_CKPT)
    metrics = {"val_loss": np.linspace(3.0, 1.0, N_CKPT)}
    out = []
    for chunk, comp in ((333, None), (1024, None), (8192, "zstd")):
        path = str(root / f"c{chunk}.zarr")
        write_trajectory(
            path,
            "seed0",
            steps,
            traj,
            metrics=metrics,
            chunk_bytes=4 * chunk,
            shard_bytes=4 * chunk * 3,
            compressor=comp,
        )
        out.append(path)
    return out


def _op(dist, d=D, p=P, tile=T, seed=7, s=None):
    return Operator(seed=seed, d=d, distribution=dist, tile_elems=tile, n_params=p, s=s)


# ----------------------------------------------------------------------------- operator
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "sparse"])
def test_phi_column_statistics(dist):
    d, p = 32, 40_000
    op = _op(dist, d=d, p=p, tile=4096, s=16.0 if dist == "sparse" else None)
    Phi = op.rows()
    assert Phi.shape == (p, d)
    se = math.sqrt(1.0 / d / p)  # standard error of a column mean
    assert np.abs(Phi.mean(axis=0)).max() < 5 * se
    var = Phi.var(axis=0)
    assert np.abs(var.mean() * d - 1.0) < 0.03  # E[Phi^2] = 1/d exactly by construction
    assert np.abs(var * d - 1.0).max() < 0.15
    C = Phi.T @ Phi  # columns nearly orthogonal, norms ~ p/d
    off = C[~np.eye(d, dtype=bool)]
    assert np.abs(off).max() < 6 * math.sqrt(p) / d
    if dist == "gaussian":
        assert stats.kstest(Phi.ravel() * math.sqrt(d), "norm").pvalue > 1e-3
    elif dist == "rademacher":
        assert set(np.unique(Phi * math.sqrt(d))) == {-1.0, 1.0}
    else:
        nz = Phi != 0
        assert abs(nz.mean() - 1 / 16) < 0.005
        assert np.allclose(np.abs(Phi[nz]), op.scale)
        assert abs((Phi[nz] > 0).mean() - 0.5) < 0.02


def test_phi_addressing_and_nesting():
    op = _op("gaussian", d=16, tile=999)
    full = op.rows()
    assert np.array_equal(op.rows(1234, 3456), full[1234:3456])  # tile-unaligned ranges
    wide = _op("gaussian", d=40, tile=999)
    assert np.array_equal(wide.tile_T(2)[:16], op.tile_T(2))  # columns do not depend on d
    assert not np.array_equal(_op("gaussian", d=16, tile=999, seed=8).tile_T(0), op.tile_T(0))
    assert not np.array_equal(op.tile_T(0), op.tile_T(1))  # tiles are keyed apart
    sp = _op("sparse", d=16, tile=999)
    assert sp.s == pytest.approx(math.sqrt(P))
    assert op.checksum() == _op("gaussian", d=16, tile=999).checksum() != sp.checksum()


def test_operator_validation():
    with pytest.raises(ValueError, match="seed"):
        _op("gaussian", seed=-1)
    with pytest.raises(ValueError, match="distribution"):
        _op("cauchy")
    with pytest.raises(ValueError, match="sparse"):
        _op("gaussian", s=3.0)
    with pytest.raises(ValueError, match="whole RNG tiles"):
        SketchAccumulator(0, 5, 100, 2000, _op("gaussian"))


# ----------------------------------------------------------------------------- kernel pieces
def test_tile_product_rows_do_not_depend_on_neighbours():
    rng = np.random.default_rng(1)
    Dm = rng.standard_normal((150, T)).astype(np.float32)
    phi = _op("gaussian").tile_dense(0)
    whole = tile_product(Dm, 37, phi)
    assert np.allclose(whole, Dm.astype(np.float64) @ phi.T, rtol=1e-12, atol=1e-12)
    for a, b in [(0, 1), (5, 70), (27, 91), (100, 150)]:  # any sub-range, any alignment to ROW_BLOCK
        assert np.array_equal(tile_product(Dm[a:b], 37 + a, phi), whole[a:b])


def test_tree_reduction_is_partition_invariant():
    """Node values with wildly different magnitudes: only the canonical tree makes sums agree."""
    rng = np.random.default_rng(2)
    n_leaves = 13
    leaves = {(0, t): rng.standard_normal((3, 4)) * 10.0 ** rng.integers(-8, 9, (3, 4)) for t in range(n_leaves)}
    ref = merge_nodes(leaves, n_leaves)
    assert set(ref) == {root_key(n_leaves)} == {(4, 0)}
    fold = sum(leaves[(0, t)] for t in range(n_leaves))
    assert np.allclose(fold, ref[(4, 0)], rtol=1e-6)
    for trial in range(30):
        cuts = np.sort(rng.choice(np.arange(1, n_leaves), size=rng.integers(0, 8), replace=False))
        parts = []
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n_leaves]):
            parts.append(merge_nodes({k: v for k, v in leaves.items() if lo <= k[1] < hi}, n_leaves))
        order = rng.permutation(len(parts))
        groups = np.array_split(order, max(1, len(parts) // 2))
        merged = reduce_nodes([reduce_nodes([parts[i] for i in g], n_leaves) for g in groups if len(g)], n_leaves)
        assert set(merged) == set(ref)
        assert np.array_equal(merged[(4, 0)], ref[(4, 0)])
    with pytest.raises(RuntimeError, match="twice"):
        reduce_nodes([{(0, 1): leaves[(0, 1)]}, {(0, 1): leaves[(0, 1)]}], n_leaves)


def test_accumulator_rides_the_gram_streaming_batches(stores, traj):
    """Fed by the Gram engine's own reader (batches that repeat width-1 halo rows), the tree nodes
    equal those of one batch: the accumulator can sit next to BandAccumulator in gram_tile."""
    from sed_dask.engine.passes import TileSpec, stream_deltas
    from sed_dask.store.trajectory import open_store

    op = _op("gaussian")
    params = open_store(stores[0], mode="r").run("seed0").params
    one = SketchAccumulator(4, 30, 0, 3 * T, op)
    one.update(np.diff(traj[:, : 3 * T], axis=0), 0)
    acc = SketchAccumulator(4, 30, 0, 3 * T, op)
    spec = TileSpec(4, 30, 0, 3 * T, ((0, 3 * T, 0),), 6, 8, 256, "float64")  # 5 carried + 3 new rows
    batches = 0
    for S, g0 in stream_deltas(params, spec):
        acc.update(S, g0)
        batches += 1
    assert batches > 3 and acc.done == 30 and set(acc.nodes) == set(one.nodes)
    for k in one.nodes:
        assert np.array_equal(acc.nodes[k], one.nodes[k])


# ----------------------------------------------------------------------------- in the Gram pass
SKETCH_KW = dict(d=D, seed=7, tile_elems=T)


def _oracle_sigma(traj, W):
    """numpy SVD of every explicit W x P window of the float32-difference deltas."""
    return np.array([s for _, s, _ in window_svds(_deltas(traj), W)])


@pytest.mark.parametrize("dist", ["gaussian", "sparse", "osnap"])
def test_sketch_in_the_gram_pass_is_bit_identical(stores, traj, dist):
    """``spectrum(..., sketch=...)``: one read gives the exact spectra and the very sketch that
    ``sketch()`` gives, under unrelated chunkings, tile plans (several P-ranges, several row
    batches per task, several step blocks) and schedulers."""
    ref = sketch(stores[0], distribution=dist, scheduler="sync", progress=False, **SKETCH_KW)
    plans = [
        (stores[0], dict(tile_bytes=96_000, block_steps=17), "threads"),  # 12-row batches, 6 P-ranges
        (stores[1], dict(), "sync"),  # one task
        (stores[2], dict(tile_bytes=200_000, block_steps=9), "threads"),
    ]  # zarr-decoded reads
    seen_ranges = set()
    for path, kw, sched in plans:
        ds = spectrum(
            path, windows=(3, 6), scheduler=sched, progress=False, sketch=dict(distribution=dist, **SKETCH_KW), **kw
        )
        assert np.array_equal(ds["sketch"].values, ref["sketch"].values)
        for W in (3, 6):
            sig = ds["sigma"].sel(run="seed0", window=W).values[W - 1 :, :W]
            assert np.allclose(sig, _oracle_sigma(traj, W), rtol=1e-9, atol=1e-12 * sig.max())
        seen_ranges.add(json.loads(ds.attrs["tiling"])["seed0"]["p_ranges"])
        a = ds["sketch"].attrs
        assert (a["seed"], a["d"], a["distribution"], a["tile_elems"]) == (7, D, dist, T)
        assert a["phi_checksum"] == ref.attrs["phi_checksum"]
    assert max(seen_ranges) > 1 and 1 in seen_ranges


def test_sketch_in_the_gram_pass_on_a_cluster_roundtrips_and_feeds_sketch_spectra(stores, client, tmp_path):
    ref = sketch(stores[1], scheduler="sync", progress=False, **SKETCH_KW)
    out = tmp_path / "spec.zarr"
    ds = spectrum(
        stores[0],
        windows=(4,),
        groups={"head": "p"},
        client=client,
        progress=False,
        tile_bytes=96_000,
        sketch=SKETCH_KW,
        output=out,
    )
    assert np.array_equal(ds["sketch"].values, ref["sketch"].values)
    back = xr.open_zarr(out)
    assert np.array_equal(back["sketch"].values, ref["sketch"].values)
    assert back["sketch"].attrs["d"] == D and back["sketch"].dims == ("run", "step", "dim")
    via_spec = spectra_from_sketch(back, windows=(4, 8))
    via_sketch = spectra_from_sketch(ref, windows=(4, 8))
    assert np.array_equal(via_spec["sigma"].values, via_sketch["sigma"].values, equal_nan=True)
    assert via_spec.attrs["sketch_phi_checksum"] == ref.attrs["phi_checksum"]


def test_sketch_argument_forms_and_errors(stores):
    small = spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch=5)
    assert small.sizes["dim"] == 5 and small["sketch"].attrs["distribution"] == dask.config.get(
        "sed_dask.sketch.distribution"
    )
    with dask.config.set({"sed_dask.sketch.d": 6}):
        assert spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch=True).sizes["dim"] == 6
    assert "sketch" not in spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch=False)
    with pytest.raises(ValueError, match="unknown key.*'dd'"):
        spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch={"dd": 4})
    with pytest.raises(TypeError, match="sketch="):
        spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch="big")
    with pytest.raises(ValueError, match="distribution"):
        spectrum(stores[1], windows=(3,), scheduler="sync", progress=False, sketch={"distribution": "cauchy"})
    with pytest.raises(ValueError, match="no 'sketch' variable"):
        spectra_from_sketch(spectrum(stores[1], windows=(3,), scheduler="sync", progress=False))


def test_column_plan_with_a_sketch_aligns_to_rng_tiles():
    from sed_dask.engine.gram import plan_tiles

    for P_, chunk, tb, T_, cap in [
        (5003, 333, 96_000, 1000, None),
        (10**6, 1 << 18, 256 << 20, 8192, 167_772),
        (10**6, 1 << 18, 64 << 20, 8192, None),
        (70_001, 4096, 1 << 20, 3000, 5000),
    ]:
        t = plan_tiles(40, P_, chunk, width=7, tile_bytes=tb, block_steps=512, col_align=T_, max_cols=cap)
        assert t.cols[0][0] == 0 and t.cols[-1][1] == P_
        assert all(a % T_ == 0 and b == c for (a, b), (c, _) in zip(t.cols, t.cols[1:] + ((P_, 0),)))
        if cap:
            assert max(b - a for a, b in t.cols) <= max(cap, T_)


# ----------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "sparse", "osnap"])
def test_sketch_matches_dense_oracle(stores, traj, dist):
    ds = sketch(stores[0], d=D, seed=7, distribution=dist, tile_elems=T, scheduler="sync", progress=False)
    S = ds["sketch"].sel(run="seed0").values
    oracle = _deltas(traj) @ _op(dist).rows()
    assert np.allclose(S, oracle, rtol=1e-11, atol=1e-11 * np.abs(oracle).max())
    a = ds.attrs
    assert (a["seed"], a["d"], a["distribution"], a["tile_elems"]) == (7, D, dist, T)
    assert json.loads(a["phi_checksum"])["seed0"] == _op(dist).checksum()
    assert json.loads(a["param_index_hash"])["seed0"]
    assert np.array_equal(ds["step"].values, 50 * np.arange(1, N_CKPT))
    assert np.allclose(ds["val_loss"].sel(run="seed0").values, np.linspace(3.0, 1.0, N_CKPT)[1:])


LAYOUTS = [  # (tiles_per_task, block_steps, tile_bytes): step blocks cut ROW_BLOCK rows anywhere
    dict(),
    dict(tiles_per_task=1, block_steps=5),
    dict(tiles_per_task=3, block_steps=7, tile_bytes=2 * 4 * 3 * T * 3),  # 3-row streaming batches
    dict(tiles_per_task=2, block_steps=ROW_BLOCK, split_every=2),
    dict(tiles_per_task=4, block_steps=13, split_every=3),
]


@pytest.mark.parametrize("dist", ["gaussian", "sparse", "osnap"])
def test_sketch_is_bit_identical_under_any_chunking(stores, dist):
    ref = sketch(stores[0], d=D, seed=7, distribution=dist, tile_elems=T, scheduler="sync", progress=False)[
        "sketch"
    ].values
    n_tasks = set()
    for store in stores:
        for i, lay in enumerate(LAYOUTS):
            ds = sketch(
                store,
                d=D,
                seed=7,
                distribution=dist,
                tile_elems=T,
                scheduler="threads" if i % 2 else "sync",
                progress=False,
                **lay,
            )
            n_tasks.add(json.loads(ds.attrs["tiling"])["seed0"]["p_ranges"])
            assert np.array_equal(ds["sketch"].values, ref), (store, lay)
    assert len(n_tasks) >= 4
    other = sketch(stores[1], d=D, seed=8, distribution=dist, tile_elems=T, scheduler="sync", progress=False)
    assert not np.array_equal(other["sketch"].values, ref)


@pytest.mark.parametrize("dist", ["gaussian", "osnap"])
def test_sketch_on_distributed_cluster_is_bit_identical(stores, client, dist):
    ref = sketch(stores[0], d=D, seed=3, tile_elems=T, distribution=dist, scheduler="threads", progress=False)
    for store, lay in [(stores[1], LAYOUTS[1]), (stores[2], LAYOUTS[2])]:
        ds = sketch(store, d=D, seed=3, tile_elems=T, distribution=dist, client=client, progress=False, **lay)
        assert np.array_equal(ds["sketch"].values, ref["sketch"].values)


def test_top_level_call_cli_and_reproducibility_across_processes(stores, tmp_path):
    import sed_dask.engine.sketch  # noqa: F401  (importing the module must not hide the public function)

    ds = sed_dask.sketch(stores[2], d=D, seed=11, tile_elems=T, scheduler="sync", progress=False)
    out = tmp_path / "sk.zarr"
    env = {**os.environ, "DASK_SED_DASK__SKETCH__TILE_ELEMS": str(T)}
    cmd = [
        sys.executable,
        "-c",
        "import sys; from sed_dask.cli import main; sys.exit(main())",
        "sketch",
        stores[0],
        "--d",
        str(D),
        "--seed",
        "11",
        "-o",
        str(out),
        "--threads",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    back = xr.open_zarr(out)
    assert np.array_equal(back["sketch"].values, ds["sketch"].values)
    assert back.attrs["phi_checksum"] == ds.attrs["phi_checksum"]
    spec_out = tmp_path / "spec.zarr"  # the same sketch from the Gram pass, via python -m
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sed_dask",
            "spectrum",
            stores[1],
            "--windows",
            "4",
            "-o",
            str(spec_out),
            "--sketch-d",
            str(D),
            "--sketch-seed",
            "11",
            "--threads",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "with JL sketch d=24" in r.stdout
    assert np.array_equal(xr.open_zarr(spec_out)["sketch"].values, ds["sketch"].values)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sed_dask.cli",
            "spectrum",
            stores[1],
            "-o",
            str(tmp_path / "x.zarr"),
            "--sketch-seed",
            "3",
            "--threads",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0 and "need --sketch-d" in r.stderr


# ----------------------------------------------------------------------------- spectra from a sketch
def _window_sigmas(Dm, W):
    return np.array([np.linalg.svd(Dm[e - W + 1 : e + 1], compute_uv=False) for e in range(W - 1, len(Dm))])


def test_sketch_spectra_schema_and_convergence(stores, traj):
    exact = sed_dask.spectrum(stores[0], windows=(5, 10), scheduler="sync", progress=False)
    sk = sketch(
        stores[0], d=2000, seed=1, tile_elems=T, distribution="gaussian", scheduler="threads", progress=False
    )  # nesting: the d prefixes below are d-sketches
    approx = spectra_from_sketch(sk, windows=(5, 10))
    assert set(approx.data_vars) == set(exact.data_vars) and "split_half" in approx.data_vars
    assert approx["sigma"].dims == exact["sigma"].dims
    assert np.array_equal(approx["step"].values, exact["step"].values)
    assert np.allclose(approx["val_loss"].values, exact["val_loss"].values, equal_nan=True)
    assert approx.attrs["spectra_source"] == "jl_sketch" and approx.attrs["sketch_d"] == 2000
    Dm = _deltas(traj)
    for W in (5, 10):
        oracle = _window_sigmas(Dm, W)[:, :3]
        errs = []
        for d in (20, 200, 2000):
            got = spectra_from_sketch(sk, windows=[W], d=d)["sigma"].sel(run="seed0", window=W).values
            got = got[W - 1 :, :3]
            errs.append(np.median(np.abs(got - oracle) / oracle))
        assert errs[0] > errs[1] > errs[2], (W, errs)
        assert errs[2] < 0.04, (W, errs)
        assert np.allclose(exact["sigma"].sel(run="seed0", window=W).values[W - 1 :, :3], oracle, rtol=1e-9)


def test_sketch_band_matches_gram_of_sketch():
    S = np.random.default_rng(3).standard_normal((12, 7))
    band = sketch_band(S, 4)
    G = S @ S.T
    for i in range(12):
        for k in range(4):
            if i >= k:
                assert band[i, k] == pytest.approx(G[i, i - k], rel=1e-13)
            else:
                assert np.isnan(band[i, k])


def test_jl_error_report_against_numpy_oracle(stores, traj):
    ds_, seeds, W = (10, 40, 160), (0, 1), 5
    rep = jl_error_report(
        stores[0], windows=(W,), ds=ds_, seeds=seeds, scheduler="threads", tile_elems=T, distribution="gaussian"
    )
    assert rep["mean"].dims == ("window", "d", "ratio")
    Dm = _deltas(traj)
    sig = _window_sigmas(Dm, W)
    exact = sed_dask.spectrum(stores[0], windows=(W,), scheduler="sync", progress=False)
    kst = exact["k_star"].sel(run="seed0", window=W).values[W - 1 :]
    assert rep["n_windows"].sel(window=W) == len(sig)
    for d in ds_:
        errs = {"r12": [], "r23": [], "edge": []}
        for seed in seeds:
            Phi = Operator(seed=seed, d=160, distribution="gaussian", tile_elems=T, n_params=P).rows()[:, :d]
            sk_sig = _window_sigmas(Dm @ Phi, W)
            k = kst.astype(int) - 1
            rows = np.arange(len(k))
            for name, a, b in [("r12", 0, 1), ("r23", 1, 2)]:
                truth, est = sig[:, a] / sig[:, b], sk_sig[:, a] / sk_sig[:, b]
                errs[name].append(np.abs(est - truth) / truth)
            truth = sig[rows, k] / sig[rows, k + 1]
            errs["edge"].append(np.abs(sk_sig[rows, k] / sk_sig[rows, k + 1] - truth) / truth)
        for name, e in errs.items():
            e = np.concatenate(e)
            got = rep.sel(window=W, d=d, ratio=name)
            assert float(got["mean"]) == pytest.approx(e.mean(), rel=1e-6)
            assert float(got["max"]) == pytest.approx(e.max(), rel=1e-6)
    m = rep["mean"].sel(window=W, ratio="r12").values
    assert m[0] > m[-1]
    # independent operators per (d, seed), seeded 1000 * seed + d as the reference does
    ind = jl_error_report(
        stores[0],
        windows=(W,),
        ds=(40,),
        seeds=(1,),
        nested=False,
        scheduler="threads",
        distribution="gaussian",
        tile_elems=T,
    )
    Phi = Operator(seed=1040, d=40, distribution="gaussian", tile_elems=T, n_params=P).rows()
    sk_sig = _window_sigmas(Dm @ Phi, W)
    e = np.abs(sk_sig[:, 1] / sk_sig[:, 2] - sig[:, 1] / sig[:, 2]) / (sig[:, 1] / sig[:, 2])
    assert float(ind["mean"].sel(window=W, d=40, ratio="r23")) == pytest.approx(e.mean(), rel=1e-6)
    assert ind.attrs["nested_d"] == 0
    table = jl_table(rep)
    assert table.count("\n") == 1 + len(ds_) and "| 5 | 160 | 32 |" in table


def test_several_runs_on_a_union_step_grid(tmp_path):
    """Runs of different lengths and cadence share the results' step grid; missing rows are NaN."""
    path = str(tmp_path / "two.zarr")
    a, b = _trajectory(seed=3, n=20, p=1500), _trajectory(seed=4, n=12, p=1500)
    write_trajectory(path, "a", 10 * np.arange(20), a)
    write_trajectory(path, "b", 20 * np.arange(12), b)
    ds = sketch(path, d=8, tile_elems=400, distribution="gaussian", scheduler="threads", progress=False)
    assert list(ds["run"].values) == ["a", "b"]
    sb = ds["sketch"].sel(run="b")
    have = ds["delta_span"].sel(run="b").values >= 0
    assert have.sum() == 11 and np.isnan(sb.values[~have]).all()
    Phi = _op("gaussian", d=8, p=1500, tile=400, seed=0).rows()
    assert np.allclose(sb.values[have], _deltas(b) @ Phi, rtol=1e-11, atol=1e-11)
    res = spectra_from_sketch(ds, windows=(4,))
    assert np.isnan(res["sigma"].sel(run="b", window=4).values[~have]).all()
    assert np.isfinite(res["sigma"].sel(run="b", window=4).values[have][3:]).all()


@pytest.mark.parametrize("dist", ["gaussian", "osnap"])
def test_sketch_rows_of_any_split_equal_the_full_pass(tmp_path, dist):
    """The live engine's ``sketch_graph(rows=...)``: rows sketched in any bursts (single rows, ones
    straddling a ROW_BLOCK boundary, a long one) are the full pass's rows bit for bit."""
    from sed_dask.engine.passes import execute
    from sed_dask.engine.sketch import sketch_graph
    from sed_dask.store.trajectory import open_store

    n = 2 * ROW_BLOCK + 20
    path = str(tmp_path / "long.zarr")
    write_trajectory(path, "r", 10 * np.arange(n), _trajectory(seed=3, n=n, p=P), chunk_bytes=4 * 1024)
    rs = open_store(path, mode="r").run("r")
    op = _op(dist)  # 6 RNG tiles: the canonical tree promotes a left node past the end
    full = sketch_graph(rs, op, tiles_per_task=1)  # other tasks than the row graphs' (one P-range)
    want = execute(full.dsk, [full.key], scheduler="threads")[0]
    cuts = [0, 1, 2, ROW_BLOCK - 1, ROW_BLOCK + 2, ROW_BLOCK + 3, 2 * ROW_BLOCK + 5, n - 1]
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        plan = sketch_graph(rs, op, rows=(lo, hi), steps=full.steps)
        parts.append(execute(plan.dsk, [plan.key], scheduler="threads")[0])
        assert parts[-1].shape == (hi - lo, D)
    got = np.concatenate(parts)
    assert np.array_equal(got, want), np.max(np.abs(got - want))
    with pytest.raises(ValueError, match="rows="):
        sketch_graph(rs, op, rows=(5, n))
