"""Parallel, resumable, validated ingestion of checkpoints into the trajectory store.

One task per (checkpoint, write unit): it opens the checkpoint itself (nothing large travels
through the graph), reads only the tensor slices overlapping its P-range, and writes the whole
shard ``params[row, lo:hi]``, so a task's memory is bounded by the shard, not the model. The
client marks a row complete once all of its ranges succeeded.

Order of work, chosen so that a bad input or an unreachable cluster fails before anything is
written and a crash at any point loses nothing already done:

1. discover steps; load the metrics file; take the run's writer lock (``store.run_lock``), held to
   the end, so that no other client plans or writes this run meanwhile;
2. open the store read-only and plan (skip complete rows, retry incomplete ones, append later
   steps; an earlier step than those stored is an error);
3. apply the selection policy to the first checkpoint (headers plus a few small reads);
4. validate the header-level key set/shapes/dtypes of *every* checkpoint to ingest;
5. connect to the cluster (or start the local pool);
6. create the run / allocate rows, then run the data tasks, marking rows complete as they finish.

Steps 3-4, the 2-checkpoint rule and the metrics parsing are :mod:`sed_dask.sources.validate`'s, shared
with :func:`sed_dask.open_checkpoints` (spectra straight from the files), which must refuse the
same inputs and build the same parameter index.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import time
import uuid
from collections.abc import Mapping

import numpy as np

from sed_dask import config
from sed_dask.errors import CheckpointError, NonFiniteError, SEDError, StoreError
from sed_dask.readers import open_checkpoint
from sed_dask.schema import package_versions, utc_now
from sed_dask.sources.discover import discover_checkpoints
from sed_dask.sources.run_source import check_seed, seed_from_name
from sed_dask.sources.selection import Selection
from sed_dask.sources.validate import (
    STEP_SOURCES,
    CheckpointTodo,
    check_headers,
    check_metric_steps,
    load_metrics_arg,
    policy_for,
    require_deltas,
    steps_from_files,
)
from sed_dask.store.trajectory import RunStore, is_in_memory, open_store, refuse_foreign, run_lock

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IngestSummary:
    """What one :func:`ingest` call did."""

    run: str
    n_new: int  # checkpoints written by this call
    n_skipped: int  # checkpoints already complete in the store, left untouched
    steps: list[int]  # completed steps of the run after this call
    n_params: int
    bytes: int  # float32 bytes written by this call
    seconds: float
    nonfinite: list[dict] = dataclasses.field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"run {self.run!r}: {self.n_new} checkpoint(s) ingested, {self.n_skipped} already complete; "
            f"{len(self.steps)} steps x {self.n_params:,} params; {self.bytes / 1e9:.3f} GB in "
            f"{self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s)"
        )


# ----------------------------------------------------------------------------- the task
def ingest_range(
    path: str,
    step: int,
    row: int,
    lo: int,
    hi: int,
    segments,
    params,
    complete,
    on_nonfinite: str,
    zarr_settings: dict | None = None,
) -> dict:
    """Copy flat params ``[lo, hi)`` of one checkpoint into ``params[row, lo:hi]``.

    ``segments`` are ``(index name, name in file, start, stop)`` slices of the tensors overlapping
    the range, in order. A row already marked complete is never rewritten.
    """
    if zarr_settings is not None:
        with contextlib.suppress(Exception):
            config.configure_zarr(**zarr_settings)
    if complete[row]:
        return {"row": row, "nbytes": 0, "nonfinite": [], "skipped": True}
    buf = np.empty(hi - lo, dtype=np.float32)
    with open_checkpoint(path) as reader:
        pos = 0
        for _, raw, a, b in segments:
            reader.read(raw, a, b, out=buf[pos : pos + b - a])
            pos += b - a
    if pos != hi - lo:
        raise CheckpointError(f"{path}: segments cover {pos} elements of range [{lo}:{hi})")
    bad = []
    if not np.isfinite(buf.sum()):  # one cheap pass; locate offenders only when it fails
        pos = 0
        for name, raw, a, b in segments:
            part = buf[pos : pos + b - a]
            pos += b - a
            n_nan, n_inf = int(np.isnan(part).sum()), int(np.isinf(part).sum())
            if n_nan or n_inf:
                bad.append(
                    {
                        "step": int(step),
                        "file": path,
                        "tensor": name,
                        "name_in_file": raw,
                        "elements": [int(a), int(b)],
                        "n_nan": n_nan,
                        "n_inf": n_inf,
                    }
                )
        if bad and on_nonfinite == "raise":
            b0 = bad[0]
            also = f" (and {len(bad) - 1} more tensor(s) in this range)" if len(bad) > 1 else ""
            raise NonFiniteError(
                f"{path} (step {step}): tensor {b0['tensor']!r} holds {b0['n_nan']} NaN and {b0['n_inf']} Inf "
                f"values in elements [{b0['elements'][0]}:{b0['elements'][1]}]{also}; pass "
                "on_nonfinite='record' (--on-nonfinite record) to store it and record it in the run attrs"
            )
    params.with_config({"write_empty_chunks": True})[row, lo:hi] = buf
    return {"row": row, "nbytes": int(buf.nbytes), "nonfinite": bad, "skipped": False}


# ----------------------------------------------------------------------------- planning
def _existing_run(store, run: str, storage_options) -> RunStore | None:
    """The run opened read-only if the store and run exist, else None (creates nothing)."""
    try:
        ts = open_store(store, mode="r", storage_options=storage_options)
    except StoreError:
        # no store or no runs yet: refuse now (before validation) what is not a trajectory store
        refuse_foreign(store, storage_options)
        return None
    if ts.run_state(run) in ("absent", "half-created"):  # a half-created run is rebuilt by create_run
        return None
    return ts.run(run)


#: the packages whose versions a run's provenance records (the ones that read and store the weights)
INGEST_PACKAGES = ("torch", "safetensors", "zarr", "numpy", "dask", "distributed")


# ----------------------------------------------------------------------------- executors
class _LocalExecutor:
    """Thread pool with the submit/cancel surface used below (the threaded scheduler)."""

    kind = "threads"

    def __init__(self, n: int | None):
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=n or os.cpu_count() or 1, thread_name_prefix="sed-ingest"
        )

    def submit(self, fn, *args, key=None, priority=0):
        return self.pool.submit(fn, *args)

    def cancel(self, futures):
        for f in futures:
            f.cancel()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


class _DaskExecutor:
    kind = "distributed"

    def __init__(self, client):
        self.client = client

    def submit(self, fn, *args, key=None, priority=0):
        return self.client.submit(fn, *args, key=key, pure=False, priority=priority, retries=0)

    def cancel(self, futures):
        self.client.cancel(list(futures))

    def close(self):
        pass


@contextlib.contextmanager
def _executor(in_memory: bool, *, client, address, scheduler_file, scheduler):
    """Threads in this process or a cluster's workers, as ``sed_dask.cluster.placement`` decides (an
    in-memory store lives in this process only, so it is written here unless a cluster is named)."""
    import dask

    from sed_dask.cluster.placement import running

    if in_memory and client is None and not address and not scheduler_file and scheduler is None:
        scheduler = "threads"
    with running(client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler) as where:
        if where.local:
            ex = _LocalExecutor(1 if where.scheduler == "sync" else dask.config.get("num_workers", None))
            try:
                yield ex
            finally:
                ex.close()
        else:
            yield _DaskExecutor(where.client)


# ----------------------------------------------------------------------------- ingest
def _plan(existing: RunStore | None, ckpts: Mapping[int, str], run: str) -> tuple[list[CheckpointTodo], list[int]]:
    """``(todo, skipped steps)``: which steps are done, which to (re)write, which are new."""
    row_steps = existing.row_steps() if existing is not None else np.zeros(0, np.int64)
    done = existing.completed() if existing is not None else np.zeros(0, bool)
    row_of = {int(s): i for i, s in enumerate(row_steps) if s >= 0}
    valid = row_steps[row_steps >= 0]
    last = int(valid.max()) if valid.size else None
    todo: list[CheckpointTodo] = []
    skipped = []
    for step, path in ckpts.items():
        path = os.path.abspath(path)  # workers may run elsewhere in the shared filesystem
        if step in row_of:
            if done[row_of[step]]:
                skipped.append(step)
            else:
                todo.append(CheckpointTodo(step, path, row_of[step], {}))
        elif last is not None and step < last:
            raise StoreError(
                f"run {run!r}: step {step} ({path}) is earlier than the last stored step {last}; "
                "a run can only be extended with later steps (nothing was written)"
            )
        else:
            todo.append(CheckpointTodo(step, path, None, {}))
    require_deltas(run, len(set(row_of) | set(ckpts)), ckpts.values())
    return todo, skipped


def ingest(
    sources,
    store,
    run: str,
    *,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    steps=None,
    metrics=None,
    policy=None,
    include=None,
    exclude=None,
    on_nonfinite: str | None = None,
    chunk_bytes=None,
    shard_bytes=None,
    compressor=None,
    storage_options: dict | None = None,
    tasks_in_flight: int | None = None,
    lock_timeout: float = 0,
    progress: bool = True,
    step_source: str = "name",
    metrics_nonfinite: str = "warn",
    seed: int | None = None,
) -> IngestSummary:
    """Ingest checkpoints into run ``run`` of a trajectory store; resumable and idempotent.

    ``sources``: a directory, a glob, a list of files/directories, or a ``{step: path}`` mapping.
    ``steps`` restricts ingestion to those steps. ``metrics``: a JSON/CSV file or a parsed object
    (see :mod:`sed_dask.sources.metrics`). ``policy``/``include``/``exclude``: the parameter selection
    (:mod:`sed_dask.sources.selection`; an existing run keeps its own when none is given).
    ``on_nonfinite``: ``"raise"`` (default) or ``"record"``. Where the tasks run follows dask's rules
    (:mod:`sed_dask.cluster.placement`): ``scheduler=``, then ``client``/``address``/``scheduler_file``,
    an active Client, a configured cluster, the ``dask.config`` scheduler, else threads in this
    process (always for an in-memory store unless a cluster is named); a cluster is reached before
    anything is written. ``tasks_in_flight`` bounds the tasks submitted at once (default
    ``sed_dask.ingest.tasks-in-flight``). ``step_source``: a checkpoint's step comes from its file
    name ("name", the default; a file recording another step gets a ``StepMismatchWarning``) or
    from the step the file records ("file"). ``metrics_nonfinite``: explicit NaN/Inf metric values
    are kept with a warning ("warn", default), refused ("raise") or kept silently ("ignore");
    metrics whose steps match no checkpoint are refused. ``seed``: the run's training seed, recorded
    with the run (default: the one its name spells, e.g. ``seed3``); results carry it as the ``seed``
    coordinate on ``run``. A run keeps the seed it was first given.

    One call at a time per run: the call holds the run's writer lock (:func:`sed_dask.store.run_lock`,
    an OS file lock next to a local store) from planning to its last write; another call into the
    same run raises :class:`~sed_dask.store.RunLockedError` at once, or after waiting up to
    ``lock_timeout`` seconds. Other runs of the store are not blocked. Stores that are not on a
    filesystem (``memory://``, ``s3://`` and other fsspec URLs) are not locked: do not ingest into
    one run of them from two places at once.
    """
    from sed_dask.cluster.client import check_not_reimported

    check_not_reimported("sed_dask.ingest()")
    t0 = time.perf_counter()
    on_nonfinite = config.get("ingest.on-nonfinite", on_nonfinite)
    if on_nonfinite not in ("raise", "record"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'record', got {on_nonfinite!r}")
    if step_source not in STEP_SOURCES:
        raise ValueError(f"step_source must be one of {STEP_SOURCES}, got {step_source!r}")
    ckpts = discover_checkpoints(sources, steps=None if step_source == "file" else steps)
    if step_source == "file":
        ckpts = steps_from_files(ckpts)
        if steps is not None:
            ckpts = discover_checkpoints(ckpts, steps=steps)
    metric_data, metric_source = load_metrics_arg(metrics, nonfinite=metrics_nonfinite)
    seed = check_seed(seed)
    with run_lock(store, run, timeout=lock_timeout):
        existing = _existing_run(store, run, storage_options)  # read-only: nothing is written before validation
        seed = _run_seed(existing, run, seed)
        todo, skipped = _plan(existing, ckpts, run)
        check_metric_steps(
            metric_data, metric_source, list(ckpts) + ([] if existing is None else existing.row_steps().tolist())
        )
        pol = policy_for(existing, policy, include, exclude)
        if existing is not None and not pol.same_as(existing.policy):
            raise StoreError(
                f"run {run!r} was written with selection policy {_spec_str(existing.policy)}; "
                f"this call asks for {_spec_str(pol.spec())}; use the same policy or a new run"
            )
        if not todo:
            rs = open_store(store, storage_options=storage_options).run(run)
            if metric_data is not None:
                _store_metrics(rs, metric_data, metric_source)
            if seed is not None and rs.attrs.get("seed") is None:
                rs.update_attrs(seed=seed)
            return IngestSummary(
                run, 0, len(skipped), [int(s) for s in rs.steps], rs.n_params, 0, time.perf_counter() - t0
            )
        # the first checkpoint to ingest defines the key set; every other one must match it
        sel, fmt = check_headers(todo, pol, existing, run, step_source=step_source)
        with _executor(
            is_in_memory(store), client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler
        ) as ex:
            rs = _allocate(
                store,
                run,
                storage_options,
                existing,
                todo,
                sel,
                fmt,
                chunk_bytes=chunk_bytes,
                shard_bytes=shard_bytes,
                compressor=compressor,
            )
            if seed is not None and rs.attrs.get("seed") is None:
                rs.update_attrs(seed=seed)
            if metric_data is not None:
                _store_metrics(rs, metric_data, metric_source)
            res = _run_tasks(ex, rs, run, todo, sel, on_nonfinite, tasks_in_flight, progress, t0, where=str(store))
    n_new, nbytes, nonfinite, failed = res
    if failed:
        by_step = sorted(((td.step, failed[td.row]) for td in todo if td.row in failed), key=lambda x: x[0])
        first = by_step[0][1]
        if not isinstance(first, (SEDError, OSError)):
            logger.error("run %r: step %s failed with an unexpected error", run, by_step[0][0])
            raise first
        cls = type(first) if isinstance(first, SEDError) else CheckpointError
        detail = "; ".join(f"step {s}: {e}" for s, e in by_step[:3])
        raise cls(
            f"ingestion of run {run!r} failed for {len(failed)} checkpoint(s), whose rows stay incomplete "
            f"(completed rows are kept; fix the input and re-run): {detail}"
        ) from first
    return IngestSummary(
        run, n_new, len(skipped), [int(s) for s in rs.steps], rs.n_params, nbytes, time.perf_counter() - t0, nonfinite
    )


def _run_seed(existing: RunStore | None, run: str, seed: int | None) -> int | None:
    """The seed to record: the one given, else the name's; an existing run's recorded seed must agree."""
    recorded = None if existing is None else existing.attrs.get("seed")
    if recorded is not None and seed is not None and int(recorded) != seed:
        raise StoreError(
            f"run {run!r} was recorded with seed {recorded}; this call says seed={seed} "
            "(a run keeps its seed: use a new run name)"
        )
    return seed if seed is not None else seed_from_name(run) if recorded is None else int(recorded)


def _allocate(
    store, run, storage_options, existing, todo, sel, fmt, *, chunk_bytes, shard_bytes, compressor
) -> RunStore:
    """Create the run or open it, and give every new step a row: the first writes of a call."""
    ts = open_store(store, storage_options=storage_options)
    if existing is None:
        prov = {
            "created": utc_now(),
            "source_format": fmt,
            "library_versions": package_versions(INGEST_PACKAGES),
            "first_checkpoint": os.path.abspath(todo[0].path),
            "source_dtypes": sorted({e.source_dtype for e in sel.index}),
        }
        rs = ts.create_run(
            run,
            index=sel.index,
            policy=sel.record(),
            chunk_bytes=chunk_bytes,
            shard_bytes=shard_bytes,
            compressor=compressor,
            attrs={"provenance": prov},
        )
    else:
        rs = ts.run(run)
        if chunk_bytes is not None or shard_bytes is not None:
            logger.warning("run %r exists: its chunk/shard layout is kept, chunk_bytes/shard_bytes ignored", run)
    new = [td for td in todo if td.row is None]
    for td, r in zip(new, rs.allocate([td.step for td in new])):
        td.row = int(r)
    rs.record_sources({td.step: os.path.abspath(td.path) for td in todo})
    all_steps = rs.row_steps()
    spans = sorted({int(d) for d in np.diff(all_steps)}) if all_steps.size > 1 else []
    rs.update_attrs(step_spans=spans[:20])
    if len(spans) > 1:
        logger.info("run %r: uneven checkpoint spacing %s (deltas are not normalised by step span)", run, spans[:5])
    return rs


def _run_tasks(
    ex,
    rs: RunStore,
    run: str,
    todo: list[CheckpointTodo],
    sel: Selection,
    on_nonfinite: str,
    tasks_in_flight,
    progress: bool,
    t0: float,
    *,
    where: str | None = None,
):
    """Run the data tasks, marking rows complete as they finish; ``(n_new, bytes, nonfinite, failed)``."""
    ranges = rs.write_ranges()
    segs_of = [[(e.name, lo0, hi0) for e, lo0, hi0 in sel.index.segments(lo, hi)] for lo, hi in ranges]
    settings = config.zarr_settings() if hasattr(config, "zarr_settings") else None
    nonfinite: list[dict] = []
    failed: dict[int, BaseException] = {}
    n_new = nbytes = 0
    window = max(1, int(config.get("ingest.tasks-in-flight", tasks_in_flight)))
    jobs = ((i, td, lo, hi, segs) for i, td in enumerate(todo) for (lo, hi), segs in zip(ranges, segs_of))
    remaining = {td.row: len(ranges) for td in todo}
    raced: set[int] = set()
    done_q: queue.Queue = queue.Queue()
    pending: dict = {}

    def submit_more():
        # a bounded window of tasks in flight: a 1,000-checkpoint x 600-shard run never puts
        # 600k tasks on the scheduler, and earlier checkpoints complete (and are marked) first
        for i, td, lo, hi, segs in itertools.islice(jobs, max(0, window - len(pending))):
            s = [(n, td.names[n], a, b) for n, a, b in segs]
            f = ex.submit(
                ingest_range,
                td.path,
                td.step,
                td.row,
                lo,
                hi,
                s,
                rs.params,
                rs._complete,
                on_nonfinite,
                settings,
                key=f"sed-ingest-{run}-{td.step}-{lo}-{uuid.uuid4().hex[:8]}",
                priority=-i,
            )
            pending[f] = td
            f.add_done_callback(done_q.put)

    from sed_dask.progress import Bar

    bar = Bar(len(todo) * len(ranges), desc=f"ingest {run}", unit="range", enabled=progress)
    ok = False
    try:
        submit_more()
        while pending:
            try:
                f = done_q.get(timeout=0.5)
            except queue.Empty:
                continue
            td = pending.pop(f, None)
            if td is None:
                continue
            try:
                res = f.result()
            except Exception as exc:  # data-level failure: this row stays incomplete
                failed.setdefault(td.row, exc)
            else:
                nbytes += res["nbytes"]
                nonfinite += res["nonfinite"]
                remaining[td.row] -= 1
                if res["skipped"]:  # another writer completed this row meanwhile (an unlocked store)
                    raced.add(td.row)
                if remaining[td.row] == 0 and td.row not in failed:
                    rs.mark_complete(td.row)
                    n_new += td.row not in raced
            del f
            bar.update(1)
            submit_more()
        ok = not failed
    except BaseException:
        ex.cancel(list(pending))
        raise
    finally:
        bar.close(ok=ok, where=where, what=f"{n_new} checkpoint(s) in {bar.n} range(s), {nbytes / 1e9:.3f} GB")
        if nonfinite:
            rs.record_nonfinite(sorted(nonfinite, key=lambda d: (d["step"], d["elements"][0])))
        log = list(rs.attrs.get("ingest_log", []))
        log.append(
            {
                "time": utc_now(),
                "executor": ex.kind,
                "n_new": n_new,
                "n_failed": len(failed),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        rs.update_attrs(ingest_log=log[-50:])
    return n_new, nbytes, nonfinite, failed


def _spec_str(spec: Mapping) -> str:
    return f"{spec.get('name')} v{spec.get('version')} {spec.get('options')}"


def _store_metrics(rs: RunStore, data: dict, source: str | None) -> None:
    rs.set_metrics(data["step"], {k: v for k, v in data.items() if k != "step"})
    rs.update_attrs(metrics_source=source)
