"""``torch.save`` checkpoints (``.pt``/``.pth``/``.bin``).

Zip-format files store every storage as an uncompressed zip entry ``<archive>/data/<key>``, so a
flat slice of a contiguous tensor is one byte range of the file. The first open of a file in a
process loads it once with ``torch.load(mmap=True, weights_only=True)`` (unpickling builds tensor
metadata only), derives a *layout* - every tensor's dtype, shape and the file offset of its first
element, the tied-tensor groups and the ``TensorInfo``s - and drops the mapping. The layout is
cached per process (``layout_cache``, keyed by real path, size and mtime), so later opens of the file cost a
``stat`` and slices are read with ``os.preadv`` straight into the float32 output, like the
safetensors reader: no mapping counted in the worker's RSS, no ``torch.load`` per task.

A storage's offset is not guessed: the data offset of each ``data/<key>`` entry comes from its
*local* zip header, and since every storage of a mapped load is a view into one mapping of the
whole file, the one address ``base`` with ``storage.data_ptr() - base`` equal to the offset of an
entry of the storage's size, for every storage of the file, is looked for. Files where that does
not hold (or with a compressed entry, or not stored little-endian), non-contiguous tensors and
dtypes numpy cannot read (float8, complex32...) are read through the mapping as before
(``method="mmap"`` forces that path for every tensor, ``method="pread"`` refuses it).

Legacy (non-zip) files cannot be mapped; they are loaded whole, once per process (a one-entry
cache), which is the best that format allows.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
from collections.abc import Mapping

import numpy as np

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import ReaderBase, TensorInfo
from sed_dask.readers.layout_cache import LayoutCache, approx_nbytes
from sed_dask.readers.rawio import RAW_DTYPES, open_if_unchanged, pread_full, read_float32, zip_data_start

#: keys under which training scripts nest the model state dict, in order of preference
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")

_LEGACY_LOCK = threading.Lock()
_LEGACY_CACHE: collections.OrderedDict = collections.OrderedDict()
_LEGACY_CACHE_SIZE = 1

#: layouts of this process (bounded by ``sed_dask.readers.layout-cache-bytes``)
_LAYOUTS = LayoutCache()


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def find_state_dict(obj, path: str) -> dict:
    """The ``{name: tensor}`` part of a loaded checkpoint (top level or under a known key)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict-like checkpoint, got {type(obj).__name__}")
    for key in STATE_DICT_KEYS:
        sub = obj.get(key)
        if isinstance(sub, Mapping) and any(_is_tensor(v) for v in sub.values()):
            return {str(k): v for k, v in sub.items() if _is_tensor(v)}
    top = {str(k): v for k, v in obj.items() if _is_tensor(v)}
    if not top:
        raise CheckpointError(
            f"{path}: no tensors found at the top level or under "
            f"{'/'.join(STATE_DICT_KEYS)} (top-level keys: {list(obj)[:10]})"
        )
    return top


def _torch_load(path: str, *, mmap: bool):
    import torch

    return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")


def _load_legacy(path: str):
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    with _LEGACY_LOCK:
        if key in _LEGACY_CACHE:
            _LEGACY_CACHE.move_to_end(key)
            return _LEGACY_CACHE[key]
        obj = _torch_load(path, mmap=False)
        _LEGACY_CACHE[key] = obj
        while len(_LEGACY_CACHE) > _LEGACY_CACHE_SIZE:
            _LEGACY_CACHE.popitem(last=False)
        return obj


#: how a ``torch.save`` file starts: a zip archive, or (legacy format) a pickle of torch's magic number
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _not_torch(path: str) -> str | None:
    """Why ``path`` cannot be a torch file at all (its first bytes), or None if it might be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError:
        return None
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC):
        return None
    if not head:
        return "it is empty"
    return f"it is neither a torch.save zip archive nor a legacy torch file (it starts with bytes {head[:8]!r})"


def _load_error(path: str, exc: Exception) -> CheckpointError:
    why = _not_torch(path)
    if why:
        return CheckpointError(f"{path} is not a PyTorch checkpoint (unreadable as one: {why})")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ""
    if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
        hint = (
            " (the file pickles objects that weights_only=True refuses; allow-list them with "
            "torch.serialization.add_safe_globals)"
        )
    return CheckpointError(
        f"cannot read checkpoint {path}: unreadable or truncated torch file: {type(exc).__name__}: {msg}{hint}"
    )


def _tensor_infos(sd: dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(int(s) for s in v.shape)) for k, v in sd.items()}


def _shared_groups(sd: dict) -> list[tuple[str, ...]]:
    by_view: dict[tuple, list[str]] = {}
    for k, v in sd.items():
        if v.numel() == 0:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        by_view.setdefault(key, []).append(k)
    return [tuple(names) for names in by_view.values() if len(names) > 1]


class Layout:
    """What a reader needs of one file, without the file mapped: ``infos``, ``groups`` (tied names),
    ``offsets`` (name -> file offset of the first element, for tensors served by positioned reads),
    ``legacy`` (non-zip file) and ``why`` (why some or all tensors are not served by positioned reads)."""

    __slots__ = ("key", "infos", "groups", "offsets", "legacy", "why", "step")

    def __init__(self, key, infos, groups, offsets, legacy, why, step=None):
        self.key, self.infos, self.groups, self.offsets, self.legacy, self.why = (
            key,
            infos,
            groups,
            offsets,
            legacy,
            why,
        )
        self.step = step  # the training step the file records about itself (None: none recorded)


#: top-level keys under which training scripts record the checkpoint's own step, in order of preference
STEP_KEYS = ("step", "global_step", "iteration", "iter")


def recorded_step(obj) -> int | None:
    """The integer step a loaded checkpoint records at its top level, or None."""
    if not isinstance(obj, Mapping):
        return None
    for k in STEP_KEYS:
        v = obj.get(k)
        if _is_tensor(v) and v.numel() == 1 and not v.is_floating_point():
            v = int(v.item())
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _iter_tensors(obj):
    """Every tensor reachable through the containers a ``weights_only`` load can produce."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if _is_tensor(x):
            yield x
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)


def _file_byteorder(names: set, zf, prefix: str) -> str:
    rec = prefix + "byteorder"
    if rec in names:
        return zf.read(rec).decode(errors="replace")
    from torch.serialization import LoadEndianness, get_default_load_endianness

    default = get_default_load_endianness()
    if default is None or default == LoadEndianness.LITTLE:
        return "little"
    return "big" if default == LoadEndianness.BIG else sys.byteorder


def _storage_offsets(path: str, obj) -> tuple[dict[int, int] | None, str]:
    """``{storage data_ptr: file offset of its first byte}`` for every non-empty storage of the
    mapped load ``obj``, or ``(None, why)`` when the storages cannot be located with certainty."""
    import zipfile

    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        names = {i.filename for i in infos}
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            return None, "no single <archive>/data.pkl entry"
        prefix = pkl[0][: -len("data.pkl")]
        if sys.byteorder != "little" or _file_byteorder(names, zf, prefix) != "little":
            return None, "not stored little-endian"
        pattern = re.compile(re.escape(prefix) + r"data/[^/]+\Z")
        entries: dict[int, list[int]] = {}  # nbytes -> data offsets of the non-empty data/<key> entries
        for i in infos:
            if not pattern.match(i.filename) or i.file_size == 0:
                continue
            if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
                return None, f"entry {i.filename} is compressed"
            try:
                start = zip_data_start(f, i.header_offset)
            except ValueError as exc:
                return None, f"{exc} of {i.filename}"
            if start + i.file_size > os.fstat(f.fileno()).st_size:
                return None, f"entry {i.filename} runs past the end of the file"
            entries.setdefault(i.file_size, []).append(start)
    storages: dict[int, int] = {}
    for t in _iter_tensors(obj):
        s = t.untyped_storage()
        if s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    if not storages:
        return {}, ""
    # every storage is overall_mapping[offset:offset + nbytes]: one base address fits them all
    ptr0, n0 = next(iter(storages.items()))
    fits = [ptr0 - off for off in entries.get(n0, [])]
    sets = {n: set(offs) for n, offs in entries.items()}
    fits = [b for b in fits if all(p - b in sets.get(n, ()) for p, n in storages.items())]
    if len(fits) != 1:
        return None, (
            "storages are not views of one mapping of the file" if not fits else "storage offsets are ambiguous"
        )
    base = fits[0]
    located = {p: p - base for p in storages}
    if len(set(located.values())) != len(located):
        return None, "two storages map to one entry"
    return located, ""


def _build_layout(path: str, key: tuple) -> Layout:
    try:
        obj = _torch_load(path, mmap=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise _load_error(path, exc) from exc
        try:
            obj = _load_legacy(path)
        except Exception as exc2:
            raise _load_error(path, exc2) from exc2
        sd = find_state_dict(obj, path)
        return Layout(key, _tensor_infos(sd), _shared_groups(sd), {}, True, "legacy (non-zip) file", recorded_step(obj))
    except Exception as exc:
        raise _load_error(path, exc) from exc
    sd = find_state_dict(obj, path)
    infos = _tensor_infos(sd)
    groups = _shared_groups(sd)
    try:
        located, why = _storage_offsets(path, obj)
    except Exception as exc:  # an unusual zip torch could still read: keep the mapped path
        located, why = None, f"{type(exc).__name__}: {exc}"
    offsets: dict[str, int] = {}
    skipped = []
    for k, v in sd.items():
        dtype = infos[k].dtype
        if located is None or dtype not in RAW_DTYPES:
            skipped.append(k)
        elif v.numel() == 0:
            offsets[k] = 0  # nothing to read
        elif not v.is_contiguous():
            skipped.append(k)
        else:
            offsets[k] = located[v.untyped_storage().data_ptr()] + v.storage_offset() * v.element_size()
    if located is not None and skipped:
        why = f"non-contiguous or non-numpy dtype: {', '.join(skipped[:5])}{'...' if len(skipped) > 5 else ''}"
    step = recorded_step(obj)
    del obj, sd  # drop the mapping
    return Layout(key, infos, groups, offsets, False, why, step)


def get_layout(path: str) -> Layout:
    """The cached layout of ``path`` (built with one mapped ``torch.load`` the first time)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return _LAYOUTS.for_file(path, lambda key: _build_layout(path, key), size=_layout_nbytes)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None


def _layout_nbytes(lay: Layout) -> int:
    return approx_nbytes((lay.infos, 300), (lay.offsets, 100))


def clear_layout_cache() -> None:
    _LAYOUTS.clear()


class TorchReader(ReaderBase):
    """A ``torch.save`` file; the state dict may sit at the top level or under a known key.

    ``method``: ``"auto"`` (positioned reads where the layout allows, the mapping otherwise),
    ``"mmap"`` (always ``torch.load(mmap=True)`` + copy) or ``"pread"`` (positioned reads only; a
    tensor they cannot serve raises ``CheckpointError``)."""

    format = "pt"

    def __init__(self, path, *, method: str = "auto"):
        if method not in ("auto", "mmap", "pread"):
            raise ValueError(f"method must be 'auto', 'mmap' or 'pread', got {method!r}")
        self.path = str(path)
        self.method = method
        self._layout: Layout | None = None
        self._sd: dict | None = None
        self._fd: int | None = None

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = get_layout(self.path)
        return self._layout

    @property
    def mmap(self) -> bool:
        """False for legacy (non-zip) files, which are loaded whole instead of mapped."""
        return not self.layout.legacy

    def recorded_step(self) -> int | None:
        return getattr(self.layout, "step", None)

    def _state_dict(self) -> dict:
        if self._sd is None:
            if not os.path.isfile(self.path):
                raise CheckpointError(f"checkpoint file {self.path} does not exist")
            try:
                obj = _load_legacy(self.path) if self.layout.legacy else _torch_load(self.path, mmap=True)
            except Exception as exc:
                raise _load_error(self.path, exc) from exc
            self._sd = find_state_dict(obj, self.path)
        return self._sd

    def tensors(self) -> dict[str, TensorInfo]:
        return self.layout.infos

    def shared_groups(self) -> list[tuple[str, ...]]:
        """Names whose tensors are the same view of the same storage (``torch.save`` keeps ties)."""
        return [tuple(g) for g in self.layout.groups]

    def _read_into(self, name, info, lo, hi, out):
        offset = None if self.method == "mmap" else self.layout.offsets.get(name)
        if offset is not None:
            self._pread_into(name, info, offset, lo, hi, out)
        elif self.method == "pread":
            raise CheckpointError(
                f"{self.path}: tensor {name!r} cannot be read with positioned reads "
                f"({self.layout.why or 'not located'})"
            )
        else:
            self._mmap_into(name, lo, hi, out)

    def _mmap_into(self, name, lo, hi, out):
        import torch

        t = self._state_dict()[name]
        piece = t.reshape(-1)[lo:hi]
        torch.from_numpy(out).copy_(piece)  # converts bf16/f16/int on the fly, no full-size temp

    def _open_fd(self) -> int:
        if self._fd is None:
            fd = open_if_unchanged(self.path, self.layout.key[1:])
            if fd is None:
                raise CheckpointError(
                    f"{self.path}: the file changed since it was opened (size/mtime differ); open it again"
                )
            self._fd = fd
        return self._fd

    def _pread(self, view: memoryview, offset: int, name: str, hi: int) -> None:
        if not pread_full(self._open_fd(), view, offset):
            raise CheckpointError(
                f"{self.path}: truncated: tensor {name!r} ends before element {hi} "
                f"(file shorter than its zip directory says)"
            )

    def _pread_into(self, name, info, offset, lo, hi, out):
        start = offset + lo * np.dtype(RAW_DTYPES[info.dtype]).itemsize
        read_float32(lambda view, at: self._pread(view, at, name, hi), info.dtype, start, out)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._sd = None  # drops the mapping once no tensor references it


#: ``torch.save`` suffixes opened by name (``.tar``: old ``torch.save`` archives, opened when named)
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
#: file suffixes a folder scan picks up (not ``.tar``: a folder's tar files are seldom checkpoints)
SCAN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: the folder layout of HF Trainer ``checkpoint-N/`` written with ``save_safetensors=False``
DIR_FILE = "pytorch_model.bin"


def can_open(path) -> bool:
    """By name alone (no bytes read): a file with a ``torch.save`` suffix, or a folder holding ``pytorch_model.bin``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, DIR_FILE))
    return path.endswith(SUFFIXES)


def open_path(path) -> TorchReader:
    """The reader of a path :func:`can_open` accepted (a folder: its ``pytorch_model.bin``)."""
    path = os.fspath(path)
    return TorchReader(os.path.join(path, DIR_FILE) if os.path.isdir(path) else path)
