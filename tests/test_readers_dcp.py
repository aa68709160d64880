"""The PyTorch Distributed Checkpoint reader, on real directories written by ``torch.distributed.checkpoint.save``.

Single-process saves need no process group; the sharded ones come from 2 real processes (gloo on
127.0.0.1, ``_RANK_SCRIPT``) saving DTensors with ``Shard(0)``, ``Shard(1)``,
``Shard(2)`` and ``Replicate`` placements, uneven and empty shards included.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from models import cast_state_dict, flatten, make_trajectory, write_pt

from sed_dask.errors import CheckpointError
from sed_dask.readers import DCPReader, checkpoint_format, open_checkpoint
from sed_dask.readers import dcp as dcp_mod
from sed_dask.readers._pickle2 import as_protocol2
from sed_dask.sources.checkpoint_run import open_checkpoints
from sed_dask.sources.discover import discover_checkpoints
from sed_dask.store.ingest import ingest
from sed_dask.store.trajectory import open_store

SMALL = {"chunk_bytes": 4096, "shard_bytes": 16384}
N_CKPTS = 4


def save_dcp(state: dict, path, **kw) -> str:
    """``dcp.save`` in this process (no process group: it warns that it assumes one process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(path), **kw)
    return str(path)


def optim_state(sd: dict, step: int) -> dict:
    """An optimizer-like subtree: tensors under other names and values, plus python objects."""
    return {
        "state": {
            k: {"exp_avg": v * 2 + 1, "step": torch.tensor(float(step))} for k, v in sd.items() if v.is_floating_point()
        },
        "param_groups": [{"lr": 1e-3, "params": list(sd)}],
    }


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def want(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().reshape(-1).numpy()


def clear_cache():
    dcp_mod.clear_layout_cache()


# ----------------------------------------------------------------------------- 2-rank saves
#: one rank of a 2-rank save (run with ``python -c``: it imports torch only, not this test module):
#: every job of the spec saved as DTensors placed as the job says (-1: Replicate)
_RANK_SCRIPT = """
import os
import sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

rank, port, spec = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
try:
    mesh = init_device_mesh("cpu", (2,))
    for job in torch.load(spec, weights_only=True)["jobs"]:
        def dt(t, d):
            return distribute_tensor(t, mesh, [Replicate() if d < 0 else Shard(d)])
        place, ts = job["place"], job["tensors"]
        model = {n: dt(t, place[n]) for n, t in ts.items()}
        optim = {"state": {n: {"exp_avg": dt(t * 2 + 1, place[n])} for n, t in ts.items() if t.is_floating_point()},
                 "param_groups": [{"lr": 1e-3}]}
        dcp.save({"model": model, "optim": optim, "step": job["step"]}, checkpoint_id=job["out"])
    dist.barrier()  # both ranks are done writing (dcp.save closes its files before it returns)
except BaseException:
    dist.destroy_process_group()
    raise
# gloo's teardown at interpreter exit sometimes aborts ("terminate called without an active
# exception") after a good save: leave without it
sys.stdout.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(jobs: list[dict], tmp) -> None:
    spec = os.path.join(tmp, "spec.pt")
    torch.save({"jobs": jobs}, spec)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(r), str(port), spec],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        pytest.fail("2-rank dcp.save failed:\n" + "\n---\n".join(o[-3000:] for o in outs))


def extra_tensors() -> tuple[dict, dict]:
    """Tensors of every dtype and awkward shape, and their placements on the 2-rank mesh."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    ts = {
        "a": r(7, 5),
        "b": r(4, 9),
        "c": r(3, 4, 5, dtype=torch.bfloat16),
        "d": r(3, 2, 7, dtype=torch.float16),
        "e": r(5, 6, dtype=torch.float64),
        "f": r(1, 6),
        "g": r(10, dtype=torch.bfloat16),
        "h": r(6, 4),
        "i": r(9, 3, 4),
        "n": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "s": torch.tensor(3.25),
    }
    place = {"a": 0, "b": 1, "c": 1, "d": 2, "e": 0, "f": 0, "g": -1, "h": 1, "i": 1, "n": 0, "s": -1}
    return ts, place


@pytest.fixture(scope="module")
def traj():
    return make_trajectory(N_CKPTS)


@pytest.fixture(scope="module")
def src(traj, tmp_path_factory):
    """The trajectory as .pt files, as single-process DCP folders and as 2-rank DCP folders
    (every tensor Shard(0), or every tensor sharded along its last dim), plus the extra tensors."""
    d = tmp_path_factory.mktemp("dcp")
    out = {"pt": write_pt(traj, d / "pt"), "root": d, "dcp": {}, "shard0": {}, "shard_last": {}}
    for s, sd in zip(traj.steps, traj.state_dicts):
        out["dcp"][s] = save_dcp({"model": dict(sd), "optim": optim_state(sd, s), "step": s}, d / "dcp" / f"step_{s}")
    jobs = []
    for variant in ("shard0", "shard_last"):
        for s, sd in zip(traj.steps, traj.state_dicts):
            p = str(d / variant / f"step_{s}")
            out[variant][s] = p
            place = {n: (0 if variant == "shard0" else t.dim() - 1) for n, t in sd.items()}
            jobs.append({"out": p, "tensors": dict(sd), "place": place, "step": s})
    ts, place = extra_tensors()
    out["extra"] = str(d / "extra")
    jobs.append({"out": out["extra"], "tensors": ts, "place": place, "step": 0})
    run_two_ranks(jobs, str(d))
    return out


# ----------------------------------------------------------------------------- listing and reading
def test_single_process_nested_state_dict_reads_exactly(traj, src):
    sd = traj.state_dicts[1]
    path = src["dcp"][traj.steps[1]]
    assert checkpoint_format(path) == "dcp"
    with open_checkpoint(path) as r:
        assert isinstance(r, DCPReader) and r.format == "dcp" and r.shared_groups() == []
        infos = r.tensors()
        assert set(infos) == set(sd)  # model tensors under bare names; optim.* and python objects left out
        assert r.fqn("tok_emb.weight") == "model.tok_emb.weight"
        rng = np.random.default_rng(0)
        for name, t in sd.items():
            assert infos[name].shape == tuple(t.shape) and infos[name].dtype == "float32"
            w = want(t)
            assert np.array_equal(bits(r.read(name)), bits(w)), name
            for _ in range(5):
                lo, hi = sorted(int(x) for x in rng.integers(0, w.size + 1, 2))
                out = np.full(hi - lo, np.nan, np.float32)
                assert r.read(name, lo, hi, out=out) is out and np.array_equal(bits(out), bits(w[lo:hi]))
        with pytest.raises(CheckpointError, match="no tensor 'optim.state"):
            r.read("optim.state.tok_emb.weight.exp_avg")
    # the .metadata file itself opens the same checkpoint
    with open_checkpoint(os.path.join(path, ".metadata")) as r:
        assert set(r.tensors()) == set(sd)


def test_two_rank_shards_every_dtype_and_random_slices_across_chunks(src):
    ts, _ = extra_tensors()
    with open_checkpoint(src["extra"]) as r:
        infos = r.tensors()
        assert set(infos) == set(ts)
        lay = r.layout
        # the metadata really holds 2-rank chunks: uneven, along dims 0, 1 and 2, one rank empty for "f"
        offs = {n: sorted(c.offsets for c in lay.chunks[r.fqn(n)]) for n in ts}
        assert offs["a"] == [(0, 0), (4, 0)] and offs["b"] == [(0, 0), (0, 5)]
        assert offs["d"] == [(0, 0, 0), (0, 0, 4)] and offs["i"] == [(0, 0, 0), (0, 2, 0)]
        assert offs["f"] == [(0, 0)] and len(offs["g"]) == 1 and offs["s"] == [()]
        assert {c.file for c in lay.chunks["model.a"]} == {"__0_0.distcp", "__1_0.distcp"}
        rng = np.random.default_rng(1)
        crossing = 0
        for name, t in ts.items():
            info = infos[name]
            assert info.dtype == str(t.dtype).removeprefix("torch.") and info.shape == tuple(t.shape)
            w = want(t)
            assert np.array_equal(bits(r.read(name)), bits(w)), name
            chunks = lay.chunks[r.fqn(name)]
            for _ in range(150):
                lo, hi = sorted(int(x) for x in rng.integers(0, w.size + 1, 2))
                got = r.read(name, lo, hi)
                assert np.array_equal(bits(got), bits(w[lo:hi])), (name, lo, hi)
                if hi > lo and len(chunks) > 1:
                    idx = np.unravel_index(np.arange(lo, hi), t.shape)
                    owner = {
                        next(
                            i
                            for i, c in enumerate(chunks)
                            if all(o <= x < o + z for x, o, z in zip(p, c.offsets, c.sizes))
                        )
                        for p in zip(*[ix[[0, -1]] for ix in idx])
                    }
                    crossing += len(owner) > 1
        assert crossing > 300  # many slices start in one chunk and end in another


def test_tensors_reads_no_chunk_data_and_slices_read_only_their_bytes(src, tmp_path, monkeypatch):
    clear_cache()
    calls = []
    real = os.preadv

    def spy(fd, bufs, offset, *a):
        n = real(fd, bufs, offset, *a)
        calls.append((fd, offset, n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    with DCPReader(src["extra"]) as r:
        infos = r.tensors()
        assert calls == [] and "a" in infos
        chunk0 = next(c for c in r.layout.chunks["model.a"] if c.offsets == (0, 0))
        r.read("a", 0, 3)  # locates chunk 0 (zip directory + data.pkl) and reads 3 floats
        assert calls and all(
            fd == r._fds[chunk0.file] and chunk0.start <= off < chunk0.start + chunk0.length for fd, off, _ in calls
        )
        calls.clear()
        r.read("a", 5, 17)  # chunk 0 located already: one positioned read of exactly 12 floats
        assert [n for _, _, n in calls] == [12 * 4]
        r.read("b", 0, 9)  # row 0 of a Shard(1) tensor: both chunks located
        calls.clear()
        r.read("b", 0, 36)  # 4 rows, each half from one chunk: one read per chunk, 20 and 16 floats
        assert sorted(n for _, _, n in calls) == [16 * 4, 20 * 4]
    monkeypatch.undo()
    # chunk bytes replaced by zeros of the same size: listing is unchanged, reading names the chunk
    bad = tmp_path / "zeros"
    shutil.copytree(src["extra"], bad)
    for f in os.listdir(bad):
        if f.endswith(".distcp"):
            size = os.path.getsize(bad / f)
            with open(bad / f, "wb") as fh:
                fh.write(b"\0" * size)
    with DCPReader(bad) as r:
        assert r.tensors() == infos
        with pytest.raises(
            CheckpointError,
            match=r"__\d_0\.distcp: bytes \[\d+:\d+\] \(tensor 'model\.a'.*not a "
            r"torch\.save archive",
        ):
            r.read("a")


def test_dtypes_non_contiguous_chunks_scalars_and_unsupported(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 4, generator=g)
    sd = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 6, generator=g).bfloat16(),
        "f16": torch.randn(9, generator=g).half(),
        "f64": torch.randn(2, 3, generator=g).double() * 1e3,
        "f8": torch.randn(5, 3, generator=g).to(torch.float8_e4m3fn),
        "i32": torch.arange(-5, 5, dtype=torch.int32),
        "t": base.t(),
        "perm": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "scalar": torch.tensor(-1.5),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
    }
    path = save_dcp(sd, tmp_path / "d")
    with open_checkpoint(path) as r:
        infos = r.tensors()
        assert {n: i.dtype for n, i in infos.items()} == {n: str(t.dtype).removeprefix("torch.") for n, t in sd.items()}
        assert r.layout.stored == {}
        rng = np.random.default_rng(3)
        for name, t in sd.items():
            if name == "c64":
                continue
            w = want(t)
            assert np.array_equal(bits(r.read(name)), bits(w)), name
            for _ in range(30):
                lo, hi = sorted(int(x) for x in rng.integers(0, w.size + 1, 2))
                assert np.array_equal(bits(r.read(name, lo, hi)), bits(w[lo:hi])), (name, lo, hi)
        # DCP keeps a transposed tensor's strides in its chunk archive; the reader follows them
        assert r.layout.stored[("t", (0, 0))].strides == (1, 4)
        with pytest.raises(CheckpointError, match=r"tensor 'c64' has dtype complex64, which this reader does not"):
            r.read("c64")


# ----------------------------------------------------------------------------- names
def test_namespaces_follow_find_state_dict(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    # an HF model saved flat: "model." is part of the names, not a wrapper, and lm_head stays
    flat = save_dcp({"model.layers.0.w": w, "lm_head.weight": w + 1}, tmp_path / "flat")
    assert set(DCPReader(flat).tensors()) == {"model.layers.0.w", "lm_head.weight"}
    # the .pt wrappers, in find_state_dict's order of preference
    both = save_dcp(
        {"model_state_dict": {"w": w}, "model": {"v": w}, "optim": {"state": {"w": {"m": w}}}}, tmp_path / "both"
    )
    assert set(DCPReader(both).tensors()) == {"w"}
    sdk = save_dcp({"state_dict": {"w": w}, "step": 3}, tmp_path / "sdk")
    assert set(DCPReader(sdk).tensors()) == {"w"}
    # no wrapper: top-level tensors only (nested optimizer tensors left out, as for .pt files)
    top = save_dcp({"w": w, "optim": {"state": {"w": {"m": w}}}, "step": 1}, tmp_path / "top")
    assert set(DCPReader(top).tensors()) == {"w"}
    none = save_dcp({"net": {"w": w}, "step": 1}, tmp_path / "none")
    with pytest.raises(
        CheckpointError,
        match=r"no tensors found at the top level or under "
        r"model_state_dict/state_dict/model \(top-level keys: \['net'",
    ):
        DCPReader(none).tensors()


# ----------------------------------------------------------------------------- ingestion and discovery
def ingest_t(sources, store, run, **kw):
    return ingest(sources, store, run, scheduler="threads", progress=False, **SMALL, **kw)


def test_ingest_dcp_trajectories_bit_identical_to_pt(traj, src, tmp_path):
    ingest_t(src["pt"], tmp_path / "s.zarr", "pt")
    ts = open_store(tmp_path / "s.zarr")
    ref = ts.run("pt")
    want_rows = np.stack([flatten(sd, traj.trainable_names()) for sd in traj.state_dicts])
    assert np.array_equal(ref.read(slice(None)).view(np.uint32), want_rows.view(np.uint32))
    for kind in ("dcp", "shard0", "shard_last"):
        # a directory of step_N/ DCP folders, discovered with steps from the folder names
        s = ingest_t(src["root"] / kind, tmp_path / "s.zarr", kind)
        assert s.steps == traj.steps
        rs = open_store(tmp_path / "s.zarr").run(kind)
        assert rs.read(slice(None)).tobytes() == ref.read(slice(None)).tobytes(), kind
        for key in ("param_index", "param_index_hash", "n_params"):
            assert rs.attrs[key] == ref.attrs[key], (kind, key)
        assert set(rs.policy["dropped"]) == set(ref.policy["dropped"])
        assert rs.attrs["provenance"]["source_format"] == "dcp"
        assert "lm_head.weight" in rs.policy["dropped"]  # tied head: two copies in DCP, dropped as bit-identical
    run = open_checkpoints(src["root"] / "shard_last", run="direct", chunk_bytes=SMALL["chunk_bytes"])
    assert run.attrs["source_format"] == "dcp" and run.attrs["param_index_hash"] == ref.attrs["param_index_hash"]
    assert run.read(slice(None)).tobytes() == ref.read(slice(None)).tobytes()


def test_bf16_trajectory_and_discovery(traj, tmp_path):
    d = tmp_path / "bf"
    for s, sd in zip(traj.steps[:2], traj.state_dicts[:2]):
        save_dcp({"model_state_dict": cast_state_dict(sd, torch.bfloat16), "step": s}, d / f"global_step{s}")
    (d / "notes.txt").write_text("not a checkpoint")
    found = discover_checkpoints(d)
    assert list(found) == traj.steps[:2] and all(p.endswith(f"global_step{s}") for s, p in found.items())
    ingest_t(d, tmp_path / "b.zarr", "bf")
    rs = open_store(tmp_path / "b.zarr").run("bf")
    names = traj.trainable_names()
    rows = np.stack([flatten(cast_state_dict(sd, torch.bfloat16), names) for sd in traj.state_dicts[:2]])
    assert np.array_equal(rs.read(slice(None)).view(np.uint32), rows.view(np.uint32))
    assert rs.attrs["provenance"]["source_dtypes"] == ["bfloat16"]


# ----------------------------------------------------------------------------- bad input
def _meta(path):
    return dcp_mod.load_metadata(os.path.join(path, ".metadata"))


def _write_meta(path, md):
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)  # written with the default protocol, as dcp.save does


@pytest.fixture
def two_rank_copy(src, tmp_path):
    clear_cache()
    p = tmp_path / "ck"
    shutil.copytree(src["extra"], p)
    yield str(p)
    clear_cache()


def test_missing_and_truncated_files(two_rank_copy, tmp_path):
    p = two_rank_copy
    os.rename(os.path.join(p, ".metadata"), os.path.join(tmp_path, "md"))
    with pytest.raises(CheckpointError, match=r"ck: no \.metadata file, so not a complete DCP checkpoint"):
        open_checkpoint(p).tensors()
    os.rename(os.path.join(tmp_path, "md"), os.path.join(p, ".metadata"))
    os.rename(os.path.join(p, "__1_0.distcp"), os.path.join(tmp_path, "d1"))
    with pytest.raises(
        CheckpointError,
        match=r"DCP data file __1_0\.distcp \(holding tensor 'model\.\w+'\) does not "
        r"exist",
    ):
        open_checkpoint(p).tensors()
    with open(os.path.join(tmp_path, "d1"), "rb") as f:
        data = f.read()
    with open(os.path.join(p, "__1_0.distcp"), "wb") as f:
        f.write(data[: len(data) // 2])
    clear_cache()
    with pytest.raises(
        CheckpointError,
        match=r"__1_0\.distcp: truncated: the metadata puts tensor 'model\.\w+' "
        r"\(chunk at offsets \[.*\]\) at bytes \[\d+:\d+\], the file holds",
    ):
        open_checkpoint(p).tensors()
    with pytest.raises(CheckpointError, match="is one data file of a DCP checkpoint; pass its directory"):
        open_checkpoint(os.path.join(p, "__0_0.distcp"))
    # truncated after the metadata was read: the positioned read names the file
    with open(os.path.join(p, "__1_0.distcp"), "wb") as f:
        f.write(data)
    clear_cache()
    r = DCPReader(p)
    r.tensors()
    with open(os.path.join(p, "__1_0.distcp"), "r+b") as f:
        f.truncate(len(data) - 1)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: the file changed since"):
        r.read("a")
    r.close()


def test_inconsistent_metadata(two_rank_copy):
    p = two_rank_copy
    with open(os.path.join(p, ".metadata"), "rb") as f:
        original = f.read()

    def fresh():
        with open(os.path.join(p, ".metadata"), "wb") as f:
            f.write(original)
        return _meta(p)

    md = fresh()
    key = next(k for k in md.storage_data if k.fqn == "model.a" and tuple(k.offset) == (4, 0))
    info = md.storage_data[key]
    size = os.path.getsize(os.path.join(p, info.relative_path))
    info.offset = size - 10
    _write_meta(p, md)
    with pytest.raises(
        CheckpointError,
        match=r"truncated: the metadata puts tensor 'model\.a' \(chunk at offsets "
        r"\[4, 0\]\) at bytes",
    ):
        DCPReader(p).tensors()
    md = fresh()
    md.state_dict_metadata["model.b"].chunks.pop()
    _write_meta(p, md)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.b' of size \[4, 9\] is not covered by its chunks: its "
        r"chunks hold \d+ elements, the tensor has 36",
    ):
        DCPReader(p).tensors()
    md = fresh()
    c1 = next(c for c in md.state_dict_metadata["model.a"].chunks if c.offsets[0] == 4)
    c1.offsets = torch.Size([3, 0])  # overlaps row 3 of the other chunk, leaves row 6 uncovered: same volume
    _write_meta(p, md)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.a' .* not covered by its chunks: chunks at offsets "
        r"\[\d, 0\] and \[\d, 0\] overlap",
    ):
        DCPReader(p).tensors()
    md = fresh()
    md.state_dict_metadata["model.h"].chunks[0].offsets = torch.Size([0, 3])
    _write_meta(p, md)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.h'.*lies outside the tensor"):
        DCPReader(p).tensors()
    md = fresh()
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.e")
    info.relative_path = "../elsewhere.distcp"
    _write_meta(p, md)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.e': chunk file '\.\./elsewhere\.distcp' is not inside"):
        DCPReader(p).tensors()
    with open(os.path.join(p, ".metadata"), "wb") as f:
        f.write(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"\.metadata: not a DCP metadata pickle"):
        DCPReader(p).tensors()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_with_a_disallowed_global_is_refused(two_rank_copy, tmp_path):
    p = two_rank_copy
    marker = tmp_path / "pwned"
    md = _meta(p)
    md.planner_data["model.a"] = _Evil(marker)
    _write_meta(p, md)
    with pytest.raises(
        CheckpointError,
        match=r"\.metadata: refused or unreadable DCP metadata: .*(posix|os)\.system.*"
        r"refused for safety",
    ):
        open_checkpoint(p).tensors()
    assert not marker.exists()
    with open(os.path.join(p, ".metadata"), "wb") as f:
        pickle.dump({"state_dict_metadata": {}}, f)
    with pytest.raises(CheckpointError, match=r"holds a dict, not DCP Metadata"):
        DCPReader(p).tensors()


def test_loading_metadata_leaves_the_users_safe_globals_alone(src):
    from torch.distributed.checkpoint.metadata import Metadata

    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Metadata])
    try:
        dcp_mod.load_metadata(os.path.join(src["extra"], ".metadata"))
        assert Metadata in torch.serialization.get_safe_globals()  # added by the user: still there
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    dcp_mod.load_metadata(os.path.join(src["extra"], ".metadata"))
    assert set(torch.serialization.get_safe_globals()) == set(before)  # nothing of ours left behind


def test_protocol_rewrite_keeps_every_value():
    from torch._weights_only_unpickler import Unpickler

    shared = ["x" * 300, "é"]
    obj = {
        "a": [1, 2.5, None, True, (shared, shared)],
        "long": "y" * 70000,
        "n": 2**70,
        "dt": torch.bfloat16,
        "size": torch.Size([3, 4]),
        "sz2": torch.Size([3, 4]),
        "t": ("torch", "Size"),
        ("k", 1): {"nested": {}},
    }
    for proto in (2, 3, 4, 5):
        raw = pickle.dumps(obj, protocol=proto)
        got = Unpickler(io.BytesIO(as_protocol2(raw)), encoding="utf-8").load()
        assert got == obj and got["a"][4][0] is got["a"][4][1], proto


# ----------------------------------------------------------------------------- stream transforms
def _zlib_extension():
    from torch.distributed.checkpoint._extension import StreamTransformExtension

    class Zlib(StreamTransformExtension):
        @staticmethod
        def registry_name():
            return "test.zlib"

        @staticmethod
        def from_descriptor(version):
            return Zlib()

        def get_descriptor(self):
            return "test.zlib/1"

        def transform_to(self, output):
            class W(io.RawIOBase):
                def __init__(self):
                    self.c = zlib.compressobj()

                def writable(self):
                    return True

                def write(self, b):
                    output.write(self.c.compress(bytes(b)))
                    return len(b)

                def close(self):
                    if not self.closed:
                        output.write(self.c.flush())
                    super().close()

            return W()

        def transform_from(self, input):
            return io.BytesIO(zlib.decompress(input.read()))

    return Zlib


def test_chunks_with_stream_transforms(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ExtensionRegistry

    Zlib = _zlib_extension()
    sd = {"w": torch.randn(5, 7), "b": torch.randn(4).bfloat16()}
    path = str(tmp_path / "z")
    save_dcp({"model": sd}, path, storage_writer=FileSystemWriter(path, _extensions=[Zlib()]))
    with open_checkpoint(path) as r:
        assert set(r.tensors()) == {"w", "b"}
        assert r.layout.chunks["model.w"][0].transforms == ("test.zlib/1",)
        with pytest.raises(
            CheckpointError,
            match=r"tensor 'model\.w', chunk at offsets \[0, 0\]\): stored with "
            r"transforms \['test\.zlib/1'\] that cannot be undone here",
        ):
            r.read("w")
    reg = ExtensionRegistry()
    reg.register(Zlib)
    with DCPReader(path, extension_registry=reg) as r:
        for n, t in sd.items():
            assert np.array_equal(bits(r.read(n)), bits(want(t)))
            assert np.array_equal(bits(r.read(n, 1, 3)), bits(want(t)[1:3]))
