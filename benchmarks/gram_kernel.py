"""Benchmark the banded-Gram kernels side by side: BLAS syrk of all rows vs the fused band kernel.

In one run, on one store (benchmarks/spectrum.py's random walk, default layout), for each band width:
``banded_gram(..., kernel="blas")`` and ``kernel="fused"`` alternately on a LocalCluster of
``--workers`` single-threaded processes (warm page cache), reporting float32 GB per worker
CPU-second (psutil, all worker threads) and the max relative difference of the two bands. Also the
fused kernel's compile cost: a fresh process with an empty numba cache (cold) and with the cache
written (warm), and what a fresh worker process pays on its first task.

    python benchmarks/gram_kernel.py --n-ckpts 40 --params 10e6 --widths 11,64
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectrum import make_store, worker_cpu

COMPILE = (
    "import time; t = time.perf_counter(); import numpy as np; from sed_dask.engine import band_kernel as b; "
    "S = np.ones((16, 600), np.float32); w = np.empty((16, b.SUB_COLS)); o = np.zeros((6, 11)); "
    "b.band_segment(S, 0, 10, 0, 600, 11, w, o); print(time.perf_counter() - t)"
)


def compile_cost() -> tuple[float, float]:
    """Seconds for a fresh process to import and run the kernel once: empty numba cache, then cached."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "NUMBA_CACHE_DIR": d}
        cold = float(
            subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, check=True).stdout
        )
        warm = float(
            subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, check=True).stdout
        )
    return cold, warm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/sed_bench_gram_kernel")
    ap.add_argument("--n-ckpts", type=int, default=40)
    ap.add_argument("--params", type=float, default=10e6)
    ap.add_argument("--widths", default="11,64", help="band widths W_max")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    from sed_dask.engine.gram import banded_gram
    from sed_dask.store.trajectory import open_store

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    n, P = args.n_ckpts, int(args.params)
    widths = [int(w) for w in args.widths.split(",")]
    rows = []
    try:
        path = root / "s.zarr"
        make_store(path, "r", n, P)
        rs = open_store(str(path), mode="r").run("r")
        gb = n * P * 4 / 1e9
        cold, warm = compile_cost()
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as lc,
            Client(lc) as client,
        ):
            t = time.perf_counter()
            client.run(lambda: __import__("sed_dask.engine.gram"))
            first = time.perf_counter() - t
            for W in widths:
                cpu = {"blas": [], "fused": []}
                wall = {"blas": [], "fused": []}
                bands = {}
                for _ in range(args.repeat):
                    for kern in ("blas", "fused"):
                        c0 = worker_cpu(client)
                        t = time.perf_counter()
                        g = banded_gram(rs, w_max=W, client=client, kernel=kern)
                        wall[kern].append(time.perf_counter() - t)
                        cpu[kern].append(worker_cpu(client) - c0)
                        bands[kern] = g.band
                ok = np.isfinite(bands["blas"])
                diff = float(
                    np.max(np.abs(bands["blas"][ok] - bands["fused"][ok]) / np.abs(bands["blas"][0, :, 0]).max())
                )
                b, f = min(cpu["blas"]), min(cpu["fused"])
                rows.append((W, gb / b, gb / f, b / f, min(wall["blas"]), min(wall["fused"]), diff, os.getloadavg()[0]))
                print(f"# {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nStore: {n} checkpoints x {P:,} float32 params ({gb:.2f} GB), warm page cache; LocalCluster "
        f"{args.workers} workers x 1 thread; best of {args.repeat} alternating runs.\n"
    )
    print(
        "| W_max | BLAS kernel (GB per worker CPU-s) | fused kernel (GB per worker CPU-s) | **fused / BLAS** | "
        "BLAS pass (s) | fused pass (s) | max rel. band difference | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for W, b, f, r, tb, tf, d, load in rows:
        print(f"| {W} | {b:.2f} | **{f:.2f}** | **{r:.2f}x** | {tb:.2f} | {tf:.2f} | {d:.1e} | {load:.1f} |")
    print(
        f"\nCompile: fresh process, empty numba cache {cold:.2f} s; cache written {warm:.2f} s "
        f"(import + first call); {args.workers} fresh workers importing the engine: {first:.2f} s."
    )


if __name__ == "__main__":
    main()
