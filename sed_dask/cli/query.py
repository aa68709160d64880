"""sed-dask query RESULTS QUERY [options]: analysis tables from a results store.

Opens a Zarr results store (as xr.open_zarr does), runs one query family of sed_dask.analysis and
prints readable tables followed by the definitions and thresholds used, or JSON with --json.
`sed-dask query RESULTS QUERY --help` shows a query's own options.
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
    g.add_argument(
        "--var",
        default=None,
        help="series: a variable name, a sed_role, an alias like r23 (= ratio at sv=2), or 'edge' "
        "(the ratio at k = the series' mode of k*). Default: 'edge' for phases, events and "
        "warning; edge_ratio (each window's own k*) for edge, lag, granger and shift",
    )
    g.add_argument("--sv", type=int, default=None, help="sv index for variables with an sv dim")
    g.add_argument(
        "--metrics", metavar="FILE", help="attach metrics from a JSON/CSV file (exact step match) before the query"
    )
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "query",
        help="analysis queries on a results store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", metavar="RESULTS", help="Zarr results store (path or URL)")
    sub = p.add_subparsers(dest="query", required=True, metavar="QUERY")
    common = _common()

    q = sub.add_parser(
        "edge",
        parents=[common],
        help="signal rank (k* and the count), edge summary, null test",
        description="Signal rank two ways per run and W: k* (where the largest gap among the "
        "values above the noise floor sits) and n_signal (how many values clear a "
        "noise test), each as mode, frequency and 90% interval over windows, with a "
        "line where they disagree; the edge-ratio summary; optionally each window's "
        "edge against a matched-norm random-direction null.",
    )
    q.add_argument("--null", action="store_true", help="also test the edge against the matched-norm null")
    q.add_argument("--n-null", type=int, default=999, help="null draws per window (default 999)")
    q.add_argument(
        "--norms",
        choices=("delta_norm", "equal"),
        default="delta_norm",
        help="null delta norms: the window's own (delta_norm, default) or equal (matched energy only)",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the null draws (default 0)")

    q = sub.add_parser(
        "pc2", parents=[common], help="PC2 vs the matched-norm null: noise-transition step, pc2 CV, split-half"
    )
    q.add_argument("--n-null", type=int, default=999, help="null draws per window (default 999)")
    q.add_argument("--q", type=float, default=0.95, help="null quantile PC2 must exceed (default 0.95)")
    q.add_argument(
        "--norms",
        choices=("delta_norm", "equal"),
        default="delta_norm",
        help="null delta norms: the window's own (default) or equal",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the null draws (default 0)")
    q.add_argument(
        "--sustain",
        type=int,
        default=2,
        help="consecutive windows a crossing of the null must hold (default 2; the transition is "
        "the downward crossing after PC2 held above its null)",
    )
    q.add_argument("--ddof", type=int, default=0, help="ddof of the pc2 CV's std (0 = population, as the reference)")

    q = sub.add_parser(
        "phases",
        parents=[common],
        help="rise / plateau / collapse / rebound and the collapse step",
        description="Segments the edge series (default: the fixed-k edge) into rise, plateau, "
        "collapse and rebound, and finds the collapse step: the first of --sustain "
        "windows below tau after the edge emerged above 1.25 tau.",
    )
    q.add_argument(
        "--method",
        choices=("episode", "peak", "derivative", "threshold", "changepoint"),
        default="episode",
        help="segmentation (default episode; the others are the reference's rules)",
    )
    q.add_argument(
        "--tau",
        type=_tau,
        action="append",
        help="collapse threshold, a ratio > 1 (repeatable) or 'auto' = 1 + 2W^(-2/3) (default auto: "
        "1.54 at W=5, 1.43 at W=10, 1.27 at W=20)",
    )
    q.add_argument("--sustain", type=int, default=2, help="windows a crossing must hold (default 2; reference 1)")
    q.add_argument(
        "--label",
        choices=("center", "newest"),
        default="center",
        help="step of a window: its centre (default, unbiased for boundaries) or its newest checkpoint",
    )
    q.add_argument("--ddof", type=int, default=0, help="ddof of the cross-seed std (0 = population, as the reference)")

    q = sub.add_parser(
        "events",
        parents=[common],
        help="event study: how long after the collapse the target settles",
        description="Edge collapse (as in phases) -> the first window after it where the target's "
        "smoothed step-to-step change falls below 0.3 x its early median. stab_delay "
        "= stab_step - collapse_step. This is not a lead before grokking (see warning).",
    )
    q.add_argument("--target", default="val_loss", help="metric that settles (default val_loss)")
    q.add_argument(
        "--tau",
        type=_tau_number,
        action="append",
        help="collapse threshold, a ratio > 1 (repeatable; default 'auto' = 1 + 2W^(-2/3); the "
        "reference's robustness set is 1.15 1.20 1.25 1.30)",
    )
    q.add_argument("--sustain", type=int, default=2, help="windows the collapse must hold (default 2)")
    q.add_argument("--label", choices=("center", "newest"), default="center", help="window step label")
    q.add_argument("--baseline", type=int, default=10, help="first dvl_smooth entries setting the threshold")
    q.add_argument("--factor", type=float, default=0.3, help="threshold = factor x their median")
    q.add_argument("--fallback", type=float, default=0.01, help="threshold when no baseline value exists")

    q = sub.add_parser("lag", parents=[common], help="lagged cross-correlation with a target")
    q.add_argument("--target", default="val_loss", help="metric to correlate with (default val_loss)")
    q.add_argument(
        "--lags",
        type=_lags,
        default=list(range(-5, 8)),
        metavar="A:B|L,L,...",
        help="lags in checkpoints, positive = the series leads: a half-open range A:B (A <= lag < B; "
        "default -5:8, i.e. -5..7) or a list like -1,0,2",
    )
    q.add_argument(
        "--detrend",
        choices=("cubic", "quadratic", "linear", "none", "cubic_raw"),
        default="cubic",
        help="polynomial trend removed from both series first (default cubic)",
    )
    q.add_argument(
        "--peak",
        choices=("min", "absmax", "max"),
        default="min",
        help="which r(lag) is the peak: most negative (default), largest |r|, or most positive",
    )
    q.add_argument(
        "--sweep",
        action="store_true",
        help="W sweep and lag flips: a flip needs both peaks interior to the lag grid and "
        "significant; rejected sign changes are listed with the reason",
    )
    q.add_argument(
        "--n-null",
        type=int,
        default=999,
        help="phase-randomised null draws for the peak p-value (0 = no null; default 999)",
    )
    q.add_argument("--alpha", type=float, default=0.05, help="significance level of the peak p-value (default 0.05)")
    q.add_argument("--seed", type=int, default=0, help="seed of the null draws (default 0)")
    q.add_argument("--sliding", choices=("center", "trailing"), help="sliding-window correlation summary")
    q.add_argument(
        "--phase-method",
        choices=("peak", "derivative", "threshold", "changepoint"),
        help="phase-specific correlations under this segmentation",
    )

    q = sub.add_parser("granger", parents=[common], help="Granger causality (both directions)")
    q.add_argument("--target", default="val_loss", help="metric tested against the series (default val_loss)")
    q.add_argument(
        "--max-lag", type=int, default=2, help="largest lag order p tried; the order is picked by AIC (default 2)"
    )
    q.add_argument("--covariate", action="append", help="contemporaneous covariate, e.g. lr (repeatable)")
    q.add_argument("--nuisance", action="append", help="residualise the feature on this series or 'trend'")
    q.add_argument(
        "--direction",
        choices=("both", "forward", "reverse"),
        default="both",
        help="forward: series -> target, reverse: target -> series, or both (default)",
    )
    q.add_argument("--features", nargs="+", help="multivariate test of these features instead")
    q.add_argument(
        "--n-perm", type=int, default=999, help="circular-shift permutations for p_perm (0 = none; default 999)"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")

    q = sub.add_parser("shift", parents=[common], help="CUSUM, t-test scan, max-derivative")
    q.add_argument(
        "--method",
        action="append",
        choices=("cusum", "ttest", "maxderiv"),
        help="detector to run (repeatable; default all three)",
    )
    q.add_argument("--true-step", type=float, help="a known shift step: adds error = detected step - this")
    q.add_argument("--tolerance", type=float, help="with --true-step: hit = |error| <= this many steps")
    q.add_argument(
        "--baseline",
        type=int,
        default=8,
        help="CUSUM: first points giving the mean and std it standardises by (default 8)",
    )
    q.add_argument("--cusum-k", type=float, default=0.5, help="CUSUM allowance k in baseline stds (default 0.5)")
    q.add_argument("--cusum-h", type=float, default=4.0, help="CUSUM alarm threshold h (default 4)")
    q.add_argument("--min-size", type=int, default=5, help="t-test scan: points required on each side (default 5)")
    q.add_argument("--smooth", action="store_true", help="max-derivative: 3-point moving average first")

    q = sub.add_parser(
        "warning",
        parents=[common],
        help="causal early-warning alarms on the edge and their lead",
        description="Causal detectors on the fixed-k edge, decided at each step from the windows "
        "up to it: below_noise (edge < tau), peak_drop (edge < (1 - drop) x running "
        "peak), cusum (CUSUM of log(peak / edge)); armed once the edge exceeds 1.25 "
        "tau. With --event (default val_acc when present) the lead = event step - "
        "alarm step. --method onset gives the companion papers' rise-onset rule instead.",
    )
    q.add_argument(
        "--method",
        choices=("detectors", "onset"),
        default="detectors",
        help="detectors (default, causal alarms on a fall of the edge) or onset (k x baseline rule)",
    )
    q.add_argument(
        "--detector",
        action="append",
        choices=("below_noise", "peak_drop", "cusum"),
        help="detector to run (repeatable; default all three)",
    )
    q.add_argument("--tau", type=_tau, default="auto", help="noise-level ratio tau (default auto = 1 + 2W^(-2/3))")
    q.add_argument("--drop", type=float, default=0.5, help="peak_drop: fraction of the running peak lost (default 0.5)")
    q.add_argument("--drift", type=float, default=0.5, help="cusum: log-ratio allowance per window (default 0.5)")
    q.add_argument("--h", type=float, default=1.0, help="cusum: alarm threshold (default 1.0)")
    q.add_argument(
        "--alarm-sustain",
        type=int,
        default=2,
        help="windows below a threshold before below_noise/peak_drop alarm (default 2)",
    )
    q.add_argument("--k", type=float, default=10.0, help="onset: factor over the baseline median (default 10)")
    q.add_argument("--baseline", type=int, default=3, help="onset: points in the baseline median (default 3)")
    q.add_argument(
        "--floor",
        type=_floor,
        default="default",
        help="onset: absolute level, 'none', or 'default' (20 for a rise, none for a drop)",
    )
    q.add_argument("--direction", choices=("rise", "drop"), default="rise", help="onset: rise or drop (default rise)")
    q.add_argument("--event", help="metric defining the event (default val_acc when the results have it)")
    q.add_argument(
        "--event-threshold",
        type=float,
        default=0.9,
        help="event = first step with the metric >= this (default 0.9: grokking)",
    )
    q.add_argument("--sustain", type=int, default=1, help="evaluations the event must hold (default 1)")
    p.set_defaults(func=run)
    # `query RESULTS weights ...` (weight-spectra stores)
    from sed_dask.cli.weights import register_query

    register_query(sub)


def _table(ds, names=None):
    """A tidy DataFrame of the listed (or all) variables sharing the first one's dims."""
    names = list(ds.data_vars) if names is None else [n for n in names if n in ds.data_vars]
    if not names:
        import pandas as pd

        return pd.DataFrame()
    dims = ds[names[0]].dims
    names = [n for n in names if ds[n].dims == dims]
    return ds[names].to_dataframe().reset_index()[[*dims, *names]]


K_STAR_DEF = (
    "k* = argmax_k sigma_k/sigma_(k+1) over the k with sigma_k >= the MP floor sigma_MP (fallback k <= W/2); "
    "n_signal = values above the noise by a sequential Wishart test (alpha 0.01, isotropic noise)"
)
EDGE_DEF = "edge = sigma_k/sigma_(k+1) at a fixed k per series: the mode of k* over its windows (column edge_k)"


def _tau_line(ds, args, tau) -> str:
    from sed_dask.analysis.defaults import describe_tau

    Ws = args.window or [int(w) for w in ds["window"].values] if "window" in ds.dims else [None]
    taus = tau if isinstance(tau, list) else [tau]
    return "; ".join(describe_tau(t, W) for t in taus for W in (Ws if t == "auto" else [None]))


def tables(ds, args) -> tuple[dict, list[str]]:
    """Run the query in ``args.query``; return ({title: DataFrame}, definition and note lines)."""
    sel = dict(run=args.run, window=args.window, group=args.group)
    var = args.var or ("edge" if args.query in ("phases", "events", "warning") else "edge_ratio")
    out, notes = {}, []
    handler = TABLE_BUILDERS.get(args.query)
    if handler is not None:
        handler(ds, args, var, sel, out, notes)
    return out, notes


def _edge_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """The signal rank (k*, n_signal) and edge summary tables, with the matched-norm null when asked."""
    from sed_dask import analysis as A

    sv = args.sv
    summ = A.edge_summary(ds, variable=var, sv=sv, **sel)
    cols = [
        "k_mode",
        "k_mode_freq",
        "k_lo",
        "k_hi",
        "count_mode",
        "count_mode_freq",
        "count_lo",
        "count_hi",
        "agree",
        "n_windows",
    ]
    out["signal rank: k* (edge location) and n_signal (count above noise)"] = _table(summ, cols)
    out[f"edge summary ({summ.attrs.get('edge_variable', var)})"] = _table(
        summ,
        [
            "edge_mean",
            "edge_median",
            "edge_min",
            "edge_max",
            "edge_max_step",
            "mp_adjacent_ratio",
            "n_above_mp",
            "excess_over_mp",
        ],
    )
    notes += [K_STAR_DEF, "k_lo..k_hi, count_lo..count_hi: 5th..95th percentile over windows"]
    notes += A.rank_notes(summ)
    if args.null:
        r = A.edge_null(ds, n_null=args.n_null, norms=args.norms, seed=args.seed, **sel)
        out["edge vs matched-norm null (per series)"] = _table(r, ["frac_significant", "n_windows"])
        out["edge vs matched-norm null (per window)"] = _table(
            r, ["observed", "null_quantile", "p_value", "significant"]
        ).dropna(subset=["observed"])
        notes.append(
            f"null: the window's deltas keep their norms ({args.norms}) in uniformly random directions; "
            f"{args.n_null} draws, p = (1 + #null >= obs) / (n + 1)"
        )


def _pc2_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """PC2 energy share against its matched-norm null, per series and per window."""
    from sed_dask import analysis as A

    sh = "split_half" if "split_half" in ds.data_vars else None
    r = A.pc2_summary(
        ds,
        split_half=sh,
        n_null=args.n_null,
        q=args.q,
        norms=args.norms,
        seed=args.seed,
        sustain=args.sustain,
        ddof=args.ddof,
        **sel,
    )
    if sh is None:
        notes.append("the store has no split_half (computed before it existed); split-half fields skipped")
    out["pc2 vs null (per series)"] = _table(
        r,
        [
            "pc2_emerge_step",
            "noise_transition_step",
            "transition_kind",
            "pc2_cv",
            "pc2_mean",
            "null_pc2_mean",
            "split_half_k2_mean",
            "n_above_null",
            "n_windows",
        ],
    )
    out["pc2 vs null (per window)"] = _table(r, ["pc2_pct", "null_pc2", "pc2_above_null", "split_half_k2"]).dropna(
        subset=["pc2_pct"]
    )
    notes += [
        f"PC2 = 100 lambda_2 / sum(lambda) against the {args.q:g} quantile of a matched-norm random-direction "
        f"null ({args.n_null} draws); pc2_emerge_step = first of {args.sustain} windows above it; "
        f"noise_transition_step = first of {args.sustain} windows not above it after that",
        "transition_kind: 0 = no transition (PC2 never above its null), 1 = above -> below, "
        "2 = no transition (stays above)",
    ]


def _phases_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Edge phases (peak, plateau, collapse, rebound), collapse per tau and across seeds."""
    from sed_dask import analysis as A

    sv = args.sv
    taus = args.tau or ["auto"]
    ph = A.phases(ds, var, method=args.method, tau=taus[0], sustain=args.sustain, label=args.label, sv=sv, **sel)
    out[f"phases ({args.method})"] = _table(
        ph,
        [
            "edge_k",
            "peak_step",
            "peak_value",
            "plateau_start_step",
            "collapse_start_step",
            "collapse_step",
            "rebound_step",
            "tau_value",
            "n_points",
        ],
    )
    cs = A.collapse_step(
        ds, var, sv=sv, tau=taus if len(taus) > 1 else taus[0], sustain=args.sustain, label=args.label, **sel
    )
    if len(taus) > 1:
        out["collapse step per tau"] = _table(cs, ["collapse_step"])
    if "run" in cs.dims and cs.sizes["run"] > 1:
        out[f"cross-seed (ddof={args.ddof})"] = _table(
            A.cross_seed_summary(cs, ["collapse_step", "peak_value"], ddof=args.ddof)
        )
    notes += [
        EDGE_DEF if var == "edge" else f"series: {var}",
        f"collapse = first of {args.sustain} windows below tau after the edge first held >= 1.25 tau; "
        f"rebound = first of {args.sustain} windows back >= 1.25 tau after it; {_tau_line(ds, args, taus)}",
        f"steps: {ph.attrs['step_label']}",
    ]


def _events_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Event study: how long after the edge collapse the target metric settles."""
    from sed_dask import analysis as A

    sv = args.sv
    taus = args.tau if args.tau and len(args.tau) > 1 else (args.tau[0] if args.tau else "auto")
    r = A.event_study(
        ds,
        var,
        args.target,
        taus=taus,
        baseline=args.baseline,
        factor=args.factor,
        fallback=args.fallback,
        sustain=args.sustain,
        label=args.label,
        sv=sv,
        **sel,
    )
    out[f"event study: edge collapse -> {args.target} stabilisation"] = _table(
        r, ["collapse_step", "stab_step", "stab_delay"] + ([] if "tau" in r.dims else ["tau"])
    )
    out["event study (per series)"] = _table(
        r, ["peak_step", "peak_value", "threshold", "n_baseline", "threshold_fallback", "n_points"]
    )
    notes += [
        EDGE_DEF if var == "edge" else f"series: {var}",
        f"stab_delay = stab_step - collapse_step: how long after the collapse {args.target} settles "
        f"(smoothed |change| < {args.factor:g} x the median of its first {args.baseline}); "
        "not a lead before grokking (see `query warning`)",
        _tau_line(ds, args, taus if isinstance(taus, list) else taus),
    ]


def _lag_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Lagged correlation of the series with the target: peak lag (or a sweep over W) and r by lag."""
    from sed_dask import analysis as A

    sv = args.sv
    kw = dict(
        lags=args.lags,
        detrend=args.detrend,
        peak=args.peak,
        n_null=args.n_null,
        alpha=args.alpha,
        seed=args.seed,
        sv=sv,
    )
    peak_cols = ["peak_lag", "peak_r", "peak_resolved", "peak_p_value", "peak_significant", "n_points"]
    if args.sweep:
        sw = A.lag_sweep(ds, var, args.target, windows=args.window, run=args.run, group=args.group, **kw)
        out["peak lag per W"] = _table(sw, peak_cols + ["sign_change_next", "flip_next"])
        out["lag flips"] = A.lag_flips(sw, rejected=True)  # status 'flip', or why rejected
    else:
        lc = A.lag_correlation(ds, var, args.target, **kw, **sel)
        out["peak lag"] = _table(lc, peak_cols)
        r = lc["r"].to_dataframe().reset_index()
        keys = [d for d in lc["r"].dims if d != "lag"]
        out["r by lag"] = r.pivot_table(index=keys, columns="lag", values="r").reset_index()
    notes.append(
        f"peak rule '{args.peak}' over lags {min(args.lags)}..{max(args.lags)} (checkpoints; positive = "
        f"{var} leads {args.target}); a peak on the grid edge is unresolved; p from {args.n_null} "
        f"phase-randomised detrended targets, peak over the whole grid, alpha = {args.alpha:g}"
        + ("; a lag flip needs both peaks resolved and significant" if args.sweep else "")
    )
    if args.sliding:
        sl = A.sliding_correlation(ds, var, args.target, align=args.sliding, sv=sv, **sel)
        out[f"sliding r ({args.sliding})"] = _table(
            sl, ["r_min", "r_max", "r_mean", "n_sign_changes", "frac_abs_r_gt_0_5", "frac_p_lt_0_05"]
        )
    if args.phase_method:
        pc = A.phase_correlation(ds, var, args.target, method=args.phase_method, sv=sv, **sel)
        out[f"phase r ({args.phase_method})"] = _table(pc, ["r", "p", "n", "start_step", "end_step", "delta_y"])


def _granger_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Granger tests of the series (or several features) against the target."""
    from sed_dask import analysis as A

    sv = args.sv
    kw = dict(max_lag=args.max_lag, covariate=args.covariate, n_perm=args.n_perm, seed=args.seed)
    if args.features:
        g = A.granger_multivariate(ds, args.features, args.target, **kw, **sel)
        out["multivariate Granger"] = _table(g)
    else:
        g = A.granger(ds, var, args.target, direction=args.direction, nuisance=args.nuisance, sv=sv, **kw, **sel)
        out[f"Granger ({g.attrs['direction_meaning']})"] = _table(
            g, ["lag_order", "n_obs", "F", "p_value", "p_perm", "delta_aic", "delta_r2", "r2_u"]
        )


def _shift_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Change-point detection on the series."""
    from sed_dask import analysis as A

    sv = args.sv
    r = A.detect_shift(
        ds,
        var,
        methods=args.method or ("cusum", "ttest", "maxderiv"),
        true_step=args.true_step,
        tolerance=args.tolerance,
        baseline=args.baseline,
        k=args.cusum_k,
        h=args.cusum_h,
        min_size=args.min_size,
        smooth=args.smooth,
        sv=sv,
        **sel,
    )
    out["shift detection"] = _table(r, ["step", "score", "p_value", "direction", "alarm_step", "error", "hit"])


def _warning_tables(ds, args, var: str, sel: dict, out: dict, notes: list) -> None:
    """Early warning: the onset rule (``--method onset``) or the causal detectors."""
    from sed_dask import analysis as A

    if args.method != "onset":
        _detector_tables(ds, args, sel, out, notes)
        return
    event = args.event
    kw = dict(k=args.k, baseline=args.baseline, floor=args.floor, direction=args.direction, sv=args.sv, **sel)
    v = args.var or "edge_ratio"
    if event:
        r = A.lead_time(ds, v, event=event, event_threshold=args.event_threshold, sustain=args.sustain, **kw)
        out["onset and lead time"] = _table(r, ["onset_step", "event_step", "lead_time", "baseline_value", "threshold"])
    else:
        out["onset"] = _table(A.onset(ds, v, **kw))
    notes.append(
        f"onset = first point {'>' if args.direction == 'rise' else '<'} {args.k:g} x (or 1/{args.k:g} "
        f"of) the median of the first {args.baseline} points (companion papers' rule; retrospective "
        "baseline, not one of the causal detectors)"
    )


def _detector_tables(ds, args, sel: dict, out: dict, notes: list) -> None:
    """The causal early-warning detectors' alarms and lead times (``warning --method detectors``)."""
    from sed_dask import analysis as A

    if args.var not in (None, "edge"):
        raise ValueError("warning --method detectors watches the fixed-k edge; --var applies to --method onset")
    params = dict(drop=args.drop, drift=args.drift, h=args.h, sustain=args.alarm_sustain)
    r = A.early_warning(
        ds,
        detectors=args.detector,
        tau=args.tau,
        event=args.event,
        event_threshold=args.event_threshold,
        sustain_event=args.sustain,
        **sel,
        **params,
    )
    out["early-warning alarms (causal)"] = _table(
        r, ["alarm_step", "alarm_value", "alarm_threshold", "n_alarms", "lead"]
    )
    out["per series"] = _table(r, ["edge_k", "first_alarm_step", "event_step", "tau_value", "n_windows"])
    defs = json.loads(r.attrs["definitions"])
    for W, d in defs.items():
        notes += [f"{W} {name}: {text}" for name, text in d.items()]
    event = r.attrs.get("event") or None
    notes.append(
        "causal: an alarm at step t used only the windows up to t; lead = event_step - alarm_step "
        + (f"(event: first {event} >= {args.event_threshold:g})" if event else "(no event metric)")
    )


#: the tables of each query in QUERIES: handler(ds, args, var, sel, out, notes) fills out and notes
TABLE_BUILDERS = {
    "edge": _edge_tables,
    "pc2": _pc2_tables,
    "phases": _phases_tables,
    "events": _events_tables,
    "lag": _lag_tables,
    "granger": _granger_tables,
    "shift": _shift_tables,
    "warning": _warning_tables,
}


def run(args) -> int:
    from sed_dask import accessor  # noqa: F401
    from sed_dask.analysis import attach_metrics
    from sed_dask.errors import MetricsError
    from sed_dask.store.outputs import open_results

    ds = open_results(args.results).load()  # a trajectory store, a foreign group or a partial store: exit 2
    if args.metrics:
        try:
            ds = attach_metrics(ds, args.metrics)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            msg = str(exc).strip() or type(exc).__name__
            if str(args.metrics) not in msg:
                msg = f"{args.metrics}: {msg}"
            raise MetricsError(f"--metrics {msg}") from exc
    out, notes = tables(ds, args)
    if args.json:
        payload = {title: json.loads(df.to_json(orient="records")) for title, df in out.items()}
        json.dump(
            {"query": args.query, "results": args.results, "tables": payload, "definitions": notes},
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
    else:
        import pandas as pd

        with pd.option_context(
            "display.width",
            200,
            "display.max_columns",
            50,
            "display.max_rows",
            500,
            "display.float_format",
            "{:.6g}".format,
        ):
            for title, df in out.items():
                print(f"== {title} ==")
                print(df.to_string(index=False) if len(df) else "(none)")
                print()
            if notes:
                print("== definitions and notes ==")
                print("\n".join(f"- {n}" for n in notes))
    return 0
