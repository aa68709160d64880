"""Window spectra for every W from one banded-Gram pass, as an xarray Dataset (docs/result_schema.md).

``spectrum()`` is the entry point: validate the request against the store, run one pass per run
(all runs in one graph), compute every window's features on the client, align metrics by exact
step, and optionally write Zarr that plain ``xr.open_zarr`` reads back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from sed_dask import config
from sed_dask.engine.gram import GramResult, gram_graph, run_plans
from sed_dask.engine.noise import mp_adjacent_ratio
from sed_dask.engine.windows import normalise_spacing, window_features
from sed_dask.errors import StoreError
from sed_dask.schema import COORD_ATTRS, PER_SV, VARIABLES, metric_variables, provenance_attrs, var_attrs
from sed_dask.sources.run_source import run_seed, seed_from_name
from sed_dask.store.outputs import check_target, write_dataset
from sed_dask.store.trajectory import open_store


class SpacingWarning(UserWarning):
    """Checkpoint spacing is uneven, so deltas of different windows span different step counts."""


def window_sizes(windows) -> list[int]:
    """The requested window lengths W as sorted, distinct ints >= 2 (one W or a sequence)."""
    ws = [windows] if isinstance(windows, (int, np.integer)) else list(windows)
    if not ws:
        raise ValueError("windows is empty; give at least one W, e.g. windows=(10,)")
    out = []
    for w in ws:
        if int(w) != w or int(w) < 2:
            raise ValueError(f"window W={w!r}: W must be an integer >= 2")
        out.append(int(w))
    return sorted(set(out))


def _check_spacing(run: str, spans: np.ndarray, normalize: bool) -> None:
    if spans.size and spans.min() != spans.max():
        what = (
            "deltas are divided by their step spans (normalize_spacing=True)"
            if normalize
            else "deltas are NOT normalised (docs/method.md §2.3 default); pass normalize_spacing=True to divide "
            "each delta by its step span"
        )
        uniq = np.unique(spans)
        warnings.warn(
            f"run {run!r}: uneven checkpoint spacing (delta spans {uniq[:6].tolist()}"
            f"{'...' if uniq.size > 6 else ''}); {what}",
            SpacingWarning,
            stacklevel=3,
        )


def features_for(
    gram: GramResult, windows: Sequence[int], *, normalize_spacing: bool = False, zero_rtol: float | None = None
) -> dict:
    """``{(W, group): features}`` of one run's band (see ``sed_dask.engine.windows.window_features``)."""
    out = {}
    for gi, g in enumerate(gram.groups):
        band = gram.band[gi]
        if normalize_spacing:
            band = normalise_spacing(band, gram.spans)
        for W in windows:
            out[(W, g)] = window_features(band, W, n_params=gram.n_params[g], zero_rtol=zero_rtol)
    return out


def seed_coordinate(runs: Sequence[str], seeds: Sequence[int | None] | None = None) -> np.ndarray:
    """int64 seeds of ``runs`` (-1 where none is known), from ``seeds`` or else the run names."""
    seeds = [seed_from_name(r) for r in runs] if seeds is None else list(seeds)
    if len(seeds) != len(runs):
        raise ValueError(f"{len(seeds)} seeds for {len(runs)} runs")
    return np.array([-1 if s is None else int(s) for s in seeds], np.int64)


def build_dataset(
    grams: list[GramResult],
    windows: Sequence[int],
    *,
    grouped: bool,
    metrics: dict,
    attrs: dict,
    normalize_spacing: bool = False,
    zero_rtol: float | None = None,
    seeds: Sequence[int | None] | None = None,
):
    """Assemble the schema Dataset from computed Grams (one per run) and ``{run: metrics dict}``.

    ``seeds``: each run's training seed (None: not known), the ``seed`` coordinate on ``run``; by
    default the seed each run name spells (``seed3``)."""
    import xarray as xr

    windows = list(windows)
    runs = [g.run for g in grams]
    steps = np.unique(np.concatenate([g.delta_steps for g in grams])).astype(np.int64)
    groups = []
    for g in grams:
        groups += [x for x in g.groups if x not in groups]
    if not grouped:
        groups = groups[:1]
    wmax = max(windows)
    shape = (len(runs), len(windows), len(groups), steps.size)
    data = {name: np.full(shape + ((wmax,) if name in PER_SV else ()), np.nan) for name in VARIABLES}
    dnorm = np.full((len(runs), len(groups), steps.size), np.nan)
    span = np.full((len(runs), steps.size), -1, np.int64)
    pcount = np.zeros((len(runs), len(groups)), np.int64)
    for r, gram in enumerate(grams):
        pos = np.searchsorted(steps, gram.delta_steps)
        span[r, pos] = gram.spans
        feats = features_for(gram, windows, normalize_spacing=normalize_spacing, zero_rtol=zero_rtol)
        for gi, gname in enumerate(groups):
            if gname not in gram.groups:
                continue
            pcount[r, gi] = gram.n_params[gname]
            d0 = gram[gname][:, 0] / (gram.spans.astype(np.float64) ** 2 if normalize_spacing else 1.0)
            dnorm[r, gi, pos] = np.sqrt(np.maximum(d0, 0.0))
            for wi, W in enumerate(windows):
                f = feats[(W, gname)]
                wpos = pos[W - 1 :]
                for name, arr in f.items():
                    if name in PER_SV:
                        data[name][r, wi, gi, wpos, : arr.shape[1]] = arr
                    else:
                        data[name][r, wi, gi, wpos] = arr
    dims = ("run", "window", "group", "step")
    vars_ = {}
    for name, arr in data.items():
        d = dims + (("sv",) if name in PER_SV else ())
        if not grouped:
            arr, d = arr[:, :, 0], tuple(x for x in d if x != "group")
        vars_[name] = (d, arr, var_attrs(name, normalised=normalize_spacing))
    vars_["delta_norm"] = (
        (("run", "group", "step") if grouped else ("run", "step")),
        dnorm if grouped else dnorm[:, 0],
        var_attrs("delta_norm", normalised=normalize_spacing),
    )
    vars_.update(metric_variables(metrics, runs, steps, set(vars_) | set(COORD_ATTRS) | {"sketch", "dim"}))
    coords = {
        "run": ("run", np.array(runs, dtype=object), COORD_ATTRS["run"]),
        "seed": ("run", seed_coordinate(runs, seeds), COORD_ATTRS["seed"]),
        "window": ("window", np.array(windows, np.int64), COORD_ATTRS["window"]),
        "step": ("step", steps, COORD_ATTRS["step"]),
        "sv": ("sv", np.arange(1, wmax + 1, dtype=np.int64), COORD_ATTRS["sv"]),
        "delta_span": (("run", "step"), span, COORD_ATTRS["delta_span"]),
        "mp_adjacent_ratio": ("window", mp_adjacent_ratio(windows), COORD_ATTRS["mp_adjacent_ratio"]),
    }
    if grouped:
        coords["group"] = ("group", np.array(groups, dtype=object), COORD_ATTRS["group"])
        coords["param_count"] = (("run", "group"), pcount, COORD_ATTRS["param_count"])
    return xr.Dataset(vars_, coords=coords, attrs=attrs)


_SKETCH_KEYS = ("d", "seed", "distribution", "s", "tile_elems")


def _sketch_request(sketch) -> dict | None:
    """``sketch=`` of ``spectrum``: None/False, True (config defaults), an int d, or a dict of
    ``sed_dask.sketch`` operator arguments."""
    if sketch is None or sketch is False:
        return None
    if sketch is True:
        return {}
    if isinstance(sketch, (int, np.integer)):
        return {"d": int(sketch)}
    if isinstance(sketch, Mapping):
        unknown = sorted(set(sketch) - set(_SKETCH_KEYS))
        if unknown:
            raise ValueError(f"sketch=: unknown key(s) {unknown}; allowed: {list(_SKETCH_KEYS)}")
        return dict(sketch)
    raise TypeError(f"sketch= takes True, an int d or a dict of {list(_SKETCH_KEYS)}, got {type(sketch).__name__}")


def _as_list(runs) -> list[str] | None:
    if runs is None:
        return None
    return [runs] if isinstance(runs, str) else list(runs)


def _open_runs(store, runs) -> tuple[list, str]:
    """``(runs to read, description of the source)`` for ``spectrum``'s ``store`` and ``runs``.

    ``store``: a trajectory store (path, URL, group), or checkpoint runs from
    :func:`sed_dask.open_checkpoints` (one or a list), which the pass reads directly.
    """
    from sed_dask.sources.checkpoint_run import CheckpointRun

    items = [store] if isinstance(store, CheckpointRun) else store if isinstance(store, (list, tuple)) else None
    if items is None:
        ts = open_store(store, mode="r")
        available = ts.runs
        if not available:
            raise StoreError(f"store {ts.url} holds no runs")
        return [ts.run(n) for n in (_as_list(runs) or available)], ts.url
    if not items or not all(isinstance(x, CheckpointRun) for x in items):
        raise TypeError(
            "spectrum(store): a list must hold checkpoint runs from sed_dask.open_checkpoints(); "
            f"got {[type(x).__name__ for x in items]}"
        )
    names = [x.name for x in items]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint runs need distinct names, got {names}")
    if runs is not None and _as_list(runs) != names:
        raise ValueError(
            f"runs={_as_list(runs)} does not match the checkpoint runs' names {names}; "
            "name runs with open_checkpoints(..., run=NAME) and leave runs=None"
        )
    return list(items), "; ".join(x.description for x in items)


def spectrum(
    store,
    *,
    runs=None,
    windows=(10,),
    groups=None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    scheduler: str | None = None,
    precision: str | None = None,
    normalize_spacing: bool = False,
    output=None,
    progress: bool = True,
    tile_bytes=None,
    block_steps: int | None = None,
    zero_rtol: float | None = None,
    sketch=None,
    overwrite: bool = False,
):
    """Rolling-window spectra of every requested W (and layer group) for runs of a trajectory store.

    ``store``: a trajectory store, or one or a list of :func:`sed_dask.open_checkpoints` runs,
    read straight from their checkpoint files (no ingestion; ``runs`` must then be None or their
    names; ``source_store`` in the attrs describes the checkpoint directories). Same results.

    One pass per run over the store computes the banded Gram of width max(W)+1; everything else is
    client-side W x W work. ``groups``: None, "default", "blocks", ``{name: regex}`` or a list of
    group names. ``scheduler`` ("threads"/"sync") runs without a distributed cluster. ``output``
    writes the Dataset to Zarr through :mod:`sed_dask.store.outputs`: the path is checked before the
    pass (a trajectory store, a non-Zarr folder, a foreign Zarr group, or an existing results store
    without ``overwrite=True`` is refused), written beside it and moved into place complete.
    Returns an ``xarray.Dataset`` (docs/result_schema.md).

    ``sketch``: also compute the JL sketch in the same read (True, an int d, or a dict of
    ``sed_dask.sketch`` operator arguments: d, seed, distribution, s, tile_elems); it is added as
    ``sketch(run, step, dim)`` with its operator provenance in the variable's attrs, bit-identical
    to ``sed_dask.sketch(...)``'s, and ``spectra_from_sketch(ds)`` accepts the Dataset.
    """

    if output is not None:
        check_target(output, overwrite=overwrite)
    run_stores, source = _open_runs(store, runs)
    names = [rs.name for rs in run_stores]
    ws = window_sizes(windows)
    precision = config.get("spectrum.precision", precision)
    sketch_req = _sketch_request(sketch)
    plans = []
    for rs in run_stores:
        extras = ()
        if sketch_req is not None:
            from sed_dask.engine.sketch import SketchExtra, make_operator

            extras = (SketchExtra(make_operator(rs.n_params, **sketch_req)),)
        plan = gram_graph(
            rs,
            width=max(ws) + 1,
            groups=groups,
            precision=precision,
            tile_bytes=tile_bytes,
            block_steps=block_steps,
            extras=extras,
        )
        n_deltas = plan.steps.size - 1
        too_long = [W for W in ws if W > n_deltas]
        if too_long:
            raise StoreError(
                f"run {rs.name!r} has only {n_deltas} deltas ({n_deltas + 1} checkpoints); "
                f"window(s) W={too_long} need at least W deltas (drop those W or the run via runs=)"
            )
        _check_spacing(rs.name, np.diff(plan.steps), normalize_spacing)
        plans.append(plan)
    grams = run_plans(
        plans, client=client, scheduler=scheduler, address=address, scheduler_file=scheduler_file, progress=progress
    )
    metrics = {rs.name: rs.metrics() for rs in run_stores}
    group_desc = {}
    for g in grams:
        for k, v in g.group_desc.items():
            group_desc.setdefault(k, v)
    attrs = provenance_attrs(
        {
            "windows": ws,
            "source_store": source,
            "runs": list(names),
            "n_params": json.dumps({rs.name: rs.n_params for rs in run_stores}),
            "param_index_hash": json.dumps({rs.name: rs.index.hash for rs in run_stores}),
            "selection_policy": json.dumps({rs.name: rs.policy for rs in run_stores}),
            "precision": precision,
            "step_normalised": int(bool(normalize_spacing)),
            "band_width": max(ws) + 1,
            "zero_rtol": float(config.get("spectrum.zero-rtol", zero_rtol)),
            "tiling": json.dumps({g.run: g.tiling for g in grams}),
        }
    )
    if groups is not None:
        attrs["groups"] = json.dumps(group_desc)
    ds = build_dataset(
        grams,
        ws,
        grouped=groups is not None,
        metrics=metrics,
        attrs=attrs,
        normalize_spacing=normalize_spacing,
        zero_rtol=zero_rtol,
        seeds=[run_seed(rs) for rs in run_stores],
    )
    if sketch_req is not None:
        from sed_dask.engine.sketch import build_sketch_dataset, provenance

        prov = provenance({p.run: x.op for p in plans for x in p.extras})
        sk = build_sketch_dataset([(g.run, g.steps, g.extras["sketch"]) for g in grams], {}, {}, prov)
        ds = ds.assign_coords(dim=sk["dim"]).assign(sketch=sk["sketch"])
    if output is not None:
        write_dataset(ds, output, kind="spectra", overwrite=overwrite)
    return ds
