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

from ._series import fixed_edge, mode_rank, require_metric, resolve, window_steps
from .defaults import ARM, DEFAULT_TAU, PLATEAU, SUSTAIN, describe_tau, tau_value
from .edge import (edge_null, edge_summary, null_distribution, pc2_summary, rank_notes, signal_rank,
                   window_statistic)
from .events import event_study
from .granger import granger, granger_multivariate, granger_test, residualize
from .lag import (detrend_series, lag_correlation, lag_flips, lag_sweep, lagged_corr, peak_lag, peak_null,
                  peak_resolved, pearson, phase_correlation, phase_surrogates, sliding_correlation)
from .metrics import attach_metrics
from .phases import collapse_step, cross_seed_summary, episode, phase_intervals, phases, segment
from .shift import cusum, detect_shift, max_derivative, welch_scan
from .detectors import DETECTORS, Alert, EdgeWatch
from .warning import early_warning, event_index, lead_time, onset, onset_index

__all__ = [
    "resolve", "require_metric", "fixed_edge", "mode_rank", "window_steps",
    "DEFAULT_TAU", "PLATEAU", "SUSTAIN", "ARM", "tau_value", "describe_tau",
    "signal_rank", "rank_notes", "edge_summary", "edge_null", "null_distribution", "window_statistic", "pc2_summary",
    "segment", "episode", "phase_intervals", "phases", "collapse_step", "cross_seed_summary", "event_study",
    "detrend_series", "pearson", "lagged_corr", "peak_lag", "lag_correlation", "lag_sweep", "lag_flips",
    "peak_resolved", "peak_null", "phase_surrogates",
    "sliding_correlation", "phase_correlation",
    "granger_test", "granger", "granger_multivariate", "residualize",
    "cusum", "welch_scan", "max_derivative", "detect_shift",
    "onset_index", "event_index", "onset", "lead_time", "early_warning", "EdgeWatch", "Alert", "DETECTORS",
    "attach_metrics",
]
