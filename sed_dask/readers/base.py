"""The reader protocol shared by every checkpoint format.

A reader lists tensors (name -> dtype, shape) from headers/metadata only and reads a flat
float32 slice ``[lo:hi]`` of one tensor (C order) without materialising the whole file, so an
ingestion task's memory is bounded by its P-range, not by the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import numpy as np

from sed_dask.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Header-level description of one stored tensor (``dtype`` uses torch names, e.g. ``bfloat16``)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))


@runtime_checkable
class CheckpointReader(Protocol):
    """What ingestion needs from a checkpoint format."""

    path: str
    format: str

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor in the checkpoint, from headers/metadata only (no tensor data read)."""

    def read(self, name: str, lo: int = 0, hi: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """float32 copy of the flat C-order slice ``[lo:hi]`` of tensor ``name`` (into ``out`` if given)."""

    def shared_groups(self) -> list[tuple[str, ...]]:
        """Groups of names that are the same stored tensor (tied weights); empty if the format cannot share."""

    def close(self) -> None:
        """Release file handles and mappings."""


class ReaderBase:
    """Argument checking, float32 output buffers and the context-manager protocol."""

    path: str
    format: str = "?"

    def tensors(self) -> dict[str, TensorInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_groups(self) -> list[tuple[str, ...]]:
        return []

    def recorded_step(self) -> int | None:
        """The training step the file records about itself (e.g. a top-level ``"step"``), or None."""
        return None

    def _read_into(self, name: str, info: TensorInfo, lo: int, hi: int, out: np.ndarray) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def read(self, name, lo=0, hi=None, *, out=None):
        info = self.tensors().get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        size = info.size
        hi = size if hi is None else hi
        if not 0 <= lo <= hi <= size:
            raise CheckpointError(f"{self.path}: slice [{lo}:{hi}] is outside tensor {name!r} of {size} elements")
        if out is None:
            out = np.empty(hi - lo, dtype=np.float32)
        elif out.dtype != np.float32 or out.shape != (hi - lo,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 array of {hi - lo} elements")
        if hi > lo:
            try:
                self._read_into(name, info, lo, hi, out)
            except CheckpointError:
                raise
            except Exception as exc:  # truncated / vanished / corrupted files surface here
                raise CheckpointError(
                    f"{self.path}: cannot read tensor {name!r} [{lo}:{hi}]: {type(exc).__name__}: {exc}"
                ) from exc
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def flat_slices(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[slice, ...]]:
    """Index tuples whose C-order concatenation is exactly the flat range ``[lo, hi)`` of ``shape``.

    Lets formats that slice by dimension (safetensors ``get_slice``) read a flat range with at most
    ``2·ndim`` rectangular reads instead of loading whole rows or the whole tensor.
    """
    if lo >= hi:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    r0, c0 = divmod(lo, inner)
    r1, c1 = divmod(hi, inner)
    if c0 and r0 == r1:
        return [(slice(r0, r0 + 1),) + s for s in flat_slices(shape[1:], c0, c1)]
    out: list[tuple[slice, ...]] = []
    if c0:
        out += [(slice(r0, r0 + 1),) + s for s in flat_slices(shape[1:], c0, inner)]
        r0 += 1
    if r1 > r0:
        out.append((slice(r0, r1),))
    if c1:
        out += [(slice(r1, r1 + 1),) + s for s in flat_slices(shape[1:], 0, c1)]
    return out
