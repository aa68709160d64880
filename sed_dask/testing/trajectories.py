"""Planted-truth trajectories: deltas whose signal rank, strengths, SNR and phases are known.

Every conclusion sed_dask draws (k*, signal count, phases, collapse, warnings) is checked on these
before it is trusted on real runs (docs/method.md, "Validation"). A trajectory is

    delta_i = sum_k g(i) s_k a_ik u_k  +  nu c * z_i,        i = 0 .. n_deltas-1

* ``u_k``: ``rank`` orthonormal directions in R^P (fixed over the run, or replaced by a fresh set at
  ``shift_at`` -- a planted distribution shift);
* ``a_ik ~ N(0, 1)``: independent coefficients, so a window of W deltas has signal rank
  min(W, rank) and signal singular values ~ s_k sqrt(W) (they fluctuate from window to window);
  or ``coefficients="fourier"``: a constant (a drift) and cos/sin pairs at multiples of
  2 pi / snr_window, exactly orthogonal over every window of snr_window deltas, so the signal
  values of those windows are exactly s_k sqrt(W) (a spectrum whose gaps are known);
* ``s_k``: strengths, geometric from ``decay`` x (first/last) down to the weakest, which is set so
  that the weakest signal value of a window of ``snr_window`` deltas is ``snr`` x the noise edge;
* ``g(i)``: the temporal profile -- rise from ``rise_level`` to 1 over ``[0, rise_end)``, plateau,
  collapse to ``collapse_level`` at ``collapse_at``, optional rebound to 1 at ``rebound_at``;
* ``c``: per-coordinate noise scales, all 1 (isotropic) or log-uniform over ``spread`` (two decades by
  default, as Adam's per-coordinate step sizes), normalised to mean(c^2) = 1; ``z_i ~ N(0, I_P)``.

Coordinates are generated in fixed column blocks from a counter-based RNG keyed by (seed, block), so
any column range of any delta is reproducible without the rest: a trajectory of any P is streamed,
never held. The exact truth per window is available: :meth:`PlantedTrajectory.signal_sigma` gives the
singular values of the signal part alone (exact, from the r x r coefficients), :meth:`noise_edge` the
expected top noise singular value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

BLOCK = 1 << 16  # columns per RNG block: part of the trajectory's definition, like a seed


def fourier_coefficients(n: int, rank: int, W: int) -> np.ndarray:
    """(n, rank) columns with squared norm W and zero overlap over every W consecutive rows.

    Column 0 is constant (a drift), then sqrt(2) cos / sqrt(2) sin at 2 pi m i / W, m = 1, 2, ...,
    and an alternating column (-1)^i for even W: complex exponentials over a full period cancel.
    """
    i = np.arange(n, dtype=float)
    cols = [np.ones(n)]
    m = 1
    while len(cols) < rank:
        if 2 * m < W:
            cols.append(math.sqrt(2) * np.cos(2 * math.pi * m * i / W))
            if len(cols) < rank:
                cols.append(math.sqrt(2) * np.sin(2 * math.pi * m * i / W))
        elif 2 * m == W:
            cols.append((-1.0) ** i)
        else:
            raise ValueError(f"at most {W} orthogonal columns over windows of {W}")
        m += 1
    return np.stack(cols[:rank], axis=1)


@dataclass(frozen=True)
class PlantedTrajectory:
    """A planted trajectory (see the module docstring); all indices are delta indices."""

    n_deltas: int = 60
    n_params: int = 10_000
    rank: int = 3
    decay: float = 1.0
    snr: float = 3.0
    snr_window: int = 10
    strengths: tuple[float, ...] | None = None
    coefficients: str = "gaussian"
    noise: str = "isotropic"
    spread: float = 100.0
    rise_end: int = 0
    rise_level: float = 1.0
    collapse_at: int | None = None
    collapse_level: float = 0.0
    rebound_at: int | None = None
    shift_at: int | None = None
    step_spacing: int = 100
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.rank < 0 or self.n_deltas < 2 or self.n_params < max(1, 2 * self.rank):
            raise ValueError(
                f"need rank >= 0, n_deltas >= 2 and n_params >= 2 rank; got rank={self.rank}, "
                f"n_deltas={self.n_deltas}, n_params={self.n_params}"
            )
        if self.noise not in ("isotropic", "anisotropic"):
            raise ValueError(f"noise must be 'isotropic' or 'anisotropic', got {self.noise!r}")
        if self.coefficients not in ("gaussian", "fourier"):
            raise ValueError(f"coefficients must be 'gaussian' or 'fourier', got {self.coefficients!r}")
        if self.coefficients == "fourier" and self.rank > self.snr_window:
            raise ValueError(f"fourier coefficients give at most snr_window={self.snr_window} directions")
        if self.strengths is not None and len(self.strengths) != self.rank:
            raise ValueError(f"strengths has {len(self.strengths)} entries for rank {self.rank}")

    # ------------------------------------------------------------------ definition
    @property
    def steps(self) -> np.ndarray:
        """Checkpoint steps s_0 .. s_N (N = n_deltas); delta i is labelled by s_{i+1}."""
        return np.arange(self.n_deltas + 1, dtype=np.int64) * self.step_spacing

    @property
    def delta_steps(self) -> np.ndarray:
        return self.steps[1:]

    @property
    def n_params_effective(self) -> float:
        """(sum c^2)^2 / sum c^4: the degrees of freedom that set the spread of the noise spectrum."""
        c2 = self._scales() ** 2
        return float(c2.sum() ** 2 / (c2**2).sum())

    def noise_edge(self, W: int) -> float:
        """Expected top singular value of a window's noise alone: sqrt(P) (1 + sqrt(W / P_eff)).

        Isotropic: the Marchenko-Pastur edge sqrt(P) + sqrt(W). Anisotropic noise has the same mean
        energy per delta (mean c^2 = 1) but fewer effective degrees of freedom, so a wider bulk.
        """
        P = self.n_params
        return math.sqrt(P) * (1.0 + math.sqrt(W / self.n_params_effective))

    def strength_values(self) -> np.ndarray:
        """s_1 >= ... >= s_r (see the module docstring)."""
        if self.rank == 0:
            return np.zeros(0)
        if self.strengths is not None:
            return np.asarray(self.strengths, dtype=float)
        weakest = self.snr * self.noise_edge(self.snr_window) / math.sqrt(self.snr_window)
        rel = self.decay ** (np.arange(self.rank - 1, -1, -1) / max(self.rank - 1, 1))
        return weakest * rel

    def profile(self) -> np.ndarray:
        """g(i) for every delta."""
        i = np.arange(self.n_deltas, dtype=float)
        g = np.ones(self.n_deltas)
        if self.rise_end > 0:
            g = np.where(i < self.rise_end, self.rise_level + (1 - self.rise_level) * i / self.rise_end, 1.0)
        if self.collapse_at is not None:
            g = np.where(i >= self.collapse_at, self.collapse_level, g)
        if self.rebound_at is not None:
            g = np.where(i >= self.rebound_at, 1.0, g)
        return g

    def signal_coefficients(self) -> np.ndarray:
        """(n_deltas, rank) signal coefficients g(i) s_k a_ik."""
        if "coef" not in self._cache:
            if self.coefficients == "fourier":
                a = fourier_coefficients(self.n_deltas, self.rank, self.snr_window)
            else:
                rng = np.random.Generator(np.random.Philox(key=[self.seed, 0xC0EF]))
                a = rng.standard_normal((self.n_deltas, self.rank))
            self._cache["coef"] = a * self.strength_values()[None, :] * self.profile()[:, None]
        return self._cache["coef"]

    def _scales(self) -> np.ndarray:
        if "scales" not in self._cache:
            if self.noise == "isotropic":
                c = np.ones(self.n_params)
            else:
                rng = np.random.Generator(np.random.Philox(key=[self.seed, 0x5CA1E]))
                c = self.spread ** rng.uniform(-0.5, 0.5, self.n_params)
                c /= np.sqrt(np.mean(c**2))
            self._cache["scales"] = c
        return self._cache["scales"]

    def _directions(self, which: int) -> np.ndarray:
        """(P, rank) orthonormal signal directions; ``which`` = 1 after a planted shift."""
        key = f"dirs{which}"
        if key not in self._cache:
            rng = np.random.Generator(np.random.Philox(key=[self.seed, 0xD1 + which]))
            if which == 0 or self.shift_at is None:
                q, _ = np.linalg.qr(rng.standard_normal((self.n_params, self.rank)))
            else:  # a fresh set orthogonal to the first: the shift moves the signal elsewhere
                both = np.concatenate([self._directions(0), rng.standard_normal((self.n_params, self.rank))], 1)
                q = np.linalg.qr(both)[0][:, self.rank :]
            self._cache[key] = q
        return self._cache[key]

    # ------------------------------------------------------------------ data
    def deltas(self, rows=None, cols=None) -> np.ndarray:
        """float64 ``(len(rows), len(cols))`` block of the delta matrix (defaults: everything).

        Column ranges are generated block by block from (seed, block), so the same entry has the
        same value whichever range asked for it.
        """
        rows = np.arange(self.n_deltas) if rows is None else np.asarray(rows)
        lo, hi = (0, self.n_params) if cols is None else (int(cols.start or 0), int(cols.stop))
        out = np.empty((rows.size, hi - lo))
        A = self.signal_coefficients()[rows]
        shifted = (rows >= self.shift_at) if self.shift_at is not None else np.zeros(rows.size, bool)
        c = self._scales()
        for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
            b0, b1 = b * BLOCK, min((b + 1) * BLOCK, self.n_params)
            rng = np.random.Generator(np.random.Philox(key=[self.seed, 0x7A0 + b]))
            z = rng.standard_normal((self.n_deltas, b1 - b0))[rows]
            s0, s1 = max(lo, b0), min(hi, b1)
            block = z[:, s0 - b0 : s1 - b0] * c[None, s0:s1]
            if self.rank:
                U0 = self._directions(0)[s0:s1]
                sig = A @ U0.T
                if shifted.any():
                    sig[shifted] = A[shifted] @ self._directions(1)[s0:s1].T
                block += sig
            out[:, s0 - lo : s1 - lo] = block
        return out

    def gram(self, *, block_cols: int = 4 * BLOCK) -> np.ndarray:
        """Exact float64 ``(N, N)`` delta Gram, streamed over column blocks (the test oracle)."""
        if "gram" not in self._cache:
            G = np.zeros((self.n_deltas, self.n_deltas))
            for lo in range(0, self.n_params, block_cols):
                X = self.deltas(cols=slice(lo, min(lo + block_cols, self.n_params)))
                G += X @ X.T
            self._cache["gram"] = G
        return self._cache["gram"]

    def band(self, width: int) -> np.ndarray:
        """``band[i, k] = <delta_i, delta_{i-k}>`` for k < width (NaN where i - k < 0): the engine's layout."""
        G = self.gram()
        N = self.n_deltas
        out = np.full((N, width), np.nan)
        for k in range(min(width, N)):
            i = np.arange(k, N)
            out[i, k] = G[i, i - k]
        return out

    # ------------------------------------------------------------------ truth
    def signal_sigma(self, W: int) -> np.ndarray:
        """``(n_windows, min(W, rank))`` exact singular values of each window's signal part alone.

        With orthonormal u_k the signal block is A_w diag(.) U^T, so its singular values are those
        of the W x r coefficient block (across a shift, of the W x 2r block on both direction sets).
        """
        A = self.signal_coefficients()
        out = []
        for e in range(W - 1, self.n_deltas):
            rows = np.arange(e - W + 1, e + 1)
            blk = A[rows]
            if self.shift_at is not None:
                after = rows >= self.shift_at
                blk = np.concatenate([np.where(after[:, None], 0.0, blk), np.where(after[:, None], blk, 0.0)], 1)
            s = np.linalg.svd(blk, compute_uv=False) if blk.size else np.zeros(0)
            out.append(s[: min(W, self.rank)])
        return np.asarray(out).reshape(self.n_deltas - W + 1, min(W, self.rank))

    def true_rank(self, W: int, *, min_snr: float = 1.0) -> np.ndarray:
        """Per window: signal values whose size exceeds ``min_snr`` x the noise edge."""
        return (self.signal_sigma(W) > min_snr * self.noise_edge(W)).sum(axis=1)

    def truth(self) -> dict:
        """JSON-safe description (parameters, steps of every planted event)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d["strengths"] = None if self.strengths is None else list(self.strengths)
        st = self.delta_steps

        def step(i):
            return None if i is None else int(st[min(i, self.n_deltas - 1)])

        d.update(
            rise_end_step=step(self.rise_end) if self.rise_end else None,
            collapse_step=step(self.collapse_at),
            rebound_step=step(self.rebound_at),
            shift_step=step(self.shift_at),
            strength_values=self.strength_values().tolist(),
            noise_edge_W10=self.noise_edge(10),
        )
        return d

    def val_loss(self, *, lag: int = 0, noise: float = 0.01, seed: int | None = None) -> np.ndarray:
        """A metric at the delta steps that follows the signal profile ``lag`` deltas later
        (lag > 0: the spectrum leads the loss), falling from 2 to 1 as g rises: a planted lead/lag."""
        g = self.profile()
        shifted = np.interp(np.arange(self.n_deltas) - lag, np.arange(self.n_deltas), g)
        rng = np.random.default_rng(self.seed + 17 if seed is None else seed)
        return 2.0 - shifted + noise * rng.standard_normal(self.n_deltas)

    # ------------------------------------------------------------------ files
    def write_checkpoints(
        self, folder, *, theta0_scale: float = 0.0, metrics: dict | None = None, tensors: int = 2
    ) -> Path:
        """θ_0 .. θ_N as real ``ckpt_{step:06d}.pt`` files (float32 state dicts split over ``tensors``
        tensors) plus ``metrics.json`` and ``truth.json``: what a training loop would have left.

        Columns are streamed per block, so memory is O(N x block) plus one checkpoint.
        """
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        P = self.n_params
        theta = np.zeros((self.n_deltas + 1, P), np.float32) if P * (self.n_deltas + 1) <= 50_000_000 else None
        if theta is None:
            raise ValueError("write_checkpoints keeps the trajectory in memory: limit P x N to 5e7")
        for lo in range(0, P, 4 * BLOCK):
            hi = min(lo + 4 * BLOCK, P)
            X = self.deltas(cols=slice(lo, hi))
            theta[1:, lo:hi] = np.cumsum(X, axis=0).astype(np.float32)
        bounds = np.linspace(0, P, tensors + 1).astype(int)
        for i, s in enumerate(self.steps):
            sd = {
                f"layer{j}.weight": torch.from_numpy(theta[i, bounds[j] : bounds[j + 1]].copy()) for j in range(tensors)
            }
            torch.save(sd, folder / f"ckpt_{int(s):06d}.pt")
        if metrics is None:
            metrics = {"step": self.steps.tolist(), "val_loss": [2.0] + self.val_loss().tolist()}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "truth.json").write_text(json.dumps(self.truth()))
        return folder


def planted_results(trajectories: dict, windows=(10,), *, metrics: dict | None = None):
    """The results Dataset the engine would build for planted runs ``{run: PlantedTrajectory}``.

    Uses the engine's own Dataset assembly (``sed_dask.results.spectra.build_dataset``) on the exact float64
    band of each trajectory, so queries see exactly what ``sed_dask.spectrum`` would give for a
    store holding these deltas, without writing one. ``metrics``: ``{run: {"step": [...], name: [...]}}``;
    by default each run gets ``val_loss`` from :meth:`PlantedTrajectory.val_loss` at its delta steps.
    """
    from sed_dask.engine.gram import GramResult
    from sed_dask.results.spectra import build_dataset

    windows = sorted({int(w) for w in windows})
    grams, mets = [], {}
    for run, t in trajectories.items():
        width = max(windows) + 1
        band = t.band(width)[None]
        grams.append(
            GramResult(
                run=run,
                band=band,
                groups=["all"],
                n_params={"all": t.n_params},
                group_desc={"all": "planted"},
                steps=t.steps,
                width=width,
                precision="float64",
                tiling={},
            )
        )
        mets[run] = (metrics or {}).get(run) or {"step": t.delta_steps.tolist(), "val_loss": t.val_loss().tolist()}
    attrs = {
        "sed_dask_version": "planted",
        "windows": windows,
        "runs": list(trajectories),
        "n_params": json.dumps({r: t.n_params for r, t in trajectories.items()}),
        "source_store": "sed_dask.testing.planted_results",
        "precision": "float64",
        "step_normalised": 0,
        "truth": json.dumps({r: t.truth() for r, t in trajectories.items()}),
    }
    return build_dataset(grams, windows, grouped=False, metrics=mets, attrs=attrs)
