"""Where the tasks run, by dask's rules (sed_dask.cluster.placement): an explicit scheduler, then a
client/address/scheduler file, an active Client, a configured cluster, the dask.config scheduler, and
by default the in-process threaded scheduler; and the reduction tree refuses a fan-in that never ends."""

from __future__ import annotations

import subprocess
import sys

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

import sed_dask
from sed_dask.cluster.placement import placement
from sed_dask.engine.passes import pass_settings, tree_reduce
from sed_dask.store.trajectory import write_trajectory
from sed_dask.testing import PlantedTrajectory


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("place")
    p = PlantedTrajectory(n_deltas=12, n_params=4000, rank=2, seed=1)
    params = np.concatenate([np.zeros((1, 4000)), np.cumsum(p.deltas(), axis=0)]).astype(np.float32)
    write_trajectory(d / "t.zarr", "r", p.steps, params, chunk_bytes=4096, shard_bytes=16384)
    return d / "t.zarr"


def test_default_is_in_process_threads():
    assert placement().scheduler == "threads"
    with dask.config.set(scheduler="sync"):
        assert placement().scheduler == "sync"
    with dask.config.set(scheduler="single-threaded"):
        assert placement().scheduler == "sync"
    with dask.config.set({"sed_dask.cluster": {"class": "distributed.LocalCluster"}}):
        assert not placement().local
    assert placement(scheduler="sync", address=None).scheduler == "sync"
    with pytest.raises(ValueError, match="cannot be combined with client="):
        placement(scheduler="threads", address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="scheduler='processes'"):
        placement(scheduler="processes")


def test_spectrum_runs_where_dask_config_says(store, monkeypatch):
    """No cluster is started by default, dask.config.set(scheduler='sync') is honoured, an active
    Client is used without being passed, and every placement gives the same bits."""
    import sed_dask.cluster.client as cc

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started although none was named")

    monkeypatch.setattr(cc, "connect", no_cluster)
    a = sed_dask.spectrum(store, windows=(3, 5), progress=False)
    with dask.config.set(scheduler="sync"):
        b = sed_dask.spectrum(store, windows=(3, 5), progress=False)
    monkeypatch.undo()
    for name in ("sigma", "edge_ratio", "k_star"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc,
        Client(lc) as client,
    ):
        assert placement().client is client
        before = len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
        c = sed_dask.spectrum(store, windows=(3, 5), progress=False)
        after = len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
        assert after > before  # the pass ran on the active client's cluster
    np.testing.assert_array_equal(a["sigma"].values, c["sigma"].values)


def test_split_every_one_is_refused_everywhere(store):
    with pytest.raises(ValueError, match=r"split_every must be an integer >= 2 .* got 1"):
        pass_settings(split_every=1)
    with pytest.raises(ValueError, match=r"split_every must be an integer >= 2"):
        tree_reduce({}, [("a", 0), ("a", 1)], "s", sum, split_every=1)
    from sed_dask.engine.directions import block_pass, read_block, window_stack

    stack = window_stack(sed_dask.open_store(store, mode="r").run("r"), window=5)
    with pytest.raises(ValueError, match=r"split_every must be an integer >= 2"):
        block_pass(stack, read_block, scheduler="sync", split_every=1)  # once hung forever
    with dask.config.set({"sed_dask.spectrum.split-every": 1}), pytest.raises(ValueError, match="split_every"):
        sed_dask.directions(store, run="r", window=5, k=2, scheduler="sync")


def test_cli_default_runs_in_process(store, tmp_path):
    code = (
        "import sys, sed_dask.cluster.client as c\n"
        "def boom(*a, **k): raise SystemExit('cluster started')\n"
        "c.connect = boom\n"
        "from sed_dask.cli import main\n"
        f"sys.exit(main(['spectrum', {str(store)!r}, '--windows', '3', '-o', {str(tmp_path / 'r.zarr')!r}, "
        "'--no-progress']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sed_dask",
            "spectrum",
            str(store),
            "--windows",
            "3",
            "--threads",
            "--local-cluster",
            "2",
            "-o",
            str(tmp_path / "x.zarr"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--threads runs in this process" in r.stderr
