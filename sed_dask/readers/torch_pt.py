"""``torch.save`` checkpoints (``.pt``/``.pth``/``.bin``).

Zip-format files are opened with ``torch.load(mmap=True, weights_only=True)``: unpickling only
builds tensor metadata and storages are paged in when a slice is copied, so listing tensors reads
no tensor data and reading a slice touches only its pages. Legacy (non-zip) files cannot be
mapped; they are loaded whole, once per process (a one-entry cache), which is the best that
format allows.
"""
from __future__ import annotations

import collections
import os
import threading
from collections.abc import Mapping

from ..errors import CheckpointError
from .base import ReaderBase, TensorInfo

#: keys under which training scripts nest the model state dict, in order of preference
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")

_LEGACY_LOCK = threading.Lock()
_LEGACY_CACHE: collections.OrderedDict = collections.OrderedDict()
_LEGACY_CACHE_SIZE = 1


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
        raise CheckpointError(f"{path}: no tensors found at the top level or under "
                              f"{'/'.join(STATE_DICT_KEYS)} (top-level keys: {list(obj)[:10]})")
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


class TorchReader(ReaderBase):
    """A ``torch.save`` file; the state dict may sit at the top level or under a known key."""

    format = "pt"

    def __init__(self, path):
        self.path = str(path)
        self._sd: dict | None = None
        self._infos: dict[str, TensorInfo] | None = None
        self.mmap = True

    def _state_dict(self) -> dict:
        if self._sd is None:
            if not os.path.isfile(self.path):
                raise CheckpointError(f"checkpoint file {self.path} does not exist")
            try:
                obj = _torch_load(self.path, mmap=True)
            except RuntimeError as exc:
                if "mmap can only be used" not in str(exc):
                    raise self._error(exc) from exc
                self.mmap = False
                try:
                    obj = _load_legacy(self.path)
                except Exception as exc2:
                    raise self._error(exc2) from exc2
            except Exception as exc:
                raise self._error(exc) from exc
            self._sd = find_state_dict(obj, self.path)
        return self._sd

    def _error(self, exc: Exception) -> CheckpointError:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            hint = (" (the file pickles objects that weights_only=True refuses; allow-list them with "
                    "torch.serialization.add_safe_globals)")
        return CheckpointError(f"cannot read checkpoint {self.path}: unreadable or truncated torch file: "
                               f"{type(exc).__name__}: {msg}{hint}")

    def tensors(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(int(s) for s in v.shape))
                           for k, v in self._state_dict().items()}
        return self._infos

    def shared_groups(self) -> list[tuple[str, ...]]:
        """Names whose tensors are the same view of the same storage (``torch.save`` keeps ties)."""
        by_view: dict[tuple, list[str]] = {}
        for k, v in self._state_dict().items():
            if v.numel() == 0:
                continue
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            by_view.setdefault(key, []).append(k)
        return [tuple(names) for names in by_view.values() if len(names) > 1]

    def _read_into(self, name, info, lo, hi, out):
        import torch

        t = self._state_dict()[name]
        piece = t.reshape(-1)[lo:hi]
        torch.from_numpy(out).copy_(piece)  # converts bf16/f16/int on the fly, no full-size temp

    def close(self) -> None:
        self._sd = None  # drops the mapping once no tensor references it


def is_zip_or_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"

