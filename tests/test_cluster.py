"""sed_dask.cluster.connect against real scheduler/worker processes, config precedence, SLURMRunner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import dask
import dask.array as da
import pytest
import yaml
import zarr
from distributed import Client, LocalCluster
from distributed.client import _get_global_client
from procs import dask_procs  # noqa: F401  (fixture)

from sed_dask.cluster.client import PLUGIN_NAME, connect, probe_scheduler
from sed_dask.config import ConfigError, configure_zarr, load_config_file, use_config

MARGIN = 3.0  # seconds on top of a timeout: thread start-up and a loaded 2-core machine


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(**kw) -> dict:
    return {"processes": False, "dashboard_address": ":0", "threads_per_worker": 1, **kw}


# ----------------------------------------------------------------------------- real processes
def test_real_processes_by_address_and_scheduler_file_then_sigkill(dask_procs, tmp_path):
    dask_procs.start_scheduler(wait=False)  # workers wait for the scheduler file themselves
    for var in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        dask_procs.env.pop(var, None)  # (a LocalCluster earlier in the session may have exported them)
    dask_procs.start_workers(2, nthreads=1, memory_limit="1GiB")
    addr = dask_procs.address
    procs_pids = {n: p.pid for n, p in dask_procs.workers.items()}
    # address beats a (missing) scheduler file and a cluster section that cannot even be imported
    with dask.config.set(
        {"sed_dask.store.zarr-async-concurrency": 3, "sed_dask.cluster": {"class": "no_such_module.Cluster"}}
    ):
        with connect(address=addr, scheduler_file=str(tmp_path / "missing.json"), timeout=10) as c:
            assert c.scheduler.address == addr
            x = da.arange(100_000, chunks=10_000, dtype="int64")
            assert int(c.compute(x.sum()).result()) == 100_000 * 99_999 // 2
            # separate OS processes, exactly the ones launched; the zarr plugin ran in each
            assert sorted(dask_procs.worker_pids().values()) == sorted(procs_pids.values())
            assert os.getpid() not in procs_pids.values()
            assert set(c.run(lambda: zarr.config.get("async.concurrency")).values()) == {3}
            assert PLUGIN_NAME in c.run(lambda dask_worker: list(dask_worker.plugins)).popitem()[1]
            # no nanny, so no OPENBLAS_NUM_THREADS=1 from it: the plugin pins BLAS to one thread
            from sed_dask.cluster.blas import _openblas

            assert set(c.run(lambda: os.environ.get("OPENBLAS_NUM_THREADS")).values()) == {None}
            assert set(c.run(lambda: tuple(get() for get, _ in _openblas())).values()) == {(1,)}
        with connect(scheduler_file=str(dask_procs.scheduler_file), timeout=10) as c:
            assert c.scheduler.address == addr
            assert c.submit(lambda a, b: a * b, 6, 7, pure=False).result() == 42
    # connect closed only its own clients; the external cluster lives on
    assert dask_procs.scheduler.alive() and len(dask_procs.live_workers()) == 2

    # SIGKILL one worker: the process is gone, the scheduler drops it, work goes on
    killed = dask_procs.kill_worker("w0")
    assert killed == "w0" and dask_procs.workers["w0"].popen.returncode == -signal.SIGKILL
    with connect(address=addr, timeout=10) as c:
        deadline = time.monotonic() + 20
        while len(c.scheduler_info(n_workers=-1)["workers"]) != 1:
            assert time.monotonic() < deadline, "scheduler never noticed the killed worker"
            time.sleep(0.05)
        assert c.submit(sum, [1, 2, 3], pure=False).result() == 6


# ----------------------------------------------------------------------------- unreachable
def test_unreachable_scheduler_is_a_connection_error_within_the_timeout():
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"could not reach a Dask scheduler at {addr} within 1.5 s"):
        with connect(address=addr, timeout=1.5):
            pass
    assert time.monotonic() - t0 < 1.5 + MARGIN
    # the default bound comes from sed_dask.connect.timeout
    with dask.config.set({"sed_dask.connect.timeout": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"within 1 s"):
            with connect(address=addr):
                pass
        assert time.monotonic() - t0 < 1 + MARGIN


def test_a_silent_listener_is_not_taken_for_a_scheduler():
    """A port that accepts but never answers (a plain Client would wait forever)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        addr = "tcp://127.0.0.1:%d" % srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="did not answer like a Dask scheduler"):
            probe_scheduler(addr, timeout=1)
        assert time.monotonic() - t0 < 1 + MARGIN


def test_scheduler_file_missing_or_stale(tmp_path):
    missing = tmp_path / "nope.json"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="nope.json.*does not exist"):
        with connect(scheduler_file=str(missing), timeout=1):
            pass
    assert time.monotonic() - t0 < 1 + MARGIN
    stale = tmp_path / "stale.json"
    port = _free_port()
    stale.write_text(json.dumps({"address": f"tcp://127.0.0.1:{port}", "type": "Scheduler"}))
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}.*stale.json"):
        with connect(scheduler_file=str(stale), timeout=1):
            pass


# ----------------------------------------------------------------------------- cluster section
def test_cluster_section_instantiates_class_by_import_string_and_scales():
    section = {
        "class": "distributed.LocalCluster",
        "kwargs": _local(**{"n-workers": 0}),
        "scale": 2,
        "wait-for-workers": 2,
    }
    with dask.config.set({"sed_dask.cluster": section}):
        with connect() as c:
            cluster = c.cluster
            assert type(cluster) is LocalCluster
            assert len(c.scheduler_info()["workers"]) == 2
            assert c.submit(lambda: 5, pure=False).result() == 5
    assert cluster.status.name == "closed"
    # adapt instead of scale, given as an argument (beats the config section)
    section = {
        "class": "distributed.LocalCluster",
        "kwargs": _local(n_workers=0),
        "adapt": {"minimum": 1, "maximum": 2},
        "wait_for_workers": 1,
    }
    with dask.config.set({"sed_dask.cluster": {"class": "no_such_module.Cluster"}}):
        with connect(cluster_config=section) as c:
            assert c.cluster._adaptive is not None
            assert 1 <= len(c.scheduler_info()["workers"]) <= 2
        assert c.cluster.status.name == "closed"


@pytest.mark.parametrize(
    "section, match",
    [
        ({"kwargs": {}}, "needs 'class'"),
        ({"class": "distributed.LocalCluster", "scal": 2}, "unknown keys.*scal"),
        ({"class": "distributed.LocalCluster", "scale": 1, "adapt": {"maximum": 2}}, "either 'scale' or 'adapt'"),
        ({"class": "no_such_pkg.Cluster"}, "cannot be imported"),
        ({"class": "distributed.NoSuchCluster"}, "has no attribute 'NoSuchCluster'"),
        ({"class": "LocalCluster"}, "import string"),
    ],
)
def test_cluster_section_errors_are_clear(section, match):
    with pytest.raises(ConfigError, match=match):
        with connect(cluster_config=section):
            pass


# ----------------------------------------------------------------------------- precedence
def test_connection_precedence_in_process():
    assert _get_global_client() is None
    with LocalCluster(n_workers=1, **_local()) as lc:
        # 1. an explicit client beats an (unreachable) address and is not closed
        with Client(lc, set_as_default=False) as mine:
            with connect(mine, address=f"tcp://127.0.0.1:{_free_port()}", timeout=1) as c:
                assert c is mine
            assert mine.status == "running"
        # 5. a running default client beats dask's scheduler-address and the LocalCluster
        with Client(lc, set_as_default=True) as default:
            with dask.config.set({"scheduler-address": f"tcp://127.0.0.1:{_free_port()}"}):
                with connect() as c:
                    assert c is default
            assert default.status == "running"
        assert _get_global_client() is None
        # 6. dask's scheduler-address config: a new client, closed afterwards
        with dask.config.set({"scheduler-address": lc.scheduler_address}):
            with connect(timeout=5) as c:
                assert c.scheduler.address == lc.scheduler_address and c.cluster is None
            assert c.status == "closed"
    # 7. nothing at all: a temporary LocalCluster, closed afterwards
    with connect(local_kwargs=_local(n_workers=1)) as c:
        tmp = c.cluster
        assert isinstance(tmp, LocalCluster) and len(c.scheduler_info()["workers"]) == 1
    assert tmp.status.name == "closed"


def test_configure_zarr_is_idempotent_and_validated():
    before = zarr.config.get("async.concurrency")
    with zarr.config.set({"async.concurrency": 10}):
        assert configure_zarr(async_concurrency=5)["async_concurrency"] == 5
        assert zarr.config.get("async.concurrency") == 5
        with dask.config.set({"sed_dask.store.zarr-async-concurrency": 7}):
            assert configure_zarr()["async_concurrency"] == 7
            assert configure_zarr()["async_concurrency"] == 7
        with pytest.raises(ConfigError, match=">= 1"):
            configure_zarr(async_concurrency=0)
        assert zarr.config.get("async.concurrency") == 7
    assert zarr.config.get("async.concurrency") == before


def test_config_file_loading_and_whole_cluster_replacement(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sed_dask:\n  store: {chunk-bytes: 1MiB}\n  cluster: {class: distributed.LocalCluster}\n")
    section = load_config_file(f)
    assert section == {"store": {"chunk-bytes": "1MiB"}, "cluster": {"class": "distributed.LocalCluster"}}
    g = tmp_path / "bare.yaml"
    g.write_text("connect: {timeout: 3s}\n")
    assert load_config_file(g) == {"connect": {"timeout": "3s"}}
    with dask.config.set({"sed_dask.cluster": {"class": "dask_jobqueue.SLURMCluster", "kwargs": {"cores": 8}}}):
        with use_config(section):
            # the cluster section is replaced as a whole: SLURMCluster kwargs do not leak in
            assert dask.config.get("sed_dask.cluster") == {"class": "distributed.LocalCluster"}
            assert dask.config.get("sed_dask.store.chunk-bytes") == "1MiB"
            assert dask.config.get("sed_dask.store.shard-bytes") == "64MiB"  # other keys kept
        assert dask.config.get("sed_dask.cluster.kwargs.cores") == 8
    for text, match in [
        ("sed_dask: {bogus: 1}\n", "unknown sed_dask sections"),
        ("sed_dask: {}\ndistributed: {}\n", "unexpected top-level"),
        ("- a\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
    ]:
        g.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config_file(g)
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------- precedence across processes
PRECEDENCE_SCRIPT = """
import argparse, json, socket, sys, time
import dask
from sed_dask import config
from sed_dask.cli import add_cluster_args, connect_from_args
from sed_dask.cluster.client import _seconds, connect
import sed_dask.cluster.deploy

out = {"light": [m for m in ("torch", "sed_dask.engine.gram", "sed_dask.results.spectra") if m in sys.modules],
       "chunk": config.get_bytes("store.chunk-bytes"), "shard": config.get_bytes("store.shard-bytes"),
       "conc": config.get("store.zarr-async-concurrency"), "kw": config.get_bytes("store.chunk-bytes", 1024),
       "timeout": _seconds(None)}
with dask.config.set({"sed_dask.store.chunk-bytes": "2MiB"}):
    out["set"] = config.get_bytes("store.chunk-bytes")
with connect() as c:
    out["cluster"] = [type(c.cluster).__name__, len(c.scheduler_info()["workers"])]
p = argparse.ArgumentParser()
add_cluster_args(p)
with connect_from_args(p.parse_args(["--config", sys.argv[1]])) as c:
    out["file_timeout"] = _seconds(None)
    out["file_cluster"] = [type(c.cluster).__name__, len(c.scheduler_info()["workers"])]
out["after_file_timeout"] = _seconds(None)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
args = p.parse_args(["--config", sys.argv[1], "--scheduler-address", f"tcp://127.0.0.1:{port}",
                     "--connect-timeout", "1"])
t0 = time.monotonic()
try:
    with connect_from_args(args):
        pass
except ConnectionError as exc:
    out["flag_error"] = [str(port) in str(exc), time.monotonic() - t0]
print("RESULT " + json.dumps(out))
"""


def test_config_precedence_yaml_env_file_keyword_in_a_subprocess(tmp_path):
    """package yaml < DASK_CONFIG yaml < DASK_SED_DASK__ env < --config file < flags/keywords."""
    confdir = tmp_path / "dask-config"
    confdir.mkdir()
    (confdir / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "sed_dask": {
                    "store": {"chunk-bytes": "8MiB", "shard-bytes": "128MiB"},
                    "connect": {"timeout": "7s"},
                    "cluster": {"class": "distributed.LocalCluster", "kwargs": _local(n_workers=1)},
                }
            }
        )
    )
    cfgfile = tmp_path / "run.yaml"
    cfgfile.write_text(
        yaml.safe_dump(
            {
                "connect": {"timeout": "11s"},
                "cluster": {"class": "distributed.LocalCluster", "kwargs": _local(n_workers=2)},
            }
        )
    )
    script = tmp_path / "precedence.py"
    script.write_text(textwrap.dedent(PRECEDENCE_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(
        {
            "HOME": str(tmp_path),
            "DASK_CONFIG": str(confdir),
            "DASK_SED_DASK__STORE__SHARD_BYTES": "256MiB",
            "DASK_SED_DASK__CONNECT__TIMEOUT": "9s",
            "DASK_SED_DASK__CLUSTER__KWARGS__N_WORKERS": "3",
        }
    )
    r = subprocess.run(
        [sys.executable, str(script), str(cfgfile)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["light"] == []  # cluster/deploy/cli import no torch, no spectral code
    assert out["chunk"] == 8 * 2**20  # yaml beats the package default (4MiB)
    assert out["shard"] == 256 * 2**20  # env beats yaml (128MiB)
    assert out["conc"] == 4  # untouched package default
    assert out["kw"] == 1024  # keyword beats everything
    assert out["set"] == 2 * 2**20  # dask.config.set beats yaml
    assert out["timeout"] == 9  # env beats yaml (7s)
    assert out["cluster"] == ["LocalCluster", 3]  # yaml cluster section, env merged into it
    assert out["file_timeout"] == 11  # --config beats env
    assert out["file_cluster"] == ["LocalCluster", 2]  # replaced whole: env's n_workers=3 does not leak
    assert out["after_file_timeout"] == 9  # undone when the context exits
    assert out["flag_error"][0] and out["flag_error"][1] < 1 + MARGIN  # --connect-timeout beats the file


# ----------------------------------------------------------------------------- SLURMRunner
RUNNER_SCRIPT = """
import json, os, sys
from sed_dask.cluster import connect
with connect() as c:
    out = {"rank": os.environ["SLURM_PROCID"], "result": c.submit(lambda x: x + 1, 41).result(),
           "workers": len(c.scheduler_info()["workers"])}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


def test_slurm_runner_from_the_cluster_section_under_emulated_srun(tmp_path):
    """Three ranks as srun starts them: 0 = scheduler, 1 = client code, 2 = worker."""
    pytest.importorskip("dask_jobqueue")
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(RUNNER_SCRIPT))
    section = {
        "class": "dask_jobqueue.slurm.SLURMRunner",
        "kwargs": {
            "scheduler_file": str(tmp_path / "scheduler-{job_id}.json"),
            "worker_options": {"nthreads": 1, "memory_limit": "1GiB"},
        },
        "wait-for-workers": 1,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "SLURM_"))}
    env.update({"SLURM_NTASKS": "3", "SLURM_JOB_ID": "4242", "DASK_SED_DASK__CLUSTER": repr(section)})
    ranks = []
    for rank in range(3):
        log = open(tmp_path / f"rank{rank}.log", "w")
        ranks.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), str(tmp_path / "out.json")],
                    env={**env, "SLURM_PROCID": str(rank)},
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                log,
            )
        )
    try:
        codes = [p.wait(timeout=90) for p, _ in ranks]
    finally:
        for p, log in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    logs = {i: (tmp_path / f"rank{i}.log").read_text() for i in range(3)}
    assert codes == [0, 0, 0], {i: text[-2000:] for i, text in logs.items()}
    assert json.loads((tmp_path / "out.json").read_text()) == {"rank": "1", "result": 42, "workers": 1}
    assert "Scheduler at:" in logs[0] and "Start worker at:" in logs[2]
    assert f"Starting Worker plugin {PLUGIN_NAME}" in logs[2]
