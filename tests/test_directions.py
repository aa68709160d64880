"""Parameter-space directions: TSQR and randomized SVD on Dask vs numpy oracles, loadings, rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import sed_dask
from sed_dask.cli import main as cli_main
from sed_dask.engine.directions import exact_svd, principal_angles, randomized_svd, subspace_rotation, window_stack
from sed_dask.store.trajectory import ParamIndex, TensorEntry, open_store, write_trajectory

N_CKPT = 41
SIZES = [
    ("tok_emb.weight", (40, 30), "embed"),
    ("blocks.0.attn.qkv.weight", (30, 90), "block0.attn"),
    ("blocks.0.mlp.fc.weight", (30, 60), "block0.mlp"),
    ("blocks.1.attn.qkv.weight", (30, 90), "block1.attn"),
    ("blocks.1.mlp.fc.weight", (30, 61), "block1.mlp"),
    ("head.weight", (7, 30), "head"),
]


def _index():
    entries, off = [], 0
    for name, shape, group in SIZES:
        size = int(np.prod(shape))
        entries.append(TensorEntry(name, off, size, shape, "float32", group))
        off += size
    return ParamIndex(entries)


def _planted(n, P, sv, seed=0, noise=1e-3):
    """Deltas with planted singular values ``sv`` along random orthonormal directions, plus noise."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, len(sv))))[0]
    V = np.linalg.qr(rng.standard_normal((P, len(sv))))[0]
    return (U * np.asarray(sv)) @ V.T + noise * rng.standard_normal((n, P))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    idx = _index()
    P = idx.n_params
    sv = [40.0, 25.0, 12.0, 6.0, 3.0, 2.0, 1.5, 1.2]
    deltas = _planted(N_CKPT - 1, P, sv, seed=1, noise=0.02)
    # a window with its own, stronger structure so that window and whole-run answers differ
    deltas[20:30] += _planted(10, P, [30.0, 8.0, 2.0], seed=2, noise=0.0)
    theta = np.vstack([np.zeros(P), np.cumsum(deltas, axis=0)]).astype(np.float32)
    path = str(tmp_path_factory.mktemp("dirs") / "store.zarr")
    write_trajectory(path, "run0", 10 * np.arange(N_CKPT), theta, index=idx, chunk_bytes=4 * 700)
    D = np.diff(theta, axis=0).astype(np.float64)
    return path, D, idx


def _oracle(X, k):
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return U[:, :k], s, Vt[:k]


def _abs_cos(A, B):
    return np.abs(np.asarray(A, np.float64) @ np.asarray(B, np.float64).T)


def test_tsqr_is_exact(setup):
    path, D, _ = setup
    rs = open_store(path, mode="r").run("run0")
    stack = window_stack(rs, window=10, end_step=300, tile_bytes=24 * 11 * 800)
    assert len(stack.cols) > 3
    U, s = exact_svd(stack, scheduler="threads")
    Uo, so, _ = _oracle(D[20:30], 10)
    assert np.allclose(s, so, rtol=1e-10, atol=1e-10 * so[0])
    assert np.allclose(np.abs(U.T @ Uo), np.eye(10), atol=1e-9)


def test_exact_directions_vs_numpy(setup, tmp_path):
    path, D, idx = setup
    k = 4
    mem = sed_dask.directions(
        path, run="run0", window=10, end_step=300, k=k, scheduler="threads", tile_bytes=24 * 11 * 800
    )
    Uo, so, Vo = _oracle(D[20:30], k)
    V = mem["direction"].values
    assert V.dtype == np.float32 and V.shape == (k, idx.n_params)
    assert np.allclose(V.astype(np.float64) @ V.T.astype(np.float64), np.eye(k), atol=1e-6)  # orthonormal
    assert np.allclose(_abs_cos(V, Vo), np.eye(k), atol=1e-6)
    assert np.allclose(mem["sigma"].values, so[:k], rtol=1e-10)
    assert np.allclose(np.abs(mem["u"].values), np.abs(Uo.T), atol=1e-9)
    assert list(mem["step"].values) == list(10 * np.arange(21, 31))
    # loadings: fraction of ||v_j||^2 per stored layer group, summing to 1
    groups = [str(g) for g in mem["group"].values]
    assert groups == ["embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "head"]
    L = mem["loading"].values
    assert np.allclose(L.sum(axis=1), 1.0, atol=1e-12)
    rng_of = idx.group_ranges()
    want = np.array([[sum((Vo[j, lo:hi] ** 2).sum() for lo, hi in rng_of[g]) for g in groups] for j in range(k)])
    assert np.allclose(L, want, atol=1e-6)
    # written to Zarr by the tasks themselves: same values, and the index maps back to tensors
    out = tmp_path / "dirs.zarr"
    disk = sed_dask.directions(
        path, run="run0", window=10, end_step=300, k=k, scheduler="threads", tile_bytes=24 * 11 * 800, output=out
    )
    back = xr.open_zarr(out)
    assert np.array_equal(back["direction"].values, V)
    assert np.array_equal(disk["loading"].values, L)
    index = ParamIndex.from_records(json.loads(back.attrs["param_index"]))
    e = index["blocks.0.mlp.fc.weight"]
    assert back.attrs["param_index_hash"] == idx.hash
    tensor = back["direction"].isel(component=0, param=slice(e.offset, e.offset + e.size)).values.reshape(e.shape)
    assert np.allclose(tensor.ravel(), Vo[0, e.offset : e.offset + e.size] * np.sign(Vo[0] @ V[0]), atol=1e-6)


def test_randomized_vs_numpy_on_planted_spectrum(setup):
    path, D, _ = setup
    rs = open_store(path, mode="r").run("run0")
    stack = window_stack(rs, tile_bytes=24 * 41 * 900)  # whole trajectory: 40 deltas
    k = 3
    Uo, so, Vo = _oracle(D, k)
    U, s = randomized_svd(stack, k, n_oversamples=5, n_power_iter=2, seed=3, scheduler="threads")
    assert np.allclose(s[:k], so[:k], rtol=1e-4)
    ang = principal_angles(U[:, :k].T, Uo.T)
    assert ang.max() < 1e-3
    # without power iterations and oversampling the subspace is visibly worse: the test can tell
    U0, s0 = randomized_svd(stack, k, n_oversamples=0, n_power_iter=0, seed=3, scheduler="threads")
    assert principal_angles(U0[:, :k].T, Uo.T).max() > 10 * ang.max()
    ds = sed_dask.directions(path, run="run0", k=k, method="randomized", n_oversamples=5, seed=3, scheduler="threads")
    V = ds["direction"].values.astype(np.float64)
    assert np.allclose(V @ V.T, np.eye(k), atol=1e-5)
    assert principal_angles(V, Vo).max() < 1e-3
    assert ds.attrs["method"] == "randomized" and ds.attrs["n_power_iter"] == 2
    assert np.allclose(ds["loading"].values.sum(axis=1), 1.0)


def test_centered_trajectory_pca_and_cluster(setup, client):
    path, D, _ = setup
    k = 3
    Xc = D - D.mean(axis=0)
    _, so, Vo = _oracle(Xc, k)
    ds = sed_dask.directions(path, run="run0", k=k, center=True, client=client, tile_bytes=24 * 41 * 900)
    assert ds.attrs["window"] == -1 and ds.attrs["center"] == 1
    assert np.allclose(ds["sigma"].values, so[:k], rtol=1e-10)
    assert np.allclose(_abs_cos(ds["direction"].values, Vo), np.eye(k), atol=1e-6)
    unc = sed_dask.directions(path, run="run0", k=k, scheduler="threads")
    assert not np.allclose(unc["sigma"].values, so[:k], rtol=1e-3)


def test_subspace_rotation_vs_numpy(setup):
    path, D, _ = setup
    W, k = 8, 2
    ang = subspace_rotation(path, run="run0", window=W, k=k, scheduler="threads")
    assert ang.dims == ("step", "component") and np.isnan(ang.values[0]).all()
    for e in (W, 15, 25, 30, 39):
        _, _, Va = _oracle(D[e - W + 1 : e + 1], k)
        _, _, Vb = _oracle(D[e - W : e], k)
        want = np.degrees(principal_angles(Va, Vb))
        assert np.allclose(ang.values[e - W + 1], want, atol=1e-4), e


def test_directions_cli_and_errors(setup, tmp_path, capsys):
    path, _, _ = setup
    out = tmp_path / "cli.zarr"
    rc = cli_main(
        [
            "directions",
            path,
            "--run",
            "run0",
            "--window",
            "10",
            "--end-step",
            "300",
            "-k",
            "2",
            "--groups",
            "blocks",
            "-o",
            str(out),
            "--threads",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "v1 loading" in text and "block0" in text
    back = xr.open_zarr(out)
    assert list(back["group"].values) == ["embed", "block0", "block1", "head"]
    assert np.allclose(back["loading"].values.sum(axis=1), 1.0)
    with pytest.raises(sed_dask.errors.StoreError, match="not a delta step"):
        sed_dask.directions(path, run="run0", window=5, end_step=305, scheduler="threads")
    with pytest.raises(sed_dask.errors.StoreError, match="needs 20 deltas"):
        sed_dask.directions(path, run="run0", window=20, end_step=100, scheduler="threads")
    with pytest.raises(ValueError, match="method"):
        sed_dask.directions(path, run="run0", method="lanczos", scheduler="threads")
