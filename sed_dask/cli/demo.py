"""``sed-dask demo [--quick] [-o DIR]``: the whole pipeline on a small grokking transformer."""

from __future__ import annotations

import argparse
import contextlib

from sed_dask.cli import add_cluster_args


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small grokking transformer and run ingest -> spectrum -> analysis -> report",
        description="Train (or reuse) the demo runs ((a+b) mod 97, 3 seeds x 2000 steps; --quick: 1 seed x "
        "700 steps), ingest them into one trajectory store, compute spectra for several W on a "
        "Dask cluster (a temporary 2-worker LocalCluster unless one is given; --threads: in this "
        "process), run the edge, "
        "phase, collapse, lag and early-warning queries, and write DIR/report/ and "
        "DIR/findings.json.",
    )
    p.add_argument("--quick", action="store_true", help="one seed, 700 steps (about a minute)")
    p.add_argument("-o", "--out-dir", default="sed-demo", help="output directory (default ./sed-demo)")
    p.add_argument(
        "--windows",
        default=None,
        metavar="LIST",
        help="window lengths W, comma-separated (default 5,10,20; quick 5,10,15)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--live",
        action="store_true",
        help="train one seed and watch it at once (sed-dask watch): the edge after every checkpoint and "
        "each early-warning alert as it is raised, then each alert's lead over grokking",
    )
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.config import load_config_file, use_config
    from sed_dask.demo.pipeline import run_demo

    windows = [int(w) for w in args.windows.split(",") if w.strip()] if args.windows else None
    if args.live:
        from sed_dask.demo.live import run_live_demo

        run_live_demo(args.out_dir, quick=args.quick, windows=windows, echo=lambda line: print(line, flush=True))
        return 0
    local = {}
    if args.n_workers or args.local_cluster:
        local["n_workers"] = args.n_workers or args.local_cluster
    if args.memory_limit:
        local["memory_limit"] = args.memory_limit
    # the cluster is started by run_demo after training, so that training has the cores to itself
    settings = use_config(load_config_file(args.config)) if args.config else contextlib.nullcontext()
    if args.connect_timeout:
        import dask

        settings_timeout = dask.config.set({"sed_dask.connect.timeout": args.connect_timeout})
    else:
        settings_timeout = contextlib.nullcontext()
    with settings, settings_timeout:
        run_demo(
            args.out_dir,
            quick=args.quick,
            address=args.scheduler_address,
            scheduler_file=args.scheduler_file,
            windows=windows,
            progress=not args.no_progress,
            local_kwargs=local,
            scheduler="threads" if args.threads else None,
        )
    return 0
