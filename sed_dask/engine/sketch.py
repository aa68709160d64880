"""One pass over a run: the JL sketch ``S_i = Phi^T delta_i`` (N x d), bit-identical under any chunking.

A sketch is tiny (N x d float64) and reusable: spectra of any W, cross-seed comparisons and
trajectory PCA without re-reading the store (``sed_dask.results.sketch_spectra``). Phi comes from
counter-based tiles (``sed_dask.engine.jl``), so its values never depend on chunking. The *sum* must not
either, which fixes two things (both checked by ``tests/test_sketch.py``):

* **Kernel.** The partial of RNG tile ``t`` for a row of deltas is one BLAS gemm of a fixed shape,
  ``(ROW_BLOCK x T_t) @ (T_t x d)``, on row blocks aligned to the *absolute* delta index and
  zero-padded; whichever task holds a row, it sits at the same position of the same-shaped call.
  (A gemm's rounding depends on M; on other rows' values it does not.) The sparse and osnap
  operators use a CSR product, whose accumulation order is the fixed order of the tile's nonzeros.
* **Reduction.** Tile partials are combined on a canonical binary tree over tile indices: node
  ``(level, j)`` covers tiles ``[j 2^level, (j+1) 2^level)`` and equals left + right child (or the
  left child alone past the last tile). A task returns its maximal complete nodes; reducers merge
  siblings as they meet (``merge_nodes``). Every node therefore has one value, whoever computes it.

Tasks own whole tiles (P-ranges are tile multiples, by default a power of two of them, so that a
task returns one node) and one step block of deltas plus a one-row halo; Zarr chunks need not align.
Deltas are formed in float32 like the Gram engine (docs/method.md §2.3) and upcast per tile; sums are
float64. ``SketchAccumulator`` follows ``sed_dask.engine.gram``'s accumulator protocol (``update(S, g0)``,
``result()``), and ``SketchExtra`` plugs it into the banded-Gram pass (``spectrum(..., sketch=...)``):
the same read then yields the Gram and the sketch, bit-identical to ``sketch()``'s.

Scope: bit-identity holds across chunkings, task layouts, schedulers and worker counts on workers
that share a CPU kernel family and BLAS build; different CPUs may pick gemm kernels (and, for the
Gaussian operator, libm/SIMD ``log``) that round differently.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from sed_dask import config
from sed_dask.engine.jl import Operator
from sed_dask.engine.passes import TileSpec, checked_steps, execute, pass_settings, stream_deltas, tree_reduce
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import StoreError
from sed_dask.schema import metric_variables, provenance_attrs
from sed_dask.store.outputs import check_target, write_dataset
from sed_dask.store.trajectory import RunStore, open_store

ROW_BLOCK = 64  # gemm rows: fixed, so every delta row meets the same BLAS call shape
PHI_CACHE_BYTES = 256 << 20  # Phi tiles a task keeps between row batches (else it regenerates them)
_TASK_PHI_VALUES = 1 << 26  # Phi entries one task generates (~1-2 s of Gaussian RNG), so P splits over workers


# ----------------------------------------------------------------------------- canonical tree
def root_key(n_leaves: int) -> tuple[int, int]:
    """The root node ``(level, 0)`` of a canonical tree over ``n_leaves`` tiles."""
    return (max(0, (n_leaves - 1).bit_length()), 0)


def merge_nodes(nodes: dict, n_leaves: int) -> dict:
    """Combine sibling nodes bottom-up; a left node whose right sibling lies past the end moves up.

    Inputs are never modified (dask may hand the same partial to a retried task).
    """
    nodes = dict(nodes)
    root = root_key(n_leaves)
    changed = True
    while changed:
        changed = False
        for key in sorted(nodes):
            if key not in nodes or key == root:
                continue
            lvl, j = key
            left, right = (lvl, j & ~1), (lvl, j | 1)
            if left in nodes and right in nodes:
                nodes[(lvl + 1, j >> 1)] = nodes.pop(left) + nodes.pop(right)
                changed = True
            elif key == left and (j | 1) << lvl >= n_leaves:
                nodes[(lvl + 1, j >> 1)] = nodes.pop(key)
                changed = True
    return nodes


def reduce_nodes(parts: list, n_leaves: int) -> dict:
    """Union of disjoint node dicts from several tasks, merged as far as they allow."""
    union: dict = {}
    for p in parts:
        for k, v in p.items():
            if k in union:
                raise RuntimeError(f"sketch reduction: tree node {k} computed twice (overlapping tasks)")
            union[k] = v
    return merge_nodes(union, n_leaves)


# ----------------------------------------------------------------------------- kernel
def tile_product(D: np.ndarray, g0: int, phi_t) -> np.ndarray:
    """Unscaled ``D @ Phi_t`` for float32 deltas ``D`` (n x T_t) whose row 0 is absolute delta ``g0``.

    ``phi_t`` is the transposed tile (d x T_t): dense float64 or scipy CSR (sparse, osnap).
    A pure function of (rows, tile): the same row gives the same bits in any task.
    """
    n, K = D.shape
    if not isinstance(phi_t, np.ndarray):  # CSR: y[j, k] += a * x[p, k] in the tile's nonzero order
        X = np.empty((K, n), np.float64)  # deltas as rows of the product: upcast and transpose in one
        np.copyto(X.T, D)  # copy (3-5x faster than .T.astype on a strided column slice)
        return (phi_t @ X).T
    d = phi_t.shape[0]
    out = np.empty((n, d), np.float64)
    A = np.zeros((ROW_BLOCK, K), np.float64)
    for blk in range((g0 // ROW_BLOCK) * ROW_BLOCK, g0 + n, ROW_BLOCK):
        lo, hi = max(blk, g0), min(blk + ROW_BLOCK, g0 + n)
        A[: lo - blk] = 0.0
        A[lo - blk : hi - blk] = D[lo - g0 : hi - g0]
        A[hi - blk :] = 0.0
        out[lo - g0 : hi - g0] = (A @ phi_t.T)[lo - blk : hi - blk]
    return out


def phi_tile(op: Operator, t: int):
    """The transposed unscaled tile in the form ``tile_product`` wants."""
    return op.tile_sparse(t) if op.distribution in ("sparse", "osnap") else op.tile_dense(t)


class SketchAccumulator:
    """Tree nodes of ``delta @ Phi`` for delta rows ``[out_lo, out_hi)`` and columns ``[c0, c1)``.

    Protocol of ``sed_dask.engine.gram`` accumulators: ``update(S, g0)`` with float32 deltas ``S`` (columns
    c0..c1) whose row 0 is delta ``g0``; rows already seen (carried halo rows) are skipped, so it can
    ride the Gram's streaming batches. ``[c0, c1)`` must be whole tiles.
    """

    name = "sketch"

    def __init__(
        self, out_lo: int, out_hi: int, c0: int, c1: int, op: Operator, *, phi_cache_bytes: int = PHI_CACHE_BYTES
    ):
        T, P = op.tile_elems, op.n_params
        if c0 % T or (c1 % T and c1 != P):
            raise ValueError(f"sketch columns [{c0}, {c1}) are not whole RNG tiles of {T}")
        self.op, self.out_lo, self.out_hi, self.c0 = op, out_lo, out_hi, c0
        self.tiles = range(c0 // T, -(-c1 // T))
        self.done = out_lo
        self.nodes: dict = {}
        # with several row batches per task, keep the task's tiles rather than regenerate them per batch
        self._cache = {} if len(self.tiles) * op.tile_values * 8 <= phi_cache_bytes else None

    def _phi(self, t: int):
        if self._cache is None:
            return phi_tile(self.op, t)
        if t not in self._cache:
            self._cache[t] = phi_tile(self.op, t)
        return self._cache[t]

    def update(self, S: np.ndarray, g0: int) -> None:
        start, end = max(self.done, g0), min(self.out_hi, g0 + S.shape[0])
        if start >= end:
            return
        rows = S[start - g0 : end - g0]
        nodes: dict = {}
        for t in self.tiles:
            a, b = self.op.tile_bounds(t)
            nodes[(0, t)] = tile_product(rows[:, a - self.c0 : b - self.c0], start, self._phi(t))
            nodes = merge_nodes(nodes, self.op.n_tiles)
        n_out = self.out_hi - self.out_lo
        for k, v in nodes.items():
            if k not in self.nodes:
                self.nodes[k] = np.full((n_out, self.op.d), np.nan)
            self.nodes[k][start - self.out_lo : end - self.out_lo] = v
        self.done = end
        if end == self.out_hi:
            self._cache = None

    def result(self) -> dict:
        return self.nodes


def sketch_tile(params, spec: TileSpec, op: Operator) -> dict:
    """Task: read one (step block x whole-tile P-range) tile and return its tree nodes."""
    if spec.zarr_settings:
        config.configure_zarr(**dict(spec.zarr_settings))
    acc = SketchAccumulator(spec.out_lo, spec.out_hi, spec.c0, spec.c1, op)
    source = (RawChunkReader.for_array(params) if spec.direct_read else None) or params
    for S, g0 in stream_deltas(source, spec):
        acc.update(S, g0)
    if acc.done != spec.out_hi:
        raise RuntimeError(f"sketch tile [{spec.out_lo}, {spec.out_hi}) stopped at delta {acc.done}")
    return acc.result()


_OPEN = 1 << 62  # "end of P unknown": merge siblings only; the last-tile promotions wait for finish_nodes


def partial_merge(parts: list) -> dict:
    """Reducer for node dicts when the tile count is not at hand (e.g. inside the Gram engine's
    ``sum_partials``): merges siblings only, which leaves every node value canonical."""
    return reduce_nodes(parts, _OPEN)


def finish_nodes(nodes: dict, op: Operator) -> np.ndarray:
    """Scaled sketch from node arrays covering every tile (rows may span several step blocks)."""
    return finish_block(merge_nodes(nodes, op.n_tiles), op.n_tiles) * op.scale


def finish_block(nodes: dict, n_leaves: int) -> np.ndarray:
    """The root of a fully reduced step block."""
    root = root_key(n_leaves)
    if set(nodes) != {root}:
        raise RuntimeError(f"sketch reduction incomplete: nodes {sorted(nodes)} left, expected only {root}")
    return nodes[root]


@dataclasses.dataclass(frozen=True)
class SketchExtra:
    """The sketch as an extra accumulator of the banded-Gram pass (``sed_dask.engine.gram.gram_tile``).

    P-ranges there are whole RNG tiles (``col_align``), at most ``tile_bytes / 2`` of Phi per task
    (``max_cols``; a task keeps its tiles across row batches rather than regenerate them), P-range
    partials merge siblings only (``partial_merge``), and ``finish`` completes the tree and scales.
    """

    op: Operator
    name = "sketch"

    @property
    def col_align(self) -> int:
        return int(self.op.tile_elems)

    def max_cols(self, tile_bytes: int) -> int:
        per_col = 8 * self.op.tile_values // self.op.tile_elems  # Phi bytes per parameter (8 s for osnap)
        return max(self.op.tile_elems, tile_bytes // 2 // per_col)

    def accumulator(self, spec: TileSpec) -> SketchAccumulator:
        phi_bytes = (spec.c1 - spec.c0 + self.op.tile_elems) * self.op.tile_values // self.op.tile_elems * 8
        return SketchAccumulator(spec.out_lo, spec.out_hi, spec.c0, spec.c1, self.op, phi_cache_bytes=phi_bytes)

    def combine(self, parts: list) -> dict:
        return partial_merge(parts)

    def finish(self, nodes: dict) -> np.ndarray:
        return finish_nodes(nodes, self.op)


def assemble(blocks: list, scale: float) -> np.ndarray:
    """Rows of all step blocks, scaled once (1/sqrt(d) or sqrt(s/d))."""
    return np.concatenate(blocks, axis=0) * scale


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class SketchTiling:
    blocks: tuple  # ((a, e), ...) delta ranges
    cols: tuple  # ((c0, c1), ...) whole-tile P-ranges
    buf_rows: int  # delta rows per read batch (the Gram reader's two buffers of this size)

    def as_dict(self) -> dict:
        return {
            "step_blocks": len(self.blocks),
            "p_ranges": len(self.cols),
            "p_range_width": max(c1 - c0 for c0, c1 in self.cols),
            "buffer_rows": self.buf_rows,
        }


def plan_sketch(
    n_rows: int, op: Operator, *, tile_bytes: int, block_steps: int, tiles_per_task: int | None = None
) -> SketchTiling:
    """Step blocks x P-ranges of whole RNG tiles (a power of two of them unless ``tiles_per_task``)."""
    if block_steps < 1:
        raise ValueError(f"block_steps must be >= 1, got {block_steps}")
    N, T = n_rows - 1, op.tile_elems
    blocks = tuple((a, min(a + block_steps, N)) for a in range(0, N, block_steps))
    rows = max(e - a for a, e in blocks) + 1
    per_buf = tile_bytes // 2  # the reader double-buffers: one batch is read while the other is used
    if tiles_per_task is None:  # bounded by memory and by the RNG work per task (parallelism)
        m = max(1, min(per_buf // (4 * rows * T), _TASK_PHI_VALUES // op.tile_values))
        m = 1 << (m.bit_length() - 1)
    else:
        m = int(tiles_per_task)
        if m < 1:
            raise ValueError(f"tiles_per_task must be >= 1, got {tiles_per_task}")
    cols = tuple((t * T, min((t + m) * T, op.n_params)) for t in range(0, op.n_tiles, m))
    cmax = max(c1 - c0 for c0, c1 in cols)
    buf_rows = max(1, min(rows - 1, per_buf // (4 * cmax)))
    return SketchTiling(blocks, cols, int(buf_rows))


@dataclasses.dataclass
class SketchPlan:
    run: str
    dsk: dict
    key: tuple
    op: Operator
    steps: np.ndarray
    tiling: SketchTiling


def sketch_graph(
    run_store: RunStore,
    op: Operator,
    *,
    tile_bytes=None,
    block_steps: int | None = None,
    tiles_per_task: int | None = None,
    split_every: int | None = None,
    rows: tuple[int, int] | None = None,
    steps: np.ndarray | None = None,
) -> SketchPlan:
    """Build (do not run) the one-pass sketch graph of one run.

    ``rows=(lo, hi)``: sketch only deltas ``lo .. hi-1`` (one step block; the live engine's new
    deltas). A row's bits do not depend on which rows share its task (fixed-shape kernel aligned to
    the absolute delta index, canonical tree), so they equal the full pass's rows. ``steps``: the
    run's already checked checkpoint steps, when the caller has just checked them (skips a re-check).
    """
    from dask.base import tokenize

    ps = pass_settings(tile_bytes=tile_bytes, block_steps=block_steps, split_every=split_every)
    rs = run_store
    steps = checked_steps(rs) if steps is None else np.asarray(steps, np.int64)
    if rs.n_params != op.n_params:
        raise ValueError(f"operator is for P={op.n_params} but run {rs.name!r} has P={rs.n_params}")
    if rows is None:
        tiling = plan_sketch(
            steps.size, op, tile_bytes=ps.tile_bytes, block_steps=ps.block_steps, tiles_per_task=tiles_per_task
        )
    else:
        lo, hi = int(rows[0]), int(rows[1])
        if not 0 <= lo < hi <= steps.size - 1:
            raise ValueError(f"rows={rows!r}: need 0 <= lo < hi <= {steps.size - 1} (the run's deltas)")
        # planned as a run of hi - lo deltas (memory per task), then moved to the absolute rows
        t = plan_sketch(hi - lo + 1, op, tile_bytes=ps.tile_bytes, block_steps=hi - lo, tiles_per_task=tiles_per_task)
        tiling = dataclasses.replace(t, blocks=((lo, hi),))
    zs = tuple(sorted(config.zarr_settings().items()))
    token = tokenize(str(rs.group.store_path), rs.name, steps.size, rs.index.hash, op, tiling, ps.split_every, zs)
    tname, rname, bname, fname = (f"sed-sketch-{x}-{token}" for x in ("tile", "sum", "block", "out"))
    n_leaves = op.n_tiles
    dsk: dict = {}
    block_keys = []
    for b, (a, e) in enumerate(tiling.blocks):
        level = []
        for p, (c0, c1) in enumerate(tiling.cols):
            spec = TileSpec(a, e, c0, c1, ((c0, c1, 0),), 1, tiling.buf_rows, 0, "float64", zs)
            dsk[(tname, b, p)] = (sketch_tile, rs.params, spec, op)
            level.append((tname, b, p))
        root = tree_reduce(dsk, level, rname, reduce_nodes, n_leaves, split_every=ps.split_every, prefix=(b,))
        dsk[(bname, b)] = (finish_block, root, n_leaves)
        block_keys.append((bname, b))
    dsk[(fname,)] = (assemble, block_keys, op.scale)
    return SketchPlan(rs.name, dsk, (fname,), op, steps, tiling)


def run_sketch_plans(
    plans: list[SketchPlan], *, client=None, scheduler=None, address=None, scheduler_file=None, progress=False
) -> list[np.ndarray]:
    """Compute several runs' sketch graphs as one submission; returns ``(N, d)`` arrays."""
    dsk = {}
    for p in plans:
        dsk.update(p.dsk)
    return execute(
        dsk,
        [p.key for p in plans],
        client=client,
        scheduler=scheduler,
        address=address,
        scheduler_file=scheduler_file,
        progress=progress,
    )


# ----------------------------------------------------------------------------- API
def make_operator(n_params: int, *, d=None, seed=None, distribution=None, s=None, tile_elems=None) -> Operator:
    """An ``Operator`` with unset arguments from ``sed_dask.sketch`` config."""
    dist, d = str(config.get("sketch.distribution", distribution)), int(config.get("sketch.d", d))
    if dist == "osnap":  # nonzeros per row: an integer; the default is capped at d
        s = min(int(config.get("sketch.osnap-s")), d) if s is None else s
    return Operator(
        seed=int(config.get("sketch.seed", seed)),
        d=d,
        distribution=dist,
        tile_elems=int(config.get("sketch.tile-elems", tile_elems)),
        n_params=int(n_params),
        s=None if s is None else float(s),
    )


def sketch(
    store,
    *,
    runs=None,
    d: int | None = None,
    seed: int | None = None,
    distribution: str | None = None,
    s: float | None = None,
    tile_elems: int | None = None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    output=None,
    progress: bool = True,
    tile_bytes=None,
    block_steps: int | None = None,
    tiles_per_task: int | None = None,
    split_every: int | None = None,
    overwrite: bool = False,
):
    """JL sketches ``S_i = Phi^T delta_i`` of every run in one pass each; an xarray Dataset.

    ``sketch(run, step, dim)`` float64 (NaN where a run lacks a step), ``delta_span`` and the runs'
    metrics on the same grid, and the attrs needed to reproduce Phi (seed, tile size, distribution,
    d, s, param index hash, checksum of the first tile). The values do not depend on chunking,
    ``tile_bytes``/``block_steps``/``tiles_per_task`` or the scheduler. ``output`` writes Zarr
    safely (checked before the pass; an existing results store only with ``overwrite=True``;
    see :mod:`sed_dask.store.outputs`).
    """

    if output is not None:
        check_target(output, overwrite=overwrite)
    ts = open_store(store, mode="r")
    if not ts.runs:
        raise StoreError(f"store {ts.url} holds no runs")
    names = ([runs] if isinstance(runs, str) else list(runs)) if runs is not None else ts.runs
    run_stores = [ts.run(n) for n in names]
    plans = []
    for rs in run_stores:
        op = make_operator(rs.n_params, d=d, seed=seed, distribution=distribution, s=s, tile_elems=tile_elems)
        plans.append(
            sketch_graph(
                rs,
                op,
                tile_bytes=tile_bytes,
                block_steps=block_steps,
                tiles_per_task=tiles_per_task,
                split_every=split_every,
            )
        )
    outs = run_sketch_plans(
        plans, client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file, progress=progress
    )
    prov = provenance({p.run: p.op for p in plans})
    attrs = provenance_attrs(
        {
            "sed_kind": "jl_sketch",
            "source_store": ts.url,
            "runs": list(names),
            **prov,
            "n_params": json.dumps({p.run: p.op.n_params for p in plans}),
            "param_index_hash": json.dumps({rs.name: rs.index.hash for rs in run_stores}),
            "selection_policy": json.dumps({rs.name: rs.policy for rs in run_stores}),
            "tiling": json.dumps({p.run: p.tiling.as_dict() for p in plans}),
        }
    )
    ds = build_sketch_dataset(
        [(p.run, p.steps, S) for p, S in zip(plans, outs)], {rs.name: rs.metrics() for rs in run_stores}, attrs, prov
    )
    if output is not None:
        write_dataset(ds, output, kind="jl_sketch", overwrite=overwrite)
    return ds


def provenance(ops: dict) -> dict:
    """JSON-safe attrs that pin down Phi (``{run: Operator}``; runs share seed, d, distribution, tile).

    Carried by the ``sketch`` variable wherever it is stored (alone or in a spectrum Dataset), so
    ``spectra_from_sketch`` and a reader of the Zarr can tell which operator made it.
    """
    first = next(iter(ops.values()))
    return {
        "seed": int(first.seed),
        "d": int(first.d),
        "distribution": first.distribution,
        "tile_elems": int(first.tile_elems),
        "row_block": ROW_BLOCK,
        "rng": first.describe()["rng"],
        "reduction": "canonical binary tree over RNG tiles; float64",
        "scale": json.dumps({r: op.scale for r, op in ops.items()}),
        "sparse_s": json.dumps({r: op.s for r, op in ops.items()}),
        "phi_checksum": json.dumps({r: op.checksum() for r, op in ops.items()}),
    }


def build_sketch_dataset(items: list, metrics: dict, attrs: dict, prov: dict | None = None):
    """``items``: ``(run, checkpoint steps (N+1,), S (N, d))``; the union delta-step grid as in results.

    ``prov`` (``provenance``) goes onto the ``sketch`` variable's attrs.
    """
    import xarray as xr

    runs = [r for r, _, _ in items]
    steps = np.unique(np.concatenate([st[1:] for _, st, _ in items])).astype(np.int64)
    d = items[0][2].shape[1]
    S = np.full((len(runs), steps.size, d), np.nan)
    span = np.full((len(runs), steps.size), -1, np.int64)
    for r, (_, st, arr) in enumerate(items):
        pos = np.searchsorted(steps, st[1:])
        S[r, pos] = arr
        span[r, pos] = np.diff(st)
    vars_ = {
        "sketch": (
            ("run", "step", "dim"),
            S,
            {
                "long_name": "JL sketch Phi^T delta of the delta labelled by step",
                "units": "parameter units",
                "sed_role": "jl_sketch",
                **(prov or {}),
            },
        )
    }
    vars_.update(metric_variables(metrics, runs, steps, {"sketch", "delta_span", "run", "step", "dim"}))
    coords = {
        "run": ("run", np.array(runs, dtype=object), {"long_name": "run / seed"}),
        "step": ("step", steps, {"long_name": "step of the newer checkpoint of the delta", "units": "steps"}),
        "dim": ("dim", np.arange(d, dtype=np.int64), {"long_name": "sketch coordinate (column of Phi)"}),
        "delta_span": (
            ("run", "step"),
            span,
            {"long_name": "s_i - s_(i-1) of the delta (-1: run lacks the step)", "units": "steps"},
        ),
    }
    return xr.Dataset(vars_, coords=coords, attrs=attrs)
