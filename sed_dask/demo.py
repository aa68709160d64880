"""End-to-end demo: train → ingest → spectra → analysis → report (``sed-dask demo``).

Shows every stage on a real trajectory (a small transformer grokking (a + b) mod 97, see
:mod:`sed_dask.demo_train`) and on a real Dask cluster (a temporary LocalCluster of 2 single-thread
worker processes unless a scheduler is given), so the demo exercises what a user would run.

Layout under ``out_dir``: ``checkpoints/seed{S}/`` (demo_train; finished runs are reused),
``trajectory.zarr`` (ingest, all seeds, with metrics), ``results.zarr`` (spectrum),
``report/`` (figures, summary.html/.md, findings.csv, warning_signals.csv) and ``findings.json``.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "WINDOWS", "main"]

# W values per demo size: the quick run has 35 deltas, the default one 50
WINDOWS = {"quick": (5, 10, 15), "default": (5, 10, 20)}
LOCAL_CLUSTER = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
_FINGERPRINT = "trajectory.source.json"


def _num(v):
    """JSON-safe number: NaN → None, integral floats → int."""
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None
    return int(v) if v.is_integer() else v


def _fresh_store(out: Path, train_summary: dict) -> Path:
    """The trajectory store, emptied when the checkpoints it came from were retrained.

    ingest skips steps it already holds, so a store built from a different training config would
    otherwise silently keep the old weights.
    """
    store = out / "trajectory.zarr"
    fp = {r: {k: s[k] for k in ("seed", "config", "format", "n_checkpoints")}
          for r, s in train_summary["runs"].items()}
    fp_path = out / _FINGERPRINT
    old = json.loads(fp_path.read_text()) if fp_path.exists() else None
    if store.exists() and (old is None or any(old.get(r) != v for r, v in fp.items())):
        shutil.rmtree(store)
    fp_path.write_text(json.dumps(fp, indent=1))
    return store


def _findings(ds, analysis: dict, train_summary: dict, windows, timings: dict, dashboard) -> dict:
    """The machine-readable findings: per-run numbers, every warning candidate's lead, lag flips."""
    from .figures import finite, run_value
    from .report import SIGNALS, add_g23

    ds_g = add_g23(ds)
    W = analysis["window"]
    sig = analysis.get("signals")
    runs_out = {}
    for r in [str(x) for x in ds["run"].values]:
        tr = train_summary["runs"].get(r, {})
        k = ds["k_star"].sel(run=r, window=W).values
        k = k[np.isfinite(k)]
        row = {
            "k_star_mode": run_value(analysis["signal_rank"], "k_mode", r, W),
            "k_star_range": [_num(k.min()), _num(k.max())] if k.size else None,
            "peak_step": run_value(analysis["phases"], "peak_step", r, W),
            "peak_edge": run_value(analysis["phases"], "peak_value", r, W),
            "plateau_start_step": run_value(analysis["phases"], "plateau_start_step", r, W),
            "collapse_start_step": run_value(analysis["phases"], "collapse_start_step", r, W),
            "collapse_step": run_value(analysis["collapse"], "collapse_step", r, W),
            "collapse_tau": run_value(analysis["collapse"], "tau", r, W),
            "grok_step": tr.get("grok_step"),
            "memorize_step": tr.get("memorize_step"),
            "final_val_acc": tr.get("final_val_acc"),
        }
        row = {key: (v if isinstance(v, list) else _num(v)) for key, v in row.items()}
        # the companion's descriptive statistic (sed_spec §13.2): g23(earliest window) / g23(at grok)
        if "g23" in ds_g and row["grok_step"] is not None:
            st, g = finite(ds_g["g23"].sel(run=r, window=W))
            at = g[st <= row["grok_step"]]
            row["g23_compression_at_grok"] = _num(g[0] / at[-1]) if at.size and at[-1] > 0 else None
        row["k_star_by_window"] = {int(w): _num(run_value(analysis["signal_rank"], "k_mode", r, int(w)))
                                   for w in windows}
        if sig is not None:
            leads = {}
            for name in SIGNALS:
                s = sig[(sig.signal == name) & (sig.run == r)]
                leads[name] = {int(w): {"step": _num(st), "lead": _num(ld)}
                               for w, st, ld in zip(s.window, s.signal_step, s.lead)}
            row["warning"] = leads
        runs_out[r] = row
    lag = {}
    if "lag" in analysis:
        sw = analysis["lag"]
        ends = (int(sw["lag"].min()), int(sw["lag"].max()))
        for r in runs_out:
            lag[r] = {}
            for w in windows:
                pl = _num(run_value(sw, "peak_lag", r, int(w)))
                # a peak on the edge of the lag grid is no located extremum: its sign means little
                lag[r][int(w)] = {"peak_lag": pl, "peak_r": _num(run_value(sw, "peak_r", r, int(w))),
                                  "at_lag_grid_edge": pl in ends}
        flips = analysis["lag_flips"]
        lag_flip_rows = json.loads(flips.to_json(orient="records")) if len(flips) else []
    else:
        lag_flip_rows = []
    return {
        "window": W,
        "windows": [int(w) for w in windows],
        "grok_definition": "first checkpoint with val_acc >= 0.9",
        "lead_definition": "grok_step - signal_step (positive = before grokking; null = signal never fired)",
        "signals": {k: {"definition": d, "causal": c} for k, (d, c) in SIGNALS.items()},
        "runs": runs_out,
        "lag": {"per_run": lag, "flips": lag_flip_rows,
                "definition": "cubic-detrended lagged Pearson r(edge_ratio, val_loss); peak = argmin r; "
                              "positive lag = edge ratio leads (checkpoint units)"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "dashboard": dashboard,
    }


def _summary_lines(f: dict) -> list[str]:
    W = f["window"]
    lines = [f"SED demo findings (single-W numbers at W={W}; lead = grok - signal, + = before grokking)"]
    for r, x in f["runs"].items():
        kr = x["k_star_range"]
        lines.append(f"  {r}: k*={x['k_star_mode']} (range {kr[0]}-{kr[1]})  peak edge {x['peak_edge']:.2f} "
                     f"@ {x['peak_step']}  collapse @ {x['collapse_step']}  grok @ {x['grok_step']}"
                     if kr else f"  {r}: no finite k*")
        if "warning" in x:
            leads = ", ".join(f"{n}={v[W]['lead'] if v[W]['lead'] is not None else '—'}"
                              for n, v in x["warning"].items())
            lines.append(f"      leads: {leads}")
    for r, per_w in f["lag"]["per_run"].items():
        lines.append(f"  {r} peak lag by W: " + ", ".join(
            (f"W={w}: {v['peak_lag']:+} (r={v['peak_r']:+.2f}{', grid edge' if v['at_lag_grid_edge'] else ''})"
             if v["peak_lag"] is not None else f"W={w}: —") for w, v in per_w.items()))
    if f["lag"]["per_run"]:
        lines.append("  lag flips (consecutive W, sign of the peak lag): " + (", ".join(
            f"{fl['run']} W={fl['window_a']}->{fl['window_b']} ({fl['peak_lag_a']:+}->{fl['peak_lag_b']:+})"
            for fl in f["lag"]["flips"]) or "none"))
    return lines


def run_demo(out_dir="sed-demo", *, quick: bool = False, client=None, address: str | None = None,
             scheduler_file: str | None = None, windows=None, progress: bool = True,
             local_kwargs: dict | None = None) -> dict:
    """Run the whole pipeline on the grokking demo and return what it wrote and found.

    Returns ``{"out_dir", "checkpoints", "store", "results", "report" ({name: path}), "findings"
    (path of findings.json), "findings_data" (its content), "summary" (printed lines),
    "wall_seconds"}``. Cluster: ``client`` > ``address`` > ``scheduler_file`` > a temporary
    LocalCluster (:data:`LOCAL_CLUSTER`, updated by ``local_kwargs``); it starts after training so
    that training has the cores to itself.
    """
    from .cluster import connect
    from .demo_train import SIZES, SUMMARY_FILE, train_demo_runs
    from .ingest import ingest
    from .recorder import METRICS_FILE
    from .report import make_report, standard_analysis
    from .spectra import spectrum

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    size = "quick" if quick else "default"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print  # stage lines and the summary always; ``progress`` only switches the bars

    t = time.perf_counter()
    say(f"[1/5] training {size} demo runs -> {out / 'checkpoints'} (finished runs are reused)")
    runs = train_demo_runs(out / "checkpoints", quick=quick, progress=progress)
    train_summary = json.loads((out / "checkpoints" / SUMMARY_FILE).read_text())
    timings["train"] = time.perf_counter() - t

    ws = tuple(int(w) for w in (windows or WINDOWS[size]))
    store = _fresh_store(out, train_summary)
    results = out / "results.zarr"
    local = dict(LOCAL_CLUSTER, **(local_kwargs or {}))
    with connect(client, address=address, scheduler_file=scheduler_file, local_kwargs=local) as c:
        dashboard = c.dashboard_link
        say(f"Dask dashboard: {dashboard}  ({len(c.scheduler_info()['workers'])} workers)")
        t = time.perf_counter()
        say(f"[2/5] ingesting {len(runs)} run(s) -> {store}")
        for seed, run_dir in runs.items():
            ingest(str(run_dir), str(store), f"seed{seed}", metrics=str(run_dir / METRICS_FILE), client=c,
                   progress=progress)
        timings["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        say(f"[3/5] spectra for W = {list(ws)} -> {results}")
        ds = spectrum(str(store), windows=ws, client=c, output=str(results), overwrite=True,
                      progress=progress)
        timings["spectrum"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[4/5] analysis: signal rank, phases, collapse, lag sweep, early-warning candidates")
    ds = ds.load()
    analysis = standard_analysis(ds, windows=ws, progress=progress)
    if "lag" in analysis:
        pl, lg = analysis["lag"]["peak_lag"].values, analysis["lag"]["lag"].values
        edge = int(np.isin(pl, (lg.min(), lg.max())).sum())
        analysis["notes"] = [f"{edge} of {pl.size} peak lags (run x W) lie on the edge of the lag grid "
                             f"{lg.min():+d}…{lg.max():+d}: those are no located extrema, and lag flips "
                             "between them say little."]
    timings["analysis"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"[5/5] report -> {out / 'report'}")
    title = f"SED of grokking (a+b) mod {SIZES[size].p}: {len(runs)} seed(s), W = {list(ws)}"
    report = make_report(ds, out / "report", analysis=analysis, title=title, overwrite=True)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    findings = _findings(ds, analysis, train_summary, ws, timings, dashboard)
    fpath = out / "findings.json"
    fpath.write_text(json.dumps(findings, indent=1))
    lines = _summary_lines(findings)
    lines.append(f"report: {report['html']}   findings: {fpath}   ({timings['total']:.0f} s)")
    say("\n".join(lines))
    return {"out_dir": out, "checkpoints": out / "checkpoints", "store": store, "results": results,
            "report": report, "findings": fpath, "findings_data": findings, "summary": lines,
            "wall_seconds": timings["total"]}


def main(argv=None) -> int:
    """``python -m sed_dask.demo [--quick] [-o DIR]``."""
    import argparse

    ap = argparse.ArgumentParser(description="SED demo: train -> ingest -> spectra -> analysis -> report")
    ap.add_argument("--quick", action="store_true", help="1 seed, 700 steps (~1 min)")
    ap.add_argument("-o", "--out-dir", default="sed-demo")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    run_demo(a.out_dir, quick=a.quick, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
