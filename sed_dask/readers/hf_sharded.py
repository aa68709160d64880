"""Hugging Face sharded checkpoints: a directory with ``*.index.json`` mapping tensors to shard files.

Both ``model.safetensors.index.json`` (safetensors shards) and ``pytorch_model.bin.index.json``
(``torch.save`` shards) are read; each shard is opened lazily by the reader for its format, so a
task touching two tensors opens at most the shards that hold them.
"""

from __future__ import annotations

import json
import os

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import ReaderBase, TensorInfo
from sed_dask.readers.layout_cache import LayoutCache, approx_nbytes

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_index(directory: str) -> str | None:
    """The index file of a sharded checkpoint directory, or None."""
    for name in INDEX_NAMES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    try:
        others = sorted(n for n in os.listdir(directory) if n.endswith(".index.json"))
    except OSError:
        return None
    return os.path.join(directory, others[0]) if others else None


def can_open(path) -> bool:
    """By name alone: an ``*.index.json`` file, or a folder holding one (no index is parsed)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return find_index(path) is not None
    return path.endswith(".index.json")


#: parsed indexes of this process: a Gram task opens every checkpoint of its step block
_INDEXES = LayoutCache()


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError("weight_map is not an object")
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint index {index} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable sharded-checkpoint index: {exc}") from exc
    return {str(k): str(v) for k, v in wm.items()}


def weight_map(index: str) -> dict[str, str]:
    """``{tensor: shard file}`` of an index, parsed once per process for unchanged size and mtime."""
    try:
        return _INDEXES.for_file(index, lambda _key: _read_weight_map(index), size=lambda wm: approx_nbytes((wm, 200)))
    except FileNotFoundError:
        raise CheckpointError(f"sharded checkpoint index {index} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{index}: unreadable sharded-checkpoint index: {exc}") from exc


class ShardedReader(ReaderBase):
    """A directory (or its index file) of HF shards."""

    format = "hf_sharded"

    def __init__(self, path):
        path = str(path)
        if os.path.isdir(path):
            index = find_index(path)
            if index is None:
                raise CheckpointError(f"{path}: no *.index.json in this directory")
        else:
            index = path
        self.path = path
        self.index_file = index
        self.root = os.path.dirname(index)
        self.weight_map: dict[str, str] = weight_map(index)
        self._subs: dict[str, ReaderBase] = {}
        self._infos: dict[str, TensorInfo] | None = None

    def _sub(self, shard: str) -> ReaderBase:
        r = self._subs.get(shard)
        if r is None:
            from sed_dask.readers import open_file

            p = os.path.join(self.root, shard)
            if not os.path.isfile(p):
                raise CheckpointError(f"{self.index_file}: shard file {p} does not exist")
            r = self._subs[shard] = open_file(p)
        return r

    def tensors(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            infos = {}
            shards = list(dict.fromkeys(self.weight_map.values()))
            for shard in shards:
                have = self._sub(shard).tensors()
                for name in (n for n, s in self.weight_map.items() if s == shard):
                    if name not in have:
                        raise CheckpointError(
                            f"{self.index_file}: tensor {name!r} is mapped to shard {shard}, which does not contain it"
                        )
                    infos[name] = have[name]
            self._infos = infos
        return self._infos

    def shared_groups(self) -> list[tuple[str, ...]]:
        out = []
        for shard in dict.fromkeys(self.weight_map.values()):
            out += [g for g in self._sub(shard).shared_groups() if all(self.weight_map.get(n) == shard for n in g)]
        return out

    def read(self, name, lo=0, hi=None, *, out=None):
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._sub(shard).read(name, lo, hi, out=out)

    def close(self) -> None:
        for r in self._subs.values():
            r.close()
        self._subs.clear()
