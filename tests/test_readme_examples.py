"""Every code block of README.md and every script in examples/ runs, on small generated checkpoints.

A README line is an API promise: here each ```python block is written to a file and run as a
standalone script (as a user pastes it), each ```bash block that is not one of the two set-up commands
(`./scripts/*.sh`, which CI runs itself) is run by bash, and the examples run with small arguments.
``SED_DASK_README`` points the test at another copy (e.g. an older README) to check it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("SED_DASK_README", ROOT / "README.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SETUP_COMMANDS = re.compile(r"\./scripts/\w+\.sh")  # the README's set-up commands: CI runs them itself

pytestmark = pytest.mark.timeout(300)


def blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of language ``lang``."""
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def _env() -> dict:
    """The test's own interpreter and console scripts first on PATH; one BLAS thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd, cwd: Path, *, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """runs/seed0, runs/seed1: real ``.pt`` checkpoints + metrics.json, as the README's paths name them."""
    from sed_dask.testing import PlantedTrajectory

    root = tmp_path_factory.mktemp("readme")
    for seed in (0, 1):
        PlantedTrajectory(n_deltas=30, n_params=3000, rank=2, seed=seed).write_checkpoints(
            root / "runs" / f"seed{seed}"
        )
    return root


def test_readme_has_the_blocks_this_test_runs():
    text = README.read_text()
    assert blocks(text, "python"), "no ```python block in README"
    assert any(not SETUP_COMMANDS.search(b) for b in blocks(text, "bash")), "no runnable ```bash block"


@pytest.mark.parametrize("i", range(len(blocks(README.read_text(), "python"))))
def test_readme_python_block_runs_as_a_script(work, tmp_path, i):
    """Pasted into a file and run with ``python file.py`` (no ``__main__`` guard added)."""
    src = blocks(README.read_text(), "python")[i]
    d = tmp_path / "w"
    d.mkdir()
    (d / "runs").symlink_to(work / "runs")
    script = d / f"readme_block_{i}.py"
    script.write_text(src)
    _run([sys.executable, str(script)], d)


@pytest.mark.parametrize("i", range(len(blocks(README.read_text(), "bash"))))
def test_readme_bash_block_runs(work, tmp_path, i):
    src = blocks(README.read_text(), "bash")[i]
    if SETUP_COMMANDS.search(src):
        pytest.skip("a set-up command (creates .venv): .ci/run runs ./scripts/test.sh itself")
    d = tmp_path / "w"
    d.mkdir()
    (d / "runs").symlink_to(work / "runs")
    r = _run(["bash", "-euo", "pipefail", "-c", src], d)
    assert "np.int64" not in r.stdout and "np.float64" not in r.stdout, r.stdout  # plain numbers


@pytest.fixture(scope="module")
def scheduler():
    """One small cluster for all examples (each would start a LocalCluster of its own: ~10 s apiece).
    They reach it as a user's script would: ``--scheduler-address``, or ``DASK_SCHEDULER_ADDRESS``."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0"
    ) as cl:
        yield cl.scheduler_address


def test_examples_run(tmp_path, scheduler):
    """Each script in examples/, as its usage line says, with small sizes."""
    ex = ROOT / "examples"
    ran = set()

    def run(name, *args):
        ran.add(name)
        return _run(
            [sys.executable, str(ex / name), *map(str, args)], tmp_path, env={"DASK_SCHEDULER_ADDRESS": scheduler}
        )

    run("record_from_training.py", tmp_path / "ckpts", "--steps", 40, "--every", 4)
    out = run(
        "analyse_checkpoint_dir.py", tmp_path / "ckpts", "--windows", "3,4", "--scheduler-address", scheduler
    ).stdout
    assert "W=3: k* (mode)" in out
    out = run(
        "connect_existing_cluster.py",
        tmp_path / "ckpts" / "sed" / "trajectory.zarr",
        "--windows",
        "3,4",
        "-o",
        tmp_path / "r.zarr",
    ).stdout
    assert "signal rank" in out and (tmp_path / "r.zarr").is_dir()
    out = run("hf_sharded_run.py", tmp_path / "hf", "--steps", 60, "--every", 6, "--shards", 2).stdout
    assert "W=5: k* =" in out
    assert ran == {p.name for p in ex.glob("*.py")}, "an example this test does not run"


def test_unguarded_script_on_a_local_cluster_says_add_the_guard(work, tmp_path):
    """The README's promise for scripts that start worker processes: re-entry is named, not a lock error."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""
        import dask, sed_dask
        dask.config.set({{"sed_dask.cluster": {{"class": "distributed.LocalCluster", "kwargs": {{"n_workers": 1}}}}}})
        sed_dask.ingest({str(work / "runs" / "seed0")!r}, "traj.zarr", run="seed0", progress=False)
    """)
    )
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr, r.stderr[-4000:]
    assert "RunLockedError" not in r.stderr, r.stderr[-4000:]
