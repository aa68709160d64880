"""``ds.sed``: a thin Dataset accessor forwarding to :mod:`sed_dask.analysis`.

Functions are the API; the accessor is sugar (xskillscore style). It imports
only xarray at import time — the analysis modules load on first use — so registering it on
``import sed_dask`` stays cheap and never pulls in the engine, Dask distributed or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import xarray as xr

if TYPE_CHECKING:  # annotations only: importing pandas here would slow `import sed_dask`
    import pandas as pd

# accessor method -> "module:function" in sed_dask.analysis; every method below forwards to one of
# these with the same signature (tests/test_accessor_signatures.py keeps the two in step)
_FORWARD = {
    "var": "_series:resolve",
    "signal_rank": "edge:signal_rank",
    "edge_summary": "edge:edge_summary",
    "edge_null": "edge:edge_null",
    "pc2_summary": "edge:pc2_summary",
    "phases": "phases:phases",
    "collapse_step": "phases:collapse_step",
    "event_study": "events:event_study",
    "lag_correlation": "lag:lag_correlation",
    "lag_sweep": "lag:lag_sweep",
    "sliding_correlation": "lag:sliding_correlation",
    "phase_correlation": "lag:phase_correlation",
    "granger": "granger:granger",
    "granger_multivariate": "granger:granger_multivariate",
    "detect_shift": "shift:detect_shift",
    "early_warning": "warning:early_warning",
    "onset": "warning:onset",
    "lead_time": "warning:lead_time",
    "attach_metrics": "metrics:attach_metrics",
    "cross_seed_summary": "phases:cross_seed_summary",
    # weight spectra (sed_dask.weight_spectra / update_alignment Datasets): full module paths
    "weight_escape": "sed_dask.weights.queries:escape_steps",
    "weight_series": "sed_dask.weights.queries:series",
    "weight_table": "sed_dask.weights.queries:layer_table",
    "alignment_summary": "sed_dask.weights.queries:alignment_summary",
}


@xr.register_dataset_accessor("sed")
class SEDAccessor:
    """Spectral-edge queries on a results Dataset: ``ds.sed.lag_correlation(...)`` etc."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def lag_flips(
        self, sweep: xr.Dataset | None = None, *, pairs: str = "consecutive", rejected: bool = False, **sweep_options
    ):
        """Lag-flip table (``sed_dask.analysis.lag_flips``) of ``sweep``, or of ``lag_sweep(ds, **sweep_options)``
        when no sweep is given: ``ds.sed.lag_flips()`` and ``ds.sed.lag_flips(ds.sed.lag_sweep())`` agree."""
        from sed_dask.analysis.lag import lag_flips, lag_sweep

        if sweep is None:
            sweep = lag_sweep(self._ds, **sweep_options)
        elif sweep_options:
            raise TypeError("pass either a sweep or lag_sweep options, not both")
        return lag_flips(sweep, pairs=pairs, rejected=rejected)

    def var(self, variable, *, sv: int | None = None) -> xr.DataArray:
        """A named DataArray for ``variable``: a DataArray, a variable name, a ``sed_role`` or an alias.

        Forwards to :func:`sed_dask.analysis.resolve` (whole docstring: ``ds.sed.help("var")``).
        """
        from sed_dask.analysis import resolve

        return resolve(self._ds, variable, sv=sv)

    def signal_rank(self, *, variable="signal_rank", count="n_signal", run=None, window=None, group=None) -> xr.Dataset:
        """Signal rank per (run, W[, group]), as two quantities over the windows.

        Forwards to :func:`sed_dask.analysis.edge.signal_rank` (whole docstring: ``ds.sed.help("signal_rank")``).
        """
        from sed_dask.analysis.edge import signal_rank

        return signal_rank(self._ds, variable=variable, count=count, run=run, window=window, group=group)

    def edge_summary(
        self, *, variable="edge_ratio", rank="signal_rank", sv=None, run=None, window=None, group=None
    ) -> xr.Dataset:
        """Per (run, W[, group]): signal rank, edge-ratio mean/median/min/max (+ step of the max),
        and how often the edge exceeds the W-aware MP adjacent-ratio noise level 1 + 2W^(-2/3)
        (docs/method.md §4.3: ``n_above_mp``, ``excess_over_mp``).

        Forwards to :func:`sed_dask.analysis.edge.edge_summary` (whole docstring: ``ds.sed.help("edge_summary")``).
        """
        from sed_dask.analysis.edge import edge_summary

        return edge_summary(self._ds, variable=variable, rank=rank, sv=sv, run=run, window=window, group=group)

    def edge_null(
        self,
        *,
        statistic="edge_ratio",
        n_null: int = 999,
        q: float = 0.95,
        seed: int | None = 0,
        norms: str = "delta_norm",
        n_params=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Edge significance per window against matched-norm random directions (docs/method.md §4.5).

        Forwards to :func:`sed_dask.analysis.edge.edge_null` (whole docstring: ``ds.sed.help("edge_null")``).
        """
        from sed_dask.analysis.edge import edge_null

        return edge_null(
            self._ds,
            statistic=statistic,
            n_null=n_null,
            q=q,
            seed=seed,
            norms=norms,
            n_params=n_params,
            run=run,
            window=window,
            group=group,
        )

    def pc2_summary(
        self,
        *,
        split_half="split_half",
        n_null: int = 999,
        q: float = 0.95,
        seed: int | None = 0,
        norms: str = "delta_norm",
        n_params=None,
        sustain: int = 2,
        ddof: int = 0,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """When does PC2 sink into the noise? The reference's ``pc2_noise_test`` consumers (docs/method.md §4.5).

        Forwards to :func:`sed_dask.analysis.edge.pc2_summary`; ``ds.sed.help("pc2_summary")`` prints its docstring.
        """
        from sed_dask.analysis.edge import pc2_summary

        return pc2_summary(
            self._ds,
            split_half=split_half,
            n_null=n_null,
            q=q,
            seed=seed,
            norms=norms,
            n_params=n_params,
            sustain=sustain,
            ddof=ddof,
            run=run,
            window=window,
            group=group,
        )

    def phases(
        self,
        variable="edge",
        *,
        method: str = "episode",
        tau="auto",
        sustain: int = 2,
        rebound: float = 1.25,
        label: str = "center",
        sv=None,
        run=None,
        window=None,
        group=None,
        min_points: int = 5,
        **options,
    ) -> xr.Dataset:
        """Segment each (run, W[, group]) series into rise / plateau / collapse / rebound.

        Forwards to :func:`sed_dask.analysis.phases.phases` (whole docstring: ``ds.sed.help("phases")``).
        """
        from sed_dask.analysis.phases import phases

        return phases(
            self._ds,
            variable,
            method=method,
            tau=tau,
            sustain=sustain,
            rebound=rebound,
            label=label,
            sv=sv,
            run=run,
            window=window,
            group=group,
            min_points=min_points,
            **options,
        )

    def collapse_step(
        self,
        variable="edge",
        *,
        tau="auto",
        sustain: int = 2,
        label: str = "center",
        after: str = "emergence",
        sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Peak and collapse of the edge series (docs/method.md §5.1, with the defaults of docs/method.md).

        Forwards to :func:`sed_dask.analysis.phases.collapse_step` (whole docstring: ``ds.sed.help("collapse_step")``).
        """
        from sed_dask.analysis.phases import collapse_step

        return collapse_step(
            self._ds,
            variable,
            tau=tau,
            sustain=sustain,
            label=label,
            after=after,
            sv=sv,
            run=run,
            window=window,
            group=group,
        )

    def event_study(
        self,
        variable="edge",
        target="val_loss",
        *,
        taus="auto",
        baseline: int = 10,
        factor: float = 0.3,
        fallback: float = 0.01,
        sustain: int = 2,
        label: str = "center",
        after: str = "emergence",
        sv=None,
        target_sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Collapse → target-stabilisation delay (docs/method.md §5.5): how long after the edge collapses the
        validation loss settles. It is *not* a lead before grokking (that is
        :func:`sed_dask.analysis.early_warning`'s ``lead``): a positive ``stab_delay`` means the loss
        settled after the collapse.

        Forwards to :func:`sed_dask.analysis.events.event_study` (whole docstring: ``ds.sed.help("event_study")``).
        """
        from sed_dask.analysis.events import event_study

        return event_study(
            self._ds,
            variable,
            target,
            taus=taus,
            baseline=baseline,
            factor=factor,
            fallback=fallback,
            sustain=sustain,
            label=label,
            after=after,
            sv=sv,
            target_sv=target_sv,
            run=run,
            window=window,
            group=group,
        )

    def lag_correlation(
        self,
        variable="edge_ratio",
        target="val_loss",
        *,
        lags=range(-5, 8),
        detrend: str = "cubic",
        peak: str = "min",
        gaps: str = "keep",
        min_overlap: int = 6,
        n_null: int = 999,
        seed: int = 0,
        alpha: float = 0.05,
        sv=None,
        target_sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Detrended lagged Pearson r between a spectral series and a target (default val_loss).

        Forwards to :func:`sed_dask.analysis.lag.lag_correlation` (whole docstring: ``ds.sed.help("lag_correlation")``).
        """
        from sed_dask.analysis.lag import lag_correlation

        return lag_correlation(
            self._ds,
            variable,
            target,
            lags=lags,
            detrend=detrend,
            peak=peak,
            gaps=gaps,
            min_overlap=min_overlap,
            n_null=n_null,
            seed=seed,
            alpha=alpha,
            sv=sv,
            target_sv=target_sv,
            run=run,
            window=window,
            group=group,
        )

    def lag_sweep(self, variable="edge_ratio", target="val_loss", *, windows=None, **options) -> xr.Dataset:
        """:func:`lag_correlation` over every W plus lag-flip flags (docs/method.md §6.4).

        Forwards to :func:`sed_dask.analysis.lag.lag_sweep` (whole docstring: ``ds.sed.help("lag_sweep")``).
        """
        from sed_dask.analysis.lag import lag_sweep

        return lag_sweep(self._ds, variable, target, windows=windows, **options)

    def sliding_correlation(
        self,
        variable="edge_ratio",
        target="val_loss",
        *,
        align: str = "center",
        width: int | None = None,
        detrend: str = "none",
        gaps: str = "keep",
        sv=None,
        target_sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Local Pearson r(x, y) in a moving window of checkpoints (docs/method.md §10).

        Forwards to :func:`sed_dask.analysis.lag.sliding_correlation`
        (whole docstring: ``ds.sed.help("sliding_correlation")``).
        """
        from sed_dask.analysis.lag import sliding_correlation

        return sliding_correlation(
            self._ds,
            variable,
            target,
            align=align,
            width=width,
            detrend=detrend,
            gaps=gaps,
            sv=sv,
            target_sv=target_sv,
            run=run,
            window=window,
            group=group,
        )

    def phase_correlation(
        self,
        variable="edge_ratio",
        target="val_loss",
        *,
        method: str = "peak",
        segment_variable=None,
        min_points: int = 4,
        detrend: str = "none",
        sv=None,
        target_sv=None,
        run=None,
        window=None,
        group=None,
        **options,
    ) -> xr.Dataset:
        """Pearson r(x, y) within each phase of :func:`sed_dask.analysis.phases.segment`
        (docs/method.md §10.1). Phases come from ``segment_variable`` (default: ``variable``) with shared
        boundary points; fewer than ``min_points`` (4) aligned pairs give NaN. Also reports
        Δy = y_start − y_end (positive = improvement for a loss) and x_start / x_end.
        The README's collapse-phase "r = 0.937 ± 0.019" is method="derivative", summarised with
        :func:`cross_seed_summary` over runs.

        Forwards to :func:`sed_dask.analysis.lag.phase_correlation`
        (whole docstring: ``ds.sed.help("phase_correlation")``).
        """
        from sed_dask.analysis.lag import phase_correlation

        return phase_correlation(
            self._ds,
            variable,
            target,
            method=method,
            segment_variable=segment_variable,
            min_points=min_points,
            detrend=detrend,
            sv=sv,
            target_sv=target_sv,
            run=run,
            window=window,
            group=group,
            **options,
        )

    def granger(
        self,
        variable="edge_ratio",
        target="val_loss",
        *,
        max_lag: int = 2,
        lag: int | None = None,
        covariate=None,
        direction: str = "both",
        nuisance=None,
        n_perm: int = 999,
        seed: int | None = 0,
        min_obs: int = 10,
        aic_sample: str = "per_lag",
        gaps: str = "keep",
        sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Univariate Granger tests per (run, W[, group]) and direction (docs/method.md §7.1, §7.2).

        Forwards to :func:`sed_dask.analysis.granger.granger` (whole docstring: ``ds.sed.help("granger")``).
        """
        from sed_dask.analysis.granger import granger

        return granger(
            self._ds,
            variable,
            target,
            max_lag=max_lag,
            lag=lag,
            covariate=covariate,
            direction=direction,
            nuisance=nuisance,
            n_perm=n_perm,
            seed=seed,
            min_obs=min_obs,
            aic_sample=aic_sample,
            gaps=gaps,
            sv=sv,
            run=run,
            window=window,
            group=group,
        )

    def granger_multivariate(
        self,
        features=("edge_ratio", "k95"),
        target="val_loss",
        *,
        max_lag: int = 2,
        lag: int | None = None,
        covariate=None,
        n_perm: int = 999,
        seed: int | None = 0,
        min_obs: int = 10,
        aic_sample: str = "per_lag",
        gaps: str = "keep",
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Joint Granger test of several features → target: unrestricted = AR(p) of the target +
        lags 1..p of every feature (q = p·m). ``r2_u`` is the share of target variance explained —
        the README's "edge_str + k95 explains 89.5%" is most likely this R² (docs/method.md §7.2,
        inferred). The circular-shift null rolls all features jointly, preserving their coupling.

        Forwards to :func:`sed_dask.analysis.granger.granger_multivariate`
        (whole docstring: ``ds.sed.help("granger_multivariate")``).
        """
        from sed_dask.analysis.granger import granger_multivariate

        return granger_multivariate(
            self._ds,
            features,
            target,
            max_lag=max_lag,
            lag=lag,
            covariate=covariate,
            n_perm=n_perm,
            seed=seed,
            min_obs=min_obs,
            aic_sample=aic_sample,
            gaps=gaps,
            run=run,
            window=window,
            group=group,
        )

    def detect_shift(
        self,
        variable="edge_ratio",
        *,
        methods=("cusum", "ttest", "maxderiv"),
        true_step=None,
        tolerance=None,
        baseline: int = 8,
        k: float = 0.5,
        h: float = 4.0,
        min_size: int = 5,
        smooth: bool = False,
        cusum_estimate: str = "change",
        sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Run the shift detectors on each (run, W[, group]) series.

        Forwards to :func:`sed_dask.analysis.shift.detect_shift` (whole docstring: ``ds.sed.help("detect_shift")``).
        """
        from sed_dask.analysis.shift import detect_shift

        return detect_shift(
            self._ds,
            variable,
            methods=methods,
            true_step=true_step,
            tolerance=tolerance,
            baseline=baseline,
            k=k,
            h=h,
            min_size=min_size,
            smooth=smooth,
            cusum_estimate=cusum_estimate,
            sv=sv,
            run=run,
            window=window,
            group=group,
        )

    def early_warning(
        self,
        *,
        detectors=None,
        tau=None,
        rank: str = "k_star",
        event: str | None = None,
        event_threshold: float = 0.9,
        sustain_event: int = 1,
        run=None,
        window=None,
        group=None,
        **params,
    ) -> xr.Dataset:
        """Causal alarms of every detector on every (run, W[, group]) edge series, and their lead.

        Forwards to :func:`sed_dask.analysis.warning.early_warning` (whole docstring: ``ds.sed.help("early_warning")``).
        """
        from sed_dask.analysis.warning import early_warning

        return early_warning(
            self._ds,
            detectors=detectors,
            tau=tau,
            rank=rank,
            event=event,
            event_threshold=event_threshold,
            sustain_event=sustain_event,
            run=run,
            window=window,
            group=group,
            **params,
        )

    def onset(
        self,
        variable="edge_ratio",
        *,
        k: float = 10.0,
        baseline: int = 3,
        floor="default",
        direction: str = "rise",
        sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Onset step per series (see :func:`onset_index`): ``onset_step`` (NaN if none),
        ``baseline_value`` and ``threshold``. NaNs are dropped before taking the baseline.

        Forwards to :func:`sed_dask.analysis.warning.onset` (whole docstring: ``ds.sed.help("onset")``).
        """
        from sed_dask.analysis.warning import onset

        return onset(
            self._ds,
            variable,
            k=k,
            baseline=baseline,
            floor=floor,
            direction=direction,
            sv=sv,
            run=run,
            window=window,
            group=group,
        )

    def lead_time(
        self,
        variable="edge_ratio",
        *,
        event="val_acc",
        event_threshold: float = 0.9,
        sustain: int = 1,
        event_direction: str = "above",
        k: float = 10.0,
        baseline: int = 3,
        floor="default",
        direction: str = "rise",
        sv=None,
        run=None,
        window=None,
        group=None,
    ) -> xr.Dataset:
        """Lead time = event_step − onset_step (positive: the warning precedes the event).

        Forwards to :func:`sed_dask.analysis.warning.lead_time` (whole docstring: ``ds.sed.help("lead_time")``).
        """
        from sed_dask.analysis.warning import lead_time

        return lead_time(
            self._ds,
            variable,
            event=event,
            event_threshold=event_threshold,
            sustain=sustain,
            event_direction=event_direction,
            k=k,
            baseline=baseline,
            floor=floor,
            direction=direction,
            sv=sv,
            run=run,
            window=window,
            group=group,
        )

    def attach_metrics(
        self, metrics, *, run=None, names=None, align: str = "exact", tolerance=None, overwrite: bool = False
    ) -> xr.Dataset:
        """Return ``ds`` with metric variables ``name(run, step)`` added.

        Forwards to :func:`sed_dask.analysis.metrics.attach_metrics`
        (whole docstring: ``ds.sed.help("attach_metrics")``).
        """
        from sed_dask.analysis.metrics import attach_metrics

        return attach_metrics(
            self._ds, metrics, run=run, names=names, align=align, tolerance=tolerance, overwrite=overwrite
        )

    def cross_seed_summary(self, variables=None, *, dim: str = "run", ddof: int = 0) -> xr.Dataset:
        """Mean ± std over ``dim`` (seeds) of each variable, using the seeds where it is defined.

        Forwards to :func:`sed_dask.analysis.phases.cross_seed_summary`
        (whole docstring: ``ds.sed.help("cross_seed_summary")``).
        """
        from sed_dask.analysis.phases import cross_seed_summary

        return cross_seed_summary(self._ds, variables, dim=dim, ddof=ddof)

    def weight_escape(self, *, runs=None, layers=None, sustain: int = 2) -> pd.DataFrame:
        """Per (run, layer): the step an outlier first escapes the bulk.

        Forwards to :func:`sed_dask.weights.queries.escape_steps`
        (whole docstring: ``ds.sed.help("weight_escape")``).
        """
        from sed_dask.weights.queries import escape_steps

        return escape_steps(self._ds, runs=runs, layers=layers, sustain=sustain)

    def weight_series(self, var: str = "n_outliers", *, runs=None, layers=None) -> pd.DataFrame:
        """Long table ``run, step, layer, <var>`` of one per-matrix variable over training (α, counts, norms).

        Forwards to :func:`sed_dask.weights.queries.series`
        (whole docstring: ``ds.sed.help("weight_series")``).
        """
        from sed_dask.weights.queries import series

        return series(self._ds, var, runs=runs, layers=layers)

    def weight_table(self, *, run: str | None = None, step: int | None = None, sustain: int = 2) -> pd.DataFrame:
        """Cross-layer table at one checkpoint (default: the run's last): shape, method, norms, stable rank,
        MP edge, outliers, alpha, plus each layer's escape step.

        Forwards to :func:`sed_dask.weights.queries.layer_table`
        (whole docstring: ``ds.sed.help("weight_table")``).
        """
        from sed_dask.weights.queries import layer_table

        return layer_table(self._ds, run=run, step=step, sustain=sustain)

    def alignment_summary(self, *, layers=None) -> pd.DataFrame:
        """Per (layer, side): mean/max overlap over windows, its ratio to chance, and the first window step
        where the overlap exceeds 10x chance (the update subspace is then far from random in that layer).

        Forwards to :func:`sed_dask.weights.queries.alignment_summary`
        (whole docstring: ``ds.sed.help("alignment_summary")``).
        """
        from sed_dask.weights.queries import alignment_summary

        return alignment_summary(self._ds, layers=layers)

    def help(self, name: str) -> str:
        """Full docstring of the analysis function behind ``ds.sed.<name>``."""
        if name not in _FORWARD:
            raise AttributeError(f"ds.sed has no query {name!r}; available: {sorted(_FORWARD)}")
        mod, fn = _FORWARD[name].split(":")
        mod = mod if mod.startswith("sed_dask.") else f"sed_dask.analysis.{mod}"
        return getattr(importlib.import_module(mod), fn).__doc__ or ""
