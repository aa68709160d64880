"""The report's weight-spectra section: figures, a cross-layer CSV and summary lines.

:func:`sed_dask.report.make_report` calls :func:`weight_section` when ``analysis["weights"]`` holds a
weight-spectra Dataset (and ``analysis["weight_alignment"]`` an alignment Dataset).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sed_dask.weights.figures import (
    alignment_figure,
    alpha_outliers_figure,
    esd_figure,
    esd_snapshot_steps,
    pick_layers,
)
from sed_dask.weights.queries import alignment_summary, escape_steps, layer_table


def weight_section(wds, save, out_dir, *, events=None, alignment=None) -> tuple[list[str], dict[str, Path]]:
    """Save the figures through ``save(name, fig)``; write ``weights_layers.csv`` (and
    ``weights_alignment.csv``) in ``out_dir``; return ``(summary lines, {name: csv path})``."""
    events = events or {}
    runs = [str(r) for r in wds["run"].values]
    run = runs[0]
    ev = events.get(run, {})
    esc = escape_steps(wds)
    notes = []
    for r in runs:
        save(
            f"weights_alpha_outliers_{r}" if len(runs) > 1 else "weights_alpha_outliers",
            alpha_outliers_figure(wds, run=r, events=events.get(r, {})),
        )
    if "esd" in wds:
        e_run = esc[esc["run"] == run]
        first = {
            x.layer: x.escape_step
            for x in e_run.itertuples()
            if x.escape_step is not None and not (isinstance(x.escape_step, float) and math.isnan(x.escape_step))
        }
        save(
            "weights_esd",
            esd_figure(wds, run=run, layers=pick_layers(wds.sel(run=[run])), steps=esd_snapshot_steps(wds, run, first)),
        )
    files = {}
    table = layer_table(wds, run=run)
    p = Path(out_dir) / "weights_layers.csv"
    table.to_csv(p, index=False)
    files["weights_layers"] = p
    for r in runs:
        e = esc[esc["run"] == r]
        done = e[e["escape_step"].notna()]
        grok = events.get(r, {}).get("grok")
        if not len(done):
            notes.append(
                f"Weight spectra ({r}): no layer's outlier count rose above its first-checkpoint value "
                f"for 2 consecutive checkpoints."
            )
            continue
        order = "; ".join(
            f"{x.layer} at {int(x.escape_step)} (σ1/edge {x.sigma1_over_edge_at_escape:.2f})"
            for x in done.head(4).itertuples()
        )
        first = int(done["escape_step"].min())
        rel = (
            ""
            if grok is None or not np.isfinite(grok)
            else f"; first escape {'precedes' if first < grok else 'follows'} grokking ({int(grok)}) "
            f"by {abs(int(grok) - first)} steps"
        )
        notes.append(
            f"Weight spectra ({r}): first outlier escapes (sustained 2 checkpoints): {order}{rel}; "
            f"{len(done)}/{len(e)} layers escape."
        )
    if alignment is not None:
        save("weights_alignment", alignment_figure(alignment, events=ev))
        s = alignment_summary(alignment)
        p = Path(out_dir) / "weights_alignment.csv"
        s.to_csv(p, index=False)
        files["weights_alignment"] = p
        top = s.sort_values("mean_over_chance", ascending=False).head(3)
        notes.append(
            "Update/weight alignment (overlap = mean cos² of principal angles, chance = k/dim): highest "
            + "; ".join(
                f"{x.layer} {x.side} {x.mean_overlap:.2f} ({x.mean_over_chance:.1f}× chance)" for x in top.itertuples()
            )
        )
    notes.append("Weight-spectra definitions: " + "; ".join(f"{k}: {v}" for k, v in _defs(wds).items()))
    return notes, files


def _defs(wds) -> dict:
    import json

    try:
        return json.loads(wds.attrs.get("definitions", "{}"))
    except ValueError:
        return {}
