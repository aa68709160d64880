"""The run writer lock and the connect-before-write order of ``ingest``: real stores, real checkpoints,
a lock held by a real second process (flock semantics across processes, release on SIGKILL)."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import warnings

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from models import flatten, make_trajectory, write_pt

from sed_dask.errors import StoreError
from sed_dask.store.ingest import ingest
from sed_dask.store.trajectory import RunLockedError, RunStore, open_store, run_lock, run_lock_path

SMALL = {"chunk_bytes": 4096, "shard_bytes": 16384}

HOLDER = """
import sys, time
from sed_dask.store import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(5)


@pytest.fixture(scope="module")
def files(traj, tmp_path_factory):
    return write_pt(traj, tmp_path_factory.mktemp("ck"))


def ingest_t(sources, store, run, **kw):
    kw.setdefault("scheduler", "sync")
    kw.setdefault("progress", False)
    for k, v in SMALL.items():
        kw.setdefault(k, v)
    return ingest(sources, store, run, **kw)


def snapshot(root):
    """Every file under ``root``: relative path -> (bytes, mtime_ns)."""
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def want_rows(traj):
    names = traj.trainable_names()
    return np.stack([flatten(sd, names) for sd in traj.state_dicts])


def hold_lock(store, run, seconds=600.0):
    """A separate process holding the run's lock; returns once it has it."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store), run, str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([child.stdout], [], [], 30)
    line = child.stdout.readline() if ready else ""
    if line.strip() != "locked":
        child.kill()
        pytest.fail(f"lock holder did not start: {line!r} {child.communicate()[1][-2000:]}")
    return child


def kill(child):
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the lock
def test_locked_run_fails_fast_writes_nothing_and_sigkill_leaves_no_stale_lock(traj, files, tmp_path):
    store = tmp_path / "s.zarr"
    ingest_t(files, store, "r", steps=traj.steps[:2])
    child = hold_lock(store, "r")
    try:
        before = snapshot(store)
        t0 = time.monotonic()
        with pytest.raises(
            RunLockedError,
            match=(
                rf"run 'r' of store {re.escape(os.path.realpath(store))} is being ingested by pid {child.pid} "
                rf"on host {re.escape(socket.gethostname())} since 20\d\d-.*nothing was written"
            ),
        ) as ei:
            ingest_t(files, store, "r", metrics={"step": traj.steps, "val_loss": [1.0] * 5})
        assert time.monotonic() - t0 < 5  # fails fast, no waiting
        assert isinstance(ei.value, StoreError)
        assert snapshot(store) == before
    finally:
        kill(child)
    # the kernel released the killed holder's lock: the next call proceeds
    s = ingest_t(files, store, "r")
    assert (s.n_new, s.n_skipped, s.steps) == (3, 2, traj.steps)
    rs = open_store(store, mode="r").run("r")
    assert np.array_equal(rs.read(slice(None)), want_rows(traj))


def test_other_runs_of_the_store_are_not_blocked(traj, files, tmp_path):
    store = tmp_path / "s.zarr"
    ingest_t(files, store, "seed0", steps=traj.steps[:2])
    child = hold_lock(store, "seed0")
    try:
        s = ingest_t(files, store, "seed1")
        assert s.steps == traj.steps
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            ingest_t(files, store, "seed0")
    finally:
        kill(child)
    ts = open_store(store, mode="r")
    assert ts.runs == ["seed0", "seed1"] and ts.run("seed0").steps.tolist() == traj.steps[:2]


def test_lock_timeout_waits_for_the_holder(traj, files, tmp_path):
    store = tmp_path / "s.zarr"
    # another thread of this very process: flock excludes separate opens in one process too
    with run_lock(store, "r"):
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"by pid {os.getpid()} .*\(waited 0.3 s\)"):
            ingest_t(files, store, "r", lock_timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5
    assert not store.exists()
    child = hold_lock(store, "r", seconds=0.5)  # exits by itself shortly
    try:
        s = ingest_t(files, store, "r", lock_timeout=60)
    finally:
        child.wait(30)
    assert child.returncode == 0 and s.steps == traj.steps


def test_lock_released_on_keyboard_interrupt(traj, files, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"

    def interrupted(self, row, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunStore, "mark_complete", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ingest_t(files, store, "r", scheduler="threads")
    with run_lock(store, "r") as path:  # free again
        assert path is not None
    s = ingest_t(files, store, "r")
    assert s.n_new == 5 and s.steps == traj.steps


def test_lock_path_is_beside_the_store_and_shared_by_every_name(tmp_path):
    store = tmp_path / "s.zarr"
    want = str(tmp_path / ".s.zarr.sed_dask-locks" / "r.lock")
    g = zarr.open_group(store, mode="a")
    assert run_lock_path(store, "r") == run_lock_path(str(store), "r") == want
    assert run_lock_path(f"file://{store}", "r") == run_lock_path(g, "r") == want
    assert run_lock_path(open_store(f"file://{store}"), "r") == want
    os.symlink(store, tmp_path / "link.zarr")
    assert run_lock_path(tmp_path / "link.zarr", "r") == want
    assert run_lock_path("memory://x/s.zarr", "r") is None and run_lock_path("s3://b/s.zarr", "r") is None
    with run_lock("memory://x/s.zarr", "r") as p:
        assert p is None
    for bad in ("", "a/b", ".."):
        with pytest.raises(StoreError, match="invalid run name"):
            run_lock_path(store, bad)


# ----------------------------------------------------------------------------- connect before writing
def test_unreachable_scheduler_leaves_the_store_unchanged(traj, files, tmp_path):
    store, fresh = tmp_path / "s.zarr", tmp_path / "fresh.zarr"
    ingest_t(files, store, "r", steps=traj.steps[:2])
    before = snapshot(store)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    kw = {"address": addr, "progress": False, **SMALL}
    with dask.config.set({"sed_dask.connect.timeout": "1s"}):
        # three new rows to allocate and metrics to write: none of it may happen
        with pytest.raises(ConnectionError, match=f"could not reach a Dask scheduler at {addr} within 1 s"):
            ingest(files, store, "r", metrics={"step": traj.steps, "val_loss": [1.0] * 5}, **kw)
        with pytest.raises(ConnectionError, match=f"could not reach a Dask scheduler at {addr}"):
            ingest(files, fresh, "r", **kw)
    assert snapshot(store) == before
    assert not fresh.exists()
    s = ingest_t(files, store, "r")  # and the lock was released
    assert (s.n_new, s.n_skipped) == (3, 2)


# ----------------------------------------------------------------------------- readers
def test_readers_and_reingest_ignore_the_lock(traj, files, tmp_path):
    store = tmp_path / "s.zarr"
    with warnings.catch_warnings():
        # zarr warns about any unrecognised file inside the hierarchy: there must be none
        warnings.simplefilter("error", zarr.errors.ZarrUserWarning)
        s = ingest_t(files, store, "r")
        lock = run_lock_path(store, "r")
        assert s.steps == traj.steps and os.path.isfile(lock)
        assert not any("lock" in f for f in snapshot(store))
        ts = open_store(store, mode="r")
        assert ts.runs == ["r"] and ts.run("r").check_complete().tolist() == traj.steps
        assert {k for k, _ in zarr.open_group(store, mode="r").members(max_depth=None)} >= {
            "r",
            "r/params",
            "r/steps",
            "r/complete",
        }
        ds = xr.open_zarr(store, group="r", consolidated=False)
        assert ds["params"].dims == ("row", "param")
        assert np.array_equal(ds["params"].values, want_rows(traj))
        again = ingest_t(files, store, "r")
        assert (again.n_new, again.n_skipped) == (0, 5)
    with open(lock) as f:
        assert f.read() == ""  # no holder record is left behind
