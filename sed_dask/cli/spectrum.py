"""``sed-dask spectrum STORE --windows 10,20 -o results.zarr``: trajectory store -> spectra Dataset.

``sed-dask spectrum --checkpoints DIR [--checkpoints DIR2 ...] -o results.zarr`` reads checkpoint
files directly instead (no ingestion; see :mod:`sed_dask.sources.checkpoint_run`).
"""

from __future__ import annotations

import argparse

from sed_dask.cli import add_cluster_args, add_selection_args, execution_context, int_list, steps_arg


def register(sub) -> None:
    p = sub.add_parser(
        "spectrum",
        help="rolling-window spectra of every W from one pass over a trajectory store",
        description="Read each run once (one Dask task per step block x P range), build the banded "
        "float64 Gram of its deltas (global and per layer group), and write every window's "
        "singular values, ratios, k* variants and noise-floor quantities as an xarray "
        "Dataset in Zarr (schema: docs/result_schema.md).",
    )
    p.add_argument(
        "store", nargs="?", default=None, help="trajectory store path or fsspec URL (omit with --checkpoints)"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="results Zarr path: a new path, or an existing results store with --overwrite (never "
        "a trajectory store or a folder of other files); written beside it, then moved into place",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing results store at --output")
    p.add_argument("--windows", default="10", metavar="LIST", help="window lengths W, comma-separated (default 10)")
    p.add_argument(
        "--runs",
        default=None,
        metavar="LIST",
        help="runs to analyse, comma-separated (default: all); with --checkpoints: the name of each "
        "run, in order (default: each source's directory name)",
    )
    ck = p.add_argument_group(
        "straight from checkpoint files (no store; validated as `sed-dask ingest` does, before any task; "
        "every pass re-reads the files, so ingest for repeated analyses)"
    )
    ck.add_argument(
        "--checkpoints",
        action="append",
        metavar="SRC",
        help="a directory (or glob) of one run's checkpoints; repeat for several runs",
    )
    ck.add_argument(
        "--metrics",
        action="append",
        metavar="FILE",
        help="metrics by step (JSON or CSV) of each --checkpoints run, in the same order",
    )
    ck.add_argument(
        "--chunk-bytes",
        default=None,
        help="column unit of the tiles (default sed_dask.store.chunk-bytes; an ingested store's "
        "value gives results bit-identical to it)",
    )
    add_selection_args(ck)
    p.add_argument(
        "--groups",
        default=None,
        metavar="SPEC",
        help="layer groups: 'default' (stored labels), 'blocks', NAME=REGEX,... or NAME,NAME",
    )
    p.add_argument(
        "--precision",
        choices=["float64", "float32"],
        default=None,
        help="Gram accumulation (default float64; float32 is faster, ~1e-5 relative on sigma)",
    )
    p.add_argument(
        "--normalize-spacing",
        action="store_true",
        help="divide each delta by its step span (for unevenly spaced checkpoints)",
    )
    p.add_argument("--tile-bytes", default=None, help="float32 bytes one Gram task holds (e.g. 256MiB)")
    sk = p.add_argument_group("JL sketch in the same pass (added as variable 'sketch'; see `sed-dask sketch`)")
    sk.add_argument(
        "--sketch-d",
        type=int,
        default=None,
        metavar="D",
        help="also compute the JL sketch Phi^T delta of dimension D in the same read",
    )
    sk.add_argument("--sketch-seed", type=int, default=None, help="operator seed (default sed_dask.sketch.seed)")
    sk.add_argument(
        "--sketch-distribution",
        choices=["gaussian", "rademacher", "sparse", "osnap"],
        default=None,
        help="entries of Phi (default sed_dask.sketch.distribution)",
    )
    sk.add_argument(
        "--sketch-tile-elems",
        type=int,
        default=None,
        help="rows of Phi per RNG tile (default sed_dask.sketch.tile-elems)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_args(p)
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> list[int]:
    """Comma-separated integers, each once: ``3,,4`` and ``3,3`` are refused, not silently fixed."""
    return int_list(text, what)


def run(args: argparse.Namespace) -> int:
    from sed_dask.engine.grouping import parse_groups_arg
    from sed_dask.results.spectra import spectrum

    runs = [r for r in args.runs.split(",") if r] if args.runs else None
    source = _source(args, runs)
    kw = dict(
        runs=runs if args.store else None,
        windows=_ints(args.windows, "windows"),
        groups=parse_groups_arg(args.groups),
        precision=args.precision,
        normalize_spacing=args.normalize_spacing,
        output=args.output,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tile_bytes=args.tile_bytes,
    )
    extra = {
        k: v
        for k, v in (
            ("seed", args.sketch_seed),
            ("distribution", args.sketch_distribution),
            ("tile_elems", args.sketch_tile_elems),
        )
        if v is not None
    }
    if args.sketch_d is not None:
        kw["sketch"] = {"d": args.sketch_d, **extra}
    elif extra:
        raise ValueError("--sketch-seed/--sketch-distribution/--sketch-tile-elems need --sketch-d")
    with execution_context(args, kw) as client:
        ds = spectrum(source, client=client, **kw)
    dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
    runs = ", ".join(str(r) for r in ds.run.values)
    windows = ", ".join(str(int(w)) for w in ds.window.values)
    print(f"wrote {args.output}: runs {runs}; windows {windows} ({dims})")
    if "sketch" in ds:
        a = ds["sketch"].attrs
        print(
            f"  with JL sketch d={a['d']} ({a['distribution']}, seed {a['seed']}, tile {a['tile_elems']}; "
            f"Phi checksum {a['phi_checksum']})"
        )
    return 0


def _source(args: argparse.Namespace, runs):
    """The store argument, or the validated checkpoint runs of ``--checkpoints``."""
    import os

    from sed_dask.sources.checkpoint_run import open_checkpoints

    picked = [x for x, given in (("STORE", args.store), ("--checkpoints", args.checkpoints)) if given]
    if len(picked) != 1:
        raise ValueError("give a trajectory STORE or --checkpoints DIR (one of them)")
    ck = [args.policy, args.include, args.exclude, args.steps, args.metrics, args.chunk_bytes]
    if args.store:
        if any(x is not None for x in ck):
            raise ValueError("--metrics/--policy/--include/--exclude/--steps/--chunk-bytes go with --checkpoints")
        return args.store
    dirs = args.checkpoints
    names = runs or [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"--runs names {len(names)} run(s) for {len(dirs)} --checkpoints")
    metrics = args.metrics or [None] * len(dirs)
    if len(metrics) != len(dirs):
        raise ValueError(f"{len(metrics)} --metrics file(s) for {len(dirs)} --checkpoints (give one per run)")
    return [
        open_checkpoints(
            d,
            run=n,
            metrics=m,
            steps=steps_arg(args.steps),
            policy=args.policy,
            include=args.include,
            exclude=args.exclude,
            chunk_bytes=args.chunk_bytes,
        )
        for d, n, m in zip(dirs, names, metrics)
    ]
