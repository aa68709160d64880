"""Planted ground truth for validating SED conclusions (public: tests, benchmarks and users use it).

``PlantedTrajectory``: delta trajectories with known signal rank, strengths, SNR, noise anisotropy,
rise/plateau/collapse/rebound and distribution-shift steps, streamed in column blocks;
``planted_results`` turns them into the engine's results Dataset; ``planted_lag_pair`` and
``planted_shift_series`` give scalar series with a known lead/lag or shift step.
"""

from sed_dask.testing.series import planted_lag_pair, planted_shift_series
from sed_dask.testing.trajectories import BLOCK, PlantedTrajectory, fourier_coefficients, planted_results

__all__ = [
    "BLOCK",
    "PlantedTrajectory",
    "fourier_coefficients",
    "planted_results",
    "planted_lag_pair",
    "planted_shift_series",
]
