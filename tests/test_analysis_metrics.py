"""Attaching metrics from DataFrames, dicts, JSON and CSV with explicit step alignment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import make_results

from sed_dask.analysis import attach_metrics, lag_correlation
from sed_dask.errors import AnalysisError


@pytest.fixture(scope="module")
def bare():
    return make_results(runs=("a", "b"), windows=(5,), n_deltas=20, lacking={}).drop_vars(["val_loss", "val_acc", "lr"])


def test_exact_alignment_from_dataframe(bare):
    steps = bare.step.values
    df = pd.DataFrame(
        {
            "run": ["a"] * 10 + ["b"] * 10,
            "step": np.concatenate([steps[::2], steps[1::2]]),
            "val_loss": np.arange(20.0),
            "note": ["x"] * 20,
        }
    )
    out = attach_metrics(bare, df)
    vl = out.val_loss
    assert vl.dims == ("run", "step") and "note" not in out
    assert vl.attrs["align"] == "exact" and vl.attrs["sed_role"] == "metric"
    np.testing.assert_array_equal(vl.sel(run="a").values[::2], np.arange(10.0))
    assert np.isnan(vl.sel(run="a").values[1::2]).all()
    np.testing.assert_array_equal(vl.sel(run="b").values[1::2], np.arange(10.0, 20.0))
    assert "val_loss" not in bare  # input left untouched


def test_nearest_alignment_with_tolerance(bare):
    steps = bare.step.values
    recs = [{"step": int(s) + 10, "val_acc": float(i)} for i, s in enumerate(steps)]
    near = attach_metrics(bare, {"a": recs}, align="nearest", tolerance=50)
    np.testing.assert_array_equal(near.val_acc.sel(run="a").values, np.arange(steps.size, dtype=float))
    assert np.isnan(near.val_acc.sel(run="b")).all()
    assert near.val_acc.attrs["align"] == "nearest" and near.val_acc.attrs["tolerance"] == 50.0
    tight = attach_metrics(bare, {"a": recs}, align="nearest", tolerance=5)
    assert np.isnan(tight.val_acc).all()
    exact = attach_metrics(bare, {"a": recs})
    assert np.isnan(exact.val_acc).all()
    with pytest.raises(AnalysisError, match="tolerance"):
        attach_metrics(bare, {"a": recs}, align="nearest")


def test_files_json_and_csv(tmp_path, bare):
    steps = bare.step.values
    recs = [{"step": int(s), "val_loss": 5.0 - i * 0.1, "lr": 1e-3} for i, s in enumerate(steps)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    cols = {"step": [int(s) for s in steps], "val_loss": [1.0] * steps.size}
    (tmp_path / "b.json").write_text(json.dumps(cols))
    out = attach_metrics(bare, {"a": tmp_path / "a.json", "b": str(tmp_path / "b.json")})
    assert out.val_loss.sel(run="a").values[3] == pytest.approx(4.7)
    assert (out.val_loss.sel(run="b") == 1.0).all()
    assert np.isnan(out.lr.sel(run="b")).all()
    pd.DataFrame({"run": "b", "global_step": steps, "val_acc": 0.5}).to_csv(tmp_path / "m.csv", index=False)
    csv = attach_metrics(out, tmp_path / "m.csv")
    assert (csv.val_acc.sel(run="b") == 0.5).all() and csv.val_acc.attrs["source"].endswith("m.csv")
    nested = {str(int(s)): {"val_loss": 2.0} for s in steps}  # {step: {metric: value}}
    single = bare.sel(run=["a"])
    assert (attach_metrics(single, nested).val_loss == 2.0).all()
    (tmp_path / "pilot.json").write_text(json.dumps({"config": {"lr": 1}, "metrics": recs}))
    assert attach_metrics(single, tmp_path / "pilot.json").val_loss.notnull().all()
    with pytest.raises(FileNotFoundError):
        attach_metrics(single, tmp_path / "nope.json")


def test_existing_values_are_kept_unless_overwrite(bare):
    steps = bare.step.values
    first = attach_metrics(bare, {"a": {"step": list(steps[:5]), "val_loss": [1.0] * 5}})
    second = attach_metrics(first, {"a": {"step": list(steps), "val_loss": [9.0] * steps.size}})
    v = second.val_loss.sel(run="a").values
    assert (v[:5] == 1.0).all() and (v[5:] == 9.0).all()  # NaNs filled, values kept
    third = attach_metrics(first, {"a": {"step": list(steps), "val_loss": [9.0] * steps.size}}, overwrite=True)
    assert (third.val_loss.sel(run="a") == 9.0).all()


def test_errors_and_use_in_queries(bare):
    steps = bare.step.values
    with pytest.raises(AnalysisError, match=r"run\(s\) \['zz'\] not in the dataset"):
        attach_metrics(bare, pd.DataFrame({"run": "zz", "step": steps, "val_loss": 1.0}))
    with pytest.raises(AnalysisError, match="no run column"):
        attach_metrics(bare, pd.DataFrame({"step": steps, "val_loss": 1.0}))
    with pytest.raises(ValueError, match="no step field"):  # MetricsError (metrics_io)
        attach_metrics(bare, pd.DataFrame({"run": "a", "val_loss": [1.0]}))
    with pytest.raises(AnalysisError, match=r"metric\(s\) \['val_acc'\] not found"):
        attach_metrics(bare, pd.DataFrame({"run": "a", "step": steps, "val_loss": 1.0}), names="val_acc")
    with pytest.raises(AnalysisError, match="val_loss not in dataset"):
        lag_correlation(bare)
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "run": np.repeat(["a", "b"], steps.size),
            "step": np.tile(steps, 2),
            "val_loss": rng.standard_normal(2 * steps.size),
        }
    )
    out = lag_correlation(attach_metrics(bare, df), lags=range(-2, 3), detrend="linear")
    assert out.r.dims == ("run", "window", "lag")
