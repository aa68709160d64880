"""Positioned reads of zip-format ``.pt`` files (sed_dask/readers/torch_pt.py), on real ``torch.save`` files.

Every value read with ``os.preadv`` from the cached layout must equal, bit for bit, what the mapped
path (``method="mmap"``) and ``torch.load`` give; the layout must be built once per file per process
and rebuilt when the file changes.
"""

from __future__ import annotations

import os
import threading
import zipfile

import numpy as np
import pytest
import torch
from models import make_trajectory, write_orig_mod, write_pt

from sed_dask.errors import CheckpointError
from sed_dask.readers import TorchReader, layout_cache, open_checkpoint, rawio, torch_pt


@pytest.fixture(autouse=True)
def _fresh_cache():
    torch_pt.clear_layout_cache()
    yield
    torch_pt.clear_layout_cache()


@pytest.fixture
def loads(monkeypatch):
    """Counts the module's ``torch.load`` calls."""
    calls = []
    real = torch_pt._torch_load

    def counting(path, *, mmap):
        calls.append((str(path), mmap))
        return real(path, mmap=mmap)

    monkeypatch.setattr(torch_pt, "_torch_load", counting)
    return calls


def _expected(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).float().numpy()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _ranges(n: int):
    out = {(0, n), (0, 0), (n, n)}
    if n > 2:
        out |= {(1, n - 1), (0, 1), (n - 1, n), (n // 3, n // 3 + 1), (n // 3, 2 * n // 3 + 1)}
    if n > 20:
        out |= {(7, 19), (3, n - 5), (n - 13, n)}
    return sorted(out)


def _crafted():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(200, generator=g)
    w = torch.randn(6, 5, generator=g)
    sd = {
        "f32": torch.randn(4, 8, 3, generator=g),
        "bf16": torch.randn(37, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, 41, generator=g).half(),
        "f64": torch.randn(29, generator=g).double() * 1e40,  # beyond float32: overflows to inf as torch does
        "f64_small": torch.randn(5, 7, generator=g).double(),
        "i64": torch.tensor([2**53 + 1, -(2**62) + 12345, 7, 0, 2**24 + 1, -3]),
        "i32": torch.arange(-50, 50, dtype=torch.int32).reshape(10, 10),
        "u8": torch.arange(256, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "view_tail": big[10:],  # shares big's storage, storage_offset 10
        "view_head": big[:5],  # same storage, offset 0
        "view_mid": big[50:120].view(7, 10),
        "w": w,
        "w_tied": w,  # the same tensor twice: a tied group
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.25),
        "transposed": torch.randn(5, 9, generator=g).t(),  # saved with its strides: non-contiguous
    }
    sd["bf16_nan"] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.bfloat16)
    return sd


@pytest.fixture
def crafted(tmp_path):
    sd = _crafted()
    path = tmp_path / "crafted.pt"
    torch.save({"step": 12, "model_state_dict": sd, "optimizer": {"lr": 1e-3}}, path)
    return str(path), sd


def test_pread_equals_mmap_and_torch_load_bit_for_bit(crafted):
    path, sd = crafted
    loaded = torch.load(path, weights_only=True)["model_state_dict"]
    with TorchReader(path) as r, TorchReader(path, method="mmap") as m:
        assert set(r.tensors()) == set(sd)
        assert set(r.layout.offsets) == set(sd) - {"transposed"}  # the non-contiguous view falls back
        for name, t in sd.items():
            want = _expected(loaded[name])
            assert np.array_equal(_bits(_expected(t)), _bits(want))
            n = want.size
            for lo, hi in _ranges(n):
                got, ref = r.read(name, lo, hi), m.read(name, lo, hi)
                assert np.array_equal(_bits(got), _bits(want[lo:hi])), (name, lo, hi)
                assert np.array_equal(_bits(ref), _bits(want[lo:hi])), (name, lo, hi)
            out = np.full(n, 7.0, dtype=np.float32)
            assert r.read(name, out=out) is out and np.array_equal(_bits(out), _bits(want))


def test_offsets_point_at_the_tensor_bytes(crafted):
    """The derived offset is the file position of the first element: the raw bytes there are the tensor's."""
    path, sd = crafted
    lay = torch_pt.get_layout(path)
    with open(path, "rb") as f:
        data = f.read()
    for name, off in lay.offsets.items():
        t = sd[name].contiguous()
        if t.numel() == 0:
            continue
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[off : off + len(raw)] == raw, name
    # views of one storage sit at the storage's offset + storage_offset * itemsize
    assert lay.offsets["view_tail"] - lay.offsets["view_head"] == 10 * 4
    assert lay.offsets["view_mid"] - lay.offsets["view_head"] == 50 * 4


def test_tensors_and_shared_groups_unchanged(crafted):
    path, sd = crafted
    with TorchReader(path) as r, TorchReader(path, method="mmap") as m:
        infos = r.tensors()
        assert infos["bf16"].dtype == "bfloat16" and infos["bf16"].shape == (37, 5)
        assert infos["transposed"].shape == (9, 5) and infos["scalar"].shape == ()
        assert infos["empty"].size == 0
        assert r.shared_groups() == [("w", "w_tied")]
        # exactly what the pre-layout code computed from the mapped state dict
        assert r.shared_groups() == torch_pt._shared_groups(m._state_dict())
        assert infos == {
            k: torch_pt.TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape))
            for k, v in m._state_dict().items()
        }


def test_pread_method_refuses_what_it_cannot_serve(crafted):
    path, sd = crafted
    with TorchReader(path, method="pread") as r:
        assert np.array_equal(r.read("bf16"), _expected(sd["bf16"]))
        with pytest.raises(CheckpointError, match=r"crafted\.pt.*'transposed'.*positioned reads"):
            r.read("transposed")
    with pytest.raises(ValueError, match="method"):
        TorchReader(path, method="mapped")


def test_reads_in_pieces(crafted, monkeypatch):
    """Dtypes other than float32 are converted in bounded pieces; piece borders must not show."""
    path, sd = crafted
    monkeypatch.setattr(rawio, "PIECE", 7)
    with TorchReader(path) as r:
        for name in ("bf16", "f16", "f64", "i32", "u8"):
            want = _expected(sd[name])
            for lo, hi in _ranges(want.size):
                assert np.array_equal(_bits(r.read(name, lo, hi)), _bits(want[lo:hi])), (name, lo, hi)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "top", "orig_mod", "fp16"])
def test_trajectory_files(tmp_path, kind):
    traj = make_trajectory(2)
    kw = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "top": {"wrap": None}, "fp16": {"dtype": torch.float16}}.get(
        kind, {}
    )
    paths = write_orig_mod(traj, tmp_path) if kind == "orig_mod" else write_pt(traj, tmp_path, **kw)
    for p in paths.values():
        obj = torch.load(p, weights_only=True)
        sd = torch_pt.find_state_dict(obj, p)
        with open_checkpoint(p) as r, TorchReader(p, method="mmap") as m:
            assert isinstance(r, TorchReader) and r.mmap is True
            assert set(r.layout.offsets) == set(sd)  # everything served by positioned reads
            assert (
                r.shared_groups()
                == m.shared_groups()
                == [(k, k.replace("tok_emb", "lm_head")) for k in sd if k.endswith("tok_emb.weight")]
            )
            for name, t in sd.items():
                want = _expected(t)
                assert np.array_equal(_bits(r.read(name)), _bits(want)), name
                assert np.array_equal(_bits(m.read(name)), _bits(want)), name
                if want.size > 10:
                    assert np.array_equal(_bits(r.read(name, 3, want.size - 4)), _bits(want[3:-4]))


def test_legacy_file_keeps_working(tmp_path, loads):
    sd = _crafted()
    p = tmp_path / "legacy.pt"
    torch.save({"model_state_dict": sd}, p, _use_new_zipfile_serialization=False)
    with TorchReader(p) as r:
        assert r.mmap is False and r.layout.legacy and r.layout.offsets == {}
        assert r.shared_groups() == [("w", "w_tied")]
        for name, t in sd.items():
            assert np.array_equal(_bits(r.read(name)), _bits(_expected(t))), name
            n = t.numel()
            if n > 3:
                assert np.array_equal(_bits(r.read(name, 1, n - 1)), _bits(_expected(t)[1:-1]))
    with pytest.raises(CheckpointError, match="legacy"):
        TorchReader(p, method="pread").read("f32")
    n = len(loads)
    with TorchReader(p) as r:  # the layout and the one-entry legacy cache are both warm
        r.tensors()
        r.read("bf16")
    assert len(loads) == n


def test_second_open_does_not_load_again_and_a_rewrite_does(tmp_path, loads):
    p = tmp_path / "ckpt.pt"
    torch.save({"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.bfloat16)}, p)
    with TorchReader(p) as r:
        assert list(r.tensors()) == ["a", "b"]
        assert np.array_equal(r.read("a", 2, 5), [2, 3, 4])
    assert loads == [(str(p), True)]
    for _ in range(3):
        with open_checkpoint(p) as r:
            r.tensors()
            r.shared_groups()
            assert np.array_equal(r.read("a"), np.arange(10.0))
            assert np.array_equal(r.read("b"), [1, 1, 1])
    assert len(loads) == 1
    # rewritten with another size: reloaded
    torch.save({"a": torch.arange(20.0) * 2, "b": torch.ones(3, dtype=torch.bfloat16)}, p)
    with TorchReader(p) as r:
        assert r.tensors()["a"].shape == (20,)
        assert np.array_equal(r.read("a"), np.arange(20.0) * 2)
    assert len(loads) == 2
    # rewritten with the same size (only the values differ): the mtime changes, reloaded
    st = os.stat(p)
    torch.save({"a": torch.arange(20.0) * 3, "b": torch.ones(3, dtype=torch.bfloat16)}, p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert os.path.getsize(p) == st.st_size
    with TorchReader(p) as r:
        assert np.array_equal(r.read("a"), np.arange(20.0) * 3)
    assert len(loads) == 3


def test_concurrent_first_opens_load_once(tmp_path, loads):
    p = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": {"a": torch.arange(1000.0)}}, p)
    errors, results = [], []

    def work():
        try:
            with TorchReader(p) as r:
                results.append(r.read("a", 100, 200))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(np.array_equal(x, np.arange(100.0, 200.0)) for x in results)
    assert len(loads) == 1


def test_staggered_first_opens_load_once(tmp_path, loads, monkeypatch):
    """Threads arriving while the first one finishes (its layout built, not yet cached) must not load again."""
    import time

    p = tmp_path / "ckpt.pt"
    torch.save({"a": torch.arange(1000.0)}, p)
    real_key = layout_cache.file_key

    def slow_key(path):  # widens the gap between building a layout and caching it
        time.sleep(0.003)
        return real_key(path)

    monkeypatch.setattr(layout_cache, "file_key", slow_key)
    errors = []

    def work():
        try:
            with TorchReader(p) as r:
                assert np.array_equal(r.read("a", 5, 9), [5, 6, 7, 8])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = []
    for _ in range(24):
        t = threading.Thread(target=work)
        t.start()
        threads.append(t)
        time.sleep(0.001)
    for t in threads:
        t.join()
    assert not errors
    assert len(loads) == 1


def test_file_changed_or_truncated_names_the_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"a": torch.arange(1000.0)}, p)
    r = TorchReader(p)
    r.tensors()
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated under an open reader: refused, not misread
    with pytest.raises(CheckpointError, match=rf"{p}.*changed"):
        r.read("a")
    r.close()
    with pytest.raises(CheckpointError, match=rf"{p}.*unreadable or truncated"):
        TorchReader(p).tensors()  # a new stat key: rebuilt from the file, which fails clearly
    p.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        TorchReader(p).tensors()


def test_short_read_is_reported(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"a": torch.arange(1000.0)}, p)
    r = TorchReader(p)
    r.tensors()
    r.layout.offsets["a"] = os.path.getsize(p) - 8  # as if the file ended inside the tensor
    with pytest.raises(CheckpointError, match=rf"{p}.*truncated.*'a'"):
        r.read("a")
    r.close()


def test_repacked_zip_without_alignment(tmp_path):
    """Offsets come from each entry's local header, whatever the writer's padding."""
    src = tmp_path / "src.pt"
    sd = {"a": torch.randn(1000), "b": torch.randn(33).double(), "c": torch.randn(17).to(torch.bfloat16)}
    torch.save(sd, src)
    dst = tmp_path / "repacked.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for i in zin.infolist():
            zout.writestr(i.filename, zin.read(i.filename), compress_type=zipfile.ZIP_STORED)
    with TorchReader(dst, method="pread") as r:
        for name, t in sd.items():
            assert np.array_equal(_bits(r.read(name, 1)), _bits(_expected(t)[1:])), name


def test_compressed_entries_fall_back_to_the_mapping(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"a": torch.randn(100)}, src)
    dst = tmp_path / "deflated.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for i in zin.infolist():
            zout.writestr(
                i.filename,
                zin.read(i.filename),
                compress_type=zipfile.ZIP_DEFLATED if "/data/" in i.filename else zipfile.ZIP_STORED,
            )
    with TorchReader(dst) as r, TorchReader(dst, method="mmap") as m:
        assert r.layout.offsets == {} and "compressed" in r.layout.why
        assert np.array_equal(_bits(r.read("a")), _bits(m.read("a")))  # the previous behaviour


def test_unlocatable_storages_fall_back_to_the_mapping(crafted, monkeypatch):
    path, sd = crafted
    monkeypatch.setattr(torch_pt, "_storage_offsets", lambda p, obj: (None, "not views of one mapping"))
    with TorchReader(path) as r:
        assert r.layout.offsets == {}
        for name, t in sd.items():
            assert np.array_equal(_bits(r.read(name)), _bits(_expected(t))), name


def test_big_endian_file_falls_back(tmp_path):
    """A file without a byteorder record read as big-endian: torch byteswaps, so no positioned reads."""
    from torch.serialization import LoadEndianness, get_default_load_endianness, set_default_load_endianness

    src, p = tmp_path / "src.pt", tmp_path / "nobom.pt"
    torch.save({"a": torch.arange(10.0)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w") as zout:  # an old file: no byteorder record
        for i in zin.infolist():
            if not i.filename.endswith("/byteorder"):
                zout.writestr(i.filename, zin.read(i.filename))
    with TorchReader(p) as r:
        assert "a" in r.layout.offsets  # default: little-endian
    torch_pt.clear_layout_cache()
    old = get_default_load_endianness()
    set_default_load_endianness(LoadEndianness.BIG)
    try:
        want = torch.load(p, weights_only=True)["a"].numpy()
        assert not np.array_equal(want, np.arange(10.0))  # torch did swap the bytes
        with TorchReader(p) as r:
            assert r.layout.offsets == {} and "little-endian" in r.layout.why
            assert np.array_equal(_bits(r.read("a")), _bits(want))
    finally:
        set_default_load_endianness(old)
