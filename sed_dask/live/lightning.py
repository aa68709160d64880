"""A Lightning ``Callback`` for live SED (optional: needs ``lightning``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from sed_dask.live.callbacks import LiveRecorder


class SEDCallback(Callback):
    """Save SED checkpoints every ``every`` optimiser steps; log the live scalars with ``trainer.logger``."""

    def __init__(self, out_dir, *, every: int = 100, windows=(10,), results=None, run=None, groups=None, echo=print):
        self.live = LiveRecorder(
            out_dir, every=every, windows=windows, results=results, run=run, groups=groups, echo=echo
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scalars = self.live.maybe_save(trainer.global_step, pl_module)
        if scalars and trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=trainer.global_step)
