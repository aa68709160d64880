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
(``benchmarks/live.py``). With a sketch, add one read of the new checkpoints (and one halo row), their
``Phi`` products, and a ``(2 width - 1 + new)``-row band of ``S S^T`` for the new windows.

The store is an ordinary results store (``sed_dask.open_results`` / ``xr.open_zarr`` read it, and
``sed-dask query`` works on it) plus ``live_band`` (run, live_group, step, lag): the band rows the next
windows need. Appends are kill-safe: every array with a ``step`` dimension is grown and written,
then the committed length is recorded in the root attrs and the metadata consolidated; readers (and
a resumed engine, which truncates longer arrays back) see only committed steps.

**Live JL sketch** (``sketch_d=``): each update also sketches only the new deltas,
``S_i = Phi^T delta_i``, by the batch sketch's own graph restricted to them
(``sketch_graph(rows=...)``), and appends them, with the new windows' sketch spectra, to a second
live store beside the results (``R-sketch.zarr``). A sketch row depends on nothing but its delta:
the dense kernel is one fixed-shape ``ROW_BLOCK``-row gemm per RNG tile with the row at its
absolute position (zero padding elsewhere), the osnap/sparse kernel a CSR sum in the tile's fixed
nonzero order with +-1 entries (exact products), and tiles combine on a canonical tree over RNG
tiles; so the store equals ``sed_dask.sketch`` over the same checkpoints, and its spectra
``spectra_from_sketch`` of that sketch, bit for bit. It is a separate read of the new rows rather
than an extra of the Gram pass because a ``SketchExtra`` aligns the Gram's P-ranges to RNG tiles,
which would change the band's summation order and so its bits against a plain ``spectrum``.
The sketch store is committed before the results store, so after a SIGKILL it holds at least the
committed steps; a resumed engine truncates it back to them.
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
from sed_dask.engine.sketch import ROW_BLOCK, build_sketch_dataset, make_operator, provenance, sketch_graph
from sed_dask.errors import StoreError
from sed_dask.results.sketch_spectra import sketch_band
from sed_dask.results.spectra import build_dataset, window_sizes
from sed_dask.schema import provenance_attrs, utc_now
from sed_dask.sources.run_source import run_seed
from sed_dask.store.outputs import COMPLETE_ATTR, describe, quiet_consolidation, write_dataset
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
    sketch: object = None  # the new steps of the live sketch store (sketch rows and sketch spectra)


def _settings_key(s: dict) -> dict:
    keys = ("run", "windows", "groups", "normalize_spacing", "precision", "zero_rtol")
    return {**{k: s[k] for k in keys}, "sketch": s.get("sketch")}


def sketch_path(results) -> str:
    """The live sketch store beside ``results``: ``live.zarr`` -> ``live-sketch.zarr``."""
    return f"{os.path.splitext(os.path.normpath(os.fspath(results)))[0]}-sketch.zarr"


def sketch_settings(d, *, seed=None, distribution=None) -> dict | None:
    """The operator a live sketch uses, resolved from ``sed_dask.sketch`` config and validated now
    (not at the first checkpoint); None when ``d`` is None (no sketch)."""
    if d is None:
        if seed is not None or distribution is not None:
            raise ValueError("sketch_seed / sketch_distribution need sketch_d (the sketch dimension)")
        return None
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"sketch_d must be an integer >= 1 (the sketch dimension), got {d!r}")
    op = make_operator(1, d=int(d), seed=seed, distribution=distribution)  # raises on a bad seed/distribution
    return {
        "d": int(op.d),
        "seed": int(op.seed),
        "distribution": op.distribution,
        "tile_elems": int(op.tile_elems),
        "osnap_s": int(op.s) if op.distribution == "osnap" else None,
    }


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
        sketch_d: int | None = None,
        sketch_seed: int | None = None,
        sketch_distribution: str | None = None,
        sketch_store=None,
    ):
        self.sketch = sketch_settings(sketch_d, seed=sketch_seed, distribution=sketch_distribution)
        if self.sketch is None and sketch_store is not None:
            raise ValueError("sketch_store needs sketch_d (the sketch dimension)")
        self.sketch_store = None if self.sketch is None else os.fspath(sketch_store or sketch_path(results))
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
        self.sketch_tail = None  # (<= 2 width - 1, d) float64: the last committed sketch rows
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
            "sketch": self.sketch,
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
        if self.sketch is not None:
            self._resume_sketch(n)
        self._replay(g, n)

    def _resume_sketch(self, n: int) -> None:
        """Bring the sketch store back to the results' ``n`` committed steps (it is committed first)."""
        import zarr

        path = self.sketch_store
        if not os.path.exists(os.path.join(path, "zarr.json")):
            raise StoreError(
                f"live results {self.results} were made with a sketch, but its store {path} is missing; "
                "give its --sketch-store or start a new --results"
            )
        with quiet_consolidation():
            g = zarr.open_group(path, mode="r+", use_consolidated=False)
        live = g.attrs.get(LIVE_ATTR) or {}
        if json.loads(json.dumps(self.sketch)) != live.get("sketch"):
            raise StoreError(
                f"live sketch {path} was made with {live.get('sketch')}; this watcher asks for {self.sketch} "
                "(use the same settings or a new --results)"
            )
        if int(live.get("n_steps", -1)) < n:
            raise StoreError(
                f"live sketch {path} has {live.get('n_steps')} committed steps, fewer than the results' {n}; "
                "the store is damaged, start a new --results"
            )
        if truncate(g, n) or int(live["n_steps"]) != n:  # killed after the sketch's commit, before the results'
            g.attrs[LIVE_ATTR] = {**live, "n_steps": n}
            with quiet_consolidation():
                zarr.consolidate_metadata(path)
        self.sketch_tail = np.asarray(g["sketch"][0, max(0, n - (2 * self.width - 1)) : n, :])

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
        """Band rows ``lo .. hi-1`` of every group, by the batch pass's graph restricted to them
        (and, with a sketch, the rows' sketch ``self._sketch_rows``, in the same submission)."""
        plan = gram_graph(
            rs, width=self.width, groups=self.groups, precision=self.precision, rows=(lo, hi), **self.pass_kw
        )
        dsk, keys = dict(plan.dsk), [plan.key]
        if self.sketch is not None:
            sk = self.sketch
            op = make_operator(
                rs.n_params,
                d=sk["d"],
                seed=sk["seed"],
                distribution=sk["distribution"],
                s=sk["osnap_s"],
                tile_elems=sk["tile_elems"],
            )
            splan = sketch_graph(rs, op, rows=(lo, hi), steps=plan.steps, **self.pass_kw)
            dsk.update(splan.dsk)
            keys.append(splan.key)
            self._op = op
        outs = execute(dsk, keys, **self.where, desc="sed_dask live rows")
        out = outs[0]
        self._sketch_rows = outs[1] if self.sketch is not None else None
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
        sk_ds = None
        if self.sketch is not None:  # committed first: after a kill it holds at least the results' steps
            sk_ds, S_all = self._sketch_slice(rs, lo, N, ck, steps)
            if self.ckpt_steps is None:
                self._create_sketch(sk_ds, rs, steps)
            else:
                append(self.sketch_store, sk_ds, self.n, N, self._sketch_live_attrs(N))
            self.sketch_tail = S_all[-(2 * self.width - 1) :]
        if self.ckpt_steps is None:
            self._create(ds, rs, steps)
        else:
            append(self.results, ds, self.n, N, self._live_attrs(N))
        self.n = N
        self.ckpt_steps = ck[-(self.width + 1) :]
        self.band_tail = band[:, -self.width :, :]
        alerts = self._feed(ds)
        return LiveUpdate(
            [int(s) for s in ds["step"].values], ds, alerts, dict(self.last_scalars), time.perf_counter() - t0, sk_ds
        )

    # ------------------------------------------------------------------ the live sketch
    def _sketch_slice(self, rs, lo: int, N: int, ck, steps):
        """The new steps of the sketch store: sketch rows ``lo .. N-1`` and their windows' sketch spectra.

        The spectra are ``spectra_from_sketch``'s: the band of ``S S^T`` (``sketch_band``, one dot
        product per entry) over the rows the new windows need, through the same ``build_dataset``
        (``seeds`` from the run names, as there), sliced to the new steps like the live results.
        """
        d = self.sketch["d"]
        S_new = np.asarray(self._sketch_rows, np.float64)
        tail = self.sketch_tail if self.ckpt_steps is not None else np.zeros((0, d))
        S_all = np.concatenate([tail, S_new], axis=0)
        nb = ck.size - 1  # band rows build_dataset gets (as for the exact band)
        # rows before the first kept band row are its k < width predecessors (or the run's start)
        band = sketch_band(S_all, self.width)[-nb:]
        gram = GramResult(
            rs.name,
            band[None],
            ["all"],
            {"all": min(int(rs.n_params), d)},
            {"all": f"JL sketch (d={d}) of the whole selected parameter vector"},
            ck,
            self.width,
            "float64",
            {"source": "sketch"},
        )
        ds = build_dataset(
            [gram],
            self.windows,
            grouped=False,
            metrics={rs.name: rs.metrics()},
            attrs={},
            normalize_spacing=self.normalize_spacing,
            zero_rtol=self.zero_rtol,
        ).isel(step=slice(-(N - lo), None))
        prov = provenance({rs.name: self._op})
        sk = build_sketch_dataset([(rs.name, steps[lo : N + 1], S_new)], {}, {}, prov)
        return ds.assign_coords(dim=sk["dim"]).assign(sketch=sk["sketch"]), S_all

    def _sketch_live_attrs(self, n: int) -> dict:
        return {
            "sketch": self.sketch,
            "n_steps": int(n),
            "first_step": int(self._first_step),
            "results": os.path.abspath(self.results),
            "store": str(self.store),
            "width": self.width,
        }

    def _create_sketch(self, ds, rs, steps) -> None:
        """Write the first steps; an orphan of this results path (killed before the results existed) is replaced."""
        from sed_dask import __version__

        self._first = int(steps[0])
        overwrite = False
        if os.path.exists(self.sketch_store):
            attrs = describe(self.sketch_store)[1] or {}
            live = attrs.get(LIVE_ATTR) or {}
            if live.get("results") != os.path.abspath(self.results):
                raise StoreError(
                    f"{self.sketch_store} exists and is not this watcher's live sketch; give a new --sketch-store"
                )
            overwrite = True
        sk = self.sketch
        attrs = {
            "sed_dask_version": __version__,
            "windows": self.windows,
            "source_store": str(self.store),
            "runs": [rs.name],
            "n_params": json.dumps({rs.name: rs.n_params}),
            "param_index_hash": json.dumps({rs.name: rs.index.hash}),
            "selection_policy": json.dumps({rs.name: rs.policy}),
            "precision": "float64",
            "step_normalised": int(self.normalize_spacing),
            "band_width": self.width,
            "zero_rtol": self.zero_rtol,
            "spectra_source": "jl_sketch",
            "sketch_seed": sk["seed"],
            "sketch_d": sk["d"],
            "sketch_distribution": sk["distribution"],
            "sketch_tile_elems": sk["tile_elems"],
            "sketch_phi_checksum": ds["sketch"].attrs["phi_checksum"],
            "sketch_row_block": ROW_BLOCK,
            "created": utc_now(),
            LIVE_ATTR: self._sketch_live_attrs(steps.size - 1),
        }
        write_dataset(
            ds.assign_attrs(attrs).chunk({"step": STEP_CHUNK}), self.sketch_store, kind="spectra", overwrite=overwrite
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
