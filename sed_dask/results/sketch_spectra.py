"""Window spectra from a JL sketch (no store re-read), and the JL error report of docs/method.md §11.

A sketch row is ``S_i = Phi^T delta_i``, so ``<S_i, S_j>`` estimates ``<delta_i, delta_j>``: the band of
``S S^T`` goes through exactly the engine's window code (``sed_dask.engine.windows``) and Dataset builder
(``sed_dask.results.spectra.build_dataset``), giving a results Dataset in the same schema for any W.
Kept apart from ``sed_dask.engine.sketch`` so that the engine may import the sketch kernel without a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from sed_dask import config
from sed_dask.engine.gram import GramResult
from sed_dask.engine.jl import NESTED_DISTRIBUTIONS
from sed_dask.results.spectra import build_dataset, window_sizes
from sed_dask.schema import provenance_attrs

RATIOS = ("r12", "r23", "edge")


def sketch_band(S: np.ndarray, width: int) -> np.ndarray:
    """``band[i, k] = <S_i, S_{i-k}>`` (NaN where ``i < k``), the engine's band layout."""
    N = S.shape[0]
    band = np.full((N, width), np.nan)
    for k in range(min(width, N)):
        band[k:, k] = np.einsum("ij,ij->i", S[k:], S[: N - k])
    return band


def sketch_attrs(sketch_ds) -> dict:
    """Dataset attrs updated with the ``sketch`` variable's provenance (seed, d, distribution, ...).

    Accepts a ``sed_dask.sketch`` Dataset or a spectrum Dataset made with ``spectrum(..., sketch=...)``.
    """
    if "sketch" not in sketch_ds.variables:
        raise ValueError(
            "the Dataset has no 'sketch' variable; make one with sed_dask.sketch(...) or "
            "sed_dask.spectrum(..., sketch=...)"
        )
    return {**sketch_ds.attrs, **sketch_ds["sketch"].attrs}


def _run_rows(sketch_ds, run: str):
    """``(checkpoint steps (N+1,), S (N, d))`` of one run (rows the run actually has)."""
    sub = sketch_ds.sel(run=run)
    span = np.asarray(sub["delta_span"].values)
    have = span >= 0
    steps = np.asarray(sub["step"].values)[have]
    if steps.size == 0:
        raise ValueError(f"run {run!r} has no sketch rows")
    S = np.asarray(sub["sketch"].values)[have]
    return np.concatenate([[steps[0] - span[have][0]], steps]).astype(np.int64), S


def _metrics(sketch_ds) -> dict:
    """``{run: {"step": grid, name: values}}`` of the metric variables (NaN where not recorded)."""
    names = [v for v in sketch_ds.data_vars if sketch_ds[v].attrs.get("sed_role") == "metric"]
    grid = np.asarray(sketch_ds["step"].values)
    out = {}
    for run in sketch_ds["run"].values:
        m = {sketch_ds[v].attrs.get("metric_name", v): np.asarray(sketch_ds[v].sel(run=run).values) for v in names}
        out[str(run)] = {"step": grid, **m} if m else {}
    return out


def sketch_grams(sketch_ds, *, width: int, runs=None, d: int | None = None) -> list[GramResult]:
    """``GramResult`` stand-ins (group ``all``) from a sketch; ``d`` < sketch d uses the first d columns.

    Columns of Phi nest (``sed_dask.engine.jl``), so the first ``d`` columns rescaled by sqrt(d_sketch/d)
    are the sketch a ``d``-dimensional operator with the same seed would give. OSNAP columns do not
    nest (``sed_dask.engine.osnap``): ``d`` below its width is refused.
    """
    attrs = sketch_attrs(sketch_ds)
    n_params = json.loads(attrs["n_params"])
    runs = [str(r) for r in sketch_ds["run"].values] if runs is None else list(runs)
    dmax = int(sketch_ds.sizes["dim"])
    d = dmax if d is None else int(d)
    if not 1 <= d <= dmax:
        raise ValueError(f"d={d} is outside the sketch's 1..{dmax} columns")
    if d < dmax and attrs.get("distribution") not in NESTED_DISTRIBUTIONS:
        raise ValueError(
            f"d={d} < {dmax}: the first d columns of a {attrs.get('distribution')!r} sketch are not a "
            f"d-dimensional sketch (its columns do not nest); sketch again with d={d}"
        )
    out = []
    for run in runs:
        steps, S = _run_rows(sketch_ds, run)
        if d < dmax:
            S = S[:, :d] * np.sqrt(dmax / d)
        band = sketch_band(S, width)
        # the noise formulas (MP floor, n_signal's Wishart null) need the degrees of freedom of the
        # noise in the data they see: a d-column sketch of isotropic noise is Wishart with d, not P
        # (with P, pure noise gave n_signal = 9 of 10 from a d = 100 sketch; exact: 0)
        P = min(int(n_params[run]), d)
        out.append(
            GramResult(
                run,
                band[None],
                ["all"],
                {"all": P},
                {"all": f"JL sketch (d={d}) of the whole selected parameter vector"},
                steps,
                width,
                "float64",
                {"source": "sketch"},
            )
        )
    return out


def spectra_from_sketch(
    sketch_ds,
    *,
    windows=(10,),
    runs=None,
    d: int | None = None,
    normalize_spacing: bool = False,
    zero_rtol: float | None = None,
    output=None,
):
    """Results Dataset (docs/result_schema.md) of every W from a sketch Dataset, without the store.

    ``d`` uses only the first d sketch columns (refused for osnap, whose columns do not nest).
    Singular values estimate the exact ones with a relative error of order sqrt(W/d) (docs/method.md
    §11: d = 10W keeps the edge ratio within ~6%).
    """

    ws = window_sizes(windows)
    grams = sketch_grams(sketch_ds, width=max(ws) + 1, runs=runs, d=d)
    for g in grams:
        if g.n_deltas < max(ws):
            raise ValueError(f"run {g.run!r} has only {g.n_deltas} deltas; W={max(ws)} needs more")
    a = sketch_attrs(sketch_ds)
    used = [g.run for g in grams]
    attrs = provenance_attrs(
        {
            "windows": ws,
            "source_store": a.get("source_store", ""),
            "runs": used,
            "n_params": json.dumps({g.run: g.n_params["all"] for g in grams}),
            "param_index_hash": json.dumps({r: json.loads(a["param_index_hash"])[r] for r in used}),
            "selection_policy": json.dumps({r: json.loads(a.get("selection_policy", "{}")).get(r) for r in used}),
            "precision": "float64",
            "step_normalised": int(bool(normalize_spacing)),
            "band_width": max(ws) + 1,
            "spectra_source": "jl_sketch",
            "sketch_seed": int(a["seed"]),
            "sketch_d": int(d or sketch_ds.sizes["dim"]),
            "sketch_distribution": a["distribution"],
            "sketch_tile_elems": int(a["tile_elems"]),
            "sketch_phi_checksum": a["phi_checksum"],
        }
    )
    attrs["zero_rtol"] = float(config.get("spectrum.zero-rtol", zero_rtol))
    metrics = {r: m for r, m in _metrics(sketch_ds).items() if r in used}
    seeds = None
    if "seed" in sketch_ds.coords and "run" in sketch_ds["seed"].dims:
        known = {str(r): int(s) for r, s in zip(sketch_ds["run"].values, sketch_ds["seed"].values)}
        seeds = [None if known.get(r, -1) < 0 else known[r] for r in used]
    ds = build_dataset(
        grams,
        ws,
        grouped=False,
        metrics=metrics,
        attrs=attrs,
        normalize_spacing=normalize_spacing,
        zero_rtol=zero_rtol,
        seeds=seeds,
    )
    if output is not None:
        from sed_dask.store.outputs import write_dataset

        write_dataset(ds, output, kind="spectra")
    return ds


# ----------------------------------------------------------------------------- JL error report
def edge_ratios(sigma: np.ndarray, k_star: np.ndarray) -> dict[str, np.ndarray]:
    """r12, r23 and sigma_k*/sigma_k*+1 per window (rows of ``sigma``) for a given k* per window."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r12 = sigma[:, 0] / sigma[:, 1]
        r23 = sigma[:, 1] / sigma[:, 2]
        ok = np.isfinite(k_star)
        k = np.where(ok, k_star, 1).astype(int) - 1
        rows = np.arange(sigma.shape[0])
        edge = np.where(ok, sigma[rows, k] / sigma[rows, k + 1], np.nan)
    return {"r12": r12, "r23": r23, "edge": edge}


def jl_error_report(
    source,
    *,
    run: str | None = None,
    windows=(10,),
    ds: Sequence[int] = (50, 100, 200, 500, 1000),
    seeds: Sequence[int] = (0, 1, 2),
    distribution: str | None = None,
    nested: bool | None = None,
    store=None,
    sketches=None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    **sketch_kw,
):
    """Relative error of JL edge ratios against the exact engine (docs/method.md §11), per W and d.

    ``source``: a trajectory store (the exact spectra are computed) or an exact results Dataset
    (its ``source_store`` is sketched unless ``store``/``sketches`` are given). ``nested=True``: one
    sketch of ``max(ds)`` columns per seed, each d using its first d columns (cheapest; errors of
    different d are then correlated); ``nested=False``: an independent operator per (d, seed) with
    seed ``1000 * seed + d``, the reference's convention (docs/method.md §11). ``None``: nested
    unless the operator's columns do not nest (osnap), for which ``nested=True`` is an error.
    ``sketches={seed: Dataset}`` (nested) or ``{(seed, d): Dataset}`` reuses sketches. Windows count
    where the exact sigma_2, sigma_3 are nonzero and finite (as the reference does). Returns a Dataset
    ``mean/std/max(window, d, ratio)`` with ratio in r12 (sigma1/sigma2), r23 (sigma2/sigma3), edge
    (sigma_k*/sigma_k*+1 at the exact k*), and ``n_windows(window)``; ``jl_table`` renders it.
    """
    ws = window_sizes(windows)
    ds_list = sorted({int(x) for x in ds})
    where = dict(client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler, progress=progress)
    exact, store, run = _exact_spectra(source, store, run, ws, where)
    nested = _nesting(distribution, nested)
    wanted = (
        {seed: (seed, max(ds_list)) for seed in seeds}
        if nested
        else {(seed, d): (1000 * seed + d, d) for seed in seeds for d in ds_list}
    )
    sketches = _missing_sketches(dict(sketches or {}), wanted, store, run, distribution, where, sketch_kw)
    stats, n_win = _error_stats(exact, sketches, run, ws, ds_list, seeds, nested)
    return _error_dataset(stats, n_win, ws, ds_list, next(iter(sketches.values())), run, seeds, nested)


def _exact_spectra(source, store, run, ws: list[int], where: dict):
    """``(exact results, store, run)``: the exact spectra given, or computed from the store ``source``."""
    import xarray as xr

    from sed_dask.results.spectra import spectrum
    from sed_dask.store.trajectory import open_store

    if isinstance(source, xr.Dataset):
        exact = source
        store = store if store is not None else exact.attrs.get("source_store")
    else:
        store = source
        exact = None
    if run is None:
        run = str(exact["run"].values[0]) if exact is not None else open_store(store, mode="r").runs[0]
    if exact is None:
        exact = spectrum(store, runs=[run], windows=ws, **where)
    missing = [W for W in ws if W not in exact["window"].values]
    if missing:
        raise ValueError(f"the exact Dataset lacks window(s) {missing}")
    return exact, store, run


def _nesting(distribution: str | None, nested: bool | None) -> bool:
    """Whether each d uses the first d columns of one sketch; refused for operators whose columns do not nest."""
    dist = str(config.get("sketch.distribution", distribution))
    if nested is None:
        return dist in NESTED_DISTRIBUTIONS
    if nested and dist not in NESTED_DISTRIBUTIONS:
        raise ValueError(
            f"nested=True uses the first d columns of one max(d) sketch, but {dist!r} columns do not "
            f"nest; use nested=False (an independent operator per (d, seed))"
        )
    return nested


def _missing_sketches(sketches: dict, wanted: dict, store, run, distribution, where: dict, sketch_kw: dict) -> dict:
    """``sketches`` completed with a sketch for every key of ``wanted`` (``{key: (seed, d)}``) it lacks."""
    for key, (op_seed, op_d) in wanted.items():
        if key not in sketches:
            from sed_dask.engine.sketch import sketch

            sketches[key] = sketch(
                store, runs=[run], d=op_d, seed=op_seed, distribution=distribution, **where, **sketch_kw
            )
    return sketches


def _error_stats(exact, sketches: dict, run, ws, ds_list, seeds, nested: bool):
    """``(stats (mean/std/max, window, d, ratio), windows compared per W)`` of the relative errors."""
    stats = np.full((3, len(ws), len(ds_list), len(RATIOS)), np.nan)
    n_win = np.zeros(len(ws), np.int64)
    for wi, W in enumerate(ws):
        ex = exact.sel(run=run, window=W)
        sig = np.asarray(ex["sigma"].values)[:, :W]
        kst = np.asarray(ex["k_star"].values)
        keep = np.isfinite(sig[:, 2]) & (sig[:, 1] > 1e-15) & (sig[:, 2] > 1e-15)
        truth = edge_ratios(sig[keep], kst[keep])
        n_win[wi] = int(keep.sum())
        steps_keep = np.asarray(ex["step"].values)[keep]
        for di, d in enumerate(ds_list):
            errs = {r: [] for r in RATIOS}
            for seed in seeds:
                sk = sketches[seed] if nested else sketches[(seed, d)]
                est = _sketch_ratios(sk, seed, run, W, d, steps_keep, kst[keep])
                for r in RATIOS:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        e = np.abs(est[r] - truth[r]) / truth[r]
                    errs[r].append(e[np.isfinite(e)])
            for ri, r in enumerate(RATIOS):
                e = np.concatenate(errs[r]) if errs[r] else np.zeros(0)
                if e.size:
                    stats[:, wi, di, ri] = (e.mean(), e.std(), e.max())
    return stats, n_win


def _sketch_ratios(sk, seed, run, W: int, d: int, steps, k_star) -> dict:
    """The edge ratios of one sketch's first ``d`` columns at ``steps``, at the exact ``k_star``."""
    if int(sk.sizes["dim"]) < d:
        raise ValueError(f"sketch of seed {seed} has {sk.sizes['dim']} columns, fewer than d={d}")
    approx = spectra_from_sketch(sk, windows=[W], runs=[run], d=d).sel(run=run, window=W)
    asig = np.asarray(approx["sigma"].sel(step=steps).values)[:, :W]
    return edge_ratios(asig, k_star)


def _error_dataset(stats, n_win, ws, ds_list, first, run, seeds, nested: bool):
    """The report Dataset (see :func:`jl_error_report`); ``first``: any sketch, for the operator's attrs."""
    import xarray as xr

    coords = {"window": np.array(ws, np.int64), "d": np.array(ds_list, np.int64), "ratio": list(RATIOS)}
    dims = ("window", "d", "ratio")
    return xr.Dataset(
        {
            "mean": (dims, stats[0], {"long_name": "mean relative error |r_JL - r| / r"}),
            "std": (dims, stats[1], {"long_name": "std of the relative error"}),
            "max": (dims, stats[2], {"long_name": "max relative error"}),
            "n_windows": ("window", n_win, {"long_name": "windows compared per seed"}),
        },
        coords=coords,
        attrs={
            "run": run,
            "seeds": [int(s) for s in seeds],
            "distribution": sketch_attrs(first)["distribution"],
            "tile_elems": int(sketch_attrs(first)["tile_elems"]),
            "nested_d": int(bool(nested)),
            "note": (
                "each d uses the first d columns of one max(d) sketch per seed"
                if nested
                else "an independent operator per (d, seed), seed 1000*seed + d"
            ),
        },
    )


def jl_table(report) -> str:
    """Markdown table of a ``jl_error_report`` (percent), one row per (W, d)."""
    lines = [
        "| W | d | d/W | windows x seeds | r12 mean / std / max | r23 mean / std / max | edge (k*) mean / std / max |",
        "|---|---|---|---|---|---|---|",
    ]
    n_seeds = len(report.attrs.get("seeds", [])) or 1
    for W in report["window"].values:
        for d in report["d"].values:
            cells = []
            for r in RATIOS:
                m, s, x = (float(report[v].sel(window=W, d=d, ratio=r)) * 100 for v in ("mean", "std", "max"))
                cells.append(f"{m:.1f}% / {s:.1f}% / {x:.1f}%")
            n = int(report["n_windows"].sel(window=W)) * n_seeds
            lines.append(f"| {W} | {d} | {d / W:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
