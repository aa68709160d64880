"""The fused band kernel (sed_dask.engine.band_kernel) against numpy float64 oracles and the BLAS path.

Bit-identity is asserted where the kernel promises it: across schedulers, and across every tiling
that keeps the same column segments (row buffers, step blocks, which rows share a call).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest
from sed_oracle import band_of, deltas, planted, random_walk, window_svds

from sed_dask.engine import band_kernel
from sed_dask.engine.gram import banded_gram, gram_graph
from sed_dask.engine.windows import window_features
from sed_dask.store.trajectory import ParamIndex, write_trajectory

pytestmark = pytest.mark.skipif(not band_kernel.available(), reason="numba is not installed")

TENSORS = [
    ("tok_emb.weight", (40, 30)),
    ("blocks.0.attn.c_attn.weight", (30, 90)),
    ("blocks.0.mlp.c_fc.weight", (30, 61)),
    ("blocks.1.attn.c_attn.weight", (30, 90)),
    ("blocks.1.mlp.c_fc.weight", (30, 61)),
    ("ln_f.weight", (30,)),
]


def _index():
    return ParamIndex.from_tensors([(n, s, "float32") for n, s in TENSORS])


def test_segment_against_numpy_and_row_grouping():
    """band_segment equals explicit float64 dots; a row's entries do not depend on the other rows given."""
    rng = np.random.default_rng(0)
    S = rng.standard_normal((45, 2 * band_kernel.SUB_COLS + 77)).astype(np.float32)
    work = np.empty((45, band_kernel.SUB_COLS))
    for width, p0, t_lo, a, b in (
        (11, 0, 10, 0, S.shape[1]),
        (11, 4, 9, 13, 1100),
        (64, 0, 0, 5, 600),
        (3, 0, 44, 0, 1),
        (1, 2, 2, 0, S.shape[1]),
    ):
        out = np.zeros((45 - t_lo, width))
        band_kernel.band_segment(S, p0, t_lo, a, b, width, work, out)
        ref = band_kernel.band_reference(S, p0, t_lo, a, b, width)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    full = np.zeros((35, 11))
    band_kernel.band_segment(S, 0, 10, 0, S.shape[1], 11, work, full)
    for lo, hi, t_lo in ((0, 45, 30), (7, 40, 17), (20, 31, 30), (33, 45, 43)):  # other rows, odd/even counts
        part = np.zeros((hi - lo - (t_lo - lo), 11))
        band_kernel.band_segment(S[lo:hi], 0, t_lo - lo, 0, S.shape[1], 11, work, part)
        rows = np.arange(t_lo, hi)
        ok = rows[:, None] - np.arange(11)[None, :] >= lo  # entries whose partner was given
        assert np.array_equal(part[ok], full[rows - 10][ok]), (lo, hi, t_lo)


@pytest.mark.parametrize("width", [11, 5, 24])
def test_sigma_against_svd_oracle(tmp_path, width):
    """Every window's sigma within 1e-12 (relative to sigma_1) of numpy SVD of the explicit float64 deltas."""
    n, P = 41, 20_011
    X = planted(np.random.default_rng(width), n, P)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(n), X, chunk_bytes=4 * 4096)
    g = banded_gram(rs, w_max=width, scheduler="threads", tile_bytes=4 * 64 * 8192, kernel="fused")
    assert g.tiling["kernel"] == "fused" and g.tiling["p_ranges"] > 1
    D = deltas(X)
    W = width
    f = window_features(g["all"], W, n_params=P)
    for t, (k, s, _) in enumerate(window_svds(D, W)):
        np.testing.assert_allclose(f["sigma"][t], s, rtol=0, atol=1e-12 * s[0], err_msg=f"window ending {k}")


def test_fused_and_blas_agree_per_group(tmp_path):
    idx = _index()
    X = random_walk(np.random.default_rng(3), 30, idx.n_params)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(30), X, index=idx, chunk_bytes=4 * 500)
    kw = {"w_max": 11, "groups": "default", "scheduler": "sync", "tile_bytes": 4 * 64 * 1500, "block_steps": 7}
    f = banded_gram(rs, kernel="fused", **kw)
    b = banded_gram(rs, kernel="blas", **kw)
    assert f.tiling["kernel"] == "fused" and b.tiling["kernel"] == "blas" and len(f.groups) > 2
    ok = ~np.isnan(b.band)
    assert np.array_equal(np.isnan(f.band), ~ok)
    np.testing.assert_allclose(f.band[ok], b.band[ok], rtol=0, atol=1e-13 * np.nanmax(np.abs(b.band)))
    np.testing.assert_allclose(f["all"], band_of(deltas(X), 11), rtol=0, atol=1e-13 * np.nanmax(b.band))
    # the groups partition the columns here, so their bands sum to the whole one
    np.testing.assert_allclose(np.nansum(f.band[1:], axis=0), np.nan_to_num(f.band[0]), rtol=1e-12, atol=0)


def test_bit_identical_across_schedulers_and_row_groupings(tmp_path, client):
    idx = _index()
    n = 100
    X = random_walk(np.random.default_rng(9), n, idx.n_params)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(n), X, index=idx, chunk_bytes=4 * 700)
    P, W = idx.n_params, 11
    # one P-range (tile_bytes holds every column of the rows in memory): the columns, hence every sum,
    # are the same whatever the rows per buffer, the batches carried across and the deltas per task
    results = []
    for rows, bs in ((64, 512), (80, 512), (64, 5), (64, 13), (64, 1), (64, 40)):
        tb = 2 * 4 * (-(-P // 700) * 700) * rows  # P rounded up to whole read chunks
        tiling = gram_graph(rs, width=W, tile_bytes=tb, block_steps=bs, kernel="fused").tiling
        assert len(tiling.cols) == 1, tiling
        results.append(
            (
                tiling.buf_rows,
                len(tiling.blocks),
                banded_gram(
                    rs, w_max=W, groups="default", scheduler="sync", tile_bytes=tb, block_steps=bs, kernel="fused"
                ),
            )
        )
    assert len({(r, b) for r, b, _ in results}) == len(results)
    assert results[0][0] < n - 1  # several batches per task, W-1 rows carried between them
    for _, _, g in results[1:]:
        assert np.array_equal(g.band, results[0][2].band, equal_nan=True)
    # several P-ranges: bit-identical across schedulers (and across step blocks for fixed columns)
    kw = {"w_max": W, "groups": "default", "tile_bytes": 4 * 64 * 1400, "kernel": "fused"}
    a = banded_gram(rs, client=client, block_steps=60, **kw)
    b = banded_gram(rs, scheduler="threads", block_steps=60, **kw)
    c = banded_gram(rs, scheduler="sync", block_steps=512, **kw)
    assert a.tiling["p_ranges"] > 1 and a.tiling["p_ranges"] == c.tiling["p_ranges"]
    assert np.array_equal(a.band, b.band, equal_nan=True)
    assert np.array_equal(a.band, c.band, equal_nan=True)
    np.testing.assert_allclose(a["all"], band_of(deltas(X), W), rtol=0, atol=1e-13 * np.nanmax(a.band))


def test_automatic_choice_and_overrides(tmp_path):
    assert band_kernel.choose(11, "float64") == "fused"
    assert band_kernel.choose(32, "float64") == "fused"
    assert band_kernel.choose(64, "float64") == "blas"  # wide bands: BLAS syrk is cheaper
    assert band_kernel.choose(11, "float32") == "blas"  # float32 products are BLAS's
    assert band_kernel.choose(64, "float64", "fused") == "fused"
    assert band_kernel.choose(11, "float64", "blas") == "blas"
    with dask.config.set({"sed_dask.spectrum.gram-kernel": "blas"}):
        assert band_kernel.choose(11, "float64") == "blas"
        assert band_kernel.choose(11, "float64", "auto") == "fused"
    with dask.config.set({"sed_dask.spectrum.fused-max-width": 8}):
        assert band_kernel.choose(11, "float64") == "blas"
    with pytest.raises(ValueError, match="gram kernel must be one of"):
        band_kernel.choose(11, "float64", "numba")
    X = random_walk(np.random.default_rng(1), 12, 900)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(12), X)
    assert banded_gram(rs, w_max=11, scheduler="sync").tiling["kernel"] == "fused"
    assert banded_gram(rs, w_max=40, scheduler="sync").tiling["kernel"] == "blas"
    assert gram_graph(rs, width=11, kernel="blas").kernel == "blas"
    assert gram_graph(rs, width=11, kernel="blas").key != gram_graph(rs, width=11, kernel="fused").key


FALLBACK = textwrap.dedent("""
    import json, sys, warnings
    sys.modules["numba"] = None          # 'import numba' now raises ImportError, as on a machine without it
    import numpy as np
    from sed_dask.engine import band_kernel
    from sed_dask.engine.gram import banded_gram
    from sed_dask.store.trajectory import open_store
    rs = open_store(sys.argv[1], mode="r").run("r")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = banded_gram(rs, w_max=11, scheduler="sync", tile_bytes=4 * 64 * 300)
        b = banded_gram(rs, w_max=11, scheduler="sync", tile_bytes=4 * 64 * 300, kernel="fused")
        worker = band_kernel.runnable("fused")
    np.save(sys.argv[2], a.band)
    print(json.dumps({"available": band_kernel.available(), "kernels": [a.tiling["kernel"], b.tiling["kernel"]],
                      "worker": worker, "same": bool(np.array_equal(a.band, b.band, equal_nan=True)),
                      "warnings": [str(w.message) for w in seen if w.category is band_kernel.KernelWarning]}))
""")


def test_fallback_without_numba(tmp_path):
    X = random_walk(np.random.default_rng(4), 25, 1500)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(25), X, chunk_bytes=4 * 300)
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s.zarr"), str(tmp_path / "band.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["available"] is False and got["kernels"] == ["blas", "blas"] and got["worker"] == "blas"
    assert got["same"]
    assert len(got["warnings"]) == 1 and "needs numba" in got["warnings"][0] and "BLAS" in got["warnings"][0]
    band = np.load(tmp_path / "band.npy")
    blas_here = banded_gram(rs, w_max=11, scheduler="sync", tile_bytes=4 * 64 * 300, kernel="blas")
    assert np.array_equal(band, blas_here.band, equal_nan=True)  # the fallback is the BLAS path, bit for bit
    np.testing.assert_allclose(band[0], band_of(deltas(X), 11), rtol=0, atol=1e-13 * np.nanmax(band))
