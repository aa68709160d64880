"""The ``sed-dask`` command. Each subcommand lives in its own module exposing ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

# subcommand modules, in the order shown by --help
COMMANDS = ["ingest", "spectrum", "sketch", "directions", "weights", "query", "report", "demo", "deploy"]


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The connection options every distributed subcommand accepts (see sed_dask.cluster)."""
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler-address", metavar="ADDR", help="connect to a running Dask scheduler")
    g.add_argument("--scheduler-file", metavar="FILE", help="connect via a scheduler file (SLURM, dask-mpi)")
    g.add_argument("--n-workers", type=int, default=None,
                   help="workers of the temporary LocalCluster when no cluster is given")
    g.add_argument("--memory-limit", default=None, help="per-worker memory limit of the temporary LocalCluster")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="YAML with sed_dask settings, e.g. a 'cluster:' section naming a cluster class "
                        "(a top-level 'sed_dask:' key is optional); beats ~/.config/dask and DASK_* env")
    g.add_argument("--connect-timeout", metavar="SECONDS", default=None,
                   help="give up reaching the scheduler after this long (default: sed_dask.connect.timeout)")


def add_selection_args(p: argparse.ArgumentParser, *, policy_note: str = "") -> None:
    """Which checkpoints and tensors to read: the same flags for ``ingest`` and ``spectrum --checkpoints``."""
    p.add_argument("--steps", metavar="LIST", help="only these steps, comma-separated")
    p.add_argument("--policy", choices=["params_dedup_no_buffers", "full_state_dict_sorted"], default=None,
                   help=f"parameter selection (default params_dedup_no_buffers{policy_note})")
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


def connect_from_args(args):
    """A ``sed_dask.cluster.connect`` context for parsed CLI arguments.

    ``--config FILE`` is applied at once (so code before the ``with`` sees it too) and undone
    when the context exits. Flags beat the file; the file beats ~/.config/dask and DASK_* env.
    """
    import contextlib

    from ..cluster import connect
    from ..config import load_config_file, use_config

    path = getattr(args, "config", None)
    settings = use_config(load_config_file(path)) if path else contextlib.nullcontext()
    local = {}
    if getattr(args, "n_workers", None):
        local["n_workers"] = args.n_workers
    if getattr(args, "memory_limit", None):
        local["memory_limit"] = args.memory_limit

    @contextlib.contextmanager
    def session():
        with settings, connect(address=getattr(args, "scheduler_address", None),
                               scheduler_file=getattr(args, "scheduler_file", None),
                               timeout=getattr(args, "connect_timeout", None),
                               local_kwargs=local) as client:
            yield client

    return session()


def execution_context(args, kw: dict):
    """``--threads`` runs in this process (sets ``kw["scheduler"]``); otherwise connect to a cluster.

    Returns a context manager yielding the client (``None`` for the threaded scheduler).
    """
    import contextlib

    if getattr(args, "threads", False):
        kw["scheduler"] = "threads"
        return contextlib.nullcontext(None)
    return connect_from_args(args)


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
    from .. import __version__

    p = argparse.ArgumentParser(prog="sed-dask", description="Spectral Edge Dynamics of training trajectories on Dask.")
    p.add_argument("--version", action="version", version=f"sed_dask {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: cluster start/stop and info logs; -vv: also debug logs and tracebacks on error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sed_dask.cli.{name}").register(sub)
    return p


def _quiet_dask(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(("distributed", "dask"))


def _one_line_warnings(command: str):
    """sed_dask's own warnings print as ``sed-dask CMD: warning: ...`` (one line, no source line)."""
    import warnings

    from ..errors import SEDWarning

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

    from ..errors import SEDError

    parser = build_parser()
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
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
