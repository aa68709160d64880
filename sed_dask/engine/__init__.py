"""The engine: passes over a run's deltas, and the block kernels they run.

``passes`` holds what every pass shares (tiles, reads, the fixed-order reduction, running a graph);
``gram`` the banded float64 Gram, ``sketch`` the JL sketch (operators in ``jl``), ``directions`` the
top singular vectors; ``windows`` and ``noise`` turn a band into per-window spectra on the client.
Imports flow down only: sources and store below, nothing from results, analysis or report.
"""
