"""Per-window spectral features from a banded Gram (docs/method.md §3, §4): pure NumPy on the client.

Every quantity of §3.2 is a function of the W x W window Gram and, for gamma, of the cross
products between consecutive windows (band lags up to W), so nothing here touches the store.
Windows are never dropped: where a quantity is undefined (an all-zero window, a zero last delta,
a ratio with a zero denominator) it is NaN. "Zero" is scale-relative: sigma_j <= zero_rtol * sigma_1,
because a Gram resolves eigenvalues only to ~eps * lambda_1, i.e. singular values to ~1e-8 sigma_1.
"""

from __future__ import annotations

import numpy as np

from sed_dask import config
from sed_dask.engine.noise import bbp_ratio, mp_edge, signal_count


def window_grams(band: np.ndarray, W: int, *, shift: int = 0) -> np.ndarray:
    """``(n_windows, W, W)`` Grams of the windows ending at deltas W-1 .. N-1 (from ``band[i, k]``).

    ``shift=1`` gives the cross products ``<delta_{window t, a}, delta_{window t-1, b}>`` instead
    (row window ends at k, column window at k-1; needs band lags up to W).
    """
    N = band.shape[0]
    ends = np.arange(W - 1, N)
    idx = ends[:, None] - (W - 1) + np.arange(W)[None, :]
    I = idx[:, :, None]
    J = idx[:, None, :] - shift
    lag = np.abs(I - J)
    if lag.max(initial=0) >= band.shape[1]:
        raise ValueError(f"band width {band.shape[1]} is too narrow for W={W} (shift {shift})")
    return band[np.clip(np.maximum(I, J), 0, N - 1), lag]


def _masked_argmax(score: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """1-based argmax of ``score`` over ``ok`` entries per row; NaN where a row has none."""
    s = np.where(ok, score, -np.inf)
    k = np.argmax(s, axis=1).astype(np.float64) + 1.0
    return np.where(ok.any(axis=1), k, np.nan)


K_STAR_RULES = ("numerator", "denominator", "naive", "weighted", "count")
K_STAR_DEFAULT = "numerator"  # chosen from the recovery table in benchmarks/README.md ("Fidelity")


def k_star_rules(sigma: np.ndarray, *, floor: np.ndarray, n_signal: np.ndarray) -> dict[str, np.ndarray]:
    """Every k* variant of one set of window spectra (docs/method.md, "Signal rank").

    All are 1-based argmaxes of the consecutive ratios rho_k = sigma_k / sigma_(k+1) over a
    candidate set (NaN where a window has no finite ratio):

    * ``numerator`` (default): k with sigma_k >= floor, so the signal->noise boundary, whose
      numerator is the last value above the floor, is a candidate; fallback k <= W/2;
    * ``denominator``: k with sigma_(k+1) >= floor (round 1's rule): it cannot pick the boundary
      when the first noise value sits at or below the floor, as it normally does;
    * ``naive``: all k (the reference code: picks tail ratios among noise values);
    * ``weighted``: argmax (sigma_k / sum sigma) rho_k over all k (companion repos);
    * ``count``: k <= n_signal (the values the noise test counts), fallback 1.
    """
    W = sigma.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sigma[:, :-1] / sigma[:, 1:]
    finite = np.isfinite(ratio) & (sigma[:, 1:] > 0)
    kidx = np.arange(1, W)[None, :]
    fallback = finite & (kidx <= max(1, W // 2))

    def restricted(ok):
        return _masked_argmax(ratio, np.where(ok.any(axis=1)[:, None], ok, fallback))

    nf = np.asarray(floor, dtype=float)[:, None]
    ns = np.nan_to_num(np.asarray(n_signal, dtype=float), nan=0.0)[:, None]
    ssum = sigma.sum(axis=1, keepdims=True)
    return {
        "numerator": restricted(finite & (sigma[:, :-1] >= nf)),
        "denominator": restricted(finite & (sigma[:, 1:] >= nf)),
        "naive": _masked_argmax(ratio, finite),
        "weighted": _masked_argmax(sigma[:, :-1] / ssum * ratio, finite),
        "count": _masked_argmax(ratio, np.where((ns >= 1), finite & (kidx <= ns), finite & (kidx == 1))),
    }


def split_half(G: np.ndarray, *, zero_rtol: float) -> np.ndarray:
    """|cos| between the k-th right singular vectors of the two halves of each window (docs/method.md §4.5).

    Halves A = first ceil(W/2), B = last floor(W/2) deltas. v_A^k = X_A^T u_A^k / sigma_A^k, so
    <v_A^k, v_B^k> = u_A^k^T G_AB u_B^k / (sigma_A^k sigma_B^k): the window Gram suffices, no
    P-dimensional vector is formed. Returns ``(n_windows, floor(W/2))``; NaN where either half's
    sigma_k <= zero_rtol * (that half's sigma_1), including an all-zero half. Like v1 itself, the
    k-th direction of a half is ill-defined when its sigma_k is (nearly) degenerate with a
    neighbour; that is not flagged here.
    """
    W = G.shape[-1]
    a = (W + 1) // 2
    b = W // 2

    def half(Gh):
        lam, U = np.linalg.eigh(Gh)
        s = np.sqrt(np.clip(lam[:, ::-1], 0.0, None))[:, :b]
        U = U[:, :, ::-1][:, :, :b]
        ok = s > zero_rtol * s[:, :1]  # False everywhere for an all-zero half
        return s, U, ok

    sA, UA, okA = half(G[:, :a, :a])
    sB, UB, okB = half(G[:, a:, a:])
    ok = okA & okB
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.abs(np.einsum("tak,tab,tbk->tk", UA, G[:, :a, a:], UB)) / (sA * sB)
    return np.where(ok, np.minimum(1.0, c), np.nan)


def window_features(band: np.ndarray, W: int, *, n_params: int, zero_rtol: float | None = None) -> dict:
    """Features of every window of ``W`` consecutive deltas; arrays over windows ending at W-1 .. N-1.

    ``band`` is ``(N, width)`` with ``band[i, k] = <delta_i, delta_{i-k}>`` (NaN/any where i-k < 0);
    ``width >= W`` is required and gamma/kappa need ``width >= W + 1`` (else NaN).
    """
    zero_rtol = float(config.get("spectrum.zero-rtol", zero_rtol))
    N = band.shape[0]
    if W < 2:
        raise ValueError(f"window W={W}: need W >= 2 (ratios need two singular values)")
    if W > N:
        raise ValueError(f"window W={W} is longer than the {N} deltas available")
    G = window_grams(band, W)
    n = G.shape[0]
    lam, U = np.linalg.eigh(G)
    lam = np.clip(lam[:, ::-1], 0.0, None)
    U = U[:, :, ::-1]
    sigma = np.sqrt(lam)
    s1 = sigma[:, 0]
    live = s1 > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = sigma <= zero_rtol * s1[:, None]
        ratio = np.where(zero[:, 1:], np.nan, sigma[:, :-1] / sigma[:, 1:])
        nf = np.where(live, mp_edge(lam, n_params), np.nan)
        n_signal = np.where(live, signal_count(lam, n_params), np.nan)
        rules = k_star_rules(np.where(zero, 0.0, sigma), floor=nf, n_signal=n_signal)
        k_star = rules[K_STAR_DEFAULT]
        k_naive = rules["naive"]
        k_weighted = rules["weighted"]
        kk = np.nan_to_num(k_star, nan=1).astype(int) - 1
        rows = np.arange(n)
        edge_ratio = np.where(np.isnan(k_star), np.nan, ratio[rows, kk])
        edge_gap = np.where(np.isnan(k_star), np.nan, sigma[rows, kk] - sigma[rows, kk + 1])
        total = lam.sum(axis=1, keepdims=True)
        pc_frac = np.where(total > 0, lam / total, np.nan)
        k95 = np.argmax(np.cumsum(np.nan_to_num(pc_frac), axis=1) >= 0.95, axis=1) + 1.0
        k95 = np.where(live, np.minimum(k95, W), np.nan)
        drift2 = np.maximum(0.0, G.sum(axis=(1, 2)))
        drift = np.sqrt(drift2) / W
        u1 = U[:, :, 0]
        last = G[:, -1, -1]
        ok_last = live & (last > (zero_rtol * s1) ** 2)
        align = np.where(ok_last, np.minimum(1.0, s1 * np.abs(u1[:, -1]) / np.sqrt(last)), np.nan)
        a = s1 * u1.sum(axis=1) / W
        a_speed = np.where(live, np.abs(a), drift)
        r_speed = np.where(live, np.sqrt(np.maximum(0.0, drift2 / W**2 - a**2)), 0.0)
        gamma = np.full(n, np.nan)
        if band.shape[1] >= W + 1 and n > 1:
            C = window_grams(band, W, shift=1)[1:]
            g = np.abs(np.einsum("ta,tab,tb->t", u1[1:], C, u1[:-1])) / (s1[1:] * s1[:-1])
            gamma[1:] = np.where(live[1:] & live[:-1], np.minimum(1.0, g), np.nan)
        bbp = np.where(live, bbp_ratio(lam, n_params), np.nan)
    halves = split_half(G, zero_rtol=zero_rtol)
    return {
        "sigma": sigma,
        "ratio": ratio,
        "pc_frac": pc_frac,
        "k_star": k_star,
        "k_star_naive": k_naive,
        "k_star_weighted": k_weighted,
        "n_signal": n_signal,
        "edge_ratio": edge_ratio,
        "edge_gap": edge_gap,
        "k95": k95,
        "drift_speed": drift,
        "noise_floor": nf,
        "bbp_ratio": bbp,
        "gamma": gamma,
        "kappa": 1.0 - gamma,
        "align_u": align,
        "a_speed": a_speed,
        "r_speed": r_speed,
        "split_half": halves,
    }


def normalise_spacing(band: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """The band of ``delta_i / (s_i - s_{i-1})``: entry (i, k) divided by span_i * span_{i-k}."""
    N, w = band.shape[-2:]
    i = np.arange(N)[:, None]
    j = np.clip(i - np.arange(w)[None, :], 0, N - 1)
    sp = spans.astype(np.float64)
    return band / (sp[i] * sp[j])
