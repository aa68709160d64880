"""Benchmark the JL sketch pass and the tall-skinny SVDs; optionally the JL error table on a store.

Prints markdown tables (copied into benchmarks/README.md, "Sketch and directions"):

1. **sketch vs banded Gram** on the same run of the same store: wall time of ``sed_dask.sketch`` for
   each distribution and d against ``sed_dask.banded_gram`` with W_max = W + 1, and of
   ``sed_dask.spectrum(..., sketch=...)`` (both from one read) against spectrum + sketch as two
   passes (best of --repeat, page cache warm), local threaded scheduler.
2. **randomized SVD vs dask**: trajectory PCA (top-k right singular vectors of every delta of the run)
   with ``sed_dask.directions`` (exact TSQR; randomized Halko) and ``dask.array.linalg.svd_compressed``
   on the same dask array of X^T; each method runs in a fresh process (peak RSS above the process
   baseline, from VmHWM); accuracy = max principal angle to the exact (float64) subspace and
   max relative error of sigma_1..k.
3. with ``--jl-store``: ``sed_dask.results.sketch_spectra.jl_error_report`` on a real trajectory (docs/method.md §11),
   for each operator of ``--jl-distribution`` (comma-separated), then their mean errors side by side.

Operators are named ``gaussian``, ``rademacher``, ``sparse`` or ``osnap:S`` (OSNAP with S nonzeros
per parameter; plain ``osnap`` uses the ``sketch.osnap-s`` default). In ``--distributions``, ``NAME@D``
(``@D1+D2``) limits an operator to those d.

Example (the README numbers)::

    python benchmarks/sketch.py --P 2000000 --n-ckpts 65 --d 100,200 --k 5
    python -m sed_dask.demo.train runs --seeds 0 1 --steps 2400 --every 40     # then sed-dask ingest
    python benchmarks/sketch.py --store STORE --run grok_seed0 --d 100,1000 --k 5 \\
        --jl-store STORE --jl-runs grok_seed0,grok_seed1
    python benchmarks/sketch.py --d 100,1000 --distributions gaussian,sparse,osnap:1,osnap:2,osnap:4 --skip-svd \\
        --jl-store STORE --jl-distribution gaussian,osnap:1,osnap:2,osnap:4     # the OSNAP rows
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

import numpy as np


# ----------------------------------------------------------------------------- data
def make_store(path: str, *, P: int, n_ckpts: int, rank: int = 8, seed: int = 0) -> str:
    """A random-walk trajectory: rank-``rank`` drift with decaying scales plus isotropic noise."""
    from sed_dask.store.trajectory import write_trajectory

    rng = np.random.default_rng(seed)
    n = n_ckpts - 1
    scales = 4.0 * 0.6 ** np.arange(rank)
    coef = rng.standard_normal((n, rank)) * scales
    theta = np.empty((n_ckpts, P), np.float32)
    theta[0] = rng.standard_normal(P).astype(np.float32)
    step = 1 << 18
    for c0 in range(0, P, step):  # column blocks keep the float64 temporaries small
        c1 = min(c0 + step, P)
        basis = rng.standard_normal((rank, c1 - c0)) / np.sqrt(P)
        d = coef @ basis + 0.3 * rng.standard_normal((n, c1 - c0)) / np.sqrt(P)
        theta[1:, c0:c1] = theta[0, c0:c1] + np.cumsum(d, axis=0)
    write_trajectory(path, "run0", 100 * np.arange(n_ckpts), theta)
    return path


def operator_kw(spec: str) -> dict:
    """``"osnap:4"`` -> ``{"distribution": "osnap", "s": 4}``; other names pass through."""
    name, _, s = spec.partition(":")
    return {"distribution": name, **({"s": int(s)} if s else {})}


def _best(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- 1. sketch vs gram
def bench_sketch(store: str, run: str, *, W: int, ds: list[int], dists: list[str], repeat: int) -> str:
    import sed_dask
    from sed_dask.store.trajectory import open_store

    rs = open_store(store, mode="r").run(run)
    N, P = rs.n_rows - 1, rs.n_params
    gb = rs.n_rows * P * 4 / 1e9
    t_gram = _best(lambda: sed_dask.banded_gram(rs, w_max=W + 1, scheduler="threads"), repeat)
    spec = dict(runs=[run], windows=(W,), scheduler="threads", progress=False)
    t_spec = _best(lambda: sed_dask.spectrum(store, **spec), repeat)
    rows = [
        f"| banded Gram (W_max = {W + 1}) | - | {t_gram:.2f} s | 1.0x | {gb / t_gram:.2f} GB/s | | |",
        f"| spectrum (W = {W}) | - | {t_spec:.2f} s | {t_spec / t_gram:.1f}x | {gb / t_spec:.2f} GB/s | | |",
    ]
    for spec_ in dists:
        dist, _, only = spec_.partition("@")  # gaussian@100: that operator at d = 100 only
        kw = operator_kw(dist)
        for d in ds:
            if only and d not in [int(x) for x in only.split("+")]:
                continue
            t = _best(
                lambda: sed_dask.sketch(store, runs=[run], d=d, scheduler="threads", progress=False, **kw), repeat
            )
            t1 = _best(lambda: sed_dask.spectrum(store, sketch={"d": d, **kw}, **spec), repeat)
            rows.append(
                f"| sketch {dist} | {d} | {t:.2f} s | {t / t_gram:.1f}x | {gb / t:.2f} GB/s | "
                f"{t1:.2f} s | {t1 / (t + t_spec):.2f} |"
            )
    head = (
        f"Run `{run}`: {N + 1} checkpoints x {P:,} parameters ({gb:.2f} GB float32); threaded scheduler, "
        f"{os.cpu_count()} cores, best of {repeat}, load average {os.getloadavg()[0]:.2f} at the end. "
        "Last columns: `spectrum(..., sketch=...)` (spectra and "
        "sketch from one read) and its time over spectrum + sketch as two passes.\n\n"
        "| pass | d | wall | vs Gram | store read rate | spectrum + sketch in one pass | one pass / two |\n"
        "|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def bench_ratio(store: str, run: str, *, W: int, ds: list[int], dists: list[str], rounds: int) -> str:
    """Sketch pass / Gram pass robust to a busy machine: each round times the Gram pass and every
    (operator, d) once, back to back; the ratio is the median over rounds of the per-round ratios."""
    import sed_dask
    from sed_dask.store import open_store

    rs = open_store(store, mode="r").run(run)
    cases = []
    for spec_ in dists:
        dist, _, only = spec_.partition("@")
        cases += [(dist, d) for d in ds if not only or d in [int(x) for x in only.split("+")]]
    times = {c: [] for c in [("gram", 0), *cases]}
    load = []
    for _ in range(rounds):
        load.append(os.getloadavg()[0])
        for (name, d), ts in times.items():
            t = time.perf_counter()
            if name == "gram":
                sed_dask.banded_gram(rs, w_max=W + 1, scheduler="threads")
            else:
                sed_dask.sketch(store, runs=[run], d=d, scheduler="threads", progress=False, **operator_kw(name))
            ts.append(time.perf_counter() - t)
    g = np.array(times[("gram", 0)])
    lines = [
        f"Run `{run}` ({rs.n_rows} x {rs.n_params:,}; {rs.n_rows * rs.n_params * 4 / 1e9:.2f} GB float32), "
        f"{rounds} interleaved rounds, threaded scheduler, {os.cpu_count()} cores, load average "
        f"{min(load):.1f}–{max(load):.1f} during the rounds.",
        "",
        "| pass | d | median wall | min wall | median of per-round ratio to the Gram pass | range over rounds |",
        "|---|---|---|---|---|---|",
        f"| banded Gram (W_max = {W + 1}) | - | {np.median(g):.2f} s | {g.min():.2f} s | 1.00x | |",
    ]
    for c in cases:
        t = np.array(times[c])
        r = t / g
        lines.append(
            f"| sketch {c[0]} | {c[1]} | {np.median(t):.2f} s | {t.min():.2f} s | **{np.median(r):.2f}x** "
            f"| {r.min():.2f}–{r.max():.2f}x |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. SVDs
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak() -> None:
    """Reset this process's VmHWM (Linux >= 4.0). ``ru_maxrss`` is useless here: it survives exec,
    so a process spawned by a big parent starts with the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _svd_child(args):
    """Runs in a fresh process: (seconds, peak extra MiB, sigma (k,), V (k x P) float64)."""
    method, store, run, k, n_oversamples, n_power_iter = args
    import dask

    import sed_dask
    from sed_dask.cluster.blas import single_threaded_blas
    from sed_dask.engine.directions import window_stack, xt_array
    from sed_dask.store.trajectory import open_store

    rs = open_store(store, mode="r").run(run)
    stack = window_stack(rs)
    base = _rss_kb()
    _reset_peak()
    t = time.perf_counter()
    if method in ("exact", "randomized"):
        ds = sed_dask.directions(
            store,
            run=run,
            k=k,
            method=method,
            n_oversamples=n_oversamples,
            n_power_iter=n_power_iter,
            seed=0,
            scheduler="threads",
        )
        sigma, V = ds["sigma"].values, ds["direction"].values.astype(np.float64)
    else:
        import dask.array as da

        XT = xt_array(stack)
        if method == "svd_compressed":
            u, s, _ = da.linalg.svd_compressed(XT, k, n_power_iter=n_power_iter, n_oversamples=n_oversamples, seed=0)
        else:  # dask.array.linalg.svd: TSQR of the whole array, then truncate
            u, s, _ = da.linalg.svd(XT)
            u, s = u[:, :k], s[:k]
        with single_threaded_blas():
            u, s = dask.compute(u, s, scheduler="threads")
        sigma, V = np.asarray(s), np.asarray(u).T
    secs = time.perf_counter() - t
    return secs, max(0, _peak_kb() - base) / 1024, sigma, V


def bench_svd(store: str, run: str, *, k: int, n_oversamples: int, n_power_iter: int, repeat: int) -> str:
    from sed_dask.engine.directions import principal_angles
    from sed_dask.store.trajectory import open_store

    rs = open_store(store, mode="r").run(run)
    n, P = rs.n_rows - 1, rs.n_params
    ctx = mp.get_context("spawn")
    res = {}
    for method in ("exact", "randomized", "svd_compressed", "dask_svd"):
        best = None
        for _ in range(repeat):
            with ctx.Pool(1) as pool:
                out = pool.apply(_svd_child, ((method, store, run, k, n_oversamples, n_power_iter),))
            if best is None or out[0] < best[0]:
                best = out
        res[method] = best
    _, _, s_ref, V_ref = res["exact"]
    xbytes = n * P * 8 / 2**20
    lines = [
        f"Trajectory PCA of run `{run}`: X = {n} deltas x {P:,} parameters (X as float64: {xbytes:.0f} MiB), "
        f"k = {k}, n_oversamples = {n_oversamples}, n_power_iter = {n_power_iter}; threaded scheduler, "
        f"fresh process per method, best of {repeat}. Peak = max RSS above the process baseline.",
        "",
        "| method | store passes | wall | peak memory | max principal angle vs exact | max rel. error sigma_1..k |",
        "|---|---|---|---|---|---|",
    ]
    passes = {
        "exact": "2 (TSQR R, then V)",
        "randomized": f"{n_power_iter + 3}",
        "svd_compressed": "1 (X held in memory)",
        "dask_svd": "1 (X held in memory)",
    }
    names = {
        "exact": "sed_dask exact (TSQR R + blockwise V)",
        "randomized": "sed_dask randomized (Halko, small side)",
        "svd_compressed": "dask.array.linalg.svd_compressed",
        "dask_svd": "dask.array.linalg.svd (full TSQR)",
    }
    for m, (secs, peak, s, V) in res.items():
        ang = np.degrees(principal_angles(V / np.linalg.norm(V, axis=1, keepdims=True), V_ref)).max()
        err = np.max(np.abs(s[:k] - s_ref[:k]) / s_ref[:k])
        lines.append(f"| {names[m]} | {passes[m]} | {secs:.2f} s | {peak:.0f} MiB | {ang:.2e} deg | {err:.1e} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. JL table
def bench_jl(
    store: str, runs: list[str], *, windows: list[int], ds: list[int], seeds: list[int], dists: list[str], nested: bool
) -> str:
    import sed_dask
    from sed_dask.results.sketch_spectra import jl_error_report, jl_table

    out, reps = [], {}
    for run in runs:
        exact = sed_dask.spectrum(store, runs=[run], windows=windows, scheduler="threads", progress=False)
        for dist in dists:
            kw = operator_kw(dist)
            t = time.perf_counter()
            rep = jl_error_report(
                exact,
                store=store,
                run=run,
                windows=windows,
                ds=ds,
                seeds=seeds,
                nested=nested and kw["distribution"] != "osnap",
                scheduler="threads",
                **kw,
            )
            reps[(run, dist)] = rep
            how = (
                "nested columns of one sketch per seed"
                if rep.attrs["nested_d"]
                else "independent operator per (d, seed)"
            )
            out.append(
                f"Run `{run}` ({dist} Phi, seeds {seeds}, {how}; {time.perf_counter() - t:.0f} s):\n\n{jl_table(rep)}"
            )
    if len(dists) > 1:  # side by side: mean relative error (%) of r23 and edge per (W, d), each operator
        head = (
            "| run | W | d | "
            + " | ".join(f"{x} r23 / edge" for x in dists)
            + f" | max abs. diff. vs {dists[0]} (points) |"
        )
        lines = [head, "|" + "---|" * (4 + len(dists))]
        for run in runs:
            for W in windows:
                for d in ds:
                    cells, vals = [], []
                    for dist in dists:
                        mean = reps[(run, dist)]["mean"].sel(window=W, d=d)
                        m = [float(mean.sel(ratio=r)) * 100 for r in ("r23", "edge")]
                        cells.append(f"{m[0]:.1f} / {m[1]:.1f}%")
                        vals.append(m)
                    diff = max(abs(v[i] - vals[0][i]) for v in vals[1:] for i in range(2))
                    lines.append(f"| {run} | {W} | {d} | " + " | ".join(cells) + f" | {diff:.1f} |")
        out.append("Mean relative error, side by side:\n\n" + "\n".join(lines))
    return "\n\n".join(out)


def bench_jl_per_seed(store: str, runs: list[str], *, W: int, ds: list[int], seeds: list[int], dists: list[str]) -> str:
    """Is a difference between operators more than seed noise? The protocol's mean error per seed
    (independent operators, seed 1000 s + d), then mean +- standard error over seeds, and each
    operator's difference from the first one with its standard error."""
    import sed_dask
    from sed_dask.results.sketch_spectra import jl_error_report

    lines = [
        "| run | d | "
        + " | ".join(f"{x} r23 / edge" for x in dists)
        + "".join(f" | {x} - {dists[0]}: r23 / edge" for x in dists[1:])
        + " |",
        "|" + "---|" * (2 + 2 * len(dists) - 1),
    ]
    for run in runs:
        exact = sed_dask.spectrum(store, runs=[run], windows=[W], scheduler="threads", progress=False)
        per = {}
        for dist in dists:
            kw = operator_kw(dist)
            per[dist] = np.array(
                [
                    [
                        [
                            float(
                                jl_error_report(
                                    exact,
                                    store=store,
                                    run=run,
                                    windows=[W],
                                    ds=[d],
                                    seeds=[s],
                                    nested=False,
                                    scheduler="threads",
                                    **kw,
                                )["mean"].sel(window=W, d=d, ratio=r)
                            )
                            * 100
                            for r in ("r23", "edge")
                        ]
                        for d in ds
                    ]
                    for s in seeds
                ]
            )  # (seed, d, ratio)
        n = len(seeds)
        for di, d in enumerate(ds):
            cells = [
                " / ".join(
                    f"{per[x][:, di, r].mean():.1f} ± {per[x][:, di, r].std(ddof=1) / n**0.5:.1f}" for r in (0, 1)
                )
                for x in dists
            ]
            for x in dists[1:]:
                diff = per[x][:, di] - per[dists[0]][:, di]  # independent seeds: SEs add in quadrature
                se = np.sqrt(per[x][:, di].var(axis=0, ddof=1) / n + per[dists[0]][:, di].var(axis=0, ddof=1) / n)
                cells.append(" / ".join(f"{diff[:, r].mean():+.1f} ± {se[r]:.1f}" for r in (0, 1)))
            lines.append(f"| {run} | {d} | " + " | ".join(cells) + " |")
    return (
        f"W = {W}, seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), mean relative error in % "
        "(mean ± standard error over seeds):\n\n" + "\n".join(lines)
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="use this store instead of a synthetic one")
    ap.add_argument("--run", default="run0")
    ap.add_argument("--P", type=int, default=2_000_000, help="synthetic: parameters")
    ap.add_argument("--n-ckpts", type=int, default=65, help="synthetic: checkpoints")
    ap.add_argument("--W", type=int, default=10)
    ap.add_argument("--d", default="100,200", help="sketch dimensions, comma-separated")
    ap.add_argument("--distributions", default="gaussian,rademacher,sparse")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--n-oversamples", type=int, default=10)
    ap.add_argument("--n-power-iter", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-sketch", action="store_true")
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="instead of best-of-repeat: this many interleaved rounds of Gram and every sketch (ratios)",
    )
    ap.add_argument("--skip-svd", action="store_true")
    ap.add_argument("--jl-store", help="also print the JL error table for runs of this store")
    ap.add_argument("--jl-runs", default=None, help="runs for the JL table (default: all)")
    ap.add_argument("--jl-windows", default="10")
    ap.add_argument("--jl-ds", default="50,100,200,500,1000")
    ap.add_argument("--jl-seeds", default="0,1,2")
    ap.add_argument("--jl-distribution", default="gaussian", help="operators, comma-separated (osnap:S for s = S)")
    ap.add_argument(
        "--jl-per-seed",
        action="store_true",
        help="instead: mean +- standard error over seeds per operator, and differences (first W only)",
    )
    ap.add_argument("--jl-nested", action="store_true", help="one max(d) sketch per seed, prefixes for smaller d")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    tmp = None
    store = a.store
    if store is None and not (a.skip_sketch and a.skip_svd):
        tmp = tempfile.mkdtemp(prefix="sed_bench_sketch_")
        t = time.perf_counter()
        store = make_store(os.path.join(tmp, "store.zarr"), P=a.P, n_ckpts=a.n_ckpts)
        print(f"(synthetic store written in {time.perf_counter() - t:.0f} s)\n")
    try:
        if a.rounds:
            print("### Sketch pass / Gram pass, interleaved rounds\n")
            print(bench_ratio(store, a.run, W=a.W, ds=ints(a.d), dists=a.distributions.split(","), rounds=a.rounds))
            print()
        elif not a.skip_sketch:
            print("### Sketch pass vs banded-Gram pass\n")
            print(bench_sketch(store, a.run, W=a.W, ds=ints(a.d), dists=a.distributions.split(","), repeat=a.repeat))
            print()
        if not a.skip_svd:
            print("### Randomized SVD vs dask\n")
            print(
                bench_svd(
                    store, a.run, k=a.k, n_oversamples=a.n_oversamples, n_power_iter=a.n_power_iter, repeat=a.repeat
                )
            )
            print()
        if a.jl_store:
            from sed_dask.store.trajectory import open_store

            runs = a.jl_runs.split(",") if a.jl_runs else open_store(a.jl_store, mode="r").runs
            print("### JL error of edge ratios vs the exact engine\n")
            if a.jl_per_seed:
                print(
                    bench_jl_per_seed(
                        a.jl_store,
                        runs,
                        W=ints(a.jl_windows)[0],
                        ds=ints(a.jl_ds),
                        seeds=ints(a.jl_seeds),
                        dists=a.jl_distribution.split(","),
                    )
                )
                return
            print(
                bench_jl(
                    a.jl_store,
                    runs,
                    windows=ints(a.jl_windows),
                    ds=ints(a.jl_ds),
                    seeds=ints(a.jl_seeds),
                    dists=a.jl_distribution.split(","),
                    nested=a.jl_nested,
                )
            )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
