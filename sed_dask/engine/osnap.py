"""OSNAP sparse embedding tiles: exactly s nonzeros +-1 per parameter row of Phi (docs/method.md §11).

Why it is built like this:

* **O(P s) random words, not O(P d).** The ``d`` columns are cut into ``s`` contiguous blocks
  ``[b d // s, (b + 1) d // s)`` (Nelson & Nguyen's OSNAP; s = 1 is CountSketch). Row ``p`` of tile
  ``t`` has one nonzero in each block, from one raw Philox word: the word at counter
  ``(p // 4, b, 0, 0)`` of the ``(seed, t)`` key (``Operator.raw``, column ``b``). Its top 32 bits
  pick the column inside the block by multiply-shift (``(w >> 32) * size >> 32``: integer-only, bias
  below ``size / 2^32``), bit 0 the sign. Pure bit arithmetic: identical on every machine.
* **Distinct columns for free.** Blocks are disjoint, so a row's s nonzeros never collide and
  every row of Phi has squared norm exactly 1 (after the 1/sqrt(s) scale): ``||Phi^T x||^2`` is
  unbiased for any x, and its variance is that of a Gaussian operator minus ``2 sum x_p^4 / d``.
* **Applied without the dense block.** The tile is a ``(d, T)`` CSR whose rows list their
  parameters in ascending order; ``sed_dask.engine.sketch.tile_product`` multiplies it into the
  transposed float64 deltas (scipy's ``csr_matvecs``, which releases the GIL). Each output is a
  sequential sum over that fixed list, and the products are by +-1 (exact), so a delta row gives
  the same bits whatever other rows share the call.
* **No nesting.** Which block a column belongs to depends on d, so the first d' columns of a d
  sketch are *not* a d' sketch (a row whose nonzeros fall past d' has none there). Code that would
  use column prefixes (``spectra_from_sketch(d=...)``, ``jl_error_report(nested=True)``) refuses
  such a sketch (``Operator.nests`` / ``NESTED_DISTRIBUTIONS``).
"""

from __future__ import annotations

import numpy as np

_HI = np.uint64(32)
_ONE = np.uint64(1)


def block_bounds(d: int, s: int) -> np.ndarray:
    """``(s + 1,)`` column boundaries of the s blocks: block b is ``[b d // s, (b + 1) d // s)``."""
    return (np.arange(s + 1, dtype=np.int64) * int(d)) // int(s)


def columns_and_signs(words: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Column ``(s, n)`` int64 and negative-sign mask ``(s, n)`` of raw words ``(s, n)`` (row b: block b)."""
    s = words.shape[0]
    lo = block_bounds(d, s)
    size = np.diff(lo).astype(np.uint64)[:, None]
    cols = ((words >> _HI) * size) >> _HI  # < size: (w >> 32) < 2^32, size < 2^32
    cols = cols.astype(np.int64) + lo[:-1, None]
    return cols, (words & _ONE).astype(bool)


def tile_csr(words: np.ndarray, d: int):
    """The unscaled transposed tile ``(d, n)`` as a scipy CSR with entries +-1 (n = words.shape[1]).

    Row j of the CSR lists the parameters whose nonzero lands in column j, in ascending order: the
    fixed summation order of ``tile_product``.
    """
    import scipy.sparse as sp

    s, n = words.shape
    cols, neg = columns_and_signs(words, d)
    flat = cols.ravel()  # block-major, p ascending inside each block
    # a stable sort by column keeps p ascending within a column (a column belongs to one block)
    order = np.argsort(flat.astype(np.uint16) if d <= 1 << 16 else flat, kind="stable")
    indices = np.tile(np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64), s)[order]
    data = 1.0 - 2.0 * neg.ravel()[order]
    indptr = np.zeros(d + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=d), out=indptr[1:])
    m = sp.csr_matrix((data, indices, indptr), shape=(d, n))
    m.has_sorted_indices = True
    return m
