"""Connect to a Dask cluster: accept one, never own one unless asked for nothing.

Precedence (as in Prefect's DaskTaskRunner and ecosystem_notes §3):
``client=`` object > ``address=`` > ``scheduler_file=`` > ``sed_dask.cluster`` config section
(cluster class by import string + kwargs + scale/adapt) > an already-running default client >
a temporary ``LocalCluster`` that is closed when the ``with`` block ends.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator

import dask.config

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = "20s"


def _import_string(path: str):
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"cluster class must be an import string like 'pkg.mod.Class', got {path!r}")
    return getattr(importlib.import_module(module), attr)


@contextlib.contextmanager
def connect(
    client=None,
    *,
    address: str | None = None,
    scheduler_file: str | None = None,
    cluster_config: dict | None = None,
    timeout: str | float | None = None,
    local_kwargs: dict | None = None,
) -> Iterator:
    """Yield a ``distributed.Client``; close only what this call created.

    ``local_kwargs`` tune the temporary LocalCluster (default: processes, one thread per core).
    A scheduler that cannot be reached raises ``ConnectionError`` naming it, within ``timeout``.
    """
    from distributed import Client

    if client is not None:
        yield client
        return
    timeout = timeout if timeout is not None else DEFAULT_CONNECT_TIMEOUT
    if address or scheduler_file:
        target = address or f"scheduler file {scheduler_file}"
        try:
            c = Client(address=address, scheduler_file=scheduler_file, timeout=timeout,
                       set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"could not reach the Dask scheduler at {target} within {timeout}: {exc}") from exc
        try:
            yield c
        finally:
            c.close()
        return
    cfg = cluster_config if cluster_config is not None else dask.config.get("sed_dask.cluster", None)
    if cfg:
        cls = _import_string(cfg["class"])
        cluster = cls(**(cfg.get("kwargs") or {}))
        try:
            if cfg.get("adapt"):
                cluster.adapt(**cfg["adapt"])
            elif cfg.get("scale"):
                scale = cfg["scale"]
                cluster.scale(**scale) if isinstance(scale, dict) else cluster.scale(scale)
            c = Client(cluster, set_as_default=False)
            try:
                yield c
            finally:
                c.close()
        finally:
            cluster.close()
        return
    try:
        from distributed import get_client

        yield get_client()
        return
    except ValueError:
        pass
    from distributed import LocalCluster

    kw = {"processes": True, "threads_per_worker": 1, "dashboard_address": ":0"}
    kw.update(local_kwargs or {})
    with LocalCluster(**kw) as cluster, Client(cluster, set_as_default=False) as c:
        logger.info("temporary LocalCluster, dashboard at %s", c.dashboard_link)
        yield c
