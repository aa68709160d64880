"""Report: PNG figures and HTML/Markdown summary tables of a results Dataset.

Works from the Dataset (docs/result_schema.md) plus precomputed inputs, so the analysis queries
feed it without the report re-implementing them. Figures, in the spirit of the paper:

* ``spectrum``       σ_j and ρ_k = σ_k/σ_{k+1} of one window; noise floor, k* highlighted, ratios
                     whose σ_{k+1} is below the floor greyed (paper Fig 1A);
* ``edge_phases``    the fixed-k edge over training per run (window centres), rise / plateau /
                     collapse / rebound shaded, collapse and events marked;
* ``edge_val_loss``  edge ratio and validation loss over steps (twin axes);
* ``lag_flip``       detrended lagged correlation r(ℓ) with val loss for every W, peak lags marked;
* ``early_warning``  the watched edge with each causal detector's first alarm and grokking marked;
* ``noise_pc2``      (with ``analysis["pc2"]``) PC2 against its matched-norm null, split-half
                     stability and the noise-transition step (docs/method.md §4.5).

Inputs (all optional, keyword-only):

* ``events``: ``{run: {name: step}}`` or a DataFrame (index run, one column per event). Default:
  ``{"grok": first step with val_acc ≥ 0.9}`` when ``val_acc`` is in the Dataset.
* ``analysis``: a mapping with any of
    - ``"window"``: the W of the single-W figures (default 10 if present, else the smallest);
    - ``"phases"``: output of ``sed_dask.analysis.phases`` (``plateau_start_step``,
      ``collapse_start_step`` per run[, window]) or a DataFrame of intervals with columns
      ``run, phase, start, end`` [``window``];
    - ``"collapse"``: output of ``analysis.collapse_step`` or ``{run: step}``;
    - ``"lag"``: output of ``analysis.lag_sweep`` / ``lag_correlation`` (``r`` on a ``lag`` dim)
      or a DataArray ``r(window, lag[, run])``; without it a plain cubic-detrended version is
      computed here (docs/method.md §6), labelled as such;
    - ``"alarms"``: output of ``analysis.early_warning`` (the causal detectors); or ``"warning"``:
      output of ``analysis.lead_time`` / ``onset`` (``onset_step``) or ``{run: step}``;
      ``"warning_variable"``: the series it was computed on (default edge_ratio);
    - ``"findings"``: a DataFrame (index run) or ``{run: {column: value}}`` for the summary table;
      default: assembled from the Dataset and the inputs above;
    - ``"spectrum_at"``: ``{"run": .., "step": ..}`` of the spectrum figure (default: first run,
      step of its peak edge ratio);
    - ``"pc2"``: output of ``analysis.pc2_summary``: adds the ``noise_pc2`` figure;
    - ``"signals"``: the long table of :func:`warning_signals` (every early-warning candidate):
      adds the ``warning_signals`` figure, a lead table and ``warning_signals.csv``;
    - ``"notes"``: extra lines for the summary;
    - ``"weights"``: a :func:`sed_dask.weight_spectra` Dataset (``"weight_alignment"``: an
      :func:`sed_dask.update_alignment` Dataset): adds the weight-spectra section
      (:mod:`sed_dask.weights.report`: alpha / outlier figures, ESD snapshots with the MP fit, the
      alignment heat map, ``weights_layers.csv``).

:func:`standard_analysis` computes all of these from a Dataset (the demo and ``sed-dask report``).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from sed_dask.report.captions import caption
from sed_dask.report.figures import (
    base,
    edge_phases_figure,
    edge_val_loss_figure,
    finite,
    lag_figure,
    noise_figure,
    phase_intervals,
    run_value,
    signals_figure,
    spectrum_figure,
    warning_figure,
)
from sed_dask.report.provenance import provenance
from sed_dask.store.outputs import ReportTarget

__all__ = [
    "make_report",
    "FIGURES",
    "findings_table",
    "normalize_events",
    "phase_intervals",
    "lag_correlation_simple",
    "standard_analysis",
    "warning_signals",
    "add_g23",
    "SIGNALS",
]

FIGURES = ("spectrum", "edge_phases", "edge_val_loss", "lag_flip", "early_warning")
REQUIRED = ("sigma", "ratio", "k_star", "edge_ratio", "noise_floor")
GROK_ACC = 0.9


def _label(v) -> str:
    return str(v.item() if hasattr(v, "item") else v)


def normalize_events(events, ds: xr.Dataset, runs) -> dict[str, dict[str, float]]:
    """``{run: {event: step}}`` from a mapping or DataFrame; default: grokking from ``val_acc``."""
    out: dict[str, dict[str, float]] = {r: {} for r in runs}
    if events is None:
        if "val_acc" in ds.data_vars:
            for r in runs:
                st, acc = finite(ds["val_acc"].sel(run=r))
                hit = np.nonzero(acc >= GROK_ACC)[0]
                if hit.size:
                    out[r]["grok"] = float(st[hit[0]])
        return out
    if isinstance(events, pd.DataFrame):
        events = {idx: row.to_dict() for idx, row in events.iterrows()}
    for r, ev in events.items():
        if str(r) in out:
            out[str(r)].update({str(k): float(v) for k, v in ev.items() if v is not None and np.isfinite(float(v))})
    return out


def _detrend(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    tn = (t - t.mean()) / (np.ptp(t) or 1.0)  # raw steps make polyfit ill-conditioned
    return v - np.polyval(np.polyfit(tn, v, 3), tn)


def lag_correlation_simple(
    ds: xr.Dataset, *, runs, windows, lags=range(-5, 8), variable="edge_ratio", target="val_loss", min_overlap: int = 6
) -> xr.DataArray:
    """r(run, window, lag): cubic-detrended lagged Pearson r (docs/method.md §6.1–6.2).

    Only the report's fallback when no lag analysis is given: exact-step pairs, lags in the run's
    checkpoint index, ℓ > 0 = ``variable`` leads; lags with fewer than ``min_overlap`` pairs are NaN.
    """
    lags = np.asarray(list(lags), dtype=int)
    out = np.full((len(runs), len(windows), lags.size), np.nan)
    for i, r in enumerate(runs):
        y_all = ds[target].sel(run=r)
        for j, W in enumerate(windows):
            x_all = ds[variable].sel(run=r, window=W)
            xv, yv = np.asarray(x_all.values, float), np.asarray(y_all.values, float)
            ok = np.isfinite(xv) & np.isfinite(yv)
            if ok.sum() < min_overlap + 4:
                continue
            t = np.asarray(ds["step"].values, float)[ok]
            x, y = _detrend(t, xv[ok]), _detrend(t, yv[ok])
            n = x.size
            for k, L in enumerate(lags):
                a, b = (x[: n - L], y[L:]) if L >= 0 else (x[-L:], y[: n + L])
                if a.size >= min_overlap and a.std() > 0 and b.std() > 0:
                    out[i, j, k] = float(np.corrcoef(a, b)[0, 1])
    return xr.DataArray(
        out,
        dims=("run", "window", "lag"),
        coords={"run": list(runs), "window": list(windows), "lag": lags},
        name="r",
        attrs={"long_name": f"lagged Pearson r({variable}, {target}), cubic-detrended", "units": "1"},
    )


def _lag_r(lag, runs) -> xr.DataArray | None:
    if lag is None:
        return None
    r = lag["r"] if isinstance(lag, xr.Dataset) else lag
    if "group" in r.dims:
        r = base(r.to_dataset(name="r"))["r"]
    if "run" not in r.dims:
        r = r.expand_dims(run=list(runs))
    return r


# ------------------------------------------------------------------- standard analysis driver
# Early-warning candidates, fixed BEFORE looking at any outcome (docs/method.md §13). Each maps a
# run's series to one step; lead = grok step − that step (positive = before grokking). "causal"
# says whether the step is known online at that point: the detectors decide at step t from the
# windows up to t; a peak, a segmentation boundary or the tau-collapse after the global peak
# needs the later series, so it is a retrospective marker, not a warning.
SIGNALS = {
    "alarm_below_noise": (
        "causal detector: fixed-k edge below tau = 1 + 2 W^(-2/3) for 2 windows, "
        "armed once it held >= 1.25 tau for 2 windows",
        True,
    ),
    "alarm_peak_drop": (
        "causal detector: fixed-k edge below 0.5 x its running peak for 2 windows, armed "
        "once it held >= 1.25 tau for 2 windows",
        True,
    ),
    "alarm_cusum": (
        "causal detector: CUSUM of log(running peak / edge) - 0.5 above 1.0, armed once the "
        "edge held >= 1.25 tau for 2 windows",
        True,
    ),
    "edge_onset_k10": (
        "companion rule verbatim on the edge ratio: first step with edge > 10 x median(first 3 windows) and > 20",
        True,
    ),
    "edge_peak": ("step of the fixed-k edge's maximum in its first episode", False),
    "edge_decline_start": ("end of the plateau (last window >= 0.85 x the episode median)", False),
    "edge_collapse": ("collapse: first of 2 windows below tau after the edge emerged above 1.25 tau", False),
    "g23_onset_k10": (
        "g23 = sigma_2^2 - sigma_3^2 compression onset: first step with g23 < "
        "median(first 3 windows) / 10 (the companion's 10x rule, direction 'drop')",
        True,
    ),
}


def add_g23(ds: xr.Dataset) -> xr.Dataset:
    """Add ``g23 = σ₂² − σ₃²`` (the companion's gap, docs/method.md §13) to a results Dataset."""
    if "g23" in ds.data_vars or ds.sizes.get("sv", 0) < 3:
        return ds
    s = ds["sigma"]
    g = (s.sel(sv=2) ** 2 - s.sel(sv=3) ** 2).drop_vars("sv", errors="ignore")
    g.attrs = {"long_name": "g23 = sigma_2^2 - sigma_3^2", "units": "parameter units^2"}
    return ds.assign(g23=g)


def warning_signals(
    ds: xr.Dataset, *, windows=None, phases=None, alarms=None, event="val_acc", event_threshold: float = GROK_ACC
) -> pd.DataFrame:
    """Long table (signal, run, window, signal_step, grok_step, lead, causal) for :data:`SIGNALS`.

    Every candidate is reported for every W, including those that never fire (NaN step and lead),
    so that no signal is picked after seeing its lead. Boundary steps are the analyses' own labels
    (phases: window centres; alarms: the step the alarm was decided at).
    """
    from sed_dask import analysis as A
    from sed_dask.analysis.warning import event_index

    ds = add_g23(base(ds))
    ws = [int(w) for w in (windows if windows is not None else ds["window"].values)]
    sub = ds.sel(window=ws)
    runs = [_label(r) for r in ds["run"].values]
    grok = {}
    for r in runs:
        st, y = finite(ds[event].sel(run=r))
        i = event_index(y, threshold=event_threshold)
        grok[r] = float(st[i]) if i is not None else math.nan
    if phases is None:
        phases = A.phases(sub, window=ws)
    if alarms is None:
        alarms = A.early_warning(sub, window=ws, event=None)
    steps = {f"alarm_{d}": alarms["alarm_step"].sel(detector=d, drop=True) for d in alarms["detector"].values}
    steps.update(
        {
            "edge_onset_k10": A.onset(sub, "edge_ratio", k=10.0, baseline=3)["onset_step"],
            "edge_peak": phases["peak_step"],
            "edge_decline_start": phases["collapse_start_step"],
            "edge_collapse": phases["collapse_step"],
            "g23_onset_k10": (
                A.onset(sub, "g23", k=10.0, baseline=3, direction="drop")["onset_step"] if "g23" in sub else None
            ),
        }
    )
    rows = []
    for name, da in steps.items():
        for r in runs:
            for W in ws:
                v = run_value(da, name, r, W) if da is not None else math.nan
                rows.append(
                    {
                        "signal": name,
                        "run": r,
                        "window": W,
                        "signal_step": v,
                        "grok_step": grok[r],
                        "lead": grok[r] - v,
                        "causal": SIGNALS[name][1],
                    }
                )
    return pd.DataFrame(rows)


def standard_analysis(ds: xr.Dataset, *, windows=None, window=None, lags=range(-3, 6), progress: bool = False) -> dict:
    """The demo's queries on a results Dataset, as the ``analysis`` mapping of :func:`make_report`.

    All with the package defaults (sed_dask/analysis/defaults.py, printed in the report): signal
    rank as k* and n_signal; episode phases and the collapse on the fixed-k edge (tau = 1 + 2 W^(-2/3),
    2-window sustain, window-centre steps); the causal early-warning detectors; the lag sweep against
    val loss with flips only where both peaks are resolved and significant (needs >= 2 W and
    ``val_loss``); PC2 against its matched-norm null at the report's W (199 null draws per window;
    needs ``split_half`` and ``delta_norm``); every early-warning candidate against grokking.
    """
    from sed_dask import analysis as A

    ds = base(ds)
    ws = [int(w) for w in (windows if windows is not None else ds["window"].values)]
    W = int(window) if window is not None else (10 if 10 in ws else min(ws))
    sub = ds.sel(window=ws)
    steps = ["signal rank", "phases", "alarms", "lag sweep", "pc2 null", "warning signals"]
    bar = None
    if progress:
        from sed_dask.progress import Bar

        bar = Bar(len(steps), desc="analysis", unit="query")
    out: dict = {"window": W, "windows": ws}

    def tick(name):
        if bar is not None:
            bar.update(1)

    out["signal_rank"] = A.signal_rank(sub)
    out["edge_summary"] = A.edge_summary(sub)
    out["rank_notes"] = A.rank_notes(out["signal_rank"])
    tick("signal rank")
    out["phases"] = A.phases(sub)
    out["collapse"] = out["phases"][["collapse_step", "tau_value", "edge_k"]]
    tick("phases")
    out["alarms"] = A.early_warning(sub)
    tick("alarms")
    if len(ws) >= 2 and "val_loss" in ds.data_vars:
        out["lag"] = A.lag_sweep(sub, windows=ws, lags=lags)
        out["lag_flips"] = A.lag_flips(out["lag"])
        out["lag_rejected"] = A.lag_flips(out["lag"], rejected=True)
    tick("lag sweep")
    if "split_half" in ds.data_vars and "delta_norm" in ds.data_vars:
        out["pc2"] = A.pc2_summary(ds.sel(window=[W]), n_null=199)
    tick("pc2 null")
    if "val_acc" in ds.data_vars:
        out["signals"] = warning_signals(sub, windows=ws, phases=out["phases"], alarms=out["alarms"])
    tick("warning signals")
    if bar is not None:
        bar.close()
    return out


def definitions(ds: xr.Dataset, window: int, analysis: dict) -> list[str]:
    """The definitions and thresholds a reader needs to judge every number shown (from the defaults used)."""
    from sed_dask.analysis.defaults import ARM, SUSTAIN, describe_tau
    from sed_dask.analysis.detectors import DEFAULTS as D

    ws = [int(w) for w in ds["window"].values]
    taus = ", ".join(describe_tau("auto", w) for w in ws)
    lines = [
        "Signal rank: k* = argmax_k sigma_k/sigma_(k+1) over the k with sigma_k >= the MP noise floor "
        "(the edge location); n_signal = the number of values a sequential Wishart noise test (alpha 0.01, "
        "isotropic noise) calls signal. Both as the mode over windows.",
        "Edge series: sigma_k/sigma_(k+1) at a fixed k per run and W (the mode of k*), so a change of k* "
        "cannot move a boundary.",
        f"Collapse: first of {SUSTAIN} windows with the edge below tau after it first held >= {ARM:g} tau; rebound: "
        f"first of {SUSTAIN} windows back >= {ARM:g} tau after that; {taus}. Phase steps are window centres.",
        f"Alarms (causal: decided at step t from windows up to t): below_noise (edge < tau for {SUSTAIN} windows), "
        f"peak_drop (edge < {D['drop']:g} x running peak for {SUSTAIN} windows), cusum (CUSUM of log(peak/edge) - "
        f"{D['drift']:g} > {D['h']:g}); all armed once the edge held >= {ARM:g} tau for {SUSTAIN} windows. "
        f"Lead = grok step (first val_acc >= {GROK_ACC:g}) - alarm step.",
    ]
    if "lag" in analysis:
        lag = analysis["lag"]
        lines.append(
            f"Lag: detrended Pearson r(edge_ratio at t, val_loss at t + l) over lags "
            f"{int(lag['lag'].min())}..{int(lag['lag'].max())} checkpoints; peak = most negative r; a "
            "peak on the grid edge is unresolved; p from 999 phase-randomised val-loss series (peak over "
            "the whole grid); a lag flip needs both peaks resolved and p <= 0.05."
        )
    if isinstance(analysis.get("pc2"), xr.Dataset):
        lines.append(
            f"PC2 noise transition: the first of {SUSTAIN} windows with PC2 not above its matched-norm null "
            "95% quantile after PC2 held above it; 'none' when PC2 never rose above its null."
        )
    lines.append(
        f"The table and the single-W figures are at W = {window}; the method is written down in "
        "docs/method.md of the sed_dask repository."
    )
    return lines


def _seed_lines(df: pd.DataFrame, ds: xr.Dataset) -> list[str]:
    """Mean ± std over seeds of the table's main columns, as papers report them (>= 2 known seeds)."""
    if "seed" not in ds.coords:
        return []
    seeds = {str(r): int(s) for r, s in zip(ds["run"].values, ds["seed"].values) if int(s) >= 0}
    rows = [r for r in df.index if str(r) in seeds]
    if len(rows) < 2 or len({seeds[str(r)] for r in rows}) < len(rows):
        return []
    out = []
    for col in ("peak_edge", "collapse_step", "alarm_step", "grok_step", "lead", "final_val_loss"):
        if col not in df.columns:
            continue
        v = pd.to_numeric(df.loc[rows, col], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if v.size >= 2:
            head, fmt = _COLUMNS.get(col, (col, "{:.3g}"))
            out.append(
                f"{head}: {fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))} (mean ± sample std over {v.size} seeds)"
            )
    return ["Across seeds: " + "; ".join(out)] if out else []


# ---------------------------------------------------------------------------- findings table
_COLUMNS = {  # column -> (header, format)
    "window": ("W", "{:.0f}"),
    "k_star": ("k* (mode)", "{:.0f}"),
    "n_signal": ("n_signal (mode)", "{:.0f}"),
    "edge_k": ("edge k", "{:.0f}"),
    "peak_edge": ("peak edge", "{:.3f}"),
    "peak_step": ("peak step", "{:.0f}"),
    "collapse_step": ("collapse step", "{:.0f}"),
    "rebound_step": ("rebound step", "{:.0f}"),
    "alarm_step": ("first alarm step", "{:.0f}"),
    "alarm_detector": ("first alarm by", "{}"),
    "grok_step": ("grok step", "{:.0f}"),
    "lead": ("lead: grok - alarm", "{:.0f}"),
    "peak_lag": ("peak lag (ckpts)", "{:+.0f}"),
    "noise_transition_step": ("PC2 noise transition", "{:.0f}"),
    "final_val_loss": ("final val loss", "{:.4f}"),
}


def findings_table(ds: xr.Dataset, *, runs, window, events, analysis, lag_r=None) -> pd.DataFrame:
    """One row per run at ``window``: k* and n_signal (modes), the edge's k, peak, collapse and rebound
    (``analysis["phases"]``), the first causal alarm and its detector (``analysis["alarms"]``), grok,
    lead = grok - first alarm, the peak lag when resolved and significant (else why not), the PC2
    noise transition (or why none), final val loss."""
    from sed_dask.analysis import mode_rank

    rows = {}
    lag = analysis.get("lag")
    ph = analysis.get("phases")
    alarms = analysis.get("alarms")
    for r in runs:
        row = {"window": window}
        for col, var in (("k_star", "k_star"), ("n_signal", "n_signal")):
            if var in ds.data_vars:
                row[col] = float(mode_rank(ds[var].sel(run=[r], window=[window])).values.ravel()[0])
        if isinstance(ph, xr.Dataset):
            for col, v in (
                ("edge_k", "edge_k"),
                ("peak_edge", "peak_value"),
                ("peak_step", "peak_step"),
                ("collapse_step", "collapse_step"),
                ("rebound_step", "rebound_step"),
            ):
                row[col] = run_value(ph, v, r, window)
        else:
            st, e = finite(ds["edge_ratio"].sel(run=r, window=window))
            row["peak_edge"] = float(e.max()) if e.size else math.nan
            row["peak_step"] = float(st[int(np.argmax(e))]) if e.size else math.nan
            row["collapse_step"] = run_value(analysis.get("collapse"), "collapse_step", r, window)
        row["grok_step"] = events.get(r, {}).get("grok", math.nan)
        if isinstance(alarms, xr.Dataset):
            a = alarms["alarm_step"].sel(run=r, window=window)
            if "group" in a.dims:
                a = a.isel(group=0)
            vals = np.asarray(a.values, dtype=float)
            if np.isfinite(vals).any():
                i = int(np.nanargmin(vals))
                row["alarm_step"] = float(vals[i])
                row["alarm_detector"] = str(a["detector"].values[i])
            else:
                row["alarm_step"], row["alarm_detector"] = math.nan, "none"
            row["lead"] = row["grok_step"] - row["alarm_step"]
        elif analysis.get("warning") is not None:
            row["alarm_step"] = run_value(analysis.get("warning"), "onset_step", r, window)
            row["lead"] = row["grok_step"] - row["alarm_step"]
        if isinstance(lag, xr.Dataset) and "peak_lag" in lag:
            pl = run_value(lag, "peak_lag", r, window)
            if "peak_resolved" in lag and not run_value(lag, "peak_resolved", r, window):
                row["peak_lag"] = f"unresolved ({pl:+.0f} = grid edge)" if np.isfinite(pl) else "—"
            elif "peak_significant" in lag and not run_value(lag, "peak_significant", r, window):
                row["peak_lag"] = f"{pl:+.0f} (not significant, p = {run_value(lag, 'peak_p_value', r, window):.2g})"
            else:
                row["peak_lag"] = pl
        elif lag_r is not None and window in lag_r["window"].values:
            y = np.asarray(lag_r.sel(run=r, window=window).values, dtype=float)
            row["peak_lag"] = float(lag_r["lag"].values[np.nanargmin(y)]) if np.isfinite(y).any() else math.nan
        pc2 = analysis.get("pc2")
        if isinstance(pc2, xr.Dataset):
            t = run_value(pc2, "noise_transition_step", r, window)
            kind = run_value(pc2, "transition_kind", r, window)
            row["noise_transition_step"] = (
                t
                if np.isfinite(t)
                else {0: "none: PC2 never above its null", 2: "none: PC2 stays above"}.get(
                    int(kind) if np.isfinite(kind) else -1, "—"
                )
            )
        if "val_loss" in ds.data_vars:
            _, vl = finite(ds["val_loss"].sel(run=r))
            row["final_val_loss"] = float(vl[-1]) if vl.size else math.nan
        rows[r] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "run"
    return df.dropna(axis=1, how="all")


def _fmt(col, v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, (int, float, np.integer, np.floating)):
        spec = _COLUMNS.get(col, (col, "{:.4g}"))[1]
        return spec.format(float(v))
    return str(v)


def _table_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = ["run"] + [_COLUMNS.get(c, (c,))[0] for c in df.columns]
    body = [[str(idx)] + [_fmt(c, row[c]) for c in df.columns] for idx, row in df.iterrows()]
    return head, body


def lead_table(sig: pd.DataFrame) -> pd.DataFrame:
    """Wide view of :func:`warning_signals`: one row per (signal, W), one lead column per run."""
    t = sig.pivot_table(index=["signal", "window"], columns="run", values="lead", dropna=False)
    order = {k: i for i, k in enumerate(SIGNALS)}
    t = t.sort_index(key=lambda ix: ix.map(order) if ix.name == "signal" else ix)
    t.index = [f"{s}{'' if SIGNALS.get(s, ('', True))[1] else ' [r]'} (W={w})" for s, w in t.index]
    t.index.name = "signal"
    return t


def _plain_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    body = [
        [str(i)] + ["—" if not np.isfinite(v) else f"{v:+.0f}" for v in row]
        for i, row in zip(df.index, df.to_numpy(dtype=float))
    ]
    return head, body


def _markdown(
    df, figures: dict[str, Path], title: str, notes: list[str], extra=None, *, captions=None, definitions=(), prov=()
) -> str:
    head, body = _table_rows(df)
    lines = [f"# {title}", "", "## Findings", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    for cap, t in (extra or {}).items():
        h, b = _plain_rows(t)
        lines += ["", f"**{cap}**", "", "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += ["| " + " | ".join(r) + " |" for r in b]
    if definitions:
        lines += ["", "## Definitions and thresholds", ""] + [f"- {n}" for n in definitions]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines.append("")
    for name, p in figures.items():
        t, text = (captions or {}).get(name, (name.replace("_", " "), ""))
        lines += [f"## {t}", "", f"![{t}]({p.name})", ""] + ([f"*{text}*", ""] if text else [])
    if prov:
        lines += ["## How this report was made", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in prov]
        lines.append("")
    return "\n".join(lines)


def _html_table(head, body) -> str:
    esc = html.escape
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<div class='scroll'><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>"


def _html(
    df, figures: dict[str, Path], title: str, notes: list[str], extra=None, *, captions=None, definitions=(), prov=()
) -> str:
    esc = html.escape
    tables = (
        "<h2>Findings</h2>"
        + _html_table(*_table_rows(df))
        + "".join(f"<h3>{esc(cap)}</h3>" + _html_table(*_plain_rows(t)) for cap, t in (extra or {}).items())
    )
    figs = ""
    for n, p in figures.items():
        t, text = (captions or {}).get(n, (n.replace("_", " "), ""))
        stop = "" if t.endswith(("?", ".", "!")) else "."
        figs += (
            f'<figure id="{esc(n)}"><img src="{esc(p.name)}" alt="{esc(t)}"><figcaption><b>{esc(t)}{stop}</b> '
            f"{esc(text)}</figcaption></figure>"
        )
    defs = (
        ("<h2>Definitions and thresholds</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in definitions) + "</ul>")
        if definitions
        else ""
    )
    li = ("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else ""
    prov_html = (
        (
            "<h2>How this report was made</h2><table class='prov'><tbody>"
            + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in prov)
            + "</tbody></table>"
        )
        if prov
        else ""
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;line-height:1.4}"
        "table{border-collapse:collapse;font-size:.92em}div.scroll{overflow-x:auto}"
        "th,td{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "th{background:#eef}td:first-child{text-align:left}img{max-width:100%}"
        "table.prov th,table.prov td{text-align:left;vertical-align:top}table.prov th{white-space:nowrap}"
        "figure{margin:2em 0}figcaption{color:#333;max-width:60em}</style></head><body>"
        f"<h1>{esc(title)}</h1>{tables}{defs}{li}"
        f"<h2>Figures</h2>{figs}{prov_html}</body></html>"
    )


# ------------------------------------------------------------------------------------ driver
def analysis_settings(ds: xr.Dataset, window: int, analysis: dict) -> dict[str, str]:
    """The analysis settings behind the report's numbers, from the defaults the queries used."""
    from sed_dask.analysis.defaults import ARM, PLATEAU, SUSTAIN, tau_value
    from sed_dask.analysis.detectors import DEFAULTS as D

    ws = [int(w) for w in ds["window"].values]
    out = {
        "collapse threshold tau": ", ".join(f"W={w}: {tau_value('auto', w):.3f}" for w in ws) + " (1 + 2 W^(-2/3))",
        "plateau / arm / sustain": f"{PLATEAU:g} x median edge / {ARM:g} tau / {SUSTAIN} windows",
        "detectors": f"below_noise, peak_drop (drop {D['drop']:g}), cusum (drift {D['drift']:g}, h {D['h']:g})",
        "grok step": f"first step with val_acc >= {GROK_ACC:g}",
        "table window": f"W = {window}",
    }
    lag = analysis.get("lag")
    if isinstance(lag, xr.Dataset) and "lag" in lag.dims:
        out["lag grid"] = f"{int(lag['lag'].min())} .. {int(lag['lag'].max())} checkpoints"
    return out


def _default_window(windows, analysis) -> int:
    if analysis.get("window") is not None:
        return int(analysis["window"])
    return 10 if 10 in windows else int(min(windows))


def _spacing(ds, run) -> float | None:
    if "delta_span" not in ds.coords:
        return None
    v = np.asarray(ds["delta_span"].sel(run=run).values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.median(v)) if v.size else None


def make_report(
    ds: xr.Dataset,
    out_dir,
    *,
    runs=None,
    windows=None,
    events=None,
    analysis=None,
    title: str = "Spectral Edge Dynamics report",
    dpi: int = 120,
    overwrite: bool = False,
    command: str | None = None,
) -> dict[str, Path]:
    """Write the figures, ``summary.html``, ``summary.md`` and ``findings.csv`` to ``out_dir``.

    Each figure gets a caption saying what it shows and how to read it; the summary gives the
    definitions and thresholds used and how the report was made (data, settings, package versions,
    and ``command``: the command line or call that made it).

    ``out_dir`` must be new, empty, or (with ``overwrite=True``) an earlier report; the report is
    built in a sibling folder and moved into place complete (:class:`sed_dask.store.outputs.ReportTarget`).

    Returns ``{name: path}`` for every file written (figure names in :data:`FIGURES`, plus
    ``html``, ``markdown``, ``findings``). Figures whose inputs are missing (e.g. no
    ``val_loss``) are skipped and listed in the summary's notes.
    """
    ds, runs, windows = _checked_selection(ds, runs, windows)
    analysis = dict(analysis or {})
    W = _default_window(windows, analysis)
    ev = normalize_events(events, ds, runs)
    staging = ReportTarget(out_dir, overwrite=overwrite)  # refuses a folder of other files up front
    out = Path(staging.path)
    written: dict[str, Path] = {}
    save = _saver(out, dpi, written)
    notes: list[str] = []
    r_da = _edge_figures(ds, save, runs, windows, W, ev, analysis, notes)
    wts, wfiles = analysis.get("weights"), {}
    if isinstance(wts, xr.Dataset):  # weight spectra over the trajectory (sed_dask.weights)
        from sed_dask.weights.report import weight_section

        wnotes, wfiles = weight_section(wts, save, out, events=ev, alignment=analysis.get("weight_alignment"))
        notes.extend(wnotes)
    fnd = analysis.get("findings")
    if fnd is None:
        df = findings_table(ds, runs=runs, window=W, events=ev, analysis=analysis, lag_r=r_da)
    else:
        df = fnd if isinstance(fnd, pd.DataFrame) else pd.DataFrame.from_dict(fnd, orient="index")
    notes[:0] = _seed_lines(df, ds)
    notes.extend(str(n) for n in analysis.get("rank_notes", ()))
    notes.extend(_lag_rejection_notes(analysis.get("lag_rejected")))
    figs = dict(written)
    written.update(wfiles)
    written["findings"] = out / "findings.csv"
    df.to_csv(written["findings"])
    extra = _signal_tables(analysis.get("signals"), out, written, notes)
    notes.extend(str(n) for n in analysis.get("notes", ()))
    text = {
        "title": title,
        "notes": notes,
        "extra": extra,
        "captions": {n: caption(n, window=W, grok_acc=GROK_ACC) for n in figs},
        "definitions": definitions(ds, W, analysis),
        "prov": provenance(ds, command=command, settings=analysis_settings(ds, W, analysis)),
    }
    written.update(_write_summaries(out, df, figs, text))
    return staging.commit(written)


def _checked_selection(ds, runs, windows):
    """``(base Dataset, runs, windows)`` of the report, refusing what the Dataset does not hold."""
    missing = [v for v in REQUIRED if v not in ds.data_vars]
    if missing:
        raise ValueError(f"make_report: the results Dataset lacks {missing} (docs/result_schema.md)")
    ds = base(ds)
    all_runs = [_label(r) for r in ds["run"].values]
    runs = all_runs if runs is None else [str(r) for r in runs]
    bad = sorted(set(runs) - set(all_runs))
    if bad:
        raise ValueError(f"make_report: runs {bad} not in the Dataset (has {all_runs})")
    all_w = [int(w) for w in ds["window"].values]
    windows = all_w if windows is None else [int(w) for w in windows]
    if set(windows) - set(all_w):
        raise ValueError(f"make_report: windows {sorted(set(windows) - set(all_w))} not in {all_w}")
    return ds, runs, windows


def _saver(out: Path, dpi: int, written: dict):
    """``save(name, figure)``: write ``<name>.png`` into the report and record it in ``written``."""

    def save(name, fig):
        p = out / f"{name}.png"
        fig.savefig(p, dpi=dpi)
        written[name] = p

    return save


def _spectrum_at(ds, analysis: dict, runs, W: int) -> tuple[str, int]:
    """The (run, step) of the spectrum figure: as asked, else the first run's largest edge ratio."""
    at = analysis.get("spectrum_at") or {}
    run0 = str(at.get("run", runs[0]))
    if "step" in at:
        return run0, int(at["step"])
    st, e = finite(ds["edge_ratio"].sel(run=run0, window=W))
    if not e.size:
        raise ValueError(f"make_report: run {run0!r} has no finite edge ratio at W={W}")
    return run0, int(st[int(np.argmax(e))])


def _edge_figures(ds, save, runs, windows, W: int, ev, analysis: dict, notes: list):
    """Save the spectral-edge figures in the summary's order; returns the lag correlations used (or None)."""
    run0, step0 = _spectrum_at(ds, analysis, runs, W)
    save("spectrum", spectrum_figure(ds, run=run0, step=step0, window=W))
    save(
        "edge_phases",
        edge_phases_figure(
            ds, runs=runs, window=W, phases=analysis.get("phases"), events=ev, collapse=analysis.get("collapse")
        ),
    )
    r_da = _loss_and_lag_figures(ds, save, runs, windows, W, ev, analysis, notes)
    alarms = analysis.get("alarms")
    save(
        "early_warning",
        warning_figure(
            ds,
            runs=runs,
            window=W,
            variable=str(analysis.get("warning_variable", "edge_ratio")),
            events=ev,
            warning=analysis.get("warning"),
            collapse=analysis.get("collapse"),
            alarms=alarms if isinstance(alarms, xr.Dataset) else None,
        ),
    )
    pc2 = analysis.get("pc2")
    if isinstance(pc2, xr.Dataset):
        save("noise_pc2", noise_figure(pc2, runs=runs, window=W, events=ev))
    sig = analysis.get("signals")
    if isinstance(sig, pd.DataFrame) and not sig.empty:
        save("warning_signals", signals_figure(add_g23(ds), runs=runs, window=W, signals=sig, events=ev))
    return r_da


def _loss_and_lag_figures(ds, save, runs, windows, W: int, ev, analysis: dict, notes: list):
    """Edge vs validation loss and the lag figure (the lag computed here when not given and a loss exists)."""
    has_loss = "val_loss" in ds.data_vars
    if has_loss:
        save("edge_val_loss", edge_val_loss_figure(ds, runs=runs, window=W, events=ev))
    r_da = _lag_r(analysis.get("lag"), runs)
    computed = r_da is None and has_loss
    if computed:
        r_da = lag_correlation_simple(ds, runs=runs, windows=windows)
        notes.append(
            "Lag correlations computed by the report's fallback (cubic detrend, "
            "lags −5…+7 checkpoints, argmin r as the peak)."
        )
    if r_da is not None:
        lag = analysis.get("lag")
        save(
            "lag_flip",
            lag_figure(
                r_da,
                runs=runs,
                windows=windows,
                spacing=_spacing(ds, runs[0]),
                computed_here=computed,
                peaks=lag if isinstance(lag, xr.Dataset) else None,
            ),
        )
    if not has_loss:
        notes.append(
            "No val_loss in the Dataset: the edge-vs-loss figure"
            + ("" if r_da is not None else " and the lag figure")
            + " were skipped."
        )
    return r_da


def _lag_rejection_notes(rej) -> list[str]:
    """Notes on lag sign changes the analysis did not accept as flips (``analysis["lag_rejected"]``)."""
    if not isinstance(rej, pd.DataFrame) or not len(rej):
        return []
    out = []
    bad = rej[rej["status"] != "flip"] if "status" in rej else rej.iloc[0:0]
    if len(bad):
        out.append(
            "Lag sign changes that are not flips: "
            + "; ".join(
                f"{row['run']} W={row['window_a']}->{row['window_b']}: {row['reason']}" for _, row in bad.iterrows()
            )
        )
    if "status" in rej and not (rej["status"] == "flip").any():
        out.append("No lag flip: no pair of W has resolved, significant peaks of opposite sign.")
    return out


def _signal_tables(sig, out: Path, written: dict, notes: list) -> dict:
    """Write ``warning_signals.csv`` and return the lead table for the summary (none without signals)."""
    if not isinstance(sig, pd.DataFrame) or sig.empty:
        return {}
    p = out / "warning_signals.csv"
    sig.to_csv(p, index=False)
    written["signals"] = p
    notes.append(
        "Warning candidates (all defined before looking at any outcome; none dropped): "
        + "; ".join(f"{k}: {d}{'' if c else ' [retrospective]'}" for k, (d, c) in SIGNALS.items())
    )
    return {
        "Early-warning candidates: lead = grok step − signal step (steps; negative = after "
        "grokking; — = never fired; [r] = retrospective marker, not a warning)": lead_table(sig)
    }


def _write_summaries(out: Path, df, figs: dict, text: dict) -> dict[str, Path]:
    """Write ``summary.md`` and ``summary.html`` (``text``: title, notes, extra tables, captions, ...)."""
    args = (df, figs, text["title"], text["notes"], text["extra"])
    kw = dict(captions=text["captions"], definitions=text["definitions"], prov=text["prov"])
    md, html = out / "summary.md", out / "summary.html"
    md.write_text(_markdown(*args, **kw), encoding="utf-8")
    html.write_text(_html(*args, **kw), encoding="utf-8")
    return {"markdown": md, "html": html}
