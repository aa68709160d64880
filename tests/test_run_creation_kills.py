"""Issue 13, atomic run creation and the fault-injection harness: SIGKILL a first ingestion at every
zarr I/O operation of ``create_run`` (24 points: each read and write of the group, its three arrays
and its attrs) and at random operations of the rest of the ingestion, then re-run ``ingest`` and
require the run to equal an uninterrupted one, bit for bit.

One driver process imports everything once and forks a child per trial (zarr resets its event
loop after a fork), so ~40 real kills cost seconds. Before issue 13, a kill after the arrays but
before the attrs left a run every re-run refused ("is not a trajectory run" / KeyError
'param_index'), so the kill points inside ``create_run`` fail on that code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from models import make_trajectory, write_pt

DRIVER = r"""
import json, os, random, signal, sys
import numpy as np
import zarr.storage._local as L
import sed_dask.store.trajectory as S
from sed_dask.store.ingest import ingest

ck, work, n_random, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
KW = dict(scheduler="sync", progress=False, chunk_bytes=4096, shard_bytes=16384)
state = {"n": 0, "kill": None, "in_create": False, "create_ops": []}
real_put, real_get, real_create = L._put, L._get, S.TrajectoryStore.create_run

def tick():
    state["n"] += 1
    if state["in_create"]:
        state["create_ops"].append(state["n"])
    if state["n"] == state["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)

def put(path, value, exclusive=False):
    tick()
    return real_put(path, value, exclusive=exclusive)

def get(path, prototype, byte_range=None):
    tick()
    return real_get(path, prototype, byte_range)

def create_run(self, *a, **k):
    state["in_create"] = True
    try:
        return real_create(self, *a, **k)
    finally:
        state["in_create"] = False

L._put, L._get, S.TrajectoryStore.create_run = put, get, create_run

# warm what every child would otherwise pay again (no zarr I/O here): checkpoint layouts, dask, tqdm
import dask, tqdm.auto  # noqa: E401,F401
from sed_dask.sources.discover import discover_checkpoints
from sed_dask.readers import open_checkpoint
for _p in discover_checkpoints(ck).values():
    with open_checkpoint(_p) as _r:
        _r.tensors()

def child(fn):
    pid = os.fork()
    if pid == 0:
        state["n"], state["create_ops"] = 0, []
        code = 1
        try:
            r = fn()
            code = r if isinstance(r, int) else 0
        except BaseException as exc:
            with open(os.path.join(work, "child_error.txt"), "a") as f:
                f.write(f"{type(exc).__name__}: {exc}\n")
        finally:
            os._exit(code)  # a child never returns into the driver's loop
    return os.waitpid(pid, 0)[1]

def reference():
    ingest(ck, os.path.join(work, "ref.zarr"), "r0", **KW)
    with open(os.path.join(work, "ref.json"), "w") as f:
        json.dump({"total": state["n"], "create_ops": state["create_ops"]}, f)

assert child(reference) == 0
ref = json.load(open(os.path.join(work, "ref.json")))

def same_as_reference(path):
    a = S.open_store(os.path.join(work, "ref.zarr"), mode="r").run("r0")
    b = S.open_store(path, mode="r").run("r0")
    ok = b.steps.tolist() == a.steps.tolist() and bool(b.completed().all()) and \
        np.array_equal(np.asarray(b.params[:]), np.asarray(a.params[:]), equal_nan=True)
    return 0 if ok else 3

rng = random.Random(seed)
later = [n for n in range(max(ref["create_ops"]) + 1, ref["total"] + 1)]
points = ref["create_ops"] + sorted(rng.sample(later, min(n_random, len(later))))
out = []
for n in points:
    path = os.path.join(work, f"k{n}.zarr")
    state["kill"] = n
    st = child(lambda: ingest(ck, path, "r0", **KW))
    state["kill"] = None
    killed = os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL
    st2 = child(lambda: ingest(ck, path, "r0", **KW))
    ok = st2 == 0 and child(lambda: same_as_reference(path)) == 0
    out.append({"n": n, "in_create": n in ref["create_ops"], "killed": killed, "resumed": st2 == 0, "equal": ok})
json.dump({"ref": ref, "trials": out}, sys.stdout)
"""


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_pt(make_trajectory(4), d)
    return d


def test_kills_at_every_point_of_run_creation_and_random_points_of_ingest(ck, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ck), str(tmp_path), "10", "13"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    trials = res["trials"]
    in_create = [t for t in trials if t["in_create"]]
    assert len(in_create) >= 20, res["ref"]  # every zarr read and write inside create_run
    assert all(t["killed"] for t in trials), [t for t in trials if not t["killed"]]
    errors = (tmp_path / "child_error.txt").read_text() if (tmp_path / "child_error.txt").exists() else ""
    bad = [t for t in trials if not (t["resumed"] and t["equal"])]
    assert not bad, (bad, errors[-2000:])
