"""Exception types. Every message names the file, tensor, run or step at fault."""


class SEDError(Exception):
    """Base class for sed_dask errors."""


class CheckpointError(SEDError, ValueError):
    """A checkpoint file is unreadable, truncated, or inconsistent with the first checkpoint."""


class NonFiniteError(CheckpointError):
    """A parameter tensor holds NaN or Inf."""


class StoreError(SEDError, ValueError):
    """The trajectory or results store is missing something, or disagrees with the request."""


class AnalysisError(SEDError, ValueError):
    """An analysis query cannot run: unknown variable, missing metric, or a series too short.

    The message names the variable and the (run, W, group) series at fault.
    """


class MetricsError(SEDError, ValueError):
    """A metrics file (val_loss etc.) cannot be parsed or contradicts itself."""


class SEDWarning(UserWarning):
    """Base class of sed_dask warnings; the CLI prints them as one line."""


class StepMismatchWarning(SEDWarning):
    """A checkpoint records a different training step than its file name gives."""


class MetricsWarning(SEDWarning):
    """A metrics file holds NaN/Inf values."""


class ScriptReimportError(SEDError, RuntimeError):
    """sed_dask was called while a spawned worker process was importing the user's script."""
