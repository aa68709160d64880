"""``sed-dask watch DIR|STORE --results R --windows ...``: live spectra and causal alerts while a run trains."""

from __future__ import annotations

import argparse

from sed_dask.cli import add_cluster_args, execution_context, int_list


def register(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="follow a checkpoint folder or a trajectory store: live spectra and early-warning alerts",
        description="Follow a checkpoint folder (ingesting each complete checkpoint into a trajectory store) or "
        "a store another ingest appends to; append each new checkpoint's band row and windows to the "
        "live results store R (bit-identical to `sed-dask spectrum` over the same checkpoints), run "
        "the causal detectors of `sed-dask query warning` on every new window, print each alert as one "
        "line and append it to a JSON-lines file (with --sketch-d, also append each new delta's JL "
        "sketch and its sketch spectra to a live sketch store, bit-identical to `sed-dask sketch`). "
        "Stops on --until, --idle-timeout or Ctrl-C (between updates: nothing half-written); "
        "re-running the same command resumes.",
    )
    p.add_argument("source", metavar="DIR|STORE", help="checkpoint folder, or trajectory store")
    p.add_argument("--results", "-o", required=True, metavar="R", help="live results store (Zarr; created or resumed)")
    p.add_argument("--windows", default="10", metavar="LIST", help="window lengths W, comma-separated (default 10)")
    p.add_argument(
        "--store",
        default=None,
        help="trajectory store a folder is ingested into (default: beside R, R-trajectory.zarr)",
    )
    p.add_argument("--run", default=None, help="run name (default: the folder's name, or the store's only run)")
    p.add_argument("--groups", default=None, help="layer groups: default, blocks, or name=regex,... (as spectrum)")
    p.add_argument("--alerts", default=None, metavar="FILE", help="alerts JSON-lines file (default R-alerts.jsonl)")
    p.add_argument("--until", type=int, default=None, metavar="STEP", help="stop after the checkpoint of STEP")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long without a new checkpoint",
    )
    p.add_argument("--poll", type=float, default=0.5, metavar="SECONDS", help="poll interval (default 0.5)")
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a file not renamed into place atomically is taken once unchanged this long (default 1)",
    )
    p.add_argument("--normalize-spacing", action="store_true", help="divide each delta by its step span")
    p.add_argument(
        "--sketch-d",
        type=int,
        default=None,
        metavar="D",
        help="also keep a live JL sketch (D columns) of every delta and its sketch spectra, bit-identical "
        "to `sed-dask sketch` over the same checkpoints (default: no sketch)",
    )
    p.add_argument("--sketch-seed", type=int, default=None, help="sketch operator seed (default sed_dask.sketch.seed)")
    p.add_argument(
        "--sketch-distribution",
        choices=["gaussian", "rademacher", "sparse", "osnap"],
        default=None,
        help="entries of the sketch operator (default sed_dask.sketch.distribution)",
    )
    p.add_argument(
        "--sketch-store",
        default=None,
        metavar="PATH",
        help="live sketch store (Zarr; default beside R, R-sketch.zarr)",
    )
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.engine.grouping import parse_groups_arg
    from sed_dask.live.watch import watch

    kw = {
        "results": args.results,
        "windows": int_list(args.windows, "windows", minimum=2),
        "store": args.store,
        "run": args.run,
        "groups": parse_groups_arg(args.groups),
        "alerts": args.alerts,
        "until": args.until,
        "idle_timeout": args.idle_timeout,
        "poll": args.poll,
        "settle": args.settle,
        "normalize_spacing": args.normalize_spacing,
        "sketch_d": args.sketch_d,
        "sketch_seed": args.sketch_seed,
        "sketch_distribution": args.sketch_distribution,
        "sketch_store": args.sketch_store,
    }
    if args.poll <= 0 or args.settle < 0:
        raise ValueError("--poll must be > 0 and --settle >= 0")
    if args.sketch_d is not None and args.sketch_d < 1:
        raise ValueError(f"--sketch-d {args.sketch_d}: the sketch dimension must be >= 1")
    if args.sketch_d is None and any(
        x is not None for x in (args.sketch_seed, args.sketch_distribution, args.sketch_store)
    ):
        raise ValueError("--sketch-seed/--sketch-distribution/--sketch-store need --sketch-d D")
    with execution_context(args, kw) as client:
        summary = watch(args.source, client=client, echo=lambda line: print(line, flush=True), **kw)
    print(
        f"watch stopped ({summary.stopped}): last step {summary.last_step}, {summary.n_updates} update(s), "
        f"{len(summary.alerts)} new alert(s)",
        flush=True,
    )
    return 0
