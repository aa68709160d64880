"""The flat parameter vector's layout: which tensors, in which order, at which offsets, and its hash.

Every source (checkpoint files, a store run, a recorder) and every pass agrees on a run's meaning through
this index; the store persists it (``param_index`` attrs) but does not define it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np

from sed_dask import config
from sed_dask.errors import StoreError


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One selected tensor's place in the flat parameter vector."""

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]
    source_dtype: str
    group: str

    def to_record(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


class ParamIndex:
    """Ordered tensors of the flat parameter vector, with a content hash.

    The hash covers names, offsets, sizes, shapes and source dtypes (not groups, which are an
    analysis choice), so two stores agree on it exactly when their flat vectors mean the same thing.
    """

    def __init__(self, entries: Sequence[TensorEntry]):
        self.entries = tuple(entries)
        off = 0
        for e in self.entries:
            if e.offset != off:
                raise StoreError(
                    f"parameter index is not contiguous at tensor {e.name!r} (offset {e.offset}, expected {off})"
                )
            off += e.size
        self.n_params = off

    @classmethod
    def from_tensors(cls, tensors: Iterable[tuple[str, tuple[int, ...], str]], *, group_of=None):
        """Build from ``(name, shape, source_dtype)`` in the order given."""
        from sed_dask.sources.layers import default_group

        group_of = group_of or default_group
        entries, off = [], 0
        for name, shape, dtype in tensors:
            size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
            entries.append(TensorEntry(name, off, size, tuple(int(s) for s in shape), str(dtype), group_of(name)))
            off += size
        return cls(entries)

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "ParamIndex":
        return cls(
            [
                TensorEntry(
                    r["name"], int(r["offset"]), int(r["size"]), tuple(r["shape"]), r["source_dtype"], r["group"]
                )
                for r in records
            ]
        )

    def to_records(self) -> list[dict]:
        return [e.to_record() for e in self.entries]

    @property
    def hash(self) -> str:
        key = [[e.name, e.offset, e.size, list(e.shape), e.source_dtype] for e in self.entries]
        return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def regroup(self, group_of) -> "ParamIndex":
        """The same index with groups from ``group_of(name)`` (a callable or a name->group dict)."""
        f = group_of.__getitem__ if isinstance(group_of, dict) else group_of
        return ParamIndex([dataclasses.replace(e, group=f(e.name)) for e in self.entries])

    def group_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Group -> sorted, merged ``[start, stop)`` ranges of the flat vector."""
        out: dict[str, list[tuple[int, int]]] = {}
        for e in self.entries:
            rs = out.setdefault(e.group, [])
            if rs and rs[-1][1] == e.offset:
                rs[-1] = (rs[-1][0], e.offset + e.size)
            else:
                rs.append((e.offset, e.offset + e.size))
        return out

    def segments(self, start: int, stop: int) -> list[tuple[TensorEntry, int, int]]:
        """Tensors overlapping flat ``[start, stop)`` as ``(entry, lo, hi)`` flat offsets *within the tensor*."""
        out = []
        for e in self.entries:
            if e.offset >= stop:
                break
            if e.offset + e.size <= start:
                continue
            lo, hi = max(start, e.offset) - e.offset, min(stop, e.offset + e.size) - e.offset
            out.append((e, lo, hi))
        return out


def read_chunk_elems(n_params: int, chunk_bytes=None) -> int:
    """float32 elements of a run's read chunk along P (``store.chunk-bytes`` unless given).

    Also the column unit of a direct checkpoint source (:mod:`sed_dask.sources.checkpoint_run`), so that its
    Gram tiles, and hence its sums, are those of the store an ingestion would write.
    """
    return max(1, min(int(n_params), config.get_bytes("store.chunk-bytes", chunk_bytes) // 4))
