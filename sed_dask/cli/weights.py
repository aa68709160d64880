"""``sed-dask weights compute|align``: per-layer weight spectra over a trajectory, and update alignment.

``sed-dask query RESULTS weights escape|series|table|align [--json]`` queries the stores these write
(registered from here into ``sed-dask query`` by :func:`register_query`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sed_dask.cli import add_cluster_args, execution_context, steps_arg


def register(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="weight spectra of every checkpoint (MP bulk, outliers, alpha) and update/outlier alignment",
        description="Per-layer weight spectra over a whole trajectory, one Dask task per "
        "(checkpoint, 2-D tensor), and the alignment of update directions with "
        "the weights' top singular subspaces. Query the output with "
        "`sed-dask query OUT weights ...`.",
    )
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    c = wsub.add_parser(
        "compute",
        help="top-k sigma, ESD, MP fit, outliers, alpha, norms for every checkpoint",
        description="Every 2-D weight (conv kernels as out x in*kh*kw) of every checkpoint: top-k "
        "singular values (exact LAPACK SVD for small matrices, Gram eigvalsh up to "
        "--esd-max-dim, randomized with the JL operator beyond), the ESD, a "
        "Marchenko-Pastur bulk fit, outliers above the edge + Tracy-Widom margin, the "
        "CSN power-law alpha, stable rank and norms; written as an xarray Dataset "
        "(run, step, layer[, sv | eig]) to Zarr.",
    )
    c.add_argument("store", nargs="?", default=None, help="trajectory store path or URL (omit with --checkpoints)")
    c.add_argument(
        "-o", "--output", required=True, help="output Zarr: a new path, or an existing results store with --overwrite"
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing results store at --output")
    c.add_argument(
        "--runs",
        default=None,
        metavar="LIST",
        help="runs, comma-separated (default all); with --checkpoints the name of each run in order",
    )
    c.add_argument(
        "--checkpoints",
        action="append",
        metavar="SRC",
        help="read a run's checkpoint files directly (a directory or glob; repeat for several runs)",
    )
    c.add_argument(
        "--metrics",
        action="append",
        metavar="FILE",
        help="metrics (JSON/CSV) of each --checkpoints run, in the same order",
    )
    c.add_argument("--steps", metavar="LIST", help="only these checkpoint steps, comma-separated")
    c.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="analyse only this tensor (exact name; repeatable; default every 2-D tensor)",
    )
    c.add_argument("--exclude", action="append", metavar="RX", help="leave out tensors matching RX (repeatable)")
    c.add_argument("-k", type=int, default=None, help="top singular values per matrix (default sed_dask.weights.k)")
    c.add_argument(
        "--exact-bytes",
        default=None,
        help="float64 bytes of a matrix decomposed whole, e.g. 128MiB (default weights.exact-bytes)",
    )
    c.add_argument(
        "--esd-max-dim",
        type=int,
        default=None,
        help="largest min(rows, cols) with an ESD (default weights.esd-max-dim)",
    )
    c.add_argument(
        "--outlier-alpha",
        type=float,
        default=None,
        help="Tracy-Widom tail probability of the outlier margin: 0.1, 0.05, 0.01, 0.005 or 0.001",
    )
    c.add_argument("--no-esd", action="store_true", help="store only the summaries, not every eigenvalue")
    c.add_argument("--progress", action="store_true", help="draw a progress bar")
    add_cluster_args(c)
    c.set_defaults(func=run_compute)

    a = wsub.add_parser(
        "align",
        help="principal angles: window update directions vs weight singular subspaces",
        description="For each window of W deltas: the top-q update directions (window SVD "
        "from one banded-Gram pass) restricted to each layer and reshaped to its "
        "matrix; principal angles between their top-k left/right subspaces and the "
        "weight's top-k singular subspaces at the window's newest checkpoint.",
    )
    a.add_argument("store", help="trajectory store path or URL")
    a.add_argument("-o", "--output", required=True, help="output Zarr (new, or a results store with --overwrite)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing results store at --output")
    a.add_argument("--run", default=None, help="run name (default: the store's first run)")
    a.add_argument("--window", "-W", type=int, default=10, help="deltas per window (default 10)")
    a.add_argument("-k", type=int, default=3, help="dimension of the compared subspaces (default 3)")
    a.add_argument("--n-directions", type=int, default=3, help="top update directions per window (default 3)")
    a.add_argument("--stride", type=int, default=1, help="every stride-th window (default 1)")
    a.add_argument("--layer", action="append", metavar="NAME", help="only this tensor (repeatable)")
    a.add_argument("--exclude", action="append", metavar="RX", help="leave out tensors matching RX (repeatable)")
    add_cluster_args(a)
    a.set_defaults(func=run_align)


def _source(args):
    from sed_dask.sources.checkpoint_run import open_checkpoints

    runs = [r for r in args.runs.split(",") if r] if args.runs else None
    if bool(args.store) == bool(args.checkpoints):
        raise ValueError("give a trajectory STORE or --checkpoints DIR (one of them)")
    if args.store:
        if args.metrics:
            raise ValueError("--metrics goes with --checkpoints (a store carries its metrics)")
        return args.store, runs, steps_arg(args.steps)
    names = runs or [os.path.basename(os.path.normpath(d)) for d in args.checkpoints]
    if len(names) != len(args.checkpoints):
        raise ValueError(f"--runs names {len(names)} run(s) for {len(args.checkpoints)} --checkpoints")
    metrics = args.metrics or [None] * len(names)
    if len(metrics) != len(names):
        raise ValueError(f"{len(metrics)} --metrics file(s) for {len(names)} --checkpoints (give one per run)")
    src = [
        open_checkpoints(d, run=n, metrics=m, steps=steps_arg(args.steps))
        for d, n, m in zip(args.checkpoints, names, metrics)
    ]
    return src, None, None


def run_compute(args: argparse.Namespace) -> int:
    from sed_dask.weights import weight_spectra

    source, runs, steps = _source(args)
    kw = {
        "runs": runs,
        "layers": args.layer,
        "exclude": args.exclude,
        "steps": steps,
        "k": args.k,
        "exact_bytes": args.exact_bytes,
        "esd_max_dim": args.esd_max_dim,
        "outlier_alpha": args.outlier_alpha,
        "keep_esd": False if args.no_esd else None,
        "output": args.output,
        "overwrite": args.overwrite,
        "progress": args.progress,
    }
    with execution_context(args, kw) as client:
        ds = weight_spectra(source, client=client, **kw)
    methods = {str(m) for m in ds["layer_method"].values}
    print(
        f"wrote {args.output}: {ds.sizes['run']} run(s) x {ds.sizes['step']} steps x {ds.sizes['layer']} layers "
        f"({ds.attrs['n_tasks']} tasks; methods {sorted(methods)}); query with "
        f"`sed-dask query {args.output} weights escape`"
    )
    return 0


def run_align(args: argparse.Namespace) -> int:
    from sed_dask.weights import update_alignment

    kw = {
        "run": args.run,
        "window": args.window,
        "k": args.k,
        "n_directions": args.n_directions,
        "stride": args.stride,
        "layers": args.layer,
        "exclude": args.exclude,
        "output": args.output,
        "overwrite": args.overwrite,
    }
    with execution_context(args, kw) as client:
        ds = update_alignment(args.store, client=client, **kw)
    print(
        f"wrote {args.output}: {ds.sizes['step']} windows (W={args.window}) x {ds.sizes['layer']} layers; "
        f"query with `sed-dask query {args.output} weights align`"
    )
    return 0


# ----------------------------------------------------------------------------- sed-dask query RESULTS weights ...
QUERIES = ("escape", "series", "table", "align")


def register_query(sub) -> None:
    """Add ``weights`` to ``sed-dask query RESULTS`` (its own actions; ``--json`` on each)."""
    p = sub.add_parser(
        "weights",
        help="weight-spectra queries: escape steps, alpha/outlier series, layer table, update alignment",
        description="Queries on a `sed-dask weights compute` (escape, series, table) or "
        "`sed-dask weights align` (align) store.",
    )
    qs = p.add_subparsers(dest="weights_query", required=True, metavar="WQUERY")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("--layer", action="append", metavar="NAME", help="only this layer (repeatable)")
    q = qs.add_parser("escape", parents=[common], help="per layer: the step an outlier first escapes the bulk")
    q.add_argument("--run", action="append", help="run (repeatable; default all)")
    q.add_argument(
        "--sustain", type=int, default=2, help="checkpoints the count must stay above its first value (default 2)"
    )
    q = qs.add_parser("series", parents=[common], help="one variable over training (default n_outliers)")
    q.add_argument("--run", action="append", help="run (repeatable; default all)")
    q.add_argument(
        "--var",
        default="n_outliers",
        help="n_outliers, alpha, spectral_norm, frobenius_norm, stable_rank, mp_edge, mp_s2, mp_ks, outlier_threshold",
    )
    q = qs.add_parser("table", parents=[common], help="cross-layer table at one checkpoint (default: the last)")
    q.add_argument("--run", default=None, help="run (default: the first)")
    q.add_argument("--step", type=int, default=None, help="checkpoint step (default: the run's last)")
    q.add_argument("--sustain", type=int, default=2, help="sustain of the escape-step column (default 2)")
    qs.add_parser("align", parents=[common], help="per layer and side: overlap with the weight's top-k subspace")
    p.set_defaults(func=run_query)


def run_query(args: argparse.Namespace) -> int:
    from sed_dask.store.outputs import open_results
    from sed_dask.weights import queries

    ds = open_results(args.results).load()
    kind = ds.attrs.get("sed_kind")
    want = "weight_alignment" if args.weights_query == "align" else "weight_spectra"
    if kind != want:
        raise ValueError(
            f"{args.results} is a {kind or 'spectra'} store; `weights {args.weights_query}` needs a "
            f"{want} store (from `sed-dask weights {'align' if want == 'weight_alignment' else 'compute'}`)"
        )
    q = args.weights_query
    if q == "escape":
        df = queries.escape_steps(ds, runs=args.run, layers=args.layer, sustain=args.sustain)
    elif q == "series":
        df = queries.series(ds, args.var, runs=args.run, layers=args.layer)
    elif q == "table":
        df = queries.layer_table(ds, run=args.run, step=args.step, sustain=args.sustain)
        if args.layer:
            df = df[df["layer"].isin(args.layer)]
    else:
        df = queries.alignment_summary(ds, layers=args.layer)
    defs = ds.attrs.get("definitions") or ds.attrs.get("definition")
    if args.json:
        json.dump(
            {
                "query": f"weights {q}",
                "results": args.results,
                "table": json.loads(df.to_json(orient="records")),
                "definitions": json.loads(defs) if defs and defs.startswith("{") else defs,
            },
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
        return 0
    import pandas as pd

    with pd.option_context(
        "display.width",
        200,
        "display.max_columns",
        50,
        "display.max_rows",
        500,
        "display.float_format",
        "{:.4g}".format,
    ):
        print(f"== weights {q} ==")
        print(df.to_string(index=False) if len(df) else "(none)")
    if defs:
        print("\n== definitions ==")
        items = json.loads(defs).items() if defs.startswith("{") else [("alignment", defs)]
        print("\n".join(f"- {k}: {v}" for k, v in items))
    return 0
