"""Parameter-space directions: top-k right singular vectors of a window's (or the run's) delta stack.

The delta stack X (n x P) is short-fat; its right singular vectors live in R^P and are as large as a
checkpoint. Nothing P-sized ever reaches the client or lives in RAM as a whole: tasks read
(n + 1) x C column blocks of the store (one-row halo for the deltas), and

* ``method="exact"``: pass 1 is a TSQR of X^T, R factor only (Householder QR of each block in
  float64, then QR of stacked R's up a fixed tree: no squared condition number, no Q blocks kept),
  then R = U_r S V_r^T on the client (``xt_array`` feeds ``dask.array.linalg.tsqr``/``svd`` instead);
* ``method="randomized"``: a Halko range finder on the *small* side, Y = X Omega (Omega: the
  counter-based Gaussian operator of ``sed_dask.engine.jl``, so chunking does not change it), ``n_power_iter``
  passes Y <- X X^T Q, and a Rayleigh-Ritz pass (eigh of Q^T X X^T Q); every pass holds only n x l;
* last pass (both): V = X^T U S^-1 block by block, written straight to Zarr as (k, P) float32 with
  per-group sums of squares on the way (loadings: the fraction of ||v_j||^2 in each layer group).

``subspace_rotation`` gets principal angles between consecutive windows' top-k subspaces from the
banded Gram alone (V_t^T V_{t-1} = S_t^-1 U_t^T C_t U_{t-1} S_{t-1}^-1, docs/method.md §3.3), no P-vectors.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from sed_dask import config
from sed_dask.engine.grouping import ALL, resolve
from sed_dask.engine.passes import (
    checked_steps,
    column_segments,
    compute_graph,
    pass_settings,
    read_into,
    sum_partials,
    tree_reduce,
)
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import StoreError
from sed_dask.schema import provenance_attrs
from sed_dask.store.outputs import check_target, quiet_consolidation, results_target, start_attrs, write_part
from sed_dask.store.trajectory import RunStore, open_store

METHODS = ("exact", "randomized")


# ----------------------------------------------------------------------------- blocks
@dataclasses.dataclass(frozen=True)
class Block:
    """Deltas ``[d0, d1)`` (rows ``d0 .. d1`` of the store) x columns ``[c0, c1)``."""

    d0: int
    d1: int
    c0: int
    c1: int
    center: bool
    zarr_settings: tuple = ()


def read_block(params, b: Block) -> np.ndarray:
    """float64 deltas (n x C) of one block; float32 differences as in the Gram engine (docs/method.md §2.3)."""
    if b.zarr_settings:
        config.configure_zarr(**dict(b.zarr_settings))
    buf = np.empty((b.d1 - b.d0 + 1, b.c1 - b.c0), np.float32)
    read_into(RawChunkReader.for_array(params) or params, b.d0, b.d1 + 1, b.c0, b.c1, buf)
    X = np.diff(buf, axis=0).astype(np.float64)
    if b.center:
        X -= X.mean(axis=0, keepdims=True)
    return X


def _xt_block(params, b: Block) -> np.ndarray:
    return read_block(params, b).T  # Fortran order, which LAPACK's QR wants anyway


def _omega_block(params, b: Block, op) -> np.ndarray:
    return read_block(params, b) @ op.rows(b.c0, b.c1)


def _power_block(params, b: Block, Q: np.ndarray) -> np.ndarray:
    X = read_block(params, b)
    return X @ (X.T @ Q)


def _v_block(params, b: Block, M: np.ndarray, segments: tuple, n_groups: int, out) -> dict:
    """V block = X^T M (C x k); written to ``out[:, c0:c1]`` (a whole Zarr chunk) if given."""
    V = read_block(params, b).T @ M
    ss = np.zeros((M.shape[1], n_groups + 1))
    for lo, hi, gid in segments:
        ss[:, gid] += np.einsum("ij,ij->j", V[lo - b.c0 : hi - b.c0], V[lo - b.c0 : hi - b.c0])
    res = {"sumsq": ss}
    if out is not None:
        out[:, b.c0 : b.c1] = V.T.astype(np.float32)
    else:
        res["v"] = {b.c0: V.T.astype(np.float32)}
    return res


@dataclasses.dataclass
class Stack:
    """The delta stack of one window (or the whole run) and how it is cut into column blocks."""

    run_store: RunStore
    d0: int
    d1: int
    cols: tuple
    center: bool
    steps: np.ndarray  # checkpoint steps of the run
    zs: tuple

    @property
    def n(self) -> int:
        return self.d1 - self.d0

    @property
    def delta_steps(self) -> np.ndarray:
        return self.steps[self.d0 + 1 : self.d1 + 1]

    def blocks(self):
        return [Block(self.d0, self.d1, c0, c1, self.center, self.zs) for c0, c1 in self.cols]

    def token(self, *extra) -> str:
        from dask.base import tokenize

        rs = self.run_store
        return tokenize(
            str(rs.group.store_path), rs.name, rs.index.hash, self.d0, self.d1, self.cols, self.center, self.zs, *extra
        )


def window_stack(
    run_store: RunStore,
    *,
    window: int | None = None,
    end_step: int | None = None,
    center: bool = False,
    tile_bytes=None,
) -> Stack:
    """The deltas of the window of ``window`` deltas ending at ``end_step`` (default: the last delta);
    ``window=None``: every delta of the run (trajectory PCA)."""
    steps = checked_steps(run_store)
    N = steps.size - 1
    if end_step is None:
        e = N - 1
    else:
        hit = np.flatnonzero(steps[1:] == int(end_step))
        if not hit.size:
            raise StoreError(
                f"run {run_store.name!r}: end_step {end_step} is not a delta step "
                f"(delta steps run {int(steps[1])} .. {int(steps[-1])})"
            )
        e = int(hit[0])
    W = e + 1 if window is None else int(window)
    if W < 1 or W > e + 1:
        raise StoreError(
            f"run {run_store.name!r}: a window of {W} deltas ending at step "
            f"{int(steps[e + 1])} needs {W} deltas, only {e + 1} are available"
        )
    d0, d1 = e + 1 - W, e + 1
    n, P = d1 - d0, run_store.n_params
    tile_bytes = config.get_bytes("spectrum.tile-bytes", tile_bytes)
    # a task holds ~24 bytes per (delta x column): the float32 read and difference, float64 deltas and
    # the copy LAPACK's QR works on, so one task stays near tile_bytes
    C = max(n, tile_bytes // (24 * (n + 1)), 1)
    chunk = run_store.read_unit
    if C >= chunk:
        C = (C // chunk) * chunk
    C = min(C, P)
    cols = [(c, min(c + C, P)) for c in range(0, P, C)]
    return Stack(run_store, d0, d1, tuple(cols), bool(center), steps, tuple(sorted(config.zarr_settings().items())))


# ----------------------------------------------------------------------------- running
def _run(dsk: dict, keys: list, *, client, scheduler):
    """Run on the placement ``directions`` resolved once (a client, or an in-process scheduler)."""
    return compute_graph(dsk, keys, client=client, scheduler=None if client is not None else scheduler or "threads")


def block_pass(stack: Stack, fn, *args, client=None, scheduler=None, split_every: int | None = None):
    """Sum over column blocks of ``fn(params, block, *args)`` (one read of the stack)."""
    split_every = pass_settings(split_every=split_every).split_every
    token = stack.token(fn.__name__, *args)
    name, rname = f"sed-dir-{fn.__name__}-{token}", f"sed-dir-sum-{token}"
    dsk = {}
    level = []
    for i, b in enumerate(stack.blocks()):
        dsk[(name, i)] = (fn, stack.run_store.params, b, *args)
        level.append((name, i))
    root = tree_reduce(dsk, level, rname, sum_partials, split_every=split_every)
    return _run(dsk, [root], client=client, scheduler=scheduler)[0]


def xt_array(stack: Stack):
    """X^T (P x n) as a dask array with one column of blocks (what ``tsqr`` requires).

    A last block shorter than n joins its neighbour: TSQR wants every block at least n tall.
    """
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    cols = list(stack.cols)
    if len(cols) > 1 and cols[-1][1] - cols[-1][0] < stack.n:
        cols[-2:] = [(cols[-2][0], cols[-1][1])]
    blocks = [Block(stack.d0, stack.d1, c0, c1, stack.center, stack.zs) for c0, c1 in cols]
    name = f"sed-dir-xt-{stack.token()}"
    dsk = {(name, i, 0): (_xt_block, stack.run_store.params, b) for i, b in enumerate(blocks)}
    chunks = (tuple(c1 - c0 for c0, c1 in cols), (stack.n,))
    return da.Array(HighLevelGraph.from_collections(name, dsk, dependencies=[]), name, chunks, dtype=np.float64)


def _r_block(params, b: Block) -> np.ndarray:
    """R of one block's X^T (C x n): LAPACK geqrf in place on the (Fortran-ordered) transpose."""
    from scipy.linalg import lapack

    A = read_block(params, b).T
    n = A.shape[1]
    lwork = int(lapack.dgeqrf(A[:1], lwork=-1)[2][0])
    qr, _, _, info = lapack.dgeqrf(A, lwork=max(lwork, n), overwrite_a=True)
    if info:
        raise RuntimeError(f"LAPACK dgeqrf failed (info={info})")
    return np.triu(qr[:n])


def _r_stack(parts: list) -> np.ndarray:
    """TSQR combine: the R factor of the stacked R factors (in a fixed order)."""
    return np.linalg.qr(np.vstack(parts), mode="r")


def exact_svd(stack: Stack, *, client=None, scheduler=None, split_every: int | None = None):
    """``(U (n x n), sigma (n,))`` of X from the R factor of a TSQR of X^T (one pass).

    Only R is formed (Householder QR per block, ``mode="r"``; then QR of stacked R's up a tree), so a
    task holds its block about twice, where ``dask.array.linalg.tsqr`` also builds every block's Q
    (``xt_array`` gives the same X^T for that route).
    """
    split_every = pass_settings(split_every=split_every).split_every
    token = stack.token("tsqr-r")
    name, rname = f"sed-dir-r-{token}", f"sed-dir-rstack-{token}"
    dsk, level = {}, []
    for i, b in enumerate(stack.blocks()):
        dsk[(name, i)] = (_r_block, stack.run_store.params, b)
        level.append((name, i))
    root = tree_reduce(dsk, level, rname, _r_stack, split_every=split_every)
    R = _run(dsk, [root], client=client, scheduler=scheduler)[0]
    _, sigma, VrT = np.linalg.svd(R)  # X^T = Q R = (Q U_r) S V_r^T  =>  X = V_r S (Q U_r)^T
    sigma = np.concatenate([sigma, np.zeros(stack.n - sigma.size)])  # R has P < n rows when P < n
    return VrT.T, sigma


def randomized_svd(
    stack: Stack,
    k: int,
    *,
    n_oversamples: int = 10,
    n_power_iter: int = 2,
    seed: int = 0,
    client=None,
    scheduler=None,
    tile_elems: int | None = None,
):
    """Halko et al. on the small side: ``(U (n x l), sigma (l,))``, n_power_iter + 2 passes."""
    from sed_dask.engine.jl import Operator

    P = stack.run_store.n_params
    l = min(stack.n, k + n_oversamples)
    op = Operator(
        seed=seed, d=l, distribution="gaussian", tile_elems=int(config.get("sketch.tile-elems", tile_elems)), n_params=P
    )
    Y = block_pass(stack, _omega_block, op, client=client, scheduler=scheduler)
    Q, _ = np.linalg.qr(Y)
    for _ in range(n_power_iter):
        Q, _ = np.linalg.qr(block_pass(stack, _power_block, Q, client=client, scheduler=scheduler))
    Z = block_pass(stack, _power_block, Q, client=client, scheduler=scheduler)
    M = Q.T @ Z
    lam, E = np.linalg.eigh((M + M.T) / 2)
    order = np.argsort(lam)[::-1]
    lam, E = np.clip(lam[order], 0, None), E[:, order]
    return Q @ E, np.sqrt(lam)


def _flip(U: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest |entry| of each left vector is positive (as svd_flip)."""
    idx = np.argmax(np.abs(U), axis=0)
    return np.where(U[idx, np.arange(U.shape[1])] < 0, -1.0, 1.0)


# ----------------------------------------------------------------------------- API
def directions(
    store,
    *,
    run: str,
    window: int | None = None,
    end_step: int | None = None,
    k: int = 3,
    method: str = "exact",
    center: bool = False,
    groups="default",
    n_oversamples: int = 10,
    n_power_iter: int = 2,
    seed: int | None = None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    output=None,
    tile_bytes=None,
    overwrite: bool = False,
):
    """Top-k right singular vectors (parameter-space directions) of a window or of the whole run.

    ``window`` deltas ending at ``end_step`` (default the last delta); ``window=None`` uses every
    delta (trajectory PCA; ``center=True`` subtracts the mean delta). ``method``: "exact" (TSQR) or
    "randomized" (Halko; ``n_oversamples``, ``n_power_iter``, ``seed``). Returns a Dataset with
    ``direction(component, param)`` float32 (unit norm), ``sigma(component)``, ``u(component, step)``
    (the deltas' coefficients), ``loading(component, group)`` (fraction of ||v||^2 per layer group,
    summing to 1) and the parameter index in attrs; with ``output`` it is written to Zarr, tasks
    writing their own column blocks, and the returned Dataset is lazily opened from there. The
    output is written beside the path and moved into place complete; an existing results store is
    replaced only with ``overwrite=True`` (:mod:`sed_dask.store.outputs`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if output is not None:
        check_target(output, overwrite=overwrite)
    ts = open_store(store, mode="r")
    rs = ts.run(run)
    stack = window_stack(rs, window=window, end_step=end_step, center=center, tile_bytes=tile_bytes)
    if not 1 <= int(k) <= stack.n:
        raise ValueError(f"k={k}: need 1 <= k <= {stack.n} (deltas in the stack)")
    k = int(k)
    import xarray as xr

    seed = int(config.get("sketch.seed", seed))
    req = DirectionsRequest(k, method, groups, n_oversamples, n_power_iter, seed, window, end_step)
    from sed_dask.cluster.placement import running

    with running(client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler) as where:
        if output is None:
            return _directions(ts, rs, stack, req, client=where.client, scheduler=where.scheduler, output=None)
        with results_target(output, overwrite=overwrite) as t:
            _directions(ts, rs, stack, req, client=where.client, scheduler=where.scheduler, output=t.path)
        with quiet_consolidation():
            return xr.open_zarr(str(output))


@dataclasses.dataclass(frozen=True)
class DirectionsRequest:
    """What ``directions`` was asked for (recorded in the result's attrs)."""

    k: int
    method: str
    groups: object
    n_oversamples: int
    n_power_iter: int
    seed: int
    window: int | None
    end_step: int | None


def _left_vectors(stack: Stack, req: DirectionsRequest, *, client, scheduler):
    """``(U[:, :k] sign-fixed, sigma[:k], every sigma, passes over the store)`` of the stack."""
    if req.method == "exact":
        U, sigma = exact_svd(stack, client=client, scheduler=scheduler)
        passes = 2
    else:
        U, sigma = randomized_svd(
            stack,
            req.k,
            n_oversamples=req.n_oversamples,
            n_power_iter=req.n_power_iter,
            seed=req.seed,
            client=client,
            scheduler=scheduler,
        )
        passes = req.n_power_iter + 3
    U, sig = U[:, : req.k], sigma[: req.k]
    if not (sig > 0).all():
        raise StoreError(
            f"run {stack.run_store.name!r}: the stack has rank < k={req.k} (sigma {sig.tolist()}); lower k"
        )
    return U * _flip(U)[None, :], sig, sigma, passes


def _directions_attrs(ts, rs, stack, req: DirectionsRequest, *, sigma, passes, gdesc, output) -> dict:
    attrs = provenance_attrs(
        {
            "sed_kind": "directions",
            "source_store": ts.url,
            "run": rs.name,
            "method": req.method,
            "window": -1 if req.window is None else int(req.window),
            "end_step": int(stack.delta_steps[-1]),
            "first_delta_step": int(stack.delta_steps[0]),
            "center": int(stack.center),
            "k": req.k,
            "passes": passes,
            "n_params": rs.n_params,
            "param_index_hash": rs.index.hash,
            "param_index": json.dumps(rs.index.to_records()),
            "groups": json.dumps(gdesc or {ALL: "the whole selected parameter vector"}),
            "sigma_all": json.dumps([float(x) for x in sigma]),
        }
    )
    if req.method == "randomized":
        attrs.update(n_oversamples=int(req.n_oversamples), n_power_iter=int(req.n_power_iter), seed=int(req.seed))
    if output is not None:
        attrs.update(start_attrs("directions", ["sigma", "u", "direction", "loading", "component", "step", "group"]))
    return attrs


def _group_loadings(sumsq: np.ndarray, granges: dict, gnames: list) -> tuple[np.ndarray, list]:
    """Fraction of each ||v_j||^2 per layer group (tensors in no listed group gathered last)."""
    gnames = list(gnames)
    if not granges:
        ss = sumsq.sum(axis=1, keepdims=True)
    elif sumsq[:, 0].any():  # a list of group names need not cover every tensor
        gnames.append("(unassigned)")
        ss = np.concatenate([sumsq[:, 1:], sumsq[:, :1]], axis=1)
    else:
        ss = sumsq[:, 1:]
    return ss / ss.sum(axis=1, keepdims=True), gnames


def _directions(ts, rs, stack, req: DirectionsRequest, *, client, scheduler, output):
    import xarray as xr

    U, sig, sigma, passes = _left_vectors(stack, req, client=client, scheduler=scheduler)
    k, M = req.k, U / sig[None, :]
    groups = req.groups
    if groups == "default" and set(rs.index.group_ranges()) == {ALL}:
        groups = None  # stores written from arrays label everything "all"
    granges, gdesc = resolve(rs.index, groups, run=rs.name)
    flat = sorted((lo, hi, gid) for gid, g in enumerate(granges, start=1) for lo, hi in granges[g])
    attrs = _directions_attrs(ts, rs, stack, req, sigma=sigma, passes=passes, gdesc=gdesc, output=output)
    coords = {
        "component": ("component", np.arange(1, k + 1, dtype=np.int64), {"long_name": "singular vector index j"}),
        "step": ("step", stack.delta_steps.astype(np.int64), {"long_name": "step of the delta", "units": "steps"}),
    }
    small = {
        "sigma": (("component",), sig, {"long_name": "singular value of the delta stack", "units": "parameter units"}),
        "u": (
            ("component", "step"),
            U.T,
            {"long_name": "left singular vector (coefficient of each delta)", "units": "1"},
        ),
    }
    dir_attrs = {"long_name": "right singular vector (unit norm) in parameter space", "units": "1"}
    out_arr = None
    if output is not None:
        import dask.array as da
        import zarr

        widths = tuple(c1 - c0 for c0, c1 in stack.cols)  # uniform but the last: one Zarr chunk per task
        placeholder = da.zeros((k, rs.n_params), chunks=(k, widths), dtype=np.float32)
        meta = xr.Dataset(
            {**small, "direction": (("component", "param"), placeholder, dir_attrs)}, coords=coords, attrs=attrs
        )
        write_part(meta, output, mode="w-", compute=False)
        out_arr = zarr.open_group(str(output), mode="r+")["direction"]
    segs = tuple(column_segments(c0, c1, flat) for c0, c1 in stack.cols)
    gnames = list(granges) or [ALL]
    res = _v_pass(stack, M, segs, len(gnames), out_arr, client=client, scheduler=scheduler)
    loading, gnames = _group_loadings(res["sumsq"], granges, gnames)
    lvar = {
        "loading": (
            ("component", "group"),
            loading,
            {"long_name": "fraction of ||v_j||^2 in the layer group", "units": "1"},
        )
    }
    gcoord = {"group": ("group", np.array(gnames, dtype=object), {"long_name": "layer group"})}
    if output is not None:
        write_part(xr.Dataset(lvar, coords=gcoord, attrs=attrs), output, mode="a")
        return None  # the caller marks it complete, moves it into place and opens it there
    V = np.concatenate([res["v"][c0] for c0, _ in stack.cols], axis=1)
    return xr.Dataset(
        {**small, **lvar, "direction": (("component", "param"), V, dir_attrs)}, coords={**coords, **gcoord}, attrs=attrs
    )


def _v_pass(stack: Stack, M, segs, n_groups, out, *, client, scheduler):
    split_every = pass_settings().split_every
    token = stack.token("v", M, segs, None if out is None else str(out.store_path))
    name, rname = f"sed-dir-v-{token}", f"sed-dir-vsum-{token}"
    dsk, level = {}, []
    for i, (b, sg) in enumerate(zip(stack.blocks(), segs)):
        dsk[(name, i)] = (_v_block, stack.run_store.params, b, M, sg, n_groups, out)
        level.append((name, i))
    root = tree_reduce(dsk, level, rname, sum_partials, split_every=split_every)
    return _run(dsk, [root], client=client, scheduler=scheduler)[0]


# ----------------------------------------------------------------------------- rotation
def principal_angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the row spaces of ``A`` and ``B`` (k x P each).

    Rows are orthonormalised first (directions stored as float32 are orthonormal only to ~1e-7), and
    small angles come from sines (Knyazev & Argentati), so angles down to ~1e-8 rad are resolved.
    """
    Qa = np.linalg.qr(np.asarray(A, np.float64).T)[0]
    Qb = np.linalg.qr(np.asarray(B, np.float64).T)[0]
    M = Qa.T @ Qb
    cos = np.sort(np.clip(np.linalg.svd(M, compute_uv=False), 0.0, 1.0))[::-1]
    sin = np.sort(np.clip(np.linalg.svd(Qb - Qa @ M, compute_uv=False), 0.0, 1.0))
    ang = np.where(cos**2 >= 0.5, np.arcsin(sin[: cos.size]), np.arccos(cos))
    return np.sort(ang)


def subspace_rotation(
    store_or_gram,
    *,
    run: str | None = None,
    window: int = 10,
    k: int = 2,
    client=None,
    scheduler: str | None = None,
    address: str | None = None,
    scheduler_file: str | None = None,
    progress: bool = False,
):
    """Principal angles (degrees) between the top-k direction subspaces of consecutive windows.

    ``angle(step, component)``: window ending at ``step`` vs the one ending a delta earlier, from the
    banded Gram (width W + 1) of one pass, or from a given ``GramResult``. NaN where sigma_k is 0.
    """
    import xarray as xr

    from sed_dask.engine.gram import GramResult, banded_gram
    from sed_dask.engine.windows import window_grams

    if isinstance(store_or_gram, GramResult):
        gram = store_or_gram
    else:
        ts = open_store(store_or_gram, mode="r")
        rs = ts.run(run if run is not None else ts.runs[0])
        gram = banded_gram(
            rs,
            w_max=window + 1,
            client=client,
            scheduler=scheduler,
            address=address,
            scheduler_file=scheduler_file,
            progress=progress,
        )
    band = gram["all"]
    if band.shape[1] < window + 1:
        raise ValueError(f"band width {band.shape[1]} < W + 1 = {window + 1}")
    G = window_grams(band, window)
    C = window_grams(band, window, shift=1)
    lam, E = np.linalg.eigh(G)
    lam, E = np.clip(lam[:, ::-1], 0, None)[:, :k], E[:, :, ::-1][:, :, :k]
    sig = np.sqrt(lam)
    n = G.shape[0]
    ang = np.full((n, k), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(1, n):
            if sig[t, -1] > 0 and sig[t - 1, -1] > 0:
                Mt = (E[t].T @ C[t] @ E[t - 1]) / np.outer(sig[t], sig[t - 1])
                s = np.linalg.svd(Mt, compute_uv=False)
                ang[t] = np.degrees(np.arccos(np.clip(s, 0.0, 1.0)))
    steps = gram.delta_steps[window - 1 :]
    return xr.DataArray(
        ang,
        dims=("step", "component"),
        coords={"step": steps.astype(np.int64), "component": np.arange(1, k + 1)},
        name="angle",
        attrs={
            "long_name": f"principal angles between top-{k} subspaces of consecutive W={window} windows",
            "units": "degree",
            "run": gram.run,
            "window": window,
        },
    )
