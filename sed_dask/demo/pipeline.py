"""End-to-end demo: train → ingest → spectra → analysis → report (``sed-dask demo``).

Shows every stage on a real trajectory (a small transformer grokking (a + b) mod 97, see
:mod:`sed_dask.demo.train`) and on a real Dask cluster (a temporary LocalCluster of 2 single-thread
worker processes unless a scheduler is given), so the demo exercises what a user would run.

Layout under ``out_dir``: ``checkpoints/seed{S}/`` (demo_train; finished runs are reused),
``trajectory.zarr`` (ingest, all seeds, with metrics), ``results.zarr`` (spectrum),
``report/`` (figures, summary.html/.md, findings.csv, warning_signals.csv) and ``findings.json``.
"""

from __future__ import annotations

import contextlib
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
    fp = {r: {k: s[k] for k in ("seed", "config", "format", "n_checkpoints")} for r, s in train_summary["runs"].items()}
    fp_path = out / _FINGERPRINT
    old = json.loads(fp_path.read_text()) if fp_path.exists() else None
    if store.exists() and (old is None or any(old.get(r) != v for r, v in fp.items())):
        shutil.rmtree(store)
    fp_path.write_text(json.dumps(fp, indent=1))
    return store


def _findings(ds, analysis: dict, train_summary: dict, windows, timings: dict) -> dict:
    """The machine-readable findings: per-run numbers with their definitions, every warning
    candidate's lead, lag peaks with their resolution and significance, accepted and rejected flips."""
    import xarray as xr

    from sed_dask.report.figures import finite, run_value
    from sed_dask.report.summary import SIGNALS, add_g23, definitions

    ds_g = add_g23(ds)
    W = analysis["window"]
    sig = analysis.get("signals")
    rank, ph, alarms = analysis["signal_rank"], analysis["phases"], analysis.get("alarms")
    runs_out = {}
    for r in [str(x) for x in ds["run"].values]:
        tr = train_summary["runs"].get(r, {})
        row = {
            "k_star_mode": run_value(rank, "k_mode", r, W),
            "k_star_mode_freq": run_value(rank, "k_mode_freq", r, W),
            "k_star_interval_90": [_num(run_value(rank, "k_lo", r, W)), _num(run_value(rank, "k_hi", r, W))],
            "n_signal_mode": run_value(rank, "count_mode", r, W),
            "n_signal_interval_90": [_num(run_value(rank, "count_lo", r, W)), _num(run_value(rank, "count_hi", r, W))],
            "edge_k": run_value(ph, "edge_k", r, W),
            "peak_step": run_value(ph, "peak_step", r, W),
            "peak_edge": run_value(ph, "peak_value", r, W),
            "plateau_start_step": run_value(ph, "plateau_start_step", r, W),
            "collapse_start_step": run_value(ph, "collapse_start_step", r, W),
            "collapse_step": run_value(ph, "collapse_step", r, W),
            "rebound_step": run_value(ph, "rebound_step", r, W),
            "tau": run_value(ph, "tau_value", r, W),
            "grok_step": tr.get("grok_step"),
            "memorize_step": tr.get("memorize_step"),
            "final_val_acc": tr.get("final_val_acc"),
        }
        row = {key: (v if isinstance(v, list) else _num(v)) for key, v in row.items()}
        if isinstance(alarms, xr.Dataset):
            a = alarms.sel(run=r, window=W)
            row["alarms"] = {
                str(d): {
                    "step": _num(a["alarm_step"].sel(detector=d)),
                    "lead": _num(a["lead"].sel(detector=d)) if "lead" in a else None,
                }
                for d in a["detector"].values
            }
        pc2 = analysis.get("pc2")
        if pc2 is not None:
            kind = run_value(pc2, "transition_kind", r, W)
            row["pc2_noise_transition"] = {
                "step": _num(run_value(pc2, "noise_transition_step", r, W)),
                "emerge_step": _num(run_value(pc2, "pc2_emerge_step", r, W)),
                "kind": {
                    0: "none: PC2 never above its null",
                    1: "above -> below",
                    2: "none: PC2 stays above its null",
                }.get(int(kind) if np.isfinite(kind) else -1),
            }
        # the companion's descriptive statistic (docs/method.md §13.2): g23(earliest window) / g23(at grok)
        if "g23" in ds_g and row["grok_step"] is not None:
            st, g = finite(ds_g["g23"].sel(run=r, window=W))
            at = g[st <= row["grok_step"]]
            row["g23_compression_at_grok"] = _num(g[0] / at[-1]) if at.size and at[-1] > 0 else None
        row["k_star_by_window"] = {int(w): _num(run_value(rank, "k_mode", r, int(w))) for w in windows}
        row["n_signal_by_window"] = {int(w): _num(run_value(rank, "count_mode", r, int(w))) for w in windows}
        if sig is not None:
            leads = {}
            for name in SIGNALS:
                s = sig[(sig.signal == name) & (sig.run == r)]
                leads[name] = {
                    int(w): {"step": _num(st), "lead": _num(ld)} for w, st, ld in zip(s.window, s.signal_step, s.lead)
                }
            row["warning"] = leads
        runs_out[r] = row
    lag = {}
    flips, rejected = [], []
    if "lag" in analysis:
        sw = analysis["lag"]
        for r in runs_out:
            lag[r] = {}
            for w in windows:
                lag[r][int(w)] = {
                    k: (
                        _num(run_value(sw, k, r, int(w)))
                        if k in ("peak_lag", "peak_r", "peak_p_value")
                        else bool(run_value(sw, k, r, int(w)))
                    )
                    for k in ("peak_lag", "peak_r", "peak_resolved", "peak_p_value", "peak_significant")
                }
        rej = analysis.get("lag_rejected")
        if rej is not None and len(rej):
            rows = json.loads(rej.to_json(orient="records"))
            flips = [x for x in rows if x.get("status") == "flip"]
            rejected = [x for x in rows if x.get("status") != "flip"]
    return {
        "window": W,
        "windows": [int(w) for w in windows],
        "definitions": definitions(ds, W, analysis),
        "grok_definition": "first checkpoint with val_acc >= 0.9",
        "lead_definition": "grok_step - signal_step (positive = before grokking; null = signal never fired)",
        "signals": {k: {"definition": d, "causal": c} for k, (d, c) in SIGNALS.items()},
        "rank_notes": list(analysis.get("rank_notes", ())),
        "runs": runs_out,
        "lag": {
            "per_run": lag,
            "flips": flips,
            "rejected_sign_changes": rejected,
            "definition": "cubic-detrended lagged Pearson r(edge_ratio, val_loss); peak = argmin r; "
            "positive lag = edge ratio leads (checkpoint units); a peak on the grid edge is "
            "unresolved; p from 999 phase-randomised val-loss series; a flip needs both peaks "
            "resolved and significant (p <= 0.05)",
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def _summary_lines(f: dict) -> list[str]:
    W = f["window"]
    lines = [
        f"SED demo findings at W={W} (lead = grok - alarm, + = before grokking; steps of phases are "
        "window centres; definitions in findings.json and the report)"
    ]
    for r, x in f["runs"].items():
        if x["k_star_mode"] is None:
            lines.append(f"  {r}: no finite k*")
            continue
        ki, ci = x["k_star_interval_90"], x["n_signal_interval_90"]
        lines.append(
            f"  {r}: k* = {x['k_star_mode']} in {x['k_star_mode_freq']:.0%} of windows (90%: {ki[0]}-{ki[1]}), "
            f"n_signal = {x['n_signal_mode']} (90%: {ci[0]}-{ci[1]}); edge k = {x['edge_k']}: peak "
            f"{x['peak_edge']:.2f} @ {x['peak_step']}, collapse (< tau {x['tau']:.2f}) @ {x['collapse_step']}, "
            f"rebound @ {x['rebound_step']}; grok @ {x['grok_step']}"
        )
        if "alarms" in x:
            lines.append(
                "      causal alarms: "
                + ", ".join(
                    f"{d} @ {v['step']} (lead {v['lead']:+})"
                    if v["step"] is not None and v["lead"] is not None
                    else (f"{d} @ {v['step']}" if v["step"] is not None else f"{d}: none")
                    for d, v in x["alarms"].items()
                )
            )
        if "pc2_noise_transition" in x:
            t = x["pc2_noise_transition"]
            lines.append(f"      PC2 noise transition: {t['step'] if t['kind'] == 'above -> below' else t['kind']}")
    for r, per_w in f["lag"]["per_run"].items():
        lines.append(
            f"  {r} lag peak by W: "
            + ", ".join(
                (
                    f"W={w}: {v['peak_lag']:+}"
                    + ("" if v["peak_resolved"] else " unresolved (grid edge)")
                    + (
                        ""
                        if not v["peak_resolved"]
                        else (" p=" + (f"{v['peak_p_value']:.2g}" if v["peak_p_value"] is not None else "—"))
                    )
                )
                if v["peak_lag"] is not None
                else f"W={w}: —"
                for w, v in per_w.items()
            )
        )
    if f["lag"]["per_run"]:
        lines.append(
            "  lag flips (both peaks resolved and significant): "
            + (
                ", ".join(
                    f"{fl['run']} W={fl['window_a']}->{fl['window_b']} ({fl['peak_lag_a']:+}->{fl['peak_lag_b']:+})"
                    for fl in f["lag"]["flips"]
                )
                or "none"
            )
            + (
                f"; {len(f['lag']['rejected_sign_changes'])} sign change(s) rejected (see findings.json)"
                if f["lag"]["rejected_sign_changes"]
                else ""
            )
        )
    for n in f.get("rank_notes", []):
        lines.append(f"  note: {n}")
    return lines


def run_demo(
    out_dir="sed-demo",
    *,
    quick: bool = False,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    windows=None,
    progress: bool = True,
    local_kwargs: dict | None = None,
    scheduler: str | None = None,
) -> dict:
    """Run the whole pipeline on the grokking demo and return what it wrote and found.

    Returns ``{"out_dir", "checkpoints", "store", "results", "report" ({name: path}), "findings"
    (path of findings.json), "findings_data" (its content), "summary" (printed lines),
    "wall_seconds"}``. Cluster: ``client`` > ``address`` > ``scheduler_file`` > a temporary
    LocalCluster (:data:`LOCAL_CLUSTER`, updated by ``local_kwargs``); it starts after training so
    that training has the cores to itself. ``scheduler="threads"`` runs everything in this process.
    """
    from sed_dask.cluster.client import connect
    from sed_dask.demo.train import SIZES, SUMMARY_FILE, train_demo_runs
    from sed_dask.report.summary import make_report, standard_analysis
    from sed_dask.results.spectra import spectrum
    from sed_dask.sources.recorder import METRICS_FILE
    from sed_dask.store.ingest import ingest

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
    in_process = scheduler is not None and client is None and not address and not scheduler_file
    where = (
        contextlib.nullcontext(None)
        if in_process
        else connect(client, address=address, scheduler_file=scheduler_file, local_kwargs=local)
    )
    with where as c:
        if c is not None:
            n = len(c.scheduler_info()["workers"])
            say(f"Dask dashboard: {c.dashboard_link}  ({n} workers, live while this runs)")
        else:
            say(f"running in this process (scheduler={scheduler!r})")
        t = time.perf_counter()
        say(f"[2/5] ingesting {len(runs)} run(s) -> {store}")
        for seed, run_dir in runs.items():
            ingest(
                str(run_dir),
                str(store),
                f"seed{seed}",
                metrics=str(run_dir / METRICS_FILE),
                client=c,
                scheduler=scheduler if c is None else None,
                progress=progress,
            )
        timings["ingest"] = time.perf_counter() - t
        t = time.perf_counter()
        say(f"[3/5] spectra for W = {list(ws)} -> {results}")
        ds = spectrum(
            str(store),
            windows=ws,
            client=c,
            scheduler=scheduler if c is None else None,
            output=str(results),
            overwrite=True,
            progress=progress,
        )
        timings["spectrum"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[4/5] analysis: signal rank, phases, collapse, causal alarms, lag sweep, PC2 null")
    ds = ds.load()
    analysis = standard_analysis(ds, windows=ws, progress=progress)
    if "lag" in analysis and "peak_resolved" in analysis["lag"]:
        res = analysis["lag"]["peak_resolved"].values
        analysis["notes"] = [
            f"{int((~res.astype(bool)).sum())} of {res.size} lag peaks (run x W) lie on the edge "
            "of the lag grid: unresolved, so they cannot make a lag flip."
        ]
    timings["analysis"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"[5/5] report -> {out / 'report'}")
    title = f"SED of grokking (a+b) mod {SIZES[size].p}: {len(runs)} seed(s), W = {list(ws)}"
    from sed_dask.report.provenance import invocation

    command = invocation() or f"sed_dask.demo.pipeline.run_demo({str(out)!r}, quick={quick})"
    report = make_report(ds, out / "report", analysis=analysis, title=title, overwrite=True, command=command)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    findings = _findings(ds, analysis, train_summary, ws, timings)
    fpath = out / "findings.json"
    fpath.write_text(json.dumps(findings, indent=1))
    lines = _summary_lines(findings)
    lines.append(f"report: {report['html']}   findings: {fpath}   ({timings['total']:.0f} s)")
    say("\n".join(lines))
    return {
        "out_dir": out,
        "checkpoints": out / "checkpoints",
        "store": store,
        "results": results,
        "report": report,
        "findings": fpath,
        "findings_data": findings,
        "summary": lines,
        "wall_seconds": timings["total"],
    }


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
