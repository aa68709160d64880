"""Follow a training run while it trains: ingest each complete checkpoint, update the spectra, raise alerts.

``watch(DIR | STORE, results=R, windows=...)`` polls a checkpoint folder (and ingests what is new
into a trajectory store) or a store another ingest appends to, updates the live results store
(:class:`sed_dask.live.incremental.LiveSpectrum`), runs the causal detectors on every new window and
prints each alert as one line and appends it to a JSON-lines file.

Complete checkpoints only: ``TrajectoryRecorder`` publishes a file by an atomic rename, and
discovery never matches its temporary names; another writer's file is taken once its size and
mtime have not changed for ``settle`` seconds, and a file that still fails to load is retried
(not fatal) until it does. Steps are taken in order: a later checkpoint waits for an earlier one.

Stops on ``until`` (a checkpoint step), ``idle_timeout`` seconds without a new checkpoint, or
SIGINT/SIGTERM, which are honoured between updates, so nothing is half-written; a SIGKILL mid-append
is repaired on restart (the results store only trusts committed steps), and a restarted watcher
resumes where the store is. Alerts a killed watcher had not written yet are written on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

from sed_dask.analysis.detectors import DETECTORS
from sed_dask.errors import SEDError, StoreError
from sed_dask.live.incremental import LiveSpectrum
from sed_dask.sources.discover import discover_checkpoints
from sed_dask.store.outputs import describe
from sed_dask.store.trajectory import RunLockedError, open_store

ALERT_KEY = ("run", "window", "group", "detector", "step")


@dataclasses.dataclass
class WatchSummary:
    """How a watch ended: the last checkpoint step processed, the alerts raised, why it stopped."""

    last_step: int | None
    n_updates: int
    alerts: list[dict]
    stopped: str


def default_paths(results) -> tuple[str, str]:
    """``(trajectory store, alerts file)`` beside ``results``.

    ``live.zarr`` -> ``live-trajectory.zarr``, ``live-alerts.jsonl``.
    """
    base = os.path.splitext(os.path.normpath(os.fspath(results)))[0]
    return f"{base}-trajectory.zarr", f"{base}-alerts.jsonl"


class AlertLog:
    """The JSON-lines alerts file: one complete line per alert, fsync'd; a torn last line is dropped."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.keys: set = set()
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            keep = data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):  # killed mid-line
                with open(self.path, "wb") as f:
                    f.write(keep)
            for line in keep.decode().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.keys.add(tuple(rec.get(k) for k in ALERT_KEY))

    def add(self, rec: dict) -> bool:
        """Append ``rec`` unless the file has it already; True if written."""
        key = tuple(rec.get(k) for k in ALERT_KEY)
        if key in self.keys:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.keys.add(key)
        return True


def format_alert(a: dict) -> str:
    """The one line an alert is printed as."""
    return (
        f"ALERT step={a['step']} run={a['run']} W={a['window']} group={a['group']} detector={a['detector']} "
        f"value={a['value']:.4g} threshold={a['threshold']:.4g} k={a['k']}"
    )


def format_update(u) -> str:
    """One status line per update: the edge of every W (global group)."""
    parts = []
    for (W, g), s in sorted(u.scalars.items()):
        if g != "all":
            continue
        parts.append(f"W={W} edge={s['edge_ratio']:.3g} k*={s['k_star']:.0f} s1/s2={s['sigma1_sigma2']:.3g}")
    return f"step {u.steps[-1]}: " + "  ".join(parts) + f"  (+{len(u.steps)} step(s), {u.seconds:.2f} s)"


def _ready(folder: str, after: int | None, settle: float, seen: dict) -> dict[int, str]:
    """Checkpoints of ``folder`` later than ``after`` that are complete, in order up to the first that is not."""
    found = discover_checkpoints(folder) if os.path.isdir(folder) else {}
    out = {}
    now = time.time()
    for step in sorted(found):
        if after is not None and step <= after:
            continue
        path = found[step]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            break
        sig = (st.st_size, st.st_mtime_ns)
        stable = seen.get(path) == sig or now - st.st_mtime >= settle
        seen[path] = sig
        if not stable:
            break
        out[step] = path
    return out


def _silent(line: str) -> None:
    pass


def _metrics_for(folder: str, steps: set) -> dict | None:
    """The folder's metrics (``metrics.json`` or ``.csv``, any layout ingest reads) for the ingested steps.

    Ingest refuses metrics of steps it has not got, so the file is cut to ``steps``. A file that does
    not parse (a writer mid-way through rewriting it) is skipped for this batch, as if absent.
    """
    import math

    from sed_dask.errors import MetricsError
    from sed_dask.sources.metrics import load_metrics

    for name in ("metrics.json", "metrics.csv"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            data = load_metrics(path, nonfinite="ignore")
        except (MetricsError, OSError):
            return None
        keep = [i for i, s in enumerate(data["step"].tolist()) if s in steps]
        if not keep:
            return None
        cols = {
            k: [None if not math.isfinite(float(v[i])) else float(v[i]) for i in keep]
            for k, v in data.items()
            if k != "step"
        }
        return {"step": [int(data["step"][i]) for i in keep], **cols}
    return None


def watch(
    source,
    *,
    results,
    windows=(10,),
    store=None,
    run: str | None = None,
    groups=None,
    alerts=None,
    until: int | None = None,
    idle_timeout: float | None = None,
    poll: float = 0.5,
    settle: float = 1.0,
    normalize_spacing: bool = False,
    detectors=DETECTORS,
    tau=None,
    detector_params: dict | None = None,
    echo=print,
    client=None,
    scheduler: str | None = None,
    address: str | None = None,
    scheduler_file: str | None = None,
    stop: threading.Event | None = None,
    tile_bytes=None,
    sketch_d: int | None = None,
    sketch_seed: int | None = None,
    sketch_distribution: str | None = None,
    sketch_store=None,
) -> WatchSummary:
    """Follow ``source`` (a checkpoint folder or a trajectory store) and keep ``results`` up to date.

    ``store``: where a folder's checkpoints are ingested (default beside ``results``); ``run``: the
    run name (default: the folder's name, or the store's only run). ``alerts``: the JSON-lines file
    (default beside ``results``). ``echo``: called with every printed line (alerts and one status line
    per update; None: silent, the alerts still go to the file). ``stop``: an Event that ends the watch
    between updates (for callers in a thread).
    ``sketch_d`` (with ``sketch_seed``, ``sketch_distribution``): also keep a live JL sketch of every
    delta and its sketch spectra in ``sketch_store`` (default beside ``results``, ``R-sketch.zarr``),
    bit-identical to ``sed_dask.sketch`` over the same checkpoints (:class:`LiveSpectrum`).
    Returns a :class:`WatchSummary`.
    """
    if echo is None:
        echo = _silent
    source = os.fspath(source)
    kind = describe(source)[0] if os.path.exists(source) else "missing"
    folder = None
    if kind == "trajectory":
        store = source
    elif kind in ("folder", "empty", "missing"):
        folder = source
        store = store or default_paths(results)[0]
        run = run or os.path.basename(os.path.normpath(source))
    else:
        raise StoreError(f"watch {source}: expected a checkpoint folder or a trajectory store, found a {kind}")
    alert_log = AlertLog(alerts or default_paths(results)[1])
    engine = LiveSpectrum(
        store,
        results,
        run=run,
        windows=windows,
        groups=groups,
        normalize_spacing=normalize_spacing,
        detectors=detectors,
        tau=tau,
        detector_params=detector_params,
        client=client,
        scheduler=scheduler,
        address=address,
        scheduler_file=scheduler_file,
        tile_bytes=tile_bytes,
        sketch_d=sketch_d,
        sketch_seed=sketch_seed,
        sketch_distribution=sketch_distribution,
        sketch_store=sketch_store,
    )
    raised: list[dict] = []
    mtimes: dict[int, float] = {}

    def emit(recs):
        for a in recs:
            a = {**a, "time": time.time()}
            if a["step"] in mtimes:
                a["checkpoint_mtime"] = mtimes[a["step"]]
            if alert_log.add(a):
                raised.append(a)
                echo(format_alert(a))

    emit(getattr(engine, "replayed_alerts", []))  # what a killed watcher decided but had not written
    stopping = {"why": None}
    old = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            stopping["why"] = signal.Signals(signum).name

        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
    seen: dict = {}
    last_new = time.monotonic()
    n_updates, last_step = 0, None
    try:
        while True:
            if folder is not None:
                have = _stored_steps(store, engine.run)
                ready = _ready(folder, max(have) if have else None, settle, seen)
                if ready and len(have) + len(ready) >= 2:
                    for s, p in ready.items():
                        mtimes[s] = os.stat(p).st_mtime
                    _ingest(ready, store, engine.run, folder, set(have) | set(ready))
            try:
                u = engine.update()
            except RunLockedError:
                u = None  # another ingest is writing rows; they are taken when complete
            except StoreError as exc:
                if not any(s in str(exc) for s in ("ingestion is incomplete", "has no run", "no trajectory store")):
                    raise
                u = None
            if u is not None:
                n_updates += 1
                last_step = u.steps[-1]
                last_new = time.monotonic()
                echo(format_update(u))
                emit(u.alerts)
            elif engine.ckpt_steps is not None:
                last_step = int(engine.ckpt_steps[-1])
            if until is not None and last_step is not None and last_step >= until:
                return WatchSummary(last_step, n_updates, raised, f"until step {until}")
            if stopping["why"] or (stop is not None and stop.is_set()):
                return WatchSummary(last_step, n_updates, raised, stopping["why"] or "stop requested")
            if idle_timeout is not None and time.monotonic() - last_new >= idle_timeout:
                return WatchSummary(last_step, n_updates, raised, f"idle for {idle_timeout:g} s")
            if u is None:
                (stop.wait if stop is not None else time.sleep)(poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stored_steps(store, run) -> list[int]:
    try:
        ts = open_store(store, mode="r")
    except (SEDError, FileNotFoundError):
        return []
    return [int(s) for s in ts.run(run).steps] if run in ts.runs else []


def _ingest(ready: dict, store, run, folder, steps: set) -> None:
    from sed_dask.store.ingest import ingest

    try:
        ingest(ready, store, run, metrics=_metrics_for(folder, steps), progress=False, scheduler="threads")
    except SEDError as exc:  # e.g. a foreign writer's file that is stable but not loadable yet: retry
        if isinstance(exc, StoreError) and "earlier than the last stored step" in str(exc):
            raise
        import logging

        logging.getLogger(__name__).warning("watch: ingest of steps %s failed, retrying: %s", sorted(ready), exc)
