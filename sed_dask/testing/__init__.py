"""Planted ground truth for validating SED conclusions (public: tests, benchmarks and users use it).

``PlantedTrajectory``: delta trajectories with known signal rank, strengths, SNR, noise anisotropy,
rise/plateau/collapse/rebound and distribution-shift steps, streamed in column blocks.
"""
from .trajectories import BLOCK, PlantedTrajectory

__all__ = ["BLOCK", "PlantedTrajectory"]
