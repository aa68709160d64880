"""``sed-dask query RESULTS edge|pc2|phases|events|lag|granger|shift|warning [options]``.

Opens a Zarr results store (``xr.open_zarr``), runs one query family from
:mod:`sed_dask.analysis` and prints readable tables, or JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys

QUERIES = ("edge", "pc2", "phases", "events", "lag", "granger", "shift", "warning")


def _lags(text: str) -> list[int]:
    """``-5:8`` (a Python range) or ``-1,0,2`` (a list): non-empty, no repeated lag."""
    try:
        if ":" in text:
            a, b = text.split(":")
            out = list(range(int(a), int(b)))
        else:
            out = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lags must look like -5:8 or -1,0,2, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"lags {text!r} is an empty range (a:b needs a < b)")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"lags {text!r} repeats a lag")
    return out


def _tau(text: str):
    """A collapse threshold: 'auto' or a finite number > 0 (the series are ratios or magnitudes)."""
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number > 0 or 'auto', got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"tau must be a finite number > 0 or 'auto', got {text!r}")
    return v


def _tau_number(text: str) -> float:
    """``events --tau``: as :func:`_tau` without 'auto'."""
    v = _tau(text)
    if v == "auto":
        raise argparse.ArgumentTypeError("events --tau takes numbers (no 'auto')")
    return v


def _floor(text: str):
    """'none' -> no absolute floor, 'default' -> the spec's 20 for a rise, else a number."""
    return {"none": None, "default": "default"}[text] if text in ("none", "default") else float(text)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection and output")
    g.add_argument("--run", action="append", help="run to include (repeatable; default all)")
    g.add_argument("--window", "-W", type=int, action="append", help="window length W (repeatable)")
    g.add_argument("--group", action="append", help="layer group (repeatable)")
    g.add_argument("--var", default="edge_ratio",
                   help="series: variable name, sed_role or alias like r23 (default edge_ratio)")
    g.add_argument("--sv", type=int, default=None, help="sv index for variables with an sv dim")
    g.add_argument("--metrics", metavar="FILE",
                   help="attach metrics from a JSON/CSV file (exact step match) before the query")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def register(subparsers) -> None:
    p = subparsers.add_parser("query", help="analysis queries on a results store",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS", help="Zarr results store (path or URL)")
    sub = p.add_subparsers(dest="query", required=True, metavar="QUERY")
    common = _common()

    q = sub.add_parser("edge", parents=[common], help="signal rank, edge summary, null significance")
    q.add_argument("--null", action="store_true", help="also test the edge against the matched-norm null")
    q.add_argument("--n-null", type=int, default=999)
    q.add_argument("--norms", choices=("delta_norm", "equal"), default="delta_norm")
    q.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("pc2", parents=[common],
                       help="PC2 vs the matched-norm null: noise-transition step, pc2 CV, split-half")
    q.add_argument("--n-null", type=int, default=999)
    q.add_argument("--q", type=float, default=0.95, help="null quantile PC2 must exceed (default 0.95)")
    q.add_argument("--norms", choices=("delta_norm", "equal"), default="delta_norm")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sustain", type=int, default=1,
                   help="consecutive windows not above the null that mark the transition (1 = reference)")
    q.add_argument("--ddof", type=int, default=0, help="ddof of the pc2 CV's std (0 = reference)")

    q = sub.add_parser("phases", parents=[common], help="rise/plateau/collapse and collapse step")
    q.add_argument("--method", choices=("peak", "derivative", "threshold", "changepoint"), default="peak")
    q.add_argument("--tau", type=_tau, action="append",
                   help="collapse threshold (repeatable) or 'auto' = 1 + 2W^(-2/3); default 1.20")
    q.add_argument("--ddof", type=int, default=0, help="ddof of the cross-seed std (0 = reference)")

    q = sub.add_parser("events", parents=[common], help="event study: collapse -> target stabilisation lead")
    q.add_argument("--target", default="val_loss")
    q.add_argument("--tau", type=_tau_number, action="append",
                   help="collapse threshold (repeatable; default 1.15 1.20 1.25 1.30)")
    q.add_argument("--baseline", type=int, default=10, help="first dvl_smooth entries setting the threshold")
    q.add_argument("--factor", type=float, default=0.3, help="threshold = factor x their median")
    q.add_argument("--fallback", type=float, default=0.01, help="threshold when no baseline value exists")

    q = sub.add_parser("lag", parents=[common], help="lagged cross-correlation with a target")
    q.add_argument("--target", default="val_loss")
    q.add_argument("--lags", type=_lags, default=list(range(-5, 8)), help="e.g. -5:8 (default)")
    q.add_argument("--detrend", choices=("cubic", "quadratic", "linear", "none", "cubic_raw"),
                   default="cubic")
    q.add_argument("--peak", choices=("min", "absmax", "max"), default="min")
    q.add_argument("--sweep", action="store_true",
                   help="W sweep and lag flips: a flip needs both peaks interior to the lag grid and "
                        "significant; rejected sign changes are listed with the reason")
    q.add_argument("--n-null", type=int, default=999,
                   help="phase-randomised null draws for the peak p-value (0 = no null; default 999)")
    q.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the peak p-value (default 0.05)")
    q.add_argument("--seed", type=int, default=0, help="seed of the null draws (default 0)")
    q.add_argument("--sliding", choices=("center", "trailing"), help="sliding-window correlation summary")
    q.add_argument("--phase-method", choices=("peak", "derivative", "threshold", "changepoint"),
                   help="phase-specific correlations under this segmentation")

    q = sub.add_parser("granger", parents=[common], help="Granger causality (both directions)")
    q.add_argument("--target", default="val_loss")
    q.add_argument("--max-lag", type=int, default=2)
    q.add_argument("--covariate", action="append", help="contemporaneous covariate, e.g. lr (repeatable)")
    q.add_argument("--nuisance", action="append", help="residualise the feature on this series or 'trend'")
    q.add_argument("--direction", choices=("both", "forward", "reverse"), default="both")
    q.add_argument("--features", nargs="+", help="multivariate test of these features instead")
    q.add_argument("--n-perm", type=int, default=999)
    q.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("shift", parents=[common], help="CUSUM, t-test scan, max-derivative")
    q.add_argument("--method", action="append", choices=("cusum", "ttest", "maxderiv"))
    q.add_argument("--true-step", type=float)
    q.add_argument("--tolerance", type=float)
    q.add_argument("--baseline", type=int, default=8, help="CUSUM baseline points")
    q.add_argument("--cusum-k", type=float, default=0.5)
    q.add_argument("--cusum-h", type=float, default=4.0)
    q.add_argument("--min-size", type=int, default=5)
    q.add_argument("--smooth", action="store_true")

    q = sub.add_parser("warning", parents=[common], help="onset detection and lead time")
    q.add_argument("--k", type=float, default=10.0)
    q.add_argument("--baseline", type=int, default=3)
    q.add_argument("--floor", type=_floor, default="default",
                   help="absolute level, 'none', or 'default' (20 for a rise, none for a drop)")
    q.add_argument("--direction", choices=("rise", "drop"), default="rise")
    q.add_argument("--event", help="metric defining the event, e.g. val_acc")
    q.add_argument("--event-threshold", type=float, default=0.9)
    q.add_argument("--sustain", type=int, default=1)
    p.set_defaults(func=run)


def _table(ds, names=None):
    """A tidy DataFrame of the listed (or all) variables sharing the first one's dims."""
    names = list(ds.data_vars) if names is None else [n for n in names if n in ds.data_vars]
    if not names:
        import pandas as pd
        return pd.DataFrame()
    dims = ds[names[0]].dims
    names = [n for n in names if ds[n].dims == dims]
    return ds[names].to_dataframe().reset_index()[[*dims, *names]]


def tables(ds, args) -> dict:
    """Run the query in ``args.query``; return {title: DataFrame}."""
    from .. import analysis as A

    sel = dict(run=args.run, window=args.window, group=args.group)
    var, sv = args.var, args.sv
    out = {}
    if args.query == "edge":
        out["edge summary"] = _table(A.edge_summary(ds, variable=var, **sel))
        if args.null:
            r = A.edge_null(ds, n_null=args.n_null, norms=args.norms, seed=args.seed, **sel)
            out["edge vs matched-norm null (per series)"] = _table(r, ["frac_significant", "n_windows"])
            out["edge vs matched-norm null (per window)"] = _table(
                r, ["observed", "null_quantile", "p_value", "significant"]).dropna(subset=["observed"])
    elif args.query == "pc2":
        sh = "split_half" if "split_half" in ds.data_vars else None
        r = A.pc2_summary(ds, split_half=sh, n_null=args.n_null, q=args.q, norms=args.norms, seed=args.seed,
                          sustain=args.sustain, ddof=args.ddof, **sel)
        if sh is None:
            print("note: the store has no split_half (computed before it existed); split-half fields skipped",
                  file=sys.stderr)
        out["pc2 vs null (per series)"] = _table(r, ["noise_transition_step", "pc2_cv", "pc2_mean",
                                                     "null_pc2_mean", "split_half_k2_mean", "n_above_null",
                                                     "n_windows"])
        out["pc2 vs null (per window)"] = _table(
            r, ["pc2_pct", "null_pc2", "pc2_above_null", "split_half_k2"]).dropna(subset=["pc2_pct"])
    elif args.query == "phases":
        ph = A.phases(ds, var, method=args.method, sv=sv, **sel)
        out[f"phases ({args.method})"] = _table(ph, ["peak_step", "peak_value", "plateau_start_step",
                                                     "collapse_start_step", "n_points"])
        taus = args.tau or [1.20]
        cs = A.collapse_step(ds, var, sv=sv, tau=taus if len(taus) > 1 else taus[0], **sel)
        out["collapse step"] = _table(cs, ["collapse_step", "peak_step", "peak_value", "tau"])
        if "run" in cs.dims and cs.sizes["run"] > 1:
            out[f"cross-seed (ddof={args.ddof})"] = _table(
                A.cross_seed_summary(cs, ["collapse_step", "peak_value"], ddof=args.ddof))
    elif args.query == "events":
        from ..analysis.events import DEFAULT_TAUS

        r = A.event_study(ds, var, args.target, taus=args.tau or DEFAULT_TAUS, baseline=args.baseline,
                          factor=args.factor, fallback=args.fallback, sv=sv, **sel)
        out["event study (per tau)"] = _table(r, ["collapse_step", "stab_step", "lead_time"])
        out["event study (per series)"] = _table(r, ["peak_step", "peak_value", "threshold", "n_baseline",
                                                     "threshold_fallback", "n_points"])
    elif args.query == "lag":
        kw = dict(lags=args.lags, detrend=args.detrend, peak=args.peak, n_null=args.n_null, alpha=args.alpha,
                  seed=args.seed, sv=sv)
        peak_cols = ["peak_lag", "peak_r", "peak_resolved", "peak_p_value", "peak_significant", "n_points"]
        if args.sweep:
            sw = A.lag_sweep(ds, var, args.target, windows=args.window, run=args.run, group=args.group, **kw)
            out["peak lag per W"] = _table(sw, peak_cols + ["sign_change_next", "flip_next"])
            out["lag flips"] = A.lag_flips(sw, rejected=True)       # status 'flip', or why rejected
            print(f"note: peak rule '{args.peak}' over lags {min(args.lags)}..{max(args.lags)}; a peak on the "
                  f"grid edge is unresolved; p from {args.n_null} phase-randomised targets, alpha = "
                  f"{args.alpha:g}; a lag flip needs both peaks resolved and significant", file=sys.stderr)
        else:
            lc = A.lag_correlation(ds, var, args.target, **kw, **sel)
            out["peak lag"] = _table(lc, peak_cols)
            r = lc["r"].to_dataframe().reset_index()
            keys = [d for d in lc["r"].dims if d != "lag"]
            out["r by lag"] = r.pivot_table(index=keys, columns="lag", values="r").reset_index()
        if args.sliding:
            sl = A.sliding_correlation(ds, var, args.target, align=args.sliding, sv=sv, **sel)
            out[f"sliding r ({args.sliding})"] = _table(sl, ["r_min", "r_max", "r_mean", "n_sign_changes",
                                                             "frac_abs_r_gt_0_5", "frac_p_lt_0_05"])
        if args.phase_method:
            pc = A.phase_correlation(ds, var, args.target, method=args.phase_method, sv=sv, **sel)
            out[f"phase r ({args.phase_method})"] = _table(pc, ["r", "p", "n", "start_step", "end_step",
                                                                "delta_y"])
    elif args.query == "granger":
        kw = dict(max_lag=args.max_lag, covariate=args.covariate, n_perm=args.n_perm, seed=args.seed)
        if args.features:
            g = A.granger_multivariate(ds, args.features, args.target, **kw, **sel)
            out["multivariate Granger"] = _table(g)
        else:
            g = A.granger(ds, var, args.target, direction=args.direction, nuisance=args.nuisance, sv=sv,
                          **kw, **sel)
            out[f"Granger ({g.attrs['direction_meaning']})"] = _table(
                g, ["lag_order", "n_obs", "F", "p_value", "p_perm", "delta_aic", "delta_r2", "r2_u"])
    elif args.query == "shift":
        r = A.detect_shift(ds, var, methods=args.method or ("cusum", "ttest", "maxderiv"),
                           true_step=args.true_step, tolerance=args.tolerance, baseline=args.baseline,
                           k=args.cusum_k, h=args.cusum_h, min_size=args.min_size, smooth=args.smooth,
                           sv=sv, **sel)
        out["shift detection"] = _table(r, ["step", "score", "p_value", "direction", "alarm_step",
                                            "error", "hit"])
    elif args.query == "warning":
        kw = dict(k=args.k, baseline=args.baseline, floor=args.floor, direction=args.direction, sv=sv, **sel)
        if args.event:
            r = A.lead_time(ds, var, event=args.event, event_threshold=args.event_threshold,
                            sustain=args.sustain, **kw)
            out["lead time"] = _table(r, ["onset_step", "event_step", "lead_time", "baseline_value",
                                          "threshold"])
        else:
            out["onset"] = _table(A.onset(ds, var, **kw))
    return out


def run(args) -> int:
    from .. import accessor  # noqa: F401
    from ..analysis import attach_metrics
    from ..errors import MetricsError
    from ..results_io import open_results

    ds = open_results(args.results).load()  # a trajectory store, a foreign group or a partial store: exit 2
    if args.metrics:
        try:
            ds = attach_metrics(ds, args.metrics)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            msg = str(exc).strip() or type(exc).__name__
            if str(args.metrics) not in msg:
                msg = f"{args.metrics}: {msg}"
            raise MetricsError(f"--metrics {msg}") from exc
    out = tables(ds, args)
    if args.json:
        payload = {title: json.loads(df.to_json(orient="records")) for title, df in out.items()}
        json.dump({"query": args.query, "results": args.results, "tables": payload}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 500,
                               "display.float_format", "{:.6g}".format):
            for title, df in out.items():
                print(f"== {title} ==")
                print(df.to_string(index=False) if len(df) else "(none)")
                print()
    return 0
