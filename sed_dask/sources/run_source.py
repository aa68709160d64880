"""What every pass reads a run through: a store run (:class:`sed_dask.store.RunStore`) or checkpoint
files read directly (:class:`sed_dask.sources.checkpoint_run.CheckpointRun`).

The two give the same tiles, and so the same float64 sums (docs/architecture.md, "Determinism"), because
the passes see only this protocol.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sed_dask.sources.param_index import ParamIndex


@runtime_checkable
class RunSource(Protocol):
    """A run of checkpoints in step order, readable as float32 row blocks of its flat parameter vector."""

    name: str
    params: Any  # a zarr array, or any object with ``read_block(r0, r1, c0, c1, out)``
    attrs: dict  # provenance written into results (selection policy, sources, ...)

    @property
    def index(self) -> ParamIndex: ...

    @property
    def policy(self) -> dict: ...

    @property
    def n_params(self) -> int: ...

    @property
    def n_rows(self) -> int: ...

    @property
    def read_unit(self) -> int: ...

    @property
    def token_id(self) -> str: ...

    @property
    def steps(self) -> np.ndarray: ...

    def check_complete(self) -> np.ndarray:
        """The steps that are complete (a store may hold rows still being written)."""

    def metrics(self) -> dict[str, np.ndarray]:
        """``{"step": ..., name: values}`` of the run's training metrics, or {}."""

    def read(self, rows: slice, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 block ``[rows, start:stop]`` (small reads and tests)."""


_SEED_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])seed[-_=]?(\d+)(?![0-9])", re.IGNORECASE)


def seed_from_name(name: str) -> int | None:
    """The seed a run name spells (``seed3``, ``run-seed_3``, ``lr1e-3_seed=3`` -> 3), or None."""
    m = _SEED_IN_NAME.search(str(name))
    return int(m.group(1)) if m else None


def check_seed(seed, *, what: str = "seed") -> int | None:
    """``seed`` as a non-negative int (None stays None); anything else is a clear error."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


def run_seed(run) -> int | None:
    """A run's seed: the one recorded with it (``ingest(seed=...)``), else the one its name spells."""
    recorded = (getattr(run, "attrs", None) or {}).get("seed")
    return int(recorded) if recorded is not None else seed_from_name(run.name)
