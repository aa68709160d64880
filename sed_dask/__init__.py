"""sed_dask: distributed, out-of-core Spectral Edge Dynamics of training trajectories.

Public entry points are imported lazily so that ``import sed_dask`` stays cheap (no torch import)
and so that worker processes only load what their tasks need.
"""

from __future__ import annotations

import importlib

from sed_dask import (
    accessor,  # noqa: F401  (registers the ds.sed accessor; imports xarray only)
    config,  # noqa: F401  (registers package defaults with dask.config)
)

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "TrajectoryStore": "sed_dask.store.trajectory",
    "open_store": "sed_dask.store.trajectory",
    "ingest": "sed_dask.store.ingest",
    "open_checkpoints": "sed_dask.sources.checkpoint_run",
    "CheckpointRun": "sed_dask.sources.checkpoint_run",
    "open_checkpoint": "sed_dask.readers",
    "discover_checkpoints": "sed_dask.sources.discover",
    "load_metrics": "sed_dask.sources.metrics",
    "spectrum": "sed_dask.results.spectra",
    "banded_gram": "sed_dask.engine.gram",
    "sketch": "sed_dask.engine.sketch",
    "spectra_from_sketch": "sed_dask.results.sketch_spectra",
    "jl_error_report": "sed_dask.results.sketch_spectra",
    "directions": "sed_dask.engine.directions",
    "subspace_rotation": "sed_dask.engine.directions",
    "connect": "sed_dask.cluster.client",
    "open_results": "sed_dask.store.outputs",
    "weight_spectra": "sed_dask.weights",
    "update_alignment": "sed_dask.weights",
    "watch": "sed_dask.live.watch",
    "LiveSpectrum": "sed_dask.live.incremental",
    "open_live": "sed_dask.live.incremental",
    "LiveRecorder": "sed_dask.live.callbacks",
    "watch_in_background": "sed_dask.live.callbacks",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sed_dask' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
