"""Synthetic results Datasets (docs/result_schema.md) shaped like a grokking run, for the report tests.

The spectra are real: deltas with planted, time-varying signal directions are stacked into exact
W×W window Grams and pushed through the schema's definitions (σ, ρ, noise-floor-restricted k*,
edge ratio, MP floor, …), so the figures show what the engine would produce for such a run:
the edge σ₂/σ₃ rises, plateaus and collapses, and validation accuracy jumps (grokking) a fixed
number of steps after the collapse. ``truth`` holds the planted step numbers.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

PER_WINDOW = ("k_star", "k_star_naive", "edge_ratio", "edge_gap", "k95", "drift_speed", "noise_floor")
PER_SV = ("sigma", "ratio", "pc_frac")


def window_spectra(deltas: np.ndarray, W: int) -> dict[str, np.ndarray]:
    """Schema variables for every right-aligned window of ``W`` deltas (windows k = W-1 … N-1)."""
    N, P = deltas.shape
    G = deltas @ deltas.T
    out = {k: [] for k in PER_WINDOW + PER_SV}
    for k in range(W - 1, N):
        g = G[k - W + 1 : k + 1, k - W + 1 : k + 1]
        lam = np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None)
        s = np.sqrt(lam)
        rho = s[:-1] / s[1:]
        nbar = lam[W // 2 :].mean()
        floor = np.sqrt(nbar * (1 + np.sqrt(W / P)) ** 2)  # docs/method.md §4.2
        cand = s[:-1] >= floor  # numerator rule (docs/method.md)
        if not cand.any():
            cand = np.arange(1, W) <= W // 2
        ks = int(np.argmax(np.where(cand, rho, -np.inf))) + 1
        frac = lam / lam.sum()
        out["sigma"].append(s)
        out["ratio"].append(np.append(rho, np.nan))
        out["pc_frac"].append(frac)
        out["k_star"].append(ks)
        out["k_star_naive"].append(int(np.argmax(rho)) + 1)
        out["edge_ratio"].append(rho[ks - 1])
        out["edge_gap"].append(s[ks - 1] - s[ks])
        out["k95"].append(int(np.searchsorted(np.cumsum(frac), 0.95)) + 1)
        out["drift_speed"].append(np.sqrt(max(0.0, g.sum())) / W)
        out["noise_floor"].append(floor)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _profile(t, rise_end, collapse):
    """Amplitude of the signal directions: rises, plateaus, then collapses (smooth)."""
    up = 1 / (1 + np.exp(-(t - 0.5 * rise_end) / (0.12 * rise_end)))
    down = 1 / (1 + np.exp((t - collapse) / 0.04))
    return 0.08 + 1.9 * up * down


def grokking_results(
    *,
    runs=("seed0", "seed1", "seed2"),
    windows=(5, 10, 15),
    n_deltas: int = 60,
    spacing: int = 40,
    P: int = 1500,
    lead: int = 240,
    seed: int = 0,
):
    """A results Dataset for ``runs`` plus ``truth = {run: {"collapse": t, "grok": t}}`` (steps).

    Per run the edge collapses at a different time; ``val_acc`` reaches 0.9 ``lead`` steps after
    it (the planted early-warning lead), ``val_loss`` falls with it. Steps are ``spacing·i``.
    """
    rng = np.random.default_rng(seed)
    grid = spacing * np.arange(1, n_deltas + 1, dtype=np.int64)
    t = grid / grid[-1]
    Wmax = max(windows)
    nr, nw, ns = len(runs), len(windows), grid.size
    v = {k: np.full((nr, nw, ns), np.nan) for k in PER_WINDOW}
    v.update({k: np.full((nr, nw, ns, Wmax), np.nan) for k in PER_SV})
    metrics = {k: np.full((nr, ns), np.nan) for k in ("val_loss", "val_acc", "train_acc")}
    truth = {}
    for i, run in enumerate(runs):
        collapse = 0.55 + 0.08 * i
        # a drift direction (coherent sign) and a second, oscillating one share the amplitude A(t):
        # while A is large σ₁/σ₂ ≈ 1.3 and σ₂/σ₃ is the edge (k* = 2); when A fades, every ratio
        # falls towards the noise level (the collapse). Three weak bulk directions + isotropic noise.
        A = _profile(t, 0.3, collapse)
        strengths = np.stack([1.3 * A, A, np.full(ns, 0.35), np.full(ns, 0.3), np.full(ns, 0.25)], axis=1)
        U = np.linalg.qr(rng.standard_normal((P, strengths.shape[1])))[0].T
        z = rng.standard_normal(strengths.shape)
        z[:, 0] = 1.0 + 0.3 * z[:, 0]
        D = (strengths * z) @ U + 0.4 * rng.standard_normal((ns, P)) / np.sqrt(P)
        for wi, W in enumerate(windows):
            f = window_spectra(D, W)
            for k in PER_WINDOW:
                v[k][i, wi, W - 1 :] = f[k]
            for k in PER_SV:
                v[k][i, wi, W - 1 :, :W] = f[k]
        # the planted collapse step: first step after the peak where the W=min edge drops below 1.2
        e = v["edge_ratio"][i, 0]
        p = int(np.nanargmax(e))
        below = np.nonzero(e[p:] < 1.2)[0]
        c_step = int(grid[p + below[0]]) if below.size else int(grid[int(collapse * (ns - 1))])
        g_step = c_step + lead
        z = (grid - g_step) / (1.5 * spacing)
        metrics["val_acc"][i] = 0.02 + 0.97 / (1 + np.exp(-(z + 1.5)))  # crosses 0.9 at g_step
        metrics["train_acc"][i] = np.clip(1 - np.exp(-grid / (4 * spacing)), 0, 1)
        metrics["val_loss"][i] = (
            0.05 + 4.5 / (1 + np.exp(z + 0.5)) + 0.3 * np.exp(-grid / 300) + 0.02 * rng.standard_normal(ns)
        )
        first = int(grid[np.nonzero(metrics["val_acc"][i] >= 0.9)[0][0]])
        truth[run] = {"collapse": c_step, "grok": first}
    dims3 = ("run", "window", "step")
    data = {k: (dims3, v[k]) for k in PER_WINDOW}
    data.update({k: (dims3 + ("sv",), v[k]) for k in PER_SV})
    data.update({k: (("run", "step"), a) for k, a in metrics.items()})
    coords = {
        "run": np.array(runs, dtype=object),
        "window": np.asarray(windows, dtype=np.int64),
        "step": grid,
        "sv": np.arange(1, Wmax + 1, dtype=np.int64),
        "delta_span": (("run", "step"), np.full((nr, ns), spacing, dtype=np.int64)),
        "mp_adjacent_ratio": ("window", 1 + 2 * np.asarray(windows, float) ** (-2 / 3)),
    }
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
            "source_store": "synthetic",
        },
    )
    units = {
        "sigma": "parameter units",
        "edge_gap": "parameter units",
        "drift_speed": "parameter units",
        "noise_floor": "parameter units",
    }
    roles = {
        "sigma": "singular_values",
        "ratio": "consecutive_ratio",
        "k_star": "signal_rank",
        "edge_ratio": "edge_ratio",
        "drift_speed": "drift_speed",
        "noise_floor": "noise_floor",
        "val_loss": "metric",
        "val_acc": "metric",
        "train_acc": "metric",
    }
    for k in ds.data_vars:
        ds[k].attrs.update(long_name=k.replace("_", " "), units=units.get(k, "1"))
        if k in roles:
            ds[k].attrs["sed_role"] = roles[k]
    return ds, truth
