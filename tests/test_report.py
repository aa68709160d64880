"""Report figures and tables from schema Datasets (synthetic, with real window spectra)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from synthetic_results import grokking_results

from sed_dask.report import figures
from sed_dask.report.summary import FIGURES, lag_correlation_simple, make_report, phase_intervals


@pytest.fixture(scope="module")
def synth():
    return grokking_results()


def _png_ok(path, min_px=400):
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_px
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_report_from_dataset_alone(synth, tmp_path):
    ds, truth = synth
    out = make_report(ds, tmp_path)
    assert set(out) == set(FIGURES) | {"html", "markdown", "findings"}
    for name in FIGURES:
        assert out[name] == tmp_path / f"{name}.png"
        _png_ok(out[name])
    df = pd.read_csv(out["findings"], index_col="run")
    assert list(df.index) == ["seed0", "seed1", "seed2"]
    for r in df.index:  # grok step derived from val_acc >= 0.9
        assert df.loc[r, "grok_step"] == truth[r]["grok"]
        e = ds.edge_ratio.sel(run=r, window=10)
        assert df.loc[r, "peak_edge"] == pytest.approx(float(e.max()))
        assert df.loc[r, "peak_step"] == int(e.idxmax())
    assert set(df["k_star"]) == {2}  # the planted signal rank
    assert "collapse_step" not in df.columns  # nothing was given: no invented analysis
    r = lag_correlation_simple(ds, runs=list(df.index), windows=[10])
    for run in df.index:  # peak lag of the fallback r, argmin rule
        assert df.loc[run, "peak_lag"] == int(r.lag[int(np.nanargmin(r.sel(run=run, window=10).values))])
    md = out["markdown"].read_text()
    assert "| run | W | k* (mode) | peak edge |" in md and "fallback" in md
    html = out["html"].read_text()
    assert html.count("<img ") == len(FIGURES) and "<table>" in html


def test_report_with_analysis_inputs(synth, tmp_path):
    ds, truth = synth
    runs = ["seed0", "seed2"]
    phases = pd.DataFrame(
        [
            {"run": r, "phase": p, "start": s0, "end": s1}
            for r in runs
            for p, s0, s1 in (("rise", 400, 800), ("plateau", 800, 1200), ("collapse", 1200, 2400))
        ]
    )
    onset = {r: truth[r]["collapse"] - 100 for r in runs}
    lag = xr.DataArray(
        np.tile(np.linspace(-0.5, 0.5, 7), (2, 1)),
        dims=("window", "lag"),
        coords={"window": [5, 10], "lag": np.arange(-3, 4)},
    )
    events = pd.DataFrame({"grok": [1500, 1900]}, index=runs)
    out = make_report(
        ds,
        tmp_path,
        runs=runs,
        windows=[5, 10],
        events=events,
        analysis={
            "phases": phases,
            "warning": onset,
            "lag": lag,
            "collapse": {r: truth[r]["collapse"] for r in runs},
            "window": 5,
        },
    )
    df = pd.read_csv(out["findings"], index_col="run")
    assert list(df.index) == runs and set(df["window"]) == {5}
    assert df.loc["seed0", "grok_step"] == 1500 and df.loc["seed2", "grok_step"] == 1900
    assert df.loc["seed2", "alarm_step"] == onset["seed2"]
    assert df.loc["seed2", "lead"] == 1900 - onset["seed2"]
    assert df.loc["seed0", "collapse_step"] == truth["seed0"]["collapse"]
    assert set(df["peak_lag"]) == {-3}  # argmin of the given r(lag) = linspace(-.5, .5)
    assert "fallback" not in out["markdown"].read_text()
    for name in FIGURES:
        _png_ok(out[name])


def test_spectrum_figure_marks_edge_and_floor(synth):
    ds, _ = synth
    step = int(ds.edge_ratio.sel(run="seed1", window=10).idxmax())
    fig = figures.spectrum_figure(ds, run="seed1", step=step, window=10)
    a1, a2 = fig.axes[:2]
    sig = ds.sigma.sel(run="seed1", window=10, step=step).values[:10]
    floor = float(ds.noise_floor.sel(run="seed1", window=10, step=step))
    ks = int(ds.k_star.sel(run="seed1", window=10, step=step))
    assert a1.get_yscale() == ("log" if sig.max() / sig.min() > 20 else "linear")
    assert any(abs(line.get_ydata()[0] - floor) < 1e-12 for line in a1.get_lines())  # floor line
    bars = a2.patches[:9]
    hatched = [bool(b.get_hatch()) for b in bars]
    assert hatched == list(sig[1:] < floor)  # greyed exactly where σ_{k+1} is below the floor
    assert bars[ks - 1].get_facecolor()[:3] == pytest.approx(
        tuple(int(figures.C_ONSET[i : i + 2], 16) / 255 for i in (1, 3, 5))
    )
    assert f"= {ks}" in a2.texts[0].get_text()


def test_phases_from_the_analysis_functions(synth):
    from sed_dask.analysis import collapse_step, phases

    ds, _ = synth
    ph = phases(ds, window=10)
    st = ds.step.values[np.isfinite(ds.edge_ratio.sel(run="seed0", window=10).values)]
    iv = phase_intervals(ph, "seed0", 10, st)
    a = float(ph.plateau_start_step.sel(run="seed0", window=10))
    b = float(ph.collapse_start_step.sel(run="seed0", window=10))
    r = float(ph.rebound_step.sel(run="seed0", window=10))
    if np.isfinite(r):  # a rebound after the collapse is its own phase, not more collapse (issue 12)
        assert iv == [("rise", st[0], a), ("plateau", a, b), ("collapse", b, r), ("rebound", r, st[-1])]
    else:
        assert iv == [("rise", st[0], a), ("plateau", a, b), ("collapse", b, st[-1])]
    col = collapse_step(ds, window=10, tau=1.5)
    fig = figures.edge_phases_figure(
        ds, runs=["seed0", "seed1"], window=10, phases=ph, events={"seed0": {"grok": 1500.0}}, collapse=col
    )
    ax0 = fig.axes[0]
    spans = [p for p in ax0.patches if p.get_label().endswith("phase")]
    assert [p.get_label() for p in spans] == [f"{n} phase" for n, _, _ in iv]
    vlines = {
        line.get_label(): line.get_xdata()[0]
        for line in ax0.get_lines()
        if line.get_label().endswith("step")
        or "grok" in line.get_label()
        or line.get_label().startswith("collapse step")
    }
    assert vlines["grok step (val acc ≥ 0.9)"] == 1500.0
    c = float(ph.collapse_step.sel(run="seed0", window=10))  # the figure marks the phases' own collapse
    assert np.isfinite(c) and vlines["collapse step (edge < tau, 2 windows)"] == c


def test_fallback_lag_finds_planted_leads():
    """edge(W)[t] = −e[t + L_W] with val_loss = trend + e: peak (argmin r) lag = L_W."""
    rng = np.random.default_rng(5)
    n = 60
    steps = 100 * np.arange(1, n + 1)
    e = rng.standard_normal(n + 10)
    leads = {5: -1, 10: 2}
    t = steps / steps[-1]
    val = 3 * np.exp(-3 * t) + 0.3 * e[5 : 5 + n]
    edge = np.stack([1.5 - 0.1 * e[5 + L + np.arange(n)] for L in leads.values()])
    ds = xr.Dataset(
        {"edge_ratio": (("run", "window", "step"), edge[None]), "val_loss": (("run", "step"), val[None])},
        coords={"run": ["a"], "window": list(leads), "step": steps},
    )
    r = lag_correlation_simple(ds, runs=["a"], windows=list(leads), lags=range(-3, 4))
    for W, L in leads.items():
        y = r.sel(run="a", window=W)
        assert int(y.lag[int(np.argmin(y.values))]) == L
        assert float(y.min()) < -0.9


def test_group_dim_lazy_data_and_errors(synth, tmp_path):
    ds, _ = synth
    noisy = ds.copy()
    for v in ("sigma", "ratio", "k_star", "edge_ratio", "noise_floor"):
        noisy[v] = noisy[v] * 0 + 1.0
    per_sv = {"sigma", "ratio", "pc_frac"}
    grouped = xr.concat(
        [noisy, ds],
        dim=xr.DataArray(["attn", "all"], dims="group", name="group"),
        data_vars=[v for v in ds.data_vars if v not in ("val_loss", "val_acc", "train_acc")],
    )
    assert "group" in grouped["sigma"].dims and per_sv <= set(grouped.data_vars)
    out = make_report(grouped.chunk({"step": 20}), tmp_path / "g", runs=["seed1"], windows=[10])
    df = pd.read_csv(out["findings"], index_col="run")
    assert df.loc["seed1", "peak_edge"] == pytest.approx(float(ds.edge_ratio.sel(run="seed1", window=10).max()))
    no_loss = make_report(ds.drop_vars(["val_loss"]), tmp_path / "n", runs=["seed0"])
    assert "edge_val_loss" not in no_loss and "lag_flip" not in no_loss and "early_warning" in no_loss
    assert "No val_loss" in no_loss["markdown"].read_text()
    with pytest.raises(ValueError, match="lacks"):
        make_report(ds.drop_vars("noise_floor"), tmp_path / "x")
    with pytest.raises(ValueError, match="not in the Dataset"):
        make_report(ds, tmp_path / "y", runs=["nope"])
    with pytest.raises(ValueError, match="windows"):
        make_report(ds, tmp_path / "z", windows=[7])


def test_summary_reads_without_the_code(synth, tmp_path):
    """Every figure has a caption that says how to read it; the summary gives the definitions,
    thresholds, versions, the command and where the data is; nothing points at a dead link."""
    import html as _html
    import importlib.metadata
    import re

    from sed_dask.analysis.defaults import tau_value
    from sed_dask.report.captions import caption

    ds, _ = synth
    ds = ds.assign_attrs(source_store=str(tmp_path / "gone.zarr"))
    out = make_report(ds, tmp_path / "rep", command="sed-dask report results.zarr -o rep")
    page = _html.unescape(out["html"].read_text())
    md = out["markdown"].read_text()
    for name in FIGURES:
        title, text = caption(name, window=10)
        assert len(text) > 150 and title != name.replace("_", " ")
        assert title in page and text in page and title in md and text in md
        assert re.search(rf'<figure id="{name}"><img src="{name}.png"', page)
    assert f"{tau_value('auto', 10):.3f}" in caption("edge_phases", window=10)[1]
    for needle in (
        "Definitions and thresholds",
        "How this report was made",
        "sed-dask report results.zarr -o rep",
        f"numpy {importlib.metadata.version('numpy')}",
        f"xarray {importlib.metadata.version('xarray')}",
        "gone.zarr (no longer there)",
        "collapse threshold tau",
        "cusum (drift 0.5, h 1)",
    ):
        assert needle in page and needle in md, needle
    assert not re.search(r"https?://(127\.0\.0\.1|localhost)", page + md)  # no dashboard links
    assert "Across seeds:" not in page  # this Dataset names no seeds
    seeded = ds.assign_coords(seed=("run", [0, 1, 2]))
    page = make_report(seeded, tmp_path / "rep2")["html"].read_text()
    m = re.search(r"Across seeds: peak edge: ([\d.]+) ± ([\d.]+) \(mean ± sample std over 3 seeds\)", page)
    peaks = ds.edge_ratio.sel(window=10).max("step").values
    assert m and float(m.group(1)) == pytest.approx(peaks.mean(), abs=1e-3)
    assert float(m.group(2)) == pytest.approx(peaks.std(ddof=1), abs=1e-3)
