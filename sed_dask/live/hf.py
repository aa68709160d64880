"""A Hugging Face ``transformers.TrainerCallback`` for live SED (optional: needs ``transformers``)."""

from __future__ import annotations

from transformers import TrainerCallback

from sed_dask.live.callbacks import LiveRecorder


class SEDTrainerCallback(TrainerCallback):
    """Save SED checkpoints every ``every`` optimiser steps and log the live scalars with the trainer's logs.

    The scalars ride the trainer's own ``on_log`` (so TensorBoard, W&B, ... show them as ``sed/...``):
    after a checkpoint the callback asks the trainer to log and adds its scalars to those logs. It must
    run before the reporting callbacks, so attach it with ``SEDTrainerCallback(...).attach(trainer)``
    (it puts itself first) rather than ``Trainer(callbacks=[...])``, which would append it after them.
    """

    def __init__(self, out_dir, *, every: int = 100, windows=(10,), results=None, run=None, groups=None, echo=print):
        self.live = LiveRecorder(
            out_dir, every=every, windows=windows, results=results, run=run, groups=groups, echo=echo
        )
        self.pending: dict | None = None

    def attach(self, trainer):
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_step_end(self, args, state, control, model=None, **kwargs):
        scalars = self.live.maybe_save(state.global_step, model)
        if scalars:
            self.pending = scalars
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            logs.update(self.pending)
            self.pending = None
