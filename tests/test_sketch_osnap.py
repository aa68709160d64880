"""The OSNAP sparse embedding (sed_dask.engine.osnap): its definition against an independent pure-Python
oracle, its distribution, the CSR kernel's row independence, the refusals where nesting of d is
relied on, and the CLI choice. Chunking/scheduler bit-identity and the dense-Phi oracle of the pass
run in tests/test_sketch.py (parametrised over "osnap")."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import dask
import numpy as np
import pytest
import xarray as xr
from scipy import stats
from synthetic import make_deltas

from sed_dask.engine.jl import Operator
from sed_dask.engine.sketch import make_operator, sketch, tile_product
from sed_dask.results.sketch_spectra import jl_error_report, spectra_from_sketch
from sed_dask.store import write_trajectory

P, T, N_CKPT = 3001, 700, 30


def _osnap(d, s, p=P, tile=T, seed=5):
    return Operator(seed=seed, d=d, distribution="osnap", tile_elems=tile, n_params=p, s=s)


def _oracle_phi(op: Operator) -> np.ndarray:
    """Dense scaled Phi (P x d) built entry by entry from the raw Philox words with Python ints,
    following the definition in sed_dask/osnap.py (not its numpy code)."""
    d, s = op.d, int(op.s)
    phi = np.zeros((op.n_params, d))
    for t in range(op.n_tiles):
        p0, p1 = op.tile_bounds(t)
        for b in range(s):
            words = np.random.Philox(key=np.array([op.seed, t], np.uint64), counter=b << 64).random_raw(p1 - p0)
            lo, hi = b * d // s, (b + 1) * d // s
            for r, w in enumerate(int(x) for x in words):
                col = lo + (((w >> 32) * (hi - lo)) >> 32)
                phi[p0 + r, col] = (-1.0 if w & 1 else 1.0) / math.sqrt(s)
    return phi


@pytest.fixture(scope="module")
def traj():
    deltas = make_deltas(N_CKPT - 1, P, rank=2, signal=(6.0, 3.0), bulk=5, noise=0.3, rng=4)
    theta0 = np.random.default_rng(9).standard_normal(P)
    return np.vstack([theta0, theta0 + np.cumsum(deltas, axis=0)]).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory, traj):
    path = str(tmp_path_factory.mktemp("osnap") / "s.zarr")
    write_trajectory(path, "seed0", 10 * np.arange(N_CKPT), traj, chunk_bytes=4 * 500, shard_bytes=4 * 1500)
    return path


# ----------------------------------------------------------------------------- definition
@pytest.mark.parametrize("d,s", [(24, 1), (24, 4), (10, 3), (7, 7)])
def test_phi_equals_the_pure_python_oracle(d, s):
    op = _osnap(d, s)
    assert np.array_equal(op.rows(), _oracle_phi(op))
    assert np.array_equal(op.rows(1000, 2222), op.rows()[1000:2222])  # tile-unaligned row range


@pytest.mark.parametrize("d,s", [(24, 1), (24, 4), (10, 3)])
def test_pass_matches_the_oracle_phi(store, traj, d, s):
    """S = Phi^T delta in float64 from the pass vs the oracle's dense Phi; exact sum order aside."""
    ds = sketch(
        store,
        d=d,
        seed=5,
        distribution="osnap",
        s=s,
        tile_elems=T,
        scheduler="threads",
        progress=False,
        tiles_per_task=2,
        block_steps=11,
    )
    oracle = np.diff(traj, axis=0).astype(np.float64) @ _oracle_phi(_osnap(d, s))
    got = ds["sketch"].sel(run="seed0").values
    assert np.allclose(got, oracle, rtol=1e-12, atol=1e-12 * np.abs(oracle).max())
    assert json.loads(ds.attrs["sparse_s"])["seed0"] == s and ds.attrs["distribution"] == "osnap"


def test_distribution_exactly_s_nonzeros_signs_and_column_balance():
    d, s, p = 100, 4, 200_000
    op = _osnap(d, s, p=p, tile=8192, seed=0)
    phi = op.rows()
    nz = phi != 0
    assert (nz.sum(axis=1) == s).all()  # exactly s per row
    assert np.array_equal(np.unique(np.abs(phi[nz])), [1 / math.sqrt(s)])  # +-1/sqrt(s)
    assert np.allclose((phi**2).sum(axis=1), 1.0, rtol=0, atol=1e-15)  # unit rows
    lo = np.arange(s + 1) * d // s
    for b in range(s):  # one nonzero per block
        assert (nz[:, lo[b] : lo[b + 1]].sum(axis=1) == 1).all()
        counts = nz[:, lo[b] : lo[b + 1]].sum(axis=0)  # uniform inside the block
        assert stats.chisquare(counts).pvalue > 1e-3
    pos = (phi[nz] > 0).sum()
    assert stats.binomtest(int(pos), int(nz.sum()), 0.5).pvalue > 1e-3
    C = phi.T @ phi  # columns nearly orthogonal
    assert np.allclose(np.diag(C), p / d, rtol=0.05)
    assert np.abs(C[~np.eye(d, dtype=bool)]).max() < 6 * math.sqrt(p / d) / math.sqrt(s) + 1e-9


def test_norm_estimator_is_unbiased_with_the_predicted_variance():
    """||Phi^T x||^2 / ||x||^2 over 300 operators: mean 1, variance 2/d (1 - sum x^4 / ||x||^4)."""
    d, p = 40, 2000
    x = np.random.default_rng(1).standard_normal(p) * np.linspace(0.2, 3.0, p)
    r = np.array([np.sum((x @ _osnap(d, 2, p=p, tile=512, seed=k).rows()) ** 2) for k in range(300)]) / (x @ x)
    var = 2 / d * (1 - np.sum(x**4) / (x @ x) ** 2)
    assert abs(r.mean() - 1) < 4 * math.sqrt(var / 300)
    assert 0.7 < r.var(ddof=1) / var < 1.35


def test_random_words_are_o_of_p_times_s():
    """Only s counter columns are drawn: a huge d costs no more words (the dense operators: P x d)."""
    import time

    op_small, op_huge = _osnap(8, 2, p=50_000, tile=8192), _osnap(50_000, 2, p=50_000, tile=8192)
    t = time.perf_counter()
    a = op_small.tile_sparse(0)
    t_small = time.perf_counter() - t
    t = time.perf_counter()
    b = op_huge.tile_sparse(0)
    t_huge = time.perf_counter() - t
    assert a.nnz == b.nnz == 2 * 8192 and b.shape == (50_000, 8192)
    assert t_huge < 20 * t_small + 0.05  # a dense d = 50,000 tile would be 400 M words


# ----------------------------------------------------------------------------- kernel
def test_kernel_rows_do_not_depend_on_neighbours():
    rng = np.random.default_rng(3)
    Dm = rng.standard_normal((150, 3 * T)).astype(np.float32)[:, T : 2 * T]  # strided, like a batch slice
    phi = _osnap(24, 4).tile_sparse(1)
    whole = tile_product(Dm, 11, phi)
    assert np.allclose(whole, Dm.astype(np.float64) @ phi.toarray().T, rtol=1e-12, atol=1e-12)
    for a, b in [(0, 1), (7, 8), (5, 70), (27, 91), (100, 150)]:  # single rows take another path
        assert np.array_equal(tile_product(Dm[a:b], 11 + a, phi), whole[a:b])


# ----------------------------------------------------------------------------- nesting
def test_columns_do_not_nest_and_code_that_needs_nesting_refuses(store):
    wide, narrow = _osnap(24, 4), _osnap(12, 4)
    assert not wide.nests and _osnap(24, 1).nests is False
    assert not np.array_equal(wide.rows()[:, :12] * math.sqrt(2), narrow.rows())
    assert Operator(seed=0, d=24, distribution="gaussian", tile_elems=T, n_params=P).nests
    sk = sketch(store, d=12, seed=5, distribution="osnap", tile_elems=T, scheduler="sync", progress=False)
    assert spectra_from_sketch(sk, windows=(3,)).sizes["window"] == 1  # full width is fine
    with pytest.raises(ValueError, match="do not nest"):
        spectra_from_sketch(sk, windows=(3,), d=6)
    with pytest.raises(ValueError, match="nested=False"):
        jl_error_report(
            store,
            windows=(3,),
            ds=(6, 12),
            seeds=(0,),
            distribution="osnap",
            nested=True,
            scheduler="sync",
            tile_elems=T,
        )
    rep = jl_error_report(
        store, windows=(3,), ds=(6, 12), seeds=(0,), distribution="osnap", scheduler="sync", tile_elems=T
    )  # nested=None: independent operators
    assert rep.attrs["nested_d"] == 0 and rep.attrs["distribution"] == "osnap"
    assert np.isfinite(rep["mean"].values).all()


# ----------------------------------------------------------------------------- config, validation, CLI
def test_default_s_from_config_and_validation():
    assert make_operator(P, d=24).distribution == "osnap" and make_operator(P, d=24).s == 1  # the defaults
    assert _osnap(24, None).s == 1
    with dask.config.set({"sed_dask.sketch.osnap-s": 5}):
        assert make_operator(P, d=24, distribution="osnap").s == 5
        assert make_operator(P, d=3, distribution="osnap").s == 3  # the default is capped at d
    assert make_operator(P, d=24, distribution="osnap", s=6).s == 6
    for bad in (0, 2.5, 25):
        with pytest.raises(ValueError, match="osnap sketch s"):
            _osnap(24, bad)


def test_cli_choice_and_bad_s(store, tmp_path):
    def cli(s, out):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sed_dask",
                "sketch",
                store,
                "--d",
                "12",
                "--seed",
                "5",
                "--distribution",
                "osnap",
                "--s",
                s,
                "--tile-elems",
                str(T),
                "-o",
                str(out),
                "--threads",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    r = cli("3", tmp_path / "o.zarr")
    assert r.returncode == 0, r.stderr
    ref = sketch(store, d=12, seed=5, distribution="osnap", s=3, tile_elems=T, scheduler="sync", progress=False)
    assert np.array_equal(xr.open_zarr(tmp_path / "o.zarr")["sketch"].values, ref["sketch"].values)
    r = cli("2.5", tmp_path / "bad.zarr")
    assert r.returncode == 2 and "osnap sketch s" in r.stderr and "Traceback" not in r.stderr
