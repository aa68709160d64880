"""Analysis queries over the results Dataset (docs/result_schema.md): pure functions on xarray.

One module per query family: ``edge`` (signal rank, edge summary, null significance, PC2 noise
transition), ``phases`` (three-phase segmentation, collapse step, cross-seed summaries), ``events``
(collapse → val-loss stabilisation event study), ``lag`` (detrended lagged
correlation, W sweep / lag flip, sliding and phase correlations), ``granger``, ``shift`` (CUSUM,
t-test scan, max-derivative), ``warning`` (onset and lead time) and ``metrics`` (attach metrics).
Every function takes the Dataset first, variables by name / ``sed_role`` / alias, and keyword-only
tuning arguments; ``ds.sed`` (sed_dask.accessor) forwards to them. Imports flow results ->
analysis only: nothing here imports the engine, the readers, Dask distributed or torch.
"""

from __future__ import annotations

from sed_dask.analysis._series import fixed_edge, mode_rank, require_metric, resolve, window_steps
from sed_dask.analysis.defaults import ARM, DEFAULT_TAU, PLATEAU, SUSTAIN, describe_tau, tau_value
from sed_dask.analysis.detectors import DETECTORS, Alert, EdgeWatch
from sed_dask.analysis.edge import (
    edge_null,
    edge_summary,
    null_distribution,
    pc2_summary,
    rank_notes,
    signal_rank,
    window_statistic,
)
from sed_dask.analysis.events import event_study
from sed_dask.analysis.granger import granger, granger_multivariate, granger_test, residualize
from sed_dask.analysis.lag import (
    detrend_series,
    lag_correlation,
    lag_flips,
    lag_sweep,
    lagged_corr,
    peak_lag,
    peak_null,
    peak_resolved,
    pearson,
    phase_correlation,
    phase_surrogates,
    sliding_correlation,
)
from sed_dask.analysis.metrics import attach_metrics
from sed_dask.analysis.phases import collapse_step, cross_seed_summary, episode, phase_intervals, phases, segment
from sed_dask.analysis.shift import cusum, detect_shift, max_derivative, welch_scan
from sed_dask.analysis.warning import early_warning, event_index, lead_time, onset, onset_index

__all__ = [
    "resolve",
    "require_metric",
    "fixed_edge",
    "mode_rank",
    "window_steps",
    "DEFAULT_TAU",
    "PLATEAU",
    "SUSTAIN",
    "ARM",
    "tau_value",
    "describe_tau",
    "signal_rank",
    "rank_notes",
    "edge_summary",
    "edge_null",
    "null_distribution",
    "window_statistic",
    "pc2_summary",
    "segment",
    "episode",
    "phase_intervals",
    "phases",
    "collapse_step",
    "cross_seed_summary",
    "event_study",
    "detrend_series",
    "pearson",
    "lagged_corr",
    "peak_lag",
    "lag_correlation",
    "lag_sweep",
    "lag_flips",
    "peak_resolved",
    "peak_null",
    "phase_surrogates",
    "sliding_correlation",
    "phase_correlation",
    "granger_test",
    "granger",
    "granger_multivariate",
    "residualize",
    "cusum",
    "welch_scan",
    "max_derivative",
    "detect_shift",
    "onset_index",
    "event_index",
    "onset",
    "lead_time",
    "early_warning",
    "EdgeWatch",
    "Alert",
    "DETECTORS",
    "attach_metrics",
]
