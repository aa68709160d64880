"""Early warning of grokking on real training runs (issue 12 item 4, docs/method.md §13).

Trains small transformers on modular arithmetic (``sed_dask.demo.train``) on CPU, one torch thread
per process:

* grokking runs: every ``--tasks`` x ``--seeds`` (default (a+b) mod 97 and (a·b) mod 97, seeds
  0 1 2), the demo configuration (weight decay 1.0) with checkpoints every ``--every`` = 20 steps
  for ``--steps`` = 2000 steps;
* controls: the same configuration with weight decay 0 (``--control-tasks`` x ``--control-seeds``,
  default add x 0 1 2): they memorise the training pairs but do not generalise within the budget
  (checked: a control whose val_acc reaches the grokking threshold is flagged ``control_grokked``).

Then, in this process with the threaded scheduler (no cluster): every run is ingested into
``OUT/trajectory.zarr`` with its metrics (val_loss, val_acc, train_loss, train_acc, ...), the spectra
for W = 5 and 10 go to ``OUT/results.zarr``, and ``OUT/runs.json`` records per run the task, seed,
configuration, grokking step (first evaluation with val_acc >= 0.9), memorisation step (train_acc
>= 0.95), wall time, and the edge-ratio peak and MP collapse step (``collapse_step(tau="auto")``:
first step at/after the peak where the edge ratio falls below 1 + 2 W^(-2/3), 1.43 at W = 10).

Finally :func:`evaluate` runs the causal detectors of ``sed_dask.analysis.early_warning`` on the
results and writes ``OUT/early_warning.md`` / ``OUT/early_warning.json``: per run the first alarm of
each detector, lead = grok step - alarm step, and on the controls whether any alarm fired at all
(a false alarm); the summary also gives the spread of the alarm steps against the spread of the
grok steps and their correlation (an alarm at a fixed step after memorisation has a "lead" too).
Without that function the table carries the grok and collapse columns and says that the detector
columns are pending; nothing here implements a detector.

Usage:
    python benchmarks/early_warning.py --jobs 2                 # train (26 min on 2 shared cores), analyse
    python benchmarks/early_warning.py --skip-train             # reuse finished runs
    python benchmarks/early_warning.py --eval-only              # only the detector table
Data goes to --out (default bench-data/early_warning, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

GROK_WINDOWS = (5, 10)
COLLAPSE_WINDOW = 10


# ------------------------------------------------------------------------------------------ plan
def plan_runs(
    tasks, seeds, control_tasks, control_seeds, *, steps: int, every: int, control_wd: float = 0.0
) -> list[dict]:
    """One entry per run: ``name``, ``task``, ``seed``, ``control``, ``config`` (a DemoConfig)."""
    from sed_dask.demo.train import SIZES, TASKS

    base = replace(SIZES["default"], steps=steps, every=every)
    runs = []
    for task in list(tasks) + list(control_tasks):
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    for task in tasks:
        for s in seeds:
            runs.append(
                dict(
                    name=f"{task}_s{s}",
                    task=task,
                    seed=int(s),
                    control=False,
                    config=replace(base, task=task, seeds=(int(s),)),
                )
            )
    for task in control_tasks:
        for s in control_seeds:
            runs.append(
                dict(
                    name=f"{task}_wd{control_wd:g}_s{s}",
                    task=task,
                    seed=int(s),
                    control=True,
                    config=replace(base, task=task, weight_decay=float(control_wd), seeds=(int(s),)),
                )
            )
    return runs


# -------------------------------------------------------------------------------------- training
def _train_one(job: dict) -> dict:
    from sed_dask.demo.train import train_run

    return train_run(job["run_dir"], seed=job["seed"], config=job["config"], progress=False, threads=1)


def train(runs: list[dict], ckpt_dir: Path, *, jobs: int, skip_train: bool) -> dict[str, dict]:
    """Train (or, with ``skip_train``, only look up) every run; returns ``{name: summary}``.

    Finished runs with the same seed and configuration are reused either way (``train_run``'s
    own check), so a re-run trains only what is missing.
    """
    from sed_dask.demo.train import _previous

    out: dict[str, dict] = {}
    todo = []
    for r in runs:
        run_dir = ckpt_dir / r["name"]
        old = _previous(run_dir, r["seed"], r["config"], "pt")
        if old is not None:
            out[r["name"]] = old
        elif skip_train:
            raise SystemExit(f"--skip-train: no finished run {r['name']} with this configuration in {run_dir}")
        else:
            todo.append(dict(run_dir=run_dir, seed=r["seed"], config=r["config"], name=r["name"]))
    if todo:
        print(
            f"training {len(todo)} run(s) with {jobs} process(es), one torch thread each ({len(out)} reused)",
            flush=True,
        )
    t0 = time.perf_counter()
    if jobs <= 1:
        for j in todo:
            out[j["name"]] = s = _train_one(j)
            _say_trained(j["name"], s, t0)
    elif todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_train_one, j): j["name"] for j in todo}
            for f in as_completed(futs):
                out[futs[f]] = s = f.result()
                _say_trained(futs[f], s, t0)
    return out


def _say_trained(name: str, s: dict, t0: float) -> None:
    print(
        f"  {name:14s} memorised@{s['memorize_step']} grokked@{s['grok_step']} "
        f"final val_acc {s['final_val_acc']:.3f}  {s['wall_seconds']:.0f} s "
        f"({s['ms_per_step']:.0f} ms/step)  [{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )


# ------------------------------------------------------------------------ ingest, spectrum, runs
def _fresh_store(store: Path, fp_path: Path, summaries: dict[str, dict]) -> None:
    """Empty the store when any run was retrained since it was built (ingest skips held steps)."""
    fp = {n: {k: s.get(k) for k in ("seed", "config", "n_checkpoints", "wall_seconds")} for n, s in summaries.items()}
    old = json.loads(fp_path.read_text()) if fp_path.exists() else None
    if store.exists() and (old is None or any(old.get(n) != v for n, v in fp.items())):
        shutil.rmtree(store)
    fp_path.write_text(json.dumps(fp, indent=1))


def build_results(
    runs: list[dict], summaries: dict[str, dict], out: Path, ckpt_dir: Path, windows=GROK_WINDOWS
) -> dict:
    """Ingest every run, compute the spectra, write ``runs.json``; returns the timings."""
    import sed_dask
    from sed_dask.sources.recorder import METRICS_FILE

    store, results = out / "trajectory.zarr", out / "results.zarr"
    _fresh_store(store, out / "store_fingerprint.json", summaries)
    t = time.perf_counter()
    for r in runs:
        run_dir = ckpt_dir / r["name"]
        sed_dask.ingest(
            str(run_dir),
            str(store),
            r["name"],
            metrics=str(run_dir / METRICS_FILE),
            scheduler="threads",
            progress=False,
        )
    t_ingest = time.perf_counter() - t
    print(f"ingested {len(runs)} runs -> {store} ({t_ingest:.0f} s)", flush=True)
    t = time.perf_counter()
    ds = sed_dask.spectrum(
        str(store),
        runs=[r["name"] for r in runs],
        windows=list(windows),
        scheduler="threads",
        output=str(results),
        progress=False,
    )
    t_spec = time.perf_counter() - t
    print(f"spectra W = {list(windows)} -> {results} ({t_spec:.0f} s)", flush=True)
    write_runs_json(
        ds.load(), runs, summaries, out / "runs.json", timings={"ingest_seconds": t_ingest, "spectrum_seconds": t_spec}
    )
    return {"ingest_seconds": t_ingest, "spectrum_seconds": t_spec}


def _num(v):
    v = float(v)
    return None if math.isnan(v) else (int(v) if v == int(v) and abs(v) < 2**53 else v)


def write_runs_json(ds, runs: list[dict], summaries: dict[str, dict], path: Path, *, timings: dict) -> dict:
    """``runs.json``: per run its provenance, grokking/memorisation steps and MP collapse steps."""
    from sed_dask.analysis import collapse_step
    from sed_dask.demo.train import GROK_ACC, MEMORIZE_ACC

    coll = {W: collapse_step(ds, tau="auto", window=W) for W in GROK_WINDOWS}
    entries = {}
    for r in runs:
        s = summaries[r["name"]]
        e = {
            k: s[k]
            for k in (
                "seed",
                "grok_step",
                "memorize_step",
                "final_val_acc",
                "final_train_acc",
                "final_val_loss",
                "n_params",
                "n_checkpoints",
                "ms_per_step",
                "cpu_ms_per_step",
                "wall_seconds",
                "torch_threads",
                "config",
            )
        }
        e.update(task=r["task"], control=r["control"], run_dir=s["run_dir"])
        e["config"] = dict(e["config"], task=r["task"])
        e["control_grokked"] = bool(r["control"] and s["grok_step"] is not None)
        for W, c in coll.items():
            c = c.sel(run=r["name"], window=W)
            e[f"edge_peak_step_W{W}"] = _num(c["peak_step"])
            e[f"edge_peak_value_W{W}"] = _num(c["peak_value"])
            e[f"collapse_step_W{W}"] = _num(c["collapse_step"])
            e[f"collapse_tau_W{W}"] = _num(c["tau"])
        entries[r["name"]] = e
    doc = {
        "grok_definition": f"first evaluation with val_acc >= {GROK_ACC}",
        "memorize_definition": f"first evaluation with train_acc >= {MEMORIZE_ACC}",
        "collapse_definition": "first step at/after the edge-ratio peak with edge_ratio < 1 + 2 W^(-2/3) "
        "(sed_dask.analysis.collapse_step(tau='auto')); retrospective, not causal",
        "windows": list(GROK_WINDOWS),
        **timings,
        "runs": entries,
    }
    path.write_text(json.dumps(doc, indent=1))
    return doc


# ------------------------------------------------------------------------------------ evaluation
def evaluate(results_path, runs_json, *, windows=GROK_WINDOWS, out_dir=None) -> dict:
    """Run ``sed_dask.analysis.early_warning`` on the results and tabulate alarms vs grokking.

    Per run and W: the first alarm step of each detector (``alarm_step(run, window, detector)``,
    NaN where none fired), lead = grok step - alarm step (positive = the alarm came first), and on
    a control any alarm at all counts as a false alarm. Writes ``early_warning.md`` and
    ``early_warning.json`` next to ``runs_json`` (or into ``out_dir``) and returns the JSON content.
    If the detector function does not exist yet, the detector columns are marked pending.
    """
    import numpy as np
    import xarray as xr

    runs_json = Path(runs_json)
    out_dir = Path(out_dir) if out_dir is not None else runs_json.parent
    meta = json.loads(runs_json.read_text())
    runs = meta["runs"]
    try:
        from sed_dask.analysis import early_warning
    except ImportError:
        early_warning = None

    alarms: dict[tuple[str, int], dict[str, float | None]] = {}
    extra: dict[tuple[str, int], dict] = {}
    definitions: dict = {}
    detectors: list[str] = []
    if early_warning is not None:
        ds = xr.open_zarr(str(results_path)).load()
        for W in windows:
            ew = early_warning(ds, window=W, run=list(runs))
            a = ew["alarm_step"]
            if "window" in a.dims:
                a = a.sel(window=W)
            detectors = [str(d) for d in a["detector"].values]
            for name in runs:
                row = a.sel(run=name)
                alarms[(name, W)] = {d: _num(row.sel(detector=d)) for d in detectors}
                extra[(name, W)] = {v: _sel_num(ew[v], name, W) for v in ("edge_k", "event_step") if v in ew.data_vars}
                if "n_alarms" in ew.data_vars:
                    na = ew["n_alarms"].sel(run=name)
                    na = na.sel(window=W) if "window" in na.dims else na
                    extra[(name, W)]["n_alarms"] = {d: int(na.sel(detector=d)) for d in detectors}
            attrs = dict(ew.attrs)
            defs = attrs.pop("definitions", None)
            if isinstance(defs, str):
                try:
                    defs = json.loads(defs).get(f"W{W}", defs)
                except ValueError:
                    pass
            definitions[f"W{W}"] = {
                "detectors": defs,
                **{k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in attrs.items()},
            }

    rows = []
    for name, e in runs.items():
        for W in windows:
            grok = e["grok_step"]
            row = {
                "run": name,
                "task": e["task"],
                "seed": e["seed"],
                "control": e["control"],
                "window": W,
                "memorize_step": e["memorize_step"],
                "grok_step": grok,
                "collapse_step": e.get(f"collapse_step_W{W}"),
                "collapse_lead": (
                    grok - e[f"collapse_step_W{W}"]
                    if grok is not None and e.get(f"collapse_step_W{W}") is not None
                    else None
                ),
            }
            if early_warning is not None:
                row["alarm_step"] = alarms[(name, W)]
                row["lead"] = {
                    d: (grok - v if grok is not None and v is not None else None) for d, v in alarms[(name, W)].items()
                }
                if e["control"]:
                    row["false_alarm"] = {d: v is not None for d, v in alarms[(name, W)].items()}
                row.update(extra[(name, W)])
                if "event_step" in row and row["event_step"] != grok:  # same definition, same metric
                    raise RuntimeError(
                        f"{name} W={W}: early_warning's event_step {row['event_step']} "
                        f"!= grok step {grok} from training"
                    )
            rows.append(row)

    summary = {}
    if early_warning is not None:
        for W in windows:
            for d in detectors:
                g = [r for r in rows if r["window"] == W and not r["control"] and r["grok_step"] is not None]
                leads = [r["lead"][d] for r in g if r["lead"][d] is not None]
                pairs = [(r["alarm_step"][d], r["grok_step"]) for r in g if r["alarm_step"][d] is not None]
                al = [p[0] for p in pairs]
                # does the alarm track the grok step, or fire at a fixed step whatever the grok step?
                corr = (
                    float(np.corrcoef(np.array(pairs, float).T)[0, 1])
                    if len(pairs) >= 3 and np.std(al) > 0 and np.std([p[1] for p in pairs]) > 0
                    else None
                )
                c = [r for r in rows if r["window"] == W and r["control"]]
                summary[f"W{W}/{d}"] = {
                    "grokking_runs": len(g),
                    "alarmed": len(leads),
                    "alarm_before_grok": sum(l > 0 for l in leads),
                    "lead_min": min(leads) if leads else None,
                    "lead_median": float(np.median(leads)) if leads else None,
                    "lead_max": max(leads) if leads else None,
                    "alarm_min": min(al) if al else None,
                    "alarm_max": max(al) if al else None,
                    "grok_min": min(p[1] for p in pairs) if pairs else None,
                    "grok_max": max(p[1] for p in pairs) if pairs else None,
                    "corr_alarm_grok": corr,
                    "controls": len(c),
                    "false_alarms": sum(r["false_alarm"][d] for r in c),
                }
    training = [
        {
            "run": n,
            "task": e["task"],
            "seed": e["seed"],
            "control": e["control"],
            "weight_decay": e["config"]["weight_decay"],
            "memorize_step": e["memorize_step"],
            "grok_step": e["grok_step"],
            "final_train_acc": e["final_train_acc"],
            "final_val_acc": e["final_val_acc"],
            "wall_seconds": e["wall_seconds"],
            "ms_per_step": e["ms_per_step"],
            "cpu_ms_per_step": e["cpu_ms_per_step"],
            "edge_peak_W10": e.get("edge_peak_value_W10"),
            "edge_peak_step_W10": e.get("edge_peak_step_W10"),
        }
        for n, e in runs.items()
    ]
    doc = {
        "detectors_available": early_warning is not None,
        "training": training,
        "status": "ok"
        if early_warning is not None
        else "pending: sed_dask.analysis.early_warning does not exist yet; detector columns not computed",
        "detectors": detectors,
        "definitions": definitions,
        "windows": list(windows),
        "grok_definition": meta["grok_definition"],
        "collapse_definition": meta["collapse_definition"],
        "rows": rows,
        "summary": summary,
    }
    (out_dir / "early_warning.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out_dir / "early_warning.md").write_text(md)
    return doc


def _sel_num(da, run: str, W: int):
    da = da.sel(run=run)
    return _num(da.sel(window=W) if "window" in da.dims else da)


def _cell(v) -> str:
    return "—" if v is None else (f"{v:+d}" if isinstance(v, int) and v < 0 else str(v))


def markdown(doc: dict) -> str:
    """The per-run table (one row per run and W) plus the per-detector summary."""
    dets = doc["detectors"]
    head = ["run", "task", "seed", "control", "W", "memorised", "grok", "MP collapse", "collapse lead"]
    if doc["detectors_available"]:
        for d in dets:
            head += [f"{d} alarm", f"{d} lead"]
    else:
        head += ["detector alarms / leads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        cells = [
            r["run"],
            r["task"],
            str(r["seed"]),
            "yes" if r["control"] else "no",
            str(r["window"]),
            _cell(r["memorize_step"]),
            _cell(r["grok_step"]) if r["grok_step"] is not None else "never",
            _cell(r["collapse_step"]),
            _cell(r["collapse_lead"]),
        ]
        if doc["detectors_available"]:
            for d in dets:
                a = r["alarm_step"][d]
                if r["control"]:
                    cells += [_cell(a), "FALSE ALARM" if a is not None else "no alarm"]
                else:
                    cells += [_cell(a), _cell(r["lead"][d])]
        else:
            cells += ["pending"]
        lines.append("| " + " | ".join(cells) + " |")
    tr = [
        "| run | task | seed | control | wd | memorised | grok | final train / val acc | edge peak W=10 (step) "
        "| wall | ms/step (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in doc.get("training", []):
        pk = t["edge_peak_W10"]
        tr.append(
            f"| {t['run']} | {t['task']} | {t['seed']} | {'yes' if t['control'] else 'no'} | "
            f"{t['weight_decay']:g} | {_cell(t['memorize_step'])} | "
            f"{_cell(t['grok_step']) if t['grok_step'] is not None else 'never'} | "
            f"{t['final_train_acc']:.3f} / {t['final_val_acc']:.3f} | "
            f"{'—' if pk is None else f'{pk:.2f}'} ({_cell(t['edge_peak_step_W10'])}) | "
            f"{t['wall_seconds']:.0f} s | {t['ms_per_step']:.0f} / {t['cpu_ms_per_step']:.0f} |"
        )
    out = [
        "Lead = grok step − alarm step (positive: the alarm came first). On a control any alarm is a "
        "false alarm. Grok: " + doc["grok_definition"] + ". MP collapse: " + doc["collapse_definition"] + ".",
        "",
        *lines,
    ]
    if tr[2:]:
        out = ["Training (one torch thread per run):", "", *tr, "", *out]
    if doc["detectors_available"]:
        out += [
            "",
            "| W / detector | grokking runs alarmed | alarm before grok | lead min / median / max "
            "| alarm steps (grok steps) | r(alarm, grok) | false alarms on controls |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, s in doc["summary"].items():
            r = s.get("corr_alarm_grok")
            out.append(
                f"| {k} | {s['alarmed']}/{s['grokking_runs']} | {s['alarm_before_grok']} | "
                f"{_cell(s['lead_min'])} / {_cell(s['lead_median'])} / {_cell(s['lead_max'])} | "
                f"{_cell(s.get('alarm_min'))}–{_cell(s.get('alarm_max'))} "
                f"({_cell(s.get('grok_min'))}–{_cell(s.get('grok_max'))}) | "
                f"{'—' if r is None else f'{r:+.2f}'} | {s['false_alarms']}/{s['controls']} |"
            )
        for w, defs in doc["definitions"].items():
            d = defs.get("detectors")
            if isinstance(d, dict):
                out += ["", f"Detectors at {w} (tau = {defs.get('tau')}; {defs.get('causal', '')}):"]
                out += [f"* `{k}`: {v}" for k, v in d.items()]
            else:
                out += ["", f"Detector definitions ({w}): " + json.dumps(defs)]
    else:
        out += ["", "Detector columns pending: " + doc["status"] + "."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="bench-data/early_warning", help="output folder (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel training processes, one thread each")
    ap.add_argument("--tasks", nargs="+", default=["add", "mul"], help="grokking tasks (default: add mul)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--control-tasks", nargs="*", default=["add"], help="weight-decay-0 controls (default: add)")
    ap.add_argument("--control-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--control-wd", type=float, default=0.0, help="weight decay of the controls")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=20, help="checkpoint cadence in steps")
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs; fail if one is missing")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate OUT/results.zarr + OUT/runs.json")
    a = ap.parse_args(argv)

    out = Path(a.out)
    if not a.eval_only:
        import torch

        torch.set_num_threads(1)
        out.mkdir(parents=True, exist_ok=True)
        ckpt_dir = out / "checkpoints"
        runs = plan_runs(
            a.tasks, a.seeds, a.control_tasks, a.control_seeds, steps=a.steps, every=a.every, control_wd=a.control_wd
        )
        t0 = time.perf_counter()
        summaries = train(runs, ckpt_dir, jobs=max(1, a.jobs), skip_train=a.skip_train)
        print(f"training done ({time.perf_counter() - t0:.0f} s)", flush=True)
        for r in runs:
            s = summaries[r["name"]]
            if r["control"] and s["grok_step"] is not None:
                print(f"WARNING: control {r['name']} grokked at step {s['grok_step']}", flush=True)
            if not r["control"] and s["grok_step"] is None:
                print(f"WARNING: {r['name']} did not grok within {a.steps} steps", flush=True)
        build_results(runs, summaries, out, ckpt_dir)
    doc = evaluate(out / "results.zarr", out / "runs.json")
    print((out / "early_warning.md").read_text())
    if not doc["detectors_available"]:
        print("NOTE: " + doc["status"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
