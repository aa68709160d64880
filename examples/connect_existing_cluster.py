"""Run sed_dask on a Dask cluster you already have (or a temporary local one).

    python examples/connect_existing_cluster.py STORE [--windows 5,10] [-o results.zarr]
        [--scheduler-address tcp://HOST:8786 | --scheduler-file scheduler.json]

STORE is a trajectory store (``sed-dask ingest`` / ``sed_dask.ingest`` output, e.g. the demo's
``sed-demo/trajectory.zarr``). With ``--scheduler-address`` or ``--scheduler-file`` (written by
``dask scheduler --scheduler-file``, dask-mpi or a SLURM job) the spectra run on that cluster; the
workers must see STORE at the same path. Without either, a 2-worker LocalCluster is started, with
a message, so the script also works on a laptop.
"""

from __future__ import annotations

import argparse

import sed_dask.analysis as A
from sed_dask.cluster.client import connect
from sed_dask.results.spectra import spectrum


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--windows", default="5,10")
    ap.add_argument("-o", "--output", default=None, help="write the results Zarr here")
    ap.add_argument("--scheduler-address", default=None)
    ap.add_argument("--scheduler-file", default=None)
    args = ap.parse_args(argv)

    if not (args.scheduler_address or args.scheduler_file):
        print(
            "no --scheduler-address / --scheduler-file given: starting a temporary LocalCluster "
            "(2 worker processes, 1 thread each)"
        )
    with connect(
        address=args.scheduler_address,
        scheduler_file=args.scheduler_file,
        local_kwargs={"n_workers": 2, "threads_per_worker": 1},
    ) as client:
        workers = client.scheduler_info()["workers"]
        print(f"connected: {client.scheduler.address}, {len(workers)} workers, dashboard {client.dashboard_link}")
        ds = spectrum(args.store, windows=[int(w) for w in args.windows.split(",")], client=client, output=args.output)
    rank = A.signal_rank(ds)["k_mode"].to_pandas()
    print("signal rank k* (mode over windows), runs x W:")
    print(rank)
    print("edge peak step:")
    print(A.collapse_step(ds, tau="auto")["peak_step"].to_pandas())


if __name__ == "__main__":
    main()
