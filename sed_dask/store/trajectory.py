"""The Zarr v3 trajectory store: one group per run holding ``params (step, P)`` float32.

Layout (one store may hold many runs, e.g. seeds)::

    <root>/                       attrs: sed_dask_store_format
      <run>/                      attrs: provenance, selection policy, parameter index + hash
        params   (row, P) float32 chunks (1, chunk) shards (1, shard), fill NaN
        steps    (row,)   int64   training step of each row, strictly increasing
        complete (row,)   uint8   completion record, one Zarr chunk per row (no shared writes)
        metrics/                  step (m,) int64 + one float64 array per metric name

Rows are allocated by the client before any data task runs; a row counts only once its
``complete`` flag is 1, so a crash at any point leaves completed rows intact and re-running
ingestion rewrites only incomplete rows. Writers always own whole shards.

One client at a time may plan and write a run: :func:`run_lock` takes an OS file lock that lives
*next to* the store (``<parent>/.<store name>.sed_dask-locks/<run>.lock``), because zarr warns
about any file it does not recognise inside the hierarchy.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence

import numpy as np
import zarr

from sed_dask import config
from sed_dask.errors import StoreError
from sed_dask.sources.param_index import ParamIndex, TensorEntry, read_chunk_elems  # noqa: F401  (re-exported)
from sed_dask.store.outputs import describe as describe_path
from sed_dask.store.outputs import results_kind

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
_STEP_CHUNK = 4096
LOCK_DIR_SUFFIX = ".sed_dask-locks"


class RunLockedError(StoreError):
    """Another client holds the writer lock of the run (an ingestion is in progress)."""


def _open_group(store, mode: str, storage_options: dict | None):
    if isinstance(store, zarr.Group):
        return store
    if isinstance(store, str) and store.startswith("file://"):
        # fsspec's local filesystem does not create parent directories unless asked to
        storage_options = {"auto_mkdir": True, **(storage_options or {})}
    kw = {"storage_options": storage_options} if storage_options else {}
    try:
        return zarr.open_group(store, mode=mode, **kw)
    except FileNotFoundError as exc:
        raise StoreError(f"no trajectory store at {store!r}") from exc


class TrajectoryStore:
    """A Zarr group holding one subgroup per run."""

    def __init__(self, root: zarr.Group):
        self.root = root

    @property
    def url(self) -> str:
        """A path or fsspec URL that ``open_store`` accepts (storage_options are not included)."""
        sp = self.root.store_path
        fs = getattr(sp.store, "fs", None)  # FsspecStore: str(store_path) is a repr, not a URL
        if fs is not None:
            base = getattr(fs, "sync_fs", fs).unstrip_protocol(sp.store.path)
            return f"{base.rstrip('/')}/{sp.path}" if sp.path else base
        return str(sp)

    @property
    def runs(self) -> list[str]:
        return sorted(name for name, _ in self.root.groups())

    def run(self, name: str) -> "RunStore":
        try:
            g = self.root[name]
        except KeyError:
            raise StoreError(f"unknown run {name!r} in store {self.url}; runs present: {self.runs}") from None
        state = run_state(g)
        if state == "half-created":
            raise StoreError(
                f"run {name!r} of store {self.url} was interrupted while being created (it holds no "
                "checkpoints yet); the next `sed-dask ingest` into it rebuilds it"
            )
        if state != "ready":
            raise StoreError(f"{name!r} in store {self.url} is not a trajectory run: {state}")
        return RunStore(g, name, root=self.root)

    def run_state(self, name: str) -> str:
        """ "absent", "half-created" (a run creation was interrupted: rebuilt by the next ingest),
        "ready", or why the member is not a trajectory run."""
        try:
            g = self.root[name]
        except KeyError:
            return "absent"
        return run_state(g)

    def __contains__(self, name: str) -> bool:
        return name in self.runs

    def create_run(
        self,
        name: str,
        *,
        index: ParamIndex,
        policy: dict,
        chunk_bytes=None,
        shard_bytes=None,
        compressor=None,
        attrs: dict | None = None,
    ) -> "RunStore":
        """Create an empty run (0 rows) with its layout fixed by ``index`` and the chunk settings.

        Crash-safe (call it holding :func:`run_lock`): the group is created carrying a
        ``sed_dask_run_creating`` attr, then the three arrays, and the run's attrs (parameter index,
        policy, write unit) are put last in one metadata write. A run lacking them is
        "half-created" (:func:`run_state`): it holds no rows, and this method rebuilds it.
        """
        if not name or "/" in name:
            raise StoreError(f"invalid run name {name!r}")
        state = self.run_state(name)
        if state == "ready":
            raise StoreError(f"run {name!r} already exists in store {self.url}")
        if state not in ("absent", "half-created"):
            raise StoreError(f"{name!r} in store {self.url} is not a trajectory run ({state}); use another run name")
        if state == "half-created":
            logger.warning("run %r of store %s was interrupted while being created; rebuilding it", name, self.url)
        P = index.n_params
        if P == 0:
            raise StoreError(f"run {name!r}: the parameter selection is empty")
        chunk = read_chunk_elems(P, chunk_bytes)
        shard = max(chunk, config.get_bytes("store.shard-bytes", shard_bytes) // 4)
        shard = (shard // chunk) * chunk
        shards = None
        if shard > chunk and P > chunk:
            shard = min(shard, -(-P // chunk) * chunk)
            shards = (1, shard)
        else:
            shard = chunk
        comp = compressor if compressor is not None else config.get("store.compressor")
        compressors = None if comp in (None, "none") else _compressor(comp)
        creating = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # overwrite: only a half-created run (no rows) or leftovers of one are ever replaced here
        g = self.root.create_group(name, overwrite=state == "half-created", attributes={CREATING_ATTR: creating})
        g.create_array(
            "params",
            shape=(0, P),
            chunks=(1, chunk),
            shards=shards,
            dtype="float32",
            fill_value=np.nan,
            compressors=compressors,
            overwrite=True,
            dimension_names=("row", "param"),
            config={"write_empty_chunks": True},
        )
        g.create_array(
            "steps",
            shape=(0,),
            chunks=(_STEP_CHUNK,),
            dtype="int64",
            fill_value=-1,
            dimension_names=("row",),
            overwrite=True,
        )
        g.create_array(
            "complete", shape=(0,), chunks=(1,), dtype="uint8", fill_value=0, dimension_names=("row",), overwrite=True
        )
        from sed_dask import __version__

        g.attrs.put(
            {  # one write, replacing the creating marker: the run is ready from here
                "sed_dask_version": __version__,
                "selection_policy": policy,
                "param_index": index.to_records(),
                "param_index_hash": index.hash,
                "n_params": P,
                "write_unit": shard,
                "sources": {},
                "nonfinite": [],
                **(attrs or {}),
            }
        )
        return RunStore(g, name, root=self.root)


CREATING_ATTR = "sed_dask_run_creating"
RUN_ARRAYS = ("params", "steps", "complete")
RUN_ATTRS = ("param_index", "param_index_hash", "selection_policy", "n_params", "write_unit")


def run_state(g) -> str:
    """ "ready", "half-created" or what makes the Zarr member ``g`` not a trajectory run.

    Half-created: the group lacks the run attrs and holds nothing but (some of) the run's three
    arrays, all with 0 rows, i.e. a ``create_run`` that was killed; nothing is lost by rebuilding it.
    """
    if not isinstance(g, zarr.Group):
        return "it is an array, not a group"
    attrs = g.attrs.asdict()
    members = {k: v for k, v in g.members()}
    arrays = [k for k in RUN_ARRAYS if isinstance(members.get(k), zarr.Array)]
    lacks_attrs = [k for k in RUN_ATTRS if k not in attrs]
    if not lacks_attrs and len(arrays) == len(RUN_ARRAYS):
        return "ready"
    if lacks_attrs and set(members) <= set(RUN_ARRAYS) and all(members[k].shape[0] == 0 for k in arrays):
        if CREATING_ATTR in attrs or not attrs:
            return "half-created"
    missing = [k for k in RUN_ARRAYS if k not in arrays] + [f"attr {k}" for k in lacks_attrs]
    return f"it lacks {', '.join(missing)}"


def _compressor(spec):
    if isinstance(spec, str):
        if spec.startswith("zstd"):
            level = int(spec.split(":")[1]) if ":" in spec else 1
            return (zarr.codecs.ZstdCodec(level=level),)
        if spec.startswith("blosc"):
            return (zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)
        raise StoreError(f"unknown compressor {spec!r} (use none, zstd[:level] or blosc)")
    return spec if isinstance(spec, tuple) else (spec,)


class RunStore:
    """One run: the params array, its step labels, completion records and metrics."""

    def __init__(self, group: zarr.Group, name: str, *, root: zarr.Group | None = None):
        self.group = group
        self.name = name
        self.root = root  # the trajectory store's root group (to find the run's writer lock)
        self.params: zarr.Array = group["params"]
        self._steps: zarr.Array = group["steps"]
        self._complete: zarr.Array = group["complete"]

    # ----------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def index(self) -> ParamIndex:
        return ParamIndex.from_records(self.group.attrs["param_index"])

    @property
    def policy(self) -> dict:
        return dict(self.group.attrs["selection_policy"])

    @property
    def n_params(self) -> int:
        return int(self.params.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.params.shape[0])

    @property
    def write_unit(self) -> int:
        """Elements along P that one writer owns (a whole shard, or a chunk when unsharded)."""
        return int(self.group.attrs["write_unit"])

    @property
    def read_unit(self) -> int:
        return int(self.params.chunks[1])

    @property
    def token_id(self) -> str:
        """Identifies the data source in task names (a checkpoint source has its own)."""
        return str(self.group.store_path)

    def write_ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` P-ranges, each one whole write unit (the last may be short)."""
        u, P = self.write_unit, self.n_params
        return [(s, min(s + u, P)) for s in range(0, P, u)]

    # ----------------------------------------------------------------- rows
    def _n_consistent(self) -> int:
        """Rows present in all three row arrays (they differ only after a crash inside ``allocate``)."""
        return min(self.params.shape[0], self._steps.shape[0], self._complete.shape[0])

    def row_steps(self) -> np.ndarray:
        """Step label of every allocated row (complete or not)."""
        n = self._n_consistent()
        return np.asarray(self._steps[:n], dtype=np.int64) if n else np.zeros(0, np.int64)

    def completed(self) -> np.ndarray:
        """Boolean completion record per allocated row."""
        n = self._n_consistent()
        return np.asarray(self._complete[:n], dtype=bool) if n else np.zeros(0, bool)

    def row_of(self, step: int) -> int | None:
        """Row holding ``step`` (complete or not), or None."""
        hit = np.flatnonzero(self.row_steps() == int(step))
        return int(hit[0]) if hit.size else None

    def repair(self) -> int:
        """Undo a half-finished ``allocate`` (a crash between resizes); return the rows dropped.

        Only trailing rows that were never given a step can be dropped; they cannot be complete,
        because a row is marked complete only after its data is written.
        """
        lens = (self.params.shape[0], self._steps.shape[0], self._complete.shape[0])
        n = min(lens)
        if n:
            steps = np.asarray(self._steps[:n])
            valid = np.flatnonzero(steps >= 0)
            n = int(valid[-1]) + 1 if valid.size else 0
        if lens == (n, n, n):
            return 0
        self._steps.resize((n,))
        self._complete.resize((n,))
        self.params.resize((n, self.n_params))
        return max(lens) - n

    @property
    def steps(self) -> np.ndarray:
        """Steps of completed rows, in row order (strictly increasing)."""
        return self.row_steps()[self.completed()]

    def allocate(self, steps: Sequence[int]) -> np.ndarray:
        """Append rows for new ``steps`` (all greater than every stored step); return their row numbers.

        Validation happens before anything is resized, so a bad request changes nothing.
        """
        steps = np.asarray(list(steps), dtype=np.int64)
        if steps.size == 0:
            return np.zeros(0, np.int64)
        if np.any(np.diff(steps) <= 0):
            d = steps[1:][np.diff(steps) <= 0][0]
            raise StoreError(
                f"run {self.name!r}: steps to append must be strictly increasing; "
                f"step {int(d)} is duplicated or out of order"
            )
        have = self.row_steps()
        if have.size and steps[0] <= have[-1]:
            raise StoreError(
                f"run {self.name!r}: cannot append step {int(steps[0])}; the run already "
                f"holds steps up to {int(have[-1])} (appending must add later steps)"
            )
        self.repair()
        n0 = self.n_rows
        n1 = n0 + steps.size
        # the step labels go last: a crash in between leaves rows without a step, which repair() drops
        self.params.resize((n1, self.n_params))
        self._complete.resize((n1,))
        self._steps.resize((n1,))
        self._steps[n0:n1] = steps
        return np.arange(n0, n1)

    def mark_complete(self, row: int, *, source: str | None = None) -> None:
        self._complete[row] = 1

    def record_sources(self, sources: dict[int, str]) -> None:
        """Remember the source file of each step (client side; one writer)."""
        cur = dict(self.group.attrs.get("sources", {}))
        cur.update({str(int(k)): str(v) for k, v in sources.items()})
        self.group.attrs["sources"] = cur

    def update_attrs(self, **attrs) -> None:
        """Set run attributes (client side only: attribute writes from several processes race)."""
        self.group.attrs.update(attrs)

    def record_nonfinite(self, records: Sequence[dict]) -> None:
        """Append NaN/Inf findings (``{step, file, tensor, n_nan, n_inf}``) to the ``nonfinite`` attr."""
        if records:
            cur = list(self.group.attrs.get("nonfinite", []))
            self.group.attrs["nonfinite"] = cur + [dict(r) for r in records]

    def check_complete(self) -> np.ndarray:
        """Steps, after checking that every allocated row is complete (else a clear error)."""
        done = self.completed()
        if not done.all():
            missing = self.row_steps()[~done]
            steps = f"{missing[:10].tolist()}{'...' if missing.size > 10 else ''}"
            holder = lock_holder(self.root, self.name) if self.root is not None else None
            if holder is not None:
                raise RunLockedError(
                    f"run {self.name!r} is being ingested right now by {holder} (it holds the "
                    f"run's writer lock; steps {steps} are not written yet); wait for that "
                    "ingestion to finish, then re-run"
                )
            raise StoreError(
                f"run {self.name!r}: ingestion is incomplete for steps {steps}; re-run `sed-dask ingest` to finish it"
            )
        return self.row_steps()

    # ----------------------------------------------------------------- metrics
    def set_metrics(self, steps: Sequence[int], values: dict[str, Sequence[float]]) -> None:
        """Store metric series (e.g. val_loss) by step, replacing earlier series of the same names."""
        steps = np.asarray(steps, dtype=np.int64)
        order = np.argsort(steps, kind="stable")
        steps = steps[order]
        if np.any(np.diff(steps) == 0):
            d = steps[1:][np.diff(steps) == 0][0]
            raise StoreError(f"run {self.name!r}: metrics have a duplicate step {int(d)}")
        old = self.metrics()
        if old and not np.array_equal(old.get("step"), steps):
            # merge onto the union of steps, keeping earlier series that are not replaced
            union = np.union1d(old["step"], steps)
            merged = {"step": union}
            for k, v in old.items():
                if k != "step":
                    a = np.full(union.size, np.nan)
                    a[np.searchsorted(union, old["step"])] = v
                    merged[k] = a
            pos = np.searchsorted(union, steps)
            for k, v in values.items():
                a = np.full(union.size, np.nan)
                a[pos] = np.asarray(v, dtype=np.float64)[order]
                merged[k] = a
        else:
            merged = dict(old) if old else {}
            merged["step"] = steps
            for k, v in values.items():
                v = np.asarray(v, dtype=np.float64)
                if v.shape != steps.shape:
                    raise StoreError(f"run {self.name!r}: metric {k!r} has {v.size} values for {steps.size} steps")
                merged[k] = v[order]
        mg = self.group.require_group("metrics")
        for k, v in merged.items():
            dtype = "int64" if k == "step" else "float64"
            mg.create_array(k, shape=v.shape, dtype=dtype, overwrite=True, dimension_names=("metric_step",))[:] = v

    def metrics(self) -> dict[str, np.ndarray]:
        """``{"step": ..., name: values}``; empty if the run has no metrics."""
        if "metrics" not in self.group:
            return {}
        mg = self.group["metrics"]
        return {k: np.asarray(a[:]) for k, a in mg.arrays()}

    def read(self, rows: slice | Sequence[int], start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 block ``params[rows, start:stop]`` (for tests and small reads)."""
        return np.asarray(self.params[rows, start:stop])


def open_store(store, *, mode: str = "a", storage_options: dict | None = None) -> TrajectoryStore:
    """Open (or with mode 'a'/'w', create) a trajectory store from a path, fsspec URL or zarr Group.

    Writing modes refuse, before writing anything, a path that holds something else: a file, a
    folder of other files, a results store, a Zarr group sed_dask did not write.
    """
    if isinstance(store, TrajectoryStore):
        return store
    if mode != "r":
        refuse_foreign(store, storage_options)
    if mode == "a" and not isinstance(store, zarr.Group):
        # create the root on first use, but never overwrite
        g = _open_group(store, "a", storage_options)
    else:
        g = _open_group(store, mode, storage_options)
    fmt = g.attrs.get("sed_dask_store_format")
    if fmt is None:
        _check_root(g, store, writing=mode != "r")
        if mode != "r":
            g.attrs["sed_dask_store_format"] = STORE_FORMAT
    elif fmt > STORE_FORMAT:
        raise StoreError(f"store {store!r} has format {fmt}, newer than this sed_dask ({STORE_FORMAT})")
    return TrajectoryStore(g)


def _check_root(g: zarr.Group, store, *, writing: bool) -> None:
    """A root without the format attr: fine if empty (new) or holding runs (older stores), else refused."""
    attrs = g.attrs.asdict()
    kind = results_kind(attrs)
    nothing = "; ingest into a new --store path (nothing was written)" if writing else ""
    if kind:
        raise StoreError(f"{_name(store)} is a sed_dask {kind} results store, not a trajectory store{nothing}")
    groups = [(n, sub) for n, sub in g.groups()]
    runs = [n for n, sub in groups if run_state(sub) in ("ready", "half-created")]
    if runs:
        return
    if not writing:
        what = f"groups {sorted(n for n, _ in groups)[:8]} are not trajectory runs" if groups else "no runs"
        raise StoreError(
            f"{_name(store)} is not a sed_dask trajectory store (no sed_dask_store_format attr; "
            f"{what}); make one with `sed-dask ingest`"
        )
    members = sorted(g.keys())
    if attrs or members:
        raise StoreError(
            f"{_name(store)} is a Zarr group that sed_dask did not write (attrs {sorted(attrs)[:8]}, "
            f"members {members[:8]}){nothing}"
        )


def refuse_foreign(store, storage_options: dict | None = None) -> None:
    """Raise :class:`StoreError` if ``store`` holds something that is not (and cannot become) a
    trajectory store: a file, a folder of other files, a results store, a foreign Zarr group.
    Writes nothing; a path with nothing there passes."""
    if isinstance(store, (str, os.PathLike)):
        kind, _ = describe_path(store)
        if kind in ("file", "folder"):
            raise StoreError(
                f"{os.fspath(store)} is a {'file' if kind == 'file' else 'folder of other files'}, "
                "not a Zarr trajectory store; choose a new --store path (nothing was written)"
            )
        if kind in ("missing", "empty"):
            return
    try:
        g = store if isinstance(store, zarr.Group) else _open_group(store, "r", storage_options)
    except Exception:  # nothing readable there yet: opening for writing creates it
        return
    if g.attrs.get("sed_dask_store_format") is None:
        _check_root(g, store, writing=True)


def _name(store) -> str:
    return str(store.store_path) if isinstance(store, zarr.Group) else os.fspath(store)


def write_trajectory(
    store,
    run: str,
    steps: Sequence[int],
    params,
    *,
    index: ParamIndex | None = None,
    policy: dict | None = None,
    metrics: dict | None = None,
    **create_kw,
) -> RunStore:
    """Write an in-memory or array-like ``(n_steps, P)`` trajectory as a run, one row at a time.

    For trajectories that already exist as arrays (tests, simulations, other tools); checkpoint
    files go through :func:`sed_dask.ingest`. ``metrics`` maps a name to one value per step.
    """
    ts = open_store(store)
    P = int(params.shape[1])
    if index is None:
        index = ParamIndex([TensorEntry("params", 0, P, (P,), str(np.dtype(params.dtype)), "all")])
    if index.n_params != P:
        raise StoreError(f"index describes {index.n_params} parameters but the array has {P} columns")
    rs = ts.create_run(run, index=index, policy=policy or {"name": "array"}, **create_kw)
    rows = rs.allocate(steps)
    for r in rows:
        row = np.asarray(params[int(r)], dtype=np.float32)
        if not np.isfinite(row).all():
            raise StoreError(f"run {run!r}: step {int(steps[int(r)])} holds NaN/Inf")
        rs.params[int(r), :] = row
        rs.mark_complete(int(r))
    if metrics:
        rs.set_metrics(steps, metrics)
    return rs


# ----------------------------------------------------------------------------- writer lock
def is_in_memory(store) -> bool:
    """True for an in-memory store (``memory://`` URL or a zarr MemoryStore): it lives in one process."""
    if isinstance(store, TrajectoryStore):
        store = store.root
    if isinstance(store, zarr.Group):
        zs = store.store
        if isinstance(zs, zarr.storage.MemoryStore):
            return True
        proto = getattr(getattr(zs, "fs", None), "protocol", None)
        return "memory" in (proto if isinstance(proto, (tuple, list)) else (proto,))
    return isinstance(store, str) and store.startswith("memory://")


def _local_root(store) -> tuple[str, str] | None:
    """``(directory of the zarr store, group path inside it)`` for a local store, else None."""
    if isinstance(store, TrajectoryStore):
        store = store.root
    if isinstance(store, zarr.Group):
        zs = store.store
        if isinstance(zs, zarr.storage.LocalStore):
            return os.fspath(zs.root), store.path
        proto = getattr(getattr(zs, "fs", None), "protocol", None)
        proto = proto if isinstance(proto, (tuple, list)) else (proto,)
        if isinstance(zs, zarr.storage.FsspecStore) and {"file", "local"} & set(proto):
            return zs.path, store.path
        return None
    s = os.fspath(store)
    if "::" in s:  # chained fsspec URL (simplecache::s3://...)
        return None
    if "://" in s:
        proto, rest = s.split("://", 1)
        return (rest, "") if proto in ("file", "local") else None
    return s, ""


def run_lock_path(store, run: str) -> str | None:
    """The lock file of ``run``, or None where the store is not on a local (or shared) filesystem.

    Every way of naming one store (path, ``file://`` URL, zarr Group) gives the same file.
    """
    if not run or "/" in run or run in (".", ".."):
        raise StoreError(f"invalid run name {run!r}")
    where = _local_root(store)
    if where is None:
        return None
    parent, name = os.path.split(os.path.realpath(where[0]))
    return os.path.join(parent, f".{name}{LOCK_DIR_SUFFIX}", *where[1].split("/"), f"{run}.lock")


def lock_holder(store, run: str) -> str | None:
    """Who holds ``run``'s writer lock right now ("pid ... on host ..."), or None (free, or no lock file).

    Probes without creating anything: a reader uses it to tell "an ingestion is running" from
    "an ingestion died".
    """
    try:
        path = run_lock_path(store, run)
    except StoreError:
        return None
    if path is None or fcntl is None or not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return _holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # also drops the shared lock if it was taken
    return None


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {h['pid']} on host {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "another process"


@contextlib.contextmanager
def run_lock(store, run: str, *, timeout: float = 0) -> Iterator[str | None]:
    """Hold the exclusive writer lock of ``run`` for the block; yield the lock file (None: no lock).

    ``fcntl.flock`` on a file next to the store: the kernel drops it when the holder exits, even by
    SIGKILL, so a crashed writer never leaves a stale lock (never delete the file by hand: a
    waiter could then lock a different file). ``timeout``: seconds to wait for a busy lock
    (0: fail at once) before :class:`RunLockedError` naming the holder. In-memory stores are not
    locked (one process); other fsspec stores (s3://, gcs://, ...) cannot be, and are not either.
    """
    path = run_lock_path(store, run)
    fd = None
    if path is None or fcntl is None:
        if not is_in_memory(store):
            logger.info("store %s: no writer lock for run %r on this kind of store", store, run)
    else:
        fd = _acquire(path, store, run, timeout)
    if fd is None:
        yield None
        return
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale holder record for the next reader
        os.close(fd)  # closing the only descriptor releases the lock


def _acquire(path: str, store, run: str, timeout: float) -> int | None:
    """A descriptor of ``path`` holding its flock; None where the filesystem cannot lock."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # e.g. a read-only parent directory: do not refuse to work
        logger.warning(
            "cannot create the writer lock %s (%s); concurrent writers of run %r are not locked out", path, exc, run
        )
        return None
    deadline = time.monotonic() + max(0.0, float(timeout))
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    logger.warning(
                        "cannot lock %s (%s: this filesystem has no flock); concurrent writers "
                        "of run %r are not locked out",
                        path,
                        exc,
                        run,
                    )
                    os.close(fd)
                    return None
            left = deadline - time.monotonic()
            if left <= 0:
                root, sub = _local_root(store)
                where = os.path.join(os.path.realpath(root), sub) if sub else os.path.realpath(root)
                waited = f" (waited {timeout:g} s)" if timeout else ""
                raise RunLockedError(
                    f"run {run!r} of store {where} is being ingested by {_holder(fd)}{waited}; wait for "
                    "that ingestion to finish (or pass lock_timeout= seconds) and re-run; nothing was "
                    f"written. Its lock {path} is released when that process exits, even if it is "
                    "killed: do not delete it"
                )
            time.sleep(min(0.1, left))
        rec = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run": run,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
