"""Positioned reads of stored tensor bytes into float32, shared by the readers whose tensors are
plain byte ranges of a file (safetensors, zip ``.pt``, DCP chunks).

One implementation of the three details that must agree everywhere for the stores to be
bit-identical across formats: which stored dtypes are read raw, how each becomes float32 (bf16 by
shifting its bits, the rest by numpy's casts, which match torch's ``copy_``), and how a zip
entry's data offset is found (from its *local* header, whatever padding the writer used).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import numpy as np

#: torch dtype name -> little-endian numpy dtype of the stored bytes (bfloat16 as its bit pattern)
RAW_DTYPES = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "?",
}
#: elements converted per positioned read for dtypes other than float32 (bounds the temporary)
PIECE = 1 << 20
ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)


def pread_full(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``fd`` at ``offset``; False when the file ends first."""
    pos = 0
    while pos < view.nbytes:
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if n <= 0:
            return False
        pos += n
    return True


def open_if_unchanged(path: str, size_mtime: tuple[int, int]) -> int | None:
    """A read-only fd of ``path`` if it still has the (size, mtime_ns) its layout was parsed from,
    else None (closed again): offsets from an older version of the file must not be read."""
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns) != tuple(size_mtime):
        os.close(fd)
        return None
    return fd


def to_float32(dtype: str, src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` as float32, for raw stored values ``src`` of torch dtype ``dtype``."""
    if dtype == "bfloat16":  # bf16 is the top half of a float32: exact upcast by shifting
        bits = dst.view(np.uint32)
        bits[...] = src
        bits <<= 16
    else:
        with np.errstate(over="ignore"):  # float64 beyond float32 -> inf, silently as in torch
            dst[...] = src  # numpy casts f16/f64/int/bool to float32 as torch's copy_ does


def read_float32(
    pread: Callable[[memoryview, int], None],
    dtype: str,
    start: int,
    out: np.ndarray,
    *,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """``out`` (contiguous float32) <- ``out.size`` values of ``dtype`` stored from byte ``start``.

    ``pread(view, offset)`` fills a byte view or raises. float32 is read straight into ``out``;
    other dtypes through a temporary of at most ``PIECE`` elements. ``decode`` converts raw
    values of a dtype numpy lacks (e.g. float8, read as bytes) to float32."""
    flat = out.reshape(-1)
    if dtype == "float32":
        pread(memoryview(flat).cast("B"), start)
        return
    raw = np.dtype(RAW_DTYPES.get(dtype, "u1"))
    n = flat.size
    buf = np.empty(min(n, PIECE), dtype=raw)
    for a in range(0, n, PIECE):
        b = min(n, a + PIECE)
        src = buf[: b - a]
        pread(memoryview(src).cast("B"), start + a * raw.itemsize)
        if decode is not None:
            flat[a:b] = decode(src)
        else:
            to_float32(dtype, src, flat[a:b])


def zip_data_start(f, header_offset: int) -> int:
    """File offset of a zip entry's data, from its local header at ``header_offset`` in the
    seekable binary file ``f``; ``ValueError`` naming what is wrong with the header."""
    f.seek(header_offset)
    head = f.read(ZIP_LOCAL_HEADER.size)
    if len(head) != ZIP_LOCAL_HEADER.size:
        raise ValueError("truncated local header")
    fields = ZIP_LOCAL_HEADER.unpack(head)
    if fields[0] != b"PK\x03\x04" or fields[4] != 0:
        raise ValueError("bad local header")
    return header_offset + ZIP_LOCAL_HEADER.size + fields[10] + fields[11]
