"""The fast DCP metadata path (sed_dask.readers.dcp_metadata) against torch's own parse, on real
``torch.distributed.checkpoint.save`` output: 2-rank DTensor saves (gloo, several chunks per tensor,
one file per rank) and single-process runs of consecutive checkpoints."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import dask
import numpy as np
import pytest
import torch
from models import flatten, make_trajectory
from sed_oracle import window_svds
from test_readers_dcp import _Evil, extra_tensors, run_two_ranks, save_dcp

import sed_dask
from sed_dask.errors import CheckpointError
from sed_dask.readers import dcp as dcp_mod
from sed_dask.readers import dcp_metadata
from sed_dask.readers.dcp_metadata import TemplateStore, parse_metadata, read_metadata

TORCH = {"sed_dask.readers.dcp-metadata": "torch"}


def torch_metadata(path: str):
    """torch's own loading of a DCP checkpoint's metadata (on files these tests wrote themselves)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def as_record(md) -> dict:
    """torch's ``Metadata`` in the record's plain terms (``load_id`` left out: torch's reader sets its own)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {
        fqn: (
            str(m.properties.dtype).removeprefix("torch."),
            tuple(m.size),
            [tuple(c.offsets) for c in m.chunks],
            [tuple(c.sizes) for c in m.chunks],
        )
        for fqn, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    others = tuple(f for f, m in md.state_dict_metadata.items() if not isinstance(m, TensorStorageMetadata))
    storage = {
        (k.fqn, None if k.offset is None else tuple(k.offset)): (
            v.relative_path,
            v.offset,
            v.length,
            tuple(v.transform_descriptors or ()),
        )
        for k, v in md.storage_data.items()
    }
    sm = md.storage_meta
    return {
        "tensors": tensors,
        "others": others,
        "storage": storage,
        "planner": {k: tuple(v) for k, v in md.planner_data.items()},
        "meta": (str(sm.checkpoint_id), sm.save_id, tuple(sm.modules)),
        "version": md.version,
    }


def rec_dict(rec) -> dict:
    m = rec.storage_meta
    return {
        "tensors": rec.tensors,
        "others": rec.others,
        "storage": rec.storage,
        "planner": rec.planner_data,
        "meta": (str(m["checkpoint_id"]), m["save_id"], m["modules"]),
        "version": rec.version,
    }


def read_bytes(path) -> bytes:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return f.read()


def layout_of(path, how: str):
    dcp_mod.clear_layout_cache()
    with dask.config.set({"sed_dask.readers.dcp-metadata": how}):
        return dcp_mod.get_layout(str(path))


def same_layout(a, b) -> None:
    assert a.infos == b.infos and a.fqns == b.fqns and a.files == b.files
    assert list(a.chunks) == list(b.chunks)
    for fqn in a.chunks:
        assert a.chunks[fqn] == b.chunks[fqn], fqn


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    """2-rank DTensor saves: the extra tensors (Shard(0/1/2), Replicate, uneven and empty shards) and a
    model + optimizer sharded along the last dim."""
    d = tmp_path_factory.mktemp("dcp2")
    ts, place = extra_tensors()
    sd = make_trajectory(2).state_dicts[1]
    jobs = [
        {"out": str(d / "extra"), "tensors": ts, "place": place, "step": 0},
        {"out": str(d / "last"), "tensors": dict(sd), "place": {n: t.dim() - 1 for n, t in sd.items()}, "step": 7},
    ]
    run_two_ranks(jobs, str(d))
    return {"extra": str(d / "extra"), "last": str(d / "last")}


@pytest.fixture(autouse=True)
def _fresh():
    dcp_mod.clear_layout_cache()
    yield
    dcp_mod.clear_layout_cache()


def test_parse_equals_torch_on_real_two_rank_saves(ranks2):
    for path in ranks2.values():
        rec = read_metadata(os.path.join(path, ".metadata"))
        want = as_record(torch_metadata(path))
        assert rec_dict(rec) == want
        assert as_record(dcp_mod.load_metadata(os.path.join(path, ".metadata"))) == want  # the weights_only path
        assert {f for _, (f, *_r) in rec.storage.items()} == {"__0_0.distcp", "__1_0.distcp"}
        assert max(len(c[2]) for c in rec.tensors.values()) >= 2  # several chunks per tensor
        same_layout(layout_of(path, "fast"), layout_of(path, "torch"))


def test_consecutive_saves_match_the_first_byte_for_byte(tmp_path):
    """Later checkpoints of a run differ only in storage_meta strings: matched, not re-parsed, and
    equal to torch's parse of each; any other difference of the same length is parsed in full."""
    traj = make_trajectory(4)
    paths = [
        save_dcp({"model": dict(sd), "step": s}, tmp_path / f"step_{s:04d}")
        for s, sd in zip(traj.steps, traj.state_dicts)
    ]
    raws = [read_bytes(p) for p in paths]
    assert len({len(r) for r in raws}) == 1 and len(set(raws)) == len(raws)
    store = TemplateStore()
    made = []

    def make(rec):
        made.append(rec)
        return ("tables", len(made))

    hows = [store.tables(r, p, make) for r, p in zip(raws, paths)]
    assert [h[2] for h in hows] == ["parsed", "template", "template", "template"]
    assert all(h[0] == ("tables", 1) for h in hows) and len(made) == 1
    for p, (_, meta, _) in zip(paths, hows):
        sm = torch_metadata(p).storage_meta
        assert (str(meta["checkpoint_id"]), meta["save_id"]) == (str(sm.checkpoint_id), sm.save_id)
    # through the reader: every later layout is the first one's tables, equal to torch's own
    with dask.config.set({"sed_dask.readers.dcp-metadata": "fast"}):
        fast = [dcp_mod.get_layout(p) for p in paths]
    assert all(f.chunks._t is fast[0].chunks._t for f in fast)
    for p, f in zip(paths, fast):
        same_layout(f, layout_of(p, "torch"))
    # same length, one storage offset changed: no match, a full parse that sees the new offset
    md = torch_metadata(paths[1])
    key = next(k for k in md.storage_data if k.fqn == "model.tok_emb.weight")
    md.storage_data[key].offset += 1
    md.storage_meta.load_id = None  # set by torch's reader; not in the file
    raw = pickle.dumps(md)
    assert len(raw) == len(raws[0])
    _, _, how = store.tables(raw, "x", make)
    assert how == "parsed" and made[-1].storage[(key.fqn, tuple(key.offset))][1] == md.storage_data[key].offset
    # a free string changed in one of its two copies is not a substitution: parsed in full
    store2 = TemplateStore()
    store2.tables(raws[0], "a", make)
    sid = torch_metadata(paths[0]).storage_meta.save_id.encode()
    assert raws[0].count(sid) == 1
    assert store2.tables(raws[0].replace(sid, sid[::-1]), "b", make)[2] == "template"


def test_a_modified_file_invalidates_the_cache(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    p = save_dcp({"model": {"w": w}}, tmp_path / "c")
    with sed_dask.readers.open_checkpoint(p) as r:
        assert r.tensors()["w"].shape == (3, 4)
        lay = r.layout
    assert dcp_mod.get_layout(p) is lay  # unchanged: the cached layout, no parse
    save_dcp({"model": {"w": torch.arange(10.0).reshape(2, 5)}}, tmp_path / "c")  # a new .metadata
    with sed_dask.readers.open_checkpoint(p) as r:
        assert r.tensors()["w"].shape == (2, 5)
        assert np.array_equal(r.read("w"), np.arange(10.0, dtype=np.float32))
    # same size, same bytes but a new mtime: never trusted, parsed again
    meta = os.path.join(p, ".metadata")
    before = dcp_mod.get_layout(p)
    st = os.stat(meta)
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = dcp_mod.get_layout(p)
    assert after is not before and after.key != before.key and after.infos == before.infos
    # a data file that changed size since: its chunk no longer fits, refused naming it
    data = os.path.join(p, "__0_0.distcp")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 8)
    st = os.stat(meta)
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated: the metadata puts tensor 'model\.w'"):
        dcp_mod.get_layout(p)


def test_malicious_pickles_are_refused_naming_the_file(ranks2, tmp_path):
    p = str(tmp_path / "ck")
    shutil.copytree(ranks2["extra"], p)
    meta = os.path.join(p, ".metadata")
    marker = tmp_path / "pwned"
    md = torch_metadata(p)
    md.planner_data["model.a"] = _Evil(marker)
    with open(meta, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(
        CheckpointError,
        match=r"ck/\.metadata: refused or unreadable DCP metadata: global "
        r"(posix|os)\.system is not allowed.*refused for safety",
    ):
        sed_dask.readers.open_checkpoint(p).tensors()
    assert not marker.exists()
    # BUILD on a stand-in class (would patch it), persistent ids, extension codes: refused, nothing changed
    cls = b"ctorch.distributed.checkpoint.metadata\nMetadata\n"
    for raw in (
        b"\x80\x02" + cls + b"N}X\x07\x00\x00\x00__eq__K\x01s\x86b.",
        b"\x80\x02X\x01\x00\x00\x00xQ.",
        b"\x80\x02\x82\xf0.",
    ):
        with pytest.raises(CheckpointError, match=r"^where: (not a DCP metadata pickle|refused)"):
            parse_metadata(raw, "where")
    assert "__eq__" not in vars(dcp_metadata._STAND_INS["Metadata"])
    import copyreg

    copyreg.add_extension("os", "system", 0xF0)
    try:
        with pytest.raises(CheckpointError, match=r"global os\.system is not allowed"):
            parse_metadata(b"\x80\x02\x82\xf0X\x04\x00\x00\x00trueR.", "where")
    finally:
        copyreg.remove_extension("os", "system", 0xF0)
    # the same length as a good file, differing outside the strings of storage_meta: a full parse refuses it
    good = read_bytes(ranks2["extra"])
    store = TemplateStore()
    store.tables(good, "good", lambda rec: "t")
    md.storage_meta.load_id = None
    for fqn in [f for f in md.state_dict_metadata if f != "model.a"]:
        if len(pickle.dumps(md)) <= len(good):
            break
        del md.state_dict_metadata[fqn]
    evil = pickle.dumps(md).ljust(len(good), b".")  # bytes after STOP are never read
    assert len(evil) == len(good)
    with pytest.raises(CheckpointError, match=r"evil: refused .*(posix|os)\.system.*refused for safety"):
        store.tables(evil, "evil", lambda rec: "t")
    assert not marker.exists()


def test_spectrum_of_dcp_checkpoints_equals_the_float64_oracle(ranks2, tmp_path):
    traj = make_trajectory(6)
    root = tmp_path / "run"
    for s, sd in zip(traj.steps, traj.state_dicts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_dcp({"model": dict(sd), "step": s}, root / f"step_{s}")
    names = traj.trainable_names()
    X = np.stack([flatten(sd, names) for sd in traj.state_dicts]).astype(np.float64)
    want = np.stack([sv for _, sv, _ in window_svds(np.diff(X, axis=0), 3)])
    store = tmp_path / "s.zarr"
    sed_dask.ingest(root, store, "r", scheduler="threads", progress=False)
    for how in ("fast", "torch"):
        with dask.config.set({"sed_dask.readers.dcp-metadata": how}):
            dcp_mod.clear_layout_cache()
            direct = sed_dask.spectrum(
                sed_dask.open_checkpoints(root, run="r"), windows=[3], scheduler="threads", progress=False
            )
            got = direct["sigma"].sel(run="r", window=3).values[2:, :3]
            assert np.allclose(got, want[:, :3], rtol=1e-9, atol=0), how
    ds = sed_dask.spectrum(str(store), runs=["r"], windows=[3], scheduler="threads", progress=False)
    assert np.allclose(ds["sigma"].sel(run="r", window=3).values[2:, :3], want[:, :3], rtol=1e-9, atol=0)
