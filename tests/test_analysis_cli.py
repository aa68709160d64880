"""``ds.sed`` accessor forwarding and the ``sed-dask query`` command on a Zarr results store."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
from synthetic import make_results, plant_lag

import sed_dask  # noqa: F401  (registers ds.sed)
import sed_dask.cli as cli
from sed_dask import analysis as A


@pytest.fixture(scope="module")
def ds():
    d = make_results(groups=("all", "attn", "mlp"), windows=(5, 8), n_deltas=40)
    return plant_lag(d, {5: 2, 8: -1})  # a lag flip between W=5 and W=8


@pytest.fixture(scope="module")
def store(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("res") / "results.zarr"
    with warnings.catch_warnings():  # zarr 3: "consolidated metadata is not in the v3 spec"
        warnings.simplefilter("ignore", UserWarning)
        ds.to_zarr(path, mode="w")
    return str(path)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    # only our subcommand: the others' modules may not exist yet in this checkout
    monkeypatch.setattr(cli, "COMMANDS", ["query"])

    def go(*argv):
        rc = cli.main(["query", *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return go


def test_accessor_forwards_to_functions(ds):
    xr.testing.assert_identical(ds.sed.lag_correlation(lags=range(-2, 3)), A.lag_correlation(ds, lags=range(-2, 3)))
    xr.testing.assert_identical(ds.sed.signal_rank(run="s1"), A.signal_rank(ds, run="s1"))
    xr.testing.assert_identical(ds.sed.collapse_step(tau="auto"), A.collapse_step(ds, tau="auto"))
    xr.testing.assert_identical(ds.sed.granger(n_perm=0, window=5), A.granger(ds, n_perm=0, window=5))
    xr.testing.assert_identical(ds.sed.var("r23"), ds.ratio.sel(sv=2, drop=True).rename("r23"))
    xr.testing.assert_identical(ds.sed.var("edge"), A.resolve(ds, "edge"))  # the fixed-k edge
    assert ds.sed.var("edge").name == "edge" and "edge_k" in ds.sed.var("edge").coords
    xr.testing.assert_identical(ds.sed.var("edge_ratio"), ds.edge_ratio)
    assert "lag_sweep" in dir(ds.sed) and "positive lag" in ds.sed.help("lag_correlation")
    with pytest.raises(AttributeError):
        ds.sed.help("nope")


def test_every_query_on_multi_run_dataset_with_nans_and_groups(ds):
    calls = {
        "signal_rank": {},
        "edge_summary": {},
        "edge_null": {"n_null": 19},
        "phases": {"method": "changepoint"},
        "collapse_step": {"tau": [1.2, 1.3]},
        "lag_correlation": {},
        "lag_sweep": {},
        "sliding_correlation": {"align": "trailing"},
        "phase_correlation": {"method": "threshold", "threshold": 2.0},
        "granger": {"n_perm": 19, "covariate": "lr"},
        "granger_multivariate": {"features": ["edge_ratio", "drift_speed"], "n_perm": 19},
        "pc2_summary": {"n_null": 19, "split_half": None},
        "event_study": {"taus": [1.2, 2.0]},
        "detect_shift": {},
        "onset": {"variable": "drift_speed", "k": 1.2, "floor": None},
        "lead_time": {"variable": "drift_speed", "k": 1.2, "floor": None},
    }
    for name, kw in calls.items():
        out = getattr(ds.sed, name)(**kw)
        dims = set(out.dims)
        assert {"run", "window", "group"} <= dims, name
        assert out.sizes["run"] == 3 and out.sizes["group"] == 3, name
        finite = [v for v in out.data_vars if out[v].dtype.kind == "f" and np.isfinite(out[v]).any()]
        assert finite, name


def test_import_registers_accessor_without_heavy_imports():
    code = (
        "import sys, xarray as xr, sed_dask; xr.Dataset().sed; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'distributed', 'statsmodels'}); "
        "assert not bad, bad; assert 'sed_dask.analysis' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "query,extra,title",
    [
        ("edge", ["--null", "--n-null", "19"], "edge vs matched-norm null (per series)"),
        ("phases", ["--method", "changepoint", "--tau", "auto"], "phases (changepoint)"),
        ("phases", ["--tau", "1.3", "--tau", "1.5"], "collapse step per tau"),
        ("pc2", ["--n-null", "19", "--sustain", "2"], "pc2 vs null (per series)"),
        (
            "events",
            ["--tau", "1.2", "--tau", "2.0", "--baseline", "5"],
            "event study: edge collapse -> val_loss stabilisation",
        ),
        ("lag", ["--sweep", "--sliding", "center", "--phase-method", "peak"], "lag flips"),
        ("granger", ["--n-perm", "19", "--covariate", "lr"], None),
        ("granger", ["--features", "edge_ratio", "k95", "--n-perm", "0"], "multivariate Granger"),
        ("shift", ["--true-step", "4000", "--tolerance", "200"], "shift detection"),
        (
            "warning",
            ["--method", "onset", "--var", "drift_speed", "--k", "1.2", "--floor", "none", "--event", "val_acc"],
            "onset and lead time",
        ),
        ("warning", [], "early-warning alarms (causal)"),
    ],
)
def test_cli_json_every_query(run_cli, store, query, extra, title):
    rc, out, err = run_cli(store, query, "--json", *extra)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["query"] == query
    tables = doc["tables"]
    if title is not None:
        assert title in tables
    for name, rows in tables.items():
        assert rows, name
        assert "group" in rows[0] and ("run" in rows[0] or name.startswith("cross-seed")), name


def test_cli_pc2_with_split_half_and_events_tables(run_cli, ds, tmp_path):
    d = ds.copy()
    d["split_half"] = d.sigma * 0 + 0.5  # a planted split-half value where windows exist
    path = tmp_path / "sh.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        d.to_zarr(path, mode="w")
    rc, out, err = run_cli(str(path), "pc2", "--n-null", "9", "--run", "s1", "--window", "5", "--json")
    assert rc == 0, err
    rows = json.loads(out)["tables"]["pc2 vs null (per series)"]
    assert len(rows) == 3 and all(r["split_half_k2_mean"] == 0.5 for r in rows)
    assert "no split_half" not in err
    rc, out, err = run_cli(str(path), "events", "--run", "s2", "--group", "all")
    assert rc == 0, err
    assert "== event study: edge collapse -> val_loss stabilisation ==" in out and "stab_delay" in out
    assert "not a lead before grokking" in out


def test_cli_tables_selection_and_errors(run_cli, store, tmp_path):
    rc, out, _ = run_cli(store, "lag", "--run", "s2", "--window", "8", "--group", "mlp")
    assert rc == 0
    assert "== peak lag ==" in out and "== r by lag ==" in out
    body = out.split("== r by lag ==")[0]
    assert " s2 " in body and " s1 " not in body and "mlp" in body
    rc, _, err = run_cli(store, "lag", "--var", "nope")
    assert rc == 2 and "unknown variable 'nope'" in err
    rc, _, err = run_cli(store, "warning", "--event", "val_accuracy")
    assert rc == 2 and "val_accuracy not in dataset; attach with" in err
    rc, _, err = run_cli(store, "lag", "--window", "7")
    assert rc == 2 and "W=[7] not in the dataset" in err
    # --metrics attaches a metric the store lacks (exact step match)
    steps = xr.open_zarr(store).step.values
    recs = [{"run": r, "step": int(s), "grad_norm": float(i)} for r in ("s1", "s2", "s3") for i, s in enumerate(steps)]
    (tmp_path / "m.json").write_text(json.dumps(recs))
    rc, out, err = run_cli(
        store, "granger", "--metrics", str(tmp_path / "m.json"), "--target", "grad_norm", "--n-perm", "0", "--json"
    )
    assert rc == 0, err
    assert json.loads(out)["tables"]
