"""The trajectory store and everything that writes to disk safely.

``trajectory``: the Zarr v3 store of runs (``params (step, P)`` float32) and its writer locks;
``ingest``: checkpoints -> store, parallel and resumable; ``outputs``: the safe writers and readers of
every output (results stores, report folders) that never destroy and never pass off a partial result.
"""

from sed_dask.store.trajectory import (  # noqa: F401  (the store's public names, as before the move)
    RunLockedError,
    RunStore,
    TrajectoryStore,
    open_store,
    run_lock,
    run_lock_path,
    write_trajectory,
)
