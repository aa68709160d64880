"""A run read straight from its checkpoint files: exact spectra at read speed, no ingestion.

Ingestion is write-bound: it copies every parameter into the store at disk-write speed, 5-19 % of
a raw read of the same files (benchmarks/README.md, "Ingest"). For a one-off analysis that copy
is pure overhead: the Gram pass reads each checkpoint once anyway. :func:`open_checkpoints`
builds a :class:`CheckpointRun`, a read-only :class:`~sed_dask.sources.run_source.RunSource`
like :class:`~sed_dask.store.RunStore`
holding everything ``gram_graph``/``spectrum`` use (name, index, steps, metrics, policy, read
unit), and whose ``params`` (:class:`CheckpointParams`) fills a Gram tile's ``(rows x P-range)``
buffer from the files with each reader's slice reads (``read_block``).

Validation is ingestion's, from the same code (:mod:`sed_dask.sources.validate`), and happens when the
source is opened, before any task: step discovery (names or a mapping, duplicates), the selection
policy on the first checkpoint, every other header against it, at least 2 checkpoints, the metrics
file. The parameter index is the one an ingestion of the same files would record (same
``index.hash``), and the column unit defaults to the store's read chunk (``store.chunk-bytes``),
so the tiling, and hence every float64 sum, is that of the ingested store: the spectra are
bit-identical to ingest + spectrum (tests/test_checkpoint_run.py).

What a store gives that this does not: resumability, one copy for many analyses (every pass
re-reads the checkpoint files: positioned reads of the stored tensor bytes, each file's layout parsed
once per process), NaN/Inf recorded up front (here they surface at the end of the pass, naming step and file),
and reads on workers that cannot see the checkpoint paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from sed_dask.errors import CheckpointError
from sed_dask.readers import open_checkpoint
from sed_dask.sources.discover import discover_checkpoints
from sed_dask.sources.param_index import ParamIndex, read_chunk_elems
from sed_dask.sources.run_source import check_seed, seed_from_name
from sed_dask.sources.validate import CheckpointTodo, check_headers, load_metrics_arg, policy_for, require_deltas

_NONFINITE_BLOCK = 1 << 22  # elements per read when locating NaN/Inf (error path only)


class CheckpointParams:
    """The ``(checkpoint, P)`` float32 matrix of a run, read from its files on demand.

    Small and picklable (it travels in every tile task): ``files`` is ``((step, path, {index name:
    name in file}), ...)`` with one shared name dict for all files that agree (pickle stores it
    once), plus the parameter index. Nothing stays open between calls: a ``read_block`` opens each
    checkpoint once, reads the slices overlapping its columns, and closes it, so no mapping of a
    ``.pt`` file outlives the row batch that needed it.
    """

    def __init__(self, files: Sequence[tuple[int, str, dict]], index: ParamIndex, read_unit: int):
        shared: dict = {}
        self.files = tuple((int(s), str(p), shared.setdefault(tuple(sorted(n.items())), n)) for s, p, n in files)
        self.index = index
        self.shape = (len(self.files), index.n_params)
        self.chunks = (1, int(read_unit))

    def read_block(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> None:
        """Fill float32 ``out[r1-r0, c1-c0]`` with flat parameters ``[c0, c1)`` of checkpoints ``r0..r1-1``."""
        if out.shape != (r1 - r0, c1 - c0) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(r1 - r0, c1 - c0)}, got {out.dtype} {out.shape}")
        segs = self.index.segments(c0, c1)
        for r in range(r0, r1):
            step, path, names = self.files[r]
            row, pos = out[r - r0], 0
            try:
                with open_checkpoint(path) as reader:
                    for e, lo, hi in segs:
                        reader.read(names[e.name], lo, hi, out=row[pos : pos + hi - lo])
                        pos += hi - lo
            except CheckpointError as exc:
                raise type(exc)(f"step {step}: {exc}") from exc

    def describe_nonfinite(self, rows) -> str:
        """Which tensors of which files (and steps) hold NaN/Inf, for the rows given (error path)."""
        parts = []
        for r in rows:
            step, path, names = self.files[r]
            found = []
            with open_checkpoint(path) as reader:
                for e in self.index:
                    n_nan = n_inf = 0
                    for lo in range(0, e.size, _NONFINITE_BLOCK):
                        a = reader.read(names[e.name], lo, min(e.size, lo + _NONFINITE_BLOCK))
                        n_nan += int(np.isnan(a).sum())
                        n_inf += int(np.isinf(a).sum())
                    if n_nan or n_inf:
                        found.append(f"tensor {e.name!r} holds {n_nan} NaN and {n_inf} Inf")
            parts.append(
                f"{path} (step {step}): {'; '.join(found[:3]) or 'non-finite values'}"
                f"{f' (and {len(found) - 3} more tensors)' if len(found) > 3 else ''}"
            )
        if not parts:
            return "the Gram has non-finite entries, but no checkpoint holds NaN/Inf (float32 overflow of a delta?)"
        return "NaN/Inf in checkpoint " + "; ".join(parts)


class CheckpointRun:
    """A validated run of checkpoint files that ``spectrum`` reads directly (see the module docstring).

    A :class:`~sed_dask.sources.run_source.RunSource`, as a store run is, so every pass reads either
    alike. Build it with :func:`open_checkpoints`.
    """

    def __init__(
        self,
        name: str,
        todo: list[CheckpointTodo],
        selection,
        fmt: str,
        *,
        metrics=None,
        metrics_source: str | None = None,
        read_unit: int,
    ):
        self.name = name
        self._steps = np.array([td.step for td in todo], dtype=np.int64)
        self._selection = selection
        self._metrics = metrics or {}
        self.params = CheckpointParams([(td.step, td.path, td.names) for td in todo], selection.index, read_unit)
        stamp = [(td.step, td.path, *_stat(td.path)) for td in todo]
        self.token_id = "checkpoints:" + hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:20]
        self.attrs = {
            "selection_policy": selection.record(),
            "param_index_hash": selection.index.hash,
            "n_params": selection.index.n_params,
            "source_format": fmt,
            "sources": {str(td.step): td.path for td in todo},
            "metrics_source": metrics_source,
        }

    @property
    def index(self) -> ParamIndex:
        return self._selection.index

    @property
    def n_params(self) -> int:
        return int(self._selection.index.n_params)

    @property
    def n_rows(self) -> int:
        return int(self._steps.size)

    @property
    def policy(self) -> dict:
        return self._selection.record()

    @property
    def read_unit(self) -> int:
        return int(self.params.chunks[1])

    @property
    def steps(self) -> np.ndarray:
        return self._steps.copy()

    def check_complete(self) -> np.ndarray:
        """The steps (every checkpoint of a validated source is there: nothing to complete)."""
        return self._steps.copy()

    def metrics(self) -> dict[str, np.ndarray]:
        """``{"step": ..., name: values}`` from the metrics given to :func:`open_checkpoints`, or {}."""
        return {k: np.array(v) for k, v in self._metrics.items()}

    @property
    def description(self) -> str:
        """Where the files are: their common directory (``source_store`` of a result)."""
        paths = list(self.attrs["sources"].values())
        return f"checkpoints {self.name}={os.path.commonpath(paths) if len(paths) > 1 else paths[0]}"

    def read(self, rows: slice, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 block ``[rows, start:stop]`` (for tests and small reads), as ``RunStore.read``."""
        r = range(*rows.indices(self.n_rows))
        stop = self.n_params if stop is None else stop
        out = np.empty((len(r), stop - start), np.float32)
        for i, row in enumerate(r):
            self.params.read_block(row, row + 1, start, stop, out[i : i + 1])
        return out

    def __repr__(self) -> str:
        return (
            f"CheckpointRun({self.name!r}: {self.n_rows} checkpoints x {self.n_params:,} params, "
            f"{self.attrs['source_format']}, steps {int(self._steps[0])}..{int(self._steps[-1])})"
        )


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file, summed over a checkpoint directory's files."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    sts = [os.stat(os.path.join(path, f)) for f in sorted(os.listdir(path))]
    return sum(s.st_size for s in sts), max((s.st_mtime_ns for s in sts), default=0)


def open_checkpoints(
    sources,
    *,
    run: str,
    steps=None,
    metrics=None,
    policy=None,
    include=None,
    exclude=None,
    chunk_bytes=None,
    seed: int | None = None,
) -> CheckpointRun:
    """Validate a run's checkpoints now and return a source that ``spectrum`` reads directly.

    ``sources``, ``steps``, ``metrics``, ``policy``/``include``/``exclude``: as for
    :func:`sed_dask.ingest` (a directory, glob, list of files/directories or ``{step: path}``; a
    JSON/CSV metrics file or parsed object; the parameter selection). Every header is checked
    against the first checkpoint's before this returns, with the messages ingestion gives.
    ``chunk_bytes``: the column unit of the Gram tiles (default ``store.chunk-bytes``); give the
    ``chunk_bytes`` a store was ingested with to get results bit-identical to that store's.
    ``seed``: the run's training seed (default: the one ``run`` spells, e.g. ``seed3``), the
    ``seed`` coordinate of the results.

    Use it for one-off analyses: it skips the write-bound copy into a store, but every pass
    re-reads the checkpoint files, which workers must be able to open at the same paths.
    """
    if not isinstance(run, str) or not run or "/" in run:
        raise ValueError(f"invalid run name {run!r}")
    seed = check_seed(seed)
    ckpts = discover_checkpoints(sources, steps=steps)
    metric_data, metric_source = load_metrics_arg(metrics)
    # absolute paths: workers may run elsewhere in the shared filesystem
    todo = [CheckpointTodo(step, os.path.abspath(path)) for step, path in ckpts.items()]
    require_deltas(run, len(todo), ckpts.values())
    pol = policy_for(None, policy, include, exclude)
    sel, fmt = check_headers(todo, pol, None, run)
    cr = CheckpointRun(
        run,
        todo,
        sel,
        fmt,
        metrics=metric_data,
        metrics_source=metric_source,
        read_unit=read_chunk_elems(sel.index.n_params, chunk_bytes),
    )
    cr.attrs["seed"] = seed if seed is not None else seed_from_name(run)
    return cr
