"""Result writes that never destroy, and result reads that never pass off a partial store as whole.

Every writer of a results store (``spectrum``, ``sketch``, ``directions``; the report folder has
its own variant, :func:`report_target`) goes through :func:`results_target`:

1. the target is checked first: a trajectory store, a folder with files that is not Zarr, a Zarr
   group sed_dask did not write, a path inside a Zarr store, or an existing results store without
   ``overwrite=True`` is refused (:class:`TargetError`), before any work;
2. the store is written into a hidden sibling ``.<name>.sed_dask-tmp-<host>-<pid>-<token>``;
3. the completion marker (attr ``sed_dask_complete``, visible to a plain ``xr.open_zarr``) is
   written last, after checking that every variable the writer announced (``sed_dask_variables``,
   written with the metadata) is there;
4. the sibling is moved into place: one ``renameat2(RENAME_EXCHANGE)`` swap where Linux offers
   it, else two renames with the old copy kept aside (``.<name>.sed_dask-old-...``) until the new
   one is in place. A kill at any moment therefore leaves the old result, or the new one, at the
   path; leftovers of killed writers are recognised by their dead pid and cleaned up (or, for a
   kept-aside old copy whose replacement never arrived, moved back) by the next write.

Stores that are not local paths (``s3://`` and other fsspec URLs) cannot be renamed: they are
checked the same way and written in place, and the completion marker is what tells a reader
whether the write finished.

:func:`open_results` is the reading side: it names what a path is when it is not a complete
results store (a trajectory store, a foreign group, an interrupted write and its missing variables).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import shutil
import socket
import uuid
import warnings
import weakref
from collections.abc import Iterable, Iterator

from sed_dask.errors import StoreError

COMPLETE_ATTR = "sed_dask_complete"  # True once the write finished (written last)
KIND_ATTR = "sed_dask_results"  # "spectra", "jl_sketch", "directions" (written first)
VARIABLES_ATTR = "sed_dask_variables"  # every variable and coordinate the complete store holds
REPORT_MARKER = ".sed_dask_report"  # a report folder's completion marker (a file, written last)
REPORT_FILES = ("summary.html", "summary.md", "findings.csv")
_TMP, _OLD = ".sed_dask-tmp-", ".sed_dask-old-"


class TargetError(StoreError):
    """An output path holds something a write must not replace (or needs ``overwrite=True``)."""


class PartialResultsError(StoreError):
    """A results store whose write never finished: variables or the completion marker are missing."""


class PartialResultsWarning(UserWarning):
    """A partial results store was opened anyway (``partial="warn"``)."""


# ----------------------------------------------------------------------------- what is at a path
def _is_url(path: str) -> bool:
    return "://" in path or "::" in path


def _local(path: str) -> str | None:
    """The filesystem path of a local target (``file://`` included), else None."""
    if path.startswith(("file://", "local://")):
        return path.split("://", 1)[1]
    return None if _is_url(path) else path


def _zarr_attrs(directory: str) -> dict | None:
    """Root attrs of a local Zarr node (v3 ``zarr.json`` or v2 ``.zattrs``), or None if not Zarr."""
    meta = os.path.join(directory, "zarr.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return {}
        return dict(doc.get("attributes") or {}) if isinstance(doc, dict) else {}
    if os.path.isfile(os.path.join(directory, ".zgroup")) or os.path.isfile(os.path.join(directory, ".zarray")):
        try:
            with open(os.path.join(directory, ".zattrs"), encoding="utf-8") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}
    return None


def _child_groups(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        n
        for n in names
        if os.path.isfile(os.path.join(directory, n, "zarr.json"))
        or os.path.isfile(os.path.join(directory, n, ".zgroup"))
    ]


def results_kind(attrs: dict) -> str | None:
    """``"spectra"``, ``"jl_sketch"``, ``"directions"`` for the root attrs of a results store, else None.

    Stores written before the completion marker existed are recognised by their own attrs.
    """
    if attrs.get(KIND_ATTR):
        return str(attrs[KIND_ATTR])
    if "sed_dask_version" not in attrs:
        return None
    if attrs.get("sed_kind") in ("jl_sketch", "directions"):
        return str(attrs["sed_kind"])
    if "windows" in attrs:
        return "spectra"
    return None


def _is_trajectory(attrs: dict, directory: str | None) -> bool:
    if "sed_dask_store_format" in attrs:
        return True
    if directory is None:
        return False
    return any(os.path.isfile(os.path.join(directory, g, "params", "zarr.json")) for g in _child_groups(directory))


def describe(path) -> tuple[str, dict]:
    """``(what, attrs)`` at ``path``: "missing", "empty", "file", "folder", "trajectory", "results",
    "zarr" (a Zarr node sed_dask did not write), for a local path or an fsspec URL."""
    path = os.fspath(path)
    loc = _local(path)
    if loc is None:
        return _describe_url(path)
    if not os.path.lexists(loc):
        return "missing", {}
    if not os.path.isdir(loc):
        return "file", {}
    attrs = _zarr_attrs(loc)
    if attrs is None:
        return ("folder", {}) if os.listdir(loc) else ("empty", {})
    if results_kind(attrs):
        return "results", attrs
    if _is_trajectory(attrs, loc):
        return "trajectory", attrs
    return "zarr", attrs


def _describe_url(url: str) -> tuple[str, dict]:
    import zarr

    try:
        node = zarr.open(url, mode="r")
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return "missing", {}
    except Exception:  # zarr raises several "nothing here" types across versions
        return "missing", {}
    attrs = dict(node.attrs)
    if results_kind(attrs):
        return "results", attrs
    if "sed_dask_store_format" in attrs:
        return "trajectory", attrs
    return "zarr", attrs


def _inside_zarr(loc: str) -> str | None:
    """The nearest ancestor folder of ``loc`` that is a Zarr node, or None."""
    cur = os.path.dirname(os.path.abspath(loc))
    while True:
        if _zarr_attrs(cur) is not None:
            return cur
        up = os.path.dirname(cur)
        if up == cur:
            return None
        cur = up


def check_target(path, *, overwrite: bool, what: str = "results") -> str:
    """Raise :class:`TargetError` unless ``path`` may receive a results store; return what is there."""
    path = os.fspath(path)
    kind, attrs = describe(path)
    flag = "pass overwrite=True (--overwrite) to replace it"
    if kind == "file":
        raise TargetError(f"output {path} is a file, not a {what} store; choose another output path")
    if kind == "folder":
        n = len(os.listdir(_local(path)))
        raise TargetError(
            f"output {path} is a folder holding {n} entr{'y' if n == 1 else 'ies'} that is not a "
            f"Zarr store; refusing to replace it (choose a new output path); nothing was written"
        )
    if kind == "trajectory":
        raise TargetError(
            f"output {path} is a sed_dask trajectory store; writing {what} there would destroy "
            "its checkpoints. Choose another output path (e.g. results.zarr); nothing was written"
        )
    if kind == "zarr":
        raise TargetError(
            f"output {path} is a Zarr store that sed_dask did not write (root attrs "
            f"{sorted(attrs)[:8]}); refusing to replace it; choose another output path"
        )
    if kind == "results" and not overwrite:
        when = attrs.get("created", "at an unknown time")
        raise TargetError(
            f"output {path} already holds a sed_dask {results_kind(attrs)} store (created {when}); "
            f"{flag}; nothing was written"
        )
    loc = _local(path)
    if loc is not None:
        outer = _inside_zarr(loc)
        if outer is not None:
            raise TargetError(f"output {path} is inside the Zarr store {outer}; choose a path outside it")
    return kind


# ----------------------------------------------------------------------------- siblings and the swap
def _sibling(loc: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(loc))
    return os.path.join(parent, f".{name}{tag}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _siblings(loc: str, tag: str) -> list[tuple[str, str, int]]:
    """``(path, host, pid)`` of this target's leftover siblings of one kind."""
    parent, name = os.path.split(os.path.abspath(loc))
    head = f".{name}{tag}"
    out = []
    with contextlib.suppress(OSError):
        for n in os.listdir(parent or "."):
            if not n.startswith(head):
                continue
            parts = n[len(head) :].rsplit("-", 2)  # host (may hold '-'), pid, token
            if len(parts) == 3 and parts[1].isdigit():
                out.append((os.path.join(parent, n), parts[0], int(parts[1])))
    return out


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tidy(loc: str) -> None:
    """Put back an old result whose replacement never arrived, then drop dead writers' leftovers."""
    olds = [s for s in _siblings(loc, _OLD) if not _alive(s[1], s[2])]
    if olds and not os.path.lexists(loc):
        # a writer died between its two renames: the newest kept-aside copy is the last result
        newest = max(olds, key=lambda s: os.stat(s[0]).st_mtime_ns)
        os.rename(newest[0], loc)
        olds.remove(newest)
    for p, host, pid in olds + [s for s in _siblings(loc, _TMP) if not _alive(s[1], s[2])]:
        shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def commit(tmp: str, loc: str) -> None:
    """Move the finished ``tmp`` to ``loc``; whatever was at ``loc`` is dropped only once ``tmp`` is there."""
    if not os.path.lexists(loc) or (os.path.isdir(loc) and not os.listdir(loc)):
        os.replace(tmp, loc)  # onto nothing, or onto an empty folder
        return
    if _exchange(tmp, loc):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old result
        return
    old = _sibling(loc, _OLD)
    os.rename(loc, old)
    os.rename(tmp, loc)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- completion marker
def start_attrs(kind: str, names: Iterable[str]) -> dict:
    """Attrs a writer puts in its metadata: the kind and the variables the complete store holds."""
    return {KIND_ATTR: kind, VARIABLES_ATTR: sorted(str(n) for n in names)}


@contextlib.contextmanager
def quiet_consolidation() -> Iterator[None]:
    """Silence zarr's "consolidated metadata is not in the v3 spec" warning (xarray relies on it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata", category=UserWarning)
        yield


def _members(group) -> set[str]:
    return {name for name, _ in group.members(max_depth=None)}


def mark_complete(path: str) -> None:
    """Check every announced variable is stored, then write the marker and consolidate metadata."""
    import zarr

    with quiet_consolidation():
        g = zarr.open_group(path, mode="r+", use_consolidated=False)
        missing = sorted(set(g.attrs.get(VARIABLES_ATTR, [])) - _members(g))
        if missing:
            raise StoreError(f"results store {path}: variables {missing} were not written; not marking it complete")
        g.attrs[COMPLETE_ATTR] = True
        zarr.consolidate_metadata(path)


# ----------------------------------------------------------------------------- the writer's side
class Target:
    """Where a writer writes (``path``) and with which ``to_zarr`` mode (``mode``)."""

    def __init__(self, path: str, mode: str):
        self.path, self.mode = path, mode


@contextlib.contextmanager
def results_target(output, *, overwrite: bool = False, what: str = "results") -> Iterator[Target]:
    """Check ``output``, yield where to write, then mark complete and move into place (see module doc).

    The writer writes a whole store at ``target.path`` with ``to_zarr(mode=target.mode)`` (or zarr
    directly) and announces its variables with :func:`start_attrs`. On an exception nothing at
    ``output`` changes and the temporary sibling is removed.
    """
    output = os.fspath(output)
    loc = _local(output)
    if loc is not None:
        tidy(loc)
    check_target(output, overwrite=overwrite, what=what)
    if loc is None:  # object stores: no rename; written in place, the marker tells readers it finished
        yield Target(output, "w")
        mark_complete(output)
        return
    parent = os.path.dirname(os.path.abspath(loc))
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling(loc, _TMP)
    try:
        yield Target(tmp, "w-")
        mark_complete(tmp)
        check_target(output, overwrite=overwrite, what=what)  # nothing appeared meanwhile
        commit(tmp, loc)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(ds, output, *, kind: str, overwrite: bool = False) -> None:
    """Write an in-memory results Dataset safely; ``xr.open_zarr(output)`` returns it.

    ``ds.attrs`` gains the kind, variable list and completion marker, as the stored copy has them.
    """
    with results_target(output, overwrite=overwrite) as t:
        out = ds.assign_attrs(start_attrs(kind, ds.variables))
        with quiet_consolidation():
            out.to_zarr(t.path, mode=t.mode, consolidated=True)
    ds.attrs.update(out.attrs)
    ds.attrs[COMPLETE_ATTR] = True


def write_part(ds, path: str, *, mode: str, compute: bool = True) -> None:
    """Write part of a store that a streaming writer builds at ``results_target(...).path``.

    ``mode="w-"`` creates it (``compute=False``: metadata and placeholders only, the big arrays
    are filled by region later), ``mode="a"`` adds variables. Not consolidated: consolidation
    comes last, with the completion marker, so that a half-built store is never taken as whole.
    """
    if mode not in ("w-", "a"):
        raise ValueError(f"mode must be 'w-' (never replace) or 'a' (add variables), got {mode!r}")
    with quiet_consolidation():
        ds.to_zarr(str(path), mode=mode, compute=compute, consolidated=False)


# ----------------------------------------------------------------------------- the report folder
class ReportTarget:
    """A report folder under construction: ``path`` (a sibling) until :meth:`commit` moves it to ``out``.

    Refused up front: a Zarr store, a folder with files that is not a sed_dask report, an existing
    report without ``overwrite=True``. If the writer fails, the sibling is removed when this object
    is dropped, and ``out`` is untouched.
    """

    def __init__(self, out, *, overwrite: bool = False):
        self.out = os.path.abspath(os.fspath(out))
        tidy(self.out)
        check_report_dir(self.out, overwrite=overwrite)
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        self.path = _sibling(self.out, _TMP)
        os.makedirs(self.path)
        self.overwrite = overwrite
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)

    def commit(self, written: dict) -> dict:
        """Write the marker, move the folder into place; ``written`` re-pointed at the final paths."""
        from pathlib import Path

        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(self.path, REPORT_MARKER), "w", encoding="utf-8") as f:
            json.dump({"complete": True, "written": stamp, "files": sorted(os.listdir(self.path))}, f)
        check_report_dir(self.out, overwrite=self.overwrite)
        commit(self.path, self.out)
        self._cleanup.detach()
        return {k: Path(self.out) / Path(p).name for k, p in written.items()}


def check_report_dir(out: str, *, overwrite: bool) -> None:
    """Refuse a report folder that holds something else, or an old report without ``overwrite``."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise TargetError(f"report folder {out} is a file; choose another --out-dir")
    names = os.listdir(out)
    if not names:
        return
    if _zarr_attrs(out) is not None:
        raise TargetError(
            f"report folder {out} is a Zarr store; writing a report there would replace it; choose another --out-dir"
        )
    is_report = REPORT_MARKER in names or all(n in names for n in REPORT_FILES)
    if not is_report:
        raise TargetError(
            f"report folder {out} holds {len(names)} entr{'y' if len(names) == 1 else 'ies'} that "
            "are not a sed_dask report; refusing to replace them (choose a new or empty --out-dir)"
        )
    if not overwrite:
        raise TargetError(
            f"report folder {out} already holds a report; pass overwrite=True (--overwrite) to replace it"
        )


# ----------------------------------------------------------------------------- the reader's side
def missing_parts(path, attrs: dict) -> list[str]:
    """What a results store at ``path`` lacks to be complete (empty: it is complete)."""
    import zarr

    if attrs.get(COMPLETE_ATTR):
        return []
    with quiet_consolidation():
        g = zarr.open_group(os.fspath(path), mode="r", use_consolidated=False)
        have = _members(g)
    if VARIABLES_ATTR in attrs:
        want = set(attrs[VARIABLES_ATTR])
    elif _has_consolidated(path):  # written before the marker existed: to_zarr consolidates last
        return []
    elif results_kind(attrs) == "spectra":
        from sed_dask.schema import VARIABLES

        want = set(VARIABLES) | {"delta_norm", "(consolidated metadata)"}
    else:
        want = {"(consolidated metadata)"}
    miss = sorted(want - have)
    if not miss and VARIABLES_ATTR in attrs:
        miss = [f"(the {COMPLETE_ATTR} marker)"]
    return miss


def _has_consolidated(path) -> bool:
    loc = _local(os.fspath(path))
    if loc is None:
        return True  # cannot look cheaply; trust it
    try:
        with open(os.path.join(loc, "zarr.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("consolidated_metadata"))
    except (OSError, ValueError):
        return os.path.isfile(os.path.join(loc, ".zmetadata"))


def _interrupted_hint(path: str) -> str:
    loc = _local(path)
    if loc is None:
        return ""
    olds = _siblings(loc, _OLD)
    if olds:
        return (
            f"; an interrupted write kept the previous result at {olds[0][0]} (the next write to this "
            "path moves it back)"
        )
    return ""


def open_results(path, *, partial: str = "raise", **open_kw):
    """Open a results store with ``xr.open_zarr`` after checking it is one, and that it is complete.

    ``partial``: "raise" (default) refuses a store whose write never finished, naming what it
    lacks; "warn" opens it with a :class:`PartialResultsWarning`. A trajectory store, a Zarr group
    sed_dask did not write, a folder or a missing path each get their own message.
    """
    import xarray as xr

    if partial not in ("raise", "warn"):
        raise ValueError(f"partial must be 'raise' or 'warn', got {partial!r}")
    path = os.fspath(path)
    kind, attrs = describe(path)
    if kind in ("missing", "empty"):
        raise StoreError(f"no results store at {path}{_interrupted_hint(path)}")
    if kind == "file":
        raise StoreError(f"{path} is a file, not a Zarr results store")
    if kind == "folder":
        raise StoreError(f"{path} is a folder but not a Zarr store (no zarr.json)")
    if kind == "trajectory":
        raise StoreError(
            f"{path} is a trajectory store (checkpoints), not a results store; run "
            f"`sed-dask spectrum {path} -o results.zarr` first and query the results"
        )
    if kind == "zarr":
        raise StoreError(
            f"{path} is a Zarr store but not a sed_dask results store (no sed_dask attrs; root "
            f"attrs {sorted(attrs)[:8]}); results come from `sed-dask spectrum ... -o`"
        )
    miss = missing_parts(path, attrs)
    if miss:
        msg = (
            f"{path} is an incomplete {results_kind(attrs)} results store (its write was interrupted): "
            f"missing {', '.join(miss[:12])}{' ...' if len(miss) > 12 else ''}; re-run the command that "
            "wrote it (with --overwrite)"
        )
        if partial == "raise":
            raise PartialResultsError(msg)
        warnings.warn(msg, PartialResultsWarning, stacklevel=2)
    with quiet_consolidation():
        ds = xr.open_zarr(path, **open_kw)
    # labels on run (seed), window and group are what selections use (ds.where(ds.seed == 3)): load
    # them now, as index coordinates are; the data variables stay lazy
    labels = [k for k, c in ds.coords.items() if k not in ds.indexes and c.ndim <= 2 and c.size <= 1_000_000]
    return ds.assign_coords({k: ds[k].load() for k in labels}) if labels else ds
