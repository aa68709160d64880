"""sed_dask: distributed, out-of-core Spectral Edge Dynamics of training trajectories.

Public entry points are imported lazily so that ``import sed_dask`` stays cheap (no torch import)
and so that worker processes only load what their tasks need.
"""
from __future__ import annotations

import importlib

from . import config  # noqa: F401  (registers package defaults with dask.config)
from . import accessor  # noqa: F401  (registers the ds.sed accessor; imports xarray only)

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "TrajectoryStore": "sed_dask.store",
    "open_store": "sed_dask.store",
    "ingest": "sed_dask.ingest",
    "open_checkpoints": "sed_dask.checkpoint_run",
    "CheckpointRun": "sed_dask.checkpoint_run",
    "open_checkpoint": "sed_dask.readers",
    "discover_checkpoints": "sed_dask.discover",
    "load_metrics": "sed_dask.metrics_io",
    "spectrum": "sed_dask.spectra",
    "banded_gram": "sed_dask.gram",
    "sketch": "sed_dask.sketch",
    "spectra_from_sketch": "sed_dask.sketch_spectra",
    "jl_error_report": "sed_dask.sketch_spectra",
    "directions": "sed_dask.directions",
    "subspace_rotation": "sed_dask.directions",
    "weight_spectra": "sed_dask.weights",
    "update_alignment": "sed_dask.weights",
    "connect": "sed_dask.cluster",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sed_dask' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
