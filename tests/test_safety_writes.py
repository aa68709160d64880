"""Issue 13, result writes: nothing a user has is destroyed, and a partial results store never looks whole.

Real Zarr stores on disk, the real CLI, and real SIGKILLs of a writer at many points of its write
(a child process whose zarr file writes count down to ``os.kill(os.getpid(), SIGKILL)``).
Every test fails on the code before issue 13 (the comment on each says what it catches).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import sed_dask
from sed_dask.cli import main
from sed_dask.store.outputs import COMPLETE_ATTR, PartialResultsError, TargetError, open_results
from sed_dask.store.trajectory import open_store, write_trajectory

KILLER = r"""
import os, signal, sys
import zarr.storage._local as L
n, real = [0], L._put
def _put(path, value, exclusive=False):
    n[0] += 1
    if n[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, value, exclusive=exclusive)
L._put = _put
from sed_dask.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("traj") / "store.zarr"
    X = np.cumsum(np.random.default_rng(0).standard_normal((8, 64)), axis=0)
    write_trajectory(str(p), "r0", np.arange(8) * 10, X, metrics={"val_loss": np.linspace(3, 1, 8)})
    return str(p)


def spec(store, out, **kw):
    return sed_dask.spectrum(store, windows=(3,), scheduler="threads", progress=False, output=out, **kw)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.err


def _rows(path, run="r0"):
    return open_store(path, mode="r").run(run).n_rows


def test_spectrum_and_sketch_refuse_their_own_trajectory_store(store, tmp_path, capsys):
    # catches: `spectrum store.zarr -o store.zarr` / `sketch ... -o store.zarr` replaced the trajectory store
    import shutil

    s = str(tmp_path / "s.zarr")
    shutil.copytree(store, s)
    for cmd in (["spectrum", s, "--windows", "3"], ["sketch", s, "--d", "4"]):
        rc, err = run_cli(capsys, *cmd, "-o", s, "--overwrite", "--threads", "--no-progress")
        assert rc == 2 and "is a sed_dask trajectory store" in err and len(err.strip().splitlines()) == 1
        assert _rows(s) == 8
    with pytest.raises(TargetError, match="inside the Zarr store"):  # nor a path inside it
        spec(s, os.path.join(s, "results.zarr"))


def test_output_folder_with_user_files_is_refused(store, tmp_path, capsys):
    # catches: `-o` at a folder of user files exited 0 and deleted its contents
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    for cmd in (
        ["spectrum", store, "--windows", "3"],
        ["sketch", store, "--d", "4"],
        ["directions", store, "--run", "r0", "-k", "1"],
    ):
        rc, err = run_cli(
            capsys,
            *cmd,
            "-o",
            str(d),
            "--overwrite",
            "--threads",
            *(["--no-progress"] if cmd[0] != "directions" else []),
        )
        assert rc == 2 and "not a Zarr store" in err, err
    assert (d / "notes.txt").read_text() == "keep me" and os.listdir(d) == ["notes.txt"]
    g = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")  # a Zarr group sed_dask did not write
    g.attrs["owner"] = "me"
    with pytest.raises(TargetError, match="did not write"):
        spec(store, str(tmp_path / "foreign.zarr"), overwrite=True)
    assert dict(zarr.open_group(str(tmp_path / "foreign.zarr"), mode="r").attrs) == {"owner": "me"}


def test_existing_results_need_overwrite_and_carry_the_marker(store, tmp_path):
    # catches: an existing results store was silently replaced; no completion marker in the attrs
    out = str(tmp_path / "res.zarr")
    ds = spec(store, out)
    back = xr.open_zarr(out)
    assert back.attrs[COMPLETE_ATTR] is True and back.attrs["sed_dask_results"] == "spectra"
    assert "edge_ratio" in back.attrs["sed_dask_variables"]
    with pytest.raises(TargetError, match="overwrite"):
        spec(store, out)
    ds = spec(store, out, overwrite=True)
    xr.testing.assert_identical(open_results(out).load(), ds)
    assert sorted(os.listdir(tmp_path)) == ["res.zarr"]  # no temporary siblings left behind
    sk = str(tmp_path / "sk.zarr")
    sed_dask.sketch(store, d=4, scheduler="threads", progress=False, output=sk)
    assert xr.open_zarr(sk).attrs[COMPLETE_ATTR] is True
    with pytest.raises(TargetError):
        sed_dask.sketch(store, d=4, scheduler="threads", progress=False, output=sk)


def test_directions_write_is_safe(store, tmp_path):
    # catches: directions `to_zarr(mode="w")` onto any path; no marker
    from sed_dask.engine.directions import directions

    out = str(tmp_path / "dirs.zarr")
    ds = directions(store, run="r0", k=2, scheduler="threads", output=out)
    assert ds.attrs[COMPLETE_ATTR] is True and ds["direction"].shape == (2, 64)
    with pytest.raises(TargetError, match="overwrite"):
        directions(store, run="r0", k=2, scheduler="threads", output=out)
    with pytest.raises(TargetError, match="trajectory store"):
        directions(store, run="r0", k=2, scheduler="threads", output=store, overwrite=True)
    assert _rows(store) == 8


@pytest.mark.parametrize("kill_at", [1, 12, 40])
def test_kill_while_rewriting_keeps_the_old_result(store, tmp_path, kill_at):
    # catches: killing `spectrum -o out.zarr` while it rewrote a result left neither the old nor a new one
    out = str(tmp_path / "res.zarr")
    old = spec(store, out)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            "spectrum",
            store,
            "--windows",
            "3,4",
            "-o",
            out,
            "--overwrite",
            "--threads",
            "--no-progress",
        ],
        env={**_env(), "KILL_AT": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -9, p.stderr
    xr.testing.assert_identical(open_results(out).load(), old)
    new = sed_dask.spectrum(store, windows=(3, 4), scheduler="threads", progress=False, output=out, overwrite=True)
    assert list(open_results(out).window.values) == [3, 4] and new.attrs[COMPLETE_ATTR]
    assert sorted(os.listdir(tmp_path)) == ["res.zarr"]  # the killed writer's sibling was cleaned up


def test_partial_results_store_is_refused_naming_what_is_missing(store, tmp_path, capsys):
    # catches: a results store killed mid-write opened with only a warning and `query` printed NaN stats
    out = str(tmp_path / "partial.zarr")
    ds = sed_dask.spectrum(store, windows=(3,), scheduler="threads", progress=False)
    keep = [v for v in ds.data_vars][:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[keep].to_zarr(out, mode="w", consolidated=False)  # what the old writer left when killed
    rc, err = run_cli(capsys, "query", out, "edge")
    assert rc == 2 and "incomplete" in err and "edge_ratio" in err and "consolidated" in err
    with pytest.raises(PartialResultsError, match="edge_ratio"):
        open_results(out)
    with pytest.warns(UserWarning, match="incomplete"):
        open_results(out, partial="warn")
    # a new-style store missing its marker (and a variable it announced) is named too
    new = str(tmp_path / "new.zarr")
    spec(store, new)
    g = zarr.open_group(new, mode="r+")
    del g.attrs[COMPLETE_ATTR]
    del g["k95"]
    zarr.consolidate_metadata(new)
    with pytest.raises(PartialResultsError, match="k95"):
        open_results(new)


def test_readers_name_what_a_path_is(store, tmp_path, capsys):
    # catches: query on a trajectory store said "unknown variable 'edge_ratio' (variables [])";
    # query on a plain Zarr group raised a KeyError about dimension_names
    rc, err = run_cli(capsys, "query", store, "edge")
    assert rc == 2 and "is a trajectory store" in err and "sed-dask spectrum" in err
    g = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    g.create_array("x", shape=(3,), dtype="f4")
    rc, err = run_cli(capsys, "query", str(tmp_path / "plain.zarr"), "edge")
    assert rc == 2 and "not a sed_dask results store" in err and "Traceback" not in err
    rc, err = run_cli(capsys, "report", store, "-o", str(tmp_path / "rep"))
    assert rc == 2 and "is a trajectory store" in err


def test_report_folder_is_never_clobbered(tmp_path):
    # catches: make_report wrote into any folder (user files mixed or replaced) and re-wrote reports silently
    from synthetic_results import grokking_results

    from sed_dask.report.summary import make_report

    ds = grokking_results(runs=("seed0",), windows=(5, 10), n_deltas=40)[0]
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("keep")
    with pytest.raises(TargetError, match="not a sed_dask report"):
        make_report(ds, d)
    assert os.listdir(d) == ["thesis.tex"]
    out = tmp_path / "rep"
    files = make_report(ds, out)
    assert files["html"] == out / "summary.html" and files["html"].exists()
    with pytest.raises(TargetError, match="overwrite"):
        make_report(ds, out)
    make_report(ds, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["mine", "rep"]
