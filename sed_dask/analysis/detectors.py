"""Causal early-warning detectors on the edge: decided at step t from windows up to t only.

Retrospective markers (the global peak, the collapse step of ``collapse_step``) need the whole run;
an alarm must be raisable while the run trains. :class:`EdgeWatch` consumes one window at a time
(its ratios sigma_j / sigma_(j+1) and its k*) and returns the alarms that window raises, so the
batch query (:func:`sed_dask.analysis.early_warning`) and a live watcher run the same code.

The watched series is the edge at a fixed k. Until the detector is *armed*, k is the running mode
of k* (ties -> smallest); the detector arms when that series
holds >= ``arm`` x tau for ``sustain`` windows (the emergence of phases.episode),
and k is frozen from then on (a collapse must not be hidden by
k* moving to another ratio). Detectors, all one-sided (a fall):

* ``below_noise``: the edge is below tau (the noise-level ratio) for ``sustain`` windows;
* ``peak_drop``: the edge is below (1 - ``drop``) x its running peak for ``sustain`` windows;
* ``cusum``: S_t = max(0, S_(t-1) + log(peak_t / x_t) - ``drift``) exceeds ``h`` (sustained
  falls accumulate, single dips below the drift do not).

After an alarm a detector re-arms when the edge holds above ``arm`` x tau again (a rebound), so a
second collapse raises a second alarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sed_dask.analysis.defaults import DEFAULT_TAU, SUSTAIN, describe_tau, tau_value
from sed_dask.errors import AnalysisError

DETECTORS = ("below_noise", "peak_drop", "cusum")
# chosen on planted collapses and no-collapse controls (benchmarks/README.md "Fidelity"): drift 0.2 / h 1.5
# gave CUSUM false alarms on 90 % (W=10) and 68 % (W=20) of planted plateaus, drift 0.5 / h 1.0 on 45 % / 0 %
DEFAULTS = {"drop": 0.5, "drift": 0.5, "h": 1.0, "arm": 1.25, "sustain": SUSTAIN, "min_windows": 3}


@dataclass(frozen=True)
class Alert:
    """One alarm: the step it was decided at, the detector, the value and the threshold it crossed."""

    step: int
    detector: str
    value: float
    threshold: float
    k: int
    peak: float

    def as_dict(self) -> dict:
        return {
            "step": int(self.step),
            "detector": self.detector,
            "value": float(self.value),
            "threshold": float(self.threshold),
            "k": int(self.k),
            "peak": float(self.peak),
        }


def describe_detectors(*, window, tau=DEFAULT_TAU, **params) -> dict[str, str]:
    """One line per detector with its thresholds at this W (printed with every result)."""
    p = {**DEFAULTS, **params}
    t = describe_tau(tau, window)
    arm = f"armed once the edge held >= {p['arm']:g} x tau for {p['sustain']} windows"
    return {
        "below_noise": f"edge < tau for {p['sustain']} windows ({t}); {arm}",
        "peak_drop": f"edge < {1 - p['drop']:g} x running peak for {p['sustain']} windows; {arm}",
        "cusum": f"CUSUM of log(peak / edge) - {p['drift']:g} exceeds {p['h']:g}; {arm}",
    }


@dataclass
class EdgeWatch:
    """Streaming detectors for one (run, W[, group]) series. Feed windows in step order."""

    window: int
    tau: object = DEFAULT_TAU
    detectors: tuple = DETECTORS
    drop: float = DEFAULTS["drop"]
    drift: float = DEFAULTS["drift"]
    h: float = DEFAULTS["h"]
    arm: float = DEFAULTS["arm"]
    sustain: int = DEFAULTS["sustain"]
    min_windows: int = DEFAULTS["min_windows"]
    _n: int = 0
    _kcount: dict = field(default_factory=dict, repr=False)
    k: int | None = None
    frozen: bool = False
    _state: dict = field(default_factory=dict, repr=False)
    _above: int = 0

    def __post_init__(self):
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown:
            raise AnalysisError(f"unknown detector(s) {unknown}; choose from {DETECTORS}")
        if not 0 < self.drop < 1:
            raise AnalysisError(f"drop must be in (0, 1), got {self.drop}")
        if self.h <= 0 or self.drift < 0 or self.arm < 1 or self.sustain < 1 or self.min_windows < 1:
            raise AnalysisError("need h > 0, drift >= 0, arm >= 1, sustain >= 1, min_windows >= 1")
        self.threshold = tau_value(self.tau, self.window)
        self._state = {d: {"armed": False, "run": 0, "S": 0.0, "peak": -math.inf} for d in self.detectors}

    # -------------------------------------------------------------- series bookkeeping
    def _edge(self, ratios: np.ndarray) -> float:
        return float(ratios[self.k - 1]) if self.k is not None and self.k - 1 < ratios.size else math.nan

    def _running_mode(self) -> int | None:
        if not self._kcount:
            return None
        best = max(self._kcount.values())
        return min(k for k, c in self._kcount.items() if c == best)

    def update(self, step: int, ratios, k_star) -> list[Alert]:
        """Take the window ending at ``step``; return the alarms it raises (often none)."""
        ratios = np.asarray(ratios, dtype=float)
        self._n += 1
        if k_star is not None and np.isfinite(k_star):
            self._kcount[int(k_star)] = self._kcount.get(int(k_star), 0) + 1
        if not self.frozen:
            self.k = self._running_mode()
        x = self._edge(ratios)
        if not np.isfinite(x) or x <= 0:
            return []
        if self._n < self.min_windows:
            return []
        level = self.arm * self.threshold
        self._above = self._above + 1 if x >= level else 0  # arming needs `sustain` windows, as phases
        if not self.frozen and self._above >= self.sustain:
            self.frozen = True
        alerts = []
        for d, st in self._state.items():
            if not st["armed"]:
                if self.frozen and self._above >= self.sustain:  # armed first, or re-armed by a rebound
                    st.update(armed=True, run=0, S=0.0, peak=x)
                continue
            st["peak"] = max(st["peak"], x)
            if d == "cusum":
                st["S"] = max(0.0, st["S"] + math.log(st["peak"] / x) - self.drift)
                hit, thr, value = st["S"] > self.h, self.h, st["S"]
            else:
                thr = self.threshold if d == "below_noise" else (1.0 - self.drop) * st["peak"]
                st["run"] = st["run"] + 1 if x < thr else 0
                hit, value = st["run"] >= self.sustain, x
            if hit:
                alerts.append(Alert(int(step), d, float(value), float(thr), int(self.k), float(st["peak"])))
                st.update(armed=False, run=0, S=0.0)
        return alerts
