"""Spectra straight from checkpoint files (``open_checkpoints``): same validation as ingestion, and
results bit-identical to ``spectrum`` of the ingested store of the same files."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from models import flatten, make_trajectory, write_metrics_json, write_pt, write_safetensors
from safetensors.torch import save_file
from sed_oracle import deltas, window_svds

import sed_dask
from sed_dask.engine.rawread import RawChunkReader
from sed_dask.errors import CheckpointError, MetricsError, NonFiniteError, StoreError
from sed_dask.sources.checkpoint_run import CheckpointRun, open_checkpoints
from sed_dask.store.ingest import ingest
from sed_dask.store.trajectory import open_store

CHUNK = 4096  # bytes: 1,024-element column unit, so 28,032 params make many P-ranges
# several step blocks, P-ranges and row batches per task: halos, carries and the tree sum all run
TILE = {"tile_bytes": 60_000, "block_steps": 3}
WINDOWS = [2, 3]


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(7)


@pytest.fixture(scope="module")
def src(traj, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    return {
        "pt": write_pt(traj, d / "pt"),
        "st": write_safetensors(traj, d / "st"),
        "root": d,
        "metrics": write_metrics_json(traj, d / "metrics.json"),
        "metrics_file": d / "metrics.json",
    }


@pytest.fixture(scope="module")
def stores(src, tmp_path_factory):
    """The same files ingested (store read chunk = CHUNK)."""
    d = tmp_path_factory.mktemp("stores")
    for kind in ("pt", "st"):
        ingest(
            src["root"] / kind,
            d / f"{kind}.zarr",
            "r",
            scheduler="threads",
            progress=False,
            metrics=src["metrics_file"],
            chunk_bytes=CHUNK,
            shard_bytes=4 * CHUNK,
        )
    return d


def _spec(source, **kw):
    return sed_dask.spectrum(source, windows=WINDOWS, groups="default", progress=False, **TILE, **kw)


def _assert_same(a: xr.Dataset, b: xr.Dataset):
    """Every variable and coordinate bit for bit (attrs differ only in source and time)."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in list(a.data_vars) + list(a.coords):
        assert np.array_equal(a[name].values, b[name].values, equal_nan=a[name].dtype.kind == "f"), name
    for k in ("param_index_hash", "selection_policy", "n_params", "tiling", "groups"):
        assert a.attrs[k] == b.attrs[k], k


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_bit_identical_to_the_ingested_store_and_to_svd(traj, src, stores, kind):
    run = open_checkpoints(src["root"] / kind, run="r", metrics=src["metrics_file"], chunk_bytes=CHUNK)
    rs = open_store(stores / f"{kind}.zarr").run("r")
    assert isinstance(run, CheckpointRun) and run.index.hash == rs.index.hash == rs.attrs["param_index_hash"]
    assert run.index.to_records() == rs.index.to_records() and run.read_unit == rs.read_unit
    assert run.policy == rs.policy and run.check_complete().tolist() == traj.steps
    assert RawChunkReader.for_array(run.params) is None  # the Gram tile reads through read_block
    # small in every task: one shared name map, pickled once
    assert len({id(n) for _, _, n in run.params.files}) == 1
    assert len(pickle.dumps(run.params)) < 2 * len(pickle.dumps(run.params.index)) + 4000
    assert np.array_equal(run.read(slice(1, 4), 100, 5000), rs.read(slice(1, 4), 100, 5000))
    a = _spec(run, scheduler="threads")
    b = _spec(stores / f"{kind}.zarr", scheduler="threads")
    _assert_same(a, b)
    assert a.attrs["source_store"] == f"checkpoints r={src['root'] / kind}"
    assert a.val_loss.sel(run="r").values[-1] == src["metrics"][traj.steps[-1]]
    assert len(a.group) > 2  # groups="default": the index's layer labels
    # the oracle: numpy SVD of the explicit float64 windows of the files' parameters
    X = np.stack([flatten(sd, traj.trainable_names()) for sd in traj.state_dicts])
    D = deltas(X)
    for W in WINDOWS:
        for k, s, _ in window_svds(D, W):
            got = a.sigma.sel(run="r", window=W, group="all", step=traj.steps[k + 1]).values
            np.testing.assert_allclose(got[:W], s, rtol=1e-8, atol=1e-12 * s[0])


def test_on_a_cluster_several_runs_and_sketch(client, traj, src, stores):
    """Two runs (pt + safetensors) on a LocalCluster, with the JL sketch from the same read."""
    runs = [
        open_checkpoints(src["root"] / "pt", run="a", chunk_bytes=CHUNK),
        open_checkpoints(src["root"] / "st", run="b", chunk_bytes=CHUNK),
    ]
    sk = {"d": 6, "seed": 3, "tile_elems": 4096}
    got = _spec(runs, client=client, sketch=sk)
    assert list(got.run.values) == ["a", "b"] and "sketch" in got
    assert got.attrs["source_store"].startswith("checkpoints a=")
    for name, kind in (("a", "pt"), ("b", "st")):
        want = _spec(stores / f"{kind}.zarr", scheduler="threads", sketch=sk)
        for var in ("sigma", "k_star", "edge_ratio", "delta_norm", "sketch"):
            assert np.array_equal(got[var].sel(run=name).values, want[var].sel(run="r").values, equal_nan=True), var
    # the standalone sketch() of the ingested store: the very same numbers
    alone = sed_dask.sketch(stores / "pt.zarr", scheduler="threads", progress=False, **sk)
    assert np.array_equal(got.sketch.sel(run="a").values, alone.sketch.sel(run="r").values)
    with pytest.raises(ValueError, match="does not match the checkpoint runs' names"):
        sed_dask.spectrum(runs, runs=["b", "a"], windows=[2], scheduler="sync", progress=False)


# ----------------------------------------------------------------------------- bad input
def _copy(files, dest) -> dict:
    os.makedirs(dest, exist_ok=True)
    return {s: shutil.copy(p, dest) for s, p in files.items()}


@pytest.mark.parametrize("damage", ["extra_key", "shape", "truncate", "garbage"])
def test_bad_checkpoint_is_named_when_opened(traj, src, tmp_path, damage):
    kind = "st" if damage == "shape" else "pt"
    files = _copy(src[kind], tmp_path / "ck")
    victim = files[traj.steps[3]]
    if damage == "extra_key":
        torch.save(
            {"step": traj.steps[3], "model_state_dict": dict(traj.state_dicts[3], **{"x.weight": torch.ones(2)})},
            victim,
        )
    elif damage == "shape":
        sd = {k: v.contiguous() for k, v in traj.state_dicts[3].items() if k != "lm_head.weight"}
        sd["ln_f.weight"] = torch.ones(5)
        save_file(sd, victim)
    elif damage == "truncate":
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) - 400])
    else:
        open(victim, "wb").write(os.urandom(800))
    msg = {
        "extra_key": r"unexpected \['x.weight'\]",
        "shape": r"'ln_f.weight' has shape \[5\], expected \[32\]",
        "truncate": "truncated",
        "garbage": "unreadable",
    }[damage]
    with pytest.raises(CheckpointError, match=msg) as ei:
        open_checkpoints(tmp_path / "ck", run="r")
    assert victim in str(ei.value)
    if damage in ("extra_key", "shape"):
        assert f"step {traj.steps[3]}" in str(ei.value)


def test_duplicate_step_too_few_checkpoints_and_bad_metrics(traj, src, tmp_path):
    d = tmp_path / "ck"
    _copy(src["pt"], d)
    shutil.copy(src["st"][traj.steps[2]], d)
    with pytest.raises(CheckpointError, match=rf"duplicate step {traj.steps[2]}: both "):
        open_checkpoints(d, run="r")
    with pytest.raises(CheckpointError, match="at least 2 checkpoints"):
        open_checkpoints({5: src["pt"][traj.steps[0]]}, run="r")
    (tmp_path / "m.json").write_text('[{"step": 0, "val_loss": 1.0}')
    with pytest.raises(MetricsError, match=rf"{tmp_path / 'm.json'}: not valid JSON"):
        open_checkpoints(src["root"] / "pt", run="r", metrics=tmp_path / "m.json")
    few = open_checkpoints(src["root"] / "pt", run="r", steps=traj.steps[:3])
    with pytest.raises(StoreError, match=r"run 'r' has only 2 deltas .* W=\[3\]"):
        sed_dask.spectrum(few, windows=[2, 3], scheduler="sync", progress=False)


def test_nan_in_one_checkpoint_names_step_and_file(traj, src, tmp_path):
    files = _copy(src["pt"], tmp_path / "ck")
    bad = traj.steps[4]
    sd = {k: v.clone() for k, v in traj.state_dicts[4].items()}
    sd["blocks.1.mlp.c_fc.weight"][2, 3] = float("nan")
    torch.save({"step": bad, "model_state_dict": sd}, files[bad])
    run = open_checkpoints(tmp_path / "ck", run="r", chunk_bytes=CHUNK)  # headers are fine
    with pytest.raises(
        NonFiniteError,
        match=rf"{files[bad]} \(step {bad}\): tensor 'blocks.1.mlp.c_fc.weight' "
        r"holds 1 NaN and 0 Inf",
    ):
        _spec(run, scheduler="threads")


# ----------------------------------------------------------------------------- CLI
def test_cli_spectrum_from_checkpoints(traj, src, stores, tmp_path, capsys):
    from sed_dask.cli import main

    out = tmp_path / "res.zarr"
    rc = main(
        [
            "spectrum",
            "--checkpoints",
            str(src["root"] / "pt"),
            "--checkpoints",
            str(src["root"] / "st"),
            "--runs",
            "a,b",
            "--metrics",
            str(src["metrics_file"]),
            "--metrics",
            str(src["metrics_file"]),
            "--windows",
            "2,3",
            "--groups",
            "default",
            "--chunk-bytes",
            str(CHUNK),
            "--tile-bytes",
            "60000",
            "-o",
            str(out),
            "--threads",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    got = xr.open_zarr(out).load()
    want = sed_dask.spectrum(
        stores / "st.zarr", windows=WINDOWS, groups="default", scheduler="threads", progress=False, tile_bytes=60_000
    )
    assert list(got.run.values) == ["a", "b"]
    assert np.array_equal(got.sigma.sel(run="b").values, want.sigma.sel(run="r").values, equal_nan=True)
    assert np.array_equal(got.val_loss.sel(run="a").values, want.val_loss.sel(run="r").values, equal_nan=True)
    # the directory name is the default run name; selection flags as for ingest
    rc = main(
        [
            "spectrum",
            "--checkpoints",
            str(src["root"] / "pt"),
            "--exclude",
            r"^pos_emb\.",
            "--windows",
            "2",
            "-o",
            str(out),
            "--overwrite",
            "--threads",
            "--no-progress",
        ]
    )
    assert rc == 0
    ds = xr.open_zarr(out)
    pos = traj.model.pos_emb.weight.numel()
    assert list(ds.run.values) == ["pt"]
    assert json.loads(ds.attrs["n_params"]) == {"pt": traj.n_trainable() - pos}
    assert json.loads(ds.attrs["selection_policy"])["pt"]["options"]["exclude"] == [r"^pos_emb\."]
    rc = main(
        [
            "spectrum",
            "--checkpoints",
            str(src["root"] / "pt"),
            "--windows",
            "7",
            "-o",
            str(out),
            "--overwrite",
            "--threads",
        ]
    )
    assert rc == 2 and "has only 6 deltas" in capsys.readouterr().err
