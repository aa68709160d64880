"""``ds.sed``: a thin Dataset accessor forwarding to :mod:`sed_dask.analysis`.

Functions are the API; the accessor is sugar (xskillscore style). It imports
only xarray at import time — the analysis modules load on first use — so registering it on
``import sed_dask`` stays cheap and never pulls in the engine, Dask distributed or torch.
"""
from __future__ import annotations

import importlib

import xarray as xr

# accessor method -> "module:function" in sed_dask.analysis
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
    # weight spectra (sed_dask.weight_spectra / update_alignment Datasets): full module paths
    "weight_escape": "sed_dask.weights.queries:escape_steps",
    "weight_series": "sed_dask.weights.queries:series",
    "weight_table": "sed_dask.weights.queries:layer_table",
    "alignment_summary": "sed_dask.weights.queries:alignment_summary",
}


def _target(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod if mod.startswith("sed_dask.") else f"sed_dask.analysis.{mod}"), fn)


def _forwarder(name: str, spec: str):
    def method(self, *args, **kwargs):
        return _target(spec)(self._ds, *args, **kwargs)

    mod, fn = spec.split(":")
    method.__name__ = name
    method.__qualname__ = f"SEDAccessor.{name}"
    where = mod if mod.startswith("sed_dask.") else f"sed_dask.analysis.{mod}"
    method.__doc__ = f"``{fn}(ds, ...)`` from :mod:`{where}` on this Dataset."
    return method


@xr.register_dataset_accessor("sed")
class SEDAccessor:
    """Spectral-edge queries on a results Dataset: ``ds.sed.lag_correlation(...)`` etc."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_FORWARD) | {"lag_flips"})

    def lag_flips(self, sweep: xr.Dataset | None = None, *, pairs: str = "consecutive", rejected: bool = False,
                  **sweep_options):
        """Lag-flip table (``sed_dask.analysis.lag_flips``) of ``sweep``, or of ``lag_sweep(ds, **sweep_options)``
        when no sweep is given: ``ds.sed.lag_flips()`` and ``ds.sed.lag_flips(ds.sed.lag_sweep())`` agree."""
        from .analysis.lag import lag_flips, lag_sweep

        if sweep is None:
            sweep = lag_sweep(self._ds, **sweep_options)
        elif sweep_options:
            raise TypeError("pass either a sweep or lag_sweep options, not both")
        return lag_flips(sweep, pairs=pairs, rejected=rejected)

    def help(self, name: str) -> str:
        """Full docstring of the analysis function behind ``ds.sed.<name>``."""
        if name not in _FORWARD:
            raise AttributeError(f"ds.sed has no query {name!r}; available: {sorted(_FORWARD)}")
        return _target(_FORWARD[name]).__doc__ or ""


for _name, _spec in _FORWARD.items():
    setattr(SEDAccessor, _name, _forwarder(_name, _spec))
del _name, _spec
