"""Checkpoint readers behind one small protocol (:class:`CheckpointReader`).

``open_checkpoint(path)`` picks the reader: a ``.safetensors`` file, a ``torch.save`` file
(``.pt``/``.pth``/``.bin``/``.ckpt``; zip or legacy), or a directory holding a Hugging Face
sharded checkpoint (``*.index.json``), a single ``model.safetensors`` or a ``pytorch_model.bin``
(the layout of HF Trainer ``checkpoint-N/`` folders), or a PyTorch Distributed Checkpoint
(``.metadata`` + ``__{rank}_{i}.distcp``). The choice is made in one place,
:mod:`sed_dask.readers.registry`.
"""

from __future__ import annotations

import os

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import CheckpointReader, ReaderBase, TensorInfo, flat_slices
from sed_dask.readers.dcp import DCPReader, is_dcp_dir
from sed_dask.readers.hf_sharded import ShardedReader, find_index
from sed_dask.readers.registry import FORMATS, claims_dir, format_for, known_formats, scan_suffixes
from sed_dask.readers.safetensors_file import SafetensorsReader, is_safetensors
from sed_dask.readers.torch_pt import TorchReader, find_state_dict

__all__ = [
    "CheckpointReader",
    "TensorInfo",
    "ReaderBase",
    "TorchReader",
    "SafetensorsReader",
    "ShardedReader",
    "DCPReader",
    "FORMATS",
    "is_dcp_dir",
    "is_safetensors",
    "find_index",
    "open_checkpoint",
    "open_file",
    "checkpoint_format",
    "claims_dir",
    "known_formats",
    "scan_suffixes",
    "flat_slices",
    "find_state_dict",
]


def open_file(path) -> ReaderBase:
    """A reader for one checkpoint file, chosen by suffix, else by sniffing its first bytes."""
    path = os.fspath(path)
    return format_for(path).open(path)


def checkpoint_format(path) -> str:
    """``"safetensors"``, ``"pt"``, ``"hf_sharded"`` or ``"dcp"`` (no data read)."""
    return format_for(os.fspath(path)).name


def open_checkpoint(path) -> ReaderBase:
    """Open a checkpoint file or directory with the right reader. Nothing is read until asked."""
    path = os.fspath(path)
    if not os.path.isdir(path) and not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return format_for(path).open(path)
