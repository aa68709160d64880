"""One set of defaults for every conclusion (CLI, accessor, events, warnings, report, demo).

Each value was chosen from the planted-truth tables in benchmarks/README.md ("Fidelity") and the
real grokking runs ("Early warning"); docs/method.md gives the definitions.
"""

from __future__ import annotations

import numpy as np

from sed_dask.errors import AnalysisError

#: collapse threshold: the W-aware noise-level adjacent ratio 1 + 2 W^(-2/3) (1.54 at W=5, 1.43 at
#: W=10, 1.27 at W=20). An absolute 1.20 (the paper's, tuned for TinyStories at W=10) never fired on
#: the demo's runs, whose edges stay at 1.3-1.5 after the collapse.
DEFAULT_TAU = "auto"

#: plateau level: PLATEAU x the episode's median edge (phases.episode); the reference's rules use
#: PLATEAU x the peak, contiguous around it
PLATEAU = 0.85

#: windows a level crossing must hold to count (collapse, rebound, causal alarms): one dip or spike is
#: not a phase
SUSTAIN = 2


#: a detector arms, and a rebound starts, when the edge exceeds ARM x tau: clearly above the noise level
ARM = 1.25


def mp_adjacent_ratio(W) -> np.ndarray:
    """1 + 2 W^(-2/3): the adjacent ratio of noise values (Tracy-Widom spacing heuristic)."""
    return 1.0 + 2.0 * np.asarray(W, dtype=np.float64) ** (-2.0 / 3.0)


def tau_value(tau, W) -> float:
    """The numeric threshold of ``tau`` (a number or 'auto') at window length ``W``."""
    if isinstance(tau, str):
        if tau != "auto":
            raise AnalysisError(f"tau must be a number > 1 or 'auto', got {tau!r}")
        if W is None:
            raise AnalysisError("tau='auto' needs the window length W (a 'window' dim)")
        return float(mp_adjacent_ratio(W))
    t = float(tau)
    if not np.isfinite(t) or t <= 1.0:
        raise AnalysisError(f"tau must be a ratio > 1 (an edge sigma_k/sigma_(k+1) is >= 1), got {tau!r}")
    return t


def describe_tau(tau, W=None) -> str:
    if tau == "auto":
        return "tau = 1 + 2 W^(-2/3)" + (f" = {tau_value(tau, W):.3f} at W = {W}" if W is not None else "")
    return f"tau = {float(tau):g}"
