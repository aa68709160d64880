"""Do the updates move inside a layer's outlier eigenspace? Principal angles, from checkpoints alone.

For a window of W deltas ending at step s, the top-q update directions are the right singular
vectors v_j of the W x P delta stack X (:mod:`sed_dask.engine.directions`); here they come from the window
Gram of one banded-Gram pass (``X X^T = U S^2 U^T``, as ``directions.subspace_rotation`` does), so
``v_j = X^T u_j / sigma_j`` is never formed in R^P: a task per (window, layer) reads only the
layer's columns of the W + 1 checkpoints, in row blocks of the matrix, and builds
``D_j = reshape(v_j restricted to the layer, (rows, cols))``; a task holds about 3q + 2 copies of the layer
(float64), never a rows x rows or cols x cols matrix.

The layer's update subspaces are the top-k left and right singular subspaces of the window's top-q
update restricted to the layer, ``sum_j sigma_j^2 D_j D_j^T`` and ``sum_j sigma_j^2 D_j^T D_j``
(q = ``n_directions``). They are compared with the top-k left and right singular subspaces of the
layer's weight at step s (the window's newest checkpoint): principal angles (degrees), and
``overlap`` = mean cos^2 of the k angles (1: the updates lie in the weight's top-k subspace; a random
k-subspace of R^d gives k / d, stored as ``chance``).
"""

from __future__ import annotations

import json

import numpy as np

from sed_dask import config
from sed_dask.engine.passes import execute, read_into
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import StoreError
from sed_dask.schema import provenance_attrs
from sed_dask.store.outputs import check_target, write_dataset
from sed_dask.weights.compute import open_sources, select_layers
from sed_dask.weights.spectra import (
    WeightSpectrumError,
    array_rows,
    matrix_shape,
    settings,
    top_singular_vectors,
)

KIND = "weight_alignment"
SIDES = ("left", "right")


def _angles(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spaces of orthonormal A and B."""
    cos = np.clip(np.linalg.svd(A.T @ B, compute_uv=False), 0.0, 1.0)
    return np.degrees(np.arccos(cos))


def window_layer_task(
    params, d0: int, d1: int, entry, M: np.ndarray, sig: np.ndarray, k: int, s, block_bytes: int
) -> dict:
    """Angles of one layer in one window: checkpoints ``d0 .. d1`` (rows), ``M = U_q / sigma_q`` (W x q)."""
    m, n = matrix_shape(entry.shape)
    src = RawChunkReader.for_array(params) or params
    q = M.shape[1]
    rows_per = max(1, block_bytes // (4 * n * (d1 - d0 + 1)))
    D = np.empty((q, m, n))
    Wend = np.empty((m, n))
    for r0 in range(0, m, rows_per):
        r1 = min(r0 + rows_per, m)
        buf = np.empty((d1 - d0 + 1, (r1 - r0) * n), np.float32)
        read_into(src, d0, d1 + 1, entry.offset + r0 * n, entry.offset + r1 * n, buf)
        X = np.diff(buf, axis=0).astype(np.float64)  # float32 differences, as the Gram engine
        D[:, r0:r1] = (X.T @ M).T.reshape(q, r1 - r0, n)
        Wend[r0:r1] = buf[-1].reshape(r1 - r0, n)
    energy = np.einsum("j,jab,jab->", sig**2, D, D)
    out = {"loading": float(energy / np.sum(sig**2)), "angle": np.full((2, k), np.nan)}
    if not energy > 0:
        return out
    # the eigenvectors of sum_j sigma_j^2 D_j D_j^T (D_j^T D_j) are the left (right) singular vectors of
    # [sigma_1 D_1 | ... | sigma_q D_q] ([sigma_1 D_1; ...; sigma_q D_q]): no rows x rows or cols x cols matrix
    SD = D * sig[:, None, None]
    Bl = SD.transpose(1, 0, 2).reshape(m, q * n)
    Br = SD.reshape(q * m, n)
    Ul = np.linalg.qr(top_singular_vectors(array_rows(Bl), m, q * n, k, s)[0])[0]
    Vr = np.linalg.qr(top_singular_vectors(array_rows(Br), q * m, n, k, s)[2])[0]
    Uw, _, Vw = top_singular_vectors(array_rows(Wend), m, n, k, s)
    Uw, Vw = np.linalg.qr(Uw)[0], np.linalg.qr(Vw)[0]
    out["angle"][0] = _angles(Ul, Uw)
    out["angle"][1] = _angles(Vr, Vw)
    return out


def update_alignment(
    source,
    *,
    run: str | None = None,
    window: int = 10,
    k: int = 3,
    n_directions: int = 3,
    layers=None,
    exclude=None,
    stride: int = 1,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    output=None,
    overwrite: bool = False,
    progress: bool = False,
    block_bytes=None,
):
    """Principal angles between each window's top update directions, restricted to a layer and reshaped
    to its matrix, and the layer weight's top-k left/right singular subspaces (module docstring).

    One banded-Gram pass (width W) for the window SVDs, then one task per (window, layer). ``stride``:
    every stride-th window. Returns ``angle(step, layer, side, component)`` (degrees), ``overlap(step,
    layer, side)``, ``chance(layer, side)``, ``loading(step, layer)`` (fraction of the top-q update
    energy in the layer) and ``sigma(step, direction)``; ``output`` writes it to Zarr safely.
    """
    import xarray as xr

    from sed_dask.engine.gram import banded_gram
    from sed_dask.engine.windows import window_grams

    if output is not None:
        check_target(output, overwrite=overwrite)
    rss, described = open_sources(source, None if run is None else [run])
    rs = rss[0]
    W, k, q, stride = int(window), int(k), int(n_directions), int(stride)
    if W < 1 or q < 1 or k < 1 or stride < 1:
        raise ValueError(f"window={W}, k={k}, n_directions={q}, stride={stride}: each must be >= 1")
    if q > W:
        raise ValueError(f"n_directions={q} exceeds the window's {W} deltas")
    entries = select_layers(rs.index, rs.name, layers, exclude)
    for e in entries:
        m, n = matrix_shape(e.shape)
        if k > min(m, n):
            raise WeightSpectrumError(f"tensor {e.name!r} ({m} x {n}): k={k} is larger than the matrix")
    s = settings(k=k)
    block_bytes = config.get_bytes("weights.block-bytes", block_bytes)
    steps = np.asarray(rs.check_complete(), np.int64)
    if steps.size - 1 < W:
        raise StoreError(f"run {rs.name!r} has {steps.size - 1} deltas; a window of W={W} needs at least W")
    gram = banded_gram(rs, w_max=W, client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file)
    G = window_grams(gram["all"], W)
    ends = np.arange(W - 1, steps.size - 1)[::-1][::stride][::-1]  # the last window is always in
    zero_rtol = float(config.get("spectrum.zero-rtol"))
    dsk, keys, meta = {}, [], []
    from dask.base import tokenize

    tname = f"sed-weights-align-{tokenize(rs.token_id, rs.name, W, k, q, [e.name for e in entries], ends.tolist())}"
    sig_all = np.full((ends.size, q), np.nan)
    for t, e_idx in enumerate(ends):
        lam, E = np.linalg.eigh(G[e_idx - (W - 1)])
        lam, E = np.clip(lam[::-1], 0, None), E[:, ::-1]
        sig = np.sqrt(lam[:q])
        sig_all[t] = sig
        if not sig[-1] > zero_rtol * sig[0]:
            continue  # fewer than q resolved directions: NaN for this window
        M = E[:, :q] / sig[None, :]
        d0, d1 = int(e_idx) - W + 1, int(e_idx) + 1  # checkpoint rows d0 .. d1 hold the window's W deltas
        for j, ent in enumerate(entries):
            key = (tname, t, j)
            dsk[key] = (window_layer_task, rs.params, d0, d1, ent, M, sig, k, s, block_bytes)
            keys.append(key)
            meta.append((t, j))
    results = (
        execute(
            dsk,
            keys,
            client=client,
            scheduler=scheduler,
            address=address,
            scheduler_file=scheduler_file,
            progress=progress,
        )
        if keys
        else []
    )
    L = len(entries)
    angle = np.full((ends.size, L, 2, k), np.nan)
    loading = np.full((ends.size, L), np.nan)
    for (t, j), res in zip(meta, results):
        angle[t, j] = res["angle"]
        loading[t, j] = res["loading"]
    overlap = np.mean(np.cos(np.radians(angle)) ** 2, axis=-1)
    dims = np.array([[matrix_shape(e.shape)[0], matrix_shape(e.shape)[1]] for e in entries], np.float64)
    chance = k / dims
    wsteps = steps[ends + 1]
    ds = xr.Dataset(
        {
            "angle": (
                ("step", "layer", "side", "component"),
                angle,
                {
                    "long_name": "principal angle between the window's update subspace (restricted to the layer) "
                    "and the weight's top-k singular subspace",
                    "units": "degree",
                },
            ),
            "overlap": (
                ("step", "layer", "side"),
                overlap,
                {
                    "long_name": "mean cos^2 of the principal angles (1 = inside the weight's top-k subspace)",
                    "units": "1",
                },
            ),
            "chance": (
                ("layer", "side"),
                chance,
                {"long_name": "overlap of a random k-subspace: k / dimension", "units": "1"},
            ),
            "loading": (
                ("step", "layer"),
                loading,
                {"long_name": "fraction of the window's top-q update energy in the layer", "units": "1"},
            ),
            "sigma": (
                ("step", "direction"),
                sig_all,
                {"long_name": "window singular values of the top-q directions", "units": "parameter units"},
            ),
        },
        coords={
            "step": (
                "step",
                wsteps.astype(np.int64),
                {"long_name": "newest checkpoint of the window", "units": "steps"},
            ),
            "layer": ("layer", np.array([e.name for e in entries], dtype=object)),
            "side": ("side", np.array(SIDES, dtype=object)),
            "component": ("component", np.arange(1, k + 1, dtype=np.int64)),
            "direction": ("direction", np.arange(1, q + 1, dtype=np.int64)),
        },
        attrs=provenance_attrs(
            {
                "sed_kind": KIND,
                "source_store": described,
                "run": rs.name,
                "window": W,
                "k": k,
                "n_directions": q,
                "stride": stride,
                "definition": "update subspace: top-k eigenvectors of sum_j sigma_j^2 D_j D_j^T (left) / D_j^T D_j "
                "(right), D_j = window direction v_j restricted to the layer, reshaped; weight subspace: "
                "top-k singular vectors of the layer at the window's newest checkpoint",
                "layers": json.dumps([e.name for e in entries]),
            }
        ),
    )
    if output is not None:
        write_dataset(ds, output, kind=KIND, overwrite=overwrite)
    return ds
