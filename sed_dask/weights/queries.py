"""Queries on a weight-spectra Dataset (:func:`sed_dask.weight_spectra`) and an alignment Dataset.

All return pandas DataFrames (one row per run x layer, or long series), so the CLI prints them and
``--json`` serialises them as they are; ``ds.sed.weight_escape()`` etc. forward here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from sed_dask.errors import AnalysisError

SERIES_VARS = (
    "n_outliers",
    "alpha",
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "mp_edge",
    "mp_s2",
    "mp_ks",
    "outlier_threshold",
)


def _need(ds: xr.Dataset, *names):
    miss = [n for n in names if n not in ds.variables]
    if miss:
        raise AnalysisError(
            f"not a weight-spectra Dataset: it lacks {miss} (compute it with sed_dask.weight_spectra "
            "or `sed-dask weights compute`)"
        )


def _runs(ds, runs):
    have = [str(r) for r in ds["run"].values]
    if runs is None:
        return have
    runs = [runs] if isinstance(runs, str) else [str(r) for r in runs]
    bad = [r for r in runs if r not in have]
    if bad:
        raise AnalysisError(f"unknown run(s) {bad}; runs: {have}")
    return runs


def _layers(ds, layers):
    have = [str(x) for x in ds["layer"].values]
    if layers is None:
        return have
    layers = [layers] if isinstance(layers, str) else [str(x) for x in layers]
    bad = [x for x in layers if x not in have]
    if bad:
        raise AnalysisError(f"unknown layer(s) {bad}; layers: {have}")
    return layers


def first_sustained(mask: np.ndarray, sustain: int) -> int | None:
    """Index of the first run of ``sustain`` consecutive True values in ``mask``, or None."""
    run = 0
    for i, v in enumerate(mask):
        run = run + 1 if v else 0
        if run >= sustain:
            return i - sustain + 1
    return None


def escape_steps(ds: xr.Dataset, *, runs=None, layers=None, sustain: int = 2) -> pd.DataFrame:
    """Per (run, layer): the step an outlier first escapes the bulk.

    Escape = the first checkpoint from which ``n_outliers`` exceeds its value at the run's first
    checkpoint (``init_outliers``) for ``sustain`` consecutive checkpoints (2 by default: a single
    edge eigenvalue crossing the Tracy-Widom margin has probability ~outlier_alpha per checkpoint).
    Also: sigma_1 / edge at escape, the largest count, its fraction of the M eigenvalues and its
    step, and alpha first -> last. A fraction near 1/2 or more means the ESD is no longer "an MP bulk
    plus a few spikes" (e.g. weight decay spreading it over decades): the count then measures that
    spread, not separated spikes.
    """
    _need(ds, "n_outliers", "sigma", "mp_edge")
    if int(sustain) < 1:
        raise AnalysisError(f"sustain must be >= 1, got {sustain}")
    rows = []
    for run in _runs(ds, runs):
        d = ds.sel(run=run)
        for layer in _layers(ds, layers):
            x = d.sel(layer=layer)
            n = np.asarray(x["n_outliers"].values, float)
            st = np.asarray(x["step"].values)
            ok = np.isfinite(n)
            n, st_ok = n[ok], st[ok]
            if not n.size:
                continue
            base = n[0]
            i = first_sustained(n > base, int(sustain))
            al = np.asarray(x["alpha"].values, float)[ok] if "alpha" in x else np.full(n.size, np.nan)
            s1 = np.asarray(x["sigma"].isel(sv=0).values, float)[ok]
            edge = np.asarray(x["mp_edge"].values, float)[ok]
            jmax = int(np.argmax(n))
            M = int(min(int(x["layer_rows"]), int(x["layer_cols"])))
            rows.append(
                {
                    "run": run,
                    "layer": layer,
                    "init_outliers": int(base),
                    "escape_step": int(st_ok[i]) if i is not None else None,
                    "sigma1_over_edge_at_escape": float(s1[i] / edge[i]) if i is not None else math.nan,
                    "max_outliers": int(n[jmax]),
                    "max_outlier_fraction": float(n[jmax] / M),
                    "step_of_max": int(st_ok[jmax]),
                    "final_outliers": int(n[-1]),
                    "alpha_first": float(al[0]),
                    "alpha_last": float(al[-1]),
                }
            )
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["run", "escape_step", "layer"], na_position="last", kind="stable").reset_index(drop=True)
    return df


def series(ds: xr.Dataset, var: str = "n_outliers", *, runs=None, layers=None) -> pd.DataFrame:
    """Long table ``run, step, layer, <var>`` of one per-matrix variable over training (α, counts, norms)."""
    _need(ds, "layer")
    if var not in ds.data_vars or set(ds[var].dims) != {"run", "step", "layer"}:
        raise AnalysisError(f"unknown weight variable {var!r}; use one of {[v for v in SERIES_VARS if v in ds]}")
    da = ds[var].sel(run=_runs(ds, runs), layer=_layers(ds, layers))
    df = da.to_dataframe().reset_index()[["run", "step", "layer", var]]
    return df[np.isfinite(df[var].astype(float))].reset_index(drop=True)


def layer_table(ds: xr.Dataset, *, run: str | None = None, step: int | None = None, sustain: int = 2) -> pd.DataFrame:
    """Cross-layer table at one checkpoint (default: the run's last): shape, method, norms, stable rank,
    MP edge, outliers, alpha, plus each layer's escape step."""
    _need(ds, "n_outliers", "alpha")
    run = _runs(ds, run)[0]
    d = ds.sel(run=run)
    steps = np.asarray(d["step"].values)
    have = np.isfinite(np.asarray(d["spectral_norm"].values, float)).any(axis=1)
    if step is None:
        if not have.any():
            raise AnalysisError(f"run {run!r} has no computed checkpoint")
        step = int(steps[have][-1])
    elif int(step) not in set(steps[have].tolist()):
        raise AnalysisError(f"run {run!r} has no weight spectra at step {step}; steps: {steps[have].tolist()[:12]}")
    x = d.sel(step=int(step))
    esc = escape_steps(ds, runs=[run], sustain=sustain).set_index("layer")
    rows = []
    for layer in [str(v) for v in ds["layer"].values]:
        y = x.sel(layer=layer)
        rows.append(
            {
                "layer": layer,
                "shape": f"{int(y['layer_rows'])}x{int(y['layer_cols'])}",
                "method": str(y["layer_method"].values),
                "spectral_norm": float(y["spectral_norm"]),
                "frobenius_norm": float(y["frobenius_norm"]),
                "stable_rank": float(y["stable_rank"]),
                "mp_edge": float(y["mp_edge"]),
                "sigma1_over_edge": float(y["sigma"].isel(sv=0) / y["mp_edge"]),
                "n_outliers": float(y["n_outliers"]),
                "outlier_fraction": float(y["n_outliers"]) / min(int(y["layer_rows"]), int(y["layer_cols"])),
                "mp_ks": float(y["mp_ks"]),
                "alpha": float(y["alpha"]),
                "escape_step": esc["escape_step"].get(layer) if layer in esc.index else None,
            }
        )
    out = pd.DataFrame(rows)
    out.insert(0, "step", int(step))
    out.insert(0, "run", run)
    return out


def alignment_summary(al: xr.Dataset, *, layers=None) -> pd.DataFrame:
    """Per (layer, side): mean/max overlap over windows, its ratio to chance, and the first window step
    where the overlap exceeds 10x chance (the update subspace is then far from random in that layer)."""
    if "overlap" not in al or "chance" not in al:
        raise AnalysisError(
            "not an alignment Dataset (compute it with sed_dask.weights.update_alignment or `sed-dask weights align`)"
        )
    rows = []
    st = np.asarray(al["step"].values)
    for layer in _layers(al, layers):
        for side in [str(s) for s in al["side"].values]:
            o = np.asarray(al["overlap"].sel(layer=layer, side=side).values, float)
            c = float(al["chance"].sel(layer=layer, side=side))
            ok = np.isfinite(o)
            hit = np.flatnonzero(ok & (o > 10 * c))
            rows.append(
                {
                    "layer": layer,
                    "side": side,
                    "chance": c,
                    "mean_overlap": float(np.nanmean(o)) if ok.any() else math.nan,
                    "max_overlap": float(np.nanmax(o)) if ok.any() else math.nan,
                    "mean_over_chance": float(np.nanmean(o) / c) if ok.any() else math.nan,
                    "first_step_10x_chance": int(st[hit[0]]) if hit.size else None,
                    "mean_loading": float(np.nanmean(al["loading"].sel(layer=layer).values)),
                }
            )
    return pd.DataFrame(rows)
