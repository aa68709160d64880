"""``sed-dask report RESULTS -o DIR``: figures and summary tables of a results Zarr."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="figures + summary.html/md of a results Zarr (standard analyses included)",
        description="Open a results Dataset (sed-dask spectrum output), run the standard queries (signal "
        "rank, phases, tau-collapse, lag sweep vs val_loss, early-warning candidates vs the "
        "first val_acc >= 0.9) and write PNG figures, summary.html, summary.md and CSV tables.",
    )
    p.add_argument("results", help="results Zarr path or URL")
    p.add_argument(
        "-o",
        "--out-dir",
        required=True,
        help="report directory: new, empty, or an earlier report with --overwrite (never a folder of "
        "other files); built beside it, then moved into place",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out-dir")
    p.add_argument("--window", type=int, default=None, help="W of the single-W figures (default 10 if present)")
    p.add_argument(
        "--events",
        default=None,
        metavar="FILE",
        help="JSON {run: {event: step}} marked on the figures (default: grok from val_acc)",
    )
    p.add_argument(
        "--title", default=None, help='title of the summary page (default "Spectral Edge Dynamics: RESULTS")'
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="ZARR",
        help="add the weight-spectra section from a `sed-dask weights compute` store",
    )
    p.add_argument(
        "--alignment",
        default=None,
        metavar="ZARR",
        help="with --weights: add the alignment heat map from a `sed-dask weights align` store",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sed_dask.report.summary import make_report, standard_analysis
    from sed_dask.store.outputs import check_report_dir, open_results

    check_report_dir(os.path.abspath(args.out_dir), overwrite=args.overwrite)  # before any analysis
    ds = open_results(args.results).load()
    have = [int(w) for w in ds["window"].values]
    if args.window is not None and args.window not in have:
        print(f"sed-dask report: error: --window {args.window} is not in the results (W = {have})", file=sys.stderr)
        return 2
    events = None
    if args.events:
        with open(args.events) as f:
            events = json.load(f)
    analysis = standard_analysis(ds, window=args.window)
    if args.weights:
        analysis["weights"] = open_results(args.weights).load()
        if args.alignment:
            analysis["weight_alignment"] = open_results(args.alignment).load()
    elif args.alignment:
        raise ValueError("--alignment needs --weights (the section is built from the weight spectra)")
    from sed_dask.report.provenance import invocation

    out = make_report(
        ds,
        args.out_dir,
        events=events,
        analysis=analysis,
        overwrite=args.overwrite,
        command=invocation(),
        title=args.title or f"Spectral Edge Dynamics: {args.results}",
    )
    print(f"wrote {len(out)} files to {args.out_dir} (open {out['html']})")
    return 0
