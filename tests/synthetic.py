"""Synthetic results Datasets in the docs/result_schema.md layout, for the analysis tests.

``make_results`` computes real window spectra (a tiny in-test engine: exact W×W Grams of random
deltas with a planted signal rank) for several runs, W values and optional layer groups, with the
NaNs the real engine produces (no window for k < W, a run lacking steps of the union grid,
a missing val_loss eval). ``with_series`` overwrites a variable with a planted series where the
window exists, so time-series tests know their answers.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr


def _rule_kstar(sigma: np.ndarray, P: int) -> tuple[int, float]:
    W = sigma.size
    lam = sigma**2
    nbar = lam[W // 2 :].mean()
    floor = np.sqrt(nbar) * (1 + np.sqrt(W / P))
    rho = sigma[:-1] / sigma[1:]
    cand = sigma[:-1] >= floor  # numerator rule (docs/method.md)
    if not cand.any():
        cand = np.arange(1, W) <= W // 2
    k = int(np.argmax(np.where(cand, rho, -np.inf))) + 1
    return k, floor


def window_features(deltas: np.ndarray, W: int) -> dict[str, np.ndarray]:
    """Per right-aligned window (index k ≥ W−1): the schema's per-window variables."""
    N, P = deltas.shape
    G = deltas @ deltas.T
    out = {
        k: []
        for k in (
            "sigma",
            "ratio",
            "k_star",
            "k_star_naive",
            "edge_ratio",
            "edge_gap",
            "pc_frac",
            "k95",
            "drift_speed",
            "noise_floor",
        )
    }
    for k in range(W - 1, N):
        g = G[k - W + 1 : k + 1, k - W + 1 : k + 1]
        lam = np.clip(np.linalg.eigvalsh(g)[::-1], 0, None)
        s = np.sqrt(lam)
        rho = s[:-1] / s[1:]
        ks, floor = _rule_kstar(s, P)
        frac = lam / lam.sum()
        out["sigma"].append(s)
        out["ratio"].append(np.append(rho, np.nan))
        out["k_star"].append(ks)
        out["k_star_naive"].append(int(np.argmax(rho)) + 1)
        out["edge_ratio"].append(rho[ks - 1])
        out["edge_gap"].append(s[ks - 1] - s[ks])
        out["pc_frac"].append(frac)
        out["k95"].append(int(np.searchsorted(np.cumsum(frac), 0.95) + 1))
        out["drift_speed"].append(np.sqrt(max(0.0, g.sum())) / W)
        out["noise_floor"].append(floor)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def make_deltas(
    n: int, P: int, *, rank: int = 2, signal=(5.0, 4.0), bulk: int = 8, noise: float = 0.2, rng=None
) -> np.ndarray:
    """n deltas in R^P: ``rank`` strong fixed directions, ``bulk`` weaker ones with slowly
    decaying scales 1.0 … 0.5 (all above the noise floor, like the paper's BBP finding), plus
    isotropic noise. ``rank=0, bulk=0`` gives pure isotropic noise."""
    rng = np.random.default_rng(rng)
    scales = np.concatenate([np.asarray(signal[:rank], float), np.linspace(1.0, 0.5, bulk)])
    out = noise * rng.standard_normal((n, P)) / np.sqrt(P) if noise else np.zeros((n, P))
    if scales.size:
        U = np.linalg.qr(rng.standard_normal((P, scales.size)))[0].T
        out += (rng.standard_normal((n, scales.size)) * scales) @ U
    return out


def make_results(
    *,
    runs=("s1", "s2", "s3"),
    windows=(5, 8),
    n_deltas: int = 40,
    P: int = 300,
    groups=None,
    rank: int = 2,
    spacing: int = 200,
    seed: int = 0,
    noise_runs=(),
    lacking: dict | None = None,
) -> xr.Dataset:
    """A multi-run results Dataset with real spectra.

    ``groups``: e.g. ("all", "attn", "mlp") — "all" is the full vector, the others split the P
    coordinates into equal contiguous blocks. ``noise_runs``: runs whose deltas are pure isotropic
    noise (no signal). ``lacking``: {run: [steps]} the run does not have (checkpoints missing from
    its cadence; its delta at the next step then spans two intervals).
    """
    rng = np.random.default_rng(seed)
    lacking = {"s3": [spacing * 20]} if lacking is None else lacking
    grid = spacing * np.arange(1, n_deltas + 1, dtype=np.int64)  # union of delta steps
    Wmax = max(windows)
    sv = np.arange(1, Wmax + 1)
    gnames = list(groups) if groups else [None]
    nr, nw, ng, ns = len(runs), len(windows), len(gnames), grid.size
    shape = (nr, nw, ng, ns)
    v = {
        k: np.full(shape, np.nan)
        for k in ("k_star", "k_star_naive", "edge_ratio", "edge_gap", "k95", "drift_speed", "noise_floor")
    }
    v.update({k: np.full(shape + (Wmax,), np.nan) for k in ("sigma", "ratio", "pc_frac")})
    delta_norm = np.full((nr, ng, ns), np.nan)
    delta_span = np.full((nr, ns), -1, dtype=np.int64)
    val_loss = np.full((nr, ns), np.nan)
    val_acc = np.full((nr, ns), np.nan)
    lr = np.full((nr, ns), np.nan)
    param_count = np.zeros((nr, ng), dtype=np.int64)
    for i, r in enumerate(runs):
        have = np.array([s not in lacking.get(r, []) for s in grid])
        steps = grid[have]
        idx = np.nonzero(have)[0]
        span = np.diff(np.concatenate([[0], steps]))
        delta_span[i, idx] = span
        if r in noise_runs:
            D = make_deltas(steps.size, P, rank=0, bulk=0, noise=1.0, rng=rng)
            D *= rng.uniform(0.5, 2.0, (steps.size, 1))  # uneven norms, isotropic directions
        else:
            D = make_deltas(steps.size, P, rank=rank, rng=rng)
        t = steps / steps.max()
        val_loss[i, idx] = 3.0 * np.exp(-2 * t) + 1.0 + 0.01 * rng.standard_normal(steps.size)
        val_acc[i, idx] = 1 / (1 + np.exp(-12 * (t - 0.6)))
        lr[i, idx] = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
        for gi, g in enumerate(gnames):
            if g is None or g == "all":
                cols = slice(None)
                pc = P
            else:
                parts = [x for x in gnames if x not in (None, "all")]
                j = parts.index(g)
                b = P // len(parts)
                cols = slice(j * b, (j + 1) * b if j < len(parts) - 1 else P)
                pc = len(range(P)[cols])
            Dg = D[:, cols]
            param_count[i, gi] = pc
            delta_norm[i, gi, idx] = np.linalg.norm(Dg, axis=1)
            for wi, W in enumerate(windows):
                f = window_features(Dg, W)
                pos = idx[W - 1 :]
                for k in ("k_star", "k_star_naive", "edge_ratio", "edge_gap", "k95", "drift_speed", "noise_floor"):
                    v[k][i, wi, gi, pos] = f[k]
                for k in ("sigma", "ratio", "pc_frac"):
                    v[k][i, wi, gi, pos, :W] = f[k]
    # one missing val_loss eval per run (exact-step matching must skip it)
    val_loss[:, ns // 2 + 3] = np.nan

    def dims(base, with_sv=False):
        d = ["run", "window"] + (["group"] if groups else []) + ["step"] + (["sv"] if with_sv else [])
        return tuple(d)

    def sq(a):
        return a if groups else a[:, :, 0]

    attrs = {
        "sed_role": {
            "sigma": "singular_values",
            "ratio": "consecutive_ratio",
            "k_star": "signal_rank",
            "edge_ratio": "edge_ratio",
            "drift_speed": "drift_speed",
            "noise_floor": "noise_floor",
        }
    }
    data = {}
    for k in ("k_star", "k_star_naive", "edge_ratio", "edge_gap", "k95", "drift_speed", "noise_floor"):
        data[k] = (dims(k), sq(v[k]))
    for k in ("sigma", "ratio", "pc_frac"):
        data[k] = (dims(k, True), sq(v[k]))
    dn_dims = ("run", "group", "step") if groups else ("run", "step")
    data["delta_norm"] = (dn_dims, delta_norm if groups else delta_norm[:, 0])
    for name, arr in (("val_loss", val_loss), ("val_acc", val_acc), ("lr", lr)):
        data[name] = (("run", "step"), arr)
    coords = {
        "run": np.array(runs, dtype=object),  # object dtype, as the engine writes
        "window": np.asarray(windows, dtype=np.int64),
        "step": grid,
        "sv": sv,
        "delta_span": (("run", "step"), delta_span),
        "mp_adjacent_ratio": ("window", 1 + 2 * np.asarray(windows, float) ** (-2 / 3)),
    }
    if groups:
        coords["group"] = np.array(groups, dtype=object)
        coords["param_count"] = (("run", "group"), param_count)
    ds = xr.Dataset(
        data,
        coords=coords,
        attrs={
            "sed_dask_version": "test",
            "windows": list(windows),
            "runs": list(runs),
            "n_params": json.dumps({r: P for r in runs}),
            "precision": "float64",
            "step_normalised": 0,
        },
    )
    for k, role in attrs["sed_role"].items():
        ds[k].attrs["sed_role"] = role
    for k in ("val_loss", "val_acc", "lr"):
        ds[k].attrs["sed_role"] = "metric"
    ds["delta_norm"].attrs["sed_role"] = "delta_norm"
    for k in ds.data_vars:
        ds[k].attrs.setdefault("long_name", k)
        ds[k].attrs.setdefault("units", "1")
    return ds


def with_series(ds: xr.Dataset, name: str, fn, *, keep_nan: bool = True) -> xr.Dataset:
    """Overwrite ``name`` with ``fn(key: dict, steps: ndarray) -> values`` per series.

    key holds the series' labels (run, window, group …). Where the existing variable is NaN (no
    window) the planted value is NaN too, unless ``keep_nan=False``.
    """
    ds = ds.copy()
    da = ds[name].copy()
    dims = [d for d in da.dims if d != "step"]
    import itertools

    for labels in itertools.product(*(da[d].values.tolist() for d in dims)):
        key = dict(zip(dims, labels))
        cur = da.sel(key).values
        new = np.asarray(fn(key, da["step"].values), dtype=float)
        if keep_nan:
            new = np.where(np.isnan(cur), np.nan, new)
        da.loc[key] = new
    ds[name] = da
    return ds


def plant_lag(ds, leads, seed=0):
    """val_loss = trend + e on each run's own checkpoint grid (white noise e) and
    edge_ratio(W)[t] = 1.5 − 0.1·e[t + leads[W]]: the edge leads val_loss by leads[W] checkpoints
    (negative = lags), with r = −1 at that lag before detrending."""
    rng = np.random.default_rng(seed)
    noise = {}
    for r in ds.run.values:
        own = np.isfinite(ds.delta_span.sel(run=r).values) & (ds.delta_span.sel(run=r).values > 0)
        e = rng.standard_normal(own.sum() + 20)
        noise[r] = (own, e)

    def vl(key, steps):
        own, e = noise[key["run"]]
        out = np.full(steps.size, np.nan)
        t = steps[own] / steps.max()
        out[own] = 2 + 3 * np.exp(-3 * t) + 0.5 * t**2 + e[10 : 10 + own.sum()]
        return out

    def edge(key, steps):
        own, e = noise[key["run"]]
        L = leads[key["window"]]
        out = np.full(steps.size, np.nan)
        out[own] = 1.5 - 0.1 * e[10 + L + np.arange(own.sum())]  # x[t] = -e[t + L]
        return out

    d = with_series(ds, "val_loss", vl, keep_nan=True)
    return with_series(d, "edge_ratio", edge)
