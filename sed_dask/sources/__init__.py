"""Sources: what a run is made of before it is stored.

Which tensors form the flat parameter vector (``selection``, ``param_index``, ``layers``), where the
checkpoints and their steps are (``discover``), the checks every checkpoint set passes before any task
(``validate``), training metrics by step (``metrics``), a run read straight from its checkpoint files
(``checkpoint_run``), and the recorder that writes a trajectory as it trains (``recorder``).
Imports only :mod:`sed_dask.readers` and the shared base (errors, config).
"""
