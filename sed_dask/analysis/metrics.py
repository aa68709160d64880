"""Attach training metrics (val_loss, val_acc, lr, …) to a results Dataset, aligned to ``step``.

The reference matches val_loss by exact step and drops windows without a match (docs/method.md §2.5);
one script silently falls back to the nearest step. Here the alignment is explicit and recorded
in each variable's attrs: ``align="exact"`` (default; NaN where the step was not evaluated) or
``align="nearest"`` within a ``tolerance`` in steps. Files and objects are parsed by
``sed_dask.sources.metrics`` (shared with ``ingest --metrics``), so both sides read the same shapes.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from sed_dask.errors import AnalysisError
from sed_dask.sources.metrics import load_metrics, parse_metrics


def _parse(obj, where: str) -> pd.DataFrame:
    return pd.DataFrame(parse_metrics(obj, where=where))


def _split(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Parse a table that may hold several runs (a ``run`` column) run by run."""
    if "run" not in df.columns:
        return _parse(df.to_dict("records"), where)
    parts = []
    for r, g in df.groupby(df["run"].astype(str), sort=False):
        t = _parse(g.drop(columns="run").to_dict("records"), f"{where} run {r!r}")
        t.insert(0, "run", r)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def to_table(source, *, run=None) -> pd.DataFrame:
    """A tidy metrics table: ``step`` (int64), optional ``run``, and float64 metric columns.

    Parsing is ``sed_dask.sources.metrics`` (the ingest side's reader: records, {step: {...}},
    columns, a wrapper key, CSV; duplicate steps merged, conflicting values an error); a ``run``
    column / field splits the table by run first.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"metrics file not found: {path}")
        if path.lower().endswith((".csv", ".tsv")):
            head = pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",", nrows=0)
            df = (
                _split(pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ","), path)
                if "run" in head.columns
                else pd.DataFrame(load_metrics(path))
            )
        else:
            with open(path) as f:
                obj = json.load(f)
            df = _from_obj(obj, path)
    elif isinstance(source, pd.DataFrame):
        df = _split(source.reset_index() if source.index.name else source, "DataFrame")
    elif isinstance(source, (list, Mapping)):
        df = _from_obj(source, "metrics")
    else:
        raise AnalysisError(f"cannot read metrics from {type(source).__name__}")
    if run is not None:
        df["run"] = str(run)
    return df


def _from_obj(obj, where: str) -> pd.DataFrame:
    if isinstance(obj, list) and obj and all(isinstance(r, Mapping) and "run" in r for r in obj):
        return _split(pd.DataFrame.from_records(obj), where)
    return _parse(obj, where)


def _per_run(ds: xr.Dataset, metrics, run) -> dict[str, pd.DataFrame]:
    runs = [str(r) for r in ds["run"].values] if "run" in ds.dims else [None]
    if isinstance(metrics, Mapping) and metrics and all(str(k) in runs for k in metrics):
        return {str(k): to_table(v) for k, v in metrics.items()}
    df = to_table(metrics, run=run)
    if "run" in df.columns:
        return {str(r): g.drop(columns="run") for r, g in df.groupby(df["run"].astype(str))}
    if len(runs) == 1:
        return {runs[0]: df}
    raise AnalysisError(f"metrics have no run column and the dataset has runs {runs}; pass run=")


def attach_metrics(
    ds: xr.Dataset, metrics, *, run=None, names=None, align: str = "exact", tolerance=None, overwrite: bool = False
) -> xr.Dataset:
    """Return ``ds`` with metric variables ``name(run, step)`` added.

    ``metrics``: a path (.json/.csv), a DataFrame (``step`` [+ ``run``] + metric columns),
    records, a columns dict, ``{step: {metric: value}}``, or ``{run: any of those}``
    (see :func:`to_table`). ``names`` limits the metrics. Existing variables keep their values;
    only their NaNs are filled, unless ``overwrite=True``. Runs absent from ``ds`` raise.
    """
    if align not in ("exact", "nearest"):
        raise AnalysisError(f"align must be 'exact' or 'nearest', got {align!r}")
    if align == "nearest" and tolerance is None:
        raise AnalysisError("align='nearest' needs a tolerance (in steps)")
    tables = _per_run(ds, metrics, run)
    has_run = "run" in ds.dims
    runs = [str(r) for r in ds["run"].values] if has_run else [None]
    unknown = [r for r in tables if r not in runs]
    if unknown:
        raise AnalysisError(f"metrics for run(s) {unknown} not in the dataset (runs: {runs})")
    steps = ds["step"].values
    new: dict[str, np.ndarray] = {}
    for r, df in tables.items():
        num = df.drop(columns=[c for c in ("run",) if c in df.columns])
        num = num.apply(pd.to_numeric, errors="coerce") if len(num) else num
        cols = [c for c in num.columns if c != "step" and num[c].notna().any()]
        if names is not None:
            want = [names] if isinstance(names, str) else list(names)
            missing = [n for n in want if n not in cols]
            if missing:
                raise AnalysisError(f"metric(s) {missing} not found for run {r!r} (have {cols})")
            cols = want
        per_step = num.set_index("step")[cols].sort_index()
        if align == "exact":
            aligned = per_step.reindex(steps)
        else:
            aligned = per_step.reindex(steps, method="nearest", tolerance=tolerance)
        i = runs.index(r)
        for c in cols:
            arr = new.setdefault(c, np.full((len(runs), steps.size), np.nan))
            arr[i] = aligned[c].to_numpy(dtype=float)
    out = ds.copy()
    dims = ("run", "step") if has_run else ("step",)
    for name, arr in new.items():
        da = xr.DataArray(arr if has_run else arr[0], dims=dims, coords={d: ds[d] for d in dims})
        attrs = {
            "long_name": name,
            "units": "as given",
            "sed_role": "metric",
            "align": align,
            "tolerance": "none" if tolerance is None else float(tolerance),
            "source": os.fspath(metrics) if isinstance(metrics, (str, os.PathLike)) else "in-memory",
        }
        if name in out.data_vars and not overwrite:
            if out[name].notnull().all():
                warnings.warn(
                    f"metric {name!r} already present; not overwritten (overwrite=True to replace)", stacklevel=2
                )
            attrs = {**attrs, **out[name].attrs}
            da = out[name].combine_first(da)
        out[name] = da
        out[name].attrs = attrs
    return out
