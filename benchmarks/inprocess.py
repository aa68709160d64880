"""Cost of the in-process default (issue 17 item 1): ingest + spectrum from checkpoint files, side by side.

For each case it writes ``n`` generated float32 safetensors checkpoints of ``P`` params (a random
walk) and measures, in one run, wall time of:

* **defaults**: ``sed-dask ingest`` then ``sed-dask spectrum`` (in-process threads: the new default);
* **LocalCluster**: the same two commands with ``--local-cluster 2`` (a temporary cluster each);
* **reference loop**: benchmarks/spectrum.py's ``reference`` (docs/method.md §15: all deltas in RAM,
  the N x N dot matrix by a Python double loop with a float64 cast per pair, eigh per window), fed
  from the ingested store (its checkpoint loading is not counted: the comparison favours it).

Each command is a fresh process (what a user runs; python and import start-up included).

    python benchmarks/inprocess.py --cases 160x250000,60x20000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectrum import reference


def write_checkpoints(d: Path, n: int, P: int, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    x = (rng.standard_normal(P) * 0.02).astype(np.float32)
    pool = (rng.standard_normal(P + 4096) * 1e-3).astype(np.float32)
    for i in range(n):
        if i:
            off = int(rng.integers(0, 4096))
            x += pool[off : off + P]
        half = P // 2
        save_file(
            {"a.weight": x[:half].reshape(-1, 50) if half % 50 == 0 else x[:half], "b.weight": x[half:]},
            str(d / f"step_{i * 100:07d}.safetensors"),
        )


def cli(*args) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sed_dask", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/sed_bench_inprocess")
    ap.add_argument("--cases", default="160x250000,60x20000000", help="n x P, comma-separated")
    ap.add_argument("--window", type=int, default=10)
    args = ap.parse_args(argv)
    import xarray as xr

    root = Path(args.dir)
    rows = []
    try:
        for case in args.cases.split(","):
            n, P = (int(float(v)) for v in case.split("x"))
            shutil.rmtree(root, ignore_errors=True)
            ck = root / "ckpts"
            write_checkpoints(ck, n, P)
            times, sig = {}, {}
            for mode, extra in (("defaults", ()), ("LocalCluster", ("--local-cluster", "2"))):
                store, out = root / f"{mode}.zarr", root / f"{mode}-out.zarr"
                ti = cli("ingest", str(ck), "--store", str(store), "--run", "r", "--no-progress", *extra)
                ts = cli("spectrum", str(store), "-o", str(out), "--windows", str(args.window), "--no-progress", *extra)
                times[mode] = (ti, ts, ti + ts)
                ds = xr.open_zarr(str(out))
                sig[mode] = ds.sigma.sel(run="r", window=args.window).dropna("step", how="all").values[:, : args.window]
                print(
                    f"# {n}x{P} {mode}: ingest {ti:.1f}s spectrum {ts:.1f}s load {os.getloadavg()[0]:.1f}", flush=True
                )
            ref = reference(root / "defaults.zarr", "r", args.window)
            err = float(np.max(np.abs(sig["defaults"] - ref["sigma"]) / ref["sigma"][:, :1]))
            same = bool(np.array_equal(sig["defaults"], sig["LocalCluster"]))
            rows.append(
                (
                    n,
                    P,
                    times["defaults"],
                    times["LocalCluster"],
                    ref["total"],
                    ref["loop"],
                    err,
                    same,
                    os.getloadavg()[0],
                )
            )
            print(f"# {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "\n| checkpoints x params | defaults: ingest + spectrum (s) | `--local-cluster 2` (s) | reference loop (s) "
        "| **reference / defaults** | LocalCluster / defaults | max rel. sigma diff vs reference | defaults = "
        "LocalCluster bits | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, P, d, lc, rt, rl, err, same, load in rows:
        print(
            f"| {n} x {P:,} ({n * P * 4 / 1e9:.2f} GB) | {d[2]:.1f} ({d[0]:.1f} + {d[1]:.1f}) | "
            f"{lc[2]:.1f} ({lc[0]:.1f} + {lc[1]:.1f}) | {rt:.1f} | **{rt / d[2]:.1f}x** | {lc[2] / d[2]:.1f}x | "
            f"{err:.1e} | {'yes' if same else 'no'} | {load:.1f} |"
        )


if __name__ == "__main__":
    main()
