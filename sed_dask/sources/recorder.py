"""Record a training trajectory in the layout ``sed_dask.ingest`` reads.

SED needs *full-precision* checkpoints at a fixed step cadence plus validation metrics at the same
steps (docs/method.md §2.1, §2.5). This callback writes exactly that from any PyTorch loop:

* ``ckpt_{step:06d}.pt`` holding ``{"step": step, "model_state_dict": state_dict}`` (fmt="pt"), or
  ``model_{step:06d}.safetensors`` written by ``safetensors.torch.save_model`` (fmt="safetensors",
  which drops the duplicate names of tied weights and stores the step in the metadata);
* ``metrics.json``: a list of records ``{"step": .., "val_loss": .., "val_acc": .., ...}``.

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash or
a kill mid-write never leaves a truncated checkpoint or a corrupt ``metrics.json`` behind, and a
concurrent ingester never sees a half-written file. Re-creating a recorder on the same folder
resumes: earlier metric records are kept.

This module deliberately imports only torch (and safetensors on demand), never dask, so that it
can run inside training jobs that have nothing else of sed_dask installed.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrajectoryRecorder", "checkpoint_name", "METRICS_FILE"]

METRICS_FILE = "metrics.json"
_FORMATS = ("pt", "safetensors")


def checkpoint_name(step: int, fmt: str = "pt") -> str:
    """File name of the checkpoint of ``step`` (the names the ingester's readers discover)."""
    if fmt == "pt":
        return f"ckpt_{int(step):06d}.pt"
    if fmt == "safetensors":
        return f"model_{int(step):06d}.safetensors"
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {_FORMATS}")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``.

    The temporary name starts with ``.tmp-`` and has no checkpoint suffix, so checkpoint
    discovery (``ckpt_(\\d+)\\.pt``) can never pick up a partial file.
    """
    # not mkstemp: its 0600 mode would make checkpoints unreadable to other users of a shared FS
    tmp = path.parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}.partial"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # data on disk before the rename publishes it (survives an OS crash too)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _to_number(name: str, value: Any) -> float | int | None:
    """A JSON-safe scalar: tensors/numpy scalars become Python numbers, NaN/Inf become None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (bool, numbers.Number)):
        value = value.item()  # numpy scalar / 0-d array
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _cpu_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copy of a state dict that keeps tied tensors tied (one copy per storage view).

    CPU tensors are saved as they are (torch.save serialises them synchronously); tensors on an
    accelerator are copied once per distinct view, so tied weights stay shared in the file.
    """
    out: dict[str, torch.Tensor] = {}
    memo: dict[tuple, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            continue  # e.g. _extra_state objects: not part of the parameter vector
        t = t.detach()
        if t.device.type != "cpu":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key not in memo:
                memo[key] = t.to("cpu")
            t = memo[key]
        out[name] = t
    return out


class TrajectoryRecorder:
    """Save checkpoints every ``every`` steps and keep ``metrics.json`` in step with them.

    ``every``: checkpoint cadence in optimiser steps; SED assumes uniform spacing (docs/method.md §2.3),
    so :meth:`maybe_save` saves exactly the steps divisible by ``every`` (step 0 included).
    ``fmt``: ``"pt"`` or ``"safetensors"``. Dtypes are kept as they are (never downcast); pass
    ``upcast=True`` to store floating tensors as float32 when training in bf16/fp16.
    """

    def __init__(self, out_dir, *, every: int = 100, fmt: str = "pt", upcast: bool = False):
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if fmt not in _FORMATS:
            raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {_FORMATS}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.every = int(every)
        self.fmt = fmt
        self.upcast = bool(upcast)
        self.metrics_path = self.out_dir / METRICS_FILE
        self._records: dict[int, dict] = {}
        if self.metrics_path.exists():  # resume: keep what an earlier (possibly killed) run logged
            with open(self.metrics_path) as f:
                for rec in json.load(f):
                    self._records[int(rec["step"])] = dict(rec)

    # ------------------------------------------------------------------ checkpoints
    def should_save(self, step: int) -> bool:
        """True for the steps on the checkpoint cadence."""
        return int(step) % self.every == 0

    def maybe_save(self, step: int, model: torch.nn.Module, /, **metrics) -> Path | None:
        """:meth:`save` if ``step`` is on the cadence, else nothing (metrics are then not logged)."""
        if not self.should_save(step):
            return None
        return self.save(step, model, **metrics)

    def path_for(self, step: int) -> Path:
        return self.out_dir / checkpoint_name(step, self.fmt)

    def save(self, step: int, model: torch.nn.Module, /, **metrics) -> Path:
        """Write the checkpoint of ``step`` now (and log ``metrics`` for it, if any)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        path = self.path_for(step)
        if self.fmt == "pt":
            state = _cpu_state_dict(model.state_dict())
            if self.upcast:
                state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
            atomic_write(path, lambda tmp: torch.save({"step": step, "model_state_dict": state}, tmp))
        else:
            from safetensors.torch import save_model

            if self.upcast and any(
                p.is_floating_point() and p.dtype != torch.float32 for p in model.state_dict().values()
            ):
                raise ValueError(
                    "upcast=True is only supported with fmt='pt' (save_model stores the module's own dtypes)"
                )
            atomic_write(path, lambda tmp: save_model(model, tmp, metadata={"step": str(step)}))
        if metrics:
            self.log_metrics(step, **metrics)
        return path

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, step: int, /, **metrics) -> None:
        """Merge ``metrics`` into the record of ``step`` and rewrite ``metrics.json`` atomically."""
        if not metrics:
            return
        step = int(step)
        rec = dict(self._records.get(step, {"step": step}))
        for name, value in metrics.items():
            if name == "step":
                raise ValueError("'step' is the record key, not a metric name")
            rec[name] = _to_number(name, value)
        records = {**self._records, step: rec}
        ordered = [records[s] for s in sorted(records)]

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(ordered, f, indent=1)

        atomic_write(self.metrics_path, write)
        self._records = records  # only once the file holds them: memory and disk never disagree

    @property
    def records(self) -> list[dict]:
        """Metric records sorted by step (copies)."""
        return [dict(self._records[s]) for s in sorted(self._records)]

    def saved_steps(self) -> list[int]:
        """Steps whose checkpoint file exists in ``out_dir`` (in this recorder's format)."""
        pattern = "ckpt_*.pt" if self.fmt == "pt" else "model_*.safetensors"
        steps = []
        for p in self.out_dir.glob(pattern):
            digits = p.stem.split("_", 1)[1]
            if digits.isdigit():
                steps.append(int(digits))
        return sorted(steps)

    def __repr__(self) -> str:
        return f"TrajectoryRecorder({str(self.out_dir)!r}, every={self.every}, fmt={self.fmt!r})"
