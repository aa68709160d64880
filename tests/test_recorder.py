"""TrajectoryRecorder: checkpoint layout, metrics.json, atomic writes, resume, tied weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from sed_dask.sources.recorder import TrajectoryRecorder, checkpoint_name


class Tied(nn.Module):
    """Embedding and output head share one weight, as GPT-style models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", torch.ones(3))

    def forward(self, x):
        return self.head(self.mid(self.emb(x)))


def _bump(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def test_pt_cadence_content_and_metrics(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    rec = TrajectoryRecorder(tmp_path, every=10)
    expected = {}
    for step in range(0, 26):
        path = rec.maybe_save(step, model, val_loss=1.0 / (step + 1), val_acc=step / 25)
        if step % 10 == 0:
            assert path == tmp_path / f"ckpt_{step:06d}.pt"
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            assert path is None
        _bump(model)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_000000.pt", "ckpt_000010.pt", "ckpt_000020.pt"]
    assert rec.saved_steps() == [0, 10, 20]
    for step, sd in expected.items():
        obj = torch.load(tmp_path / checkpoint_name(step), map_location="cpu", weights_only=True)
        assert obj["step"] == step
        got = obj["model_state_dict"]
        assert list(got) == list(sd)
        for k in sd:
            assert got[k].dtype == sd[k].dtype == torch.float32
            torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0)
        # the tied head is stored once: both names point at one storage after loading
        assert got["head.weight"].data_ptr() == got["emb.weight"].data_ptr()
    recs = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in recs] == [0, 10, 20]
    assert recs[1] == {"step": 10, "val_loss": pytest.approx(1 / 11), "val_acc": pytest.approx(0.4)}
    # metrics without a checkpoint are not logged by maybe_save (off-cadence steps are skipped)
    assert 5 not in [r["step"] for r in recs]


def test_log_metrics_merge_types_and_nan(tmp_path):
    rec = TrajectoryRecorder(tmp_path, every=5)
    rec.log_metrics(10, val_loss=torch.tensor(2.5), lr=np.float32(1e-3))
    rec.log_metrics(10, val_acc=0.75, tokens=np.int64(1234))
    rec.log_metrics(5, val_loss=float("nan"), val_acc=float("inf"))
    recs = json.loads((tmp_path / "metrics.json").read_text())
    assert recs == [
        {"step": 5, "val_loss": None, "val_acc": None},
        {"step": 10, "val_loss": 2.5, "lr": pytest.approx(1e-3), "val_acc": 0.75, "tokens": 1234},
    ]
    assert isinstance(recs[1]["tokens"], int)
    with pytest.raises(ValueError, match="scalar"):
        rec.log_metrics(15, val_loss=torch.ones(3))
    with pytest.raises(TypeError, match="real number"):
        rec.log_metrics(15, note="hello")
    with pytest.raises(ValueError, match="record key"):
        rec.log_metrics(15, step=3)
    # the failed calls left the file as it was
    assert json.loads((tmp_path / "metrics.json").read_text()) == recs


def test_metrics_readable_by_the_ingesters_loader(tmp_path):
    from sed_dask.sources.metrics import load_metrics

    rec = TrajectoryRecorder(tmp_path, every=1)
    for s in (0, 3, 6):
        rec.log_metrics(s, val_loss=1.0 + s, val_acc=0.1 * s)
    rec.log_metrics(9, val_loss=float("nan"), val_acc=0.9)
    m = load_metrics(tmp_path / "metrics.json")
    np.testing.assert_array_equal(m["step"], [0, 3, 6, 9])
    np.testing.assert_allclose(m["val_loss"][:3], [1.0, 4.0, 7.0])
    assert math.isnan(m["val_loss"][3])
    np.testing.assert_allclose(m["val_acc"], [0.0, 0.3, 0.6, 0.9])


def test_resume_keeps_earlier_records(tmp_path):
    rec = TrajectoryRecorder(tmp_path, every=10)
    rec.log_metrics(0, val_loss=3.0)
    rec.log_metrics(10, val_loss=2.0)
    again = TrajectoryRecorder(tmp_path, every=10)
    again.log_metrics(20, val_loss=1.0)
    again.log_metrics(10, val_acc=0.5)
    recs = json.loads((tmp_path / "metrics.json").read_text())
    assert recs == [
        {"step": 0, "val_loss": 3.0},
        {"step": 10, "val_loss": 2.0, "val_acc": 0.5},
        {"step": 20, "val_loss": 1.0},
    ]


def test_crash_mid_write_leaves_old_files_intact(tmp_path, monkeypatch):
    model = Tied()
    rec = TrajectoryRecorder(tmp_path, every=1)
    rec.save(1, model, val_loss=1.0)
    before_ckpt = (tmp_path / "ckpt_000001.pt").read_bytes()
    before_json = (tmp_path / "metrics.json").read_text()

    def torn_dump(obj, f, **kw):
        f.write('[{"step": 1, "val_lo')  # half a record, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr("sed_dask.sources.recorder.json.dump", torn_dump)
    with pytest.raises(KeyboardInterrupt):
        rec.log_metrics(2, val_loss=0.5)
    assert (tmp_path / "metrics.json").read_text() == before_json
    monkeypatch.undo()

    def torn_save(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr("sed_dask.sources.recorder.torch.save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        rec.save(1, model)
    with pytest.raises(OSError, match="disk full"):
        rec.save(2, model)
    assert (tmp_path / "ckpt_000001.pt").read_bytes() == before_ckpt
    assert not (tmp_path / "ckpt_000002.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000001.pt", "metrics.json"]  # no temp files left


def test_files_get_the_normal_umask_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    rec = TrajectoryRecorder(tmp_path, every=1)
    p = rec.save(3, Tied(), val_loss=1.0)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_safetensors_tied_weights_and_step_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    torch.manual_seed(1)
    model = Tied()
    rec = TrajectoryRecorder(tmp_path, every=4, fmt="safetensors")
    path = rec.save(8, model, val_loss=0.25)
    assert path.name == "model_000008.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["step"] == "8"
        keys = set(f.keys())
    assert "mid.weight" in keys and len({"emb.weight", "head.weight"} & keys) == 1  # tied: one copy
    fresh = Tied()
    load_model(fresh, str(path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    assert fresh.head.weight.data_ptr() == fresh.emb.weight.data_ptr()
    assert rec.saved_steps() == [8]


def test_upcast_and_argument_checks(tmp_path):
    model = nn.Linear(3, 2).to(torch.bfloat16)
    rec = TrajectoryRecorder(tmp_path / "a", every=1, upcast=True)
    sd = torch.load(rec.save(0, model), weights_only=True)["model_state_dict"]
    assert sd["weight"].dtype == torch.float32
    torch.testing.assert_close(sd["weight"], model.weight.float(), rtol=0, atol=0)
    kept = torch.load(TrajectoryRecorder(tmp_path / "b", every=1).save(0, model), weights_only=True)["model_state_dict"]
    assert kept["weight"].dtype == torch.bfloat16  # never downcast, never silently changed
    with pytest.raises(ValueError, match="only supported with fmt='pt'"):
        TrajectoryRecorder(tmp_path / "c", every=1, fmt="safetensors", upcast=True).save(0, model)
    with pytest.raises(ValueError, match="positive"):
        TrajectoryRecorder(tmp_path, every=0)
    with pytest.raises(ValueError, match="format"):
        TrajectoryRecorder(tmp_path, fmt="npz")
    with pytest.raises(ValueError, match=">= 0"):
        TrajectoryRecorder(tmp_path / "d").save(-1, model)


def test_recorder_and_demo_train_never_import_dask(tmp_path):
    """Training jobs need only torch: load the modules without the package __init__ (which sets
    up dask.config) and with dask made unimportable."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import importlib, sys, types
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "dask" or name.startswith("dask.") or name == "distributed":
                    raise ImportError("dask is blocked in this test")
        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType("sed_dask")
        pkg.__path__ = [{os.path.join(pkg, "sed_dask")!r}]
        sys.modules["sed_dask"] = pkg
        rec = importlib.import_module("sed_dask.sources.recorder")
        importlib.import_module("sed_dask.demo.train")
        import torch
        r = rec.TrajectoryRecorder({str(tmp_path)!r}, every=1)
        r.save(0, torch.nn.Linear(2, 2), val_loss=1.0)
        assert not any(m == "dask" or m.startswith("dask.") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert (tmp_path / "ckpt_000000.pt").exists()
