"""Analyse your own directory of checkpoints: ingest -> spectrum -> queries.

    python examples/analyse_checkpoint_dir.py CKPT_DIR [--metrics CKPT_DIR/metrics.json]
        [--windows 5,10] [--work DIR] [--scheduler-address tcp://HOST:8786]

CKPT_DIR holds ``ckpt_*.pt`` (or any layout sed_dask.sources.discover understands), written at a fixed
cadence, e.g. by ``examples/record_from_training.py``. The trajectory store and the results go to
``--work`` (default CKPT_DIR/sed); a second run re-uses the ingested steps. Without a scheduler
a temporary 2-worker LocalCluster is used.
"""

from __future__ import annotations

import argparse
import os

import sed_dask.analysis as A
from sed_dask.cluster.client import connect
from sed_dask.results.spectra import spectrum
from sed_dask.store.ingest import ingest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("--metrics", default=None, help="metrics JSON/CSV (default CKPT_DIR/metrics.json if present)")
    ap.add_argument("--windows", default="5,10")
    ap.add_argument("--work", default=None, help="where the store and results go (default CKPT_DIR/sed)")
    ap.add_argument("--run", default="run0", help="run name inside the trajectory store")
    ap.add_argument("--scheduler-address", default=None)
    args = ap.parse_args(argv)

    work = args.work or os.path.join(args.ckpt_dir, "sed")
    os.makedirs(work, exist_ok=True)
    metrics = args.metrics or (
        os.path.join(args.ckpt_dir, "metrics.json")
        if os.path.exists(os.path.join(args.ckpt_dir, "metrics.json"))
        else None
    )
    windows = [int(w) for w in args.windows.split(",")]
    store, results = os.path.join(work, "trajectory.zarr"), os.path.join(work, "results.zarr")

    with connect(address=args.scheduler_address, local_kwargs={"n_workers": 2, "threads_per_worker": 1}) as client:
        print("dashboard:", client.dashboard_link)
        summary = ingest(args.ckpt_dir, store, args.run, metrics=metrics, client=client)
        print(summary)
        ds = spectrum(store, windows=windows, client=client, output=results)

    print(f"results: {results}  dims {dict(ds.sizes)}")
    rank = A.signal_rank(ds)["k_mode"].sel(run=args.run)
    edge = A.edge_summary(ds)
    col = A.collapse_step(ds, tau="auto")
    for W in windows:
        print(
            f"W={W}: k* (mode) = {int(rank.sel(window=W))}, edge ratio max "
            f"{float(edge['edge_max'].sel(run=args.run, window=W)):.3f} at step "
            f"{int(col['peak_step'].sel(run=args.run, window=W))}, "
            f"collapse step (tau = MP noise level) {float(col['collapse_step'].sel(run=args.run, window=W)):.0f}"
        )
    if "val_loss" in ds and len(windows) >= 2:
        sweep = A.lag_sweep(ds, windows=windows, lags=range(-3, 6))
        print(
            "peak lag of r(edge ratio, val loss) by W:",
            {int(w): float(sweep["peak_lag"].sel(run=args.run, window=w)) for w in windows},
        )
        print("lag flips:\n", A.lag_flips(sweep))


if __name__ == "__main__":
    main()
