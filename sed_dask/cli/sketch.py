"""``sed-dask sketch STORE --d 100 --seed 0 -o sketch.zarr``: one pass -> JL sketch of every delta."""

from __future__ import annotations

import argparse

from sed_dask.cli import add_cluster_args, execution_context


def register(sub) -> None:
    p = sub.add_parser(
        "sketch",
        help="JL sketch Phi^T delta of every delta (N x d per run), chunking-invariant",
        description="Read each run once and store S_i = Phi^T delta_i (float64, N x d) as an xarray "
        "Dataset sketch(run, step, dim) in Zarr. Phi comes from counter-based RNG tiles keyed by "
        "(seed, tile), so the sketch is bit-identical under any chunking or number of workers. "
        "Spectra of any window W can then be computed from the sketch alone "
        "(sed_dask.results.sketch_spectra.spectra_from_sketch).",
    )
    p.add_argument("store", help="trajectory store path or fsspec URL")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="sketch Zarr path: a new path, or an existing results store with --overwrite (never "
        "a trajectory store or a folder of other files); written beside it, then moved into place",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing results store at --output")
    p.add_argument(
        "--d",
        type=int,
        default=None,
        help="sketch dimension (default sed_dask.sketch.d, 100; d = 10 W keeps edge ratios within ~6%%)",
    )
    p.add_argument("--seed", type=int, default=None, help="operator seed (default sed_dask.sketch.seed)")
    p.add_argument(
        "--distribution",
        choices=["gaussian", "rademacher", "sparse", "osnap"],
        default=None,
        help="entries of Phi (default sed_dask.sketch.distribution); osnap: s nonzeros per parameter, "
        "O(P s) random words, the cheapest; its columns do not nest (no d prefixes)",
    )
    p.add_argument(
        "--s",
        type=float,
        default=None,
        dest="s",
        help="sparse: an entry is nonzero with probability 1/s (default sqrt(P)); osnap: nonzeros per "
        "parameter, an integer (default sed_dask.sketch.osnap-s)",
    )
    p.add_argument(
        "--tile-elems",
        type=int,
        default=None,
        help="rows of Phi per RNG tile (part of Phi's definition; default sed_dask.sketch.tile-elems)",
    )
    p.add_argument("--runs", default=None, metavar="LIST", help="runs to sketch, comma-separated (default: all)")
    p.add_argument("--tile-bytes", default=None, help="float32 bytes of deltas one task holds (e.g. 256MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.engine.sketch import sketch

    kw = dict(
        runs=[r for r in args.runs.split(",") if r] if args.runs else None,
        d=args.d,
        seed=args.seed,
        distribution=args.distribution,
        s=args.s,
        tile_elems=args.tile_elems,
        output=args.output,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tile_bytes=args.tile_bytes,
    )
    with execution_context(args, kw) as client:
        ds = sketch(args.store, client=client, **kw)
    print(
        f"wrote {args.output}: runs {', '.join(str(r) for r in ds.run.values)}; "
        f"{ds.sizes['step']} steps x d={ds.attrs['d']} "
        f"({ds.attrs['distribution']}, seed {ds.attrs['seed']}, tile {ds.attrs['tile_elems']}; "
        f"Phi checksum {ds.attrs['phi_checksum']})"
    )
    return 0
