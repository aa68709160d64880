"""Spectrum-pass scaling: measured on 1 and 2 worker processes, projected (a model) to many workers.

Measures, on one on-disk store (float32 random walk):

* the whole spectrum pass (``sed_dask.spectrum(address=...)``) on real ``dask scheduler`` +
  ``dask worker`` processes (no nanny, 1 thread each, ``OPENBLAS_NUM_THREADS=1``), for each
  ``--workers`` count; best of ``--repeat``;
* the per-tile cost (``gram_tile`` on a few tiles of the same plan, in this process, warm cache);
* the reduction cost (one ``sum_partials`` of ``split_every`` tile partials);
* the per-task scheduler overhead (a graph of 2,000 no-op tasks on the same cluster / 2,000).

Then prints a **projection** (a model, not a measurement) for ``--project`` workers on a store of
``--project-gb``: ``tiles x max(tile cost, tile bytes / per-node read bandwidth) / workers +
reduction cost x ceil(log2 workers)``, floored by ``tasks x scheduler overhead`` (dispatch overlaps
compute, so the total is ``max(compute, scheduler) + reduction``).

    python benchmarks/scaling.py --gb 1 --workers 1,2 --project 8,16,32,64,100 --project-gb 100
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

BLAS1 = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_bytes(s: str) -> int:
    from dask.utils import parse_bytes as pb

    return int(pb(s))


def make_store(path: str, gb: float, steps: int) -> int:
    from sed_dask.store.trajectory import write_trajectory

    P = int(gb * 1e9 / 4 / steps)
    rng = np.random.default_rng(0)
    X = np.empty((steps, P), np.float32)
    X[0] = rng.standard_normal(P, dtype=np.float32)
    for i in range(1, steps):
        X[i] = X[i - 1] + rng.standard_normal(P, dtype=np.float32)
    write_trajectory(path, "r", np.arange(steps) * 100, X)
    return P


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="store size in GB of float32 (default 1)")
    ap.add_argument("--steps", type=int, default=33, help="checkpoints in the run (default 33)")
    ap.add_argument("--window", type=int, default=10, help="W (band width W+1; default 10)")
    ap.add_argument("--tile-bytes", default="64MiB", help="spectrum tile bytes (default 64MiB)")
    ap.add_argument("--workers", default="1,2", help="measured worker-process counts (default 1,2)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per worker count, best kept")
    ap.add_argument("--project", default="8,16,32,64,100", help="projected worker counts")
    ap.add_argument("--project-gb", type=float, default=100.0, help="store size for the projection (GB)")
    ap.add_argument(
        "--read-gbps",
        type=float,
        default=1.0,
        help="assumed per-node read bandwidth from the shared filesystem, GB/s (default 1)",
    )
    ap.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    a = ap.parse_args(argv)

    from distributed import Client
    from procs import DaskProcs

    import sed_dask
    from sed_dask.engine.gram import gram_graph, sum_partials
    from sed_dask.store.trajectory import open_store

    tile_bytes = parse_bytes(a.tile_bytes)
    root = tempfile.mkdtemp(prefix="sed-scaling-", dir=a.dir)
    try:
        store = os.path.join(root, "s.zarr")
        t0 = time.perf_counter()
        P = make_store(store, a.gb, a.steps)
        nbytes = a.steps * P * 4
        print(
            f"store: {a.steps} steps x {P:,} params = {nbytes / 1e9:.2f} GB, written in "
            f"{time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        kw = {"windows": (a.window,), "tile_bytes": tile_bytes, "progress": False}
        rs = open_store(store, mode="r").run("r")
        plan = gram_graph(rs, width=a.window + 1, tile_bytes=tile_bytes)
        tiles = [v for k, v in plan.dsk.items() if isinstance(k, tuple) and k[0].startswith("sed-gram-tile")]
        n_tiles, n_tasks = len(tiles), len(plan.dsk)
        split = 8

        # ---- per-tile and reduction cost, in this process (warm cache: read once first)
        sed_dask.spectrum(store, scheduler="threads", **kw)
        sample = tiles[: min(6, n_tiles)]
        from sed_dask.cluster.blas import single_threaded_blas

        with single_threaded_blas():
            parts, t_tiles = [], []
            for fn, *args in sample:
                t = time.perf_counter()
                parts.append(fn(*args))
                t_tiles.append(time.perf_counter() - t)
            t_tile = float(np.median(t_tiles))
            group = (parts * split)[:split]
            t = time.perf_counter()
            for _ in range(5):
                sum_partials(group)
            t_red = (time.perf_counter() - t) / 5
        tile_read_bytes = nbytes / n_tiles

        # ---- measured passes on real worker processes
        rows = []
        overhead = None
        for n in [int(x) for x in a.workers.split(",")]:
            with DaskProcs(os.path.join(root, f"dask{n}"), env=BLAS1) as procs:
                procs.start_scheduler(wait=False)
                procs.start_workers(n, nthreads=1, memory_limit="4GiB")
                sed_dask.spectrum(store, address=procs.address, **kw)  # warm-up: imports on workers
                best = min(_timed(sed_dask.spectrum, store, address=procs.address, **kw) for _ in range(a.repeat))
                with Client(procs.address, set_as_default=False) as c:
                    futs = c.map(lambda i: i, range(2000), pure=False)
                    t = time.perf_counter()
                    c.gather(futs)
                    futs = c.map(lambda i: i + 1, range(2000), pure=False)
                    c.gather(futs)
                    ovh = (time.perf_counter() - t) / 2000
                overhead = ovh if overhead is None else min(overhead, ovh)
                rows.append((n, best, nbytes / best / 1e9))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\nStore: {a.steps} steps x {P:,} params = {nbytes / 1e9:.2f} GB float32; W={a.window} (band "
        f"{a.window + 1}); tile-bytes {a.tile_bytes}: {n_tiles} tile tasks, {n_tasks} tasks in all.\n"
    )
    print("Measured (this machine, best of %d):\n" % a.repeat)
    print("| worker processes | pass time (s) | throughput (GB/s) | speed-up vs 1 |")
    print("|---|---|---|---|")
    for n, t, g in rows:
        print(f"| {n} | {t:.2f} | {g:.2f} | {rows[0][1] / t:.2f}x |")
    print(
        f"\n| cost | value |\n|---|---|\n| per tile (gram_tile, warm, 1 thread) | {t_tile * 1e3:.1f} ms "
        f"({tile_read_bytes / 1e6:.1f} MB/tile: {tile_read_bytes / t_tile / 1e9:.2f} GB/s) |\n"
        f"| reduction (sum of {split} partials) | {t_red * 1e3:.2f} ms |\n"
        f"| scheduler overhead per task | {overhead * 1e3:.2f} ms |"
    )

    # ---- projection
    scale = a.project_gb * 1e9 / nbytes
    p_tiles = max(1, round(n_tiles * scale))
    p_tasks = max(1, round(n_tasks * scale))
    t_eff = max(t_tile, tile_read_bytes / (a.read_gbps * 1e9))
    print(
        f"\n**Projection (model, not measured)** for a {a.project_gb:g} GB store ({p_tiles:,} tiles, "
        f"{p_tasks:,} tasks), one single-threaded worker per node, per-node read {a.read_gbps:g} GB/s "
        f"(per-tile cost = max(measured {t_tile * 1e3:.1f} ms, read {tile_read_bytes / a.read_gbps / 1e6:.1f} ms)"
        f" = {t_eff * 1e3:.1f} ms), shared filesystem aggregate bandwidth assumed unlimited;"
        f" total = max(compute, scheduler) + reduction:\n"
    )
    print("| workers | compute (s) | reduction (s) | scheduler (s) | total (s) | GB/s | efficiency |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for n in [1] + [int(x) for x in a.project.split(",")]:
        comp = p_tiles * t_eff / n
        red = t_red * math.ceil(math.log2(n)) if n > 1 else 0.0
        sch = p_tasks * overhead
        tot = max(comp, sch) + red  # the scheduler dispatches while workers compute
        base = base or tot
        print(
            f"| {n} | {comp:.1f} | {red:.3f} | {sch:.1f} | {tot:.1f} | {a.project_gb / tot:.2f} | "
            f"{base / tot / n:.0%} |"
        )


def _timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
