"""The per-process layout cache: a pass over more checkpoints than a count-bounded cache would
hold must parse each file once, not once per task (a cyclic scan defeats a small LRU)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from sed_oracle import window_svds

import sed_dask
from sed_dask.readers import torch_pt
from sed_dask.readers.layout_cache import LayoutCache

N_CKPTS = 80  # more files than the old 64-entry cache held


@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = torch_pt._torch_load

    def counting(path, *, mmap):
        calls.append(str(path))
        return real(path, mmap=mmap)

    monkeypatch.setattr(torch_pt, "_torch_load", counting)
    torch_pt.clear_layout_cache()
    yield calls
    torch_pt.clear_layout_cache()


def test_a_direct_pass_over_many_checkpoints_loads_each_file_once(tmp_path, loads):
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(3000)
    rows = []
    for i in range(N_CKPTS):
        w = w + torch.randn(3000, generator=g) * (1.0 + (i % 5))
        rows.append(w.clone())
        torch.save(
            {"model_state_dict": {"a.weight": w[:1000].reshape(10, 100).clone(), "b.weight": w[1000:].clone()}},
            tmp_path / f"ckpt_{i * 10:05d}.pt",
        )
    run = sed_dask.open_checkpoints(str(tmp_path), run="r", chunk_bytes=1024)  # 256-element column unit
    n_validation = len(loads)
    assert n_validation == N_CKPTS
    ds = sed_dask.spectrum(run, windows=[4], scheduler="threads", progress=False, tile_bytes=80_000)
    assert len(loads) == n_validation  # the pass found every layout cached (before: 80 per P-range task)
    X = np.stack([r.numpy() for r in rows]).astype(np.float64)
    want = np.stack([sv for _, sv, _ in window_svds(np.diff(X, axis=0), 4)])
    got = ds["sigma"].sel(run="r", window=4).values[3:, :4]
    assert np.allclose(got, want, rtol=1e-8)


def test_cache_is_bounded_in_bytes_and_lru():
    limit = [1000]
    cache = LayoutCache(limit=lambda: limit[0])
    built = []

    def build(k):
        built.append(k)
        return f"layout-{k}"

    for k in range(10):
        assert cache.get(k, lambda k=k: build(k), size=lambda _: 300) == f"layout-{k}"
    assert len(cache) == 3 and cache.nbytes == 900  # 3 x 300 fit in 1000 bytes
    cache.get(7, lambda: build(7), size=lambda _: 300)  # 7 is still there: a hit, and now most recent
    cache.get(10, lambda: build(10), size=lambda _: 300)
    assert built == list(range(11)) and len(cache) == 3
    cache.get(7, lambda: build(7), size=lambda _: 300)
    assert built == list(range(11))  # 8 was evicted, 7 was not
    cache.get(11, lambda: build(11), size=lambda _: 5000)  # larger than the bound: kept alone
    assert len(cache) == 1
    cache.get(12, lambda: build(12), size=lambda _: 10, still_valid=lambda: False)  # changed meanwhile
    assert len(cache) == 1 and 12 not in cache._items


def test_concurrent_builds_of_one_key_build_once_and_errors_are_not_cached():
    cache = LayoutCache(limit=lambda: 1 << 20)
    n = []
    gate = threading.Event()

    def slow():
        gate.wait(1.0)
        n.append(1)
        return "x"

    threads = [threading.Thread(target=lambda: cache.get("k", slow, size=len)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert n == [1]

    def boom():
        raise ValueError("unreadable")

    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get("bad", boom, size=len)
    assert "bad" not in cache._items and not cache._building


def test_safetensors_headers_are_parsed_once_per_file_version(tmp_path, monkeypatch):
    import os

    from safetensors.torch import save_file

    from sed_dask.readers import SafetensorsReader, safetensors_file

    calls = []
    real = safetensors_file._read_header
    monkeypatch.setattr(safetensors_file, "_read_header", lambda p: calls.append(p) or real(p))
    safetensors_file.clear_header_cache()
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(4)}, str(p))
    for _ in range(5):
        with SafetensorsReader(p) as r:
            assert np.array_equal(r.read("a", 2, 5), [2, 3, 4])
    assert len(calls) == 1
    st = os.stat(p)
    save_file({"a": torch.arange(10.0) * 2, "b": torch.ones(4)}, str(p))  # same size, new contents
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with SafetensorsReader(p) as r:
        assert np.array_equal(r.read("a", 2, 5), [4, 6, 8])
    assert len(calls) == 2
    p.write_bytes(p.read_bytes()[:40])  # truncated: a new size, parsed again, refused clearly
    with pytest.raises(sed_dask.errors.CheckpointError, match="m.safetensors"):
        SafetensorsReader(p).tensors()
    safetensors_file.clear_header_cache()
