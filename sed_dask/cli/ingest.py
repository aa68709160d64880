"""``sed-dask ingest SRC... --store OUT --run NAME``: checkpoints -> trajectory store."""

from __future__ import annotations

import argparse
import dataclasses
import json

from sed_dask.cli import add_cluster_args, add_selection_args, execution_context, steps_arg


def register(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest checkpoints into a trajectory store (resumable)",
        description="Copy the selected parameters of every checkpoint into run NAME of a Zarr trajectory "
        "store, one Dask task per (checkpoint, shard). Re-running finishes an interrupted "
        "ingestion and appends later checkpoints; completed rows are never rewritten.",
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="checkpoint files, directories of checkpoints, sharded-checkpoint directories or globs",
    )
    p.add_argument("--store", required=True, help="trajectory store path or fsspec URL")
    p.add_argument("--run", required=True, help="run name inside the store (e.g. seed3)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="the run's training seed, recorded with the run and carried into results as the 'seed' "
        "coordinate (default: the seed the run name spells, e.g. seed3 -> 3)",
    )
    p.add_argument("--metrics", metavar="FILE", help="metrics by step (JSON or CSV; e.g. pilot_metrics.json)")
    p.add_argument(
        "--metrics-nonfinite",
        choices=["warn", "raise", "ignore"],
        default="warn",
        help="explicit NaN/Inf metric values: keep them with a warning (default), refuse the file, "
        "or keep them silently",
    )
    p.add_argument(
        "--step-source",
        choices=["name", "file"],
        default="name",
        help="a checkpoint's step: from its file name (default; a file recording another step is "
        "warned about) or the step the file records (e.g. a top-level 'step' entry)",
    )
    add_selection_args(p, policy_note="; an existing run keeps its own")
    p.add_argument(
        "--on-nonfinite",
        choices=["raise", "record"],
        default=None,
        help="NaN/Inf in a parameter: fail that checkpoint (default) or store it and record it",
    )
    p.add_argument("--chunk-bytes", default=None, help="Zarr read unit along P for a new run (e.g. 4MiB)")
    p.add_argument("--shard-bytes", default=None, help="Zarr write unit (one task) for a new run (e.g. 64MiB)")
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another ingestion of the same run to finish (default 0: fail at once)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.store.ingest import ingest

    steps = steps_arg(args.steps)
    sources = args.sources[0] if len(args.sources) == 1 else args.sources
    kw = dict(
        steps=steps,
        metrics=args.metrics,
        policy=args.policy,
        include=args.include,
        exclude=args.exclude,
        on_nonfinite=args.on_nonfinite,
        chunk_bytes=args.chunk_bytes,
        shard_bytes=args.shard_bytes,
        lock_timeout=args.lock_timeout,
        progress=not args.no_progress,
        step_source=args.step_source,
        metrics_nonfinite=args.metrics_nonfinite,
        seed=args.seed,
    )
    ctx = execution_context(args, kw)
    with ctx as client:
        summary = ingest(sources, args.store, args.run, client=client, **kw)
    if args.json:
        d = dataclasses.asdict(summary)
        d["gb_per_s"] = summary.gb_per_s
        print(json.dumps(d))
    else:
        print(summary)
        for rec in summary.nonfinite:
            print(f"  non-finite: step {rec['step']} tensor {rec['tensor']}: {rec['n_nan']} NaN, {rec['n_inf']} Inf")
    return 0
