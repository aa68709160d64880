"""Johnson-Lindenstrauss operators Phi (P x d) from counter-based random tiles (docs/method.md §11).

Why it is built like this:

* **Counter-based tiles.** Rows ``[t*T, (t+1)*T)`` of Phi form RNG tile ``t`` (``T`` =
  ``sketch.tile-elems``). Column ``j`` of tile ``t`` is the raw output of numpy's ``Philox`` keyed by
  ``(seed, t)`` with the 256-bit counter ``(row // 4, j, 0, 0)``: one 64-bit word per entry, so any
  entry, row range or column prefix is addressable without generating what precedes it. Phi is a
  function of (seed, tile size, distribution, P, s) only, never of Dask or Zarr chunking.
* **Own transforms of raw bits.** ``Generator`` methods may change between numpy versions (NEP 19);
  ``random_raw`` output of a keyed Philox does not. Gaussian entries use Box-Muller on pairs of
  53-bit uniforms (words k and k + T/2 of a column of the tile); Rademacher uses the top bit; the very sparse
  operator (Li, Hastie & Church 2006) compares the top 53 bits with an integer threshold and takes
  the sign from bit 0. ``osnap`` (``sed_dask.engine.osnap``) draws only s words per row: one column per
  block of d/s columns and a sign, so its cost is O(P s), not O(P d). Rademacher, sparse and osnap
  tiles are pure bit functions (identical on every machine); Gaussian tiles go through
  ``log``/``cos``, whose last bit may differ between CPUs or libm builds (never between the tasks
  of one homogeneous cluster).
* **Columns nest** (all but ``osnap``). Column ``j`` does not depend on ``d``, so the first ``d`` columns
  of a ``d' > d`` operator, rescaled by ``sqrt(d'/d)``, are the ``d`` operator: one wide sketch serves
  every smaller d. OSNAP's blocks depend on d, so it does not nest (``Operator.nests``).
* Values are generated unscaled (N(0,1), +-1, {-1,0,+1}); ``Operator.scale`` (1/sqrt(d), or
  sqrt(s/d) for sparse, 1/sqrt(s) for osnap) is applied once to the finished sketch, so
  E[Phi_pj^2] = 1/d throughout (osnap: every row has squared norm exactly 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

DISTRIBUTIONS = ("gaussian", "rademacher", "sparse", "osnap")
NESTED_DISTRIBUTIONS = ("gaussian", "rademacher", "sparse")  # first d columns of a wider operator = the d one
OSNAP_S = 1  # osnap nonzeros per row unless given (benchmarks/README.md "Sketch and directions")
_TWO53 = 2.0**53
_INV53 = 2.0**-53
_SHIFT = np.uint64(11)


def _key(seed: int, tile: int) -> np.ndarray:
    return np.array([seed, tile], dtype=np.uint64)


@dataclasses.dataclass(frozen=True)
class Operator:
    """A JL operator Phi in R^{P x d}; cheap to pickle (tasks regenerate the tiles they need)."""

    seed: int
    d: int
    distribution: str
    tile_elems: int
    n_params: int
    s: float | None = None  # sparse: an entry is nonzero with probability 1/s (default sqrt(P));
    #                          osnap: nonzeros per row, an integer 1..d (default OSNAP_S, at most d)

    def __post_init__(self):
        if not 0 <= int(self.seed) < 2**64:
            raise ValueError(f"sketch seed must be an integer in [0, 2**64), got {self.seed!r}")
        if int(self.d) < 1:
            raise ValueError(f"sketch dimension d must be >= 1, got {self.d!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown sketch distribution {self.distribution!r}; use one of {DISTRIBUTIONS}")
        if int(self.tile_elems) < 1:
            raise ValueError(f"sketch tile-elems must be >= 1, got {self.tile_elems!r}")
        if int(self.n_params) < 1:
            raise ValueError(f"n_params must be >= 1, got {self.n_params!r}")
        if self.distribution == "sparse":
            s = math.sqrt(self.n_params) if self.s is None else float(self.s)
            if not s >= 1.0:
                raise ValueError(f"sparse sketch density parameter s must be >= 1, got {s!r}")
            object.__setattr__(self, "s", s)
        elif self.distribution == "osnap":
            s = min(OSNAP_S, int(self.d)) if self.s is None else self.s
            if float(s) != int(s) or not 1 <= int(s) <= int(self.d):
                raise ValueError(f"osnap sketch s (nonzeros per row) must be an integer in 1..d={self.d}, got {s!r}")
            object.__setattr__(self, "s", int(s))
        elif self.s is not None:
            raise ValueError(
                f"s is a parameter of the 'sparse' and 'osnap' distributions; not valid for {self.distribution!r}"
            )

    # ------------------------------------------------------------------ geometry
    @property
    def n_tiles(self) -> int:
        return -(-self.n_params // self.tile_elems)

    def tile_bounds(self, t: int) -> tuple[int, int]:
        """Rows ``[p0, p1)`` of Phi that tile ``t`` holds."""
        p0 = t * self.tile_elems
        return p0, min(p0 + self.tile_elems, self.n_params)

    @property
    def nests(self) -> bool:
        """Whether the first d' columns, rescaled by sqrt(d/d'), are the d' operator (not for osnap)."""
        return self.distribution in NESTED_DISTRIBUTIONS

    @property
    def tile_values(self) -> int:
        """Phi values one tile generates and holds: T x d (T x s for osnap); sizes task plans and caches."""
        return self.tile_elems * (int(self.s) if self.distribution == "osnap" else self.d)

    @property
    def threshold(self) -> int:
        """Sparse only: an entry is nonzero iff its top 53 bits are below this integer."""
        return max(1, min(1 << 53, int(round(_TWO53 / self.s))))

    @property
    def scale(self) -> float:
        """Factor applied to unscaled entries so that every entry has variance exactly 1/d."""
        if self.distribution == "sparse":
            return math.sqrt(_TWO53 / self.threshold / self.d)
        if self.distribution == "osnap":
            return 1.0 / math.sqrt(self.s)
        return 1.0 / math.sqrt(self.d)

    def describe(self) -> dict:
        """JSON-safe provenance."""
        out = {
            "seed": int(self.seed),
            "d": int(self.d),
            "distribution": self.distribution,
            "tile_elems": int(self.tile_elems),
            "n_params": int(self.n_params),
            "scale": self.scale,
            "rng": "numpy Philox4x64, key=(seed, tile), counter=(row//4, column, 0, 0), random_raw; "
            "gaussian: Box-Muller on 53-bit uniforms; rademacher: top bit; sparse: 53-bit "
            "threshold + bit 0 sign; osnap: counter column b = block b of d // s columns, "
            "column (w >> 32) * size >> 32 in the block, bit 0 sign",
        }
        if self.distribution == "osnap":
            out["s"] = int(self.s)
        if self.distribution == "sparse":
            out["s"] = float(self.s)
            out["threshold"] = self.threshold
        return out

    # ------------------------------------------------------------------ raw bits
    def raw(self, t: int, lo: int, hi: int, cols=None) -> np.ndarray:
        """Raw words ``(len(cols), hi - lo)`` of tile ``t``, rows ``lo..hi`` relative to the tile."""
        cols = range(self.d) if cols is None else cols
        q0, q1 = lo - lo % 4, -(-hi // 4) * 4
        key = _key(self.seed, t)
        out = np.empty((len(cols), q1 - q0), np.uint64)
        for i, j in enumerate(cols):
            out[i] = np.random.Philox(key=key, counter=(int(j) << 64) | (q0 // 4)).random_raw(q1 - q0)
        return out[:, lo - q0 : hi - q0]

    # ------------------------------------------------------------------ tiles
    def tile_dense(self, t: int) -> np.ndarray:
        """Unscaled tile ``t`` transposed, ``(d, rows)`` float64 C-order (gaussian or rademacher)."""
        p0, p1 = self.tile_bounds(t)
        n = p1 - p0
        if self.distribution == "gaussian":  # pairs span the full tile length (also in a short last tile)
            T = self.tile_elems + self.tile_elems % 2
            z = _box_muller(self.raw(t, 0, T))
            return np.ascontiguousarray(z[:, :n]) if n < T else z
        w = self.raw(t, 0, n)
        if self.distribution == "rademacher":
            return 1.0 - 2.0 * (w >> np.uint64(63)).astype(np.float64)
        raise ValueError("tile_dense is for dense distributions; use tile_sparse")

    def tile_sparse(self, t: int):
        """Unscaled sparse tile ``t`` transposed: a ``(d, rows)`` scipy CSR with entries +-1."""
        import scipy.sparse as sp

        p0, p1 = self.tile_bounds(t)
        if self.distribution == "osnap":
            from sed_dask.engine.osnap import tile_csr

            return tile_csr(self.raw(t, 0, p1 - p0, cols=range(self.s)), self.d)
        w = self.raw(t, 0, p1 - p0)
        nz = (w >> _SHIFT) < np.uint64(self.threshold)
        r, c = np.nonzero(nz)  # row-major: sorted by column j, then row p
        vals = 1.0 - 2.0 * (w[r, c] & np.uint64(1)).astype(np.float64)
        indptr = np.zeros(self.d + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=self.d), out=indptr[1:])
        return sp.csr_matrix((vals, c.astype(np.int64), indptr), shape=(self.d, p1 - p0))

    def tile_T(self, t: int) -> np.ndarray:
        """Unscaled tile ``t`` transposed as a dense ``(d, rows)`` array, for any distribution."""
        if self.distribution in ("sparse", "osnap"):
            return self.tile_sparse(t).toarray()
        return self.tile_dense(t)

    def rows(self, p0: int = 0, p1: int | None = None) -> np.ndarray:
        """Scaled Phi rows ``[p0, p1)`` as a dense ``(p1 - p0, d)`` float64 array (oracle / tests)."""
        p1 = self.n_params if p1 is None else p1
        T = self.tile_elems
        parts = []
        for t in range(p0 // T, -(-p1 // T)):
            a, b = self.tile_bounds(t)
            parts.append(self.tile_T(t)[:, max(p0, a) - a : min(p1, b) - a])
        out = np.concatenate(parts, axis=1).T if parts else np.zeros((0, self.d))
        return np.ascontiguousarray(out) * self.scale

    def checksum(self) -> str:
        """sha256 (16 hex) of the first tile's scaled float64 values: proves which Phi a sketch used.

        osnap: of its nonzeros instead (per row p ascending: column int64, then scaled value float64),
        O(T s) like the operator (the dense tile at d = 1000 took 0.3 s, as long as the whole pass).
        """
        if self.distribution == "osnap":
            c = self.tile_sparse(0).tocsc()  # rows of Phi = columns of the transposed tile
            c.sort_indices()
            pairs = np.empty((c.nnz, 2), "<f8")
            pairs[:, 0].view("<i8")[:] = c.indices
            pairs[:, 1] = c.data * self.scale
            return hashlib.sha256(pairs.tobytes()).hexdigest()[:16]
        a = np.ascontiguousarray(self.tile_T(0).T) * self.scale
        return hashlib.sha256(a.astype("<f8").tobytes()).hexdigest()[:16]


def _box_muller(w: np.ndarray) -> np.ndarray:
    """N(0,1) from raw words ``(m, 2h)``: word k (radius) pairs with word k + h (angle) in each row.

    u1 = (top 53 bits + 1) / 2^53 in (0, 1] (log never sees 0), th = 2 pi (top 53 bits) / 2^53;
    z_k = r cos th, z_{k+h} = r sin th. Pairing the two halves keeps every operation contiguous.
    sin is sign * sqrt((1 - c)(1 + c)): one libm call per pair instead of two, with the sign
    (th <= pi) taken exactly from the bits.
    """
    m, n = w.shape
    if n % 2:
        raise ValueError("Box-Muller needs whole pairs of words")
    h = n // 2
    a = (w[:, :h] >> _SHIFT).view(np.int64).astype(np.float64)
    b = (w[:, h:] >> _SHIFT).view(np.int64)
    lower = b <= (1 << 52)  # th <= pi: sin >= 0
    th = b.astype(np.float64)
    th *= 2.0 * math.pi * _INV53
    a += 1.0
    a *= _INV53
    r = np.log(a)
    r *= -2.0
    np.sqrt(r, out=r)
    out = np.empty((m, n), np.float64)
    c = np.cos(th, out=out[:, :h])
    s = out[:, h:]
    np.subtract(1.0, c, out=s)
    np.add(1.0, c, out=th)  # th is no longer needed: reuse it for 1 + c
    s *= th
    np.sqrt(s, out=s)
    np.negative(s, out=s, where=~lower)
    s *= r
    c *= r
    return out
