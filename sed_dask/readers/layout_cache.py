"""A per-process cache of parsed checkpoint layouts, bounded in bytes, each built once.

Readers that must unpickle something to locate tensors (``torch.load`` of a ``.pt`` file, a DCP
``.metadata``) keep the result here. The Gram pass reads every checkpoint of a step block (up to
``spectrum.block-steps`` = 512) once per P-range task, so a worker revisits the same few hundred
files task after task, in the same order: a cache smaller than that working set misses on every
open (LRU under a cyclic scan), and each miss is a full unpickling. So the bound is in bytes,
``sed_dask.readers.layout-cache-bytes`` of the worker's own config (default 256 MiB: thousands of
layouts of a few hundred tensors each), not a count.

Concurrent first opens of one file wait for a single build; a layout is cached under its file's
identity (real path, size, mtime) only if the file did not change while it was built.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Callable, Hashable

_FALLBACK_BYTES = 256 << 20


def cache_limit() -> int:
    """``sed_dask.readers.layout-cache-bytes`` in this process (read at each insertion)."""
    try:
        from sed_dask import config

        return config.get_bytes("readers.layout-cache-bytes")
    except Exception:  # a process that never loaded the package defaults
        return _FALLBACK_BYTES


def file_key(path: str) -> tuple:
    """A file's identity for caching what was parsed from it: real path, size, mtime (ns)."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def approx_nbytes(*strings_and_counts) -> int:
    """A rough size of a layout: its names' lengths plus a fixed cost per record (``(names, per_record)``
    pairs). Only the order of magnitude matters: it decides how many layouts fit the bound."""
    total = 0
    for names, per_record in strings_and_counts:
        total += sum(sys.getsizeof(n) + per_record for n in names)
    return total


class LayoutCache:
    """LRU of ``key -> (layout, nbytes)`` within :func:`cache_limit` bytes; see the module docstring."""

    def __init__(self, limit: Callable[[], int] = cache_limit):
        self._limit = limit
        self._lock = threading.Lock()
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._building: dict[Hashable, threading.Lock] = {}

    def get(
        self,
        key: Hashable,
        build: Callable[[], object],
        *,
        size: Callable[[object], int],
        still_valid: Callable[[], bool] = lambda: True,
    ):
        """The cached layout of ``key``, else ``build()`` (once, however many threads ask)."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            try:
                layout = build()
                if still_valid():
                    self._put(key, layout, int(size(layout)))
            finally:  # only once the layout is cached: a thread arriving in between would build again
                with self._lock:
                    self._building.pop(key, None)
            return layout

    def for_file(self, path: str, build: Callable[[tuple], object], *, size: Callable[[object], int]):
        """:meth:`get` keyed by the file's identity ``key`` (real path, size, mtime), built by
        ``build(key)``; a file rewritten while it was parsed is not cached. ``OSError`` (e.g. a
        missing file) reaches the caller."""
        key = file_key(path)

        def unchanged() -> bool:
            try:
                return file_key(path) == key
            except OSError:
                return False

        return self.get(key, lambda: build(key), size=size, still_valid=unchanged)

    def _hit(self, key):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def _put(self, key, layout, nbytes: int) -> None:
        limit = self._limit()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (layout, nbytes)
            self._bytes += nbytes
            while self._bytes > limit and len(self._items) > 1:
                _, (_, n) = self._items.popitem(last=False)
                self._bytes -= n

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
