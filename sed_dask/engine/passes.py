"""What every pass over a run shares (Gram, sketch, directions): tiles, reads, reduction, running.

Every pass is a plain task dict, as in ``dask.array.linalg``: tasks over (step block x P-range)
tiles whose partials are combined by a tree with a *fixed* operand order, so a result is
bit-identical on any scheduler and any number of workers. The block kernels live with each pass;
this module holds what all of them share:

* a tile's description (:class:`TileSpec`) and its read: :func:`read_into` (raw chunk files, zarr,
  or checkpoint files) and :func:`stream_deltas` (double-buffered rows turned into float32 deltas);
* the tuning settings, validated once (:func:`pass_settings`);
* the fixed-order reduction (:func:`tree_reduce`, :func:`sum_partials`);
* running a graph where dask's rules say (:func:`execute`, via ``sed_dask.cluster.placement``).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from sed_dask import config
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import StoreError
from sed_dask.sources.run_source import RunSource


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Everything one tile task needs (a plain object, so the legacy task tuple keeps it literal)."""

    out_lo: int  # first delta whose band row this tile emits
    out_hi: int  # one past the last
    c0: int  # P-range [c0, c1)
    c1: int
    segments: tuple  # ((lo, hi, gid), ...) absolute columns; gid 0 = only "all", >= 1 a group
    width: int  # band width (entries k = 0 .. width-1)
    buf_rows: int  # delta rows per buffer (carried width-1 + new rows read per batch)
    sub_cols: int  # columns per float64 sub-block
    precision: str  # "float64" | "float32"
    zarr_settings: tuple = ()
    direct_read: bool = True  # positioned reads of raw local chunk files when the layout allows
    extras: tuple = ()  # further accumulators fed by the same read (see ``gram_tile``)
    kernel: str = "blas"  # band kernel: "blas" | "fused" (sed_dask.engine.band_kernel), chosen once per pass


def read_into(params, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> None:
    """Read ``params[r0:r1, c0:c1]`` straight into ``out`` (no temporary copy of the tile).

    ``params`` is a zarr array, a :class:`~sed_dask.engine.rawread.RawChunkReader` for it, or any object
    with ``read_block(r0, r1, c0, c1, out)`` (a direct checkpoint source,
    :class:`sed_dask.sources.checkpoint_run.CheckpointParams`, which reads the checkpoint files themselves).
    """
    if isinstance(params, RawChunkReader):
        params.read(r0, r1, c0, c1, out)
        return
    if hasattr(params, "read_block"):
        params.read_block(r0, r1, c0, c1, out)
        return
    from zarr.core.buffer import default_buffer_prototype

    nd = default_buffer_prototype().nd_buffer.from_numpy_array(out)
    params.get_basic_selection((slice(r0, r1), slice(c0, c1)), out=nd)


class _Prefetch:
    """Read the next row batch in a thread while the current one is being multiplied."""

    def __init__(self, params, r0, r1, c0, c1, out):
        self.exc = None
        self.thread = threading.Thread(target=self._run, args=(params, r0, r1, c0, c1, out), daemon=True)
        self.thread.start()

    def _run(self, *args):
        try:
            read_into(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            self.exc = exc

    def wait(self):
        self.thread.join()
        if self.exc is not None:
            raise self.exc


_LOCAL = threading.local()


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _buffers(shape: tuple) -> list[np.ndarray]:
    """This thread's two float32 row buffers, reused across tasks of the same shape.

    Fresh multi-MiB arrays are new mmap'd pages that the kernel zeroes on first touch (measured
    ~30% of a task's time); a worker thread keeps at most one pair (= tile-bytes) alive. Outside a
    Dask worker (local schedulers run in the user's process) nothing is kept after the pass.
    """
    if not _in_worker():
        return [np.empty(shape, np.float32), np.empty(shape, np.float32)]
    cached = getattr(_LOCAL, "bufs", None)
    if cached is None or cached[0].shape != shape:
        _LOCAL.bufs = None  # drop the old pair before allocating the new one
        _LOCAL.bufs = cached = [np.empty(shape, np.float32), np.empty(shape, np.float32)]
    return cached


def stream_deltas(params, spec: TileSpec):
    """Yield ``(S, g0)``: float32 deltas ``S`` (carried + new rows) whose row 0 is delta ``g0``.

    Two buffers of ``buf_rows x P-range``: the next batch is read into one while the other is being
    used; the last ``width-1`` deltas are carried over by copying them across (so the first batch
    reads ``buf_rows`` rows, later ones ``buf_rows - (width-1)``).
    """
    H = spec.width - 1
    row_lo, row_hi = max(0, spec.out_lo - H), spec.out_hi + 1
    C, R = spec.c1 - spec.c0, spec.buf_rows
    bufs = _buffers((R, C))
    last = np.empty((1, C), np.float32)
    nxt = np.empty(C, np.float32)
    read_into(params, row_lo, row_lo + 1, spec.c0, spec.c1, last)
    r, k, cur = row_lo + 1, 0, 0
    nr = min(R, row_hi - r)
    if nr <= 0:
        return
    read_into(params, r, r + nr, spec.c0, spec.c1, bufs[0][:nr])
    pending = None
    try:
        while True:
            buf = bufs[cur]
            n = k + nr
            r_next = r + nr
            keep = min(H, n)
            nr_next = min(R - keep, row_hi - r_next)
            if nr_next <= 0 < row_hi - r_next:
                raise RuntimeError(f"tile buffer of {R} rows cannot carry {keep} deltas and read more")
            if nr_next > 0:
                pending = _Prefetch(
                    params, r_next, r_next + nr_next, spec.c0, spec.c1, bufs[1 - cur][keep : keep + nr_next]
                )
            nxt[:] = buf[n - 1]
            for i in range(n - 1, k, -1):  # backwards, in place: row i becomes a delta
                np.subtract(buf[i], buf[i - 1], out=buf[i])
            np.subtract(buf[k], last[0], out=buf[k])
            last[0] = nxt
            yield buf[:n], r - 1 - k
            if nr_next <= 0:
                return
            bufs[1 - cur][:keep] = buf[n - keep : n]
            pending.wait()
            pending = None
            cur, k, r, nr = 1 - cur, keep, r_next, nr_next
    finally:
        if pending is not None:
            pending.thread.join()


def column_segments(c0: int, c1: int, ranges: list[tuple[int, int, int]]) -> tuple:
    """Split ``[c0, c1)`` at group boundaries; ``ranges`` are sorted ``(lo, hi, gid)``."""
    if not ranges:
        return ((c0, c1, 0),)
    segs, pos = [], c0
    for lo, hi, gid in ranges:
        if hi <= c0 or lo >= c1:
            continue
        lo, hi = max(lo, c0), min(hi, c1)
        if lo > pos:
            segs.append((pos, lo, 0))
        segs.append((lo, hi, gid))
        pos = hi
    if pos < c1:
        segs.append((pos, c1, 0))
    return tuple(segs)


def checked_steps(rs: RunSource) -> np.ndarray:
    """The run's checkpoint steps, after checking that every row is complete and finite."""
    steps = rs.check_complete()
    if steps.size < 2:
        raise StoreError(
            f"run {rs.name!r} has {steps.size} checkpoint(s), so no deltas; a spectrum needs at least 2 checkpoints"
        )
    bad = rs.attrs.get("nonfinite") or []
    if bad:
        where = sorted({int(r["step"]) for r in bad if "step" in r})
        tensors = sorted({str(r.get("tensor")) for r in bad})[:5]
        raise StoreError(
            f"run {rs.name!r}: NaN/Inf recorded at ingestion in step(s) {where} "
            f"(tensors {tensors}); the Gram of those deltas is undefined"
        )
    return steps


@dataclasses.dataclass(frozen=True)
class PassSettings:
    """Tuning of one pass, from keywords or the ``sed_dask.spectrum`` config section."""

    tile_bytes: int  # float32 bytes of rows one task holds at once
    block_steps: int  # deltas per task along step
    split_every: int  # fan-in of the reduction tree


def pass_settings(*, tile_bytes=None, block_steps=None, split_every=None) -> PassSettings:
    """Resolve and validate the settings (unset ones from dask.config)."""
    tb = config.get_bytes("spectrum.tile-bytes", tile_bytes)
    bs = int(config.get("spectrum.block-steps", block_steps))
    se = int(config.get("spectrum.split-every", split_every))
    if tb < 1:
        raise ValueError(f"tile_bytes must be positive, got {tile_bytes!r}")
    if bs < 1:
        raise ValueError(f"block_steps must be >= 1, got {bs}")
    if se < 2:
        raise ValueError(f"split_every must be an integer >= 2 (the reduction tree's fan-in), got {se}")
    return PassSettings(int(tb), bs, se)


def tree_reduce(dsk: dict, keys: list, name: str, func, *args, split_every: int, prefix: tuple = ()):
    """Add tasks ``func(parts, *args)`` combining ``keys`` ``split_every`` at a time, in order, up to
    one root; return the root key (``keys[0]`` itself when there is only one).

    Keys are ``(name, *prefix, depth, index)``, so several trees (e.g. one per step block) can share
    a name. The grouping depends only on ``len(keys)`` and ``split_every``, never on timing.
    """
    if int(split_every) != split_every or split_every < 2:  # 1 would never shrink a level: no root, ever
        raise ValueError(f"split_every must be an integer >= 2 (the reduction tree's fan-in), got {split_every!r}")
    level, depth = list(keys), 0
    while len(level) > 1:
        nxt = []
        for q in range(0, len(level), split_every):
            key = (name, *prefix, depth, q // split_every)
            dsk[key] = (func, level[q : q + split_every], *args)
            nxt.append(key)
        level, depth = nxt, depth + 1
    return level[0]


def sum_partials(parts: list):
    """Sum a list of partial dicts key by key, left to right (a fixed order: deterministic)."""
    first = parts[0]
    if isinstance(first, dict):
        keys = sorted({k for p in parts for k in p}, key=lambda x: (str(type(x)), x))
        return {k: sum_partials([p[k] for p in parts if k in p]) for k in keys}
    out = np.array(first, copy=True)
    for p in parts[1:]:
        out += p
    return out


def compute_graph(
    dsk: dict,
    keys: list,
    *,
    client=None,
    scheduler: str | None = None,
    progress: bool = False,
    desc: str = "sed_dask pass",
):
    """Run a task dict on a distributed ``client`` or a local dask ``scheduler``; return results for ``keys``.

    ``progress`` draws a bar to 100 % and ends it with one line (:mod:`sed_dask.progress`).
    """
    if client is not None:
        futures = client.get(dsk, keys, sync=False)
        if progress:
            from distributed import futures_of

            from sed_dask.progress import distributed_bar

            distributed_bar(futures_of(futures), desc=desc)
        return client.gather(futures)
    import dask

    from sed_dask.progress import dask_local_bar

    get = {
        "threads": dask.threaded.get,
        "threading": dask.threaded.get,
        "sync": dask.get,
        "synchronous": dask.get,
        "single-threaded": dask.get,
    }.get(scheduler)
    if get is None:
        raise ValueError(f"unknown local scheduler {scheduler!r} (use 'threads' or 'sync', or pass a client)")
    from sed_dask.cluster.blas import single_threaded_blas

    with single_threaded_blas(), dask_local_bar(len(dsk), desc=desc, enabled=progress):
        return get(dsk, keys)


def execute(
    dsk: dict,
    keys: list,
    *,
    client=None,
    scheduler: str | None = None,
    address: str | None = None,
    scheduler_file: str | None = None,
    progress: bool = False,
    desc: str = "sed_dask pass",
):
    """Run a task dict where ``sed_dask.cluster.placement`` says (dask's rules; in-process threads
    by default) and return the results for ``keys``."""
    from sed_dask.cluster.placement import running

    with running(client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler) as where:
        return compute_graph(dsk, keys, client=where.client, scheduler=where.scheduler, progress=progress, desc=desc)
