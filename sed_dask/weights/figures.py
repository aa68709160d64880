"""Figures of the weight-spectra report section, each a matplotlib ``Figure`` (Agg, no pyplot state).

* :func:`alpha_outliers_figure` - alpha and the outlier count against step, one line per layer;
* :func:`esd_figure`            - ESD histograms at a few steps with the fitted MP density, its edge
                                  and the outlier threshold;
* :func:`alignment_figure`      - heat map (layer x step) of the update/weight subspace overlap over chance.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

C_GROK = "#6a1b9a"


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def _events(ax, events: dict | None):
    for label, step in (events or {}).items():
        if step is not None and np.isfinite(step):
            ax.axvline(step, color=C_GROK, ls="--", lw=1.2, label=label)


def alpha_outliers_figure(ds: xr.Dataset, *, run: str, layers=None, events: dict | None = None) -> Figure:
    """Two panels sharing the step axis: power-law alpha per layer, and the number of outliers per layer."""
    layers = [str(x) for x in ds["layer"].values] if layers is None else list(layers)
    d = ds.sel(run=run)
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    cmap = matplotlib.colormaps["tab20"]
    steps = np.asarray(d["step"].values)
    for i, layer in enumerate(layers):
        c = cmap(i % 20)
        a = np.asarray(d["alpha"].sel(layer=layer).values, float)
        n = np.asarray(d["n_outliers"].sel(layer=layer).values, float)
        ok = np.isfinite(a)
        if ok.any():
            ax1.plot(steps[ok], a[ok], color=c, lw=1.3, label=_short(layer))
        ok = np.isfinite(n)
        ax2.plot(
            steps[ok],
            n[ok] + 0.04 * (i - len(layers) / 2),
            color=c,
            lw=1.3,
            drawstyle="steps-post",
            label=_short(layer),
        )
    for ax in (ax1, ax2):
        _events(ax, events)
        ax.grid(alpha=0.3)
    ax1.set_ylabel(r"ESD tail exponent $\alpha$")
    ax1.set_title(f"{run}: heavy-tail exponent (CSN power-law fit of the ESD)")
    ax2.set_ylabel("outliers above MP edge + TW margin")
    ax2.set_title("outlier count (lines offset slightly to stay apart)")
    ax2.set_xlabel("training step")
    handles, labels = ax1.get_legend_handles_labels()
    if not handles:
        handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return fig


def mp_density(x: np.ndarray, s2: float, N: int, M: int) -> np.ndarray:
    """MP density of eigenvalues ``lam`` (not divided by N) for element variance ``s2``."""
    q = M / N
    a, b = s2 * N * (1 - math.sqrt(q)) ** 2, s2 * N * (1 + math.sqrt(q)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * q * s2 * N * x)
    return np.where((x > a) & (x < b), f, 0.0)


def esd_figure(ds: xr.Dataset, *, run: str, layers, steps) -> Figure:
    """ESD histograms of log10(sigma^2) for ``layers`` (rows) at ``steps`` (columns), MP fit overlaid.

    Log-spaced bins, so a bulk that weight decay shrinks by orders of magnitude and outliers far above
    it stay visible in one panel; densities are per unit of log10(lambda) (MP: f(lam) lam ln 10).
    """
    if "esd" not in ds:
        raise ValueError("esd_figure: the Dataset holds no ESD (computed with keep_esd=False or beyond esd-max-dim)")
    layers, steps = list(layers), [int(s) for s in steps]
    fig = Figure(figsize=(3.3 * len(steps), 2.4 * len(layers)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(layers), len(steps), squeeze=False))
    d = ds.sel(run=run)
    for i, layer in enumerate(layers):
        x = d.sel(layer=layer)
        m, n = int(x["layer_rows"]), int(x["layer_cols"])
        N, M = max(m, n), min(m, n)
        for j, step in enumerate(steps):
            ax = axes[i, j]
            y = x.sel(step=step)
            lam = np.asarray(y["esd"].values, float)
            lam = lam[np.isfinite(lam) & (lam > 0)]
            if not lam.size:
                ax.set_axis_off()
                continue
            s2 = float(y["mp_s2"])
            thr = float(y["outlier_threshold"]) ** 2
            lo, hi = np.log10(lam.min()) - 0.1, np.log10(max(lam.max(), thr if np.isfinite(thr) else 0)) + 0.1
            ax.hist(
                np.log10(lam),
                bins=min(50, max(10, lam.size // 3)),
                range=(lo, hi),
                density=True,
                color="#9ecae1",
                edgecolor="#4a90c2",
                lw=0.4,
                label="ESD",
            )
            out = lam[lam > thr] if np.isfinite(thr) else lam[:0]
            if np.isfinite(s2):
                grid = np.logspace(lo, hi, 800)
                bulk = 1.0 - out.size / lam.size  # the MP law describes the bulk's share of the histogram
                ax.plot(
                    np.log10(grid),
                    bulk * mp_density(grid, s2, N, M) * grid * math.log(10),
                    color="#c0392b",
                    lw=1.3,
                    label="MP fit (bulk share)",
                )
                ax.axvline(np.log10(float(y["mp_edge"]) ** 2), color="#c0392b", ls=":", lw=1, label="MP edge")
                ax.axvline(np.log10(thr), color="#e67e22", ls="--", lw=1, label="edge + TW margin")
            if out.size:
                ax.plot(np.log10(out), np.zeros_like(out), "v", color="#6a1b9a", ms=5, label="outliers", clip_on=False)
            a = float(y["alpha"])
            tail = f", α={a:.2f}" if np.isfinite(a) else ""
            ax.set_title(f"{_short(layer)} @ {step}\n{int(out.size)} of {lam.size} above the edge{tail}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(layers) - 1:
                ax.set_xlabel(r"$\log_{10}\,\sigma^2$", fontsize=8)
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside lower center", ncol=5, fontsize=8)
    return fig


def alignment_figure(al: xr.Dataset, *, events: dict | None = None) -> Figure:
    """Heat maps (layer x step), left and right: log2 of overlap / chance (0 = a random subspace)."""
    layers = [str(x) for x in al["layer"].values]
    steps = np.asarray(al["step"].values)
    fig = Figure(figsize=(11, 0.35 * len(layers) + 2.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    vals = {
        side: np.log2(
            np.asarray(al["overlap"].sel(side=side).values, float).T
            / np.asarray(al["chance"].sel(side=side).values, float)[:, None]
        )
        for side in ("left", "right")
    }
    vmax = max(1.0, np.nanmax([np.nanmax(v) if np.isfinite(v).any() else 1.0 for v in vals.values()]))
    norm = TwoSlopeNorm(
        vcenter=0.0,
        vmin=min(-1.0, np.nanmin([np.nanmin(v) if np.isfinite(v).any() else -1.0 for v in vals.values()])),
        vmax=vmax,
    )
    im = None
    for ax, side in zip(axes, ("left", "right")):
        half = np.diff(steps).min() / 2 if steps.size > 1 else 0.5
        im = ax.imshow(
            vals[side],
            aspect="auto",
            cmap="RdBu_r",
            norm=norm,
            interpolation="nearest",
            extent=(steps[0] - half, steps[-1] + half, len(layers) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(layers)), [_short(x) for x in layers], fontsize=7)
        ax.set_xlabel("window's newest step")
        ax.set_title(f"{side} singular subspace (k={al.attrs.get('k')})", fontsize=9)
        for step in (events or {}).values():
            if step is not None and np.isfinite(step):
                ax.axvline(step, color="k", ls="--", lw=1.2)
    fig.colorbar(im, ax=axes, label=r"$\log_2$(overlap / chance)")
    fig.suptitle(
        f"{al.attrs.get('run')}: top-{al.attrs.get('n_directions')} update directions (W="
        f"{al.attrs.get('window')}) vs the weight's top-{al.attrs.get('k')} singular subspace"
        + (f"; dashed: {', '.join(str(k) for k in events)}" if events else ""),
        fontsize=10,
    )
    return fig


def esd_snapshot_steps(ds: xr.Dataset, run: str, escape: dict | None = None) -> list[int]:
    """First, escape (or middle) and last computed steps of a run, for :func:`esd_figure`."""
    st = np.asarray(ds["step"].values)
    have = np.isfinite(np.asarray(ds["spectral_norm"].sel(run=run).values, float)).any(axis=1)
    st = st[have]
    mid = int(st[st.size // 2])
    esc = [int(v) for v in (escape or {}).values() if v is not None and np.isfinite(v)]
    pick = [int(st[0]), min(esc) if esc else mid, int(st[-1])]
    return sorted(set(pick))


def pick_layers(ds: xr.Dataset, n: int = 4) -> list[str]:
    """The ``n`` layers with the most outliers at the last step (ties: index order), for the ESD figure."""
    v = np.asarray(ds["n_outliers"].isel(run=0).transpose("layer", "step").values, float)
    last = np.array([row[np.isfinite(row)][-1] if np.isfinite(row).any() else -1.0 for row in v])
    order = np.argsort(-last, kind="stable")
    names = [str(x) for x in ds["layer"].values]
    if "layer_method" in ds.coords:
        order = [i for i in order if str(ds["layer_method"].values[i]) != "randomized"]
    return [names[i] for i in order[:n]]
