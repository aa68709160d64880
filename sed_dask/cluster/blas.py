"""Pin OpenBLAS to one thread while local dask threads run Gram kernels.

Each Gram task is one BLAS call stream; with dask already running a task per core, a
multi-threaded BLAS oversubscribes the cores and, on a busy machine, OpenBLAS's spinning threads
made the kernel up to 50x slower (measured). Dask worker processes started by a nanny get
``OPENBLAS_NUM_THREADS=1`` from it; ``pin_blas_threads`` does the same for workers without one
(``--no-nanny``, in-process clusters; called by sed_dask's worker plugin), and
``single_threaded_blas`` covers the in-process threaded scheduler, restoring the process-wide
setting afterwards. No-op without OpenBLAS.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


@functools.lru_cache(maxsize=1)
def _openblas() -> list[tuple]:
    """(get, set) pairs of every OpenBLAS loaded in this process (numpy's and scipy's may differ)."""
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded)

    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if "/" in line else ""
                if "openblas" in p.lower() and (p.endswith(".so") or ".so." in p):
                    paths.add(p)
    except OSError:
        return []
    out = []
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        get = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        set_ = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        if get is not None and set_ is not None:
            get.restype = ctypes.c_int
            set_.argtypes = [ctypes.c_int]
            out.append((get, set_))
    return out


@contextlib.contextmanager
def single_threaded_blas():
    libs = _openblas()
    before = [get() for get, _ in libs]
    for _, set_ in libs:
        set_(1)
    try:
        yield
    finally:
        for (_, set_), n in zip(libs, before):
            set_(n)


def pin_blas_threads(n: int = 1) -> int:
    """Set every loaded OpenBLAS to ``n`` threads for the rest of the process; returns how many libraries."""
    libs = _openblas()
    for _, set_ in libs:
        set_(int(n))
    return len(libs)
