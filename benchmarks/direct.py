"""Spectrum straight from checkpoint files vs ingest + spectrum of the store, on the same files.

Writes ``--n-ckpts`` synthetic GPT-shaped float32 checkpoints (``benchmarks/ingest.py``'s model) and
measures, in one run and on the same files, with the threaded scheduler (all cores of this process):

* raw read       - sequential ``readinto`` of every checkpoint file in 64 MiB blocks (what ``cat`` does);
* ingest         - ``sed_dask.ingest`` into a fresh store (default 4 MiB chunks, 64 MiB shards);
* store spectrum - ``sed_dask.spectrum`` of that store;
* direct         - ``sed_dask.spectrum(sed_dask.open_checkpoints(...))``: validation of every header,
                   then the same one-pass Gram read straight from the files (no store).

Every timing is wall time; the direct and store results are asserted bit-identical. "warm": the
files are in the page cache (best of ``--repeat``). "cold": the pages of the files about to be read
(checkpoints, or the store's chunk files for the store spectrum) were evicted right before with
``posix_fadvise(DONTNEED)`` (only those files).

Usage: python benchmarks/direct.py --size 0.4 --n-ckpts 12 --windows 5,10
Prints a markdown table. Data goes to --dir (default bench-data/direct, git-ignored), removed unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from sed_dask.store.trajectory import LOCK_DIR_SUFFIX

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import evict, read_sequential, write_checkpoints  # noqa: E402  (benchmarks/ingest.py)


def _files(path) -> list[str]:
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs)


def measure(paths, ckdir: str, store: str, windows, *, cold: bool, repeat: int) -> dict:
    import sed_dask

    kw = dict(windows=windows, scheduler="threads", progress=False)
    best: dict[str, float] = {}

    def timed(name, fn, evict_first):
        if cold:
            evict(evict_first())
        t0 = time.perf_counter()
        out = fn()
        best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        return out

    for _ in range(1 if cold else repeat):
        timed("raw", lambda: read_sequential(paths), lambda: paths)
        shutil.rmtree(store, ignore_errors=True)
        timed("ingest", lambda: sed_dask.ingest(ckdir, store, "r", scheduler="threads", progress=False), lambda: paths)
        ds_store = timed("store_spectrum", lambda: sed_dask.spectrum(store, **kw), lambda: _files(store))
        ds_direct = timed(
            "direct", lambda: sed_dask.spectrum(sed_dask.open_checkpoints(ckdir, run="r"), **kw), lambda: paths
        )
        for v in ("sigma", "edge_ratio", "k_star"):
            assert np.array_equal(ds_store[v].values, ds_direct[v].values, equal_nan=True), v
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=float, default=0.4, help="checkpoint size in GB")
    ap.add_argument("--n-ckpts", type=int, default=12)
    ap.add_argument("--d", type=int, default=1024, help="model width of the synthetic GPT")
    ap.add_argument("--windows", default="5,10")
    ap.add_argument("--formats", default="safetensors", help="safetensors,pt,dcp")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--dir", default="bench-data/direct")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    windows = [int(w) for w in a.windows.split(",")]
    rows = []
    for fmt in a.formats.split(","):
        ckdir = os.path.join(a.dir, fmt)
        paths = write_checkpoints(ckdir, int(a.size * 1e9), a.n_ckpts, fmt, a.d)
        store = os.path.join(a.dir, f"{fmt}.zarr")
        nbytes = sum(os.path.getsize(p) for p in paths)
        for cold in [False] if a.no_cold else [False, True]:
            t = measure(paths, ckdir, store, windows, cold=cold, repeat=a.repeat)
            both = t["ingest"] + t["store_spectrum"]
            rows.append((fmt, "cold" if cold else "warm", nbytes, t, both))
            print(f"{fmt} {'cold' if cold else 'warm'}: {t}", file=sys.stderr)
        if not a.keep:
            shutil.rmtree(ckdir)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(os.path.join(a.dir, f".{fmt}.zarr{LOCK_DIR_SUFFIX}"), ignore_errors=True)
    size = f"{a.n_ckpts} x {nbytes / a.n_ckpts / 1e9:.2f} GB"
    print(f"\nwindows {windows}, threads scheduler ({os.cpu_count()} cores); seconds (GB/s of checkpoint bytes)\n")
    print(
        "| format | checkpoints | cache | raw read | ingest | store spectrum | ingest + spectrum | **direct spectrum** "
        "| direct / raw read (speed) | direct / store spectrum (speed) | direct vs ingest + spectrum |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt, cache, nb, t, both in rows:

        def cell(s):
            return f"{s:.2f} s ({nb / 1e9 / s:.2f})"

        print(
            f"| {fmt} | {size} | {cache} | {cell(t['raw'])} | {cell(t['ingest'])} | {cell(t['store_spectrum'])} "
            f"| {cell(both)} | **{cell(t['direct'])}** | {t['raw'] / t['direct']:.0%} "
            f"| {t['store_spectrum'] / t['direct']:.0%} | {both / t['direct']:.1f}x faster |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
