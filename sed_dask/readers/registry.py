"""Which reader opens a path: the one place that sniffs checkpoint formats.

Each reader module declares ``can_open(path)``: a cheap test by name or marker file that reads no
bytes. :data:`FORMATS` asks them in one explicit order, which matters for folders only (an HF
``checkpoint-N/`` may hold an index *and* a ``model.safetensors``; the index wins). A file no name
claims is then sniffed by content (:data:`SNIFFED`), and an existing file nothing recognises is
handed to the ``torch.save`` reader, which names the file when it is not a checkpoint either
(``torch.save`` has two layouts, zip and legacy pickle, and no magic that covers both).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from sed_dask.errors import CheckpointError
from sed_dask.readers import dcp, hf_sharded, safetensors_file, torch_pt
from sed_dask.readers.base import ReaderBase


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format: how it is recognised and opened."""

    name: str  # the reader's ``format``
    can_open: Callable[[str], bool]  # by name or marker file, no bytes read
    open: Callable[[str], ReaderBase]
    marker: str  # what marks a folder of this format (for "holds no checkpoint" errors)
    sniff: Callable[[str], bool] | None = None  # by content, for a file no name claims
    refusal: Callable[[str], str | None] | None = None  # why a path of this format cannot be opened
    scan_suffixes: tuple[str, ...] = ()  # file suffixes a folder scan picks up


#: the formats in the order they are asked (first claim wins)
FORMATS: tuple[Format, ...] = (
    Format("hf_sharded", hf_sharded.can_open, hf_sharded.ShardedReader, "*.index.json"),
    Format(
        "safetensors",
        safetensors_file.can_open,
        safetensors_file.open_path,
        safetensors_file.DIR_FILE,
        sniff=safetensors_file.is_safetensors,
        scan_suffixes=safetensors_file.SCAN_SUFFIXES,
    ),
    Format("pt", torch_pt.can_open, torch_pt.open_path, torch_pt.DIR_FILE, scan_suffixes=torch_pt.SCAN_SUFFIXES),
    Format("dcp", dcp.can_open, dcp.DCPReader, "DCP .metadata/*.distcp", refusal=dcp.refusal),
)
#: formats recognised by content, in order, for a file whose name none of :data:`FORMATS` claims
SNIFFED: tuple[Format, ...] = tuple(f for f in FORMATS if f.sniff is not None)
#: an existing file nothing else recognises
FALLBACK: Format = next(f for f in FORMATS if f.name == "pt")


def known_formats() -> str:
    """The format names, for error messages."""
    return ", ".join(f.name for f in FORMATS)


def scan_suffixes() -> tuple[str, ...]:
    """The file suffixes a folder scan treats as checkpoints, in registry order."""
    return tuple(s for f in FORMATS for s in f.scan_suffixes)


def claims_dir(path) -> bool:
    """Whether ``path`` is a folder that one format opens as a whole checkpoint."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(f.can_open(path) for f in FORMATS)


def format_for(path) -> Format:
    """The format that opens ``path`` (a file or folder); nothing is read beyond a sniff of a file's head."""
    path = os.fspath(path)
    for f in FORMATS:
        why = f.refusal(path) if f.refusal is not None else None
        if why:
            raise CheckpointError(why)
        if f.can_open(path):
            return f
    if os.path.isdir(path):
        raise CheckpointError(
            f"{path}: directory holds no checkpoint (looked for {', '.join(f.marker for f in FORMATS)}; "
            f"known formats: {known_formats()})"
        )
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    for f in SNIFFED:
        if f.sniff(path):
            return f
    return FALLBACK
