"""``sed-dask demo --quick`` end to end (real training, real LocalCluster), and ``sed-dask report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from sed_dask.report.summary import FIGURES, SIGNALS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The CLI in a subprocess: what a user types, with its own LocalCluster and training pool."""
    out = tmp_path_factory.mktemp("demo") / "sed-demo"
    t0 = time.perf_counter()
    cli = "import sys; from sed_dask.cli import main; sys.exit(main())"  # = the sed-dask script
    proc = subprocess.run(
        [sys.executable, "-c", cli, "demo", "--quick", "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout, time.perf_counter() - t0


def _none_or(v):
    v = float(v)
    return None if not np.isfinite(v) else (int(v) if v.is_integer() else v)


def _png_ok(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_demo_quick_end_to_end(quick_demo):
    out, stdout, wall = quick_demo
    rep = out / "report"
    for name in (*FIGURES, "warning_signals", "noise_pc2"):
        _png_ok(rep / f"{name}.png")
    for name in ("summary.html", "summary.md"):
        assert "Early-warning candidates" in (rep / name).read_text(), name
    assert list(pd.read_csv(rep / "findings.csv", index_col="run").index) == ["seed0"]
    assert "Dask dashboard: http" in stdout and "seed0: k* = " in stdout and "causal alarms:" in stdout

    ds = xr.open_zarr(out / "results.zarr").load()
    assert list(ds["run"].values) == ["seed0"] and list(ds["window"].values) == [5, 10, 15]
    assert {"val_acc", "val_loss", "train_acc"} <= set(ds.data_vars)
    for W in (5, 10, 15):
        k = ds["k_star"].sel(run="seed0", window=W)
        ok = np.isfinite(k.values)
        assert ok.sum() == ds.sizes["step"] - W + 1  # every full window has a k*
        assert np.all((k.values[ok] >= 1) & (k.values[ok] <= W - 1))
        sig = ds["sigma"].sel(run="seed0", window=W, sv=slice(1, W)).values[ok]
        assert np.isfinite(sig).all() and (sig >= 0).all()
        assert (np.diff(sig, axis=1) <= 1e-6 * sig[:, :1]).all()  # σ_1 ≥ … ≥ σ_W
        e = ds["edge_ratio"].sel(run="seed0", window=W).values[ok]
        assert (e >= 1).all() and np.isfinite(e).all()

    f = json.loads((out / "findings.json").read_text())
    # the grok step, recomputed from the training metrics the recorder wrote
    recs = json.loads((out / "checkpoints" / "seed0" / "metrics.json").read_text())
    recs = recs["records"] if isinstance(recs, dict) and "records" in recs else recs
    grok = min(r["step"] for r in recs if r["val_acc"] >= 0.9)
    r0 = f["runs"]["seed0"]
    assert r0["grok_step"] == grok and 0 < grok <= 700
    assert 1 <= r0["k_star_mode"] <= f["window"] - 1
    # phases found and ordered; they are the analysis' own (fixed-k edge, window-centre steps)
    from sed_dask.analysis import phases

    ph = phases(ds).sel(run="seed0", window=f["window"])
    assert r0["peak_step"] == float(ph.peak_step) and r0["collapse_step"] == _none_or(ph.collapse_step)
    assert r0["plateau_start_step"] <= r0["peak_step"] <= r0["collapse_start_step"]
    assert set(r0["alarms"]) == {"below_noise", "peak_drop", "cusum"}
    assert "definitions" in f and any("k*" in d for d in f["definitions"]) and "dashboard" not in f
    # every declared warning candidate is reported for every W, with lead = grok − step
    assert set(r0["warning"]) == set(SIGNALS)
    for name, per_w in r0["warning"].items():
        assert set(per_w) == {"5", "10", "15"}
        for v in per_w.values():
            assert (v["step"] is None) == (v["lead"] is None)
            if v["step"] is not None:
                assert v["lead"] == grok - v["step"]
    assert r0["warning"]["edge_peak"]["10"]["step"] == r0["peak_step"]
    assert set(f["lag"]["per_run"]["seed0"]) == {"5", "10", "15"}
    sig = pd.read_csv(out / "report" / "warning_signals.csv")
    assert len(sig) == len(SIGNALS) * 3

    # a re-run reuses training and ingestion: much faster, same findings
    t0 = time.perf_counter()
    from sed_dask.demo.pipeline import run_demo

    again = run_demo(out, quick=True, progress=False)
    assert time.perf_counter() - t0 < 0.8 * wall
    assert json.loads(json.dumps(again["findings_data"]["runs"])) == f["runs"]  # JSON keys are strings


def test_report_cli_on_demo_results(quick_demo, tmp_path, capsys):
    from sed_dask.cli import main

    out, _, _ = quick_demo
    dest = tmp_path / "rep"
    assert main(["report", str(out / "results.zarr"), "-o", str(dest), "--window", "5"]) == 0
    for name in (*FIGURES, "warning_signals", "noise_pc2"):
        _png_ok(dest / f"{name}.png")
    df = pd.read_csv(dest / "findings.csv", index_col="run")
    ds = xr.open_zarr(out / "results.zarr")
    assert df.loc["seed0", "window"] == 5
    from sed_dask.analysis import phases

    assert df.loc["seed0", "peak_step"] == float(phases(ds.load(), window=5).peak_step.sel(run="seed0", window=5))
    assert "Early-warning candidates" in (dest / "summary.md").read_text()
    assert main(["report", str(out / "results.zarr"), "-o", str(dest), "--window", "7", "--overwrite"]) == 2
    assert "not in the results" in capsys.readouterr().err
