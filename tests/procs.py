"""Real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1 for tests.

Separate OS processes (not a LocalCluster) so tests can connect by address or scheduler file
exactly as a SLURM or Kubernetes deployment does, and can SIGKILL a worker mid-computation.

    from procs import dask_procs            # fixture: DaskProcs in tmp_path, torn down after

    def test_x(dask_procs):
        dask_procs.start_scheduler()
        dask_procs.start_workers(2, nthreads=1, memory_limit="1GiB")
        ...
        dask_procs.kill_worker("w0")         # SIGKILL; a no-nanny worker stays dead
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _dask_cmd(sub: str) -> list[str]:
    """The venv's ``dask`` CLI (``dask scheduler`` / ``dask worker``); module form as a fallback."""
    exe = Path(sys.executable).with_name("dask")
    if exe.exists():
        return [str(exe), sub]
    found = shutil.which("dask")
    if found:
        return [found, sub]
    return [sys.executable, "-m", f"distributed.cli.dask_{sub}"]


@dataclasses.dataclass
class Proc:
    """One launched process (scheduler, or a worker with or without its nanny)."""

    name: str
    role: str
    popen: subprocess.Popen
    log: Path
    nanny: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""


class DaskProcs:
    """Start, inspect, kill and tear down a scheduler and workers (each in its own session)."""

    def __init__(self, root, *, env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = self.root / "scheduler.json"
        self.env = {**os.environ, **(env or {})}
        self.scheduler: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.address: str | None = None

    # ------------------------------------------------------------------ start
    def _spawn(self, name: str, role: str, cmd: list[str], *, nanny: bool = False) -> Proc:
        log = self.root / f"{name}.log"
        fh = open(log, "wb")
        try:
            p = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
            )
        finally:
            fh.close()
        return Proc(name, role, p, log, nanny)

    def start_scheduler(self, *, wait: bool = True, timeout: float = 30) -> str | None:
        """Start ``dask scheduler`` writing ``scheduler.json``; with ``wait``, return its address.

        ``wait=False`` lets workers start at the same time (they wait for the scheduler file),
        which saves a process start-up on a slow machine.
        """
        if self.scheduler is not None:
            raise RuntimeError("scheduler already started")
        cmd = _dask_cmd("scheduler") + [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(self.scheduler_file),
        ]
        self.scheduler = self._spawn("scheduler", "scheduler", cmd)
        return self.wait_for_scheduler(timeout=timeout) if wait else None

    def wait_for_scheduler(self, *, timeout: float = 30) -> str:
        """The scheduler's address once its scheduler file exists."""
        if self.address:
            return self.address
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.scheduler.alive():
                raise RuntimeError(f"dask scheduler exited:\n{self.scheduler.tail()}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address = json.loads(self.scheduler_file.read_text())["address"]
                return self.address
            time.sleep(0.05)
        raise TimeoutError(f"dask scheduler wrote no scheduler file within {timeout} s:\n{self.scheduler.tail()}")

    def start_worker(
        self, name: str | None = None, *, nthreads: int = 1, memory_limit="1GiB", nanny: bool = False, extra_args=()
    ) -> Proc:
        """Start one ``dask worker`` (no nanny by default, so a SIGKILL is a lost node)."""
        if self.scheduler is None:
            raise RuntimeError("start the scheduler first")
        name = name or f"w{len(self.workers)}"
        if name in self.workers:
            raise ValueError(f"worker name {name!r} already used")
        cmd = _dask_cmd("worker") + [
            "--scheduler-file",
            str(self.scheduler_file),
            "--host",
            "127.0.0.1",
            "--name",
            name,
            "--nthreads",
            str(nthreads),
            "--memory-limit",
            str(memory_limit),
            "--no-dashboard",
            "--death-timeout",
            "30",
            "--local-directory",
            str(self.root / f"{name}-space"),
            "--nanny" if nanny else "--no-nanny",
            *map(str, extra_args),
        ]
        proc = self._spawn(name, "worker", cmd, nanny=nanny)
        self.workers[name] = proc
        return proc

    def start_workers(self, n: int, *, wait: bool = True, timeout: float = 60, **kw) -> list[Proc]:
        procs = [self.start_worker(**kw) for _ in range(n)]
        if wait:
            self.wait_for_workers(len(self.live_workers()), timeout=timeout)
        return procs

    # ------------------------------------------------------------------ inspect
    @contextlib.contextmanager
    def client(self, **kw):
        from distributed import Client

        with Client(self.address, set_as_default=False, timeout="10s", **kw) as c:
            yield c

    def live_workers(self) -> list[str]:
        return [n for n, p in self.workers.items() if p.alive()]

    def wait_for_workers(self, n: int, *, timeout: float = 60) -> None:
        """Block until the scheduler sees ``n`` workers (fails fast if a worker process died)."""
        deadline = time.monotonic() + timeout
        self.wait_for_scheduler(timeout=timeout)
        with self.client() as c:
            while True:
                have = len(c.scheduler_info(n_workers=-1)["workers"])
                if have >= n:
                    return
                dead = [p for p in self.workers.values() if not p.alive() and p.popen.returncode not in (None, -9)]
                if dead:
                    raise RuntimeError(f"worker {dead[0].name} exited ({dead[0].popen.returncode}):\n{dead[0].tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{have}/{n} workers after {timeout} s")
                time.sleep(0.05)

    def worker_addresses(self) -> dict[str, str]:
        """Worker name -> address, as the scheduler sees them now (a restarted worker gets a new one)."""
        with self.client() as c:
            info = c.scheduler_info(n_workers=-1)["workers"]
        return {str(w["name"]): a for a, w in info.items()}

    def worker_pids(self) -> dict[str, int]:
        """Worker name -> pid of the worker process itself (the nanny's child when nannied)."""
        with self.client() as c:
            pids = c.run(os.getpid, on_error="ignore")  # a worker may be dying or restarting
            info = c.scheduler_info(n_workers=-1)["workers"]
        return {str(info[a]["name"]): pid for a, pid in pids.items() if a in info}

    # ------------------------------------------------------------------ kill / teardown
    def kill_worker(self, name: str | None = None, *, sig=signal.SIGKILL, with_nanny: bool = True) -> str:
        """Send ``sig`` (SIGKILL) to a worker; return its name.

        No-nanny workers: the ``dask worker`` process is the worker. Nannied workers: with
        ``with_nanny`` the whole process group dies (node loss), else only the worker process,
        which its nanny then restarts (OOM-kill-like).
        """
        live = self.live_workers()
        if not live:
            raise RuntimeError("no live worker to kill")
        name = name or live[0]
        proc = self.workers[name]
        if proc.nanny and not with_nanny:
            os.kill(self.worker_pids()[name], sig)
        elif proc.nanny:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        if sig == signal.SIGKILL and (not proc.nanny or with_nanny):
            proc.popen.wait(timeout=10)
        return name

    def close(self, *, timeout: float = 5) -> None:
        """SIGTERM workers, then the scheduler; SIGKILL any process group left after ``timeout``.

        Workers go first, while the scheduler can still see them leave: a no-nanny worker that
        gets SIGTERM as its scheduler disappears may hang in a reconnect loop instead of exiting.
        """
        groups = [list(self.workers.values()), [self.scheduler] if self.scheduler else []]
        for procs in groups:
            for p in procs:
                if p.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)  # also reaps a nanny's orphaned children
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def dask_procs(tmp_path):
    """A ``DaskProcs`` rooted in ``tmp_path/dask``; every process is gone after the test."""
    procs = DaskProcs(tmp_path / "dask")
    try:
        yield procs
    finally:
        procs.close()
