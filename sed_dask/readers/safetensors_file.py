"""Single safetensors files.

The header (8-byte length + JSON) is parsed directly: listing tensors and checking that the file
is as long as the header promises costs two small reads, so every checkpoint of a run can be
validated on the client before any data task starts. Parsed headers are cached per process
(``layout_cache``), since a Gram task opens every checkpoint of its step block.

A flat slice of a C-order tensor is one contiguous byte range, so for every dtype numpy knows
(float32/16/64, bfloat16 by bit shift, ints, bool) the slice is read with ``os.preadv`` straight
into the float32 output (other dtypes through a bounded source-dtype buffer, then cast;
``rawio.read_float32``): one copy, no mapping counted in the worker's RSS, ~10x faster than
``get_slice`` here (benchmarks/README.md).
Other dtypes (float8, float4) go through ``safe_open(framework="pt")`` + ``get_slice``, which is
also available for every dtype with ``method="safe_open"``.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import ReaderBase, TensorInfo, flat_slices
from sed_dask.readers.layout_cache import LayoutCache, approx_nbytes
from sed_dask.readers.rawio import RAW_DTYPES, pread_full, read_float32

#: safetensors dtype code -> (torch dtype name, bytes per element or None when sub-byte)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "F4": ("float4_e2m1fn_x2", None),
}
MAX_HEADER = 100_000_000
_NUMPY_DTYPES = {
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "complex64",
}


def _read_header(path: str):
    """Header entries, metadata and each tensor's absolute byte offset in the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header length {n} for a {size}-byte file)"
                )
            raw = f.read(n)
        header = json.loads(raw)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    end = 0
    for name, d in header.items():
        try:
            dtype, item = DTYPES[d["dtype"]]
            shape = tuple(int(s) for s in d["shape"])
            b, e = (int(x) for x in d["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {d!r}") from exc
        if item is not None and e - b != math.prod(shape) * item:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {e - b} bytes, its shape {shape} "
                f"and dtype {d['dtype']} need {math.prod(shape) * item}"
            )
        infos[name] = TensorInfo(dtype, shape)
        offsets[name] = 8 + n + b
        end = max(end, e)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header promises {8 + n + end} bytes, the file holds {size}"
        )
    return infos, meta, offsets


#: parsed headers of this process (bounded by ``sed_dask.readers.layout-cache-bytes``): a Gram task
#: opens every checkpoint of its step block, and a header of a few hundred tensors costs ~0.6 ms
_HEADERS = LayoutCache()


def cached_header(path: str):
    """``_read_header(path)``, parsed once per process for a file of unchanged size and mtime."""
    try:
        return _HEADERS.for_file(path, lambda _key: _read_header(path), size=lambda h: approx_nbytes((h[0], 300)))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc


def clear_header_cache() -> None:
    _HEADERS.clear()


class SafetensorsReader(ReaderBase):
    """One ``.safetensors`` file. ``method``: ``"auto"`` (positioned reads where numpy has the dtype)
    or ``"safe_open"`` (always ``safe_open`` + ``get_slice``)."""

    format = "safetensors"

    def __init__(self, path, *, method: str = "auto"):
        if method not in ("auto", "safe_open"):
            raise ValueError(f"method must be 'auto' or 'safe_open', got {method!r}")
        self.path = str(path)
        self.method = method
        self._infos: dict[str, TensorInfo] | None = None
        self._offsets: dict[str, int] | None = None
        self._meta: dict | None = None
        self._handle = None
        self._f = None
        self._fd: int | None = None

    def tensors(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos, self._meta, self._offsets = cached_header(self.path)
        return self._infos

    @property
    def metadata(self) -> dict:
        self.tensors()
        return dict(self._meta or {})

    @property
    def framework(self) -> str:
        """Framework for ``safe_open``: ``"np"`` when numpy has every dtype of the file, else ``"pt"``
        (bfloat16, float8); numpy spares workers that read only safetensors a torch import."""
        return "np" if all(i.dtype in _NUMPY_DTYPES for i in self.tensors().values()) else "pt"

    def _file(self):
        if self._f is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(self.path, framework=self.framework, device="cpu")
                self._f = self._handle.__enter__()
            except Exception as exc:
                raise CheckpointError(f"{self.path}: cannot open safetensors file: {exc}") from exc
        return self._f

    def _read_into(self, name, info, lo, hi, out):
        raw = RAW_DTYPES.get(info.dtype)
        if raw is not None and self.method == "auto":
            self._pread_into(name, info, np.dtype(raw), lo, hi, out)
        else:
            self._slice_into(name, info, lo, hi, out)

    def _pread_into(self, name, info, raw: np.dtype, lo, hi, out):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)

        def pread(view, at):
            if not pread_full(self._fd, view, at):
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends before element {hi} "
                    f"(file shorter than its header says)"
                )

        read_float32(pread, info.dtype, self._offsets[name] + lo * raw.itemsize, out)

    def _slice_into(self, name, info, lo, hi, out):
        f = self._file()
        if self.framework == "pt":
            import torch

            dst = torch.from_numpy(out)

            def put(a, b, piece):
                dst[a:b].copy_(piece.reshape(-1))
        else:

            def put(a, b, piece):
                out[a:b] = piece.reshape(-1)  # numpy casts f16/f64/int/bool to float32 here

        if not info.shape:
            put(0, 1, f.get_tensor(name))
            return
        sl = f.get_slice(name)
        pos = 0
        for idx in flat_slices(info.shape, lo, hi):
            piece = sl[idx]
            n = int(np.prod(piece.shape))
            put(pos, pos + n, piece)
            pos += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._handle is not None:
            try:
                self._handle.__exit__(None, None, None)
            finally:
                self._handle = self._f = None


#: the folder layout of HF Trainer ``checkpoint-N/``: one safetensors file under this name
DIR_FILE = "model.safetensors"
#: file suffixes a folder scan picks up as safetensors checkpoints
SCAN_SUFFIXES = (".safetensors",)


def can_open(path) -> bool:
    """By name alone (no bytes read): a ``*.safetensors`` file, or a folder holding ``model.safetensors``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, DIR_FILE))
    return path.endswith(".safetensors")


def open_path(path) -> SafetensorsReader:
    """The reader of a path :func:`can_open` or :func:`is_safetensors` accepted (a folder: its model.safetensors)."""
    path = os.fspath(path)
    return SafetensorsReader(os.path.join(path, DIR_FILE) if os.path.isdir(path) else path)


def is_safetensors(path: str) -> bool:
    """Sniff the format: an 8-byte little-endian length followed by a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < MAX_HEADER
