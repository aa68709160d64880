"""The ``sed-dask`` command. Each subcommand lives in its own module exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

# subcommand modules, in the order shown by --help
COMMANDS = ["ingest", "spectrum", "sketch", "directions", "weights", "query", "watch", "report", "demo", "deploy"]


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Where the tasks run (see sed_dask.cluster.placement): in this process unless a cluster is named."""
    g = p.add_argument_group("where the tasks run (default: threads in this process)")
    g.add_argument(
        "--threads",
        action="store_true",
        help="run the tasks on threads in this process (the default when no cluster is named or configured)",
    )
    g.add_argument(
        "--local-cluster",
        type=int,
        metavar="N",
        default=None,
        help="start a temporary LocalCluster of N single-threaded worker processes for this command",
    )
    g.add_argument("--scheduler-address", metavar="ADDR", help="connect to a running Dask scheduler")
    g.add_argument("--scheduler-file", metavar="FILE", help="connect via a scheduler file (SLURM, dask-mpi)")
    g.add_argument(
        "--n-workers", type=int, default=None, help="workers of the temporary LocalCluster (implies --local-cluster)"
    )
    g.add_argument(
        "--memory-limit",
        default=None,
        help="per-worker memory limit of the temporary LocalCluster (implies --local-cluster)",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="YAML with sed_dask settings, e.g. a 'cluster:' section naming a cluster class "
        "(a top-level 'sed_dask:' key is optional); beats ~/.config/dask and DASK_* env",
    )
    g.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        default=None,
        help="give up reaching the scheduler after this long (default: sed_dask.connect.timeout)",
    )


def add_selection_args(p: argparse.ArgumentParser, *, policy_note: str = "") -> None:
    """Which checkpoints and tensors to read: the same flags for ``ingest`` and ``spectrum --checkpoints``."""
    p.add_argument("--steps", metavar="LIST", help="only these steps, comma-separated")
    p.add_argument(
        "--policy",
        choices=["params_dedup_no_buffers", "full_state_dict_sorted"],
        default=None,
        help=f"parameter selection (default params_dedup_no_buffers{policy_note})",
    )
    p.add_argument("--include", action="append", metavar="RX", help="keep only tensors matching RX (repeatable)")
    p.add_argument("--exclude", action="append", metavar="RX", help="drop tensors matching RX (repeatable)")


def int_list(text: str, what: str, *, minimum: int | None = None) -> list[int]:
    """``"3,4"`` -> [3, 4]; an empty item (``3,,4``), a repeated value (``3,3``) or a non-integer is a
    ``ValueError`` naming the flag ``--what`` (a typo must not silently change the request)."""
    items = [x.strip() for x in str(text).split(",")]
    if not text or not all(items):
        raise ValueError(f"--{what} {text!r}: an empty item; give comma-separated integers like 3,5")
    try:
        out = [int(x) for x in items]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: expected comma-separated integers") from None
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ValueError(f"--{what} {text!r}: {dup[0]} is given twice")
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"--{what} {text!r}: values must be >= {minimum}")
    return out


def steps_arg(text: str | None) -> list[int] | None:
    """``--steps 100,200`` -> [100, 200] (strict, as :func:`int_list`)."""
    return int_list(text, "steps", minimum=0) if text else None


def _local_cluster(args) -> dict | None:
    """The ``sed_dask.cluster`` section for ``--local-cluster N`` / ``--n-workers`` / ``--memory-limit``."""
    n, mem = getattr(args, "local_cluster", None), getattr(args, "memory_limit", None)
    n = n or getattr(args, "n_workers", None)
    if n is None and mem is None:
        return None
    if n is not None and n < 1:
        raise ValueError(f"--local-cluster {n}: give at least 1 worker")
    kw = {"processes": True, "threads_per_worker": 1, "dashboard_address": ":0"}
    if n is not None:
        kw["n_workers"] = int(n)
    if mem is not None:
        kw["memory_limit"] = mem
    return {"class": "distributed.LocalCluster", "kwargs": kw}


def execution_context(args, kw: dict):
    """Where a subcommand's tasks run, by the rules of ``sed_dask.cluster.placement``.

    ``--config FILE`` is applied at once (and undone when the context exits). The context yields a
    client for a cluster (named by flags, the config or an active one), else None with
    ``kw["scheduler"]`` set to the in-process scheduler.
    """
    import contextlib

    from sed_dask.cluster.client import connect
    from sed_dask.cluster.placement import placement
    from sed_dask.config import load_config_file, use_config

    path = getattr(args, "config", None)
    address, sfile = getattr(args, "scheduler_address", None), getattr(args, "scheduler_file", None)
    local = _local_cluster(args)
    if getattr(args, "threads", False) and (address or sfile or local):
        raise ValueError(
            "--threads runs in this process: drop it, or drop --scheduler-address / --scheduler-file / --local-cluster"
        )

    @contextlib.contextmanager
    def session():
        with use_config(load_config_file(path)) if path else contextlib.nullcontext():
            if getattr(args, "threads", False):
                kw["scheduler"] = "threads"
                yield None
                return
            if local is None and not address and not sfile:
                where = placement()
                if where.local:
                    kw["scheduler"] = where.scheduler
                    yield None
                    return
            with connect(
                address=address,
                scheduler_file=sfile,
                cluster_config=local,
                timeout=getattr(args, "connect_timeout", None),
            ) as client:
                yield client

    return session()


def connect_from_args(args):
    """A client context for parsed CLI arguments (a cluster: flags, config, an active client, or a
    temporary LocalCluster); subcommands use :func:`execution_context`, which also runs in-process."""
    kw: dict = {}
    args.threads = False
    return execution_context(args, kw)


_NEGATIVE_LIST = re.compile(r"^-\d[^=\s]*[:,]")  # -3:5, -1,0,2: argparse takes these for options


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--lags -3:5`` -> ``--lags=-3:5``: a value that starts like a negative number but holds ``:``
    or ``,`` is glued to the option before it, as argparse would otherwise call it a flag."""
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_LIST.match(tok) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    from sed_dask import __version__

    p = argparse.ArgumentParser(prog="sed-dask", description="Spectral Edge Dynamics of training trajectories on Dask.")
    p.add_argument("--version", action="version", version=f"sed_dask {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: cluster start/stop and info logs; -vv: also debug logs and tracebacks on error",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sed_dask.cli.{name}").register(sub)
    return p


def _quiet_dask(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(("distributed", "dask"))


def _one_line_warnings(command: str):
    """sed_dask's own warnings print as ``sed-dask CMD: warning: ...`` (one line, no source line)."""
    import warnings

    from sed_dask.errors import SEDWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SEDWarning):
            print(f"sed-dask {command}: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    return previous


def main(argv=None) -> int:
    import warnings

    from sed_dask.errors import SEDError

    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # distributed logs cluster start/stop at INFO: shown with -v only
        for h in logging.getLogger().handlers:
            h.addFilter(_quiet_dask)
    previous = _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except (SEDError, ConnectionError, FileNotFoundError, ValueError) as exc:
        # bad input or flags: a one-line message (``-vv`` shows the traceback)
        if args.verbose >= 2:
            raise
        print(f"sed-dask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
