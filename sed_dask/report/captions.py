"""What each report figure shows and how to read it: the captions of summary.html and summary.md.

Written for a reader who has not seen the code; numbers (W, τ, thresholds) come from the same
defaults the analysis used, so a caption cannot disagree with the figure.
"""

from __future__ import annotations

from sed_dask.analysis.defaults import ARM, SUSTAIN, tau_value
from sed_dask.analysis.detectors import DEFAULTS as DETECTOR_DEFAULTS


def caption(name: str, *, window: int, grok_acc: float = 0.9) -> tuple[str, str]:
    """``(title, how to read it)`` of figure ``name`` at window length ``window``."""
    tau = tau_value("auto", window)
    d = DETECTOR_DEFAULTS
    texts = {
        "spectrum": (
            "One window's spectrum",
            f"Left: the singular values σ_j of the W = {window} consecutive parameter updates of one window (by "
            "default the one where the edge ratio peaks; the title names it); the dashed line is the Marchenko–Pastur "
            "noise floor (the largest σ pure "
            "noise of this size would give). Right: consecutive ratios ρ_k = σ_k/σ_(k+1); the spectral edge k* is "
            "the largest ratio whose σ_k is above the floor. A tall, isolated bar means a few update directions "
            "carry the signal and the rest is noise; a flat row of bars near 1 means no edge.",
        ),
        "edge_phases": (
            "The spectral edge over training, with its phases",
            f"The edge σ_k/σ_(k+1) at one fixed k per run (the most common k*), for windows of W = {window} updates, "
            f"plotted at each window's centre. The dotted line is the collapse threshold τ = 1 + 2W^(−2/3) = "
            f"{tau:.3f}, the ratio noise alone reaches. Shading marks the phases: rise, plateau (edge near its "
            f"typical high level), collapse (first {SUSTAIN} windows in a row below τ after the edge held ≥ "
            f"{ARM:g} τ) and rebound (back ≥ {ARM:g} τ for {SUSTAIN} windows). Read it as: a high plateau is a "
            "low-dimensional phase of learning; the collapse is where that structure dissolves into noise.",
        ),
        "edge_val_loss": (
            "Edge ratio and validation loss",
            f"The edge ratio at k* (left axis, W = {window}) and the validation loss (right axis) on the same "
            "steps. Look for the edge rising while the loss is still high and falling as the loss drops: the "
            "lag figure measures that ordering.",
        ),
        "lag_flip": (
            "Which moves first: edge or validation loss?",
            "Detrended Pearson correlation r(ℓ) between the edge ratio at step t and the validation loss at "
            "t + ℓ checkpoints, one curve per W. The marked peak is the most negative r. A peak at ℓ > 0 means "
            "the edge leads the loss; at ℓ < 0 the loss leads. A peak on the grid edge is unresolved, and a "
            "sign change between W (a lag flip) counts only when both peaks are resolved and significant.",
        ),
        "early_warning": (
            "Early warning: causal alarms against the grokking step",
            f"The watched edge over training, plotted at each window's newest checkpoint (the moment an alarm "
            f"could be raised while training). Vertical lines: the first alarm of each detector, decided only "
            f"from windows up to that step: below_noise (edge < τ = {tau:.3f} for {SUSTAIN} windows), peak_drop "
            f"(edge < {d['drop']:g} × its running peak for {SUSTAIN} windows) and cusum (a CUSUM of log(peak/edge) "
            f"with drift {d['drift']:g} passes {d['h']:g}); all arm once the edge held ≥ {ARM:g} τ. The broad band "
            f"is the grok step (first validation accuracy ≥ {grok_acc:g}). Lead = grok step − alarm step: "
            "positive is a warning, negative came too late.",
        ),
        "noise_pc2": (
            "Is the second direction signal or noise?",
            "The share of the window's variance on the second principal direction (PC2), against the 95 % "
            "quantile of the same share for random directions of matched norms (dashed). Right axis: the "
            "split-half stability |cos| of PC2 between the two halves of the window. PC2 above its null and "
            "stable is signal; the noise transition is the first time it sinks to the null and stays there.",
        ),
        "warning_signals": (
            "Every early-warning candidate, side by side",
            "Each candidate signal defined before looking at the outcome, with the step it fired. Causal "
            "signals use only the past; those marked [r] are retrospective markers, found after the fact, "
            "and are not warnings. The table below gives each one's lead over grokking.",
        ),
    }
    if name not in texts:
        return name.replace("_", " "), ""
    return texts[name]
