"""Weight spectra: WeightWatcher side by side, cost against a Gram pass, and the demo run's layers.

Four parts, in one run (``--parts ww,cost,demo,early``):

ww    the same matrices through ``sed_dask.weights.matrix_spectrum`` and WeightWatcher
      (``ww.WeightWatcher(model).analyze(mp_fit=True)`` on ``nn.Linear`` layers holding them):
      planted MP bulk (+ spikes above / below BBP), a Pareto ESD (alpha = 2.5), iid heavy-tailed
      entries (mu = 1: alpha = 1 + mu/2 = 1.5) and the demo transformer's layers at its last
      checkpoint. WeightWatcher runs in a separate venv (``--ww-python``, default /work/wwvenv/bin/python;
      ``python3 -m venv /work/wwvenv && /work/wwvenv/bin/pip install weightwatcher torch==2.13.0``),
      never in the project's environment; the matrices travel as one .npz.
cost  on the demo store: ``weight_spectra`` (every 2-D tensor of every checkpoint) against one
      ``spectrum`` Gram pass (W = 10), same LocalCluster, timed back to back (best of --repeat).
demo  per seed: the step each layer's outliers first escape the bulk (sustained 2 checkpoints), the
      grokking step (first val_acc >= 0.9), the update/weight alignment (W = 10) and a report with
      the weight-spectra section.
early the same for the first 240 steps checkpointed every 5 steps (``--early``: ``python -m
      sed_dask.demo.train DIR --seeds 0 1 --steps 240 --every 5``, bit-identical to the default
      runs' first 240 steps): which layers' outliers escape first.

The demo runs come from ``python -m sed_dask.demo.train DIR --seeds 0 1`` (default configuration).
Example:
    python benchmarks/weight_spectra.py --runs /tmp/wdemo/runs --work /tmp/wdemo/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WW_SCRIPT = r"""
import json, logging, sys
import numpy as np, torch, weightwatcher as ww
logging.disable(logging.WARNING)
data = np.load(sys.argv[1])
names = list(data.files)
layers = []
for n in names:
    A = data[n]
    lin = torch.nn.Linear(A.shape[1], A.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(A, dtype=torch.float32))
    layers.append(lin)
model = torch.nn.Sequential(*layers)
d = ww.WeightWatcher(model=model).analyze(mp_fit=True, plot=False)
out = {}
by_name = {str(r["name"]): r for _, r in d.iterrows()}
for i, n in enumerate(names):
    if str(i) not in by_name:
        continue  # WeightWatcher skipped the layer
    row = by_name[str(i)]
    out[n] = {k: (float(row[k]) if k in row and row[k] is not None else None)
              for k in ("alpha", "xmin", "D", "num_spikes", "sigma_mp", "bulk_max", "num_pl_spikes", "lambda_max")}
print("JSON" + json.dumps({"version": ww.__version__, "layers": out}))
"""


def planted_matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    m, n, s = 300, 600, 0.05
    crit = s * (m * n) ** 0.25

    def spikes(strengths, seed):
        r = np.random.default_rng(seed)
        U = np.linalg.qr(r.standard_normal((m, len(strengths))))[0]
        V = np.linalg.qr(r.standard_normal((n, len(strengths))))[0]
        return (U * np.asarray(strengths)) @ V.T

    out = {"mp_noise": rng.standard_normal((m, n)) * s}
    out["mp_3_spikes_above_bbp"] = rng.standard_normal((m, n)) * s + spikes([4 * crit, 3 * crit, 2 * crit], 1)
    out["mp_2_spikes_below_bbp"] = rng.standard_normal((m, n)) * s + spikes([0.5 * crit, 0.5 * crit], 2)
    lam = (1 - rng.random(500)) ** (-1 / 1.5)  # Pareto ESD, alpha = 2.5
    U = np.linalg.qr(rng.standard_normal((500, 500)))[0]
    V = np.linalg.qr(rng.standard_normal((800, 500)))[0]
    out["pareto_esd_alpha2.5"] = (U * np.sqrt(lam)) @ V.T
    out["iid_pareto_mu1_alpha1.5"] = (rng.pareto(1.0, (500, 1000)) + 1) * rng.choice([-1.0, 1.0], (500, 1000))
    return out


def demo_matrices(run_dir: Path) -> dict[str, np.ndarray]:
    import torch

    last = max(run_dir.glob("ckpt_*.pt"))
    obj = torch.load(last, weights_only=True, map_location="cpu")
    sd = obj.get("model_state_dict", obj)
    return {
        f"demo:{k}": v.double().numpy().reshape(v.shape[0], -1)
        for k, v in sd.items()
        if hasattr(v, "ndim") and v.ndim >= 2 and v.is_floating_point()
    }


def _count(n: int) -> str:
    return "—" if n < 0 else str(n)  # -1: no MP fit (fewer than 4 eigenvalues)


def part_ww(args, out_lines: list[str]) -> None:
    from sed_dask.weights import matrix_spectrum, settings

    mats = planted_matrices()
    mats.update(demo_matrices(Path(args.runs) / "seed0"))
    with tempfile.TemporaryDirectory() as td:
        npz = os.path.join(td, "mats.npz")
        np.savez(npz, **{k: v.astype(np.float32) for k, v in mats.items()})
        script = os.path.join(td, "ww_side.py")
        Path(script).write_text(WW_SCRIPT)
        t0 = time.perf_counter()
        res = subprocess.run([args.ww_python, script, npz], check=False, capture_output=True, text=True, timeout=1800)
        t_ww = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"WeightWatcher run failed:\n{res.stderr[-3000:]}")
        ww = json.loads(res.stdout.split("JSON", 1)[1])
    s = settings()  # the configured k (10), cut to what a small matrix has
    t0 = time.perf_counter()
    ours = {k: matrix_spectrum(v.astype(np.float32).astype(np.float64), *v.shape, s, name=k) for k, v in mats.items()}
    t_ours = time.perf_counter() - t0
    out_lines += [
        (
            f"WeightWatcher {ww['version']} (separate venv) vs sed_dask on the same float32 matrices; "
            f"wall: WeightWatcher {t_ww:.1f} s (incl. interpreter/torch start), sed_dask {t_ours:.1f} s "
            f"({len(mats)} matrices)"
        ),
        "",
        (
            "| matrix | shape | α sed_dask (xmin, n_tail) | α WW (xmin) | outliers sed_dask | spikes WW | "
            "MP edge² sed_dask | bulk_max WW | λ_max |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in mats.items():
        o, w = ours[k], ww["layers"].get(k)
        if w is None:
            out_lines.append(
                f"| {k} | {v.shape[0]}×{v.shape[1]} | {o['alpha']['alpha']:.3f} | skipped by WW | "
                f"{_count(o['mp']['n_outliers'])} | — | {o['mp']['edge'] ** 2:.4g} | — | "
                f"{o['spectral'] ** 2:.4g} |"
            )
            continue
        lam_max = o["spectral"] ** 2
        out_lines.append(
            f"| {k} | {v.shape[0]}×{v.shape[1]} | {o['alpha']['alpha']:.3f} ({o['alpha']['xmin']:.3g}, "
            f"{o['alpha']['n_tail']}) | {w['alpha']:.3f} ({w['xmin']:.3g}) | {_count(o['mp']['n_outliers'])} | "
            f"{int(w['num_spikes']) if w['num_spikes'] is not None else '—'} | {o['mp']['edge'] ** 2:.4g} | "
            f"{w['bulk_max']:.4g} | {lam_max:.4g} |"
        )


def _store(args) -> tuple[str, dict]:
    import sed_dask

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "traj.zarr"
    seeds = sorted(p.name for p in Path(args.runs).glob("seed*") if p.is_dir())
    if not store.exists():
        for s in seeds:
            sed_dask.ingest(
                str(Path(args.runs) / s),
                str(store),
                run=s,
                metrics=str(Path(args.runs) / s / "metrics.json"),
                scheduler="threads",
                progress=False,
            )
    grok = json.loads((Path(args.runs) / "summary.json").read_text())["runs"]
    return str(store), {s: grok[s]["grok_step"] for s in seeds}


def part_cost(args, out_lines, client) -> None:
    import sed_dask

    store, _ = _store(args)
    ts = sed_dask.open_store(store, mode="r")
    n_ckpt = sum(ts.run(r).n_rows for r in ts.runs)
    P = ts.run(ts.runs[0]).n_params
    best = {"weights": math.inf, "gram": math.inf}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        w = sed_dask.weight_spectra(store, client=client)
        best["weights"] = min(best["weights"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        sed_dask.spectrum(store, windows=[10], client=client, progress=False)
        best["gram"] = min(best["gram"], time.perf_counter() - t0)
    n_layers = w.sizes["layer"]
    out_lines += [
        "",
        (
            f"Cost on the demo store ({len(ts.runs)} runs, {n_ckpt} checkpoints, {P:,} parameters, "
            f"{n_layers} 2-D tensors per checkpoint; LocalCluster {args.workers}×1 thread; best of "
            f"{args.repeat}; load {os.getloadavg()[0]:.2f})"
        ),
        "",
        "| pass | wall s | per checkpoint ms | ratio to Gram pass |",
        "|---|---|---|---|",
        (
            f"| weight_spectra (k=10, ESD, MP, α; {w.attrs['n_tasks']} tasks) | {best['weights']:.2f} | "
            f"{1e3 * best['weights'] / n_ckpt:.1f} | {best['weights'] / best['gram']:.2f}× |"
        ),
        f"| spectrum W=10 (one banded-Gram pass) | {best['gram']:.2f} | {1e3 * best['gram'] / n_ckpt:.1f} | 1× |",
    ]


def part_demo(args, out_lines, client) -> None:
    import sed_dask
    from sed_dask.report.summary import make_report, standard_analysis
    from sed_dask.weights import escape_steps

    store, grok = _store(args)
    work = Path(args.work)
    w = sed_dask.weight_spectra(store, client=client, output=str(work / "weights.zarr"), overwrite=True).load()
    esc = escape_steps(w)
    out_lines += [
        "",
        (
            "Demo run (default configuration; outlier escape = n_outliers above its first-checkpoint value "
            "for 2 consecutive checkpoints, checkpoints every 40 steps; grok = first val_acc >= 0.9)"
        ),
        "",
    ]
    for run, g in grok.items():
        e = esc[esc["run"] == run]
        out_lines += [
            (
                f"**{run}** (grokked at {g}; memorised at "
                f"{json.loads((Path(args.runs) / 'summary.json').read_text())['runs'][run]['memorize_step']})"
            ),
            "",
            ("| layer | escape step | lead before grok | σ1/edge at escape | outliers first→max→last | α first→last |"),
            "|---|---|---|---|---|---|",
        ]
        for x in e.itertuples():
            esc_s = (
                "—"
                if x.escape_step is None or (isinstance(x.escape_step, float) and math.isnan(x.escape_step))
                else int(x.escape_step)
            )
            lead = "—" if esc_s == "—" else f"{g - esc_s:+d}"
            out_lines.append(
                f"| {x.layer} | {esc_s} | {lead} | {x.sigma1_over_edge_at_escape:.2f} | "
                f"{x.init_outliers}→{x.max_outliers} ({x.max_outlier_fraction:.0%} of M)→{x.final_outliers} | "
                f"{x.alpha_first:.2f}→{x.alpha_last:.2f} |"
            )
        out_lines.append("")
    from sed_dask.weights.queries import first_sustained

    out_lines += [
        "First step with alpha < 2 for 3 consecutive checkpoints",
        "",
        "| layer | " + " | ".join(f"{r} (grok {g})" for r, g in grok.items()) + " |",
        "|---|" + "---|" * len(grok),
    ]
    for layer in [str(x) for x in w.layer.values]:
        cells = []
        for run in grok:
            a = np.asarray(w["alpha"].sel(run=run, layer=layer).values, float)
            ok = np.isfinite(a)
            i = first_sustained(a[ok] < 2.0, 3)
            cells.append(str(int(w["step"].values[ok][i])) if i is not None else "—")
        out_lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    out_lines.append("")
    summ = json.loads((Path(args.runs) / "summary.json").read_text())["runs"]
    als = {}
    for run in grok:
        als[run] = sed_dask.update_alignment(
            store,
            run=run,
            window=10,
            k=3,
            n_directions=3,
            client=client,
            output=str(work / f"align_{run}.zarr"),
            overwrite=True,
        )
    out_lines += [
        (
            "Alignment (W=10, top-3 update directions vs the weight's top-3 singular subspaces at the window's "
            "newest step): mean overlap / chance (overlap = mean cos² of the principal angles, chance = 3/dim) "
            "over windows ending ≤ memorisation (mem), in (mem, grok], and after grok"
        ),
        "",
        "| layer | side | " + " | ".join(f"{r} ≤mem | {r} mem..grok | {r} >grok" for r in grok) + " |",
        "|---|---|" + "---|---|---|" * len(grok),
    ]
    first = als[next(iter(grok))]
    for layer in [str(x) for x in first.layer.values]:
        for side in ("left", "right"):
            cells = []
            for run, g in grok.items():
                al, mem = als[run], summ[run]["memorize_step"]
                o = al["overlap"].sel(layer=layer, side=side)
                c = float(al["chance"].sel(layer=layer, side=side))
                st = al["step"]
                for sel in (st <= mem, (st > mem) & (st <= g), st > g):
                    v = o.sel(step=st[sel])
                    cells.append(f"{float(v.mean()) / c:.1f}" if v.size else "—")
            out_lines.append(f"| {layer} | {side} | " + " | ".join(cells) + " |")
    al = als[next(iter(grok))]
    res = sed_dask.spectrum(store, windows=[10], client=client, progress=False)
    analysis = standard_analysis(res, window=10, progress=False)
    analysis.update({"weights": w, "weight_alignment": al})
    rep = make_report(res, work / "report", analysis=analysis, overwrite=True, title="Demo: SED + weight spectra")
    out_lines += ["", f"report: {rep['html']}"]


def part_early(args, out_lines, client) -> None:
    """The first steps at a finer checkpoint spacing (``demo_train --steps 240 --every 5``: the same
    trajectory as the default run's first 240 steps, bit for bit): which layers escape first."""
    import sed_dask
    from sed_dask.weights import escape_steps

    work = Path(args.work)
    store = work / "early.zarr"
    seeds = sorted(p.name for p in Path(args.early).glob("seed*") if p.is_dir())
    if not store.exists():
        for sd in seeds:
            sed_dask.ingest(str(Path(args.early) / sd), str(store), run=sd, scheduler="threads", progress=False)
    w = sed_dask.weight_spectra(str(store), client=client).load()
    esc = escape_steps(w)
    out_lines += [
        "",
        "First 240 steps, checkpoints every 5 steps (same trajectories): escape step per layer",
        "",
        "| layer | " + " | ".join(f"{sd} escape (σ1/edge)" for sd in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for layer in [str(x) for x in w.layer.values]:
        cells = []
        for sd in seeds:
            x = esc[(esc["run"] == sd) & (esc["layer"] == layer)]
            if not len(x) or x["escape_step"].isna().all():
                cells.append("—")
            else:
                r = x.iloc[0]
                cells.append(f"{int(r['escape_step'])} ({r['sigma1_over_edge_at_escape']:.2f})")
        out_lines.append(f"| {layer} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="demo_train output (seed*/ + summary.json)")
    ap.add_argument("--work", required=True, help="scratch folder (store, results, report)")
    ap.add_argument("--parts", default="ww,cost,demo")
    ap.add_argument("--early", default=None, help="demo_train --steps 240 --every 5 output (part 'early')")
    ap.add_argument("--ww-python", default="/work/wwvenv/bin/python")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    lines = [f"load at start: {os.getloadavg()[0]:.2f} (1-min), {os.cpu_count()} cores", ""]
    if "ww" in parts:
        part_ww(args, lines)
    if {"cost", "demo", "early"} & set(parts):
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as c,
            Client(c) as client,
        ):
            if "cost" in parts:
                part_cost(args, lines, client)
            if "demo" in parts:
                part_demo(args, lines, client)
            if "early" in parts:
                part_early(args, lines, client)
    lines.append(f"\nload at end: {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
