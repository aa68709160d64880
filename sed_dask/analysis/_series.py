"""Shared helpers: resolve a variable, iterate its 1-D series over (run, window, group), align.

Every query works on 1-D series along ``step``. NaNs are never silently interpolated: a helper
either drops them explicitly (and the caller documents it) or keeps the step grid and excludes
NaN pairs (lag queries). Results are assembled back into xarray objects whose dims are the
series dims (run, window, group …) of the input, in the input's order and dtypes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import xarray as xr

from sed_dask.analysis.defaults import mp_adjacent_ratio  # noqa: F401  (re-exported for the query modules)
from sed_dask.errors import AnalysisError

STEP = "step"
SERIES_DIMS_ORDER = ("run", "window", "group")

# Short names used in the spec (docs/method.md §3.2) -> (variable, sv)
_RATIO_ALIAS = re.compile(r"^r(\d+)_?(\d+)$")
_ROLE_ALIASES = {"rank": "signal_rank", "drift": "drift_speed"}
EDGE = "edge"  # the fixed-k edge series: ratio at k = the series' mode of k* (see fixed_edge)

MISSING_METRIC_HINT = "attach with sed_dask.analysis.attach_metrics or ingest --metrics"


def _available(ds: xr.Dataset) -> str:
    names = sorted(str(v) for v in ds.data_vars)
    roles = sorted({str(ds[v].attrs["sed_role"]) for v in ds.data_vars if "sed_role" in ds[v].attrs})
    return f"variables {names}, sed_roles {roles}"


def mode_rank(k: xr.DataArray) -> xr.DataArray:
    """Mode of an integer rank series over ``step`` per series; ties go to the smallest k; NaN if none."""
    vals = k.transpose(*series_dims(k), STEP).values.astype(float)
    ok = np.isfinite(vals)
    kmax = int(np.nanmax(vals)) if ok.any() else 1
    ks = np.arange(1, kmax + 1)
    counts = (vals[..., None] == ks).sum(axis=-2)
    mode = ks[np.argmax(counts, axis=-1)].astype(float)
    mode[ok.sum(axis=-1) == 0] = np.nan
    dims = series_dims(k)
    return xr.DataArray(mode, dims=dims, coords={d: k[d] for d in dims})


def fixed_edge(ds: xr.Dataset, *, rank="k_star") -> xr.DataArray:
    """The edge series at a fixed k: ratio sigma_k / sigma_(k+1) with k = the mode of k* of the series.

    ``edge_ratio`` takes each window's own k*, so the series jumps between ratios when k* changes
    (on a grokking run k* went from 1 to 2 mid-collapse and moved the collapse step). Phases,
    collapse, events and warnings measure this fixed-k series instead; ``edge_k`` (a coordinate)
    says which k each series uses.
    """
    for name in ("ratio", rank):
        if name not in ds.data_vars:
            raise AnalysisError(f"the fixed-k edge needs {name!r} in the dataset ({_available(ds)})")
    k = mode_rank(ds[rank])
    ratio = ds["ratio"]
    idx = (k.fillna(1) - 1).astype(int).clip(0, ratio.sizes["sv"] - 1)
    edge = ratio.isel(sv=idx).drop_vars("sv", errors="ignore").where(k.notnull())
    edge = edge.assign_coords(edge_k=k)
    edge.attrs.update(
        long_name="edge sigma_k / sigma_(k+1) at fixed k = the mode of k* over the series", units="1", sed_role="edge"
    )
    return edge.rename(EDGE)


def resolve(ds: xr.Dataset, variable, *, sv: int | None = None) -> xr.DataArray:
    """A named DataArray for ``variable``: a DataArray, a variable name, a ``sed_role`` or an alias.

    Aliases: ``r23``/``r34``/… = ``ratio`` at sv=2/3 (docs/method.md §3.2 names); ``edge`` = the fixed-k
    edge series (:func:`fixed_edge`), unless the dataset has a variable of that name. Variables with
    an ``sv`` dim need ``sv=`` (e.g. ``ratio``, ``sigma``).
    """
    if isinstance(variable, str) and variable == EDGE and EDGE not in ds.data_vars:
        if sv is not None:
            raise AnalysisError("'edge' is the fixed-k edge series; it takes no sv (use --var ratio --sv K)")
        return fixed_edge(ds)
    if isinstance(variable, xr.DataArray):
        da = variable
        if da.name is None:
            da = da.rename("series")
    else:
        name = str(variable)
        m = _RATIO_ALIAS.match(name)
        if name in ds.data_vars:
            da = ds[name]
        elif m and int(m.group(2)) == int(m.group(1)) + 1 and "ratio" in ds.data_vars:
            if sv is not None and sv != int(m.group(1)):
                raise AnalysisError(f"{name!r} means ratio at sv={m.group(1)}, but sv={sv} was given")
            sv = int(m.group(1))
            da = ds["ratio"]
            if sv not in da["sv"].values:
                raise AnalysisError(f"{name!r}: sv={sv} is not in the dataset's sv coordinate")
            da = da.sel(sv=sv, drop=True).rename(name)
            return da
        else:
            role = _ROLE_ALIASES.get(name, name)
            hits = [v for v in ds.data_vars if ds[v].attrs.get("sed_role") == role]
            if len(hits) == 1:
                da = ds[hits[0]]
            elif len(hits) > 1:
                raise AnalysisError(
                    f"sed_role {role!r} is ambiguous: variables {sorted(map(str, hits))}; pass the variable name"
                )
            else:
                raise AnalysisError(
                    f"unknown variable {name!r}: not a variable name, sed_role or alias "
                    f"in this dataset ({_available(ds)})"
                )
    if "sv" in da.dims:
        if sv is None:
            raise AnalysisError(
                f"variable {da.name!r} has an 'sv' dimension; pass sv=k (e.g. sv=2 for sigma_2/sigma_3 of 'ratio')"
            )
        if sv not in da["sv"].values:
            raise AnalysisError(f"variable {da.name!r}: sv={sv} not in the sv coordinate")
        da = da.sel(sv=sv, drop=True)
    if STEP not in da.dims:
        raise AnalysisError(f"variable {da.name!r} has no 'step' dimension (dims {da.dims})")
    return da


def require_metric(ds: xr.Dataset, name: str) -> xr.DataArray:
    """The metric ``name`` (e.g. ``val_loss``), or an error saying how to attach it."""
    if name not in ds.data_vars:
        raise AnalysisError(f"{name} not in dataset; {MISSING_METRIC_HINT}")
    return ds[name]


def resolve_target(ds: xr.Dataset, target, *, sv=None) -> xr.DataArray:
    """Like :func:`resolve`, but a missing plain name gets the attach-metrics hint."""
    if isinstance(target, str) and target not in ds.data_vars:
        try:
            return resolve(ds, target, sv=sv)
        except AnalysisError:
            raise AnalysisError(f"{target} not in dataset; {MISSING_METRIC_HINT}") from None
    return resolve(ds, target, sv=sv)


def _as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, range)):
        return [value]
    return list(value)


def select(da: xr.DataArray, *, run=None, window=None, group=None) -> xr.DataArray:
    """Subset ``da`` by labels, keeping the dims (a scalar label becomes a length-1 list).

    Selectors for dims ``da`` lacks are ignored (a metric has no window or group).
    Unknown labels raise, naming the dim and the labels that exist.
    """
    for dim, labels in (("run", run), ("window", window), ("group", group)):
        labels = _as_list(labels)
        if labels is None or dim not in da.dims:
            continue
        have = list(da[dim].values)
        missing = [lab for lab in labels if lab not in have]
        if missing:
            shown = "W" if dim == "window" else dim
            raise AnalysisError(f"{shown}={missing} not in the dataset ({dim} values: {have})")
        da = da.sel({dim: labels})
    return da.compute()  # results are small; evaluate a lazily opened (Zarr/Dask) store once


def series_dims(da: xr.DataArray) -> list[Hashable]:
    """All dims except ``step``, in the canonical (run, window, group, others) order."""
    dims = [d for d in da.dims if d != STEP]
    return sorted(
        dims, key=lambda d: (SERIES_DIMS_ORDER.index(d) if d in SERIES_DIMS_ORDER else len(SERIES_DIMS_ORDER), str(d))
    )


def iter_series(da: xr.DataArray, dims: Sequence[Hashable] | None = None) -> Iterator[tuple[dict, xr.DataArray]]:
    """Yield ``(key, series)``: key = {dim: label} over ``dims``, series 1-D along step."""
    dims = series_dims(da) if dims is None else list(dims)
    for labels in itertools.product(*(da[d].values.tolist() for d in dims)):
        key = dict(zip(dims, labels))
        yield key, da.sel(key)


def at(da: xr.DataArray, key: Mapping) -> xr.DataArray:
    """``da`` at the labels of ``key`` for the dims it has (metrics lack window/group)."""
    return da.sel({d: v for d, v in key.items() if d in da.dims})


def describe(key: Mapping, name: str | None = None) -> str:
    """``"'edge_ratio' (run='s42', W=10, group='all')"`` for error messages."""
    parts = [f"{'W' if d == 'window' else d}={v!r}" for d, v in key.items()]
    head = f"{name!r} " if name else ""
    return f"{head}({', '.join(parts)})" if parts else (name or "series")


def window_steps(ds: xr.Dataset, key: Mapping, steps: np.ndarray, *, label: str = "center") -> np.ndarray:
    """Step labels of the windows ending at ``steps`` (newest checkpoint) of one series.

    ``"newest"``: ``steps`` unchanged. ``"center"``: the mean step of the window's W deltas, on the
    run's own delta grid (``delta_span >= 0``, or every dataset step when the coordinate is absent).
    """
    steps = np.asarray(steps)
    if label == "newest" or "window" not in key:
        return steps.astype(float)
    W = int(key["window"])
    grid = np.asarray(ds[STEP].values)
    if "delta_span" in ds.coords and "run" in key and "run" in ds["delta_span"].dims:
        grid = grid[np.asarray(ds["delta_span"].sel(run=key["run"]).values) >= 0]
    pos = np.searchsorted(grid, steps)
    out = np.full(steps.size, np.nan)
    for i, j in enumerate(pos):
        if j < grid.size and grid[j] == steps[i] and j >= W - 1:
            out[i] = grid[j - W + 1 : j + 1].mean()
    return out


def first_sustained(flags, start: int, sustain: int) -> int | None:
    """First index >= ``start`` opening ``sustain`` consecutive True ``flags`` (None if there is none)."""
    n = 0
    for i in range(start, len(flags)):
        n = n + 1 if flags[i] else 0
        if n >= sustain:
            return i - sustain + 1
    return None


def finite(series: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values where the series is finite (NaNs dropped explicitly)."""
    v = np.asarray(series.values, dtype=float)
    s = np.asarray(series[STEP].values)
    ok = np.isfinite(v)
    return s[ok], v[ok]


def aligned(x: xr.DataArray, y: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, x, y at the steps where both are finite: exact step match (docs/method.md §2.5)."""
    x, y = xr.align(x, y, join="inner")
    xv = np.asarray(x.values, dtype=float)
    yv = np.asarray(y.values, dtype=float)
    ok = np.isfinite(xv) & np.isfinite(yv)
    return np.asarray(x[STEP].values)[ok], xv[ok], yv[ok]


def paired_grid(xs: xr.DataArray, ys: xr.DataArray, *, gaps: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and y on the run's own step grid, NaN unless both are finite (exact step match).

    The grid is the run's delta steps (``delta_span`` > 0) when available, else the steps where
    x or y is finite, trimmed to x's finite span. ``gaps="keep"`` keeps NaN holes (degenerate
    windows, missing evals) so a lag is always ℓ checkpoints — the reference compresses them,
    which shifts index lags (docs/method.md §15.4); ``gaps="drop"`` reproduces the reference.
    """
    if gaps not in ("keep", "drop"):
        raise AnalysisError(f"gaps must be 'keep' or 'drop', got {gaps!r}")
    xs, ys = xr.align(xs, ys, join="outer")
    steps = np.asarray(xs[STEP].values)
    x = np.asarray(xs.values, dtype=float)
    y = np.asarray(ys.values, dtype=float)
    if "delta_span" in xs.coords and xs["delta_span"].dims == (STEP,):
        span = np.asarray(xs["delta_span"].values, dtype=float)
        grid = np.isfinite(span) & (span > 0)
    else:
        grid = np.isfinite(x) | np.isfinite(y)
    fx = np.nonzero(np.isfinite(x))[0]
    if fx.size:
        grid[: fx[0]] = False
        grid[fx[-1] + 1 :] = False
    both = np.isfinite(x) & np.isfinite(y)
    keep = grid & (both if gaps == "drop" else True)
    x = np.where(both, x, np.nan)[keep]
    y = np.where(both, y, np.nan)[keep]
    return steps[keep], x, y


def pair_series(ds, variable, target, *, sv, target_sv, run, window, group):
    """(x, y): the selected feature and target; the target may not have dims x lacks."""
    x = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    y = select(resolve_target(ds, target, sv=target_sv), run=run, window=window, group=group)
    extra = [d for d in y.dims if d not in x.dims]
    if extra:
        raise AnalysisError(
            f"target {y.name!r} has dims {extra} that variable {x.name!r} lacks; "
            "select them first (e.g. ds.sel(window=10))"
        )
    return x, y


def need(n: int, minimum: int, what: str, key: Mapping, name: str | None = None) -> None:
    """Raise when a series has fewer than ``minimum`` usable points."""
    if n < minimum:
        raise AnalysisError(f"{describe(key, name)}: {what} needs at least {minimum} finite points, got {n}")


class Collector:
    """Assemble per-series results into a Dataset with the series dims (+ optional extra dims).

    ``add(key, name=value)`` stores scalars; ``add(key, name=array, along=("lag", lags))`` stores a
    1-D result along an extra dim. Missing combinations stay NaN (or False / "").
    """

    def __init__(self, da: xr.DataArray, dims: Sequence[Hashable] | None = None):
        self.dims = series_dims(da) if dims is None else list(dims)
        self.coords = {d: da[d].values for d in self.dims}
        # the run's seed rides along on "run", so tables of every query keep it (cross-seed summaries)
        self.labels = (
            {"seed": ("run", np.asarray(da["seed"].values))}
            if "run" in self.dims and "seed" in da.coords and da["seed"].dims == ("run",)
            else {}
        )
        self._pos = {d: {v: i for i, v in enumerate(self.coords[d].tolist())} for d in self.dims}
        self.shape = tuple(len(self.coords[d]) for d in self.dims)
        self.extra: dict[str, np.ndarray] = {}
        self.data: dict[str, tuple[tuple, np.ndarray]] = {}
        self.attrs: dict[str, dict] = {}
        self._ints: dict[str, bool] = {}  # only integers stored so far -> int64 if complete

    def _index(self, key: Mapping) -> tuple:
        return tuple(self._pos[d][key[d]] for d in self.dims)

    def _alloc(self, name, value, extra_dims: tuple) -> np.ndarray:
        shape = self.shape + tuple(len(self.extra[e]) for e in extra_dims)
        v = np.asarray(value)
        if v.dtype == bool:
            return np.zeros(shape, dtype=bool)
        if v.dtype.kind in "iuf":
            return np.full(shape, np.nan)
        return np.full(shape, "", dtype=object)

    def add(self, key: Mapping, *, along: tuple[str, Sequence] | None = None, **values) -> None:
        extra_dims: tuple = ()
        if along is not None:
            dim, coord = along
            coord = np.asarray(coord)
            if dim in self.extra and not np.array_equal(self.extra[dim], coord):
                raise ValueError(f"inconsistent coordinate for extra dim {dim!r}")
            self.extra[dim] = coord
            extra_dims = (dim,)
        idx = self._index(key)
        for name, value in values.items():
            if name not in self.data:
                self.data[name] = (extra_dims, self._alloc(name, value, extra_dims))
            _, arr = self.data[name]
            arr[idx] = value
            kind = np.asarray(value).dtype.kind
            self._ints[name] = self._ints.get(name, True) and (
                kind in "iu" or (isinstance(value, (int, np.integer)) and not isinstance(value, bool))
            )

    def set_attrs(self, name: str, **attrs) -> None:
        self.attrs.setdefault(name, {}).update(attrs)

    def dataset(self, **ds_attrs) -> xr.Dataset:
        coords = dict(self.coords)
        coords.update(self.extra)
        data = {}
        for name, (extra, arr) in self.data.items():
            if self._ints.get(name) and arr.dtype.kind == "f" and not np.isnan(arr).any():
                arr = arr.astype(np.int64)
            data[name] = (tuple(self.dims) + extra, arr)
        out = xr.Dataset(data, coords={**coords, **self.labels}, attrs=ds_attrs)
        for name, attrs in self.attrs.items():
            if name in out:
                out[name].attrs.update(attrs)
        return out
