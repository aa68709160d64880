"""Seeds as users name them: ``ingest --seed`` or the run name (``seed3``) gives the ``seed``
coordinate on ``run``, recorded in the store and carried into results, so ``ds.where(ds.seed == 3)``
and mean ± std over seeds work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from models import make_trajectory, write_pt

import sed_dask
from sed_dask.analysis import cross_seed_summary
from sed_dask.errors import AnalysisError, StoreError
from sed_dask.sources.run_source import seed_from_name
from sed_dask.store.outputs import open_results
from sed_dask.store.trajectory import open_store

RUNS = {"seed0": None, "seed_1": None, "lr3e-4": 7, "baseline": None}


@pytest.mark.parametrize(
    "name,seed",
    [
        ("seed3", 3),
        ("run-seed_12", 12),
        ("lr1e-3_seed=4", 4),
        ("SEED7", 7),
        ("s3", None),
        ("reseed", None),
        ("seeds", None),
        ("baseline", None),
    ],
)
def test_seed_from_name(name, seed):
    assert seed_from_name(name) == seed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    for i, (run, seed) in enumerate(RUNS.items()):
        ck = write_pt(make_trajectory(5, seed=i), d / f"ck_{run}")
        sed_dask.ingest(ck, d / "s.zarr", run, scheduler="threads", progress=False, seed=seed)
    return d / "s.zarr"


def test_seed_is_recorded_with_the_run(store):
    ts = open_store(store, mode="r")
    assert {r: ts.run(r).attrs.get("seed") for r in ts.runs} == {"seed0": 0, "seed_1": 1, "lr3e-4": 7, "baseline": None}


def test_results_carry_the_seed_coordinate_through_zarr(store, tmp_path):
    out = tmp_path / "res.zarr"
    ds = sed_dask.spectrum(store, windows=(2,), scheduler="threads", progress=False, output=out)
    want = {"seed0": 0, "seed_1": 1, "lr3e-4": 7, "baseline": -1}
    for got in (ds, open_results(out)):
        assert got["seed"].dims == ("run",) and got["seed"].dtype == np.int64
        assert dict(zip(got["run"].values.tolist(), got["seed"].values.tolist())) == want
        three = got.where(got.seed == 7, drop=True)
        assert three["run"].values.tolist() == ["lr3e-4"]
        np.testing.assert_array_equal(three["edge_ratio"].values, got["edge_ratio"].sel(run=["lr3e-4"]).values)


def test_a_run_keeps_its_seed(store, tmp_path):
    ck = write_pt(make_trajectory(6, seed=0), tmp_path / "more")
    with pytest.raises(StoreError, match=r"run 'seed0' was recorded with seed 0; this call says seed=5"):
        sed_dask.ingest(ck, store, "seed0", scheduler="threads", progress=False, seed=5)
    assert open_store(store, mode="r").run("seed0").attrs["seed"] == 0
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sed_dask",
            "ingest",
            str(tmp_path / "more"),
            "--store",
            str(store),
            "--run",
            "seed0",
            "--seed",
            "5",
            "--threads",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "recorded with seed 0" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        sed_dask.ingest(ck, store, "other", scheduler="threads", progress=False, seed=-1)


def test_cli_seed_and_checkpoint_runs(tmp_path):
    ck = write_pt(make_trajectory(5, seed=3), tmp_path / "ck")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sed_dask",
            "ingest",
            str(tmp_path / "ck"),
            "--store",
            str(tmp_path / "s.zarr"),
            "--run",
            "a",
            "--seed",
            "11",
            "--threads",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert open_store(tmp_path / "s.zarr", mode="r").run("a").attrs["seed"] == 11
    direct = sed_dask.spectrum(
        [sed_dask.open_checkpoints(ck, run="seed3"), sed_dask.open_checkpoints(ck, run="b", seed=4)],
        windows=(2,),
        scheduler="threads",
        progress=False,
    )
    assert direct["seed"].values.tolist() == [3, 4]


def test_mean_and_std_over_seeds(store):
    ds = sed_dask.spectrum(store, windows=(2,), scheduler="threads", progress=False)
    edge = ds["edge_ratio"].max("step").squeeze("window", drop=True)
    s = cross_seed_summary(edge.to_dataset(name="peak"), ddof=1)
    vals = edge.values
    assert np.isclose(float(s["peak_mean"]), vals.mean()) and np.isclose(float(s["peak_std"]), vals.std(ddof=1))
    assert s.attrs["seeds"] == ds["seed"].values.tolist() and sorted(s.attrs["seeds"]) == [-1, 0, 1, 7]
    one = ds.sel(run=["seed0"])
    twin = xr.concat([one, one.assign_coords(run=["again"])], "run")
    with pytest.raises(AnalysisError, match=r"runs \['seed0', 'again'\] share seed 0"):
        twin.sed.cross_seed_summary(["edge_ratio"])
