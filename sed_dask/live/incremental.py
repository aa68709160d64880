"""Incremental spectra: each new checkpoint adds one band row and its windows to a live results store.

When checkpoint N+1 arrives only the new band row ``<delta_N, delta_(N-k)>`` (k < width) is
computed, by the batch pass's own graph restricted to that row (``gram_graph(rows=...)``: the same
P-ranges, column sub-blocks, fixed-shape kernel and reduction tree), and only the windows ending at
the new delta are evaluated, by the batch Dataset builder run on the last ``width`` band rows. The
kernel's bits do not depend on which rows share a task (``sed_dask.engine.gram.BandAccumulator``) and
the tiling does not depend on the run's length, so after any sequence of updates the store equals
``sed_dask.spectrum`` over the same checkpoints bit for bit (``tests/test_live.py``).

Cost per update: one read of the last ``width + 1`` checkpoints (the new one and its ``width`` halo
rows; the first version the issue allows; the floor is one read of the new checkpoint), a
``(3 width - 1)``-row product per column sub-block, ``len(windows)`` small eigendecompositions per
group, and an append of one step to each stored array. None of it grows with N
(``benchmarks/live.py``).

The store is an ordinary results store (``sed_dask.open_results`` / ``xr.open_zarr`` read it, and
``sed-dask query`` works on it) plus ``live_band`` (run, live_group, step, lag): the band rows the next
windows need. Appends are kill-safe: every array with a ``step`` dimension is grown and written,
then the committed length is recorded in the root attrs and the metadata consolidated; readers (and
a resumed engine, which truncates longer arrays back) see only committed steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from sed_dask import config
from sed_dask.analysis.detectors import DETECTORS, EdgeWatch
from sed_dask.engine.gram import GramResult, gram_graph
from sed_dask.engine.passes import execute
from sed_dask.errors import StoreError
from sed_dask.results.spectra import build_dataset, window_sizes
from sed_dask.schema import provenance_attrs
from sed_dask.sources.run_source import run_seed
from sed_dask.store.outputs import COMPLETE_ATTR, quiet_consolidation, write_dataset
from sed_dask.store.trajectory import open_store

LIVE_ATTR = "sed_dask_live"  # root attr: the committed length and the settings the store was made with
BAND_VAR = "live_band"
STEP_CHUNK = 64  # Zarr chunk along step: an append rewrites at most one chunk per array


@dataclasses.dataclass
class LiveUpdate:
    """What one update added: the new delta steps, their Dataset slice, alerts and the live scalars."""

    steps: list[int]
    ds: object
    alerts: list[dict]
    scalars: dict
    seconds: float


def _settings_key(s: dict) -> dict:
    return {k: s[k] for k in ("run", "windows", "groups", "normalize_spacing", "precision", "zero_rtol")}


class LiveSpectrum:
    """Spectra of one run of a trajectory store, kept up to date in the results store ``results``.

    ``update()`` processes every complete checkpoint the run has beyond the committed ones (one or a
    burst) and returns a :class:`LiveUpdate` (None when there is nothing new, or fewer than
    ``max(windows)`` deltas yet). Re-creating it on an existing live store resumes (the settings must
    match). ``detectors``/``detector_params``: the causal detectors (``sed_dask.analysis.detectors``,
    the set ``sed-dask query warning`` runs) evaluated on every new window.
    """

    def __init__(
        self,
        store,
        results,
        *,
        run: str | None = None,
        windows=(10,),
        groups=None,
        normalize_spacing: bool = False,
        zero_rtol: float | None = None,
        precision: str | None = None,
        tile_bytes=None,
        split_every: int | None = None,
        detectors=DETECTORS,
        tau=None,
        detector_params: dict | None = None,
        client=None,
        scheduler: str | None = None,
        address: str | None = None,
        scheduler_file: str | None = None,
    ):
        self.store, self.results = store, os.fspath(results)
        self.windows = window_sizes(windows)
        self.width = max(self.windows) + 1
        self.groups = groups
        self.normalize_spacing = bool(normalize_spacing)
        self.zero_rtol = float(config.get("spectrum.zero-rtol", zero_rtol))
        self.precision = config.get("spectrum.precision", precision)
        self.pass_kw = {"tile_bytes": tile_bytes, "split_every": split_every}
        self.where = {"client": client, "scheduler": scheduler, "address": address, "scheduler_file": scheduler_file}
        self.detectors, self.tau, self.detector_params = tuple(detectors), tau, dict(detector_params or {})
        self.run = run
        self.n = 0  # committed deltas
        self.ckpt_steps = None  # the last <= width + 1 checkpoint steps (None before the store exists)
        self.band_tail = None  # (groups, <= width, width) float64: the last committed band rows
        self.watches: dict = {}
        self.last_scalars: dict = {}
        if os.path.exists(os.path.join(self.results, "zarr.json")):
            self._resume()

    # ------------------------------------------------------------------ settings and state
    def _settings(self) -> dict:
        return {
            "run": self.run,
            "windows": self.windows,
            "groups": self.groups,
            "normalize_spacing": self.normalize_spacing,
            "precision": self.precision,
            "zero_rtol": self.zero_rtol,
        }

    def _open_run(self):
        ts = open_store(self.store, mode="r")
        if self.run is None:
            if len(ts.runs) != 1:
                raise StoreError(f"store {ts.url} holds runs {ts.runs}; name the one to watch (run=...)")
            self.run = ts.runs[0]
        if self.run not in ts.runs:
            raise StoreError(f"store {ts.url} has no run {self.run!r} yet (runs: {ts.runs})")
        return ts.run(self.run)

    def _resume(self) -> None:
        import zarr

        with quiet_consolidation():
            g = zarr.open_group(self.results, mode="r+", use_consolidated=False)
        live = g.attrs.get(LIVE_ATTR)
        if live is None:
            raise StoreError(
                f"{self.results} exists but is not a live results store (no {LIVE_ATTR} attr); "
                "give a new --results path"
            )
        if self.run is None:
            self.run = live["run"]
        want, have = _settings_key(self._settings()), _settings_key(live)
        if json.loads(json.dumps(want)) != have:
            raise StoreError(
                f"live results {self.results} were made with {have}; this watcher asks for {want} "
                "(use the same settings or a new --results path)"
            )
        n = int(live["n_steps"])
        truncate(g, n)  # a kill between growing the arrays and the commit left them longer
        steps = np.asarray(g["step"][:n], np.int64)
        self.n = n
        self.ckpt_steps = np.concatenate([[int(live["first_step"])], steps])[-(self.width + 1) :]
        self.band_tail = np.asarray(g[BAND_VAR][0, :, max(0, n - self.width) : n, :])
        self._replay(g, n)

    # ------------------------------------------------------------------ detectors
    def _new_watch(self, W: int) -> EdgeWatch:
        kw = dict(self.detector_params)
        if self.tau is not None:
            kw["tau"] = self.tau
        return EdgeWatch(window=W, detectors=self.detectors, **kw)

    def _series(self, ds):
        """``(W, group, steps, ratios (n, W-1), k*)`` of every series in ``ds`` (as query warning reads them)."""
        gnames = [str(x) for x in ds["group"].values] if "group" in ds.dims else [None]
        for wi, W in enumerate(self.windows):
            for gi, gname in enumerate(gnames):
                sel = {"run": 0, "window": wi, **({"group": gi} if gname is not None else {})}
                r = ds["ratio"].isel(sel).transpose("step", "sv").values[:, : W - 1].astype(float)
                k = np.asarray(ds["k_star"].isel(sel).values, float)
                yield W, gname or "all", np.asarray(ds["step"].values), r, k

    def _feed(self, ds) -> list[dict]:
        alerts = []
        for W, gname, steps, r, k in self._series(ds):
            watch = self.watches.setdefault((W, gname), self._new_watch(W))
            for st, rr, kk in zip(steps.tolist(), r, k):
                if not (np.isfinite(rr[0]) and np.isfinite(kk)):
                    continue
                for a in watch.update(st, rr, kk):
                    alerts.append({"run": self.run, "window": W, "group": gname, **a.as_dict()})
            if steps.size:
                i = -1
                self.last_scalars[(W, gname)] = {
                    "step": int(steps[i]),
                    "edge_ratio": _edge(ds, W, gname, self.windows),
                    "k_star": float(k[i]),
                    "sigma1_sigma2": float(r[i, 0]),
                    "edge_k": watch.k,
                }
        return alerts

    def _replay(self, g, n: int) -> None:
        """Rebuild the detectors' state from the committed windows (silently; the caller reconciles alerts)."""
        import xarray as xr

        with quiet_consolidation():
            ds = (
                xr.open_zarr(self.results, consolidated=False)[["ratio", "k_star", "edge_ratio"]]
                .isel(step=slice(0, n))
                .load()
            )
        self.replayed_alerts = self._feed(ds)

    # ------------------------------------------------------------------ the engine
    def _rows(self, rs, lo: int, hi: int) -> np.ndarray:
        """Band rows ``lo .. hi-1`` of every group, by the batch pass's graph restricted to them."""
        plan = gram_graph(
            rs, width=self.width, groups=self.groups, precision=self.precision, rows=(lo, hi), **self.pass_kw
        )
        out = execute(plan.dsk, [plan.key], **self.where, desc="sed_dask live rows")[0]
        band = np.stack([out["band"].get(g, np.zeros((hi - lo, self.width))) for g in range(len(plan.groups))])
        i = np.arange(lo, hi)[:, None]
        band[:, np.broadcast_to(i - np.arange(self.width)[None, :] < 0, band.shape[1:])] = np.nan
        bad = np.flatnonzero(~np.isfinite(band[0, :, 0]))
        if bad.size:
            raise StoreError(
                f"run {rs.name!r}: NaN/Inf in the checkpoint(s) of step(s) "
                f"{[int(plan.steps[lo + b + 1]) for b in bad]}; the Gram of those deltas is undefined"
            )
        self._plan = plan
        return band

    def update(self) -> LiveUpdate | None:
        """Append every new complete checkpoint's band row and windows; None if there is nothing to do."""
        t0 = time.perf_counter()
        rs = self._open_run()
        # the row labels only: the completion check (one read per row in the trajectory store's layout,
        # the one cost here that grows with N) is done once, by the pass planner in _rows
        steps = rs.row_steps()
        steps = steps[steps >= 0]
        N = steps.size - 1
        if self.ckpt_steps is not None:
            k = min(self.ckpt_steps.size, self.n + 1)
            if N < self.n or not np.array_equal(steps[self.n + 1 - k : self.n + 1], self.ckpt_steps[-k:]):
                raise StoreError(
                    f"run {rs.name!r} of {self.store} no longer holds the steps these live results were "
                    f"computed from (last {self.ckpt_steps[-k:].tolist()}); start a new --results"
                )
        if N <= self.n or N < max(self.windows):
            return None
        lo = self.n if self.ckpt_steps is not None else 0
        new = self._rows(rs, lo, N)  # StoreError / RunLockedError while another ingest is writing rows
        if not np.array_equal(self._plan.steps, steps):
            raise StoreError(f"run {rs.name!r}: its rows changed while being read; retry")
        if self.ckpt_steps is None:
            band, ck = new, steps
        else:
            band, ck = (
                np.concatenate([self.band_tail, new], axis=1),
                np.concatenate([self.ckpt_steps, steps[self.n + 1 :]]),
            )
        plan = self._plan
        gram = GramResult(
            rs.name,
            band,
            list(plan.groups),
            dict(plan.n_params),
            dict(plan.group_desc),
            ck,
            self.width,
            plan.precision,
            plan.tiling.as_dict(),
        )
        ds = build_dataset(
            [gram],
            self.windows,
            grouped=self.groups is not None,
            metrics={rs.name: rs.metrics()},
            attrs={},
            normalize_spacing=self.normalize_spacing,
            zero_rtol=self.zero_rtol,
            seeds=[run_seed(rs)],
        )
        ds = ds.isel(step=slice(-(N - lo), None))
        band_da = (
            ("run", "live_group", "step", "lag"),
            band[None, :, -(N - lo) :, :],
            {"long_name": "band rows <delta_i, delta_(i-k)> the next windows need (live engine state)"},
        )
        ds = ds.assign({BAND_VAR: band_da})
        if self.ckpt_steps is None:
            self._create(ds, rs, steps)
        else:
            append(self.results, ds, self.n, N, self._live_attrs(N))
        self.n = N
        self.ckpt_steps = ck[-(self.width + 1) :]
        self.band_tail = band[:, -self.width :, :]
        alerts = self._feed(ds)
        return LiveUpdate(
            [int(s) for s in ds["step"].values], ds, alerts, dict(self.last_scalars), time.perf_counter() - t0
        )

    def _live_attrs(self, n: int) -> dict:
        return {
            **self._settings(),
            "n_steps": int(n),
            "first_step": int(self._first_step),
            "store": str(self.store),
            "width": self.width,
        }

    @property
    def _first_step(self) -> int:
        import zarr

        if not hasattr(self, "_first"):
            with quiet_consolidation():
                self._first = int(
                    zarr.open_group(self.results, mode="r", use_consolidated=False).attrs[LIVE_ATTR]["first_step"]
                )
        return self._first

    def _create(self, ds, rs, steps) -> None:
        self._first = int(steps[0])
        attrs = provenance_attrs(
            {
                "windows": self.windows,
                "source_store": str(self.store),
                "runs": [rs.name],
                "n_params": json.dumps({rs.name: rs.n_params}),
                "param_index_hash": json.dumps({rs.name: rs.index.hash}),
                "selection_policy": json.dumps({rs.name: rs.policy}),
                "precision": self.precision,
                "step_normalised": int(self.normalize_spacing),
                "band_width": self.width,
                "zero_rtol": self.zero_rtol,
                LIVE_ATTR: self._live_attrs(steps.size - 1),
            }
        )
        if self.groups is not None:
            attrs["groups"] = json.dumps(self._plan.group_desc)
        write_dataset(ds.assign_attrs(attrs).chunk({"step": STEP_CHUNK}), self.results, kind="spectra")


def _edge(ds, W: int, gname: str, windows) -> float:
    sel = {"run": 0, "window": windows.index(W)}
    if "group" in ds.dims:
        sel["group"] = [str(x) for x in ds["group"].values].index(gname)
    v = ds["edge_ratio"].isel(sel).values
    return float(v[-1]) if v.size else math.nan


# ----------------------------------------------------------------------------- the store's appends
def _step_arrays(g):
    """``(name, array, axis of step)`` of every array with a ``step`` dimension."""
    for name, arr in g.arrays():
        dims = arr.metadata.dimension_names or ()
        if "step" in dims:
            yield name, arr, dims.index("step")


def truncate(g, n: int) -> int:
    """Shrink every step array of the live store ``g`` to the committed ``n`` steps; return how many grew."""
    fixed = 0
    for _, arr, ax in _step_arrays(g):
        if arr.shape[ax] != n:
            if arr.shape[ax] < n:
                raise StoreError(
                    f"live results: array {arr.name} has {arr.shape[ax]} steps, fewer than the "
                    f"{n} committed; the store is damaged, start a new --results"
                )
            arr.resize(tuple(n if i == ax else s for i, s in enumerate(arr.shape)))
            fixed += 1
    return fixed


def append(path: str, ds, n: int, n_new: int, live_attrs: dict) -> None:
    """Grow every step array of the store at ``path`` from ``n`` to ``n_new`` steps with ``ds``'s values,
    then commit."""
    import zarr

    with quiet_consolidation():
        g = zarr.open_group(path, mode="r+", use_consolidated=False)
        for name, arr, ax in _step_arrays(g):
            if name not in ds.variables:
                raise StoreError(
                    f"live results {path}: the new steps lack variable {name!r} (the run's metrics "
                    "changed names?); start a new --results"
                )
            dims = arr.metadata.dimension_names
            vals = np.asarray(ds[name].transpose(*dims).values)
            arr.resize(tuple(n_new if i == ax else s for i, s in enumerate(arr.shape)))
            idx = tuple(slice(n, n_new) if i == ax else slice(None) for i in range(arr.ndim))
            arr[idx] = vals.astype(arr.dtype, copy=False)
        g.attrs[LIVE_ATTR] = live_attrs  # the commit: readers and a resumed engine trust this length
        g.attrs[COMPLETE_ATTR] = True
        zarr.consolidate_metadata(path)


def open_live(path):
    """The committed part of a live results store (``open_results`` plus the commit's step count)."""
    from sed_dask.store.outputs import open_results

    ds = open_results(path)
    n = int(ds.attrs[LIVE_ATTR]["n_steps"]) if LIVE_ATTR in ds.attrs else ds.sizes["step"]
    return ds.isel(step=slice(0, n))
