"""``sed-dask directions STORE --run R --window 10 -k 3 -o dirs.zarr``: parameter-space directions."""

from __future__ import annotations

import argparse

from sed_dask.cli import add_cluster_args, execution_context


def register(sub) -> None:
    p = sub.add_parser(
        "directions",
        help="top-k right singular vectors (parameter-space directions) of a window or a run",
        description="Tall-skinny SVD on Dask of one window's delta stack (or every delta of the run: "
        "trajectory PCA). Writes direction(component, param) float32 with the parameter index, "
        "sigma, the deltas' coefficients u, and per-layer-group loadings (fraction of ||v||^2 "
        "per group) to Zarr. Exact = TSQR; randomized = Halko range finder with power iterations.",
    )
    p.add_argument("store", help="trajectory store path or fsspec URL")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="directions Zarr path: a new path, or an existing results store with --overwrite (never "
        "a trajectory store or a folder of other files); written beside it, then moved into place",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing results store at --output")
    p.add_argument("--run", required=True, help="run name")
    p.add_argument("--window", type=int, default=None, help="deltas in the window (default: all deltas of the run)")
    p.add_argument("--end-step", type=int, default=None, help="step of the window's newest delta (default: last)")
    p.add_argument("-k", type=int, default=3, help="number of directions (default 3)")
    p.add_argument(
        "--method",
        choices=["exact", "randomized"],
        default="exact",
        help="exact tall-skinny QR + SVD (default) or randomized SVD (faster for large windows)",
    )
    p.add_argument("--center", action="store_true", help="subtract the mean delta first (PCA of the updates)")
    p.add_argument(
        "--groups",
        default="default",
        metavar="SPEC",
        help="layer groups for the loadings: 'default', 'blocks', NAME=REGEX,... or NAME,NAME",
    )
    p.add_argument("--n-oversamples", type=int, default=10, help="randomized: extra sketch columns (default 10)")
    p.add_argument("--n-power-iter", type=int, default=2, help="randomized: power iterations (default 2)")
    p.add_argument("--seed", type=int, default=None, help="randomized: seed (default sed_dask.sketch.seed)")
    p.add_argument("--tile-bytes", default=None, help="bytes of deltas one task holds (e.g. 256MiB)")
    add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.engine.directions import directions
    from sed_dask.engine.grouping import parse_groups_arg

    kw = dict(
        run=args.run,
        window=args.window,
        end_step=args.end_step,
        k=args.k,
        method=args.method,
        center=args.center,
        groups=parse_groups_arg(args.groups),
        n_oversamples=args.n_oversamples,
        n_power_iter=args.n_power_iter,
        seed=args.seed,
        output=args.output,
        overwrite=args.overwrite,
        tile_bytes=args.tile_bytes,
    )
    with execution_context(args, kw) as client:
        ds = directions(args.store, client=client, **kw)
    sig = ", ".join(f"{x:.4g}" for x in ds["sigma"].values)
    print(
        f"wrote {args.output}: {ds.sizes['component']} directions of {ds.attrs['n_params']} parameters "
        f"({ds.attrs['method']}, steps {ds.attrs['first_delta_step']}..{ds.attrs['end_step']}); sigma = [{sig}]"
    )
    load = ds["loading"].values
    groups = [str(g) for g in ds["group"].values]
    top = sorted(range(len(groups)), key=lambda i: -load[0, i])[:5]
    print("v1 loading: " + ", ".join(f"{groups[i]} {load[0, i]:.1%}" for i in top))
    return 0
