"""Render deployment files from the ``sed_dask.deploy`` config section.

Client, scheduler and workers must agree on image, versions, cores, memory, worker lifetime and
spill directory; rendering every target from one section keeps a SLURM job script, a
``DaskCluster`` for the dask operator and Helm values for the ``dask/dask`` chart consistent.
Settings come from the package defaults < ``~/.config/dask`` < ``DASK_SED_DASK__DEPLOY__...``
< the ``config`` argument (a ``sed_dask`` section, e.g. from ``load_config_file``).

The DaskCluster is built here, not with ``dask_kubernetes.operator.make_cluster_spec``:
dask-kubernetes pulls the Kubernetes client stack, and its templates start ``dask-scheduler`` /
``dask-worker``, console scripts that distributed no longer ships (we use ``dask scheduler`` /
``dask worker``). The dict follows the operator's CRD (``kubernetes.dask.org/v1``) and the layout
``make_cluster_spec`` produces, so it also works as ``KubeCluster(custom_cluster_spec=...)``.
"""

from __future__ import annotations

import math
import shlex

import dask.config
import yaml
from dask.utils import parse_bytes

from sed_dask.config import ConfigError

API_VERSION = "kubernetes.dask.org/v1"
TARGETS = ("slurm", "slurm-runner", "jobqueue", "k8s", "helm")


# ----------------------------------------------------------------------------- settings
def _canon(d, path=""):
    """Hyphenated keys (YAML and env may use either), except inside ``env`` (variable names)."""
    if not isinstance(d, dict):
        return d
    if path.endswith(".env"):
        return {str(k): v for k, v in d.items()}
    return {str(k).replace("_", "-"): _canon(v, f"{path}.{str(k).replace('_', '-')}") for k, v in d.items()}


def _check(given: dict, known: dict, path: str) -> None:
    for k, v in given.items():
        if k not in known:
            raise ConfigError(f"{path}.{k}: unknown setting; known: {sorted(known)}")
        if isinstance(known[k], dict) and k != "env" and isinstance(v, dict):
            _check(v, known[k], f"{path}.{k}")


def resolve(config: dict | None = None) -> dict:
    """The effective deploy settings: dask config, then ``config["deploy"]`` on top."""
    from sed_dask.config import package_defaults

    base = _canon(dask.config.get("sed_dask.deploy"), "deploy")
    section = dict(config or {})
    if set(section) == {"sed_dask"}:
        section = section["sed_dask"] or {}
    given = _canon(section.get("deploy") or {}, "deploy")
    _check(given, package_defaults("deploy"), "sed_dask.deploy")
    return dask.config.merge(base, given)


def _quantity(value) -> str:
    """Bytes as a Kubernetes quantity (16GiB -> 16Gi)."""
    n = int(parse_bytes(value)) if isinstance(value, str) else int(value)
    for unit, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _lifetime_args(w: dict) -> list[str]:
    args = []
    if w.get("lifetime"):
        args += ["--lifetime", str(w["lifetime"])]
        if w.get("lifetime-stagger"):
            args += ["--lifetime-stagger", str(w["lifetime-stagger"])]
    elif w.get("lifetime-stagger"):
        raise ConfigError("sed_dask.deploy.worker.lifetime-stagger needs worker.lifetime")
    return args


def _env(d: dict) -> dict[str, str]:
    env = {str(k): str(v) for k, v in (d["worker"].get("env") or {}).items()}
    if d.get("store-url"):
        env.setdefault("SED_DASK_STORE", str(d["store-url"]))
    return env


def _positive(value, key: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"sed_dask.deploy.{key} must be an integer, got {value!r}") from None
    if v < 1:
        raise ConfigError(f"sed_dask.deploy.{key} must be >= 1, got {v}")
    return v


# ----------------------------------------------------------------------------- SLURM
def slurm_cluster_kwargs(config: dict | None = None) -> dict:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` (``cores``/``memory`` are per job)."""
    d = resolve(config)
    w, s = d["worker"], d["slurm"]
    cores = _positive(w["cores"], "worker.cores")
    processes = _positive(w["processes"], "worker.processes")
    if cores % processes:
        raise ConfigError(f"sed_dask.deploy.worker.cores ({cores}) must be a multiple of processes ({processes})")
    kw = {
        "cores": cores,
        "processes": processes,
        "memory": str(w["memory"]),
        "walltime": s["walltime"],
        "death_timeout": w["death-timeout"],
        "worker_extra_args": _lifetime_args(w) + [str(a) for a in w.get("extra-args") or []],
        "job_script_prologue": list(s.get("job-script-prologue") or [])
        + [f"export {k}={shlex.quote(v)}" for k, v in _env(d).items()],
        "job_extra_directives": list(s.get("job-extra-directives") or []),
        "job_directives_skip": list(s.get("job-directives-skip") or []),
    }
    for key in ("queue", "account", "interface", "python", "log-directory", "local-directory"):
        if s.get(key) is not None:
            kw[key.replace("-", "_")] = s[key]
    return kw


def jobqueue_config(config: dict | None = None) -> dict:
    """A ``jobqueue.yaml`` document (``jobqueue: slurm: ...``): ``SLURMCluster()`` then needs no kwargs."""
    kw = slurm_cluster_kwargs(config)
    kw.setdefault("local_directory", None)
    return {"jobqueue": {"slurm": {"name": "sed-dask-worker", **{k.replace("_", "-"): v for k, v in kw.items()}}}}


def slurm_job_script(config: dict | None = None) -> str:
    """The sbatch script of one worker job, as ``SLURMCluster(**slurm_cluster_kwargs()).job_script()``.

    Rendered with dask-jobqueue's own ``SLURMJob`` (no scheduler is started). The worker joins
    ``deploy.slurm.scheduler-address``, else ``$DASK_SCHEDULER_ADDRESS`` at run time, e.g.
    ``sbatch --export=ALL,DASK_SCHEDULER_ADDRESS=tcp://login1:8786 worker.sh``.
    """
    try:
        from dask_jobqueue.slurm import SLURMJob
    except ImportError as exc:
        raise ConfigError("rendering a SLURM job script needs dask-jobqueue: pip install 'sed_dask[slurm]'") from exc
    d = resolve(config)
    kw = slurm_cluster_kwargs(config)
    logdir = kw.pop("log_directory", None)
    if logdir:  # dask-jobqueue would create the directory on this machine while rendering
        kw["job_extra_directives"] = [f"-o {logdir}/%x-%j.out", f"-e {logdir}/%x-%j.err", *kw["job_extra_directives"]]
    scheduler = (
        d["slurm"].get("scheduler-address")
        or '"${DASK_SCHEDULER_ADDRESS:?export DASK_SCHEDULER_ADDRESS=tcp://HOST:8786}"'
    )
    job = SLURMJob(scheduler=scheduler, name="sed-dask-$SLURM_JOB_ID", job_name="sed-dask-worker", **kw)
    return job.job_script()


def slurm_runner_script(config: dict | None = None) -> str:
    """An sbatch script running a ``sed-dask`` subcommand inside one job via ``SLURMRunner``.

    Task 0 becomes the scheduler, task 1 runs the command (the client), the rest are workers;
    they find each other through a scheduler file on a shared filesystem, so no TCP from the
    login node is needed. Usage: ``sbatch script.sbatch spectrum STORE ...``.
    """
    d = resolve(config)
    w, s, r = d["worker"], d["slurm"], d["slurm"]["runner"]
    n = _positive(r["n-workers"], "slurm.runner.n-workers")
    cores = _positive(w["cores"], "worker.cores")
    mem = int(parse_bytes(w["memory"])) if isinstance(w["memory"], str) else int(w["memory"])
    mem_per_cpu = math.ceil(mem / cores / 2**20)
    lines = [
        "#!/usr/bin/env bash",
        "#SBATCH -J sed-dask",
        f"#SBATCH --ntasks={n + 2}",
        f"#SBATCH --cpus-per-task={cores}",
        f"#SBATCH --mem-per-cpu={mem_per_cpu}M",
        f"#SBATCH -t {s['walltime']}",
    ]
    if s.get("queue"):
        lines.append(f"#SBATCH -p {s['queue']}")
    if s.get("account"):
        lines.append(f"#SBATCH -A {s['account']}")
    if s.get("log-directory"):
        lines.append(f"#SBATCH -o {s['log-directory']}/%x-%j.out")
    lines += [f"#SBATCH {x}" for x in s.get("job-extra-directives") or []]
    worker_opts = {"nthreads": cores, "memory_limit": str(w["memory"]), "death_timeout": w["death-timeout"]}
    if s.get("interface"):
        worker_opts["interface"] = s["interface"]
    scheduler_opts = {"interface": s["interface"]} if s.get("interface") else {}
    kwargs = {"scheduler_file": r["scheduler-file"].replace("$SLURM_JOB_ID", "{job_id}"), "worker_options": worker_opts}
    if scheduler_opts:
        kwargs["scheduler_options"] = scheduler_opts
    cfg = {
        "sed_dask": {"cluster": {"class": "dask_jobqueue.slurm.SLURMRunner", "kwargs": kwargs, "wait-for-workers": n}}
    }
    local = s.get("local-directory")
    if local and "'" in str(local):
        raise ConfigError(f"sed_dask.deploy.slurm.local-directory must not contain quotes: {local!r}")
    lines += [
        "#",
        f"# {n + 2} tasks: SLURMRunner makes task 0 the scheduler, task 1 the client (the sed-dask",
        f"# command) and the other {n} Dask workers ({cores} threads, {w['memory']} each).",
        "# Usage: sbatch THIS_FILE <sed-dask subcommand and arguments>",
        "#   e.g. sbatch THIS_FILE spectrum /shared/sed/store.zarr ...   (see sed-dask spectrum --help)",
        "# Rendered by `sed-dask deploy slurm-runner`. Worker --lifetime is not used here: a",
        "# SLURMRunner worker that retires is not replaced; the job's walltime bounds the run.",
        "set -euo pipefail",
        *[str(x) for x in s.get("job-script-prologue") or []],
        *[f"export {k}={shlex.quote(v)}" for k, v in _env(d).items()],
        'mkdir -p "$HOME/.sed-dask"',
        'CONFIG="$HOME/.sed-dask/runner-$SLURM_JOB_ID.yaml"',
        "# scheduler file: '{job_id}' is filled in by SLURMRunner",
        'cat > "$CONFIG" <<EOF',
        to_yaml(cfg).rstrip(),
        "EOF",
    ]
    # each task sets its own spill dir, so $TMPDIR expands on the node that runs the task
    spill = f'export DASK_TEMPORARY_DIRECTORY="{local}"; ' if local else ""
    lines.append(f'srun bash -c \'{spill}exec sed-dask "$@"\' sed-dask "$@" --config "$CONFIG"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- Kubernetes
def _resources(cores, memory) -> dict:
    q = {"cpu": str(cores), "memory": _quantity(memory)}
    return {"requests": dict(q), "limits": dict(q)}


def _worker_args(d: dict, k: dict) -> list[str]:
    w = d["worker"]
    args = [
        "--nthreads",
        str(_positive(w["cores"], "worker.cores")),
        "--memory-limit",
        str(w["memory"]),
        "--death-timeout",
        str(w["death-timeout"]),
    ]
    args += _lifetime_args(w)
    if k.get("local-directory"):
        args += ["--local-directory", str(k["local-directory"])]
    return args + [str(a) for a in w.get("extra-args") or []]


def _volumes(k: dict) -> tuple[list, list]:
    vols, mounts = [], []
    if k.get("pvc"):
        vols.append({"name": "sed-store", "persistentVolumeClaim": {"claimName": str(k["pvc"])}})
        mounts.append({"name": "sed-store", "mountPath": str(k["mount-path"])})
    if k.get("local-directory"):
        ld = str(k["local-directory"])
        if not ld.startswith("/") or "$" in ld:
            raise ConfigError(
                f"sed_dask.deploy.kubernetes.local-directory must be an absolute path inside the container, got {ld!r}"
            )
        empty = {"sizeLimit": str(k["scratch-size"])} if k.get("scratch-size") else {}
        vols.append({"name": "scratch", "emptyDir": empty})
        mounts.append({"name": "scratch", "mountPath": ld})
    return vols, mounts


def kubernetes_cluster_spec(config: dict | None = None) -> dict:
    """A ``DaskCluster`` custom resource for the dask operator (``kubectl apply -f``).

    Workers: ``dask worker`` with threads, memory limit, lifetime and spill dir; requests =
    limits (cores, memory); the store PVC and a scratch emptyDir mounted. The operator injects
    ``DASK_SCHEDULER_ADDRESS`` and ``DASK_WORKER_NAME`` into worker pods.
    """
    d = resolve(config)
    k = d["kubernetes"]
    name = str(k["name"])
    image, policy = str(d["image"]), str(k["image-pull-policy"])
    env = [{"name": key, "value": value} for key, value in _env(d).items()]
    env_from = [{"secretRef": {"name": str(k["secret"])}}] if k.get("secret") else []
    vols, mounts = _volumes(k)
    worker = {
        "name": "worker",
        "image": image,
        "imagePullPolicy": policy,
        "args": [
            "dask",
            "worker",
            "--name",
            "$(DASK_WORKER_NAME)",
            "--dashboard",
            "--dashboard-address",
            "8788",
            *_worker_args(d, k),
        ],
        "env": env,
        "resources": _resources(d["worker"]["cores"], d["worker"]["memory"]),
        "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
    }
    if env_from:
        worker["envFrom"] = env_from
    if mounts:
        worker["volumeMounts"] = mounts
    worker_pod = {"containers": [worker]}
    if vols:
        worker_pod["volumes"] = vols
    sched = k["scheduler"] or {}
    probe = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    scheduler = {
        "name": "scheduler",
        "image": image,
        "imagePullPolicy": policy,
        "args": ["dask", "scheduler", "--host", "0.0.0.0"],
        "env": env,
        "resources": _resources(sched.get("cores", 1), sched.get("memory", "4GiB")),
        "ports": [
            {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
        ],
        "readinessProbe": {**probe, "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 300},
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "periodSeconds": 20},
    }
    if env_from:
        scheduler["envFrom"] = env_from
    metadata = {"name": name}
    if k.get("namespace"):
        metadata["namespace"] = str(k["namespace"])
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskCluster",
        "metadata": metadata,
        "spec": {
            "idleTimeout": int(k.get("idle-timeout") or 0),
            "worker": {"replicas": _positive(k["n-workers"], "kubernetes.n-workers"), "spec": worker_pod},
            "scheduler": {
                "spec": {"containers": [scheduler]},
                "service": {
                    "type": str(k["service-type"]),
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "protocol": "TCP", "port": 8787, "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


def _split_image(image: str) -> tuple[str, str]:
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        raise ConfigError(f"sed_dask.deploy.image must carry a pinned tag (repo:tag), got {image!r}")
    return repo, tag


def helm_values(config: dict | None = None) -> dict:
    """Values for the ``dask/dask`` Helm chart (``helm install -f values.yaml``).

    The chart starts ``dask-scheduler`` / ``dask-worker``; our image provides both as shims for
    ``dask scheduler`` / ``dask worker``. It sets ``--nthreads``/``--memory-limit`` from
    ``resources.limits``; the rest goes to ``extraArgs``. Jupyter is off (clients bring their own).
    """
    d = resolve(config)
    k = d["kubernetes"]
    repo, tag = _split_image(str(d["image"]))
    policy = str(k["image-pull-policy"])
    env = [{"name": key, "value": value} for key, value in _env(d).items()]
    vols, mounts = _volumes(k)
    w = d["worker"]
    extra = ["--death-timeout", str(w["death-timeout"]), *_lifetime_args(w)]
    if k.get("local-directory"):
        extra += ["--local-directory", str(k["local-directory"])]
    extra += [str(a) for a in w.get("extra-args") or []]
    sched = k["scheduler"] or {}
    worker = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": policy, "dask_worker": "dask-worker"},
        "replicas": _positive(k["n-workers"], "kubernetes.n-workers"),
        "threads_per_worker": _positive(w["cores"], "worker.cores"),
        "resources": _resources(w["cores"], w["memory"]),
        "env": env,
        "extraArgs": extra,
    }
    if vols:
        worker["mounts"] = {"volumes": vols, "volumeMounts": mounts}
    return {
        "scheduler": {
            "image": {"repository": repo, "tag": tag, "pullPolicy": policy},
            "serviceType": str(k["service-type"]),
            "resources": _resources(sched.get("cores", 1), sched.get("memory", "4GiB")),
            "env": env,
        },
        "worker": worker,
        "jupyter": {"enabled": False},
    }


# ----------------------------------------------------------------------------- output
class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # shared sub-dicts (env) are written out, not as &anchors
        return True


def to_yaml(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def render(target: str, config: dict | None = None) -> str:
    """The text of one deployment file: ``slurm``, ``slurm-runner``, ``jobqueue``, ``k8s`` or ``helm``."""
    if target == "slurm":
        return slurm_job_script(config)
    if target == "slurm-runner":
        return slurm_runner_script(config)
    docs = {"jobqueue": jobqueue_config, "k8s": kubernetes_cluster_spec, "helm": helm_values}
    if target not in docs:
        raise ConfigError(f"unknown deploy target {target!r}; choose one of {', '.join(TARGETS)}")
    head = (
        f"# Rendered by `sed-dask deploy {target}` from the sed_dask.deploy settings;\n"
        "# change those (see deploy/sed-dask.yaml) and re-render rather than editing this file.\n"
    )
    return head + to_yaml(docs[target](config))
