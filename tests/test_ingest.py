"""End-to-end ingestion: real checkpoint files -> Zarr trajectory store, on threads and on a LocalCluster."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from models import (
    flatten,
    make_trajectory,
    write_hf_sharded,
    write_metrics_json,
    write_orig_mod,
    write_pt,
    write_safetensors,
)
from safetensors.torch import save_file

from sed_dask.errors import CheckpointError, NonFiniteError, StoreError
from sed_dask.store.ingest import ingest
from sed_dask.store.trajectory import open_store, write_trajectory

SMALL = {"chunk_bytes": 4096, "shard_bytes": 16384}  # 28,032 params -> 7 write units, most spanning tensors


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(5)


@pytest.fixture(scope="module")
def src(traj, tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {
        "pt": write_pt(traj, d / "pt"),
        "pt_bf16": write_pt(traj, d / "pt_bf16", dtype=torch.bfloat16),
        "orig_mod": write_orig_mod(traj, d / "orig_mod"),
        "st": write_safetensors(traj, d / "st"),
        "hf": write_hf_sharded(traj, d / "hf", n_shards=3),
        "root": d,
    }


def ingest_t(sources, store, run, **kw):
    """Ingest on the threaded scheduler, quietly, with small shards."""
    kw.setdefault("scheduler", "threads")
    kw.setdefault("progress", False)
    for k, v in SMALL.items():
        kw.setdefault(k, v)
    return ingest(sources, store, run, **kw)


def expected_rows(traj, *, bf16=False):
    names = traj.trainable_names()
    rows = []
    for sd in traj.state_dicts:
        if bf16:
            sd = {k: v.bfloat16() for k, v in sd.items()}
        rows.append(flatten(sd, names))
    return np.stack(rows)


def assert_rows_exact(rs, want):
    got = rs.read(slice(None))
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def row_files(store_path, run, row):
    """(path, mtime_ns, size) of every stored shard file of one row."""
    d = os.path.join(store_path, run, "params", "c", str(row))
    return sorted(
        (os.path.join(dp, f), os.stat(os.path.join(dp, f)).st_mtime_ns, os.path.getsize(os.path.join(dp, f)))
        for dp, _, fs in os.walk(d)
        for f in fs
    )


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["pt", "pt_bf16", "orig_mod", "st", "hf"])
def test_round_trip_every_format(traj, src, tmp_path, kind):
    s = ingest_t(src[kind], tmp_path / "s.zarr", "r")
    assert (s.n_new, s.n_skipped, s.steps) == (5, 0, traj.steps)
    rs = open_store(tmp_path / "s.zarr").run("r")
    assert len(rs.write_ranges()) == 7 and rs.n_params == traj.n_trainable()
    assert_rows_exact(rs, expected_rows(traj, bf16=kind == "pt_bf16"))
    assert rs.check_complete().tolist() == traj.steps
    assert "blocks.0.attn.c_attn.bias" in rs.index.names
    pol = rs.policy
    assert pol["name"] == "params_dedup_no_buffers" and "blocks.0.attn.bias" in pol["dropped"]
    assert rs.attrs["provenance"]["source_dtypes"] == (["bfloat16"] if kind == "pt_bf16" else ["float32"])
    assert rs.attrs["sources"][str(traj.steps[2])] == os.path.abspath(src[kind][traj.steps[2]])


def test_full_state_dict_policy_and_memory_store(traj, src):
    s = ingest_t(src["pt"], "memory://sed-test-full", "r", policy="full_state_dict_sorted")
    rs = open_store("memory://sed-test-full").run("r")
    sd0 = traj.state_dicts[0]
    assert rs.index.names == sorted(sd0) and s.n_params == sum(v.numel() for v in sd0.values())
    want = np.stack([flatten(sd, sorted(sd)) for sd in traj.state_dicts])
    assert_rows_exact(rs, want)


def test_distributed_and_threaded_stores_are_identical(client, traj, src, tmp_path):
    a = ingest(src["st"], tmp_path / "a.zarr", "r", client=client, progress=False, tasks_in_flight=3, **SMALL)
    b = ingest_t(src["st"], tmp_path / "b.zarr", "r")
    assert a.steps == b.steps == traj.steps and a.bytes == b.bytes == 5 * traj.n_trainable() * 4
    ra, rb = open_store(tmp_path / "a.zarr").run("r"), open_store(tmp_path / "b.zarr").run("r")
    assert ra.read(slice(None)).tobytes() == rb.read(slice(None)).tobytes()
    for key in ("param_index", "param_index_hash", "selection_policy", "write_unit", "n_params"):
        assert ra.attrs[key] == rb.attrs[key]
    assert ra.attrs["ingest_log"][-1]["executor"] == "distributed"
    assert_rows_exact(ra, expected_rows(traj))


def test_metrics_several_runs_and_progress(traj, src, tmp_path, capsys):
    vals = write_metrics_json(traj, tmp_path / "pilot_metrics.json")
    ingest_t(src["pt"], tmp_path / "s.zarr", "seed0", metrics=tmp_path / "pilot_metrics.json", progress=True)
    assert "ingest seed0" in capsys.readouterr().err  # the progress bar
    m = open_store(tmp_path / "s.zarr").run("seed0").metrics()
    assert m["step"].tolist() == traj.steps and m["val_loss"].tolist() == list(vals.values())
    assert set(m) == {"step", "val_loss", "train_loss", "lr"}
    ingest_t(src["st"], tmp_path / "s.zarr", "seed1", metrics={"step": traj.steps[:2], "val_loss": [1.0, 2.0]})
    ts = open_store(tmp_path / "s.zarr")
    assert ts.runs == ["seed0", "seed1"]
    assert ts.run("seed1").metrics()["val_loss"].tolist() == [1.0, 2.0]
    assert ts.run("seed0").read(slice(None)).tobytes() == ts.run("seed1").read(slice(None)).tobytes()


# ----------------------------------------------------------------------------- resume / append
def test_append_and_idempotent_rerun(traj, src, tmp_path):
    store = tmp_path / "s.zarr"
    first = ingest_t(src["pt"], store, "r", steps=traj.steps[:3])
    assert first.steps == traj.steps[:3]
    before = {r: row_files(store, "r", r) for r in range(3)}
    again = ingest_t(src["pt"], store, "r")  # the run is still training: two more checkpoints
    assert (again.n_new, again.n_skipped, again.steps) == (2, 3, traj.steps)
    assert {r: row_files(store, "r", r) for r in range(3)} == before  # completed rows never rewritten
    assert_rows_exact(open_store(store).run("r"), expected_rows(traj))
    noop = ingest_t(src["pt"], store, "r")
    assert (noop.n_new, noop.n_skipped, noop.bytes) == (0, 5, 0)

    later = make_trajectory(1, first=900)  # a later checkpoint with the same keys
    one = write_pt(later, tmp_path / "later")
    assert ingest_t(one, store, "r").steps == traj.steps + [900]

    early = {50: src["pt"][traj.steps[1]]}
    attrs = open_store(store).run("r").attrs
    with pytest.raises(StoreError, match=r"step 50 .* earlier than the last stored step 900"):
        ingest_t(early, store, "r")
    rs = open_store(store).run("r")
    assert rs.n_rows == 6 and rs.attrs == attrs


SLOW_CHILD = """
import sys, time
import sed_dask.store.ingest as ing
real = ing.ingest_range
def slow(*a, **k):          # test scaffolding: make the child slow enough to be killed mid-run
    out = real(*a, **k)
    time.sleep(0.03)
    return out
ing.ingest_range = slow
ing.ingest(sys.argv[1], sys.argv[2], "r", scheduler="sync", progress=False, chunk_bytes=4096, shard_bytes=16384)
"""


def test_resume_after_a_real_kill(tmp_path):
    tr = make_trajectory(10, seed=3)
    files = write_safetensors(tr, tmp_path / "ck")  # the child then never imports torch: quick start
    store = tmp_path / "s.zarr"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(tmp_path / "ck"), str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    done_dir = store / "r" / "complete" / "c"
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            # poll the completion record itself: a listing of its chunk directory can also
            # show a chunk file the child is still writing (seen as a flake)
            if done_dir.is_dir() and open_store(store, mode="r").run("r").completed().sum() >= 3:
                break
            if child.poll() is not None:
                pytest.fail(f"ingest child exited early: {child.stdout.read().decode()[-2000:]}")
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    rs = open_store(store).run("r")
    done = rs.completed()
    assert 3 <= done.sum() < 10, done
    with pytest.raises(StoreError, match="ingestion is incomplete"):
        rs.check_complete()
    k0 = int(np.flatnonzero(done)[0])
    rs.params[k0, 0] = 12345.0  # sentinel: a re-run that rewrote completed rows would erase it
    before = {r: row_files(store, "r", r) for r in np.flatnonzero(done)}

    s = ingest_t(files, store, "r")
    assert (s.n_skipped, s.n_new) == (int(done.sum()), 10 - int(done.sum()))
    rs = open_store(store).run("r")
    assert rs.check_complete().tolist() == tr.steps
    assert {r: row_files(store, "r", r) for r in np.flatnonzero(done)} == before
    want = expected_rows(tr)
    want[k0, 0] = 12345.0
    assert_rows_exact(rs, want)


def test_repair_after_crash_inside_allocate(traj, src, tmp_path):
    store = tmp_path / "s.zarr"
    ingest_t(src["pt"], store, "r", steps=traj.steps[:2])
    rs = open_store(store).run("r")
    rs.params.resize((4, rs.n_params))  # as if killed between the resizes of a later allocate
    rs._complete.resize((3,))
    assert rs.row_steps().tolist() == traj.steps[:2]
    s = ingest_t(src["pt"], store, "r")
    assert s.steps == traj.steps and open_store(store).run("r").n_rows == 5
    assert_rows_exact(open_store(store).run("r"), expected_rows(traj))


# ----------------------------------------------------------------------------- bad inputs
def _copy_files(src_files, dest):
    os.makedirs(dest, exist_ok=True)
    return {s: shutil.copy(p, dest) for s, p in src_files.items()}


def _no_run(store):
    return not os.path.exists(store)  # validation failed before the store was even created


@pytest.mark.parametrize(
    "kind,damage", [("pt", "garbage"), ("pt", "truncate"), ("st", "truncate"), ("pt", "extra_key"), ("st", "shape")]
)
def test_bad_late_file_fails_before_anything_is_written(traj, src, tmp_path, kind, damage):
    files = _copy_files(src[kind], tmp_path / "ck")
    victim = files[traj.steps[-1]]
    if damage == "garbage":
        open(victim, "wb").write(os.urandom(1000))
    elif damage == "truncate":
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) - 500])
    elif damage == "extra_key":
        sd = dict(traj.state_dicts[-1], **{"extra.weight": torch.zeros(3)})
        torch.save({"step": traj.steps[-1], "model_state_dict": sd}, victim)
    elif damage == "shape":
        sd = {k: v.contiguous() for k, v in traj.state_dicts[-1].items() if k != "lm_head.weight"}
        sd["ln_f.weight"] = torch.ones(7)
        save_file(sd, victim)
    store = tmp_path / "s.zarr"
    msg = {
        "garbage": "unreadable",
        "truncate": "truncated",
        "extra_key": r"unexpected \['extra.weight'\]",
        "shape": r"tensor 'ln_f.weight' has shape \[7\], expected \[32\]",
    }[damage]
    with pytest.raises(CheckpointError, match=msg) as ei:
        ingest_t(tmp_path / "ck", store, "r")
    assert victim in str(ei.value)
    assert _no_run(store)


def test_nonfinite_raise_then_fix_and_record(traj, src, tmp_path):
    files = _copy_files(src["pt"], tmp_path / "ck")
    bad_step = traj.steps[2]
    sd = {k: v.clone() for k, v in traj.state_dicts[2].items()}
    sd["blocks.1.mlp.c_fc.weight"][3, 4] = float("nan")
    sd["ln_f.bias"][0] = float("inf")
    torch.save({"step": bad_step, "model_state_dict": sd}, files[bad_step])
    store = tmp_path / "s.zarr"
    with pytest.raises(
        NonFiniteError,
        match=rf"{files[bad_step]} \(step {bad_step}\): tensor "
        r"'blocks.1.mlp.c_fc.weight' holds 1 NaN",
    ):
        ingest_t(tmp_path / "ck", store, "r")
    rs = open_store(store).run("r")
    assert rs.steps.tolist() == [s for s in traj.steps if s != bad_step]  # the others are complete
    with pytest.raises(StoreError, match=rf"incomplete for steps \[{bad_step}\]"):
        rs.check_complete()

    rec = ingest_t(tmp_path / "ck", tmp_path / "rec.zarr", "r", on_nonfinite="record")
    assert rec.steps == traj.steps
    got = open_store(tmp_path / "rec.zarr").run("r").attrs["nonfinite"]
    assert [(d["step"], d["tensor"], d["n_nan"], d["n_inf"]) for d in got] == [
        (bad_step, "blocks.1.mlp.c_fc.weight", 1, 0),
        (bad_step, "ln_f.bias", 0, 1),
    ]
    assert got[0]["file"] == files[bad_step]

    keep = {r: row_files(store, "r", r) for r in (0, 1, 3, 4)}
    shutil.copy(src["pt"][bad_step], files[bad_step])  # fixed file
    s = ingest_t(tmp_path / "ck", store, "r")
    assert (s.n_new, s.n_skipped) == (1, 4)
    assert {r: row_files(store, "r", r) for r in (0, 1, 3, 4)} == keep
    assert_rows_exact(open_store(store).run("r"), expected_rows(traj))


def test_duplicate_and_too_few_checkpoints(traj, src, tmp_path):
    d = tmp_path / "ck"
    _copy_files(src["pt"], d)
    dup = shutil.copy(src["st"][traj.steps[1]], d)
    with pytest.raises(CheckpointError, match=rf"duplicate step {traj.steps[1]}: both .*"):
        ingest_t(d, tmp_path / "s.zarr", "r")
    assert _no_run(tmp_path / "s.zarr")
    os.remove(dup)
    with pytest.raises(CheckpointError, match="at least 2 checkpoints"):
        ingest_t({7: src["pt"][traj.steps[0]]}, tmp_path / "s.zarr", "r")
    assert _no_run(tmp_path / "s.zarr")


def test_other_policy_or_index_is_refused(traj, src, tmp_path):
    store = tmp_path / "s.zarr"
    ingest_t(src["pt"], store, "r", steps=traj.steps[:2])
    with pytest.raises(StoreError, match="was written with selection policy params_dedup_no_buffers"):
        ingest_t(src["pt"], store, "r", policy="full_state_dict_sorted")
    with pytest.raises(StoreError, match="selection policy"):
        ingest_t(src["pt"], store, "r", exclude=["ln_f"])
    with pytest.raises(
        StoreError,
        match=r"parameter index .* differs .*run has shape/dtype \[96\]/float32, new checkpoints \[96\]/bfloat16",
    ):
        ingest_t(src["pt_bf16"], store, "r")
    assert open_store(store).run("r").n_rows == 2
    write_trajectory(store, "arr", [0, 1], np.zeros((2, 3), np.float32))
    with pytest.raises(StoreError, match="not written by checkpoint ingestion"):
        ingest_t(src["pt"], store, "arr")


# ----------------------------------------------------------------------------- CLI
def test_cli_ingest_on_a_cluster(local_cluster, traj, src, tmp_path, capsys):
    from sed_dask.cli import ingest as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    vals = write_metrics_json(traj, tmp_path / "m.json", shape="columns")
    args = parser.parse_args(
        [
            "ingest",
            str(src["root"] / "hf"),
            "--store",
            str(tmp_path / "s.zarr"),
            "--run",
            "seed0",
            "--metrics",
            str(tmp_path / "m.json"),
            "--exclude",
            r"^pos_emb\.",
            "--json",
            "--no-progress",
            "--shard-bytes",
            "16KiB",
            "--chunk-bytes",
            "4KiB",
            "--scheduler-address",
            local_cluster.scheduler_address,
        ]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == traj.steps and out["n_new"] == 5
    rs = open_store(tmp_path / "s.zarr").run("seed0")
    assert "pos_emb.weight" not in rs.index.names and rs.policy["options"]["exclude"] == [r"^pos_emb\."]
    assert rs.metrics()["val_loss"].tolist() == list(vals.values())
    names = [n for n in traj.trainable_names() if n != "pos_emb.weight"]
    assert np.array_equal(rs.read(slice(None)), np.stack([flatten(sd, names) for sd in traj.state_dicts]))
    args = parser.parse_args(
        [
            "ingest",
            str(src["root"] / "hf"),
            "--store",
            str(tmp_path / "s.zarr"),
            "--run",
            "seed0",
            "--threads",
            "--no-progress",
        ]
    )
    args.func(args)
    assert "0 checkpoint(s) ingested, 5 already complete" in capsys.readouterr().out
