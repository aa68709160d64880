"""Training-loop integration: save SED checkpoints at a cadence and keep the live spectra up to date.

* Plain PyTorch: :class:`LiveRecorder` (a ``TrajectoryRecorder`` whose ``maybe_save`` also ingests the
  checkpoint and updates the live results, returning the live scalars), or a ``TrajectoryRecorder``
  plus :func:`watch_in_background` (the watcher in a thread of the training process).
* Hugging Face: :mod:`sed_dask.live.hf` (``SEDTrainerCallback``); Lightning: :mod:`sed_dask.live.lightning`
  (``SEDCallback``). Both log these scalars through the trainer's own logger (TensorBoard, W&B, ...).

Scalars, per window W (global group): ``sed/W{W}/edge_ratio``, ``sed/W{W}/k_star``,
``sed/W{W}/sigma1_sigma2`` and ``sed/alerts`` (alerts raised at this checkpoint).
"""

from __future__ import annotations

import os
import threading

from sed_dask.live.incremental import LiveSpectrum
from sed_dask.live.watch import AlertLog, default_paths, format_alert, watch
from sed_dask.sources.recorder import TrajectoryRecorder


class LiveRecorder:
    """Checkpoints every ``every`` steps into ``out_dir`` and the live spectra of them in ``results``.

    ``results`` defaults to ``<out_dir>-live.zarr`` (its trajectory store and alerts file beside it).
    ``maybe_save(step, model, **metrics)`` returns ``{scalar name: value}`` after a checkpoint that
    completed a window, else None. Re-creating it on the same folders resumes.
    """

    def __init__(
        self,
        out_dir,
        *,
        every: int = 100,
        windows=(10,),
        results=None,
        run: str | None = None,
        groups=None,
        fmt: str = "pt",
        echo=print,
    ):
        self.recorder = TrajectoryRecorder(out_dir, every=every, fmt=fmt)
        out_dir = os.path.normpath(os.fspath(out_dir))
        self.results = os.fspath(results) if results is not None else f"{out_dir}-live.zarr"
        self.store, alerts = default_paths(self.results)
        self.run = run or os.path.basename(out_dir)
        self.engine = LiveSpectrum(
            self.store, self.results, run=self.run, windows=windows, groups=groups, scheduler="threads"
        )
        self.alert_log = AlertLog(alerts)
        self.echo = echo
        self.alerts: list[dict] = []
        self._pending: list[int] = []
        self._n_ingested = len(self.engine.ckpt_steps) if self.engine.ckpt_steps is not None else 0

    def maybe_save(self, step: int, model, /, **metrics) -> dict | None:
        path = self.recorder.maybe_save(step, model, **metrics)
        if path is None:
            return None
        from sed_dask.store.ingest import ingest

        self._pending.append(int(step))
        if len(self._pending) + self._n_ingested < 2:  # a run needs two checkpoints
            return None
        todo = {s: str(self.recorder.path_for(s)) for s in self._pending}
        recs = [r for r in self.recorder.records if int(r["step"]) in todo] or None
        ingest(todo, self.store, self.run, metrics=recs, progress=False, scheduler="threads")
        self._n_ingested += len(todo)
        self._pending = []
        u = self.engine.update()
        if u is None:
            return None
        new = [a for a in u.alerts if self.alert_log.add(a)]
        for a in new:
            self.alerts.append(a)
            if self.echo is not None:
                self.echo(format_alert(a))
        return scalars_of(u, len(new))


def scalars_of(update, n_alerts: int) -> dict[str, float]:
    """The live scalars of an update, as logger tags."""
    out = {}
    for (W, g), s in sorted(update.scalars.items()):
        if g == "all":
            out[f"sed/W{W}/edge_ratio"] = s["edge_ratio"]
            out[f"sed/W{W}/k_star"] = s["k_star"]
            out[f"sed/W{W}/sigma1_sigma2"] = s["sigma1_sigma2"]
    out["sed/alerts"] = float(n_alerts)
    return out


class BackgroundWatch:
    """A watcher running in a thread; ``stop()`` ends it between updates and returns its summary."""

    def __init__(self, folder, **kw):
        self.event = threading.Event()
        self.summary = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(folder, kw), daemon=True)
        self.thread.start()

    def _run(self, folder, kw):
        try:
            self.summary = watch(folder, stop=self.event, **kw)
        except BaseException as exc:  # noqa: BLE001  (re-raised by stop(), in the caller's thread)
            self.error = exc

    def stop(self, timeout: float | None = None):
        self.event.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.summary


def watch_in_background(recorder_or_folder, *, results, **kw) -> BackgroundWatch:
    """Start ``sed_dask.watch`` on a ``TrajectoryRecorder``'s folder (or any folder) in a thread."""
    folder = getattr(recorder_or_folder, "out_dir", recorder_or_folder)
    return BackgroundWatch(os.fspath(folder), results=results, **kw)
