"""Exception types. Every message names the file, tensor, run or step at fault."""


class SEDError(Exception):
    """Base class for sed_dask errors."""


class CheckpointError(SEDError, ValueError):
    """A checkpoint file is unreadable, truncated, or inconsistent with the first checkpoint."""


class NonFiniteError(CheckpointError):
    """A parameter tensor holds NaN or Inf."""


class StoreError(SEDError, ValueError):
    """The trajectory or results store is missing something, or disagrees with the request."""
