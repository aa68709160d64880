"""Rendering SLURM scripts, the DaskCluster resource and Helm values from sed_dask config."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import re
import shlex
import subprocess
from pathlib import Path

import dask
import pytest
import yaml

from sed_dask.cluster import deploy
from sed_dask.cluster.client import _check_cluster_section
from sed_dask.config import ConfigError, load_config_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

CONFIG = {
    "deploy": {
        "image": "registry.example.org/ml/sed-dask:1.2.3",
        "store-url": "s3://bucket/sed",
        "worker": {
            "cores": 8,
            "processes": 2,
            "memory": "32GiB",
            "lifetime": "55m",
            "lifetime-stagger": "4m",
            "env": {"OMP_NUM_THREADS": 1},
            "extra-args": ["--no-dashboard"],
        },
        "slurm": {
            "queue": "cpu",
            "account": "proj42",
            "walltime": "02:00:00",
            "interface": "ib0",
            "python": "/opt/sed/bin/python",
            "local-directory": "$TMPDIR",
            "job-script-prologue": ["module load python/3.11"],
            "job-extra-directives": ["--constraint=cpu"],
            "runner": {"n-workers": 3, "scheduler-file": "/shared/sched-$SLURM_JOB_ID.json"},
        },
        "kubernetes": {
            "name": "sed-a",
            "namespace": "ml",
            "n-workers": 6,
            "pvc": "sed-store",
            "mount-path": "/data",
            "local-directory": "/scratch",
            "scratch-size": "50Gi",
            "secret": "s3-creds",
            "scheduler": {"cores": 2, "memory": "8GiB"},
        },
    }
}


def _bash_ok(tmp_path, text):
    f = tmp_path / "script.sh"
    f.write_text(text)
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _directives(script):
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


# ----------------------------------------------------------------------------- SLURM
def test_slurm_job_script_carries_the_config(tmp_path):
    pytest.importorskip("dask_jobqueue")
    cfg = {
        "deploy": {**CONFIG["deploy"], "slurm": {**CONFIG["deploy"]["slurm"], "log-directory": str(tmp_path / "logs")}}
    }
    script = deploy.slurm_job_script(cfg)
    d = _directives(script)
    assert "--cpus-per-task=8" in d and "--mem=32G" in d and "-t 02:00:00" in d
    assert "-p cpu" in d and "-A proj42" in d and "--constraint=cpu" in d
    assert f"-o {tmp_path}/logs/%x-%j.out" in d
    assert not (tmp_path / "logs").exists()  # rendering creates nothing
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body[0] == "module load python/3.11"
    assert "export SED_DASK_STORE=s3://bucket/sed" in body and "export OMP_NUM_THREADS=1" in body
    cmd = shlex.split(body[-1], posix=True)
    assert cmd[:3] == ["/opt/sed/bin/python", "-m", "distributed.cli.dask_worker"]
    flags = " ".join(cmd)
    for part in (
        "--nthreads 4",
        "--nworkers 2",
        "--memory-limit 16.00GiB",
        "--nanny",
        "--lifetime 55m --lifetime-stagger 4m",
        "--local-directory $TMPDIR",
        "--interface ib0",
        "--death-timeout 60",
        "--no-dashboard",
    ):
        assert part in flags, part
    assert "${DASK_SCHEDULER_ADDRESS:?" in body[-1]
    _bash_ok(tmp_path, script)
    with_addr = deploy.slurm_job_script({"deploy": {"slurm": {"scheduler-address": "tcp://login1:8786"}}})
    assert "dask_worker tcp://login1:8786 " in with_addr


def test_slurm_kwargs_give_the_same_job_as_slurmcluster():
    """Our kwargs fed to dask-jobqueue's SLURMCluster yield the script we render."""
    jq = pytest.importorskip("dask_jobqueue")
    # no interface: SLURMCluster would bind its local scheduler to ib0 too
    cfg = {"deploy": {**CONFIG["deploy"], "slurm": {**CONFIG["deploy"]["slurm"], "interface": None}}}
    kwargs = deploy.slurm_cluster_kwargs(cfg)
    with jq.SLURMCluster(**kwargs, job_name="sed-dask-worker", scheduler_options={"dashboard_address": ":0"}) as cl:
        real = cl.job_script()
    ours = deploy.slurm_job_script(cfg)
    assert _directives(real) == _directives(ours)

    def tokens(script):
        cmd = script.strip().splitlines()[-1].split()
        i = cmd.index("--name")
        return cmd[:3] + cmd[i + 2 :]  # drop the scheduler address and the worker name

    assert tokens(real) == tokens(ours)


def test_jobqueue_yaml_reproduces_the_kwargs():
    """A site jobqueue.yaml rendered from our config makes SLURMCluster() need no kwargs."""
    from dask_jobqueue.slurm import SLURMJob

    doc = yaml.safe_load(deploy.render("jobqueue", CONFIG))
    flat = {f"jobqueue.slurm.{k}": v for k, v in doc["jobqueue"]["slurm"].items()}
    kwargs = deploy.slurm_cluster_kwargs(CONFIG)
    explicit = SLURMJob(scheduler="tcp://s:1", name="n", job_name="sed-dask-worker", **kwargs).job_script()
    with dask.config.set(flat):
        from_yaml = SLURMJob(scheduler="tcp://s:1", name="n").job_script()
    assert from_yaml == explicit


def test_slurm_runner_script(tmp_path):
    script = deploy.slurm_runner_script(CONFIG)
    d = _directives(script)
    assert "--ntasks=5" in d and "--cpus-per-task=8" in d and "-t 02:00:00" in d
    assert f"--mem-per-cpu={math.ceil(32 * 1024 / 8)}M" in d
    _bash_ok(tmp_path, script)
    heredoc = script.split("<<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    cfg = yaml.safe_load(heredoc)["sed_dask"]["cluster"]
    checked = _check_cluster_section(cfg)  # what connect() will accept on every rank
    assert checked["class"] == "dask_jobqueue.slurm.SLURMRunner" and checked["wait-for-workers"] == 3
    assert cfg["kwargs"]["scheduler_file"] == "/shared/sched-{job_id}.json"
    assert cfg["kwargs"]["worker_options"] == {
        "nthreads": 8,
        "memory_limit": "32GiB",
        "death_timeout": 60,
        "interface": "ib0",
    }
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [
        'srun bash -c \'export DASK_TEMPORARY_DIRECTORY="$TMPDIR"; exec sed-dask "$@"\' '
        'sed-dask "$@" --config "$CONFIG"'
    ]
    assert "module load python/3.11" in script and "export SED_DASK_STORE=s3://bucket/sed" in script


# ----------------------------------------------------------------------------- Kubernetes
def test_kubernetes_cluster_spec():
    spec = deploy.kubernetes_cluster_spec(CONFIG)
    assert spec["apiVersion"] == "kubernetes.dask.org/v1" and spec["kind"] == "DaskCluster"
    assert spec["metadata"] == {"name": "sed-a", "namespace": "ml"}
    # the layout dask_kubernetes.operator.make_cluster_spec produces (CRD: spec.worker/scheduler)
    assert set(spec["spec"]) == {"idleTimeout", "worker", "scheduler"}
    assert set(spec["spec"]["scheduler"]) == {"spec", "service"}
    w = spec["spec"]["worker"]
    assert w["replicas"] == 6
    (c,) = w["spec"]["containers"]
    assert c["image"] == "registry.example.org/ml/sed-dask:1.2.3"
    args = c["args"]
    assert args[:4] == ["dask", "worker", "--name", "$(DASK_WORKER_NAME)"]
    joined = " ".join(args)
    for part in (
        "--nthreads 8",
        "--memory-limit 32GiB",
        "--lifetime 55m --lifetime-stagger 4m",
        "--local-directory /scratch",
        "--death-timeout 60",
        "--no-dashboard",
    ):
        assert part in joined, part
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}}
    assert {"name": "SED_DASK_STORE", "value": "s3://bucket/sed"} in c["env"]
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in c["env"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert c["volumeMounts"] == [
        {"name": "sed-store", "mountPath": "/data"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    assert w["spec"]["volumes"] == [
        {"name": "sed-store", "persistentVolumeClaim": {"claimName": "sed-store"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}},
    ]
    (s,) = spec["spec"]["scheduler"]["spec"]["containers"]
    assert s["args"][:2] == ["dask", "scheduler"] and s["image"] == c["image"]
    assert s["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert spec["spec"]["scheduler"]["service"]["selector"] == {
        "dask.org/cluster-name": "sed-a",
        "dask.org/component": "scheduler",
    }
    assert {p["containerPort"] for p in s["ports"]} == {8786, 8787}


def test_kubernetes_object_store_variant_and_yaml_round_trip():
    cfg = {"deploy": {"store-url": "gs://bucket/sed", "kubernetes": {"pvc": None, "local-directory": None}}}
    spec = deploy.kubernetes_cluster_spec(cfg)
    (c,) = spec["spec"]["worker"]["spec"]["containers"]
    assert "volumes" not in spec["spec"]["worker"]["spec"] and "volumeMounts" not in c
    assert {"name": "SED_DASK_STORE", "value": "gs://bucket/sed"} in c["env"]
    assert "--local-directory" not in c["args"]
    text = deploy.render("k8s", cfg)
    assert "&id" not in text and yaml.safe_load(text) == spec


def test_helm_values():
    v = deploy.helm_values(CONFIG)
    w = v["worker"]
    assert w["image"] == {
        "repository": "registry.example.org/ml/sed-dask",
        "tag": "1.2.3",
        "pullPolicy": "IfNotPresent",
        "dask_worker": "dask-worker",
    }
    assert v["scheduler"]["image"]["tag"] == "1.2.3" and v["jupyter"] == {"enabled": False}
    assert w["replicas"] == 6 and w["threads_per_worker"] == 8
    assert w["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    assert " ".join(w["extraArgs"]) == (
        "--death-timeout 60 --lifetime 55m --lifetime-stagger 4m --local-directory /scratch --no-dashboard"
    )
    assert w["mounts"]["volumeMounts"][0] == {"name": "sed-store", "mountPath": "/data"}


@pytest.mark.parametrize(
    "fn, cfg, match",
    [
        ("kubernetes_cluster_spec", {"worker": {"lifetme": "5m"}}, r"worker\.lifetme: unknown setting"),
        ("slurm_cluster_kwargs", {"worker": {"lifetime-stagger": "4m"}}, "needs worker.lifetime"),
        ("slurm_cluster_kwargs", {"worker": {"cores": 6, "processes": 4}}, "multiple of processes"),
        ("kubernetes_cluster_spec", {"worker": {"cores": 0}}, "must be >= 1"),
        ("kubernetes_cluster_spec", {"kubernetes": {"local-directory": "$TMPDIR"}}, "absolute path inside"),
        ("helm_values", {"image": "registry.example.org:5000/sed-dask"}, "pinned tag"),
    ],
)
def test_invalid_deploy_settings_are_named(fn, cfg, match):
    with pytest.raises(ConfigError, match=match):
        getattr(deploy, fn)({"deploy": cfg})


def test_env_and_keywords_override_package_defaults():
    with dask.config.set({"sed_dask.deploy.worker.memory": "64GiB", "sed_dask.deploy.kubernetes.n_workers": 9}):
        spec = deploy.kubernetes_cluster_spec()
        assert spec["spec"]["worker"]["replicas"] == 9
        assert spec["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "64Gi"
        # the config argument beats dask config
        spec = deploy.kubernetes_cluster_spec({"deploy": {"worker": {"memory": "2GiB"}}})
        assert spec["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "2Gi"


# ----------------------------------------------------------------------------- CLI and checked-in files
def _cli(argv):
    from sed_dask.cli import deploy as deploy_cli

    p = argparse.ArgumentParser(prog="sed-dask")
    deploy_cli.register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_prints_and_writes(tmp_path, capsys):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"sed_dask": CONFIG}))
    assert _cli(["deploy", "k8s", "--config", str(cfg)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == deploy.kubernetes_cluster_spec(CONFIG)
    out = tmp_path / "runner.sbatch"
    assert _cli(["deploy", "slurm-runner", "--config", str(cfg), "-o", str(out)]) == 0
    assert out.read_text() == deploy.slurm_runner_script(CONFIG) and out.stat().st_mode & 0o111


@pytest.mark.parametrize(
    "target, path",
    [
        ("k8s", "k8s/daskcluster.yaml"),
        ("helm", "k8s/helm-values.yaml"),
        ("jobqueue", "slurm/jobqueue.yaml"),
        ("slurm-runner", "slurm/sed-dask-runner.sbatch"),
    ],
)
def test_checked_in_files_are_what_the_example_config_renders(target, path):
    cfg = load_config_file(DEPLOY / "sed-dask.yaml")
    assert (DEPLOY / path).read_text() == deploy.render(target, cfg), (
        f"re-render: sed-dask deploy {target} --config deploy/sed-dask.yaml -o deploy/{path}"
    )


def test_client_job_matches_the_cluster():
    cfg = load_config_file(DEPLOY / "sed-dask.yaml")
    spec = deploy.kubernetes_cluster_spec(cfg)
    job = yaml.safe_load((DEPLOY / "k8s" / "sed-dask-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == cfg["deploy"]["image"]
    assert f"tcp://{spec['metadata']['name']}-scheduler:8786" in c["args"]
    claim = spec["spec"]["worker"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    pvc = yaml.safe_load((DEPLOY / "k8s" / "pvc.yaml").read_text())
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _public(version: str) -> str:
    """Drop a local label (``2.13.0+cpu`` -> ``2.13.0``): pins carry none, so any index resolves them."""
    return version.split("+", 1)[0]


def test_image_pins_match_the_tested_environment():
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for core in ("dask", "distributed", "zarr", "xarray", "numpy", "fsspec", "torch"):
        assert pins[core] == _public(importlib.metadata.version(core)), core
    for name, version in pins.items():
        assert "+" not in version, f"{name}=={version}: a local version label is not on public PyPI"
        try:
            assert version == _public(importlib.metadata.version(name)), name
        except importlib.metadata.PackageNotFoundError:
            pass  # extras not installed here (s3fs)
    docker = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG PYTHON_VERSION={platform.python_version()}" in docker
    torch_pin = re.search(r'"torch==([^"]+)"', docker).group(1)
    assert torch_pin == pins["torch"] and "download.pytorch.org/whl/cpu" in docker
    assert "--constraint constraints.txt" in docker
