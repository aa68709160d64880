"""Issue 13, bad inputs: each gets exit 2 and one line naming the file, step or argument (no traceback),
or an explicit warning where a policy choice exists (stated default, option to change it).

Real torch checkpoints, real Zarr stores on disk, the real CLI, a real second process holding a
run lock. Every test fails on the code before issue 13 (the comment on each says what it catches).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from models import make_trajectory, write_pt

from sed_dask.cli import main
from sed_dask.store.trajectory import open_store, run_lock_path

T = ["--threads", "--no-progress"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_pt(make_trajectory(6), d)
    return d


@pytest.fixture(scope="module")
def store(ck, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("st") / "store.zarr")
    assert main(["ingest", str(ck), "--store", p, "--run", "r0", *T]) == 0
    return p


@pytest.fixture(scope="module")
def results(store, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("res") / "res.zarr")
    assert main(["spectrum", store, "--windows", "3", "-o", p, *T]) == 0
    return p


def cli(capsys, *argv):
    """``(exit code, stderr lines)``; argparse errors (SystemExit) count as their exit code."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


def one_error(rc, err, *words):
    assert rc == 2, err
    assert not any("Traceback" in ln for ln in err), err
    last = err[-1]
    for w in words:
        assert w in last, (w, last)


def test_spectrum_on_a_plain_group_or_a_layout_copy(tmp_path, capsys):
    # catches: KeyError: 'steps' (plain group) / KeyError: 'param_index' or a bogus "re-run ingest" (layout copy)
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_group("a").create_array("params", shape=(3, 4), dtype="f4")
    one_error(
        *cli(capsys, "spectrum", tmp_path / "plain.zarr", "--windows", "3", "-o", tmp_path / "o.zarr", *T),
        "plain.zarr",
        "not a sed_dask trajectory store",
    )
    g = zarr.open_group(str(tmp_path / "copy.zarr"), mode="w")
    r = g.create_group("r0")
    for name, shape, dt in (("params", (3, 4), "f4"), ("steps", (3,), "i8"), ("complete", (3,), "u1")):
        r.create_array(name, shape=shape, dtype=dt, dimension_names=("row", "param")[: len(shape)])
    one_error(
        *cli(capsys, "spectrum", tmp_path / "copy.zarr", "--windows", "3", "-o", tmp_path / "o.zarr", *T),
        "copy.zarr",
        "not a sed_dask trajectory store",
    )
    assert not os.path.exists(tmp_path / "o.zarr")


def test_metrics_column_that_cannot_be_stored(ck, tmp_path, capsys):
    # catches: a column like 'val/loss' was stored (as a nested group nobody reads) and failed later
    m = tmp_path / "m.json"
    m.write_text(json.dumps([{"step": s, "val/loss": 1.0} for s in range(0, 600, 100)]))
    one_error(
        *cli(capsys, "ingest", ck, "--store", tmp_path / "s.zarr", "--run", "r0", "--metrics", m, *T),
        "m.json",
        "'val/loss'",
    )
    assert not os.path.exists(tmp_path / "s.zarr")


def test_metrics_steps_matching_no_checkpoint(ck, tmp_path, capsys):
    # catches: all-NaN val_loss stored silently ("needs at least 6 finite points, got 0" much later)
    m = tmp_path / "m.json"
    m.write_text(json.dumps([{"step": s + 1, "val_loss": 1.0} for s in range(0, 600, 100)]))
    one_error(
        *cli(capsys, "ingest", ck, "--store", tmp_path / "s.zarr", "--run", "r0", "--metrics", m, *T),
        "m.json",
        "none of its 6 steps",
        "0..500",
    )


def test_nonfinite_metrics_warn_by_default_and_raise_on_request(ck, tmp_path, capsys):
    # catches: NaN/Inf metric values were stored without a word
    m = tmp_path / "m.json"
    vals = ["1", "NaN", "2", "Infinity", "3", "4"]
    m.write_text(
        "[" + ",".join('{"step": %d, "val_loss": %s}' % (s, v) for s, v in zip(range(0, 600, 100), vals)) + "]"
    )
    rc, err = cli(capsys, "ingest", ck, "--store", tmp_path / "s.zarr", "--run", "r0", "--metrics", m, *T)
    assert rc == 0 and any("warning" in ln and "m.json" in ln and "[100, 300]" in ln for ln in err), err
    one_error(
        *cli(
            capsys,
            "ingest",
            ck,
            "--store",
            tmp_path / "s2.zarr",
            "--run",
            "r0",
            "--metrics",
            m,
            "--metrics-nonfinite",
            "raise",
            *T,
        ),
        "m.json",
        "NaN/Inf",
        "'val_loss'",
    )


def test_step_inside_the_file_disagreeing_with_its_name(ck, tmp_path, capsys):
    # catches: '"step": 999' inside ckpt_000100.pt was ignored without a word
    d = tmp_path / "ck"
    shutil.copytree(ck, d)
    obj = torch.load(d / "ckpt_000100.pt", weights_only=True)
    obj["step"] = 999
    torch.save(obj, d / "ckpt_000100.pt")
    rc, err = cli(capsys, "ingest", d, "--store", tmp_path / "a.zarr", "--run", "r0", *T)
    assert rc == 0 and any("ckpt_000100.pt" in ln and "999" in ln and "step_source='name'" in ln for ln in err)
    assert open_store(str(tmp_path / "a.zarr"), mode="r").run("r0").steps.tolist() == [0, 100, 200, 300, 400, 500]
    rc, err = cli(capsys, "ingest", d, "--store", tmp_path / "b.zarr", "--run", "r0", "--step-source", "file", *T)
    assert rc == 0, err
    assert open_store(str(tmp_path / "b.zarr"), mode="r").run("r0").steps.tolist() == [0, 200, 300, 400, 500, 999]


@pytest.mark.parametrize("windows, words", [("3,,4", ["--windows", "empty item"]), ("3,3", ["--windows", "twice"])])
def test_windows_typos_are_refused(store, tmp_path, capsys, windows, words):
    # catches: '--windows 3,,4' and '3,3' were accepted (silently dropped / deduplicated)
    one_error(*cli(capsys, "spectrum", store, "--windows", windows, "-o", tmp_path / "o.zarr", *T), *words)
    assert not os.path.exists(tmp_path / "o.zarr")


@pytest.mark.parametrize("query", ["phases", "events"])
def test_negative_tau_is_refused(results, capsys, query):
    # catches: '--tau -1' was accepted
    one_error(*cli(capsys, "query", results, query, "--tau", "-1"), "--tau", "'-1'")


def test_ingest_into_a_foreign_group_or_a_results_store(ck, results, tmp_path, capsys):
    # catches: ingest stamped sed_dask attrs on a foreign Zarr group / wrote a run into a results store
    g = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    g.attrs["owner"] = "me"
    g.create_array("data", shape=(3,), dtype="f4")[:] = 1
    one_error(
        *cli(capsys, "ingest", ck, "--store", tmp_path / "foreign.zarr", "--run", "r0", *T),
        "foreign.zarr",
        "did not write",
    )
    g = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="r")
    assert dict(g.attrs) == {"owner": "me"} and sorted(g.keys()) == ["data"]
    res = str(tmp_path / "res.zarr")
    shutil.copytree(results, res)
    one_error(*cli(capsys, "ingest", ck, "--store", res, "--run", "r0", *T), "res.zarr", "results store")
    assert not os.path.exists(os.path.join(res, "r0"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    one_error(*cli(capsys, "ingest", ck, "--store", tmp_path / "docs", "--run", "r0", *T), "folder of other files")
    assert os.listdir(tmp_path / "docs") == ["a.txt"]


def test_random_bytes_named_pt(tmp_path, capsys):
    # catches: random bytes named .pt got torch's weights_only / add_safe_globals advice
    d = tmp_path / "rnd"
    d.mkdir()
    rng = np.random.default_rng(1)
    for s in (0, 100):
        (d / f"ckpt_{s:06d}.pt").write_bytes(rng.bytes(4096))
    one_error(
        *cli(capsys, "ingest", d, "--store", tmp_path / "s.zarr", "--run", "r0", *T),
        "ckpt_000000.pt",
        "not a PyTorch checkpoint",
    )
    assert "add_safe_globals" not in capsys.readouterr().err


def test_query_metrics_file_is_named(results, tmp_path, capsys):
    # catches: 'query --metrics bad.json' printed a bare JSON decode error without the file
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_error(*cli(capsys, "query", results, "edge", "--metrics", bad), "bad.json")


def test_spectrum_during_another_ingest_says_so(store, tmp_path, capsys):
    # catches: "re-run `sed-dask ingest`" while another ingestion held the run's lock and was appending
    s = str(tmp_path / "s.zarr")
    shutil.copytree(store, s)
    open_store(s).run("r0").allocate([600])  # the appending ingestion's new row, not written yet
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom sed_dask.store import run_lock\n"
            "with run_lock(sys.argv[1], 'r0'):\n    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
            s,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_error(
            *cli(capsys, "spectrum", s, "--windows", "3", "-o", tmp_path / "o.zarr", *T),
            "being ingested right now",
            f"pid {holder.pid}",
        )
    finally:
        holder.kill()
        holder.wait()
    rc, err = cli(capsys, "spectrum", s, "--windows", "3", "-o", tmp_path / "o.zarr", *T)
    one_error(rc, err, "re-run `sed-dask ingest`")  # lock free: the ingestion died, and the message says so
    assert os.path.exists(run_lock_path(s, "r0"))
