"""Trajectory stores addressed by paths and fsspec URLs (file://, memory://) with storage_options."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from sed_dask.errors import StoreError
from sed_dask.store.trajectory import open_store, write_trajectory

STEPS = [0, 10, 20, 35, 50]


def _traj(P=1000, seed=0):
    rng = np.random.default_rng(seed)
    # values that are exact only if nothing is re-rounded: tiny, huge and subnormal float32
    X = rng.standard_normal((len(STEPS), P)).astype(np.float32)
    X[:, :3] = np.float32([1e-40, 3.4e38, -0.0])
    return X


def _url(kind, tmp_path):
    if kind == "path":
        return str(tmp_path / "a" / "store.zarr"), None
    if kind == "file":
        return f"file://{tmp_path}/b/nested/store.zarr", None
    if kind == "file+options":
        return f"file://{tmp_path}/c/store.zarr", {"auto_mkdir": True}
    if kind == "memory":
        return f"memory://sed-{uuid.uuid4().hex}/store.zarr", None
    if kind == "memory+options":
        return f"memory://sed-{uuid.uuid4().hex}/store.zarr", {"skip_instance_cache": True}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["path", "file", "file+options", "memory", "memory+options"])
def test_write_reopen_read_back_bit_exact(kind, tmp_path):
    url, so = _url(kind, tmp_path)
    X = _traj()
    ts = open_store(url, storage_options=so)
    write_trajectory(
        ts, "seed0", STEPS, X, chunk_bytes=1024, shard_bytes=4096, metrics={"val_loss": [3.0, 2.5, 2.0, 1.9, 1.8]}
    )
    # reopen read-only from the URL alone, as a worker would
    again = open_store(url, mode="r", storage_options=so)
    run = again.run("seed0")
    got = run.read(slice(None))
    assert got.dtype == np.float32 and got.tobytes() == X.tobytes()
    assert run.steps.tolist() == STEPS
    assert run.params.chunks == (1, 256) and run.params.shards == (1, 1024)
    assert run.metrics()["val_loss"].tolist() == [3.0, 2.5, 2.0, 1.9, 1.8]
    # .url names the same store (a URL for fsspec stores, not a repr) and opens it again
    assert "://" in again.url and "<" not in again.url
    assert open_store(again.url, mode="r", storage_options=so).run("seed0").read(1).tobytes() == X[1].tobytes()


def test_read_only_open_of_a_missing_url_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="no trajectory store"):
        open_store(f"file://{tmp_path}/absent.zarr", mode="r")


def test_workers_in_other_processes_reopen_a_file_url(client, tmp_path):
    """Tasks on worker processes reopen the store from its URL and read the same bytes."""
    X = _traj(P=600, seed=1)
    ts = open_store(f"file://{tmp_path}/shared.zarr")
    write_trajectory(ts, "r", STEPS, X, chunk_bytes=512, shard_bytes=1024)
    url = ts.url

    def read_rows(u, rows):
        import os

        from sed_dask.store.trajectory import open_store

        return os.getpid(), open_store(u, mode="r").run("r").read(rows)

    futs = [client.submit(read_rows, url, slice(i, i + 1), pure=False) for i in range(len(STEPS))]
    pids, parts = zip(*client.gather(futs))
    assert np.concatenate(parts).tobytes() == X.tobytes()
    assert os.getpid() not in pids
