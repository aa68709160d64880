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
SK_D = 12  # live sketch dimension in these tests


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
    w = _watcher(ck, res, "--sketch-d", str(SK_D))
    seen = _wait_steps(res, 7, w)
    _assert_same(seen, _batch(ck, steps[:8]))
    model = _record(ck, steps[8:9], model=model, seed=1, collapse_at=200)  # one at a time
    _assert_same(_wait_steps(res, 8, w), _batch(ck, steps[:9]))
    model = _record(ck, steps[9:14], model=model, seed=2, collapse_at=200)  # a burst, then the kill mid-update
    time.sleep(0.15)
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    model = _record(ck, steps[14:], model=model, seed=3, collapse_at=200)  # written while nobody watches
    w2 = _watcher(ck, res, "--until", str(steps[-1]), "--idle-timeout", "60", "--sketch-d", str(SK_D))
    out, _ = w2.communicate(timeout=300)
    assert w2.returncode == 0, out
    assert f"watch stopped (until step {steps[-1]})" in out
    _assert_same(open_live(res), _batch(ck, steps))
    # the live sketch survived the same kill: equal to the batch sketch of the ingested store
    _assert_sketch_same(
        str(res).replace(".zarr", "-sketch.zarr"), str(res).replace(".zarr", "-trajectory.zarr"), "osnap"
    )
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


# ----------------------------------------------------------------------------- the live JL sketch


def _batch_sketch(store, dist, d=SK_D, seed=None):
    from sed_dask.engine.sketch import sketch

    return sketch(store, d=d, seed=seed, distribution=dist, progress=False, scheduler="threads")


def _assert_sketch_same(res_sketch, store, dist, seed=None):
    """The live sketch store = ``sketch(store)`` bit for bit, and its spectra = ``spectra_from_sketch`` of it."""
    from sed_dask.results.sketch_spectra import spectra_from_sketch

    got, ref = open_live(res_sketch), _batch_sketch(store, dist, seed=seed)
    a, b = got["sketch"].values, ref["sketch"].values
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.array_equal(a, b), np.max(np.abs(a - b))
    assert np.array_equal(got["step"].values, ref["step"].values)
    _assert_same(got, spectra_from_sketch(ref, windows=WINDOWS))
    for k in ("seed", "d", "distribution", "tile_elems", "phi_checksum"):
        assert got["sketch"].attrs[k] == ref["sketch"].attrs[k], k
    return got


@pytest.mark.parametrize(("dist", "groups"), [("osnap", None), ("gaussian", "default")])
def test_live_sketch_one_at_a_time_and_bursts_is_bit_identical_to_batch(tmp_path, dist, groups):
    import dask

    ck, store, res = tmp_path / "r", str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr")
    steps = list(range(0, 200, 10))
    _record(ck, steps)
    # P = 413 over 5 RNG tiles of 100: the canonical tree's promotion past the last tile is exercised
    with dask.config.set({"sed_dask.sketch.tile-elems": 100}):
        live = LiveSpectrum(
            store,
            res,
            run="r",
            windows=WINDOWS,
            groups=groups,
            scheduler="threads",
            sketch_d=SK_D,
            sketch_distribution=dist,
        )
        for upto in (2, 6, 7, 11, 12, 20):  # nothing yet, creation, singles, bursts of 4 and 8
            ingest(
                {s: str(ck / f"ckpt_{s:06d}.pt") for s in steps[:upto]},
                store,
                "r",
                progress=False,
                scheduler="threads",
            )
            u = live.update()
            if upto - 1 < max(WINDOWS):
                assert u is None and not os.path.exists(str(tmp_path / "live-sketch.zarr"))
                continue
            got = _assert_sketch_same(str(tmp_path / "live-sketch.zarr"), store, dist)
            assert got.attrs["sketch_tile_elems"] == 100
            assert u.sketch["sketch"].shape[1] == len(u.steps)
            _assert_same(open_live(res), _batch(ck, steps[:upto], groups))  # the exact spectra are untouched


def test_live_sketch_resumes_after_a_kill_between_the_two_commits(tmp_path, monkeypatch):
    """A kill after the sketch store's commit (or mid-append, before it) leaves it longer than the
    results; a new engine truncates it back, refuses other sketch settings, and continues bit for bit."""
    import sed_dask.live.incremental as inc

    ck, store, res = tmp_path / "r", str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr")
    sk_path = str(tmp_path / "elsewhere.zarr")
    steps = list(range(0, 160, 10))
    _record(ck, steps)

    def feed(upto):
        ingest({s: str(ck / f"ckpt_{s:06d}.pt") for s in steps[:upto]}, store, "r", progress=False, scheduler="threads")

    kw = {"run": "r", "windows": WINDOWS, "scheduler": "threads", "sketch_d": SK_D, "sketch_store": sk_path}
    feed(8)
    assert LiveSpectrum(store, res, **kw).update() is not None
    real = inc.append

    class Killed(Exception):
        pass

    def killed_after_sketch_commit(path, ds, n, n_new, live_attrs):
        if path == sk_path:
            return real(path, ds, n, n_new, live_attrs)
        raise Killed

    def killed_mid_sketch_append(path, ds, n, n_new, live_attrs):  # arrays grown with garbage, no commit
        import zarr

        g = zarr.open_group(path, mode="r+", use_consolidated=False)
        for _, arr in g.arrays():
            dims = arr.metadata.dimension_names or ()
            if "step" in dims:
                arr.resize(tuple(n_new if d == "step" else s for d, s in zip(dims, arr.shape)))
        g["sketch"][0, n:n_new] = 7.0
        raise Killed

    for fake, upto in ((killed_after_sketch_commit, 10), (killed_mid_sketch_append, 13)):
        feed(upto)
        monkeypatch.setattr(inc, "append", fake)
        with pytest.raises(Killed):
            LiveSpectrum(store, res, **kw).update()
        monkeypatch.setattr(inc, "append", real)
        assert open_live(res).sizes["step"] == 7
    for other in ({"sketch_d": SK_D + 1}, {"sketch_seed": 5}, {"sketch_distribution": "gaussian"}):
        with pytest.raises(StoreError, match="were made with"):
            LiveSpectrum(store, res, **{**kw, **other})
    with pytest.raises(StoreError, match="were made with"):
        LiveSpectrum(store, res, run="r", windows=WINDOWS, scheduler="threads")  # without the sketch
    again = LiveSpectrum(store, res, **kw)  # the resume truncates the sketch store to the results' 7 steps
    assert again.n == 7 and open_live(sk_path).sizes["step"] == 7
    u = again.update()
    assert u.steps[-1] == steps[12]
    _assert_sketch_same(sk_path, store, "osnap")
    _assert_same(open_live(res), _batch(ck, steps[:13]))
    feed(16)
    LiveSpectrum(store, res, **kw).update()
    _assert_sketch_same(sk_path, store, "osnap")
    # killed after creating the sketch store, before the results store: the orphan is replaced
    import shutil

    shutil.rmtree(res)
    LiveSpectrum(store, res, **kw).update()
    _assert_sketch_same(sk_path, store, "osnap")
    # a store that is not this results path's live sketch is never replaced
    shutil.rmtree(res)
    with pytest.raises(StoreError, match="not this watcher's live sketch"):
        LiveSpectrum(store, str(tmp_path / "other.zarr"), **kw).update()


def test_live_sketch_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sketch_d"):
        LiveSpectrum(str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr"), sketch_d=0)
    with pytest.raises(ValueError, match="sketch_d"):
        LiveSpectrum(str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr"), sketch_d=2.5)
    with pytest.raises(ValueError, match="need sketch_d"):
        LiveSpectrum(str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr"), sketch_seed=3)
    with pytest.raises(ValueError, match="distribution"):
        LiveSpectrum(str(tmp_path / "s.zarr"), str(tmp_path / "live.zarr"), sketch_d=8, sketch_distribution="x")
    for flags, needle in ((["--sketch-d", "0"], "--sketch-d"), (["--sketch-seed", "1"], "need --sketch-d")):
        p = subprocess.run(
            [sys.executable, "-m", "sed_dask", "watch", str(tmp_path), "--results", str(tmp_path / "r.zarr"), *flags],
            capture_output=True,
            text=True,
            check=False,
        )
        assert p.returncode == 2 and "Traceback" not in p.stderr and needle in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "r.zarr")
