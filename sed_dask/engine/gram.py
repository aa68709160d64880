"""One streaming pass over a run: the banded float64 Gram of consecutive deltas (+ per layer group).

``band[g, i, k] = <delta_i, delta_{i-k}>`` for ``k < width`` with ``delta_i = theta(s_{i+1}) -
theta(s_i)`` (0-based: delta ``i`` is labelled by step ``s_{i+1}``); NaN where ``i - k < 0``. Window
spectra of every W < width, and the cross-window entries that gamma needs, are principal or
adjacent sub-blocks of this band (docs/method.md §3.3), so the store is read once for all of them.

Scheme (why it is shaped like this):

* **Tiles.** A task owns one (step block x P-range) tile. Step blocks partition the *deltas*; block
  ``[a, e)`` emits band rows ``a..e-1``. Those rows need the ``width-1`` deltas before ``a``, so the
  task reads rows ``[a-(width-1), e+1)`` (clipped at 0): the one-row halo that forms delta ``a``
  plus ``width-1`` halo deltas. Only block borders are re-read, a fraction ``width/block_steps``
  (nothing when a run fits in one block, the default up to ``spectrum.block-steps`` deltas).
* **Streaming inside a task.** Rows arrive in batches; two buffers of ``(width-1 + batch) x P-range``
  float32 together fit ``spectrum.tile-bytes`` (the next batch is read into one while the other is
  multiplied) and the last ``width-1`` float32 deltas are carried across. Memory per task is bounded
  by tile-bytes however long the run is, and each row is read once per task, straight into the
  buffer: positioned reads of the raw chunk files for uncompressed local stores
  (:mod:`sed_dask.engine.rawread`, ~4x less CPU than zarr's shard decoding), zarr ``out=`` otherwise,
  or the checkpoint files' slice reads for a run read without a store
  (:class:`sed_dask.sources.checkpoint_run.CheckpointParams`; same tiles, so the same sums).
* **Columns.** P-ranges are whole multiples of the store's read chunk, or an even split of one chunk
  when tile-bytes is smaller than a chunk of the rows held in memory. A tile splits its columns at
  layer-group boundaries and emits one partial per group it touches plus ``all``.
* **Kernel.** Deltas are formed in float32 (docs/method.md §2.3) in place, then each ~2 MiB column
  sub-block is upcast to float64 and multiplied by BLAS with a fixed shape: chunks of ``2 width``
  rows aligned to the absolute delta index, with their ``width-1`` predecessors, one ``D @ D.T``
  (syrk) each, zero-padded (``BandAccumulator``). P-ranges and sub-blocks depend on the width, not
  on the run's length, so a band row has the same bits in any task and after any number of later
  checkpoints (what the live engine needs). Sub-block sums run in a fixed order.
* **Reduction.** Partials are dicts (``{"band": {group: array}}``) summed by a tree of add tasks
  with a fixed operand order, so the result is bit-identical on any scheduler; later accumulators
  (e.g. a JL sketch ``delta @ Phi``, ``sed_dask.engine.sketch.SketchExtra``) add a key to the dict and
  ride the same read and reduction, with their own combine rule (see ``TileSpec.extras``).

The graph is a plain task dict (kernels below are ordinary functions), as in ``dask.array.linalg``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np

from sed_dask import config
from sed_dask.engine import band_kernel
from sed_dask.engine.grouping import ALL, resolve
from sed_dask.engine.passes import (
    TileSpec,
    checked_steps,
    column_segments,
    execute,
    pass_settings,
    read_into,
    stream_deltas,
    sum_partials,
    tree_reduce,
)
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import NonFiniteError, StoreError
from sed_dask.sources.run_source import RunSource

logger = logging.getLogger(__name__)

_SUB_BYTES = 2 << 20  # float64 bytes of one column sub-block (L2 sized; measured best)

FLOAT32_NOTE = (
    "precision='float32': products are accumulated in float32 within ~1 MiB column "
    "sub-blocks (float64 across them). Measured: singular values >= 0.1*sigma_1 within ~5e-8 "
    "relative, sigma ~ 0.01*sigma_1 within ~2e-5 (the error grows like (sigma_1/sigma)^2), "
    "versus <= 1e-8 in float64 mode; see benchmarks/README.md (Spectrum)"
)


class PrecisionWarning(UserWarning):
    """A result is computed with less than float64 accuracy."""


# ----------------------------------------------------------------------------- tile kernel
def row_chunk(width: int) -> int:
    """Delta rows per fixed-shape kernel call: part of the summation order (see ``BandAccumulator``)."""
    return 2 * width


class BandAccumulator:
    """Banded products of the tile's deltas, per group, accumulated in float64.

    **Fixed-shape kernel** (as the sketch's ``tile_product``): delta rows are taken in chunks of
    ``2 width`` aligned to the *absolute* delta index; a chunk and its ``width-1`` predecessors
    (zero rows where a row is not in memory) form one float64 work block of a fixed shape whose
    ``D @ D.T`` (BLAS syrk) gives the chunk's band entries. A BLAS product's rounding depends on
    its shape and a row's position in it, never on other rows' values, so a band row has the same
    bits whichever task, step block, row batch or run length computed it: the live engine
    (``sed_dask.live``) emits one new row and gets the batch pass's bits. Each row is emitted once.
    ``spec.kernel == "fused"``: only the band's products (:mod:`sed_dask.engine.band_kernel`), each row
    once, in a summation order that does not depend on how rows are grouped (so live rows match too).
    """

    name = "band"

    def __init__(self, spec: TileSpec):
        self.spec = spec
        self.out: dict[int, np.ndarray] = {}
        gids = {0} | {g for _, _, g in spec.segments}
        for g in sorted(gids):
            self.out[g] = np.zeros((spec.out_hi - spec.out_lo, spec.width), np.float64)
        self.next = spec.out_lo  # first delta not yet emitted
        self._work = None
        self.kernel = band_kernel.runnable(spec.kernel)
        self._next = spec.out_lo  # fused: first delta whose band row is not yet computed

    def update(self, S: np.ndarray, g0: int) -> None:
        if self.kernel == "fused":
            self.update_fused(S, g0)
            return
        spec, w = self.spec, self.spec.width
        H, m = w - 1, row_chunk(w)
        n = S.shape[0]
        first, last = max(self.next, g0), min(g0 + n, spec.out_hi)
        if first >= last:
            return
        dtype = np.float64 if spec.precision == "float64" else np.float32
        # one preallocated work block: Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns every
        # multi-MiB temporary into a fresh mmap whose pages are zeroed again (measured 2x the CPU)
        if self._work is None or self._work.dtype != dtype:
            self._work = np.empty((m + H, spec.sub_cols), dtype)
        chunks = range((first // m) * m, last, m)
        acc = {g: [np.zeros((m + H, m + H)) for _ in chunks] for g in self.out}
        for lo, hi, gid in spec.segments:
            for a in range(lo - spec.c0, hi - spec.c0, spec.sub_cols):
                b = min(a + spec.sub_cols, hi - spec.c0)
                D = self._work[:, : b - a]
                for j, q in enumerate(chunks):
                    r0, r1 = max(q - H, g0), min(q + m, g0 + n)  # rows of the block held in S
                    D[: r0 - (q - H)] = 0.0
                    np.copyto(D[r0 - (q - H) : r1 - (q - H)], S[r0 - g0 : r1 - g0, a:b])
                    D[r1 - (q - H) :] = 0.0
                    G = D @ D.T
                    acc[0][j] += G
                    if gid:
                        acc[gid][j] += G
        t = np.arange(m)[:, None]
        kk = np.arange(w)[None, :]
        for g, mats in acc.items():
            out = self.out[g]
            for q, A in zip(chunks, mats):
                lo, hi = max(q, first) - q, min(q + m, last) - q
                out[q + lo - spec.out_lo : q + hi - spec.out_lo] = A[H + t[lo:hi], H + t[lo:hi] - kk]
        self.next = last

    def update_fused(self, S: np.ndarray, g0: int) -> None:
        """Band rows of the deltas not yet computed (carried rows are skipped), one segment at a time."""
        spec, w = self.spec, self.spec.width
        n = S.shape[0]
        i_out0 = max(0, spec.out_lo - g0, self._next - g0)
        if i_out0 >= n:
            return
        pmin = max(0, i_out0 - w + 1)
        if self._work is None or self._work.shape[0] < n - pmin:
            self._work = np.empty((n - pmin, band_kernel.SUB_COLS), np.float64)
        seg = np.empty((n - i_out0, w), np.float64)
        acc = {g: np.zeros_like(seg) for g in self.out}
        for lo, hi, gid in spec.segments:  # "all" = sum of the segments in column order
            seg[:] = 0.0
            band_kernel.band_segment(S, pmin, i_out0, lo - spec.c0, hi - spec.c0, w, self._work, seg)
            acc[0] += seg
            if gid:
                acc[gid] += seg
        r0 = g0 + i_out0 - spec.out_lo
        for g, A in acc.items():
            self.out[g][r0 : r0 + n - i_out0] = A
        self._next = g0 + n

    def result(self) -> dict[int, np.ndarray]:
        return self.out


# Accumulators, all fed by the same read: one is built per tile, gets ``update(S, g0)`` for every
# batch of float32 deltas (S row 0 = delta g0; rows before ``spec.out_lo`` are halo, not output),
# and ``result()`` -> ``{key: array with one row per output delta}``. The band is always there;
# ``spec.extras`` add others. An extra is a small picklable object with
#   name                      key of its partials in the tile's result dict
#   accumulator(spec)         its per-tile accumulator
#   combine(parts)            partials of several P-ranges -> one (a fixed-order, deterministic rule)
#   finish(assembled)         all step blocks' rows, concatenated per key -> the final value
#   col_align, max_cols(tile_bytes)   P-range constraints for ``plan_tiles``
def gram_tile(params, spec: TileSpec) -> dict:
    """Read one tile, form deltas, and return ``{accumulator name: partials}``."""
    if spec.zarr_settings:
        config.configure_zarr(**dict(spec.zarr_settings))
    accs = [BandAccumulator(spec)] + [x.accumulator(spec) for x in spec.extras]
    source = (RawChunkReader.for_array(params) if spec.direct_read else None) or params
    for S, g0 in stream_deltas(source, spec):
        for acc in accs:
            acc.update(S, g0)
    return {acc.name: acc.result() for acc in accs}


def combine_partials(parts: list, extras: tuple = ()) -> dict:
    """Combine tile results over P-ranges: the band by ``sum_partials``, each extra by its own rule."""
    out = {"band": sum_partials([p["band"] for p in parts])}
    for x in extras:
        out[x.name] = x.combine([p[x.name] for p in parts])
    return out


def assemble_blocks(blocks: list, n_deltas: int, width: int) -> dict:
    """Concatenate reduced step blocks along the delta axis, per accumulator and key.

    Every accumulator's result is ``{key: array with one row per output delta}``; every block holds
    every key because each block spans all P-ranges.
    """
    out = {
        name: {g: np.concatenate([b[name][g] for b in blocks], axis=0) for g in blocks[0][name]} for name in blocks[0]
    }
    for g, a in out["band"].items():
        if a.shape != (n_deltas, width):
            raise RuntimeError(f"assembled band of group {g} has shape {a.shape}, expected {(n_deltas, width)}")
    return out


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a run is cut into tasks (recorded in provenance)."""

    blocks: tuple  # ((a, e), ...) delta ranges
    cols: tuple  # ((c0, c1), ...) P-ranges
    buf_rows: int
    sub_cols: int

    def as_dict(self) -> dict:
        return {
            "step_blocks": len(self.blocks),
            "p_ranges": len(self.cols),
            "p_range_width": max(c1 - c0 for c0, c1 in self.cols),
            "buffer_rows": self.buf_rows,
            "sub_cols": self.sub_cols,
        }


def plan_tiles(
    n_rows: int,
    n_params: int,
    read_chunk: int,
    *,
    width: int,
    tile_bytes: int,
    block_steps: int,
    col_align: int = 1,
    max_cols: int | None = None,
) -> Tiling:
    """Cut ``(n_rows, n_params)`` into tiles for a band of ``width`` (see the module docstring).

    ``col_align``: every P-range starts at a multiple of it (a sketch's RNG tile); ``max_cols``
    caps the P-range width (e.g. so that a task's Phi tiles fit its memory).
    """
    if block_steps < 1:
        raise ValueError(f"block_steps must be >= 1, got {block_steps}")
    N, H, P = n_rows - 1, width - 1, n_params
    blocks = tuple((a, min(a + block_steps, N)) for a in range(0, N, block_steps))
    max_rows = max(e - a + min(a, H) + 1 for a, e in blocks)
    # P-ranges and sub-blocks depend on the width only, never on the run's length: a band row's
    # summation order must not change when checkpoints are appended (the live engine relies on it)
    rows_mem = max(4 * width, 64)
    per_buf = tile_bytes // 2  # two row buffers: one being read while the other is multiplied
    C = max(1, per_buf // (4 * rows_mem))
    if max_cols:
        C = max(1, min(C, int(max_cols)))
    chunk = min(read_chunk, P)
    if col_align > 1:  # whole alignment units; whole read chunks too when that is wide enough
        unit = col_align * chunk // math.gcd(col_align, chunk)
        unit = unit if C >= unit else col_align
        C = max(unit, (C // unit) * unit)
        cols = tuple((s, min(s + C, P)) for s in range(0, P, C))
    elif C >= chunk:
        C = min((C // chunk) * chunk, -(-P // chunk) * chunk)
        cols = tuple((s, min(s + C, P)) for s in range(0, P, C))
    else:
        piece = -(-chunk // -(-chunk // C))
        cols = tuple(
            (q, min(q + piece, min(s + chunk, P)))
            for s in range(0, P, chunk)
            for q in range(s, min(s + chunk, P), piece)
        )
    cmax = max(c1 - c0 for c0, c1 in cols)
    buf_rows = min(max(H + 1, per_buf // (4 * cmax)), max_rows - 1)
    sub_cols = int(max(256, _SUB_BYTES // (8 * (row_chunk(width) + width - 1))))
    return Tiling(blocks, cols, int(buf_rows), sub_cols)


@dataclasses.dataclass
class GramPlan:
    """A run's task graph and what is needed to label its result."""

    run: str
    dsk: dict
    key: tuple
    groups: list[str]
    n_params: dict[str, int]
    group_desc: dict[str, str]
    steps: np.ndarray
    width: int
    precision: str
    tiling: Tiling
    params: object
    extras: tuple = ()
    kernel: str = "blas"  # band kernel every tile runs ("fused" | "blas")


def gram_graph(
    run_store: RunSource,
    *,
    width: int,
    groups=None,
    precision: str | None = None,
    tile_bytes=None,
    block_steps: int | None = None,
    split_every: int | None = None,
    direct_read: bool | None = None,
    extras: tuple = (),
    kernel: str | None = None,
    rows: tuple[int, int] | None = None,
) -> GramPlan:
    """Build (do not run) the one-pass graph of ``run_store``'s banded Gram of ``width`` columns.

    ``extras``: further accumulators riding the same read (see ``gram_tile``), e.g. a JL sketch.
    ``kernel``: "auto" | "fused" | "blas" (default ``spectrum.gram-kernel``), chosen here once for every
    tile (:func:`sed_dask.engine.band_kernel.choose`) so all tiles of a pass sum the same way.
    ``rows=(lo, hi)``: emit only band rows ``lo .. hi-1`` (one step block; the live engine's new
    deltas), with the whole run's P-ranges and kernel, so they equal the full pass's rows bit for bit.
    """
    from dask.base import tokenize

    if width < 1:
        raise ValueError(f"band width must be >= 1, got {width}")
    precision = config.get("spectrum.precision", precision)
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    ps = pass_settings(tile_bytes=tile_bytes, block_steps=block_steps, split_every=split_every)
    extras = tuple(extras)
    if len({x.name for x in extras} | {"band"}) != len(extras) + 1:
        raise ValueError(f"extra accumulators need distinct names other than 'band', got {[x.name for x in extras]}")
    rs = run_store
    steps = checked_steps(rs)
    n_rows, P = steps.size, rs.n_params
    index = rs.index
    granges, gdesc = resolve(index, groups, run=rs.name)
    names = [ALL] + list(granges)
    flat = sorted((lo, hi, gid) for gid, g in enumerate(granges, start=1) for lo, hi in granges[g])
    sizes = {ALL: P, **{g: int(sum(hi - lo for lo, hi in r)) for g, r in granges.items()}}
    align = 1
    for x in extras:
        align = align * x.col_align // math.gcd(align, x.col_align)
    caps = [c for c in (x.max_cols(ps.tile_bytes) for x in extras) if c]
    tiling = plan_tiles(
        n_rows,
        P,
        rs.read_unit,
        width=width,
        tile_bytes=ps.tile_bytes,
        block_steps=ps.block_steps,
        col_align=align,
        max_cols=min(caps) if caps else None,
    )
    zs = tuple(sorted(config.zarr_settings().items()))
    direct = bool(config.get("spectrum.direct-read", direct_read))
    kern = band_kernel.choose(width, precision, kernel)
    token = tokenize(
        rs.token_id,
        rs.name,
        n_rows,
        P,
        index.hash,
        width,
        flat,
        precision,
        tiling,
        zs,
        direct,
        ps.split_every,
        extras,
        kern,
    )
    tname, rname, fname = f"sed-gram-tile-{token}", f"sed-gram-sum-{token}", f"sed-gram-{token}"
    params = rs.params
    blocks = tiling.blocks
    if rows is not None:
        lo, hi = int(rows[0]), int(rows[1])
        if not 0 <= lo < hi <= n_rows - 1:
            raise ValueError(f"rows={rows!r}: need 0 <= lo < hi <= {n_rows - 1} (the run's deltas)")
        blocks, token = ((lo, hi),), tokenize(token, lo, hi)
        tname, rname, fname = f"sed-gram-tile-{token}", f"sed-gram-sum-{token}", f"sed-gram-{token}"
    dsk: dict = {}
    block_keys = []
    for b, (a, e) in enumerate(blocks):
        level = []
        for p, (c0, c1) in enumerate(tiling.cols):
            spec = TileSpec(
                a,
                e,
                c0,
                c1,
                column_segments(c0, c1, flat),
                width,
                tiling.buf_rows,
                tiling.sub_cols,
                precision,
                zs,
                direct,
                extras,
                kern,
            )
            dsk[(tname, b, p)] = (gram_tile, params, spec)
            level.append((tname, b, p))
        block_keys.append(
            tree_reduce(dsk, level, rname, combine_partials, extras, split_every=ps.split_every, prefix=(b,))
        )
    dsk[(fname,)] = (assemble_blocks, block_keys, sum(e - a for a, e in blocks), width)
    return GramPlan(
        rs.name,
        dsk,
        (fname,),
        names,
        sizes,
        {ALL: "the whole selected parameter vector", **gdesc},
        steps,
        width,
        precision,
        tiling,
        params,
        extras,
        kern,
    )


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class GramResult:
    """The banded Gram of one run: ``band[g, i, k] = <delta_i, delta_{i-k}>`` of group ``groups[g]``."""

    run: str
    band: np.ndarray  # (n_groups, N, width) float64; NaN where i - k < 0
    groups: list[str]  # "all" first
    n_params: dict[str, int]  # parameter count per group
    group_desc: dict[str, str]
    steps: np.ndarray  # (N + 1,) checkpoint steps
    width: int
    precision: str
    tiling: dict
    extras: dict = dataclasses.field(default_factory=dict)  # {extra name: finished value}, e.g. "sketch"

    @property
    def delta_steps(self) -> np.ndarray:
        """Label of each delta: the step of its newer checkpoint (docs/method.md §2.3)."""
        return self.steps[1:]

    @property
    def spans(self) -> np.ndarray:
        return np.diff(self.steps)

    @property
    def n_deltas(self) -> int:
        return int(self.band.shape[1])

    def __getitem__(self, group: str) -> np.ndarray:
        try:
            return self.band[self.groups.index(group)]
        except ValueError:
            raise KeyError(f"run {self.run!r} has no group {group!r}; groups: {self.groups}") from None


def finish(plan: GramPlan, out: dict) -> GramResult:
    """Label a computed plan; raise naming the run and step if the store held NaN/Inf."""
    N, w = plan.steps.size - 1, plan.width
    band = np.stack([out["band"].get(g, np.zeros((N, w))) for g in range(len(plan.groups))])
    i = np.arange(N)[:, None]
    k = np.arange(w)[None, :]
    band[:, np.broadcast_to(i - k < 0, (N, w))] = np.nan
    diag = band[0, :, 0]
    if not np.isfinite(diag).all():
        rows = find_nonfinite_rows(plan.params, np.flatnonzero(~np.isfinite(diag)))
        describe = getattr(plan.params, "describe_nonfinite", None)  # a checkpoint source names its files
        if describe is not None:
            raise NonFiniteError(f"run {plan.run!r}: {describe(rows)}; the Gram of those deltas is undefined")
        raise StoreError(
            f"run {plan.run!r}: NaN/Inf in the store at step(s) {[int(plan.steps[r]) for r in rows]} (row(s) {rows})"
        )
    return GramResult(
        plan.run,
        band,
        list(plan.groups),
        dict(plan.n_params),
        dict(plan.group_desc),
        plan.steps,
        w,
        plan.precision,
        {**plan.tiling.as_dict(), "kernel": plan.kernel},
        {x.name: x.finish(out[x.name]) for x in plan.extras},
    )


def find_nonfinite_rows(params, bad_deltas) -> list[int]:
    """Rows holding NaN/Inf, given deltas whose squared norm is non-finite (error path only)."""
    cand = sorted({int(r) for d in bad_deltas for r in (d, d + 1)})
    P = int(params.shape[1])
    chunk = min(int(params.chunks[1]) * 16, P)
    buf = np.empty((1, chunk), np.float32)
    found = []
    for r in cand:
        for c in range(0, P, chunk):
            part = buf[:, : min(chunk, P - c)]
            read_into(params, r, r + 1, c, c + part.shape[1], part)
            if not np.isfinite(part).all():
                found.append(r)
                break
    return found


def banded_gram(
    run_store: RunSource,
    *,
    w_max: int,
    groups=None,
    client=None,
    scheduler: str | None = None,
    address: str | None = None,
    scheduler_file: str | None = None,
    precision: str | None = None,
    tile_bytes=None,
    block_steps: int | None = None,
    split_every: int | None = None,
    direct_read: bool | None = None,
    progress: bool = False,
    kernel: str | None = None,
) -> GramResult:
    """The banded Gram (entries ``|i-j| < w_max``) of one run in one pass, global and per group.

    Runs where ``sed_dask.cluster.placement`` decides: a local ``scheduler`` ("threads", "sync"),
    ``client``/``address``/``scheduler_file``, an active Client, a configured cluster, the dask.config
    scheduler, else threads in this process.
    """
    plan = gram_graph(
        run_store,
        width=w_max,
        groups=groups,
        precision=precision,
        tile_bytes=tile_bytes,
        block_steps=block_steps,
        split_every=split_every,
        direct_read=direct_read,
        kernel=kernel,
    )
    return run_plans(
        [plan], client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file, progress=progress
    )[0]


def run_plans(
    plans: list[GramPlan], *, client=None, scheduler=None, address=None, scheduler_file=None, progress=False
) -> list[GramResult]:
    """Compute several runs' graphs as one submission (so runs share the workers)."""
    dsk = {}
    for p in plans:
        dsk.update(p.dsk)
    keys = [p.key for p in plans]
    if any(p.precision == "float32" for p in plans):
        warnings.warn(FLOAT32_NOTE, PrecisionWarning, stacklevel=3)
    outs = execute(
        dsk, keys, client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file, progress=progress
    )
    return [finish(p, o) for p, o in zip(plans, outs)]
