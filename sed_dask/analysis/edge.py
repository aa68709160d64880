"""Edge queries: signal rank (mode of k*), per-series edge summary, edge significance vs a null.

Per-window k* and the edge ratio are computed by the engine (result_schema.md); here they are
summarised over windows and tested against a matched-norm random-direction null (docs/method.md §4.5).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from sed_dask.analysis._series import (
    STEP,
    Collector,
    describe,
    first_sustained,
    iter_series,
    mp_adjacent_ratio,
    resolve,
    select,
    series_dims,
)
from sed_dask.analysis.defaults import SUSTAIN
from sed_dask.errors import AnalysisError


def _rank_stats(da: xr.DataArray, prefix: str) -> dict:
    """Mode (ties -> smallest), its frequency and the central 90 % interval of a rank series."""
    vals = da.transpose(*series_dims(da), STEP).values.astype(float)
    ok = np.isfinite(vals)
    if ok.any() and (np.any(vals[ok] < 0) or np.any(vals[ok] != np.round(vals[ok]))):
        raise AnalysisError(f"{da.name!r} must hold non-negative integer ranks")
    kmax = int(np.nanmax(vals)) if ok.any() else 1
    ks = np.arange(0, kmax + 1)
    counts = (vals[..., None] == ks).sum(axis=-2)
    n = ok.sum(axis=-1)
    mode = ks[np.argmax(counts, axis=-1)].astype(float)
    best = counts.max(axis=-1).astype(float)
    with np.errstate(all="ignore"):
        lo = np.where(
            n > 0,
            np.nanquantile(np.where(ok, vals, np.nan), 0.05, axis=-1, method="lower") if ok.any() else np.nan,
            np.nan,
        )
        hi = np.where(
            n > 0,
            np.nanquantile(np.where(ok, vals, np.nan), 0.95, axis=-1, method="higher") if ok.any() else np.nan,
            np.nan,
        )
    mode[n == 0] = np.nan
    best[n == 0] = np.nan
    freq = np.where(n > 0, best / np.maximum(n, 1), np.nan)
    return {
        f"{prefix}mode": mode,
        f"{prefix}mode_count": best,
        f"{prefix}mode_freq": freq,
        f"{prefix}lo": lo,
        f"{prefix}hi": hi,
        f"{prefix}n": n,
    }


def signal_rank(
    ds: xr.Dataset, *, variable="signal_rank", count="n_signal", run=None, window=None, group=None
) -> xr.Dataset:
    """Signal rank per (run, W[, group]), as two quantities over the windows.

    * ``k_mode``: the edge location k* (largest consecutive ratio among values above the noise
      floor), its mode over windows (ties -> the smallest k: deterministic and conservative; the
      reference's ``Counter.most_common`` breaks ties by insertion order), ``k_mode_freq`` and the
      central 90 % interval ``k_lo``..``k_hi`` of the per-window values;
    * ``count_mode`` (and ``count_mode_freq``, ``count_lo``, ``count_hi``): the number of values
      above the noise with a finite-size margin (``n_signal``, a sequential Wishart test), when the
      dataset has it.

    They answer different questions and may differ honestly: under decaying strengths the largest
    gap can sit inside the signal (k* < count); the count assumes isotropic noise and over-counts
    anisotropic noise, as real training noise is. ``agree`` flags it; :func:`rank_notes` says why in
    one line per series.
    """
    da = select(resolve(ds, variable), run=run, window=window, group=group)
    vals = da.values.astype(float)
    ok = np.isfinite(vals)
    if ok.any() and (np.any(vals[ok] < 1) or np.any(vals[ok] != np.round(vals[ok]))):
        raise AnalysisError(f"{da.name!r} must hold positive integer ranks (k*)")
    dims = series_dims(da)
    coords = {d: da[d] for d in dims}
    st = _rank_stats(da, "k_")
    data = {
        "k_mode": (
            dims,
            st["k_mode"],
            {
                "long_name": "edge location k*: mode over windows (ties -> smallest)",
                "units": "1",
                "sed_role": "signal_rank_mode",
            },
        ),
        "k_mode_count": (dims, st["k_mode_count"], {"long_name": "windows whose k* equals the mode", "units": "1"}),
        "k_mode_freq": (
            dims,
            st["k_mode_freq"],
            {"long_name": "fraction of windows whose k* equals the mode", "units": "1"},
        ),
        "k_lo": (dims, st["k_lo"], {"long_name": "5th percentile of k* over windows", "units": "1"}),
        "k_hi": (dims, st["k_hi"], {"long_name": "95th percentile of k* over windows", "units": "1"}),
        "n_windows": (dims, st["k_n"], {"long_name": "windows with a finite k*", "units": "1"}),
    }
    if count is not None and count in ds.data_vars:
        c = select(ds[count], run=run, window=window, group=group).transpose(*dims, STEP)
        cs = _rank_stats(c, "count_")
        data.update(
            {
                "count_mode": (
                    dims,
                    cs["count_mode"],
                    {
                        "long_name": "signal count n_signal: mode over windows",
                        "units": "1",
                        "sed_role": "signal_count_mode",
                    },
                ),
                "count_mode_freq": (
                    dims,
                    cs["count_mode_freq"],
                    {"long_name": "fraction of windows at the count mode", "units": "1"},
                ),
                "count_lo": (dims, cs["count_lo"], {"long_name": "5th percentile of n_signal", "units": "1"}),
                "count_hi": (dims, cs["count_hi"], {"long_name": "95th percentile of n_signal", "units": "1"}),
            }
        )
        agree = np.where(
            np.isfinite(st["k_mode"]) & np.isfinite(cs["count_mode"]), st["k_mode"] == cs["count_mode"], True
        )
        data["agree"] = (dims, agree, {"long_name": "k* mode equals the count mode"})
    return xr.Dataset(
        data,
        coords=coords,
        attrs={"source_variable": str(da.name), "count_variable": "" if "count_mode" not in data else count},
    )


def rank_notes(rank: xr.Dataset) -> list[str]:
    """One line per kind of disagreement between k* and the count, naming the series it applies to."""
    if "count_mode" not in rank:
        return []
    dims = list(rank["k_mode"].dims)
    df = rank[["k_mode", "count_mode"]].to_dataframe().reset_index()
    groups: dict[str, list[str]] = {}
    for _, row in df.iterrows():
        k, c = row["k_mode"], row["count_mode"]
        if not (np.isfinite(k) and np.isfinite(c)) or k == c:
            continue
        where = ", ".join(f"{'W' if d == 'window' else d}={row[d]}" for d in dims)
        W = row.get("window")
        if c > k and W is not None and c >= int(W) - 1:
            why = (
                "n_signal = W - 1: every value clears the isotropic-noise test, so the update noise is not "
                "isotropic (as with adaptive optimisers) and the count is only an upper bound; k* is the edge"
            )
        elif c > k:
            why = (
                "n_signal > k*: more values clear the noise test than sit above the largest gap: the signal "
                "strengths decay, or trailing values are anisotropic noise the count (which assumes isotropic "
                "noise) does not separate"
            )
        else:
            why = (
                "n_signal < k*: the largest gap sits among values the noise test calls noise: the edge is not "
                "clearly above the noise there"
            )
        groups.setdefault(why, []).append(f"{where} (k* {int(k)}, n_signal {int(c)})")
    return [f"{why} [{'; '.join(items)}]" for why, items in groups.items()]


def edge_summary(
    ds: xr.Dataset, *, variable="edge_ratio", rank="signal_rank", sv=None, run=None, window=None, group=None
) -> xr.Dataset:
    """Per (run, W[, group]): signal rank, edge-ratio mean/median/min/max (+ step of the max),
    and how often the edge exceeds the W-aware MP adjacent-ratio noise level 1 + 2W^(-2/3)
    (docs/method.md §4.3: ``n_above_mp``, ``excess_over_mp``)."""
    edge = select(resolve(ds, variable, sv=sv), run=run, window=window, group=group)
    out = signal_rank(ds, variable=rank, run=run, window=window, group=group)
    finite = edge.notnull()
    out["edge_mean"] = edge.mean(STEP)
    out["edge_median"] = edge.median(STEP)
    out["edge_min"] = edge.min(STEP)
    out["edge_max"] = edge.max(STEP)
    out["edge_max_step"] = edge.fillna(-np.inf).idxmax(STEP).where(finite.any(STEP))
    if "window" in edge.dims:
        mp = xr.DataArray(mp_adjacent_ratio(edge["window"].values), dims="window", coords={"window": edge["window"]})
        out["mp_adjacent_ratio"] = mp
        out["n_above_mp"] = (edge > mp).sum(STEP)
        out["excess_over_mp"] = out["edge_mean"] - mp
    for v in ("edge_mean", "edge_median", "edge_min", "edge_max"):
        out[v].attrs.update(units="1", long_name=f"{v.split('_')[1]} of {edge.name} over windows")
    out.attrs["edge_variable"] = str(edge.name) + (f" (sv={sv})" if sv is not None else "")
    return out


# ------------------------------------------------------------------------------------------ null


def window_statistic(sigma: np.ndarray, *, n_params: float, statistic="edge_ratio") -> np.ndarray:
    """The edge statistic of spectra ``sigma`` (..., W), sorted descending.

    ``"edge_ratio"``: max ρ_k over the noise-floor-restricted candidates {k : σ_k ≥ σ_MP}
    (fallback k ≤ ⌊W/2⌋), σ_MP = √n̄ (1 + √(W/P)), n̄ = mean of the bottom-half eigenvalues —
    the engine's default k* rule (result_schema.md, docs/method.md §3.2, §4.2). Taking the *max* over the
    same candidate set in data and null includes the look-elsewhere effect of choosing k*.
    An int k: ρ_k at fixed k (e.g. 2 for r23). ``"pc2"``: 100 λ₂/Σλ (docs/method.md §4.5).
    """
    sigma = np.asarray(sigma, dtype=float)
    W = sigma.shape[-1]
    lam = sigma**2
    if statistic == "pc2":
        return 100.0 * lam[..., 1] / lam.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(sigma[..., 1:] > 0, sigma[..., :-1] / sigma[..., 1:], np.nan)
    if isinstance(statistic, (int, np.integer)) and not isinstance(statistic, bool):
        if not 1 <= statistic < W:
            raise AnalysisError(f"ratio index k={statistic} needs 1 <= k < W={W}")
        return rho[..., statistic - 1]
    if statistic != "edge_ratio":
        raise AnalysisError(f"unknown null statistic {statistic!r} (use 'edge_ratio', 'pc2' or an int k)")
    nbar = lam[..., W // 2 :].mean(axis=-1)
    floor = np.sqrt(nbar) * (1.0 + np.sqrt(W / n_params))
    cand = sigma[..., :-1] >= floor[..., None]
    fallback = np.arange(1, W) <= W // 2
    cand = np.where(cand.any(axis=-1, keepdims=True), cand, fallback)
    return np.nanmax(np.where(cand, rho, -np.inf), axis=-1)


def null_gram(norms: np.ndarray, *, n_params: int, n_null: int, rng: np.random.Generator) -> np.ndarray:
    """``n_null`` Gram matrices of W deltas with the given norms and isotropic random directions.

    Exact for any P ≥ W, simulated in W-space: the Gram of W Gaussian vectors in R^P is
    Wishart(P, I_W), drawn by the Bartlett decomposition A = LLᵀ (L_ii² ~ χ²(P−i), L_ij ~ N(0,1));
    normalising gives the cosines of uniformly random directions. For P ≫ W this is the spec's
    diag(‖δ_i‖²) + N(0, ‖δ_i‖²‖δ_j‖²/P) off-diagonals (docs/method.md §4.5) without the approximation.
    """
    norms = np.asarray(norms, dtype=float)
    W = norms.size
    if n_params < W:
        raise AnalysisError(f"null needs P >= W (P={n_params}, W={W})")
    L = np.tril(rng.standard_normal((n_null, W, W)), k=-1)
    idx = np.arange(W)
    L[:, idx, idx] = np.sqrt(rng.chisquare(float(n_params) - idx, size=(n_null, W)))
    A = L @ np.swapaxes(L, -1, -2)
    d = np.sqrt(np.einsum("bii->bi", A))
    C = A / (d[:, :, None] * d[:, None, :])
    return C * np.outer(norms, norms)


def null_distribution(norms, *, n_params: int, n_null: int = 999, statistic="edge_ratio", rng=None) -> np.ndarray:
    """Null statistic values for one window (see :func:`null_gram`, :func:`window_statistic`)."""
    rng = np.random.default_rng(rng)
    G = null_gram(norms, n_params=n_params, n_null=n_null, rng=rng)
    lam = np.clip(np.linalg.eigvalsh(G)[..., ::-1], 0.0, None)
    return window_statistic(np.sqrt(lam), n_params=n_params, statistic=statistic)


def _n_params_for(ds: xr.Dataset, key: dict, n_params) -> int:
    """P for a series: the ``n_params`` argument, the ``param_count`` coordinate, or the attr."""
    run, grp = key.get("run"), key.get("group")
    if n_params is not None:
        if isinstance(n_params, dict):
            for k in ((run, grp), run, grp):
                if k in n_params:
                    return int(n_params[k])
            raise AnalysisError(f"n_params has no entry for {describe(key)}")
        return int(n_params)
    if "param_count" in ds.variables:  # coordinate (run, group) written by the engine
        v = ds["param_count"].sel({d: key[d] for d in ds["param_count"].dims if d in key})
        if v.ndim == 0 and np.isfinite(float(v)) and float(v) > 0:
            return int(v)
    attr = ds.attrs.get("n_params")
    if attr is not None and (grp is None or grp == "all"):
        attr = json.loads(attr) if isinstance(attr, str) else attr
        if isinstance(attr, dict) and run in attr:
            return int(attr[run])
        if isinstance(attr, (int, float)):
            return int(attr)
    raise AnalysisError(
        f"parameter count P unknown for {describe(key)}: pass n_params= or add the "
        "'param_count(run, group)' coordinate (result_schema.md)"
    )


def edge_null(
    ds: xr.Dataset,
    *,
    statistic="edge_ratio",
    n_null: int = 999,
    q: float = 0.95,
    seed: int | None = 0,
    norms: str = "delta_norm",
    n_params=None,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """Edge significance per window against matched-norm random directions (docs/method.md §4.5).

    Null: the window's W deltas keep their norms ‖δ_i‖ but point in independent uniformly random
    directions of R^P (the companion repos' "random walk, matched step norms"). The statistic is
    recomputed from ``sigma`` with the same rule on data and null (:func:`window_statistic`).
    ``norms="delta_norm"`` uses the ``delta_norm(run, step[, group])`` variable; ``"equal"`` uses
    ‖δ_i‖² = Σσ²/W for every delta (matched total energy only — weaker, but needs nothing extra).
    p = (1 + #{null ≥ obs}) / (n_null + 1): the +1 correction the reference lacks (docs/method.md §15.4).
    Returns ``observed``, ``null_quantile``, ``p_value``, ``significant`` (obs > quantile) on
    (run, W[, group], step), and ``frac_significant`` per series.
    """
    if not 0 < q < 1:
        raise AnalysisError(f"q must be in (0, 1), got {q}")
    if norms not in ("delta_norm", "equal"):
        raise AnalysisError(f"norms must be 'delta_norm' or 'equal', got {norms!r}")
    if "sigma" not in ds.data_vars:
        raise AnalysisError("edge_null needs the 'sigma' variable (result_schema.md)")
    sig = select(ds["sigma"], run=run, window=window, group=group)
    dn = None
    if norms == "delta_norm":
        if "delta_norm" not in ds.data_vars:
            raise AnalysisError(
                "delta_norm not in dataset: the matched-norm null needs "
                "'delta_norm(run, step[, group])' (result_schema.md); "
                "or pass norms='equal' for an equal-norm null"
            )
        dn = ds["delta_norm"]
    rng = np.random.default_rng(seed)
    dims = [d for d in series_dims(sig) if d != "sv"]
    col = Collector(sig, dims)
    steps_all = sig[STEP].values
    for key, s in iter_series(sig, dims):
        W = int(key["window"]) if "window" in key else int(s["sv"].max())
        P = _n_params_for(ds, key, n_params)
        sv = s.sel(sv=slice(1, W)).transpose(STEP, "sv").values.astype(float)
        obs = np.full(steps_all.size, np.nan)
        qv = np.full(steps_all.size, np.nan)
        pv = np.full(steps_all.size, np.nan)
        if dn is not None:
            d = dn.sel({k: v for k, v in key.items() if k in dn.dims})
            dsteps, dvals = d[STEP].values, d.values.astype(float)
            ok = np.isfinite(dvals)
            dsteps, dvals = dsteps[ok], dvals[ok]
            pos = {st: i for i, st in enumerate(dsteps.tolist())}
        for i, st in enumerate(steps_all.tolist()):
            row = sv[i]
            if not np.all(np.isfinite(row)) or row[0] <= 0:
                continue
            if dn is None:
                wn = np.full(W, np.sqrt(np.sum(row**2) / W))
            else:
                j = pos.get(st)
                if j is None or j < W - 1:
                    raise AnalysisError(f"{describe(key, 'delta_norm')}: no {W} delta norms ending at step {st}")
                wn = dvals[j - W + 1 : j + 1]
            obs[i] = window_statistic(row, n_params=P, statistic=statistic)
            null = null_distribution(wn, n_params=P, n_null=n_null, statistic=statistic, rng=rng)
            qv[i] = np.quantile(null, q)
            pv[i] = (1.0 + np.sum(null >= obs[i])) / (n_null + 1.0)
        valid = np.isfinite(obs)
        col.add(
            key, along=(STEP, steps_all), observed=obs, null_quantile=qv, p_value=pv, significant=valid & (obs > qv)
        )
        col.add(
            key,
            frac_significant=float(np.mean(obs[valid] > qv[valid])) if valid.any() else np.nan,
            n_windows=int(valid.sum()),
        )
    out = col.dataset(statistic=str(statistic), n_null=n_null, q=q, norms=norms, seed=-1 if seed is None else seed)
    out["observed"].attrs.update(long_name=f"observed {statistic} (recomputed from sigma)", units="1")
    out["null_quantile"].attrs.update(long_name=f"{q:g} quantile of the matched-norm null", units="1")
    out["p_value"].attrs.update(long_name="null p-value (1 + #null>=obs)/(n_null + 1)", units="1")
    return out


def pc2_summary(
    ds: xr.Dataset,
    *,
    split_half="split_half",
    n_null: int = 999,
    q: float = 0.95,
    seed: int | None = 0,
    norms: str = "delta_norm",
    n_params=None,
    sustain: int = SUSTAIN,
    ddof: int = 0,
    run=None,
    window=None,
    group=None,
) -> xr.Dataset:
    """When does PC2 sink into the noise? The reference's ``pc2_noise_test`` consumers (docs/method.md §4.5).

    Runs :func:`edge_null` with ``statistic="pc2"`` (PC2 = 100 λ₂/Σλ against the matched-norm
    random-direction null) and summarises each (run, W[, group]) series over its valid windows
    (finite observed PC2; windows are the engine's, in step order):

    * ``noise_transition_step``: the *downward* crossing — the first of ``sustain`` consecutive
      windows with PC2 not above the null ``q`` quantile, after PC2 first held above it for
      ``sustain`` windows (``pc2_emerge_step``). The reference took the first window not above the
      null, which on real runs is the first window by construction (PC2 starts below its null);
      here that case is "no transition". ``transition_kind``: 0 = none, PC2 never above its null;
      1 = above -> below (PC2 sank into the noise at ``noise_transition_step``); 2 = none, PC2 stays
      above after emerging. NaN step unless kind 1.
    * ``pc2_cv``: std / mean of ``pc2_pct`` over the valid windows, std with ``ddof`` (0 =
      population std, as the reference's ``np.std``).
    * ``pc2_mean``, ``null_pc2_mean``, ``n_above_null``, ``n_windows``; ``split_half_k2_mean``: mean
      of ``split_half`` at sv=2 over the valid windows where it is finite (needs W ≥ 4).

    Per window (along ``step``): ``pc2_pct``, ``null_pc2``, ``pc2_above_null``, ``split_half_k2`` —
    the fields of the reference's ``pc2_noise_test.json``. ``split_half=None`` skips the split-half
    fields (results written before the engine had ``split_half``).
    """
    if int(sustain) != sustain or sustain < 1:
        raise AnalysisError(f"sustain must be an integer >= 1, got {sustain!r}")
    if ddof not in (0, 1):
        raise AnalysisError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    sh = None if split_half is None else _split_half_k2(ds, str(split_half), run=run, window=window, group=group)
    nul = edge_null(
        ds,
        statistic="pc2",
        n_null=n_null,
        q=q,
        seed=seed,
        norms=norms,
        n_params=n_params,
        run=run,
        window=window,
        group=group,
    )
    obs_all = nul["observed"]
    dims = series_dims(obs_all)
    col = Collector(obs_all, dims)
    steps_all = obs_all[STEP].values
    for key, s in iter_series(obs_all, dims):
        obs = np.asarray(s.values, dtype=float)
        qv = np.asarray(nul["null_quantile"].sel(key).values, dtype=float)
        valid = np.isfinite(obs) & np.isfinite(qv)
        col.add(
            key,
            along=(STEP, steps_all),
            pc2_pct=np.where(valid, obs, np.nan),
            null_pc2=np.where(valid, qv, np.nan),
            pc2_above_null=valid & (obs > qv),
        )
        col.add(key, **_pc2_crossings(obs[valid], qv[valid], steps_all[valid], sustain=sustain, ddof=ddof))
        if sh is not None:
            k2 = np.asarray(
                sh.sel({d: v for d, v in key.items() if d in sh.dims}).reindex({STEP: steps_all}).values, dtype=float
            )
            k2 = np.where(valid, k2, np.nan)
            col.add(key, along=(STEP, steps_all), split_half_k2=k2)
            col.add(key, split_half_k2_mean=float(np.nanmean(k2)) if np.isfinite(k2).any() else np.nan)
    out = col.dataset(
        statistic="pc2",
        n_null=n_null,
        q=q,
        norms=norms,
        seed=-1 if seed is None else seed,
        sustain=int(sustain),
        ddof=int(ddof),
        split_half_variable="" if sh is None else str(split_half),
    )
    for v, (long_name, units) in _pc2_attrs(q, sustain, ddof).items():
        if v in out:
            out[v].attrs.update(long_name=long_name, **({"units": units} if units else {}))
    return out


def _split_half_k2(ds: xr.Dataset, name: str, *, run, window, group) -> xr.DataArray:
    """``split_half`` at sv=2 (the PC2 directions' stability), with errors that say what is missing."""
    if name not in ds.data_vars:
        raise AnalysisError(
            f"{name} not in dataset: the split-half stability needs the engine's "
            "'split_half(run, window[, group], step, sv)' (result_schema.md); "
            "recompute the spectrum, or pass split_half=None to skip it"
        )
    if 2 not in ds[name]["sv"].values:
        raise AnalysisError(f"{name}: sv=2 not in its sv coordinate")
    return select(ds[name].sel(sv=2, drop=True), run=run, window=window, group=group)


def _pc2_crossings(vo: np.ndarray, vq: np.ndarray, vsteps: np.ndarray, *, sustain: int, ddof: int) -> dict:
    """One series' summary over its valid windows: emergence above the null, the downward crossing, CV."""
    emerge = first_sustained(vo > vq, 0, sustain)
    sink = None if emerge is None else first_sustained(~(vo > vq), emerge, sustain)
    if vo.size:
        mean = float(vo.mean())
        cv = float(vo.std(ddof=ddof) / mean) if mean > 0 and vo.size > ddof else np.nan
        qmean = float(vq.mean())
    else:
        mean = cv = qmean = np.nan
    return {
        "noise_transition_step": np.nan if sink is None else float(vsteps[sink]),
        "transition_kind": 0 if emerge is None else (1 if sink is not None else 2),
        "pc2_emerge_step": np.nan if emerge is None else float(vsteps[emerge]),
        "pc2_cv": cv,
        "pc2_mean": mean,
        "null_pc2_mean": qmean,
        "n_above_null": int((vo > vq).sum()),
        "n_windows": int(vo.size),
    }


def _pc2_attrs(q: float, sustain: int, ddof: int) -> dict[str, tuple[str, str | None]]:
    return {
        "pc2_pct": ("PC2 share of the window energy 100 lambda_2 / sum(lambda)", "percent"),
        "null_pc2": (f"{q:g} quantile of PC2 under the matched-norm random-direction null", "percent"),
        "pc2_above_null": (f"pc2_pct > the null {q:g} quantile", None),
        "noise_transition_step": (
            f"first of {sustain} windows with PC2 not above the null {q:g} quantile, "
            "after PC2 held above it (the downward crossing)",
            "steps",
        ),
        "pc2_emerge_step": (f"first of {sustain} windows with PC2 above the null {q:g} quantile", "steps"),
        "transition_kind": ("0 none: PC2 never above its null; 1 above -> below; 2 none: stays above", "1"),
        "pc2_cv": (f"std(pc2_pct, ddof={ddof}) / mean(pc2_pct) over valid windows", "1"),
        "pc2_mean": ("mean pc2_pct over valid windows", "percent"),
        "null_pc2_mean": (f"mean null {q:g} quantile over valid windows", "percent"),
        "n_above_null": ("valid windows with pc2_pct above the null quantile", "1"),
        "n_windows": ("valid windows (finite pc2 and null quantile)", "1"),
        "split_half_k2": ("split-half |cos| of the PC2 directions (split_half at sv=2)", "1"),
        "split_half_k2_mean": ("mean split_half at sv=2 over valid windows (0.5 = 'weak')", "1"),
    }
