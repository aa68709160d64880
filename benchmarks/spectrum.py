"""Benchmark the one-pass banded Gram / spectrum against raw reads and the reference approach.

Measures, in one run and on the same stores:

(a) pass throughput: ``sed_dask.spectrum`` end to end on a LocalCluster vs a raw sequential read of
    the store's chunk files (1 process, ``readinto``), warm (page cache) and cold (evicted);
(b) the reference approach (docs/method.md §15.1-15.2: all deltas in RAM, full N x N dot matrix in a Python
    double loop with a float64 cast per pair) on a trajectory that fits in RAM;
(c) worker peak RSS (psutil, every 20 ms) with a per-worker memory limit on a trajectory >= 4x it.

Prints markdown tables. Example:
    python benchmarks/spectrum.py --n-ckpts 60 --params 20e6 --big-ckpts 100 --big-params 25e6
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def _gb(n_bytes: float) -> float:
    return n_bytes / 1e9


def make_store(path: Path, run: str, n: int, P: int, *, seed: int = 0) -> None:
    """A random-walk trajectory written row by row (cheap: shifted views of one noise pool)."""
    from sed_dask.store.trajectory import write_trajectory

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(P + 4096) * 1e-3).astype(np.float32)
    drift = (rng.standard_normal(P) * 1e-3).astype(np.float32)

    class Rows:
        shape = (n, P)
        dtype = np.dtype(np.float32)

        def __init__(self):
            self.cur = (rng.standard_normal(P) * 0.02).astype(np.float32)
            self.i = -1

        def __getitem__(self, i):
            assert i == self.i + 1, "rows are produced in order"
            if i > 0:
                off = int(rng.integers(0, 4096))
                self.cur += pool[off : off + P] + drift * np.float32(np.sin(i / 7.0))
            self.i = i
            return self.cur

    write_trajectory(str(path), run, np.arange(n) * 200, Rows())


def chunk_files(path: Path, run: str) -> list[Path]:
    return sorted(p for p in (path / run / "params").rglob("*") if p.is_file() and p.name != "zarr.json")


def evict(files) -> None:
    """Drop these files' pages from the page cache (only them)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files) -> tuple[float, int]:
    """Sequential readinto of every chunk/shard file in 64 MiB blocks; (seconds, bytes)."""
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    t0, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(mv)
                if not k:
                    break
                total += k
    return time.perf_counter() - t0, total


class RSSSampler:
    """Peak RSS of given pids, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids, interval=0.02):
        import psutil

        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = {pid: 0 for pid in pids}
        self.base = {pid: p.memory_info().rss for pid, p in self.procs.items()}
        self.interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid, p in self.procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], p.memory_info().rss)
                except Exception:
                    pass
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def worker_cpu(client) -> float:
    """Total user+system CPU seconds of all worker processes (all their threads)."""
    import psutil

    def cpu():
        t = psutil.Process().cpu_times()
        return t.user + t.system

    return float(sum(client.run(cpu).values()))


def reference(path: Path, run: str, W: int) -> dict:
    """The reference approach: every delta in RAM, DOT[i, j] by a Python double loop, float64 casts per pair."""
    import zarr

    a = zarr.open_array(str(path / run / "params"), mode="r")
    n, P = a.shape
    t0 = time.perf_counter()
    prev = np.asarray(a[0])
    deltas = []
    for i in range(1, n):
        cur = np.asarray(a[i])
        deltas.append(cur - prev)
        prev = cur
    t_load = time.perf_counter() - t0
    N = len(deltas)
    dot = np.zeros((N, N))
    t1 = time.perf_counter()
    for i in range(N):
        di = deltas[i].astype(np.float64)
        for j in range(i, N):
            dot[i, j] = dot[j, i] = float(di @ deltas[j].astype(np.float64))
    t_loop = time.perf_counter() - t1
    sig = []
    for k in range(W - 1, N):
        lam = np.linalg.eigvalsh(dot[k - W + 1 : k + 1, k - W + 1 : k + 1])[::-1]
        sig.append(np.sqrt(np.clip(lam, 0, None)))
    return {"load": t_load, "loop": t_loop, "total": time.perf_counter() - t0, "sigma": np.array(sig)}


def precision_table(root: Path, n: int = 41, P: int = 2_000_000) -> list[tuple]:
    """Max relative sigma error of float64 vs float32 mode against numpy SVD of the explicit deltas."""
    from sed_dask.engine.gram import banded_gram
    from sed_dask.engine.windows import window_features
    from sed_dask.store.trajectory import write_trajectory

    rng = np.random.default_rng(0)
    cases = {
        "random walk": (rng.standard_normal((n - 1, P)) * 1e-3).astype(np.float32),
        "rank 4 + noise": (
            (rng.standard_normal((n - 1, 4)) * [10, 5, 2, 1.0]) @ rng.standard_normal((4, P)) * 1e-4
            + rng.standard_normal((n - 1, P)) * 3e-5
        ).astype(np.float32),
    }
    rows = []
    for name, D in cases.items():
        X = np.concatenate([(rng.standard_normal((1, P)) * 0.02).astype(np.float32), D]).cumsum(0).astype(np.float32)
        path = root / f"prec-{len(rows)}.zarr"
        rs = write_trajectory(str(path), "r", np.arange(n), X)
        Dx = np.diff(X, axis=0).astype(np.float64)
        for prec in ("float64", "float32"):
            t = time.perf_counter()
            g = banded_gram(rs, w_max=31, scheduler="threads", precision=prec)
            dt = time.perf_counter() - t
            for W in (10, 30):
                f = window_features(g["all"], W, n_params=P)
                hi, lo, smin = 0.0, 0.0, 1.0
                for t_, k in enumerate(range(W - 1, n - 1)):
                    s = np.linalg.svd(Dx[k - W + 1 : k + 1], compute_uv=False)
                    rel = np.abs(f["sigma"][t_] - s) / s
                    hi = max(hi, rel[s >= 0.1 * s[0]].max())
                    lo = max(lo, rel.max())
                    smin = min(smin, s[-1] / s[0])
                rows.append((name, prec, W, hi, lo, smin, dt))
        shutil.rmtree(path, ignore_errors=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/sed_bench_spectrum", help="scratch directory (deleted at the end)")
    ap.add_argument("--n-ckpts", type=int, default=60)
    ap.add_argument("--params", type=float, default=20e6)
    ap.add_argument("--windows", default="10", help="W list for the throughput runs, e.g. 10 or 10,20,30")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="warm repeats (best is reported)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--big-ckpts", type=int, default=100)
    ap.add_argument("--big-params", type=float, default=25e6)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument(
        "--precision-only",
        action="store_true",
        help="only the float64 vs float32 accuracy table (threaded scheduler, 41 x 2M)",
    )
    args = ap.parse_args(argv)
    if args.precision_only:
        import warnings

        from sed_dask.engine.gram import PrecisionWarning

        warnings.simplefilter("ignore", PrecisionWarning)
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        try:
            rows = precision_table(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(
            "| trajectory | precision | W | max rel. error, sigma >= 0.1 sigma_1 | max rel. error, all sigma | "
            "min sigma_W / sigma_1 | band time (s) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, prec, W, hi, lo, smin, dt in rows:
            print(f"| {name} | {prec} | {W} | {hi:.1e} | {lo:.1e} | {smin:.3f} | {dt:.1f} |")
        return

    import warnings

    import dask
    from distributed import Client, LocalCluster

    import sed_dask
    from sed_dask.engine.gram import PrecisionWarning

    warnings.simplefilter("ignore", PrecisionWarning)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    n, P = args.n_ckpts, int(args.params)
    windows = [int(w) for w in args.windows.split(",")]
    small = root / "small.zarr"
    rows_a, rows_b, rows_c = [], [], []
    try:
        if not small.exists():
            t = time.perf_counter()
            make_store(small, "r", n, P)
            print(f"# wrote {n} x {P} store ({_gb(n * P * 4):.2f} GB) in {time.perf_counter() - t:.0f}s", flush=True)
        files = chunk_files(small, "r")
        nbytes = n * P * 4
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0") as lc,
            Client(lc) as client,
        ):
            client.run(lambda: __import__("sed_dask.engine.gram"))
            for mode in ("warm", "cold"):
                for prec in ("float64", "float32"):
                    for ws in [windows] if len(windows) == 1 else [windows[:1], windows]:
                        best_raw, best_pass, best_cpu = np.inf, np.inf, np.inf
                        for _ in range(args.repeat if mode == "warm" else 1):
                            if mode == "cold":
                                evict(files)
                            else:
                                raw_read(files)
                            tr, got = raw_read(files)
                            best_raw = min(best_raw, tr)
                            if mode == "cold":
                                evict(files)
                            c0 = worker_cpu(client)
                            t = time.perf_counter()
                            sed_dask.spectrum(str(small), windows=ws, client=client, precision=prec, progress=False)
                            dt = time.perf_counter() - t
                            if dt < best_pass:
                                best_pass, best_cpu = dt, worker_cpu(client) - c0
                        rows_a.append(
                            (
                                mode,
                                prec,
                                ",".join(map(str, ws)),
                                _gb(got) / best_raw,
                                _gb(nbytes) / best_pass,
                                best_pass,
                                _gb(nbytes) / best_cpu,
                                os.getloadavg()[0],
                            )
                        )
                        print(f"# (a) {rows_a[-1]}", flush=True)
            if not args.no_reference:
                W = windows[0]
                t = time.perf_counter()
                ds = sed_dask.spectrum(str(small), windows=(W,), client=client, progress=False)
                t_ours = time.perf_counter() - t
                ref = reference(small, "r", W)
                ours = ds.sigma.sel(run="r", window=W).dropna("step", how="all").values[:, :W]
                err = float(np.max(np.abs(ours - ref["sigma"]) / ref["sigma"][:, :1]))
                rows_b.append(
                    (
                        W,
                        ref["load"],
                        ref["loop"],
                        ref["total"],
                        t_ours,
                        ref["total"] / t_ours,
                        ref["loop"] / t_ours,
                        err,
                    )
                )
                print(f"# (b) {rows_b[-1]}", flush=True)
        if not args.no_big:
            big = root / "big.zarr"
            nb, Pb = args.big_ckpts, int(args.big_params)
            if not big.exists():
                t = time.perf_counter()
                make_store(big, "r", nb, Pb, seed=1)
                print(
                    f"# wrote {nb} x {Pb} store ({_gb(nb * Pb * 4):.2f} GB) in {time.perf_counter() - t:.0f}s",
                    flush=True,
                )
            disk = sum(f.stat().st_size for f in chunk_files(big, "r"))
            with (
                LocalCluster(
                    n_workers=args.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                    memory_limit=args.memory_limit,
                ) as lc,
                Client(lc) as client,
            ):
                client.run(lambda: __import__("sed_dask.engine.gram"))
                pids = list(client.run(os.getpid).values())
                limit = dask.utils.parse_bytes(args.memory_limit)
                with RSSSampler(pids) as s:
                    t = time.perf_counter()
                    ds = sed_dask.spectrum(str(big), windows=(max(windows),), client=client, progress=False)
                    dt = time.perf_counter() - t
                after = list(client.run(os.getpid).values())
                ok = bool(np.isfinite(ds.sigma).any()) and sorted(after) == sorted(pids)
                rows_c.append(
                    (
                        nb,
                        Pb,
                        _gb(disk),
                        args.memory_limit,
                        max(s.base.values()) / 2**20,
                        max(s.peak.values()) / 2**20,
                        max(s.peak.values()) / limit,
                        dt,
                        _gb(nb * Pb * 4) / dt,
                        ok,
                    )
                )
                print(f"# (c) {rows_c[-1]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\nStore: {n} checkpoints x {P:,} float32 params ({_gb(n * P * 4):.2f} GB), 4 MiB chunks, "
        f"64 MiB shards, uncompressed; LocalCluster {args.workers} workers x 1 thread.\n"
    )
    print(
        "| cache | precision | windows W | raw sequential read (GB/s) | spectrum pass (GB/s) | pass time (s) | "
        "pass / raw read | GB per worker CPU-second | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, prec, ws, raw, ps, tp, gcpu, load in rows_a:
        print(
            f"| {mode} | {prec} | {ws} | {raw:.2f} | **{ps:.2f}** | {tp:.1f} | {100 * ps / raw:.0f}% | "
            f"{gcpu:.2f} | {load:.1f} |"
        )
    if rows_b:
        print(
            "\n| W | reference: load deltas (s) | reference: N x N dot loop (s) | reference total (s) | "
            "sed_dask spectrum (s) | **speed-up** | speed-up vs loop only | max rel. sigma difference |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for W, tl, tlp, tt, to, su, sul, err in rows_b:
            print(f"| {W} | {tl:.1f} | {tlp:.1f} | {tt:.1f} | {to:.1f} | **{su:.1f}x** | {sul:.1f}x | {err:.1e} |")
    if rows_c:
        print(
            "\n| checkpoints | params | on disk (GB) | worker memory limit | worker RSS before (MiB) | "
            "**peak worker RSS (MiB)** | peak / limit | pass time (s) | GB/s | completed, no worker restart |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for nb, Pb, disk, lim, base, peak, frac, dt, gbs, ok in rows_c:
            print(
                f"| {nb} | {Pb:,} | {disk:.1f} | {lim} | {base:.0f} | **{peak:.0f}** | {100 * frac:.0f}% | "
                f"{dt:.0f} | {gbs:.2f} | {'yes' if ok else 'NO'} |"
            )


if __name__ == "__main__":
    main()
