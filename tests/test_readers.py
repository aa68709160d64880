"""Checkpoint readers, step discovery and metrics files, on real files written by tests/models.py."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from models import make_trajectory, write_hf_sharded, write_orig_mod, write_pt, write_safetensors
from safetensors.torch import save_file

from sed_dask.errors import CheckpointError, MetricsError
from sed_dask.readers import (
    CheckpointReader,
    SafetensorsReader,
    ShardedReader,
    TorchReader,
    flat_slices,
    open_checkpoint,
)
from sed_dask.sources.discover import discover_checkpoints, step_from_name
from sed_dask.sources.metrics import load_metrics


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(3)


@pytest.fixture(scope="module")
def files(traj, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {
        "pt": write_pt(traj, d / "pt"),
        "pt_bf16": write_pt(traj, d / "pt_bf16", dtype=torch.bfloat16),
        "pt_legacy": write_pt(traj, d / "legacy", legacy=True),
        "pt_top": write_pt(traj, d / "top", wrap=None),
        "pt_state_dict": write_pt(traj, d / "sdkey", wrap="state_dict"),
        "pt_model": write_pt(traj, d / "modelkey", wrap="model"),
        "orig_mod": write_orig_mod(traj, d / "om"),
        "st": write_safetensors(traj, d / "st"),
        "st_bf16": write_safetensors(traj, d / "st_bf16", dtype=torch.bfloat16),
        "hf": write_hf_sharded(traj, d / "hf", n_shards=3),
        "hf_bin": write_hf_sharded(traj, d / "hfbin", n_shards=2, bin=True),
    }


def _expected(traj, kind, i):
    sd = traj.state_dicts[i]
    if "bf16" in kind:
        sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()}
    if kind == "orig_mod":
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    if kind.startswith(("st", "hf")):
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return sd


KINDS = [
    "pt",
    "pt_bf16",
    "pt_legacy",
    "pt_top",
    "pt_state_dict",
    "pt_model",
    "orig_mod",
    "st",
    "st_bf16",
    "hf",
    "hf_bin",
]


@pytest.mark.parametrize("kind", KINDS)
def test_list_and_read_every_format_exactly(traj, files, kind):
    step = traj.steps[1]
    sd = _expected(traj, kind, 1)
    with open_checkpoint(files[kind][step]) as r:
        assert isinstance(r, CheckpointReader)
        infos = r.tensors()
        assert set(infos) == set(sd)  # non-tensor entries such as "step" are ignored
        rng = np.random.default_rng(0)
        for name, t in sd.items():
            assert infos[name].shape == tuple(t.shape)
            assert infos[name].dtype == str(t.dtype).removeprefix("torch.")
            want = t.float().reshape(-1).numpy()
            got = r.read(name)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name  # bit-exact, bf16 upcast exact
            lo, hi = sorted(rng.integers(0, want.size + 1, 2))
            assert np.array_equal(r.read(name, int(lo), int(hi)), want[lo:hi])
            out = np.full(hi - lo, np.nan, np.float32)
            assert r.read(name, int(lo), int(hi), out=out) is out and np.array_equal(out, want[lo:hi])


def test_reader_types(files, traj):
    s = traj.steps[0]
    assert isinstance(open_checkpoint(files["pt"][s]), TorchReader)
    assert isinstance(open_checkpoint(files["st"][s]), SafetensorsReader)
    assert isinstance(open_checkpoint(files["hf"][s]), ShardedReader)
    assert isinstance(open_checkpoint(files["hf_bin"][s]), ShardedReader)
    r = open_checkpoint(files["pt_legacy"][s])
    r.tensors()
    assert r.mmap is False  # legacy non-zip file: fallback without mmap
    r = open_checkpoint(files["pt"][s])
    r.tensors()
    assert r.mmap is True


def test_shared_storage_groups(files, traj):
    s = traj.steps[0]
    with open_checkpoint(files["pt"][s]) as r:
        assert [set(g) for g in r.shared_groups()] == [{"tok_emb.weight", "lm_head.weight"}]
    with open_checkpoint(files["pt_bf16"][s]) as r:
        assert [set(g) for g in r.shared_groups()] == [{"tok_emb.weight", "lm_head.weight"}]
    with open_checkpoint(files["st"][s]) as r:
        assert r.shared_groups() == []


def test_flat_slices_cover_every_range_exactly():
    for shape in [(2, 3, 4), (1, 1, 5, 5), (7,), (3, 1, 2), (1, 12)]:
        a = np.arange(int(np.prod(shape))).reshape(shape)
        for lo, hi in itertools.combinations(range(a.size + 1), 2):
            sl = flat_slices(shape, lo, hi)
            assert len(sl) <= 2 * len(shape)
            got = np.concatenate([a[idx].reshape(-1) for idx in sl])
            assert np.array_equal(got, np.arange(lo, hi)), (shape, lo, hi)
    assert flat_slices((3,), 2, 2) == []


@pytest.mark.parametrize("method", ["auto", "safe_open"])
@pytest.mark.parametrize(
    "dtype,framework",
    [(torch.bfloat16, "pt"), (torch.float16, "np"), (torch.float32, "np"), (torch.float64, "np"), (torch.int64, "np")],
)
def test_safetensors_slices_of_nd_tensor(tmp_path, dtype, framework, method):
    """Positioned reads and safe_open + get_slice give the same bits for every numpy-expressible dtype."""
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    t.view(-1)[:3] = torch.tensor([1e-3, -0.0, 65504.0]).to(dtype)
    save_file({"w": t, "s": torch.tensor(2.5)}, tmp_path / "x.safetensors")
    want = t.float().reshape(-1).numpy()
    with SafetensorsReader(tmp_path / "x.safetensors", method=method) as r:
        assert r.framework == framework
        for lo, hi in [(0, 105), (3, 4), (6, 41), (34, 36), (35, 70), (104, 105)]:
            assert np.array_equal(r.read("w", lo, hi).view(np.uint32), want[lo:hi].view(np.uint32))
        assert r.read("s").tolist() == [2.5]
        with pytest.raises(CheckpointError, match="outside tensor 'w'"):
            r.read("w", 5, 200)
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            r.read("nope")


def test_unreadable_and_truncated_files_name_the_file(files, traj, tmp_path):
    src_pt = files["pt"][traj.steps[0]]
    src_st = files["st"][traj.steps[0]]
    cases = {}
    cases["garbage.pt"] = b"this is not a checkpoint at all"
    cases["empty.pt"] = b""
    cases["trunc.pt"] = open(src_pt, "rb").read()[: os.path.getsize(src_pt) // 2]
    cases["trunc.safetensors"] = open(src_st, "rb").read()[:-100]
    cases["header.safetensors"] = open(src_st, "rb").read()[:20]
    cases["junk.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=str(p)):
            open_checkpoint(p).tensors()
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "missing.pt")
    no_sd = tmp_path / "nosd.pt"
    torch.save({"step": 3, "note": "no tensors"}, no_sd)
    with pytest.raises(CheckpointError, match="no tensors found"):
        open_checkpoint(no_sd).tensors()


def test_sharded_index_problems(files, traj, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(files["hf"][traj.steps[0]], d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(idx["weight_map"].values()))[-1]
    os.remove(d / victim)
    with pytest.raises(CheckpointError, match=f"shard file .*{victim}.* does not exist"):
        open_checkpoint(d).tensors()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        open_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- discovery
@pytest.mark.parametrize(
    "name,step",
    [
        ("ckpt_000200.pt", 200),
        ("step200", 200),
        ("checkpoint-200", 200),
        ("step1000-tokens4B", 1000),
        ("model_200.safetensors", 200),
        ("global_step300", 300),
        ("gpt2_124m_step500.pt", 500),
        ("iter_0007.pth", 7),
        ("final.pt", None),
        ("run3_epoch2.pt", None),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_discovery_sorts_numerically_and_ignores_other_files(tmp_path, traj):
    for s in (5, 10, 200, 1000, 30):
        (tmp_path / f"ckpt_{s}.pt").write_bytes(b"x")
    (tmp_path / "pilot_metrics.json").write_text("[]")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "best.pt").write_bytes(b"x")  # no step: skipped with a warning
    found = discover_checkpoints(tmp_path)
    assert list(found) == [5, 10, 30, 200, 1000]
    assert discover_checkpoints(str(tmp_path / "ckpt_*.pt")) == found
    assert list(discover_checkpoints([tmp_path / "ckpt_30.pt", tmp_path / "ckpt_5.pt"])) == [5, 30]
    assert list(discover_checkpoints(tmp_path, steps=[30, 5])) == [5, 30]
    with pytest.raises(CheckpointError, match="requested steps \\[7\\]"):
        discover_checkpoints(tmp_path, steps=[7])
    with pytest.raises(CheckpointError, match="cannot find a training step"):
        discover_checkpoints([tmp_path / "best.pt"])
    m = discover_checkpoints({"7": tmp_path / "best.pt", 3: tmp_path / "ckpt_5.pt"})
    assert list(m) == [3, 7]


def test_discovery_of_hf_directories(files, traj):
    root = os.path.dirname(files["hf"][traj.steps[0]])
    found = discover_checkpoints(root)
    assert list(found) == traj.steps and all(os.path.isdir(p) for p in found.values())
    one = files["hf"][traj.steps[1]]
    assert discover_checkpoints(one) == {traj.steps[1]: one}


def test_duplicate_steps_name_both_files(tmp_path):
    (tmp_path / "ckpt_000200.pt").write_bytes(b"x")
    (tmp_path / "model_200.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="duplicate step 200.*ckpt_000200.pt.*model_200.safetensors"):
        discover_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        discover_checkpoints(tmp_path / "nothing_here")


# ----------------------------------------------------------------------------- metrics files
def test_metrics_shapes(tmp_path):
    recs = [
        {"step": 200, "val_loss": 3.0, "lr": 1e-3, "phase": "warm", "is_hot": True},
        {"step": 0, "val_loss": 4.0, "lr": 0.0, "phase": "warm", "is_hot": False},
        {"step": 400, "train_loss": 2.5},  # a train-only record
        {"step": 400, "val_loss": 2.7, "lr": None},
    ]  # merged into step 400
    (tmp_path / "pilot_metrics.json").write_text(json.dumps(recs))
    m = load_metrics(tmp_path / "pilot_metrics.json")
    assert m["step"].tolist() == [0, 200, 400] and m["step"].dtype == np.int64
    assert m["val_loss"].tolist() == [4.0, 3.0, 2.7]
    assert np.isnan(m["train_loss"][:2]).all() and m["train_loss"][2] == 2.5
    assert m["is_hot"][:2].tolist() == [0.0, 1.0] and np.isnan(m["is_hot"][2])
    assert "phase" not in m

    (tmp_path / "by_step.json").write_text(json.dumps({"400": {"val_loss": 2.7}, "0": {"val_loss": 4.0}}))
    (tmp_path / "cols.json").write_text(json.dumps({"step": [400, 0], "val_loss": [2.7, 4.0]}))
    (tmp_path / "wrapped.json").write_text(
        json.dumps({"metrics": [{"global_step": 0, "val_loss": 4.0}, {"global_step": 400, "val_loss": 2.7}]})
    )
    (tmp_path / "m.csv").write_text("step,val_loss,phase\n400,2.7,b\n0,4.0,a\n200,,a\n")
    for f in ("by_step.json", "cols.json", "wrapped.json"):
        m = load_metrics(tmp_path / f)
        assert m["step"].tolist() == [0, 400] and m["val_loss"].tolist() == [4.0, 2.7], f
    m = load_metrics(tmp_path / "m.csv")
    assert m["step"].tolist() == [0, 200, 400] and set(m) == {"step", "val_loss"}
    assert np.isnan(m["val_loss"][1])


def test_metrics_errors(tmp_path):
    bad = {
        "conflict.json": [{"step": 1, "val_loss": 1.0}, {"step": 1, "val_loss": 2.0}],
        "nostep.json": [{"val_loss": 1.0}],
        "bare.json": {"100": 3.2},
        "fracstep.json": [{"step": 1.5, "val_loss": 1.0}],
        "ragged.json": {"step": [1, 2], "val_loss": [1.0]},
    }
    for name, obj in bad.items():
        (tmp_path / name).write_text(json.dumps(obj))
        with pytest.raises(MetricsError, match=name):
            load_metrics(tmp_path / name)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(MetricsError, match="not valid JSON"):
        load_metrics(tmp_path / "broken.json")
    with pytest.raises(MetricsError, match="does not exist"):
        load_metrics(tmp_path / "nope.json")


def test_float8_goes_through_safe_open_and_truncation_at_read_is_caught(tmp_path):
    t = torch.randn(4, 6).to(torch.float8_e4m3fn)
    big = torch.randn(1000)
    save_file({"f8": t, "big": big}, tmp_path / "x.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as r:
        assert r.framework == "pt"
        assert np.array_equal(r.read("f8", 5, 17), t.float().reshape(-1).numpy()[5:17])
        assert np.array_equal(r.read("big", 10, 20), big.numpy()[10:20])
        size = os.path.getsize(tmp_path / "x.safetensors")
        with open(tmp_path / "x.safetensors", "r+b") as f:  # the file shrinks after validation
            f.truncate(size - 2000)
        with pytest.raises(CheckpointError, match="truncated"):
            r.read("big")
