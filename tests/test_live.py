"""Live SED: incremental spectra equal the batch spectrum bit for bit, one checkpoint at a time, in bursts,
and after a SIGKILL of a real watcher process; alerts are those of the batch detectors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sed_oracle import band_of, deltas

from sed_dask.errors import StoreError
from sed_dask.live.incremental import LiveSpectrum, open_live
from sed_dask.results.spectra import spectrum
from sed_dask.sources.checkpoint_run import open_checkpoints
from sed_dask.sources.recorder import TrajectoryRecorder
from sed_dask.store.ingest import ingest

WINDOWS = (3, 5)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)])
        self.head = torch.nn.Linear(8, 5)


def _record(folder, steps, *, seed=0, model=None, collapse_at=None):
    """Checkpoints of a drifting model: a slow random walk (plus a strong common direction until
    ``collapse_at``, so the edge rises and then collapses)."""
    torch.manual_seed(seed)
    model = model or Tiny()
    rec = TrajectoryRecorder(folder, every=10)
    g = torch.Generator().manual_seed(seed + 1)
    dirs = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    for s in steps:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p += 0.01 * torch.randn(p.shape, generator=g)
                if collapse_at is None or s < collapse_at:
                    p += 0.2 * dirs[n]
        rec.save(s, model)
    return model


def _assert_same(live, batch):
    """Every variable of the batch Dataset is in the live one with identical bits."""
    for v in batch.variables:
        assert v in live.variables, v
        a, b = np.asarray(live[v].values), np.asarray(batch[v].values)
        assert a.shape == b.shape, (v, a.shape, b.shape)
        if a.dtype.kind == "f":
            assert np.array_equal(a, b, equal_nan=True), (v, np.nanmax(np.abs(a - b)))
        else:
            assert np.array_equal(a, b), v


def _batch(folder, steps, groups=None):
    run = open_checkpoints(str(folder), run="r", steps=list(steps))
    return spectrum(run, windows=WINDOWS, groups=groups, progress=False)


@pytest.mark.parametrize("groups", [None, "default"])
def test_one_at_a_time_and_bursts_are_bit_identical_to_batch(tmp_path, groups):
    ck, store, res = tmp_path / "r", str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr")
    steps = list(range(0, 200, 10))
    _record(ck, steps)
    live = LiveSpectrum(store, res, run="r", windows=WINDOWS, groups=groups, scheduler="threads")
    n_upd = 0
    for upto in (2, 4, 5, 6, 7, 11, 12, 20):  # creation, singles, bursts of 4 and 8
        ingest({s: str(ck / f"ckpt_{s:06d}.pt") for s in steps[:upto]}, store, "r", progress=False, scheduler="threads")
        u = live.update()
        if upto - 1 < max(WINDOWS):
            assert u is None
            continue
        n_upd += 1
        assert u.steps[-1] == steps[upto - 1]
        got = open_live(res)
        ref = _batch(ck, steps[:upto], groups)
        _assert_same(got, ref)
        # and the batch itself against an independent float64 oracle of the band's diagonal
        X = np.stack(
            [
                np.concatenate(
                    [
                        p.detach().numpy().ravel()
                        for p in torch.load(ck / f"ckpt_{s:06d}.pt", weights_only=True)["model_state_dict"].values()
                    ]
                )
                for s in steps[:upto]
            ]
        ).astype(np.float32)
        d0 = band_of(deltas(X), 1)[:, 0]
        norm = got["delta_norm"].values if groups is None else got["delta_norm"].sel(group="all").values
        np.testing.assert_allclose(norm[0] ** 2, d0, rtol=1e-10)
    assert n_upd == 5
    # a second engine on the same store resumes and has nothing to do
    again = LiveSpectrum(store, res, run="r", windows=WINDOWS, groups=groups, scheduler="threads")
    assert again.n == 19 and again.update() is None


def test_resume_refuses_other_settings(tmp_path):
    ck, store, res = tmp_path / "r", str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr")
    _record(ck, range(0, 80, 10))
    ingest(str(ck), store, "r", progress=False, scheduler="threads")
    LiveSpectrum(store, res, windows=WINDOWS, scheduler="threads").update()
    with pytest.raises(StoreError, match="were made with"):
        LiveSpectrum(store, res, windows=(3, 6), scheduler="threads")


def _watcher(ck, res, *extra):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(__file__))] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
        ),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sed_dask",
            "watch",
            str(ck),
            "--results",
            str(res),
            "--windows",
            ",".join(map(str, WINDOWS)),
            "--run",
            "r",
            "--poll",
            "0.05",
            "--settle",
            "0",
            "--threads",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def _wait_steps(res, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            ds = open_live(res)
        except StoreError:  # not created yet
            ds = None
        if ds is not None and ds.sizes["step"] >= n:
            return ds
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"watcher did not reach {n} steps")


def test_watcher_subprocess_survives_sigkill_and_matches_batch(tmp_path):
    ck, res = tmp_path / "run", tmp_path / "live.zarr"
    steps = list(range(0, 10 * 40, 10))
    model = _record(ck, steps[:8], collapse_at=200)
    w = _watcher(ck, res)
    seen = _wait_steps(res, 7, w)
    _assert_same(seen, _batch(ck, steps[:8]))
    model = _record(ck, steps[8:9], model=model, seed=1, collapse_at=200)  # one at a time
    _assert_same(_wait_steps(res, 8, w), _batch(ck, steps[:9]))
    model = _record(ck, steps[9:14], model=model, seed=2, collapse_at=200)  # a burst, then the kill mid-update
    time.sleep(0.15)
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    model = _record(ck, steps[14:], model=model, seed=3, collapse_at=200)  # written while nobody watches
    w2 = _watcher(ck, res, "--until", str(steps[-1]), "--idle-timeout", "60")
    out, _ = w2.communicate(timeout=300)
    assert w2.returncode == 0, out
    assert f"watch stopped (until step {steps[-1]})" in out
    _assert_same(open_live(res), _batch(ck, steps))
    # the alerts file holds exactly the alarms the batch detectors (`query warning`) raise, each once
    from sed_dask.analysis.detectors import EdgeWatch
    from sed_dask.analysis.warning import early_warning

    with open(str(res).replace(".zarr", "-alerts.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    keys = [(r["window"], r["detector"], r["step"]) for r in recs]
    assert len(keys) == len(set(keys))
    assert all(set(r) >= {"step", "detector", "value", "threshold"} for r in recs)
    batch = _batch(ck, steps)
    want = []
    for wi, W in enumerate(WINDOWS):
        watch = EdgeWatch(window=W)
        r = batch["ratio"].isel(run=0, window=wi).values[:, : W - 1]
        k = batch["k_star"].isel(run=0, window=wi).values
        for st, rr, kk in zip(batch["step"].values.tolist(), r, k):
            if np.isfinite(rr[0]) and np.isfinite(kk):
                want += [(W, a.detector, a.step) for a in watch.update(st, rr, kk)]
    assert sorted(keys) == sorted(want)
    assert want, "the planted collapse at step 200 raised no alarm"
    ew = early_warning(batch)
    first = {
        (int(W), d): s
        for W in ew.window.values
        for d, s in zip(ew.detector.values, ew["alarm_step"].sel(window=W).values.ravel())
    }
    for (W, d), s in first.items():
        if np.isfinite(s):
            assert min(st for w_, d_, st in keys if (w_, d_) == (W, d)) == s
    for line in out.splitlines():
        if line.startswith("ALERT"):
            assert "step=" in line and "threshold=" in line


def test_watch_cli_bad_source_exits_2(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    p = subprocess.run(
        [sys.executable, "-m", "sed_dask", "watch", str(f), "--results", str(tmp_path / "r.zarr")],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "x.txt" in p.stderr


@pytest.mark.parametrize("layout", ["columns", "by_step", "csv"])
def test_watch_takes_the_folders_metrics_in_any_layout_ingest_reads(tmp_path, layout):
    """A metrics file next to the checkpoints reaches the store whatever its layout (the watcher
    once read only a list of records and crashed on {"step": [...], "val_loss": [...]})."""
    from sed_dask.live.watch import watch
    from sed_dask.store.trajectory import open_store

    ck = tmp_path / "run"
    steps = list(range(0, 80, 10))
    _record(ck, steps)
    for f in ck.glob("metrics.*"):
        f.unlink()
    vals = [1.0 / (1 + s) for s in steps]
    if layout == "columns":
        (ck / "metrics.json").write_text(json.dumps({"step": steps, "val_loss": vals}))
    elif layout == "by_step":
        (ck / "metrics.json").write_text(json.dumps({str(s): {"val_loss": v} for s, v in zip(steps, vals)}))
    else:
        (ck / "metrics.csv").write_text("step,val_loss\n" + "".join(f"{s},{v!r}\n" for s, v in zip(steps, vals)))
    res = tmp_path / "live.zarr"
    summary = watch(ck, results=res, windows=(3,), idle_timeout=0.5, poll=0.05, settle=0, echo=None)
    assert summary.last_step == steps[-1]
    m = open_store(str(tmp_path / "live-trajectory.zarr"), mode="r").run("run").metrics()
    assert m["step"].tolist() == steps
    np.testing.assert_array_equal(m["val_loss"], vals)
