"""The fused banded-Gram kernel: only the ``width`` products per element that the band needs.

The BLAS path (:class:`sed_dask.engine.gram.BandAccumulator`) multiplies all rows in memory by each
other (``syrk`` of ~64 rows for width 11: ~38 products per element where the band needs 11) after a
separate float32 -> float64 copy. This kernel (numba, compiled once per machine and cached on disk)
converts each column sub-block to float64 once, in L1/L2-sized pieces, and forms just the band's dot
products ``<delta_t, delta_{t-k}>``, ``k < width``, accumulated in float64.

Summation order (what makes results reproducible, and equal between a batch pass and an incremental
one): an entry ``(t, k)`` of a column segment ``[a, b)`` is the float64 sum, in increasing order, of
the dot products over the fixed sub-blocks ``[a + q*SUB_COLS, a + (q+1)*SUB_COLS)`` (the last one
shorter); each sub-block's dot product is one call of the same compiled loop on the two rows' values
there. That loop is the only code that forms any entry (a row left without a partner for the two-row
blocking is paired with itself and its extra results dropped), so an entry depends only on the two
rows' values in ``[a, b)``: never on which other rows are in memory, on the row batch or step block
the row falls in, or on the scheduler. Products of two float32 values are exact in float64, so
whether the compiler fuses multiply-adds does not change a bit. The lane split of a sub-block's dot
product is the compiler's vectorisation of that loop, fixed by the compiled code: identical on every
worker of one CPU type (numba compiles for the host CPU, as OpenBLAS picks its kernels per CPU);
workers of different CPU types may differ in the last bits, as with BLAS.

numba is optional: without it (or with ``kernel="blas"``) the BLAS path runs, with a one-time
:class:`KernelWarning` when the fused kernel was wanted.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from sed_dask import config

logger = logging.getLogger(__name__)

SUB_COLS = 512  # columns per float64 sub-block: 12 rows x 4 KiB stay in L1 (measured best, 256-2048)
KERNELS = ("auto", "fused", "blas")

try:
    import numba
except ImportError as exc:  # the BLAS path still works
    numba = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None


class KernelWarning(UserWarning):
    """The fused Gram kernel was wanted but cannot run here; the BLAS kernel runs instead."""


_warned = False


def available() -> bool:
    """Whether the fused kernel can run in this process (numba imports)."""
    return numba is not None


def _warn_fallback(where: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    msg = (
        f"sed_dask: the fused Gram kernel needs numba, which cannot be imported ({IMPORT_ERROR}); "
        f"{where} uses the BLAS kernel (same accuracy, ~2x the CPU at small widths, last bits may differ "
        f"from fused results). Install numba (deploy/constraints.txt) or set sed_dask.spectrum.gram-kernel: blas"
    )
    logger.warning(msg)
    warnings.warn(msg, KernelWarning, stacklevel=3)


def choose(width: int, precision: str, kernel: str | None = None) -> str:
    """``"fused"`` or ``"blas"`` for a band of ``width`` (keyword, else ``spectrum.gram-kernel``).

    ``auto``: fused for float64 bands up to ``spectrum.fused-max-width`` (the measured crossover:
    above it one BLAS ``syrk`` of the rows in memory is cheaper than ``width`` dot products per
    element); float32 precision always uses BLAS (its products are float32 by definition).
    """
    kernel = config.get("spectrum.gram-kernel", kernel)
    if kernel not in KERNELS:
        raise ValueError(f"gram kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "blas" or precision != "float64":
        return "blas"
    if kernel == "auto" and width > int(config.get("spectrum.fused-max-width")):
        return "blas"
    if not available():
        _warn_fallback("this pass")
        return "blas"
    return "fused"


def runnable(kernel: str) -> str:
    """The kernel a task actually runs: ``fused`` falls back to BLAS (warning once) where numba is missing."""
    if kernel == "fused" and not available():
        _warn_fallback("this worker")
        return "blas"
    return kernel


if numba is not None:
    _FM = {"reassoc", "contract", "nsz"}  # reassoc: vectorise the dot loop; its lane order is then fixed code

    @numba.njit(cache=True, nogil=True, fastmath={"contract"})
    def _convert(S, p0, n, s, m, work):
        for r in range(p0, n):
            src = S[r, s : s + m]
            dst = work[r - p0]
            for c in range(m):
                dst[c] = src[c]

    @numba.njit(cache=True, nogil=True, fastmath=_FM)
    def _dot2x4(xa, xb, y0, y1, y2, y3, y4, m):
        # the only loop that forms band entries: row a against y0..y3, row b against y1..y4
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        b0 = 0.0
        b1 = 0.0
        b2 = 0.0
        b3 = 0.0
        for j in range(m):
            u = xa[j]
            v = xb[j]
            q1 = y1[j]
            q2 = y2[j]
            q3 = y3[j]
            a0 += u * y0[j]
            a1 += u * q1
            a2 += u * q2
            a3 += u * q3
            b0 += v * q1
            b1 += v * q2
            b2 += v * q3
            b3 += v * y4[j]
        return a0, a1, a2, a3, b0, b1, b2, b3

    @numba.njit(cache=True, nogil=True)
    def _band_sub(work, m, t_lo, n, width, out):
        # rows of work are S rows p0.. (work row 0 = S row p0); out row 0 = work row t_lo
        for tb in range(t_lo, n, 2):
            ta = min(tb + 1, n - 1)
            pair = ta != tb
            xa = work[ta, :m]
            xb = work[tb, :m]
            for k0 in range(0, width, 4):
                if pair:
                    rows = (ta - k0, ta - k0 - 1, ta - k0 - 2, ta - k0 - 3, ta - k0 - 4)
                else:  # a lone last row: slot b holds it, slot a (dropped) repeats it
                    rows = (tb - k0, tb - k0, tb - k0 - 1, tb - k0 - 2, tb - k0 - 3)
                y0 = work[max(0, rows[0]), :m]
                y1 = work[max(0, rows[1]), :m]
                y2 = work[max(0, rows[2]), :m]
                y3 = work[max(0, rows[3]), :m]
                y4 = work[max(0, rows[4]), :m]
                r = _dot2x4(xa, xb, y0, y1, y2, y3, y4, m)
                for q in range(4):
                    k = k0 + q
                    if k >= width:
                        break
                    if pair and ta - k >= 0:
                        out[ta - t_lo, k] += r[q]
                    if tb - k >= 0:
                        out[tb - t_lo, k] += r[4 + q]

    @numba.njit(cache=True, nogil=True)
    def _band_segment(S, p0, t_lo, a, b, width, sub, work, out):
        n = S.shape[0]
        for s in range(a, b, sub):
            m = min(sub, b - s)
            _convert(S, p0, n, s, m, work)
            _band_sub(work, m, t_lo - p0, n - p0, width, out)


def band_segment(
    S: np.ndarray, p0: int, t_lo: int, a: int, b: int, width: int, work: np.ndarray, out: np.ndarray
) -> None:
    """Add the band products of rows ``t_lo..`` of float32 ``S`` over columns ``[a, b)`` to ``out``.

    ``out[t - t_lo, k] += <S[t, a:b], S[t-k, a:b]>`` for ``k < width`` and partners ``t-k >= p0``
    (rows before ``p0`` are never read), summed as the module docstring says. ``work``: a float64
    scratch of at least ``(S.shape[0] - p0, SUB_COLS)``, reused across calls.
    """
    if numba is None:
        raise RuntimeError(f"the fused Gram kernel needs numba ({IMPORT_ERROR})")
    _band_segment(S, p0, t_lo, a, b, width, SUB_COLS, work, out)


def band_reference(S: np.ndarray, p0: int, t_lo: int, a: int, b: int, width: int) -> np.ndarray:
    """Plain numpy float64 of what :func:`band_segment` adds (for tests and benchmarks)."""
    D = S[:, a:b].astype(np.float64)
    out = np.zeros((S.shape[0] - t_lo, width))
    for t in range(t_lo, S.shape[0]):
        for k in range(min(width, t - p0 + 1)):
            out[t - t_lo, k] = D[t] @ D[t - k]
    return out
