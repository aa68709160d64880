"""The one-pass banded Gram against explicit dot products of the float32 deltas."""

from __future__ import annotations

import numpy as np
import pytest
from sed_oracle import band_of, deltas, random_walk

from sed_dask.engine.gram import banded_gram, gram_graph, plan_tiles
from sed_dask.errors import StoreError
from sed_dask.store.trajectory import ParamIndex, write_trajectory

TENSORS = [
    ("tok_emb.weight", (12, 10)),
    ("blocks.0.attn.c_attn.weight", (10, 30)),
    ("blocks.0.mlp.c_fc.weight", (10, 17)),
    ("blocks.1.attn.c_attn.weight", (10, 30)),
    ("blocks.1.ln_1.weight", (10,)),
    ("blocks.1.mlp.c_fc.weight", (10, 17)),
    ("ln_f.weight", (10,)),
]


def _index():
    return ParamIndex.from_tensors([(n, s, "float32") for n, s in TENSORS])


def _close(a, b, rtol=1e-12):
    ok = np.isnan(b)
    assert np.array_equal(np.isnan(a), ok)
    scale = np.nanmax(np.abs(b))
    np.testing.assert_allclose(a[~ok], b[~ok], rtol=0, atol=rtol * scale)


# (rows, P, chunk_bytes, shard_bytes, width, tile_bytes, block_steps)
CASES = [
    (23, 1037, 400, None, 5, None, None),  # one tile; P not divisible by the chunk
    (23, 1037, 400, 1600, 12, 3000, 3),  # tiles smaller than a chunk, halos, shards
    (23, 1037, 400, None, 30, 6000, 7),  # band wider than the run (22 deltas)
    (9, 300, 128, None, 4, 200, 1),  # one-delta step blocks, tiny tiles
    (40, 513, 4 * 513, None, 11, 40 * 4 * 16, 13),  # P-range narrower than the rows in memory
]


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-P{c[1]}-w{c[4]}" for c in CASES])
def test_band_matches_explicit_dots(tmp_path, case):
    n, P, cb, sb, width, tb, bs = case
    X = random_walk(np.random.default_rng(n * P + width), n, P)
    rs = write_trajectory(
        tmp_path / "s.zarr", "r", np.arange(n) * 10, X, chunk_bytes=cb, **({"shard_bytes": sb} if sb else {})
    )
    g = banded_gram(rs, w_max=width, scheduler="threads", tile_bytes=tb, block_steps=bs)
    assert g.band.shape == (1, n - 1, width) and g.groups == ["all"]
    _close(g["all"], band_of(deltas(X), width))
    np.testing.assert_array_equal(g.delta_steps, np.arange(1, n) * 10)


def test_plan_respects_tile_bytes_and_chunks():
    for rows, P, chunk, width, tb, bs in [
        (100, 10_000, 1000, 11, 200_000, 40),
        (61, 20_000_000, 1 << 20, 31, 256 << 20, 512),
        (30, 5000, 1000, 5, 2000, 4),
    ]:
        t = plan_tiles(rows, P, chunk, width=width, tile_bytes=tb, block_steps=bs)
        widths = [c1 - c0 for c0, c1 in t.cols]
        # columns cover [0, P) exactly once and never straddle a read-chunk boundary unless whole chunks
        assert t.cols[0][0] == 0 and t.cols[-1][1] == P
        assert all(a[1] == b[0] for a, b in zip(t.cols, t.cols[1:]))
        for c0, c1 in t.cols:
            assert c0 % chunk == 0 or (c0 // chunk) == ((c1 - 1) // chunk)
        # the rows held in memory x P-range fit the tile budget
        assert 2 * t.buf_rows * max(widths) * 4 <= tb or t.buf_rows == width  # two buffers
        assert t.buf_rows >= min(width, rows - 1)
        assert t.blocks[0][0] == 0 and t.blocks[-1][1] == rows - 1


def test_group_grams_sum_to_global_and_match_their_columns(tmp_path):
    idx = _index()
    P = idx.n_params
    X = random_walk(np.random.default_rng(3), 15, P)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(15), X, index=idx, chunk_bytes=256)
    D = deltas(X)
    for request in ("default", "blocks", {"attn": r"\.attn\.", "mlp": "mlp"}):
        g = banded_gram(rs, w_max=6, groups=request, scheduler="threads", tile_bytes=4 * 14 * 100, block_steps=5)
        assert g.groups[0] == "all" and len(g.groups) > 2
        _close(np.nansum(g.band[1:], axis=0) + 0 * g.band[0], g.band[0])
        _close(g["all"], band_of(D, 6))
        from sed_dask.engine.grouping import resolve

        ranges, _ = resolve(idx, request, run="r")
        assert sum(g.n_params[k] for k in ranges) == P
        for name, rr in ranges.items():
            cols = np.concatenate([np.arange(lo, hi) for lo, hi in rr])
            _close(g[name], band_of(D[:, cols], 6))
    g = banded_gram(rs, w_max=6, groups="blocks", scheduler="sync")
    assert g.groups == ["all", "embeddings", "block0", "block1", "final_norm"]
    assert g.n_params["block1"] == 300 + 10 + 170


def test_group_subset_and_unknown_group(tmp_path):
    idx = _index()
    X = random_walk(np.random.default_rng(4), 8, idx.n_params)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(8), X, index=idx)
    D = deltas(X)
    g = banded_gram(rs, w_max=3, groups=["block0.attn", "block1.mlp"], scheduler="sync")
    assert g.groups == ["all", "block0.attn", "block1.mlp"]
    _close(g["all"], band_of(D, 3))
    e = idx["blocks.0.attn.c_attn.weight"]
    _close(g["block0.attn"], band_of(D[:, e.offset : e.offset + e.size], 3))
    with pytest.raises(StoreError, match=r"run 'r': unknown group\(s\) \['block7'\]"):
        banded_gram(rs, w_max=3, groups=["block0", "block7"], scheduler="sync")
    with pytest.raises(StoreError, match=r"run 'r': group\(s\) \['conv'\] match no parameter"):
        banded_gram(rs, w_max=3, groups={"conv": "conv", "attn": "attn"}, scheduler="sync")
    with pytest.raises(ValueError, match="unknown grouping 'layers'"):
        banded_gram(rs, w_max=3, groups="layers", scheduler="sync")


def test_bit_identical_on_local_cluster_and_threads(tmp_path, client):
    idx = _index()
    X = random_walk(np.random.default_rng(5), 21, idx.n_params)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(21), X, index=idx, chunk_bytes=512)
    kw = dict(w_max=8, groups="default", tile_bytes=4 * 32 * 256, block_steps=6)
    a = banded_gram(rs, client=client, **kw)
    b = banded_gram(rs, scheduler="threads", **kw)
    c = banded_gram(rs, scheduler="sync", **kw)
    assert (
        gram_graph(rs, width=8, groups="default", tile_bytes=kw["tile_bytes"], block_steps=6).tiling.as_dict()[
            "p_ranges"
        ]
        > 1
    )
    assert np.array_equal(a.band, b.band, equal_nan=True)
    assert np.array_equal(a.band, c.band, equal_nan=True)
    _close(a["all"], band_of(deltas(X), 8))


def test_float32_precision_mode_is_close_and_warns(tmp_path):
    from sed_dask.engine.gram import PrecisionWarning

    X = random_walk(np.random.default_rng(6), 12, 20_000)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(12), X)
    with pytest.warns(PrecisionWarning, match="float32"):
        g = banded_gram(rs, w_max=4, scheduler="threads", precision="float32")
    _close(g["all"], band_of(deltas(X), 4), rtol=1e-6)
    with pytest.raises(ValueError, match="precision must be"):
        banded_gram(rs, w_max=4, scheduler="sync", precision="float16")


@pytest.mark.parametrize("row", [0, 4, 9])
def test_nan_in_store_names_run_and_step(tmp_path, row):
    X = random_walk(np.random.default_rng(7), 10, 700)
    rs = write_trajectory(tmp_path / "s.zarr", "seed1", np.arange(10) * 100, X, chunk_bytes=400)
    rs.params[row, 333] = np.nan
    with pytest.raises(StoreError, match=rf"run 'seed1': NaN/Inf in the store at step\(s\) \[{row * 100}\]"):
        banded_gram(rs, w_max=3, scheduler="threads", tile_bytes=2000)


def test_recorded_nonfinite_and_incomplete_ingestion(tmp_path):
    X = random_walk(np.random.default_rng(8), 6, 50)
    rs = write_trajectory(tmp_path / "s.zarr", "a", np.arange(6), X)
    rs.group.attrs["nonfinite"] = [{"step": 3, "file": "ckpt_000003.pt", "tensor": "w", "n_nan": 1, "n_inf": 0}]
    with pytest.raises(StoreError, match=r"run 'a': NaN/Inf recorded at ingestion in step\(s\) \[3\]"):
        banded_gram(rs, w_max=2, scheduler="sync")
    rs2 = write_trajectory(tmp_path / "s.zarr", "b", np.arange(6), X)
    rs2.allocate([6, 7])
    with pytest.raises(StoreError, match=r"run 'b': ingestion is incomplete for steps \[6, 7\]"):
        banded_gram(rs2, w_max=2, scheduler="sync")
    rs3 = write_trajectory(tmp_path / "s.zarr", "c", [5], X[:1])
    with pytest.raises(StoreError, match="run 'c' has 1 checkpoint"):
        banded_gram(rs3, w_max=2, scheduler="sync")


@pytest.mark.parametrize(
    "layout",
    [dict(chunk_bytes=400), dict(chunk_bytes=400, shard_bytes=2000), dict(chunk_bytes=400, compressor="zstd")],
    ids=["plain", "sharded", "zstd"],
)
def test_direct_reads_equal_zarr_reads(tmp_path, layout):
    """Positioned raw reads (uncompressed local layouts) give bit-identical bands to zarr's reader."""
    from sed_dask.engine.rawread import RawChunkReader

    X = random_walk(np.random.default_rng(9), 14, 1037)
    rs = write_trajectory(tmp_path / "s.zarr", "r", np.arange(14), X, **layout)
    reader = RawChunkReader.for_array(rs.params)
    assert (reader is None) == ("compressor" in layout)
    if reader is not None:
        out = np.empty((5, 333), np.float32)
        reader.read(3, 8, 250, 583, out)  # crosses chunk (and shard) borders
        np.testing.assert_array_equal(out, X[3:8, 250:583])
    kw = dict(w_max=5, scheduler="sync", tile_bytes=3000, block_steps=4)
    a = banded_gram(rs, direct_read=True, **kw)
    b = banded_gram(rs, direct_read=False, **kw)
    assert np.array_equal(a.band, b.band, equal_nan=True)
    _close(a["all"], band_of(deltas(X), 5))
