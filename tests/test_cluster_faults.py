"""Ingestion and the spectrum pass on real ``dask scheduler``/``dask worker`` processes: results equal
to the threaded scheduler, a worker SIGKILLed mid-spectrum and mid-ingest, an unreachable scheduler.

Every store lives on disk in ``tmp_path`` (worker processes cannot see an in-memory store). Workers
run without a nanny, so a SIGKILL is a lost node: nothing restarts it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import xarray as xr
from distributed import KilledWorker
from procs import DaskProcs, dask_procs  # noqa: F401  (fixture)
from safetensors.numpy import save_file

import sed_dask
from sed_dask.store.ingest import ingest
from sed_dask.store.trajectory import open_store, write_trajectory

MARGIN = 3.0  # seconds on top of a timeout: thread start-up and a loaded 2-core machine
INGEST_SMALL = {"chunk_bytes": 64 * 1024, "shard_bytes": 256 * 1024}  # 16 write units per row below
LAYERS, SHAPE = 4, (256, 1024)  # 1,048,576 float32 params (4 MiB) per checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoints(directory, n: int, seed: int = 0) -> dict[int, str]:
    """``n`` safetensors checkpoints of a random walk over GPT-named tensors (no torch needed)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    state = {f"transformer.h.{i}.mlp.c_fc.weight": rng.standard_normal(SHAPE, dtype=np.float32) for i in range(LAYERS)}
    out = {}
    for k in range(n):
        if k:
            state = {name: v + 0.01 * rng.standard_normal(SHAPE, dtype=np.float32) for name, v in state.items()}
        p = os.path.join(directory, f"model_{k * 100}.safetensors")
        save_file(state, p, metadata={"step": str(k * 100)})
        out[k * 100] = p
    return out


def _row_files(store, run, rows) -> dict:
    """row -> sorted (file, mtime_ns, size) of its stored shards: equal means never rewritten."""
    out = {}
    for r in rows:
        d = os.path.join(store, run, "params", "c", str(int(r)))
        out[int(r)] = sorted(
            (os.path.join(dp, f), os.stat(os.path.join(dp, f)).st_mtime_ns, os.path.getsize(os.path.join(dp, f)))
            for dp, _, fs in os.walk(d)
            for f in fs
        )
    return out


def _same_values(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical Datasets up to the creation time stamp (values compared bit for bit, NaN == NaN)."""
    a, b = a.copy(), b.copy()
    a.attrs.pop("created"), b.attrs.pop("created")
    xr.testing.assert_identical(a, b)
    for name in a.data_vars:
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


def _in_thread(fn, *args, **kw):
    """Run ``fn`` in a thread; the returned dict gets ``result`` or ``error`` when it ends."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001  (reported to the test)
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    box["thread"] = t
    return box


def _worker_load(client, name: str) -> tuple[int, int]:
    """(tasks processing on, keys held by) worker ``name``, as the scheduler sees them now."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    addr = next(a for a, w in info.items() if str(w["name"]) == name)
    return len(client.processing([addr]).get(addr, ())), len(client.has_what([addr]).get(addr, ()))


def _executed(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count, on_error="ignore").values())


# ----------------------------------------------------------------------------- spectrum
N_STEPS, P_SPEC = 25, 200_000  # 20 MB float32 trajectory, ~300 tasks at 256 KiB tiles
# no-nanny workers do not get the nanny's OPENBLAS_NUM_THREADS=1; on 2 cores that halves the pass speed
BLAS1 = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC_KW = {"windows": (3, 10), "tile_bytes": 256 * 1024, "block_steps": 12, "progress": False}


@pytest.fixture(scope="module")
def spec_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("spec") / "s.zarr"
    rng = np.random.default_rng(7)
    X = np.cumsum(rng.standard_normal((N_STEPS, P_SPEC), dtype=np.float32), axis=0)
    write_trajectory(store, "r", np.arange(N_STEPS) * 10, X, chunk_bytes=256 * 1024)
    baseline = sed_dask.spectrum(store, scheduler="threads", **SPEC_KW)
    assert np.isfinite(baseline.sigma.sel(window=10).values[0, 9:, :10]).all()
    return store, baseline


def test_spectrum_survives_a_worker_sigkilled_mid_pass(spec_store, tmp_path):
    store, baseline = spec_store
    with DaskProcs(tmp_path / "dask", env=BLAS1) as procs:
        _spectrum_kill(procs, store, baseline)


def _spectrum_kill(dask_procs, store, baseline):
    dask_procs.start_scheduler(wait=False)
    dask_procs.start_workers(3, nthreads=1, memory_limit="1GiB")
    addr = dask_procs.address

    # first an undisturbed pass by address: identical to the threaded scheduler
    _same_values(sed_dask.spectrum(store, address=addr, **SPEC_KW), baseline)
    n_tasks = len(
        sed_dask.engine.gram.gram_graph(
            open_store(store, mode="r").run("r"),
            width=11,
            tile_bytes=SPEC_KW["tile_bytes"],
            block_steps=SPEC_KW["block_steps"],
        ).dsk
    )
    assert n_tasks > 250  # many small tasks, so the kill lands in the middle of the pass

    with dask_procs.client() as mon:
        start = _executed(mon)
        box = _in_thread(sed_dask.spectrum, store, address=addr, **SPEC_KW)
        deadline = time.monotonic() + 60
        while True:
            assert box["thread"].is_alive(), f"the pass ended before the kill: {box}"
            assert time.monotonic() < deadline, "the pass made no progress"
            done = _executed(mon) - start
            if done >= n_tasks // 5 and sum(_worker_load(mon, "w0")) > 0:
                break
            time.sleep(0.02)
        load = _worker_load(mon, "w0")
        dask_procs.kill_worker("w0")
        assert dask_procs.workers["w0"].popen.returncode == -signal.SIGKILL
        box["thread"].join(120)
        assert not box["thread"].is_alive(), "the pass hung after the kill"
        assert done < n_tasks, (done, n_tasks)  # the kill came before the pass ended
        assert "error" not in box, box.get("error")
        assert len(mon.scheduler_info(n_workers=-1)["workers"]) == 2  # w0 is gone, not replaced
    assert sum(load) > 0  # w0 was running or holding part of the pass when it died
    _same_values(box["result"], baseline)


# ----------------------------------------------------------------------------- ingest
N_CKPTS = 12


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    files = _checkpoints(d / "st", N_CKPTS)
    base = d / "base.zarr"
    s = ingest(files, base, "r", scheduler="threads", progress=False, **INGEST_SMALL)
    assert s.n_new == N_CKPTS
    return files, open_store(base, mode="r").run("r").read(slice(None))


def _assert_store_equals(store, want):
    rs = open_store(store, mode="r").run("r")
    assert rs.check_complete().tolist() == [k * 100 for k in range(N_CKPTS)]
    got = rs.read(slice(None))
    assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_ingest_by_address_equals_threads(dask_procs, ckpts, tmp_path):
    files, want = ckpts
    dask_procs.start_scheduler(wait=False)
    dask_procs.start_workers(2, nthreads=1, memory_limit="1GiB")
    s = ingest(files, tmp_path / "a.zarr", "r", address=dask_procs.address, progress=False, **INGEST_SMALL)
    assert (s.n_new, s.n_skipped) == (N_CKPTS, 0)
    _assert_store_equals(tmp_path / "a.zarr", want)
    rs = open_store(tmp_path / "a.zarr", mode="r").run("r")
    assert rs.attrs["ingest_log"][-1]["executor"] == "distributed"
    # and the spectrum of that store by address equals the threaded one, bit for bit
    kw = {"windows": (4,), "tile_bytes": 512 * 1024, "progress": False}
    _same_values(
        sed_dask.spectrum(tmp_path / "a.zarr", address=dask_procs.address, **kw),
        sed_dask.spectrum(tmp_path / "a.zarr", scheduler="threads", **kw),
    )


@pytest.mark.parametrize("allowed_failures", [None, 0], ids=["retried", "killedworker"])
def test_ingest_resumes_after_a_worker_sigkilled_mid_run(ckpts, tmp_path, allowed_failures):
    """Default: the scheduler reruns the lost tasks and the call completes. With
    ``allowed-failures: 0`` the task that was running on the dead worker fails with KilledWorker,
    the call raises, and a re-run completes the missing rows without touching completed ones."""
    files, want = ckpts
    # no scheduler-side queuing: tasks in flight sit on the workers, so w0 always has some when killed
    env = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "inf"}
    if allowed_failures is not None:
        env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = str(allowed_failures)
    store = tmp_path / "s.zarr"
    with DaskProcs(tmp_path / "dask", env=env) as procs:
        procs.start_scheduler(wait=False)
        procs.start_workers(3, nthreads=1, memory_limit="1GiB")
        addr = procs.address
        with procs.client() as mon:
            box = _in_thread(
                ingest, files, store, "r", address=addr, progress=False, tasks_in_flight=12, **INGEST_SMALL
            )
            deadline = time.monotonic() + 60
            while True:
                assert box["thread"].is_alive(), f"ingest ended before the kill: {box}"
                assert time.monotonic() < deadline, "ingest made no progress"
                with_rows = os.path.isdir(store / "r" / "complete")
                n_done = int(open_store(store, mode="r").run("r").completed().sum()) if with_rows else 0
                # w0 holds a task: with no retries it is lost with w0 (or, if the kill races with
                # its end, nothing is lost; both outcomes are checked below). Waiting for two tasks
                # on w0 could miss the window on a loaded machine (the ingest then ends first).
                if n_done >= 3 and _worker_load(mon, "w0")[0] >= 1:
                    break
                time.sleep(0.01)
            procs.kill_worker("w0")
            done_at_kill = open_store(store, mode="r").run("r").completed()
            files_at_kill = _row_files(store, "r", np.flatnonzero(done_at_kill))
            box["thread"].join(120)
            assert not box["thread"].is_alive(), "ingest hung after the kill"
        assert 3 <= done_at_kill.sum() < N_CKPTS, done_at_kill
        if allowed_failures is None:
            assert "error" not in box, repr(box.get("error"))
            assert box["result"].n_new == N_CKPTS
        elif "error" in box:
            # with no retries a task lost with w0 fails the call with KilledWorker ...
            assert isinstance(box["error"], KilledWorker), repr(box)
            rs = open_store(store, mode="r").run("r")
            assert not rs.completed().all()  # the failed row stays incomplete
            assert rs.attrs["ingest_log"][-1]["n_failed"] >= 1
        else:
            # ... unless the kill raced with w0 finishing its last task (seen ~1 in 9 runs): then
            # nothing was lost and the call completed; the re-run below must still change nothing
            assert box["result"].n_new == N_CKPTS
        # the re-run (on the same, now smaller, cluster) finishes whatever is missing
        again = ingest(files, store, "r", address=addr, progress=False, **INGEST_SMALL)
    assert again.n_skipped + again.n_new == N_CKPTS and again.n_skipped >= done_at_kill.sum()
    if allowed_failures is not None and "error" in box:
        assert again.n_new >= 1
    _assert_store_equals(store, want)
    # rows completed before the kill were never rewritten (not by the killed call, not by the re-run)
    assert _row_files(store, "r", np.flatnonzero(done_at_kill)) == files_at_kill


# ----------------------------------------------------------------------------- unreachable
@pytest.mark.parametrize("entry", ["spectrum", "ingest"])
def test_unreachable_scheduler_fails_fast_and_clearly(entry, spec_store, ckpts, tmp_path):
    addr = f"tcp://127.0.0.1:{_free_port()}"
    store = spec_store[0] if entry == "spectrum" else tmp_path / "s.zarr"
    import dask

    with dask.config.set({"sed_dask.connect.timeout": "2s"}):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=f"could not reach a Dask scheduler at {addr} within 2 s"):
            if entry == "spectrum":
                sed_dask.spectrum(store, address=addr, **SPEC_KW)
            else:
                ingest(ckpts[0], store, "r", address=addr, progress=False, **INGEST_SMALL)
        elapsed = time.monotonic() - t0
    assert elapsed < 2 + MARGIN, elapsed
