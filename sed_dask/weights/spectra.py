"""Per-matrix spectral kernels: top-k singular values, the ESD and norms of one weight matrix.

A matrix is read through ``rows(r0, r1) -> float64 (r1 - r0, n)`` (contiguous rows of the flat
C-order tensor), so a kernel never needs the whole matrix unless it is small. Three methods,
chosen by size (``weights`` config section):

* ``exact``      - ``8 m n <= exact-bytes``: the matrix in float64, LAPACK ``gesdd``
                   (``np.linalg.svd``): every singular value, so the ESD is complete;
* ``gram``       - larger, ``min(m, n) <= esd-max-dim``: the small-side Gram accumulated over row
                   blocks in float64 (``A^T A`` for tall, block pairs ``A_i A_j^T`` for wide matrices),
                   ``eigvalsh``: the whole ESD; singular values below ~sqrt(eps) sigma_1 are not
                   resolved (a Gram squares the condition number);
* ``randomized`` - ``min(m, n) > esd-max-dim``: Halko et al.'s range finder with the counter-based
                   Gaussian operator of :mod:`sed_dask.engine.jl` as the test matrix (so the result does not
                   depend on chunking), ``power-iter`` power iterations and ``oversamples`` extra
                   columns, streamed over row blocks: top-k only, no ESD.

Conv kernels ``(out, in, *k)`` are viewed as ``out x (in * prod k)`` (the flat layout already is).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from sed_dask import config
from sed_dask.errors import StoreError

METHODS = ("exact", "gram", "randomized")


class WeightSpectrumError(StoreError):
    """A weight spectrum cannot be computed as asked (no 2-D tensor, an unknown layer, k too large)."""


def matrix_shape(shape) -> tuple[int, int] | None:
    """``(rows, cols)`` a tensor is analysed as, or None for 0-D/1-D tensors and matrices with a side of 1."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    m, n = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    return (m, n) if min(m, n) >= 2 else None


@dataclasses.dataclass(frozen=True)
class SpectrumSettings:
    """How one matrix is decomposed and fitted (resolved once on the client, shipped to tasks)."""

    k: int
    exact_bytes: int
    esd_max_dim: int
    block_bytes: int
    oversamples: int
    power_iter: int
    seed: int
    tile_elems: int
    outlier_alpha: float
    alpha_min_tail: int
    keep_esd: bool
    strict_k: bool = True  # k was asked for: a matrix with fewer singular values is an error (else: all it has)

    def method(self, m: int, n: int) -> str:
        if 8 * m * n <= self.exact_bytes:
            return "exact"
        if min(m, n) <= self.esd_max_dim:
            return "gram"
        return "randomized"

    def block_rows(self, n: int) -> int:
        return max(1, self.block_bytes // (4 * n))


def settings(
    *,
    k=None,
    exact_bytes=None,
    esd_max_dim=None,
    block_bytes=None,
    oversamples=None,
    power_iter=None,
    seed=None,
    tile_elems=None,
    outlier_alpha=None,
    alpha_min_tail=None,
    keep_esd=None,
) -> SpectrumSettings:
    """Resolve keyword overrides against the ``sed_dask.weights`` config section and validate them."""
    from sed_dask.weights.fit import tw_quantile

    s = SpectrumSettings(
        strict_k=k is not None,
        k=int(config.get("weights.k", k)),
        exact_bytes=config.get_bytes("weights.exact-bytes", exact_bytes),
        esd_max_dim=int(config.get("weights.esd-max-dim", esd_max_dim)),
        block_bytes=config.get_bytes("weights.block-bytes", block_bytes),
        oversamples=int(config.get("weights.oversamples", oversamples)),
        power_iter=int(config.get("weights.power-iter", power_iter)),
        seed=int(config.get("sketch.seed", seed)),
        tile_elems=int(config.get("sketch.tile-elems", tile_elems)),
        outlier_alpha=float(config.get("weights.outlier-alpha", outlier_alpha)),
        alpha_min_tail=int(config.get("weights.alpha-min-tail", alpha_min_tail)),
        keep_esd=bool(config.get("weights.keep-esd", keep_esd)),
    )
    if s.k < 1:
        raise ValueError(f"k={s.k}: the number of top singular values must be >= 1")
    for name in ("exact_bytes", "block_bytes"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(s, name)}")
    if s.esd_max_dim < 0 or s.oversamples < 0 or s.power_iter < 0:
        raise ValueError("esd_max_dim, oversamples and power_iter must be >= 0")
    if s.alpha_min_tail < 2:
        raise ValueError(f"alpha_min_tail must be >= 2, got {s.alpha_min_tail}")
    tw_quantile(s.outlier_alpha)
    return s


def array_rows(A: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """A row reader over an in-memory matrix (tests, the benchmark, :func:`matrix_spectrum` on arrays)."""
    A = np.asarray(A)
    return lambda r0, r1: np.asarray(A[r0:r1], np.float64)


def _blocks(m: int, rows_per: int):
    return [(r, min(r + rows_per, m)) for r in range(0, m, rows_per)]


def _gram_eigenvalues(rows, m: int, n: int, rows_per: int) -> tuple[np.ndarray, float]:
    """All eigenvalues (descending) of the min-side Gram and ||A||_F^2, from row blocks."""
    blocks = _blocks(m, rows_per)
    if n <= m:
        G = np.zeros((n, n))
        for r0, r1 in blocks:
            B = rows(r0, r1)
            G += B.T @ B
    else:
        G = np.zeros((m, m))
        for i, (a0, a1) in enumerate(blocks):
            Bi = rows(a0, a1)
            G[a0:a1, a0:a1] = Bi @ Bi.T
            for b0, b1 in blocks[i + 1 :]:
                C = Bi @ rows(b0, b1).T
                G[a0:a1, b0:b1] = C
                G[b0:b1, a0:a1] = C.T
    fro2 = float(np.trace(G))
    lam = np.linalg.eigvalsh(G)[::-1]
    return np.clip(lam, 0.0, None), fro2


def _omega(n: int, l: int, s: SpectrumSettings) -> np.ndarray:
    """The n x l Gaussian test matrix: rows of the counter-based JL operator (seed, tile size)."""
    from sed_dask.engine.jl import Operator

    return Operator(seed=s.seed, d=l, distribution="gaussian", tile_elems=s.tile_elems, n_params=n).rows(0, n)


def _randomized(rows, m: int, n: int, l: int, s: SpectrumSettings, *, vectors: bool):
    """Halko range finder streamed over row blocks: ``(sigma (l,), ||A||_F^2, U, V)`` (U, V only if asked)."""
    blocks = _blocks(m, s.block_rows(n))
    Om = _omega(n, l, s)
    fro2 = 0.0
    Y = np.empty((m, l))
    for r0, r1 in blocks:
        B = rows(r0, r1)
        fro2 += float(np.einsum("ij,ij->", B, B))
        Y[r0:r1] = B @ Om
    Q = np.linalg.qr(Y)[0]
    for _ in range(s.power_iter):
        Z = np.zeros((n, l))
        for r0, r1 in blocks:
            Z += rows(r0, r1).T @ Q[r0:r1]
        Z = np.linalg.qr(Z)[0]
        for r0, r1 in blocks:
            Y[r0:r1] = rows(r0, r1) @ Z
        Q = np.linalg.qr(Y)[0]
    Bt = np.zeros((n, l))  # (Q^T A)^T
    for r0, r1 in blocks:
        Bt += rows(r0, r1).T @ Q[r0:r1]
    if not vectors:
        return np.linalg.svd(Bt, compute_uv=False), fro2, None, None
    Vb, sig, UbT = np.linalg.svd(Bt, full_matrices=False)  # Bt = Vb S Ub^T  =>  A ~ Q Ub S Vb^T
    return sig, fro2, Q @ UbT.T, Vb


def check_k(name: str, m: int, n: int, k: int, strict: bool = True) -> None:
    """An explicit k must fit every matrix; the configured default k is cut to what a small matrix has."""
    if strict and k > min(m, n):
        raise WeightSpectrumError(
            f"tensor {name!r} ({m} x {n}) has {min(m, n)} singular values; k={k} is larger "
            f"than the matrix: lower k, or leave the tensor out (exclude=)"
        )


def matrix_spectrum(rows, m: int, n: int, s: SpectrumSettings, *, name: str = "matrix") -> dict:
    """Top-k sigma, the ESD (or None), norms, MP fit, outliers and power-law alpha of one matrix.

    ``rows`` is a row reader (:func:`array_rows`, or a store reader in :mod:`sed_dask.weights.compute`)
    or an ``(m, n)`` array.
    """
    from sed_dask.weights.fit import mp_fit, mp_fit_trace, powerlaw_alpha

    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise WeightSpectrumError(f"{name}: expected a 2-D matrix, got shape {rows.shape}")
        m, n = rows.shape
        rows = array_rows(rows)
    check_k(name, m, n, s.k, s.strict_k)
    method = s.method(m, n)
    esd = None
    if method == "exact":
        A = rows(0, m)
        sig = np.linalg.svd(A, compute_uv=False)
        fro2 = float(np.einsum("ij,ij->", A, A))
        esd = sig**2
        top = sig[: s.k]
    elif method == "gram":
        esd, fro2 = _gram_eigenvalues(rows, m, n, s.block_rows(n))
        top = np.sqrt(esd[: s.k])
    else:
        l = min(min(m, n), s.k + s.oversamples)
        sig, fro2, _, _ = _randomized(rows, m, n, l, s, vectors=False)
        top = sig[: s.k]
    if not np.isfinite(fro2):
        raise WeightSpectrumError(f"{name}: the matrix holds NaN/Inf")
    top = np.concatenate([np.asarray(top, np.float64), np.full(s.k - len(top), np.nan)])  # NaN past min(m, n)
    out = {
        "method": method,
        "sigma": top,
        "frobenius": math.sqrt(max(fro2, 0.0)),
        "spectral": float(top[0]),
        "esd": esd,
    }
    out["stable_rank"] = out["frobenius"] ** 2 / out["spectral"] ** 2 if out["spectral"] > 0 else math.nan
    if esd is not None:
        out["mp"] = mp_fit(esd, m, n, outlier_alpha=s.outlier_alpha)
        out["mp"]["censored"] = False
        out["alpha"] = powerlaw_alpha(esd, min_tail=s.alpha_min_tail)
    else:
        out["mp"] = mp_fit_trace(top[np.isfinite(top)], out["frobenius"], m, n, outlier_alpha=s.outlier_alpha)
        out["alpha"] = powerlaw_alpha(np.zeros(0))
    return out


def top_singular_vectors(
    rows, m: int, n: int, k: int, s: SpectrumSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U (m x k), sigma (k,), V (n x k))``: exact for matrices under ``exact-bytes``, randomized otherwise."""
    if 8 * m * n <= s.exact_bytes:
        U, sig, Vt = np.linalg.svd(rows(0, m), full_matrices=False)
        return U[:, :k], sig[:k], Vt[:k].T
    l = min(min(m, n), k + s.oversamples)
    sig, _, U, V = _randomized(rows, m, n, l, s, vectors=True)
    return U[:, :k], sig[:k], V[:, :k]
