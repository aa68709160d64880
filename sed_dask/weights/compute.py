"""The weight-spectra pass: one Dask task per (checkpoint, 2-D tensor), an xarray Dataset over
(run, step, layer[, sv | eig]) written through :mod:`sed_dask.store.outputs`.

Each task reads one tensor of one checkpoint (a store row's flat range, or the checkpoint file
itself for an :func:`sed_dask.open_checkpoints` source) in row blocks of at most ``block-bytes``
and runs :func:`sed_dask.weights.spectra.matrix_spectrum`; it holds at most the matrix in float64
(``exact-bytes``), the small-side Gram (``esd-max-dim``^2 float64) or the randomized sketches.
With ``output`` and ``keep_esd``, tasks write their ESD straight into its own Zarr chunk, so the
client only gathers per-matrix summaries (k values and a dozen scalars), never all eigenvalues.
"""

from __future__ import annotations

import contextlib
import json
import math
import re

import numpy as np

from sed_dask import config
from sed_dask.engine.passes import execute, read_into
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import StoreError
from sed_dask.schema import provenance_attrs
from sed_dask.store.outputs import check_target, quiet_consolidation, results_target, start_attrs, write_part
from sed_dask.weights.spectra import (
    WeightSpectrumError,
    check_k,
    matrix_shape,
    matrix_spectrum,
    settings,
)

KIND = "weight_spectra"
SCALARS = {
    "spectral_norm": ("spectral norm ||W||_2 = sigma_1", "parameter units"),
    "frobenius_norm": ("Frobenius norm ||W||_F", "parameter units"),
    "stable_rank": ("stable rank ||W||_F^2 / ||W||_2^2", "1"),
    "mp_s2": ("MP fit: element variance s^2 of the bulk", "parameter units^2"),
    "mp_edge": ("MP bulk edge in singular values, s (sqrt(N) + sqrt(M))", "parameter units"),
    "outlier_threshold": (
        "outlier threshold: sqrt of MP edge + Tracy-Widom margin (singular values)",
        "parameter units",
    ),
    "n_outliers": ("singular values above outlier_threshold", "1"),
    "n_outliers_censored": ("1: every computed sigma was an outlier (count is a lower bound; no ESD)", "1"),
    "mp_ks": ("KS distance of the bulk ESD from the fitted MP law", "1"),
    "alpha": ("power-law exponent of the ESD tail, p(lambda) ~ lambda^-alpha (CSN: xmin by KS, MLE)", "1"),
    "alpha_xmin": ("power-law fit: xmin (eigenvalue)", "parameter units^2"),
    "alpha_ks": ("power-law fit: KS distance at xmin", "1"),
    "alpha_n_tail": ("power-law fit: eigenvalues >= xmin", "1"),
    "alpha_sigma": ("power-law fit: standard error (alpha - 1) / sqrt(n_tail)", "1"),
}


# ----------------------------------------------------------------------------- sources and layers
def open_sources(source, runs=None) -> tuple[list, str]:
    """``(run stores, description)``: a trajectory store (path, URL) or checkpoint runs (one or a list)."""
    from sed_dask.sources.checkpoint_run import CheckpointRun
    from sed_dask.store.trajectory import open_store

    items = [source] if isinstance(source, CheckpointRun) else source if isinstance(source, (list, tuple)) else None
    want = None if runs is None else ([runs] if isinstance(runs, str) else list(runs))
    if items is None:
        ts = open_store(source, mode="r")
        if not ts.runs:
            raise StoreError(f"store {ts.url} holds no runs")
        unknown = sorted(set(want or []) - set(ts.runs))
        if unknown:
            raise StoreError(f"store {ts.url} has no run(s) {unknown}; runs: {ts.runs}")
        return [ts.run(n) for n in (want or ts.runs)], ts.url
    if not items or not all(isinstance(x, CheckpointRun) for x in items):
        raise TypeError("weight_spectra(source): a list must hold checkpoint runs from sed_dask.open_checkpoints()")
    names = [x.name for x in items]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint runs need distinct names, got {names}")
    if want is not None and want != names:
        raise ValueError(f"runs={want} does not match the checkpoint runs' names {names}")
    return list(items), "; ".join(x.description for x in items)


def select_layers(index, run: str, layers=None, exclude=None) -> list:
    """The 2-D tensors (``TensorEntry``) of a run to analyse, in index order.

    ``layers``: exact tensor names (an unknown or non-2-D name is an error naming it), default all
    2-D tensors; ``exclude``: regexes (``re.search``) of names to leave out.
    """
    entries = list(index)
    if layers is not None:
        names = [layers] if isinstance(layers, str) else list(layers)
        by = {e.name: e for e in entries}
        unknown = [n for n in names if n not in by]
        if unknown:
            two_d = [e.name for e in entries if matrix_shape(e.shape)]
            raise WeightSpectrumError(
                f"run {run!r}: unknown layer(s) {unknown}; 2-D tensors: {two_d[:20]}{' ...' if len(two_d) > 20 else ''}"
            )
        flat = [n for n in names if not matrix_shape(by[n].shape)]
        if flat:
            raise WeightSpectrumError(
                f"run {run!r}: tensor(s) {[(n, list(by[n].shape)) for n in flat]} are not "
                "2-D weights (a spectrum needs a matrix with both sides >= 2)"
            )
        entries = [by[n] for n in names]
    else:
        entries = [e for e in entries if matrix_shape(e.shape)]
    for rx in [exclude] if isinstance(exclude, str) else list(exclude or []):
        pat = re.compile(rx)
        entries = [e for e in entries if not pat.search(e.name)]
    if not entries:
        raise WeightSpectrumError(
            f"run {run!r}: no 2-D tensor to analyse (shapes {[(e.name, list(e.shape)) for e in list(index)[:8]]})"
        )
    return entries


def matrix_reader(params, row: int, offset: int, n: int, zarr_settings: tuple = ()):
    """``rows(r0, r1)``: float64 rows of the matrix stored flat at ``offset`` in row ``row`` of ``params``."""
    if zarr_settings:
        config.configure_zarr(**dict(zarr_settings))
    src = RawChunkReader.for_array(params) or params

    def rows(r0: int, r1: int) -> np.ndarray:
        buf = np.empty((1, (r1 - r0) * n), np.float32)
        read_into(src, row, row + 1, offset + r0 * n, offset + r1 * n, buf)
        return buf.reshape(r1 - r0, n).astype(np.float64)

    return rows


def layer_task(params, row: int, step: int, run: str, entry, s, esd_out, where: tuple) -> dict:
    """Spectrum of one tensor at one checkpoint; the ESD goes to ``esd_out[where]`` when given."""
    m, n = matrix_shape(entry.shape)
    rows = matrix_reader(params, row, entry.offset, n, ())
    try:
        res = matrix_spectrum(rows, m, n, s, name=f"{entry.name} (run {run!r}, step {step})")
    except np.linalg.LinAlgError as exc:
        raise WeightSpectrumError(f"tensor {entry.name!r} (run {run!r}, step {step}): {exc}") from exc
    esd = res.pop("esd")
    if esd_out is not None and esd is not None:
        r, t, j = where
        line = np.full(esd_out.shape[-1], np.nan, np.float64)
        line[: esd.size] = esd
        esd_out[r, t, j, :] = line
    elif esd is not None and s.keep_esd:
        res["esd"] = esd
    return res


# ----------------------------------------------------------------------------- the pass
def weight_spectra(
    source,
    *,
    runs=None,
    layers=None,
    exclude=None,
    steps=None,
    k: int | None = None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    output=None,
    overwrite: bool = False,
    progress: bool = False,
    exact_bytes=None,
    esd_max_dim: int | None = None,
    block_bytes=None,
    oversamples: int | None = None,
    power_iter: int | None = None,
    seed: int | None = None,
    outlier_alpha: float | None = None,
    alpha_min_tail: int | None = None,
    keep_esd: bool | None = None,
):
    """Per-layer weight spectra of every checkpoint of one or more runs (docs in :mod:`sed_dask.weights`).

    ``source``: a trajectory store (path / URL) or :func:`sed_dask.open_checkpoints` runs. ``layers``:
    tensor names (default every 2-D tensor; conv kernels as out x in*kh*kw), ``exclude``: regexes,
    ``steps``: a subset of checkpoint steps. One task per (checkpoint, tensor) on ``client`` /
    ``address`` / ``scheduler_file`` (else the default or a temporary cluster), or a local
    ``scheduler`` ("threads", "sync"). Tuning arguments default to the ``sed_dask.weights`` config.
    Returns the Dataset; with ``output`` it is written to Zarr (beside the path, moved into place
    complete; an existing results store only with ``overwrite=True``) and opened from there.
    """
    import xarray as xr

    s = settings(
        k=k,
        exact_bytes=exact_bytes,
        esd_max_dim=esd_max_dim,
        block_bytes=block_bytes,
        oversamples=oversamples,
        power_iter=power_iter,
        seed=seed,
        outlier_alpha=outlier_alpha,
        alpha_min_tail=alpha_min_tail,
        keep_esd=keep_esd,
    )
    if output is not None:
        check_target(output, overwrite=overwrite)
    run_stores, described = open_sources(source, runs)
    plan = _plan(run_stores, layers, exclude, steps, s)
    with contextlib.ExitStack() as es:
        if output is None:
            return _compute(plan, s, described, client, address, scheduler_file, scheduler, progress, None)
        t = es.enter_context(results_target(output, overwrite=overwrite))
        _compute(plan, s, described, client, address, scheduler_file, scheduler, progress, t.path)
    with quiet_consolidation():
        return xr.open_zarr(str(output))


def _plan(run_stores, layers, exclude, steps, s) -> dict:
    names, info, per_run = [], {}, []
    for rs in run_stores:
        all_steps = np.asarray(rs.check_complete(), np.int64)
        if steps is not None:
            want = np.asarray(sorted({int(x) for x in steps}), np.int64)
            missing = want[~np.isin(want, all_steps)]
            if missing.size:
                raise StoreError(
                    f"run {rs.name!r} has no checkpoint at step(s) {missing.tolist()[:10]} "
                    f"(steps {int(all_steps[0])} .. {int(all_steps[-1])})"
                )
            rows = np.flatnonzero(np.isin(all_steps, want))
        else:
            rows = np.arange(all_steps.size)
        if not rows.size:
            raise StoreError(f"run {rs.name!r} holds no checkpoint")
        bad = rs.attrs.get("nonfinite") or []
        if bad:
            raise StoreError(
                f"run {rs.name!r}: NaN/Inf recorded at ingestion (tensors "
                f"{sorted({str(r.get('tensor')) for r in bad})[:5]}); weight spectra are undefined"
            )
        entries = select_layers(rs.index, rs.name, layers, exclude)
        for e in entries:
            m, n = matrix_shape(e.shape)
            check_k(e.name, m, n, s.k, s.strict_k)
            if e.name in info and info[e.name]["shape"] != tuple(e.shape):
                raise StoreError(
                    f"tensor {e.name!r} has shape {info[e.name]['shape']} in one run and "
                    f"{tuple(e.shape)} in run {rs.name!r}"
                )
            if e.name not in info:
                names.append(e.name)
                info[e.name] = {
                    "shape": tuple(e.shape),
                    "rows": m,
                    "cols": n,
                    "group": e.group,
                    "method": s.method(m, n),
                }
        per_run.append((rs, rows, all_steps[rows], entries))
    step_grid = np.unique(np.concatenate([st for _, _, st, _ in per_run]))
    n_eig = (
        max(min(v["rows"], v["cols"]) for v in info.values() if v["method"] != "randomized")
        if any(v["method"] != "randomized" for v in info.values())
        else 0
    )
    return {"runs": per_run, "layers": names, "info": info, "steps": step_grid, "n_eig": n_eig}


def _compute(plan, s, described, client, address, scheduler_file, scheduler, progress, out_path):
    import xarray as xr
    from dask.base import tokenize

    runs = [rs.name for rs, _, _, _ in plan["runs"]]
    layers, steps = plan["layers"], plan["steps"]
    R, T, L, E = len(runs), steps.size, len(layers), plan["n_eig"]
    keep = s.keep_esd and E > 0
    lidx = {n: j for j, n in enumerate(layers)}
    coords = {
        "run": ("run", np.array(runs, dtype=object), {"long_name": "run / seed"}),
        "step": ("step", steps.astype(np.int64), {"long_name": "training step of the checkpoint", "units": "steps"}),
        "layer": ("layer", np.array(layers, dtype=object), {"long_name": "2-D weight tensor"}),
        "sv": (
            "sv",
            np.arange(1, s.k + 1, dtype=np.int64),
            {"long_name": "singular-value index j (NaN beyond a matrix's min(rows, cols))"},
        ),
        "layer_rows": (
            "layer",
            np.array([plan["info"][n]["rows"] for n in layers], np.int64),
            {"long_name": "rows of the matrix (out features)"},
        ),
        "layer_cols": (
            "layer",
            np.array([plan["info"][n]["cols"] for n in layers], np.int64),
            {"long_name": "columns of the matrix (in features x kernel elements)"},
        ),
        "layer_shape": (
            "layer",
            np.array([json.dumps(list(plan["info"][n]["shape"])) for n in layers], dtype=object),
            {"long_name": "tensor shape as stored"},
        ),
        "layer_group": (
            "layer",
            np.array([plan["info"][n]["group"] for n in layers], dtype=object),
            {"long_name": "default layer-group label"},
        ),
        "layer_method": (
            "layer",
            np.array([plan["info"][n]["method"] for n in layers], dtype=object),
            {"long_name": "exact (LAPACK SVD) | gram (Gram eigvalsh) | randomized (top-k, no ESD)"},
        ),
    }
    if keep:
        coords["eig"] = ("eig", np.arange(1, E + 1, dtype=np.int64), {"long_name": "eigenvalue index (descending)"})
    attrs = provenance_attrs(
        {
            "sed_kind": KIND,
            "source_store": described,
            "runs": runs,
            "k": s.k,
            "settings": json.dumps({f: getattr(s, f) for f in s.__dataclass_fields__}),
            "n_tasks": int(sum(r.size * len(en) for _, r, _, en in plan["runs"])),
            "definitions": json.dumps(_definitions(s)),
        }
    )
    esd_attrs = {
        "long_name": "ESD: eigenvalues sigma^2 of the small-side Gram, descending (NaN padded)",
        "units": "parameter units^2",
    }
    esd_arr = None
    metrics = {rs.name: rs.metrics() for rs, _, _, _ in plan["runs"]}
    from sed_dask.schema import metric_variables

    mvars = metric_variables(metrics, runs, steps, set(SCALARS) | {"sigma", "esd"})
    if out_path is not None:
        names = ["sigma", *SCALARS, *coords, *mvars] + (["esd"] if keep else [])
        attrs.update(start_attrs(KIND, names))
        if keep:
            import dask.array as da
            import zarr

            ph = da.full((R, T, L, E), np.nan, chunks=(1, 1, 1, E), dtype=np.float64)
            meta = xr.Dataset({"esd": (("run", "step", "layer", "eig"), ph, esd_attrs)}, coords=coords, attrs=attrs)
            write_part(meta, out_path, mode="w-", compute=False)
            esd_arr = zarr.open_group(out_path, mode="r+")["esd"]
    token = tokenize(described, runs, layers, steps, s, out_path)
    tname = f"sed-weights-{token}"
    dsk, keys, where = {}, [], []
    for r, (rs, rows, st, entries) in enumerate(plan["runs"]):
        src = (f"{tname}-source", r)  # the source (a zarr array or checkpoint files) once per run, not per task
        dsk[src] = rs.params
        out_key = (f"{tname}-esd-out", r)
        dsk[out_key] = esd_arr
        for row, step in zip(rows, st):
            t = int(np.searchsorted(steps, step))
            for e in entries:
                key = (tname, r, int(row), lidx[e.name])
                dsk[key] = (layer_task, src, int(row), int(step), rs.name, e, s, out_key, (r, t, lidx[e.name]))
                keys.append(key)
                where.append((r, t, lidx[e.name]))
    results = execute(
        dsk, keys, client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file, progress=progress
    )
    sig = np.full((R, T, L, s.k), np.nan)
    sc = {v: np.full((R, T, L), np.nan) for v in SCALARS}
    esd = np.full((R, T, L, E), np.nan) if keep and out_path is None else None
    for (r, t, j), res in zip(where, results):
        sig[r, t, j] = res["sigma"]
        mp, al = res["mp"], res["alpha"]
        vals = {
            "spectral_norm": res["spectral"],
            "frobenius_norm": res["frobenius"],
            "stable_rank": res["stable_rank"],
            "mp_s2": mp["s2"],
            "mp_edge": mp["edge"],
            "outlier_threshold": mp["threshold"],
            "n_outliers": mp["n_outliers"] if mp["n_outliers"] >= 0 else math.nan,
            "n_outliers_censored": float(mp["censored"]),
            "mp_ks": mp["ks"],
            "alpha": al["alpha"],
            "alpha_xmin": al["xmin"],
            "alpha_ks": al["ks"],
            "alpha_n_tail": al["n_tail"],
            "alpha_sigma": al["sigma"],
        }
        for v, x in vals.items():
            sc[v][r, t, j] = x
        if esd is not None and "esd" in res:
            esd[r, t, j, : res["esd"].size] = res["esd"]
    dims3 = ("run", "step", "layer")
    data = {
        "sigma": (dims3 + ("sv",), sig, {"long_name": "top-k singular values, descending", "units": "parameter units"})
    }
    data.update({v: (dims3, sc[v], {"long_name": ln, "units": u}) for v, (ln, u) in SCALARS.items()})
    data.update(mvars)
    if esd is not None:
        data["esd"] = (dims3 + ("eig",), esd, esd_attrs)
    if out_path is None:
        return xr.Dataset(data, coords=coords, attrs=attrs)
    ds = xr.Dataset(data, coords={c: v for c, v in coords.items() if c != "eig" or not keep}, attrs=attrs)
    write_part(ds, out_path, mode="a" if keep else "w-")
    return None


def _definitions(s) -> dict:
    from sed_dask.weights.fit import tw_quantile

    return {
        "matrix": "2-D tensors as stored (out x in); conv kernels (out, in, *k) as out x in*prod(k); N = max side, "
        "M = min side; ESD = the M eigenvalues sigma^2",
        "method": f"exact LAPACK SVD when 8*rows*cols <= {s.exact_bytes} bytes; else Gram over row blocks + "
        f"eigvalsh when min side <= {s.esd_max_dim}; else randomized top-k (Halko, JL Gaussian test "
        f"matrix seed {s.seed}, {s.oversamples} oversamples, {s.power_iter} power iterations), no ESD",
        "mp_fit": "s^2 by matching the bulk's 10..90% quantiles to Marchenko-Pastur (ratio M/N), iterated without "
        "the outliers; without an ESD: s^2 = (||W||_F^2 - outlier energy) / (N (M - k))",
        "outliers": f"sigma^2 > s^2 (mu + {tw_quantile(s.outlier_alpha)} sigma_TW), Johnstone's Wishart centring "
        f"and scale, TW1 quantile at 1 - {s.outlier_alpha}",
        "alpha": f"Clauset-Shalizi-Newman: continuous MLE for every xmin among the eigenvalues leaving >= "
        f"{s.alpha_min_tail}, xmin minimising the KS distance",
    }
