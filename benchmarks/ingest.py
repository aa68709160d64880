"""Ingestion throughput vs raw reads of the same files, and worker peak RSS vs model size.

For each model size it writes ``--n-ckpts`` synthetic transformer-shaped float32 checkpoints and
measures, in the same run:

* raw read, 1 process   - sequential ``readinto`` of every file in 64 MiB blocks (what ``cat`` does);
* raw read, N processes - the same bytes read by N processes in 64 MiB pieces (ingest's parallelism);
* copy                  - ``shutil.copyfile`` of every file (kernel copy: read + write, no Python);
* ingest                - ``sed_dask.ingest`` on a LocalCluster of N single-threaded worker processes,
                          while a thread samples the RSS of every worker process (psutil, 10 ms).

"warm": the checkpoint files are in the page cache (read once before; best of --repeat).
"cold": their pages were evicted with posix_fadvise(DONTNEED) right before (disk reads).
The store is always written through the page cache (no fsync), as ingestion does.

Usage: python benchmarks/ingest.py --sizes 0.5,1.5 --n-ckpts 3 --workers 2 --shard-bytes 64MiB
Prints markdown tables. Data goes to --dir (default bench-data/ingest, git-ignored) and is removed
unless --keep.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time

import numpy as np
from dask.utils import format_bytes, parse_bytes

BLOCK = 64 << 20


# ----------------------------------------------------------------------------- data
def model_tensors(size_bytes: int, d: int, rng) -> dict[str, np.ndarray]:
    """A GPT-shaped state dict of about ``size_bytes`` float32 (embedding + blocks + final norm)."""
    vocab = 32768
    out = {"tok_emb.weight": rng.standard_normal((vocab, d), dtype=np.float32)}
    per_layer = 4 * (12 * d * d + 13 * d)
    n_layer = max(1, round((size_bytes - vocab * d * 4) / per_layer))
    for i in range(n_layer):
        p = f"blocks.{i}."
        out[p + "ln_1.weight"] = np.ones(d, np.float32)
        out[p + "ln_1.bias"] = np.zeros(d, np.float32)
        out[p + "attn.c_attn.weight"] = rng.standard_normal((3 * d, d), dtype=np.float32)
        out[p + "attn.c_attn.bias"] = rng.standard_normal(3 * d, dtype=np.float32)
        out[p + "attn.c_proj.weight"] = rng.standard_normal((d, d), dtype=np.float32)
        out[p + "attn.c_proj.bias"] = rng.standard_normal(d, dtype=np.float32)
        out[p + "ln_2.weight"] = np.ones(d, np.float32)
        out[p + "ln_2.bias"] = np.zeros(d, np.float32)
        out[p + "mlp.c_fc.weight"] = rng.standard_normal((4 * d, d), dtype=np.float32)
        out[p + "mlp.c_fc.bias"] = rng.standard_normal(4 * d, dtype=np.float32)
        out[p + "mlp.c_proj.weight"] = rng.standard_normal((d, 4 * d), dtype=np.float32)
        out[p + "mlp.c_proj.bias"] = rng.standard_normal(d, dtype=np.float32)
    out["ln_f.weight"] = np.ones(d, np.float32)
    out["ln_f.bias"] = np.zeros(d, np.float32)
    return out


def write_checkpoints(directory: str, size_bytes: int, n: int, fmt: str, d: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    sd = model_tensors(size_bytes, d, rng)
    paths = []
    for i in range(n):
        if i:  # a training step: perturb a few tensors in place (cheap, keeps files distinct)
            for k in list(sd)[1::7]:
                sd[k] += np.float32(1e-3)
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            p = os.path.join(directory, f"model_{100 * i}.safetensors")
            save_file(sd, p)
        elif fmt == "dcp":  # torch.distributed.checkpoint from one process: __0_0.distcp + .metadata
            import warnings

            import torch
            import torch.distributed.checkpoint as dcp

            step_dir = os.path.join(directory, f"step_{100 * i}")
            with warnings.catch_warnings():  # "no process group: saving from one process"
                warnings.simplefilter("ignore")
                dcp.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, checkpoint_id=step_dir)
            paths.extend(sorted(os.path.join(step_dir, f) for f in os.listdir(step_dir)))
            continue
        else:
            import torch

            p = os.path.join(directory, f"ckpt_{100 * i:06d}.pt")
            torch.save({"step": 100 * i, "model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- raw I/O baselines
def read_sequential(paths) -> float:
    buf = bytearray(BLOCK)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                n += k
    return n / (time.perf_counter() - t0)


_BUF = None


def _read_piece(args):
    global _BUF
    path, off, length = args
    if _BUF is None or len(_BUF) < length:
        _BUF = bytearray(BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [memoryview(_BUF)[:length]], off)
    finally:
        os.close(fd)


def read_parallel(paths, n: int, pool) -> float:
    pool.map(_read_piece, [(paths[0], 0, 1)] * n)  # allocate the per-process buffers first
    pieces = [
        (p, off, min(BLOCK, os.path.getsize(p) - off)) for p in paths for off in range(0, os.path.getsize(p), BLOCK)
    ]
    t0 = time.perf_counter()
    total = sum(pool.map(_read_piece, pieces, chunksize=1))
    return total / (time.perf_counter() - t0)


def evict(paths) -> None:
    """Drop these files' clean pages from the page cache (only theirs: other users are unaffected)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_files(paths, dest) -> float:
    os.makedirs(dest, exist_ok=True)
    total = sum(os.path.getsize(p) for p in paths)
    t0 = time.perf_counter()
    for p in paths:
        shutil.copyfile(p, os.path.join(dest, os.path.basename(p)))
    rate = total / (time.perf_counter() - t0)
    shutil.rmtree(dest)
    return rate


# ----------------------------------------------------------------------------- ingest + RSS
class RSSSampler(threading.Thread):
    def __init__(self, pids, every=0.01):
        super().__init__(daemon=True)
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.every = every
        self.peak = {p.pid: 0 for p in self.procs}
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except Exception:
                    pass
            time.sleep(self.every)

    def stop(self):
        self._stop_evt.set()
        self.join()


def run_ingest(client, paths, store, *, shard_bytes, chunk_bytes):
    import psutil

    from sed_dask.store.ingest import ingest

    pids = list(client.run(os.getpid).values())
    baseline = {p: psutil.Process(p).memory_info().rss for p in pids}
    sampler = RSSSampler(pids)
    sampler.start()
    try:
        t0 = time.perf_counter()
        summary = ingest(
            paths, store, "bench", client=client, shard_bytes=shard_bytes, chunk_bytes=chunk_bytes, progress=False
        )
        secs = time.perf_counter() - t0
    finally:
        sampler.stop()
    return summary, secs, baseline, sampler.peak


def _warm_worker():
    """Import everything a task may need first, so that import costs and library RSS are in the baseline."""
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    import sed_dask.readers  # noqa: F401
    import sed_dask.store.ingest  # noqa: F401

    return os.getpid()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5,1.5", help="model sizes in GB of float32, comma-separated")
    ap.add_argument("--n-ckpts", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-bytes", default="64MiB")
    ap.add_argument("--chunk-bytes", default="4MiB")
    ap.add_argument("--formats", default="safetensors", help="safetensors, pt and/or dcp, comma-separated")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "..", "bench-data", "ingest"))
    ap.add_argument(
        "--store-dir",
        default=None,
        help="where stores and copies are written (default: next to the checkpoints); e.g. a tmpfs "
        "such as /dev/shm to take the disk's write speed out of the measurement",
    )
    ap.add_argument("--memory-limit", default="6GiB", help="per worker (LocalCluster)")
    ap.add_argument("--repeat", type=int, default=2, help="warm measurements: best of this many")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    shard, chunk = parse_bytes(args.shard_bytes), parse_bytes(args.chunk_bytes)
    root = os.path.abspath(args.dir)
    rows = []
    ctx = mp.get_context("spawn")
    with (
        ctx.Pool(args.workers) as pool,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            memory_limit=args.memory_limit,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_warm_worker)
        for fmt in args.formats.split(","):
            for size in (float(s) for s in args.sizes.split(",")):
                d = os.path.join(root, f"{fmt}-{size}GB")
                shutil.rmtree(d, ignore_errors=True)
                out = os.path.join(os.path.abspath(args.store_dir), f"{fmt}-{size}GB") if args.store_dir else d
                os.makedirs(out, exist_ok=True)
                print(f"[{fmt} {size} GB] writing {args.n_ckpts} checkpoints ...", file=sys.stderr)
                paths = write_checkpoints(os.path.join(d, "ckpts"), int(size * 1e9), args.n_ckpts, fmt, args.d_model)
                r = {"fmt": fmt, "model": os.path.getsize(paths[0]), "n": len(paths)}
                read_sequential(paths)  # warm the page cache
                r["seq"] = max(read_sequential(paths) for _ in range(args.repeat))
                r["par"] = max(read_parallel(paths, args.workers, pool) for _ in range(args.repeat))
                r["cp"] = max(copy_files(paths, os.path.join(out, "copy")) for _ in range(args.repeat))
                best = None
                for i in range(args.repeat):
                    print(f"[{fmt} {size} GB] ingesting (warm {i + 1}) ...", file=sys.stderr)
                    res = run_ingest(
                        client, paths, os.path.join(out, f"warm{i}.zarr"), shard_bytes=shard, chunk_bytes=chunk
                    )
                    shutil.rmtree(os.path.join(out, f"warm{i}.zarr"))
                    if best is None or res[1] < best[1]:
                        best = res
                summary, secs, base, peak = best
                r.update(
                    total=summary.bytes,
                    ingest=summary.bytes / secs,
                    base=max(base.values()),
                    peak=max(peak.values()),
                    delta=max(peak[p] - base[p] for p in peak),
                )
                evict(paths)
                r["seq_cold"] = read_sequential(paths)
                evict(paths)
                print(f"[{fmt} {size} GB] ingesting (cold) ...", file=sys.stderr)
                summary, secs, base, peak = run_ingest(
                    client, paths, os.path.join(out, "cold.zarr"), shard_bytes=shard, chunk_bytes=chunk
                )
                r.update(ingest_cold=summary.bytes / secs, delta_cold=max(peak[p] - base[p] for p in peak))
                rows.append(r)
                if not args.keep:
                    shutil.rmtree(d, ignore_errors=True)
                    shutil.rmtree(out, ignore_errors=True)

    gb, mib = 1e9, 2**20
    print(
        f"\n{args.workers} worker processes x 1 thread; shard {format_bytes(shard)}, chunk {format_bytes(chunk)}; "
        f"{os.cpu_count()} cores; store written to {args.store_dir or root}; load average at the end "
        f"{os.getloadavg()[0]:.1f}.\n"
    )
    print(
        "Throughput (GB of float32 parameters per second; warm = sources in page cache, best of "
        f"{args.repeat}; cold = sources evicted first)\n"
    )
    print(
        f"| format | checkpoint | ckpts | raw read 1 proc | raw read {args.workers} procs | copy (cp) | **ingest** "
        f"| ingest / raw read 1 proc | ingest / raw read {args.workers} procs | ingest / copy "
        "| cold: raw read 1 proc | cold: **ingest** | cold: ingest / raw read |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fmt']} | {r['model'] / gb:.2f} GB | {r['n']} | {r['seq'] / gb:.2f} | {r['par'] / gb:.2f} "
            f"| {r['cp'] / gb:.2f} | **{r['ingest'] / gb:.2f}** | {100 * r['ingest'] / r['seq']:.0f}% "
            f"| {100 * r['ingest'] / r['par']:.0f}% | {100 * r['ingest'] / r['cp']:.0f}% "
            f"| {r['seq_cold'] / gb:.2f} | **{r['ingest_cold'] / gb:.2f}** "
            f"| {100 * r['ingest_cold'] / r['seq_cold']:.0f}% |"
        )
    print("\nWorker memory while ingesting (RSS of each worker process, max over workers)\n")
    print(
        "| format | checkpoint | shard | RSS before | peak RSS (warm) | peak − before (warm) | peak − before (cold) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fmt']} | {r['model'] / gb:.2f} GB | {format_bytes(shard)} | {r['base'] / mib:.0f} MiB "
            f"| {r['peak'] / mib:.0f} MiB | {r['delta'] / mib:.0f} MiB ({r['delta'] / shard:.1f} shards) "
            f"| {r['delta_cold'] / mib:.0f} MiB ({r['delta_cold'] / shard:.1f} shards) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
