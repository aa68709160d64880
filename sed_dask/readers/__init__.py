"""Checkpoint readers behind one small protocol (:class:`CheckpointReader`).

``open_checkpoint(path)`` picks the reader: a ``.safetensors`` file, a ``torch.save`` file
(``.pt``/``.pth``/``.bin``/``.ckpt``; zip or legacy), or a directory holding a Hugging Face
sharded checkpoint (``*.index.json``), a single ``model.safetensors`` or a ``pytorch_model.bin``
(the layout of HF Trainer ``checkpoint-N/`` folders), or a PyTorch Distributed Checkpoint
(``.metadata`` + ``__{rank}_{i}.distcp``).
"""

from __future__ import annotations

import os

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import CheckpointReader, ReaderBase, TensorInfo, flat_slices
from sed_dask.readers.dcp import DCPReader, is_dcp_dir
from sed_dask.readers.hf_sharded import ShardedReader, find_index
from sed_dask.readers.safetensors_file import SafetensorsReader, is_safetensors
from sed_dask.readers.torch_pt import TorchReader, find_state_dict

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
SINGLE_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin")

__all__ = [
    "CheckpointReader",
    "TensorInfo",
    "ReaderBase",
    "TorchReader",
    "SafetensorsReader",
    "ShardedReader",
    "DCPReader",
    "is_dcp_dir",
    "open_checkpoint",
    "open_file",
    "checkpoint_format",
    "flat_slices",
    "find_state_dict",
]


def open_file(path: str) -> ReaderBase:
    """A reader for one checkpoint file, chosen by suffix, else by sniffing its first bytes."""
    path = str(path)
    if path.endswith(".safetensors"):
        return SafetensorsReader(path)
    if path.endswith(".index.json"):
        return ShardedReader(path)
    if os.path.basename(path) == ".metadata":
        return DCPReader(path)
    if path.endswith(".distcp"):
        raise CheckpointError(f"{path} is one data file of a DCP checkpoint; pass its directory")
    if path.endswith(TORCH_SUFFIXES):
        return TorchReader(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if is_safetensors(path):
        return SafetensorsReader(path)
    return TorchReader(path)


def checkpoint_format(path) -> str:
    """``"safetensors"``, ``"pt"``, ``"hf_sharded"`` or ``"dcp"`` (no data read)."""
    return _reader_class(str(path)).format


def _reader_class(path: str):
    if os.path.isdir(path):
        if find_index(path):
            return ShardedReader
        for name in SINGLE_FILES_IN_DIR:
            if os.path.isfile(os.path.join(path, name)):
                return SafetensorsReader if name.endswith(".safetensors") else TorchReader
        if is_dcp_dir(path):
            return DCPReader
        raise CheckpointError(
            f"{path}: directory holds no checkpoint (looked for *.index.json, "
            f"{', '.join(SINGLE_FILES_IN_DIR)}, DCP .metadata/*.distcp)"
        )
    return type(open_file(path))


def open_checkpoint(path) -> ReaderBase:
    """Open a checkpoint file or directory with the right reader. Nothing is read until asked."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cls = _reader_class(path)
        if cls is ShardedReader:
            return ShardedReader(path)
        if cls is DCPReader:
            return DCPReader(path)
        for name in SINGLE_FILES_IN_DIR:
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return open_file(p)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return open_file(path)
