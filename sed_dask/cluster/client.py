"""Connect to a Dask cluster: accept one, never own one unless asked for nothing.

Precedence (as in Prefect's DaskTaskRunner), first match wins:

1. ``client=`` object;
2. ``address=`` (CLI ``--scheduler-address``);
3. ``scheduler_file=`` (CLI ``--scheduler-file``; SLURM, dask-mpi);
4. the ``sed_dask.cluster`` config section (or ``cluster_config=``): a cluster class by import
   string + kwargs + scale/adapt, e.g. ``dask_jobqueue.SLURMCluster``,
   ``dask_kubernetes.operator.KubeCluster``, ``dask_jobqueue.slurm.SLURMRunner``;
5. an already-running default client (``distributed.get_client()``, also inside a task);
6. dask's own ``scheduler-address`` config (``DASK_SCHEDULER_ADDRESS``);
7. a temporary ``LocalCluster`` (``sed_dask.connect.local`` kwargs) closed when the block ends.

Only what this call created is closed. Reaching a scheduler is bounded by ``timeout``
(``sed_dask.connect.timeout``): a probe asks it for its identity first, because a plain
``distributed.Client`` to a port that is not a Dask scheduler (e.g. the dashboard) can hang
forever or fail with an unrelated error.

Every yielded client gets ``ZarrConfigPlugin`` registered (``sed_dask.connect.configure-workers``),
so each worker, including replacements for lost workers, applies the client's zarr I/O settings
before running tasks. This module must stay light: no torch, no spectral modules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Iterator

import dask.config
from dask.utils import parse_timedelta
from distributed.diagnostics.plugin import WorkerPlugin

from sed_dask import config
from sed_dask.config import ConfigError
from sed_dask.errors import ScriptReimportError

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = "10s"  # used only if the sed_dask.connect.timeout key is missing
PLUGIN_NAME = "sed_dask-zarr-config"
_CLUSTER_KEYS = {"class", "kwargs", "scale", "adapt", "wait-for-workers", "wait-timeout"}
_EXTRAS = {"dask_jobqueue": "slurm", "dask_kubernetes": "k8s"}


class ZarrConfigPlugin(WorkerPlugin):
    """Apply the client's zarr I/O settings (``sed_dask.config.configure_zarr``) on each worker, and
    pin OpenBLAS to one thread per task thread as a nanny's environment does (``sed_dask.cluster.blas``):
    workers started with ``--no-nanny`` or in-process would otherwise oversubscribe their cores."""

    name = PLUGIN_NAME

    def __init__(self, *, async_concurrency=None, threading_max_workers=None):
        self.settings = {"async_concurrency": async_concurrency, "threading_max_workers": threading_max_workers}

    def setup(self, worker):
        config.configure_zarr(**self.settings)
        if not _client_in_process():  # an in-process cluster shares the user's BLAS: leave it alone
            from sed_dask.cluster.blas import pin_blas_threads

            pin_blas_threads(1)


def _client_in_process() -> bool:
    """True when a distributed Client lives in this process (an in-process cluster's workers)."""
    try:
        from distributed.client import _global_clients

        return bool(list(_global_clients.values()))
    except Exception:  # private API: when in doubt, do not touch the process-wide BLAS setting
        return True


def check_not_reimported(what: str) -> None:
    """Refuse to run while a spawned process re-imports the user's script (no ``__main__`` guard).

    A temporary LocalCluster starts worker processes with the ``spawn`` method, which imports the
    script again in each child; unguarded top-level calls would then take the run's lock or start
    clusters of their own and fail far from the cause ("RunLockedError", "Nanny failed to start").
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set by spawn while importing main
        raise ScriptReimportError(
            f"{what} was called while a worker process was starting and re-importing your script: put the "
            f'script\'s calls under `if __name__ == "__main__":`, or run in this process with scheduler="threads"'
        )


def _has_main_guard(path: str) -> bool:
    """Whether a script's top level tests ``__name__ == "__main__"`` (parsed, not run)."""
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True  # cannot tell: assume guarded
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return True
    return False


def check_script_guarded() -> None:
    """Before starting worker processes from an unguarded script's top level, say what will happen."""
    import inspect
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py") or _has_main_guard(path):
        return
    frames = inspect.stack(context=0)
    try:
        at_top = any(f.frame.f_globals is vars(main) and f.function == "<module>" for f in frames)
    finally:
        del frames
    if at_top:
        raise ScriptReimportError(
            f"{path} starts a temporary LocalCluster from its top level, and each worker process would "
            f'import it again: put the script\'s calls under `if __name__ == "__main__":`, '
            f'or run in this process with scheduler="threads"'
        )


def _import_string(path: str):
    module, _, attr = str(path).rpartition(".")
    if not module:
        raise ConfigError(f"cluster class must be an import string like 'pkg.mod.Class', got {path!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get(module.split(".")[0])
        hint = f"; install it with: pip install 'sed_dask[{extra}]'" if extra else ""
        raise ConfigError(f"cluster class {path!r} cannot be imported: {exc}{hint}") from exc
    except AttributeError:
        raise ConfigError(f"cluster class {path!r}: module {module!r} has no attribute {attr!r}") from None


def _kwargs(d) -> dict:
    """YAML/env friendly keyword names: ``n-workers`` and ``n_workers`` both mean ``n_workers``."""
    return {str(k).replace("-", "_"): v for k, v in (d or {}).items()}


def _seconds(timeout) -> float:
    if timeout is None:
        timeout = dask.config.get("sed_dask.connect.timeout", None) or DEFAULT_CONNECT_TIMEOUT
    return float(parse_timedelta(timeout, "s"))


# ----------------------------------------------------------------------------- probing
async def _identity(address: str, timeout: float, state: dict) -> dict:
    from distributed.comm import connect as comm_connect
    from distributed.security import Security

    if address.startswith("tcp://") or "://" not in address:
        # a bare TCP check tells "nothing listens" from "something listens but is no scheduler"
        # (distributed's handshake with a silent listener never times out on its own)
        from distributed.comm.addressing import parse_host_port

        with contextlib.suppress(OSError, ValueError, asyncio.TimeoutError):
            host, port = parse_host_port(address.split("://", 1)[-1])
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.close()
            state["connected"] = True
    comm = await comm_connect(address, timeout=timeout, **Security().get_connection_args("client"))
    state["connected"] = True
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def probe_scheduler(address: str, *, timeout=None) -> dict:
    """The scheduler's identity, or ``ConnectionError`` naming ``address`` within ``timeout``.

    Runs on a private event loop in a helper thread so it also works under a running loop.
    """
    t = _seconds(timeout)
    state = {"connected": False}

    async def bounded():
        return await asyncio.wait_for(_identity(address, t, state), t)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sed-dask-probe") as ex:
        try:
            ident = ex.submit(asyncio.run, bounded()).result()
        except (TimeoutError, asyncio.TimeoutError):
            if not state["connected"]:
                raise ConnectionError(f"could not reach a Dask scheduler at {address} within {t:g} s") from None
            raise ConnectionError(
                f"{address} accepted a connection but did not answer like a Dask scheduler within "
                f"{t:g} s (wrong port? a scheduler usually listens on :8786, its dashboard on :8787)"
            ) from None
        except OSError as exc:
            raise ConnectionError(f"could not reach a Dask scheduler at {address} within {t:g} s: {exc}") from exc
        except Exception as exc:  # garbage from a non-Dask service can surface as anything
            raise ConnectionError(
                f"{address} did not answer like a Dask scheduler ({type(exc).__name__}: {exc}); "
                "is that the scheduler's comm port?"
            ) from exc
    kind = ident.get("type") if isinstance(ident, dict) else None
    if kind != "Scheduler":
        raise ConnectionError(f"{address} is a Dask {kind or 'service of unknown type'}, not a scheduler")
    return ident


def read_scheduler_file(path, *, timeout=None) -> str:
    """The address in a scheduler file, waiting up to ``timeout`` for the file to appear.

    Waiting covers a scheduler job that starts later than the client; the bound turns a
    wrong path into a clear error instead of dask's endless wait.
    """
    t = _seconds(timeout)
    path = os.path.expanduser(os.path.expandvars(str(path)))
    deadline = time.monotonic() + t
    last = None
    while True:
        try:
            with open(path) as f:
                info = json.load(f)
            return str(info["address"])
        except FileNotFoundError:
            last = "it does not exist"
        except (ValueError, KeyError) as exc:  # being written, or not a scheduler file
            last = f"it holds no scheduler address ({type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"cannot use scheduler file {path} after waiting {t:g} s: {last} "
                "(is the scheduler running, and is the file on a shared filesystem?)"
            )
        time.sleep(0.05)


def _client_for(address: str, *, timeout: float, source: str):
    from distributed import Client

    try:
        probe_scheduler(address, timeout=timeout)
    except ConnectionError as exc:
        if source == "address":
            raise
        raise ConnectionError(f"{exc} (address from {source})") from exc.__cause__
    try:
        return Client(address, timeout=f"{timeout}s", set_as_default=False)
    except OSError as exc:
        raise ConnectionError(f"could not connect a client to {address} within {timeout:g} s: {exc}") from exc


# ----------------------------------------------------------------------------- cluster section
def _check_cluster_section(cfg: dict) -> dict:
    if not isinstance(cfg, dict):
        raise ConfigError(f"sed_dask.cluster must be a mapping, got {type(cfg).__name__}")
    cfg = {str(k).replace("_", "-"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - _CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"sed_dask.cluster: unknown keys {unknown}; allowed: {sorted(_CLUSTER_KEYS)}")
    if not cfg.get("class"):
        raise ConfigError(
            "sed_dask.cluster needs 'class', an import string such as "
            "'dask_jobqueue.SLURMCluster' or 'distributed.LocalCluster'"
        )
    if cfg.get("scale") and cfg.get("adapt"):
        raise ConfigError("sed_dask.cluster: give either 'scale' or 'adapt', not both")
    return cfg


def _start_cluster(cfg: dict):
    cls = _import_string(cfg["class"])
    kwargs = _kwargs(cfg.get("kwargs"))
    logger.info("starting %s(%s)", cfg["class"], ", ".join(sorted(kwargs)))
    cluster = cls(**kwargs)
    try:
        if cfg.get("adapt"):
            cluster.adapt(**_kwargs(cfg["adapt"]))
        elif cfg.get("scale"):
            scale = cfg["scale"]
            cluster.scale(**_kwargs(scale)) if isinstance(scale, dict) else cluster.scale(int(scale))
    except BaseException:
        cluster.close()
        raise
    return cluster


def _register_plugin(client) -> None:
    from distributed import get_worker

    with contextlib.suppress(ValueError):
        get_worker()
        return  # inside a task: the workers got the plugin from the outer client already
    try:
        client.register_plugin(ZarrConfigPlugin(**config.zarr_settings()), name=PLUGIN_NAME)
    except Exception as exc:  # never fatal: tasks may still call configure_zarr themselves
        logger.warning("could not register %s on %s: %s", PLUGIN_NAME, client, exc)


# ----------------------------------------------------------------------------- connect
@contextlib.contextmanager
def connect(
    client=None,
    *,
    address: str | None = None,
    scheduler_file: str | None = None,
    cluster_config: dict | None = None,
    timeout: str | float | None = None,
    local_kwargs: dict | None = None,
    configure_workers: bool | None = None,
) -> Iterator:
    """Yield a ``distributed.Client``; close only what this call created (precedence: module doc).

    ``timeout`` bounds reaching a scheduler (default ``sed_dask.connect.timeout``); an unreachable
    one raises ``ConnectionError`` naming it. ``local_kwargs`` tune the temporary LocalCluster.
    ``configure_workers`` (default ``sed_dask.connect.configure-workers``) registers
    ``ZarrConfigPlugin``.
    """
    from distributed import Client

    check_not_reimported("sed_dask.cluster.connect()")
    t = _seconds(timeout)
    if configure_workers is None:
        configure_workers = bool(dask.config.get("sed_dask.connect.configure-workers", True))
    with contextlib.ExitStack() as stack:
        c = client
        if c is None and address:
            c = stack.enter_context(_client_for(address, timeout=t, source="address"))
        elif c is None and scheduler_file:
            addr = read_scheduler_file(scheduler_file, timeout=t)
            c = stack.enter_context(_client_for(addr, timeout=t, source=f"scheduler file {scheduler_file}"))
        if c is None:
            cfg = cluster_config if cluster_config is not None else dask.config.get("sed_dask.cluster", None)
            if cfg:
                cfg = _check_cluster_section(cfg)
                cluster = _start_cluster(cfg)
                stack.callback(cluster.close)
                c = stack.enter_context(Client(cluster, set_as_default=False))
                n = int(cfg.get("wait-for-workers") or 0)
                if n:
                    wait = cfg.get("wait-timeout") or "10m"
                    try:
                        c.wait_for_workers(n, timeout=wait)
                    except TimeoutError as exc:
                        raise ConnectionError(
                            f"{cfg['class']}: fewer than {n} workers joined within {wait} (is the job queue stuck? {c})"
                        ) from exc
        if c is None:
            from distributed import get_client

            with contextlib.suppress(ValueError):
                c = get_client()
        if c is None and dask.config.get("scheduler-address", None):
            addr = dask.config.get("scheduler-address")
            c = stack.enter_context(_client_for(addr, timeout=t, source="dask config scheduler-address"))
        if c is None:
            from distributed import LocalCluster

            kw = _kwargs(
                dask.config.get("sed_dask.connect.local", None)
                or {"processes": True, "threads_per_worker": 1, "dashboard_address": ":0"}
            )
            kw.update(local_kwargs or {})
            if kw.get("processes", True):
                check_script_guarded()
            cluster = stack.enter_context(LocalCluster(**kw))
            c = stack.enter_context(Client(cluster, set_as_default=False))
            logger.info("temporary LocalCluster, dashboard at %s", c.dashboard_link)
        if configure_workers:
            _register_plugin(c)
        yield c
