"""The report's figures, one function per figure, each returning a matplotlib ``Figure``.

Built on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so they are safe in
worker processes and never open windows. Each takes the results Dataset (docs/result_schema.md,
group already selected) plus the already-normalised inputs of :func:`sed_dask.report.make_report`;
the helpers here also read per-run numbers from analysis outputs (Datasets from
``sed_dask.analysis``, DataFrames or plain mappings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

__all__ = [
    "spectrum_figure",
    "edge_phases_figure",
    "edge_val_loss_figure",
    "lag_figure",
    "warning_figure",
    "signals_figure",
    "noise_figure",
    "phase_intervals",
    "run_value",
]

PHASE_COLORS = {"rise": "#9ecae1", "plateau": "#a1d99b", "collapse": "#fdae6b", "rebound": "#d9b3ff"}
C_EDGE, C_LOSS, C_ACC, C_EVENT, C_ONSET = "#1f4e9a", "#c0392b", "#2e8b57", "#6a1b9a", "#e67e22"
EDGE_LABEL = r"edge ratio $\sigma_{k^*}/\sigma_{k^*+1}$"
NICE = {
    "edge_ratio": EDGE_LABEL,
    "val_loss": "validation loss",
    "val_acc": "validation accuracy",
    "edge_gap": r"edge gap $\sigma_{k^*}-\sigma_{k^*+1}$",
    "drift_speed": "drift speed",
}

_STEPS_FMT = FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}")


# ------------------------------------------------------------------------------------ inputs
def base(ds: xr.Dataset) -> xr.Dataset:
    """The whole-vector slice: group "all" (the schema puts it first) when a group dim exists."""
    if "group" in ds.dims:
        groups = [str(g) for g in ds["group"].values]
        ds = ds.isel(group=groups.index("all") if "all" in groups else 0)
    return ds


def finite(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values where ``da`` (1-D along step) is finite: missing windows are dropped."""
    v = np.asarray(da.values, dtype=float)
    ok = np.isfinite(v)
    return np.asarray(da["step"].values)[ok], v[ok]


def run_value(obj, name: str, run: str, window=None) -> float:
    """One per-run number from an analysis Dataset/DataArray, a DataFrame or a mapping."""
    if obj is None:
        return math.nan
    if isinstance(obj, xr.Dataset):
        if name not in obj.data_vars:
            return math.nan
        obj = obj[name]
    if isinstance(obj, xr.DataArray):
        da = obj
        if "group" in da.dims:
            da = base(da.to_dataset(name="v"))["v"]
        if "run" in da.dims:
            if run not in [str(x) for x in da["run"].values]:
                return math.nan
            da = da.sel(run=run)
        if "window" in da.dims:
            if window is None or window not in da["window"].values:
                return math.nan
            da = da.sel(window=window)
        if da.dims:  # e.g. collapse_step's tau dim: the first entry (list the primary τ first)
            da = da.isel({d: 0 for d in da.dims})
        return float(da.values)
    if isinstance(obj, pd.DataFrame):
        if run in obj.index and name in obj.columns:
            return float(obj.loc[run, name])
        return math.nan
    if isinstance(obj, Mapping):
        v = obj.get(run)
        if isinstance(v, Mapping):
            v = v.get(name)
        return math.nan if v is None else float(v)
    raise TypeError(f"cannot read {name!r} for run {run!r} from a {type(obj).__name__}")


def phase_intervals(phases, run: str, window, steps: np.ndarray) -> list[tuple[str, float, float]]:
    """``[(phase, start_step, end_step), …]`` for one run from an analysis Dataset or a DataFrame."""
    if phases is None or steps.size == 0:
        return []
    if isinstance(phases, pd.DataFrame):
        df = phases[phases["run"].astype(str) == run]
        if "window" in df.columns:
            df = df[df["window"] == window]
        return [(str(p), float(s), float(e)) for p, s, e in zip(df["phase"], df["start"], df["end"])]
    a = run_value(phases, "plateau_start_step", run, window)
    b = run_value(phases, "collapse_start_step", run, window)
    if not (np.isfinite(a) and np.isfinite(b)):
        return []
    r = run_value(phases, "rebound_step", run, window)
    end = float(steps[-1])
    out = [("rise", float(steps[0]), a), ("plateau", a, b)]
    if np.isfinite(r):
        return out + [("collapse", b, r), ("rebound", r, end)]
    return out + [("collapse", b, end)]


# ----------------------------------------------------------------------------------- figures
def _nice(name: str) -> str:
    return NICE.get(name, name.replace("_", " "))


def _vline(ax, x, color, label, style="--"):
    if x is not None and np.isfinite(x):
        ax.axvline(x, color=color, ls=style, lw=1.8, label=label)


def _fig_legend(fig, axes, ncol: int = 4):
    """One legend below all panels (twin axes included): the panels share their semantics."""
    seen = {}
    for a in axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="outside lower center",
            ncol=min(ncol, len(seen)),
            fontsize=9,
            frameon=False,
        )


def _runs_grid(n: int, height: float = 2.5, width: float = 10.0):
    fig = Figure(figsize=(width, 1.2 + height * n), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _step_axis(ax):
    ax.set_xlabel("training step")
    ax.xaxis.set_major_formatter(_STEPS_FMT)


def spectrum_figure(ds, *, run, step, window) -> Figure:
    """σ_j and ρ_k of one window (paper Fig 1A): which ratios are signal, which are noise, and k*."""
    W = window
    sig = ds["sigma"].sel(run=run, window=W, step=step).values.astype(float)
    sig = sig[np.isfinite(sig)]
    rho = ds["ratio"].sel(run=run, window=W, step=step).values.astype(float)[: sig.size - 1]
    floor = float(ds["noise_floor"].sel(run=run, window=W, step=step))
    ks = int(ds["k_star"].sel(run=run, window=W, step=step))
    j = np.arange(1, sig.size + 1)
    above = sig >= floor
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    a1.bar(j[above], sig[above], color=C_EDGE, label=r"$\sigma_j$ above the noise floor")
    a1.bar(j[~above], sig[~above], color="#bbbbbb", label=r"$\sigma_j$ below the noise floor")
    a1.bar(
        [ks, ks + 1],
        sig[[ks - 1, ks]],
        color="none",
        edgecolor=C_ONSET,
        lw=2.4,
        label=rf"edge pair $\sigma_{{{ks}}}, \sigma_{{{ks + 1}}}$",
    )
    a1.axhline(floor, color=C_LOSS, ls="--", lw=1.5, label=rf"MP noise floor $\sigma_{{MP}}$ = {floor:.3g}")
    pos = sig[sig > 0]
    if pos.size and pos.max() / pos.min() > 20:  # log only when the values span decades
        a1.set_yscale("log")
        a1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    a1.set_xticks(j)
    a1.set_xlabel("index $j$")
    a1.set_ylabel(r"singular value $\sigma_j$  [parameter units]")
    a1.set_title("Singular values of the window" + (" (log scale)" if a1.get_yscale() == "log" else ""))
    a1.legend(fontsize=8.5, loc="upper right")
    k = np.arange(1, rho.size + 1)
    ok = sig[1:] >= floor  # ratio k is informative only if σ_{k+1} is above the floor
    bars = a2.bar(k, rho, color=np.where(ok, "#6baed6", "#e0e0e0"), edgecolor=np.where(ok, "#3182bd", "#9e9e9e"))
    for b, good in zip(bars, ok):
        if not good:
            b.set_hatch("///")
    bars[ks - 1].set_facecolor(C_ONSET)
    bars[ks - 1].set_edgecolor("black")
    # keep the label inside the axes when the edge is the first or the last ratio
    ha, dx = ("left", -8) if ks == 1 else (("right", 8) if ks == rho.size else ("center", 0))
    a2.annotate(
        f"$k^*$ = {ks}\n" + rf"$\sigma_{{{ks}}}/\sigma_{{{ks + 1}}}$ = {rho[ks - 1]:.3f}",
        xy=(ks, rho[ks - 1]),
        xytext=(dx, 6),
        textcoords="offset points",
        ha=ha,
        va="bottom",
        fontsize=9.5,
        fontweight="bold",
    )
    if "mp_adjacent_ratio" in ds.coords:
        mp = float(ds["mp_adjacent_ratio"].sel(window=W))
        a2.axhline(mp, color=C_LOSS, ls=":", lw=1.5, label=f"MP noise-level ratio $1+2W^{{-2/3}}$ = {mp:.3f}")
    a2.axhline(1.0, color="black", lw=0.8)
    a2.set_xticks(k)
    top = rho[np.isfinite(rho)].max()
    a2.set_ylim(0.9, max(top + 0.22 * (top - 0.9), 1.6))
    a2.set_xlabel(r"ratio index $k$   ($\rho_k = \sigma_k/\sigma_{k+1}$)")
    a2.set_ylabel(r"consecutive ratio $\rho_k$  [1]")
    a2.set_title("Consecutive ratios: $k^*$ = argmax above the floor")
    handles, _ = a2.get_legend_handles_labels()
    handles += [
        Patch(facecolor="#6baed6", edgecolor="#3182bd", label=r"$\sigma_{k+1}$ above the floor"),
        Patch(facecolor="#e0e0e0", edgecolor="#9e9e9e", hatch="///", label=r"$\sigma_{k+1}$ below the floor (noise)"),
        Patch(facecolor=C_ONSET, edgecolor="black", label="spectral edge $k^*$"),
    ]
    a2.legend(handles=handles, fontsize=8.5, loc="upper right")
    fig.suptitle(f"Window spectrum: run {run}, W = {W}, window ending at step {int(step):,}", fontsize=12)
    return fig


def _edge_at_centres(ds, run, W):
    """(window-centre steps, fixed-k edge, k) of one run: the series phases are measured on."""
    from sed_dask.analysis import fixed_edge, window_steps

    e = fixed_edge(ds.sel(run=[run], window=[W])).sel(run=run, window=W)
    st, x = finite(e)
    k = float(e["edge_k"]) if "edge_k" in e.coords else math.nan
    return window_steps(ds, {"run": run, "window": W}, st, label="center"), x, k


def edge_phases_figure(ds, *, runs, window, phases=None, events=None, collapse=None) -> Figure:
    """The fixed-k edge per run at window centres, rise/plateau/collapse/rebound shaded, collapse marked."""
    W, events = window, events or {}
    fig, axes = _runs_grid(len(runs))
    label_k = set()
    for ax, r in zip(axes, runs):
        st, e, k = _edge_at_centres(ds, r, W)
        label_k.add(k)
        for name, s0, s1 in phase_intervals(phases, r, W, st):
            ax.axvspan(s0, s1, color=PHASE_COLORS.get(name, "#eeeeee"), alpha=0.5, lw=0, label=f"{name} phase")
        ax.plot(
            st,
            e,
            color=C_EDGE,
            lw=1.8,
            marker="o",
            ms=2.5,
            label=rf"edge $\sigma_k/\sigma_{{k+1}}$ at fixed k (mode of $k^*$), W={W}",
        )
        tau = run_value(phases, "tau_value", r, W)
        if not np.isfinite(tau) and "mp_adjacent_ratio" in ds.coords:
            tau = float(ds["mp_adjacent_ratio"].sel(window=W))
        if np.isfinite(tau):
            ax.axhline(tau, color="grey", ls=":", lw=1.3, label=r"collapse threshold $\tau = 1+2W^{-2/3}$")
        c = run_value(phases if phases is not None else collapse, "collapse_step", r, W)
        _vline(ax, c, C_LOSS, "collapse step (edge < tau, 2 windows)", ":")
        for i, (name, s) in enumerate(sorted(events.get(r, {}).items())):
            _vline(
                ax,
                s,
                C_EVENT if name == "grok" else f"C{i + 4}",
                "grok step (val acc ≥ 0.9)" if name == "grok" else f"{name} step",
            )
        ax.set_ylabel("edge  [1]")
        ax.set_title(f"run {r}" + (f"  (k = {k:.0f})" if np.isfinite(k) else ""), loc="left", fontsize=10)
        if e.size and e.max() / max(e.min(), 1e-12) > 8:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    _step_axis(axes[-1])
    axes[-1].set_xlabel("training step (centre of each window)")
    _fig_legend(fig, axes, ncol=3)
    note = "" if phases is not None else "  (no phase input)"
    fig.suptitle(f"Spectral edge over training and its phases, W = {W}{note}", fontsize=12)
    return fig


def edge_val_loss_figure(ds, *, runs, window, events=None) -> Figure:
    """Edge ratio and validation loss on twin axes: the coupling the lag analysis quantifies."""
    W, events = window, events or {}
    fig, axes = _runs_grid(len(runs))
    all_axes = list(axes)
    for ax, r in zip(axes, runs):
        st, e = finite(ds["edge_ratio"].sel(run=r, window=W))
        ax.plot(st, e, color=C_EDGE, lw=1.8, label=f"{EDGE_LABEL}, W={W} (left axis)")
        ax.set_ylabel("edge ratio  [1]", color=C_EDGE)
        ax.tick_params(axis="y", colors=C_EDGE)
        ax2 = ax.twinx()
        all_axes.append(ax2)
        sl, vl = finite(ds["val_loss"].sel(run=r))
        ax2.plot(sl, vl, color=C_LOSS, lw=1.6, marker=".", ms=3, label="validation loss (right axis)")
        if vl.size and vl.min() > 0 and vl.max() / vl.min() > 10:
            ax2.set_yscale("log")
        ax2.set_ylabel(f"val loss  [{ds['val_loss'].attrs.get('units', '1')}]", color=C_LOSS)
        ax2.tick_params(axis="y", colors=C_LOSS)
        _vline(ax, events.get(r, {}).get("grok"), C_EVENT, "grok step (val acc ≥ 0.9)")
        ax.set_title(f"run {r}", loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _step_axis(axes[-1])
    _fig_legend(fig, all_axes)
    fig.suptitle(f"Edge ratio and validation loss over training, W = {W}", fontsize=12)
    return fig


def lag_figure(
    r_da: xr.DataArray, *, runs, windows, spacing=None, computed_here: bool = False, peaks: xr.Dataset | None = None
) -> Figure:
    """r(ℓ) per W. A filled star marks a peak that is resolved (inside the lag grid) and significant
    (``peaks``: a lag sweep with peak_resolved / peak_significant); a hollow one a peak that is not:
    only filled stars can make a lag flip."""
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols + 0.6, 4.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    cmap = matplotlib.colormaps["viridis"]
    lags = np.asarray(r_da["lag"].values)
    for ax, r in zip(axes, runs):
        for i, W in enumerate(windows):
            if W not in r_da["window"].values:
                continue
            y = np.asarray(r_da.sel(run=r, window=W).values, dtype=float)
            if not np.isfinite(y).any():
                continue
            c = cmap(0.9 * i / max(len(windows) - 1, 1))
            p = int(np.nanargmin(y))  # reference rule: the most negative r (docs/method.md §6.3)
            ok = True
            what = ""
            if peaks is not None and "peak_resolved" in peaks:
                res = bool(run_value(peaks, "peak_resolved", r, W))
                sig = bool(run_value(peaks, "peak_significant", r, W)) if "peak_significant" in peaks else True
                ok = res and sig
                what = "" if ok else (" (grid edge: unresolved)" if not res else " (not significant)")
            ax.plot(
                lags,
                y,
                color=c,
                lw=1.8,
                marker="o",
                ms=3.5,
                label=f"W={W}: peak {int(lags[p]):+d}{what}".replace("-", "−"),
            )
            ax.plot(
                lags[p],
                y[p],
                marker="*",
                ms=15,
                color=c if ok else "white",
                markeredgecolor="black",
                markeredgewidth=1.2,
                ls="none",
            )
        ax.axvline(0, color="black", lw=0.9)
        ax.axhline(0, color="grey", lw=0.7)
        ax.set_title(f"run {r}", loc="left", fontsize=10)
        ax.set_xlabel("lag ℓ  [checkpoints]\n← val loss leads   |   edge leads →")
        ax.set_xticks(lags)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", title="★ resolved and significant, ☆ not", title_fontsize=8)
        if spacing:
            sec = ax.secondary_xaxis("top", functions=(lambda v, s=spacing: v * s, lambda v, s=spacing: v / s))
            sec.set_xlabel("lag  [steps]", fontsize=8.5)
            sec.tick_params(labelsize=7.5)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("Pearson r(edge ratio, val loss)  [1]")
    fig.suptitle(
        "Lagged correlation of the edge ratio with validation loss, per W\n"
        "(a lag flip = filled-star peaks of opposite sign)",
        fontsize=11.5,
    )
    if computed_here:
        fig.text(
            0.01,
            0.0,
            "r computed by the report (cubic detrend on exact-step pairs, docs/method.md §6); "
            "ℓ > 0: edge at t vs val loss at t+ℓ",
            fontsize=8,
            color="dimgrey",
            va="bottom",
        )
    return fig


_DET_STYLE = {
    "below_noise": ("#c0392b", "-"),
    "peak_drop": ("#e67e22", "--"),
    "cusum": ("#8e44ad", "-."),
    "onset": (C_ONSET, "-"),
}


def warning_figure(
    ds,
    *,
    runs,
    window,
    variable="edge_ratio",
    events=None,
    warning=None,
    collapse=None,
    alarms: xr.Dataset | None = None,
) -> Figure:
    """The watched edge with each causal detector's first alarm and the grokking step; the lead from
    the earliest alarm to grokking is shaded. Alarm labels sit at staggered heights so that alarms at
    the same step stay readable. Without ``alarms``: ``warning`` onsets (or the collapse)."""
    W, events = window, events or {}
    fig, axes = _runs_grid(len(runs), height=2.8)
    all_axes = list(axes)
    metric = "val_acc" if "val_acc" in ds.data_vars else ("val_loss" if "val_loss" in ds.data_vars else None)
    for ax, r in zip(axes, runs):
        if alarms is not None:
            from sed_dask.analysis import fixed_edge

            e = fixed_edge(ds.sel(run=[r], window=[W])).sel(run=r, window=W)
            st, x = finite(e)
            label = rf"edge $\sigma_k/\sigma_{{k+1}}$, k = {float(e['edge_k']):.0f}, W={W} (left axis)"
        else:
            da = ds[variable].sel(run=r)
            st, x = finite(da.sel(window=W) if "window" in da.dims else da)
            label = _nice(variable) + f", W={W} (left axis)"
        ax.plot(st, x, color=C_EDGE, lw=1.8, label=label)
        ax.set_ylabel("edge  [1]", color=C_EDGE)
        ax.tick_params(axis="y", colors=C_EDGE)
        marks = []  # (step, name)
        if alarms is not None:
            a = alarms["alarm_step"].sel(run=r, window=W)
            if "group" in a.dims:
                a = a.isel(group=0)
            marks = [(float(v), str(d)) for d, v in zip(a["detector"].values, a.values) if np.isfinite(v)]
        else:
            onset = run_value(warning, "onset_step", r, W)
            if np.isfinite(onset):
                marks = [(onset, "onset")]
            else:
                c = run_value(collapse, "collapse_step", r, W)
                marks = [(c, "below_noise")] if np.isfinite(c) else []
        grok = events.get(r, {}).get("grok", math.nan)
        if metric:
            ax2 = ax.twinx()
            all_axes.append(ax2)
            sm, m = finite(ds[metric].sel(run=r))
            ax2.plot(sm, m, color=C_ACC, lw=1.5, alpha=0.85, label=f"{_nice(metric)} (right axis)")
            ax2.set_ylabel(f"{_nice(metric)}  [{ds[metric].attrs.get('units', '1')}]", color=C_ACC)
            ax2.tick_params(axis="y", colors=C_ACC)
            if metric == "val_acc":
                ax2.set_ylim(-0.03, 1.08)
        top = all_axes[-1] if metric else ax
        if np.isfinite(grok):  # wide and pale, under the alarms: an alarm at the grok step stays visible
            ax.axvline(grok, color=C_EVENT, lw=5, alpha=0.3, zorder=1, label="grok step (val acc ≥ 0.9)")
        for i, (step, name) in enumerate(sorted(marks)):
            color, ls = _DET_STYLE.get(name, (C_ONSET, "-"))
            ax.axvline(step, color=color, ls=ls, lw=1.6, zorder=3, label=f"first alarm: {name}")
            top.text(
                step,
                0.96 - 0.13 * i,
                f" {name} @ {step:,.0f}",
                transform=top.get_xaxis_transform(),
                ha="left",
                va="top",
                fontsize=8,
                color=color,
                zorder=4,
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=0.8),
            )
        first = min((s for s, _ in marks), default=math.nan)
        if np.isfinite(first) and np.isfinite(grok):
            ax.axvspan(min(first, grok), max(first, grok), color=C_ONSET, alpha=0.12, lw=0)
            lead = grok - first
            txt = f"lead = {lead:,.0f} steps" + (" (alarm after grokking)" if lead < 0 else "")
            top.text(
                0.99,
                0.04,
                txt.replace("-", "−"),
                transform=top.transAxes,
                ha="right",
                va="bottom",
                fontsize=9.5,
                fontweight="bold",
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"),
            )
        elif not marks:
            top.text(0.99, 0.04, "no alarm", transform=top.transAxes, ha="right", va="bottom", fontsize=9.5)
        ax.set_title(f"run {r}", loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _step_axis(axes[-1])
    axes[-1].set_xlabel("training step (newest checkpoint of each window: when an alarm can be raised)")
    _fig_legend(fig, all_axes, ncol=3)
    fig.suptitle("Early warning: causal alarms on the edge vs the grokking step (lead < 0: after it)", fontsize=12)
    return fig


def noise_figure(summary: xr.Dataset, *, runs, window, events=None) -> Figure:
    """PC2 against its matched-norm null and the split-half stability of PC2 (docs/method.md §4.5): when
    does the second direction stop being signal? ``summary``: output of ``analysis.pc2_summary``."""
    W, events = window, events or {}
    fig, axes = _runs_grid(len(runs), height=2.6)
    all_axes = list(axes)
    sel = {"window": W} if "window" in summary.dims else {}
    q = summary.attrs.get("q", 0.95)
    for ax, r in zip(axes, runs):
        s = summary.sel(run=r, **sel) if "run" in summary.dims else summary.sel(**sel)
        st, pc2 = finite(s["pc2_pct"])
        sn, nul = finite(s["null_pc2"])
        ax.plot(st, pc2, color=C_EDGE, lw=1.8, marker="o", ms=2.5, label="PC2 share 100 λ₂/Σλ (left axis)")
        ax.plot(sn, nul, color="grey", lw=1.3, ls="--", label=f"null {q:g} quantile, matched norms (left axis)")
        ax.set_ylabel("PC2  [%]", color=C_EDGE)
        ax.tick_params(axis="y", colors=C_EDGE)
        if "split_half_k2" in s:
            ax2 = ax.twinx()
            all_axes.append(ax2)
            sh_s, sh = finite(s["split_half_k2"])
            ax2.plot(sh_s, sh, color=C_ACC, lw=1.3, alpha=0.85, label="split-half |cos| of PC2 (right axis)")
            ax2.axhline(0.5, color=C_ACC, ls=":", lw=1.0, label="split-half 0.5 ('weak')")
            ax2.set_ylim(-0.03, 1.05)
            ax2.set_ylabel("split-half |cos|  [1]", color=C_ACC)
            ax2.tick_params(axis="y", colors=C_ACC)
        t = float(s["noise_transition_step"])
        kind = int(s["transition_kind"]) if "transition_kind" in s else (1 if np.isfinite(t) else 0)
        if "pc2_emerge_step" in s:
            _vline(ax, float(s["pc2_emerge_step"]), "#2980b9", "PC2 rises above its null", "--")
        _vline(ax, t, C_LOSS, "noise transition (PC2 falls back into the null)", ":")
        if kind != 1:
            ax.text(
                0.99,
                0.92,
                {
                    0: "no transition: PC2 never held above its null (2 windows)",
                    2: "no transition: PC2 stays above its null",
                }.get(kind, ""),
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=9,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"),
            )
        _vline(ax, events.get(r, {}).get("grok"), C_EVENT, "grok step (val acc ≥ 0.9)")
        ax.set_title(f"run {r}", loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _step_axis(axes[-1])
    _fig_legend(fig, all_axes, ncol=3)
    fig.suptitle(f"Is PC2 signal? PC2 vs a random-direction null and its split-half stability, W = {W}", fontsize=12)
    return fig


_SIG_STYLE = ["#e67e22", "#d35400", "#2980b9", "#1f4e9a", "#16a085", "#7f8c8d", "#8e44ad", "#c0392b"]


def signals_figure(ds, *, runs, window, signals: pd.DataFrame, events=None) -> Figure:
    """Every early-warning candidate (rows of ``report.warning_signals``) against grokking.

    Edge ratio on the left axis, g₂₃ = σ₂² − σ₃² (log) on the right when present; one dashed
    line per candidate that fired, the grok step in black. Shows all candidates, not a chosen one.
    """
    W, events = window, events or {}
    fig, axes = _runs_grid(len(runs), height=2.9)
    all_axes = list(axes)
    names = list(dict.fromkeys(signals["signal"]))
    color = {n: _SIG_STYLE[i % len(_SIG_STYLE)] for i, n in enumerate(names)}
    style = {n: ("--" if i % 2 else ":") for i, n in enumerate(names)}
    for ax, r in zip(axes, runs):
        st, x = finite(ds["edge_ratio"].sel(run=r, window=W))
        ax.plot(st, x, color=C_EDGE, lw=1.8, label=f"edge ratio, W={W} (left axis)")
        ax.set_ylabel("edge ratio", color=C_EDGE)
        if "g23" in ds.data_vars:
            ax2 = ax.twinx()
            all_axes.append(ax2)
            sg, g = finite(ds["g23"].sel(run=r, window=W))
            pos = g > 0
            ax2.plot(
                sg[pos],
                g[pos],
                color="#7f8c8d",
                lw=1.2,
                alpha=0.8,
                label=r"$g_{23}=\sigma_2^2-\sigma_3^2$ (right axis, log)",
            )
            ax2.set_yscale("log")
            ax2.set_ylabel(r"$g_{23}$", color="#7f8c8d")
        sel = signals[(signals["run"] == r) & (signals["window"] == W)]
        for n, s in zip(sel["signal"], sel["signal_step"]):
            if np.isfinite(s):
                ax.axvline(s, color=color[n], ls=style[n], lw=1.6, label=n)
        _vline(ax, events.get(r, {}).get("grok", math.nan), "black", "grok (val acc ≥ 0.9)", "-")
        ax.set_title(f"run {r}", loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    _step_axis(axes[-1])
    _fig_legend(fig, all_axes, ncol=4)
    fig.suptitle(f"Early-warning candidates vs grokking (W={W}; unfired candidates have no line)", fontsize=12)
    return fig
