"""Where one call's tasks run, decided once and by dask's own rules, for every entry point.

First match wins:

1. ``scheduler=`` given to the call: that local scheduler (``"threads"``, ``"sync"``), or
   ``"distributed"`` for a cluster as below;
2. ``client=``, ``address=`` or ``scheduler_file=``: that cluster;
3. an active ``distributed.Client`` (the default client, or the worker's client inside a task);
4. a cluster configured in the ``sed_dask.cluster`` section (``--local-cluster N`` writes one), or
   dask's ``scheduler-address``;
5. the ``dask.config`` scheduler (``dask.config.set(scheduler="sync")``, ``"threads"``;
   ``"distributed"`` asks for a cluster: a temporary LocalCluster when none is configured);
6. otherwise the in-process threaded scheduler, dask's own default: no processes to start, nothing
   to import again, and no cluster start-up cost on a small run.

In-process schedulers pin BLAS to one thread per task thread (``sed_dask.cluster.blas``). Results
are bit-identical wherever they run (docs/architecture.md, "Determinism").
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator

import dask.config

LOCAL = {"threads": "threads", "threading": "threads", "sync": "sync", "synchronous": "sync", "single-threaded": "sync"}
CLUSTER = ("distributed", "dask.distributed")


@dataclasses.dataclass(frozen=True)
class Placement:
    """``scheduler`` ("threads"/"sync") for in-process work, else ``client`` (None: let ``connect`` find one)."""

    scheduler: str | None = None
    client: object = None
    reason: str = ""

    @property
    def local(self) -> bool:
        return self.scheduler is not None


def _scheduler_name(value, *, what: str) -> str:
    name = str(value)
    if name in LOCAL:
        return LOCAL[name]
    if name in CLUSTER:
        return "distributed"
    raise ValueError(
        f"{what}={value!r}: use 'threads' or 'sync' (in this process), 'distributed' (a cluster), "
        "or pass client= / address= / scheduler_file="
    )


def active_client():
    """The running ``distributed.Client`` a dask user would expect to be used, or None."""
    if "distributed" not in sys.modules:  # no client can exist before distributed is imported
        return None
    from distributed import default_client, get_client, get_worker

    with contextlib.suppress(ValueError):
        return default_client()
    try:
        get_worker()
    except ValueError:
        return None
    return get_client()


def placement(
    *, client=None, address: str | None = None, scheduler_file: str | None = None, scheduler: str | None = None
) -> Placement:
    """Decide where a call's tasks run (the rules of the module docstring)."""
    explicit = client is not None or bool(address) or bool(scheduler_file)
    if scheduler is not None:
        name = _scheduler_name(scheduler, what="scheduler")
        if name != "distributed":
            if explicit:
                raise ValueError(
                    f"scheduler={scheduler!r} runs in this process; it cannot be combined with "
                    "client=, address= or scheduler_file="
                )
            return Placement(scheduler=name, reason=f"scheduler={scheduler!r}")
        return Placement(client=client, reason="scheduler='distributed'")
    if explicit:
        return Placement(client=client, reason="client/address/scheduler_file")
    c = active_client()
    if c is not None:
        return Placement(client=c, reason="the active distributed Client")
    if dask.config.get("sed_dask.cluster", None) or dask.config.get("scheduler-address", None):
        return Placement(reason="the configured cluster")
    configured = dask.config.get("scheduler", None)
    if isinstance(configured, str):
        name = _scheduler_name(configured, what="dask.config 'scheduler'")
        if name == "distributed":
            return Placement(reason="dask.config scheduler='distributed'")
        return Placement(scheduler=name, reason=f"dask.config scheduler={configured!r}")
    return Placement(scheduler="threads", reason="default: the in-process threaded scheduler")


@contextlib.contextmanager
def running(
    *, client=None, address: str | None = None, scheduler_file: str | None = None, scheduler: str | None = None
) -> Iterator[Placement]:
    """Yield the placement of one call, connected: ``p.client`` is a live client unless ``p.local``.

    Only a cluster this call started (a configured or temporary one) is closed when the block ends.
    """
    p = placement(client=client, address=address, scheduler_file=scheduler_file, scheduler=scheduler)
    if p.local:
        yield p
        return
    from sed_dask.cluster.client import connect

    with connect(p.client, address=address, scheduler_file=scheduler_file) as c:
        yield dataclasses.replace(p, client=c)
