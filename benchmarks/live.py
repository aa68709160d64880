"""Live SED: update latency per new checkpoint against N, batch recompute, raw reads; alert delay.

All in one run, side by side: for each N the store holds N checkpoints and the live results N-1
deltas; one checkpoint is appended (a real store append: allocate, write the row, mark complete) and
timed are (a) LiveSpectrum.update() for it, (b) the batch `spectrum` over all N+1 checkpoints, (c) a raw
read of the new checkpoint's row and (d) of the last W_max+1 rows. Then a watcher thread follows a
TrajectoryRecorder folder with a planted edge collapse; the delay from a checkpoint's rename into place
to its alert line being printed is measured.

    python benchmarks/live.py [--params 1000000] [--ns 40,80,160,320] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import warnings

import numpy as np

warnings.simplefilter("ignore")


def uptime() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def append_row(rs, step, x):
    row = int(rs.allocate([step])[0])
    rs.params[row, :] = x
    rs.mark_complete(row)


def latency(args):
    from sed_dask.live.incremental import LiveSpectrum
    from sed_dask.results.spectra import spectrum
    from sed_dask.store.trajectory import open_store, write_trajectory

    rng = np.random.default_rng(0)
    P, W = args.params, 10
    d = tempfile.mkdtemp(prefix="sed-live-bench-")
    ns = [int(x) for x in args.ns.split(",")]
    x = np.zeros(P, np.float32)
    rows = []
    for _ in range(ns[0]):
        x = x + rng.standard_normal(P).astype(np.float32) * 0.01
        rows.append(x.copy())
    store = os.path.join(d, "s.zarr")
    write_trajectory(store, "r", np.arange(ns[0]) * 10, np.stack(rows))
    live = LiveSpectrum(store, os.path.join(d, "live.zarr"), windows=(W,), scheduler="threads")
    live.update()
    n = ns[0]
    print(f"P={P:,} ({P * 4 / 2**20:.1f} MiB per checkpoint), W={W} (band width {W + 1}), load {uptime()}")
    print(
        "| N | live update (s) | batch recompute (s) | batch / update | raw read 1 ckpt (s) "
        "| raw read W_max+1 ckpts (s) "
        "| update / read(W_max+1) |"
    )
    print("|---|---|---|---|---|---|---|")
    for target in ns:
        while n < target:  # grow the run to N (live keeps up, untimed)
            x = x + rng.standard_normal(P).astype(np.float32) * 0.01
            append_row(open_store(store).run("r"), n * 10, x)
            live.update()
            n += 1
        up, ba, r1, rw = [], [], [], []
        for _ in range(args.reps):
            x = x + rng.standard_normal(P).astype(np.float32) * 0.01
            append_row(open_store(store).run("r"), n * 10, x)
            n += 1
            t = time.perf_counter()
            live.update()
            up.append(time.perf_counter() - t)
            t = time.perf_counter()
            spectrum(store, windows=(W,), progress=False, scheduler="threads")
            ba.append(time.perf_counter() - t)
            rs = open_store(store, mode="r").run("r")
            t = time.perf_counter()
            rs.read(slice(n - 1, n))
            r1.append(time.perf_counter() - t)
            t = time.perf_counter()
            rs.read(slice(n - 1 - (W + 1), n))
            rw.append(time.perf_counter() - t)
        u, b, a1, aw = (float(np.median(v)) for v in (up, ba, r1, rw))
        print(f"| {target} | {u:.3f} | {b:.3f} | {b / u:.1f}x | {a1:.4f} | {aw:.4f} | {u / aw:.1f}x |", flush=True)


def alert_delay(args):
    import torch

    from sed_dask.live.watch import watch
    from sed_dask.sources.recorder import TrajectoryRecorder

    d = tempfile.mkdtemp(prefix="sed-live-alert-")
    folder = os.path.join(d, "run")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    rec = TrajectoryRecorder(folder, every=10)
    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    lines, stop = [], threading.Event()

    def echo(line):
        lines.append((time.time(), line))

    th = threading.Thread(
        target=lambda: watch(
            folder,
            results=os.path.join(d, "live.zarr"),
            windows=(5,),
            poll=0.05,
            settle=0.0,
            echo=echo,
            stop=stop,
            scheduler="threads",
        ),
        daemon=True,
    )
    th.start()
    written = {}
    for i in range(60):
        with torch.no_grad():
            for p, v in zip(model.parameters(), dirs):
                p += 0.01 * torch.randn(p.shape, generator=g) + (0.2 * v if i < 35 else 0)
        path = rec.save(i * 10, model)
        written[i * 10] = os.stat(path).st_mtime
        time.sleep(0.4)  # a training step between checkpoints
    time.sleep(2)
    stop.set()
    th.join(30)
    alerts = [(t, ln) for t, ln in lines if ln.startswith("ALERT")]
    print(
        f"\nalert delay (P={sum(p.numel() for p in model.parameters()):,}, W=5, planted collapse at step 350, "
        f"load {uptime()}):"
    )
    for t, ln in alerts:
        step = int(ln.split("step=")[1].split()[0])
        print(f"  {ln}  | {t - written[step]:.2f} s after the checkpoint was written")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--ns", default="40,80,160,320")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    latency(args)
    alert_delay(args)


if __name__ == "__main__":
    main()
