"""Weight spectra over a training trajectory: per-layer bulk, outliers and heavy tails, and how updates align.

SED follows the spectrum of the *updates*; this subpackage (docs/method.md §18) follows that of the *weights*
of every checkpoint, out of core, next to it:

* :func:`weight_spectra` (``sed_dask.weight_spectra``) - for every (checkpoint, 2-D tensor): top-k
  singular values, the ESD, a Marchenko-Pastur bulk fit, outliers above the edge with a
  Tracy-Widom margin, the power-law tail exponent alpha, stable rank and norms
  (:mod:`.spectra` kernels, :mod:`.fit` fits, :mod:`.compute` the Dask pass);
* :func:`update_alignment` - principal angles between each window's top update directions,
  restricted to a layer, and the layer weight's top-k singular subspaces (:mod:`.alignment`);
* queries (:mod:`.queries`): :func:`escape_steps`, :func:`series`, :func:`layer_table`,
  :func:`alignment_summary`; figures (:mod:`.figures`) and the report section (:mod:`.report`).
"""

from __future__ import annotations

from sed_dask.weights.alignment import update_alignment
from sed_dask.weights.compute import weight_spectra
from sed_dask.weights.queries import alignment_summary, escape_steps, layer_table, series
from sed_dask.weights.spectra import WeightSpectrumError, matrix_spectrum, settings

__all__ = [
    "WeightSpectrumError",
    "alignment_summary",
    "escape_steps",
    "layer_table",
    "matrix_spectrum",
    "series",
    "settings",
    "update_alignment",
    "weight_spectra",
]
