"""PyTorch Distributed Checkpoint (DCP) directories: ``.metadata`` plus ``__{rank}_{i}.distcp`` files.

What the files hold (``torch/distributed/checkpoint/filesystem.py`` and ``metadata.py``):
``.metadata`` is a pickled ``Metadata``. Its ``state_dict_metadata`` gives every FQN of the
flattened state dict either a ``TensorStorageMetadata`` (dtype, global size and ``chunks``: one
``offsets``/``sizes`` box per saved shard, e.g. one per rank of a ``Shard(0)`` DTensor) or a
``BytesStorageMetadata`` (a pickled python object: step counters, param groups; not a tensor, so
not listed here). Its ``storage_data`` maps ``MetadataIndex(fqn, chunk offsets)`` to
``_StorageInfo(relative_path, offset, length, transform_descriptors)``: where each chunk lies.
``FileSystemWriter`` writes every chunk as a complete ``torch.save`` archive of the chunk tensor
alone (a zip whose one storage is stored uncompressed). With its experimental stream
``_extensions`` (e.g. zstd) the byte range holds that archive *transformed* instead, and
``transform_descriptors`` names the transforms.

So listing tensors costs the metadata plus one ``stat`` per ``.distcp`` file (to check that every
chunk lies inside its file), and a flat slice touches only the chunks it overlaps. The first
read of a chunk parses its archive's zip directory and ``data.pkl`` (a few hundred bytes) to
locate its storage (file offset, storage offset, strides, dtype); each box of the slice inside a
chunk is then one positioned read of exactly its bytes (a flat C-order range split by
``flat_slices`` meets a C-contiguous chunk in one contiguous run, also for ``Shard(1)``). Chunks
stored with transforms cannot be read by range: each one overlapping the slice is decoded whole
(torch's ``ExtensionRegistry``) and loaded with ``weights_only``.

Pickle safety: every pickle goes through torch's ``weights_only`` unpickler, never
``pickle.load`` (``FileSystemReader.read_metadata`` uses plain pickle, so it is not called). That
unpickler speaks protocol 2 while ``.metadata`` is written with Python's default protocol (4),
so the opcode stream is first rewritten to protocol 2 (frames dropped, ``STACK_GLOBAL`` ->
``GLOBAL``, ``MEMOIZE`` -> ``LONG_BINPUT``; a rewrite of the encoding, nothing is built), then
unpickled with exactly the DCP metadata classes allow-listed: any other global is refused.

Names: DCP flattens nested dicts (``{"model": {...}, "optim": {...}}`` -> ``model.w``,
``optim.state.w.exp_avg``) and keeps each FQN's key path in ``Metadata.planner_data``, so the
rule ``find_state_dict`` applies to ``.pt`` files is applied to the un-flattened dict: the
tensors directly under ``model_state_dict`` / ``state_dict`` / ``model`` are served under their
bare names, else the top-level tensors. The key path, not the dotted name, decides: an HF model
saved flat has FQNs ``model.layers.0...`` *and* ``lm_head.weight`` at the top level.

Parsed metadata is cached per process (LRU keyed by the ``.metadata`` file's real path, size and
mtime, like the ``.pt`` layouts), so the many tasks that open one checkpoint unpickle it once.

By default (``sed_dask.readers.dcp-metadata: fast``) the metadata is not unpickled into torch's
classes at all: :mod:`sed_dask.readers.dcp_metadata` parses it with a restricted unpickler that
builds inert stand-ins only, and a file that differs from one parsed before only in its
``storage_meta`` strings (every later checkpoint of a run) is matched byte for byte against it. The
layout is then compact tables (numpy arrays per tensor), shared by every checkpoint of that shape;
``Chunk`` records are made only for the tensors a reader touches. ``torch`` selects the
weights_only path above (slow: seconds per FSDP-sized file).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
import os
import threading
import zipfile
from collections.abc import Mapping

import numpy as np

from sed_dask.errors import CheckpointError
from sed_dask.readers._pickle2 import as_protocol2
from sed_dask.readers.base import ReaderBase, TensorInfo, flat_slices
from sed_dask.readers.dcp_metadata import TemplateStore, tiles_exactly
from sed_dask.readers.layout_cache import LayoutCache, approx_nbytes
from sed_dask.readers.rawio import RAW_DTYPES, open_if_unchanged, pread_full, read_float32, to_float32, zip_data_start
from sed_dask.readers.torch_pt import STATE_DICT_KEYS

METADATA_NAME = ".metadata"
SUFFIX = ".distcp"

#: parsed checkpoints of this process (bounded by ``sed_dask.readers.layout-cache-bytes``)
_LAYOUTS = LayoutCache()
#: recently parsed metadata of this process, matched byte for byte by later files of the same length
_TEMPLATES = TemplateStore()
#: ``safe_globals`` edits torch's process-wide allow-list: one metadata unpickling at a time
_UNPICKLE_LOCK = threading.Lock()
#: a chunk archive's data.pkl describes one tensor; anything larger is not a DCP chunk
_MAX_PKL = 1 << 20
#: dtypes numpy lacks but torch converts to float32 exactly (decoded with torch)
_TORCH_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")


def is_dcp_dir(path) -> bool:
    """Whether ``path`` looks like a DCP checkpoint: a ``.metadata`` file or ``*.distcp`` files.

    Either alone counts, so that a checkpoint that lost its metadata or its data files is opened
    (and refused, naming what is missing) rather than silently skipped by discovery.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, METADATA_NAME)):
        return True
    try:
        with os.scandir(path) as it:
            return any(e.name.endswith(SUFFIX) for e in it)
    except OSError:
        return False


def can_open(path) -> bool:
    """By markers alone: a DCP folder (:func:`is_dcp_dir`) or its ``.metadata`` file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return is_dcp_dir(path)
    return os.path.basename(path) == METADATA_NAME


def refusal(path) -> str | None:
    """Why ``path`` cannot be opened although it is DCP: one ``.distcp`` file is a fragment of a checkpoint."""
    path = os.fspath(path)
    if path.endswith(SUFFIX) and not os.path.isdir(path):
        return f"{path} is one data file of a DCP checkpoint; pass its directory"
    return None


# ----------------------------------------------------------------------------- safe metadata
def _allowed_globals() -> list:
    """The classes a DCP ``.metadata`` pickle may name (nothing else is unpickled)."""
    import pathlib

    try:
        from torch.distributed.checkpoint import metadata as m
        from torch.distributed.checkpoint.filesystem import _StorageInfo
    except Exception as exc:  # a torch build without torch.distributed
        raise CheckpointError(
            f"reading DCP checkpoints needs torch.distributed.checkpoint, which this torch "
            f"cannot import: {type(exc).__name__}: {exc}"
        ) from exc
    # StorageMeta.checkpoint_id may be a path object: rebuilt as a pure path (no filesystem access,
    # and a WindowsPath written on Windows still loads on Linux)
    paths = [
        (pathlib.PurePosixPath, f"{mod}.{cls}")
        for mod in ("pathlib", "pathlib._local")
        for cls in ("PosixPath", "PurePosixPath")
    ]
    paths += [
        (pathlib.PureWindowsPath, f"{mod}.{cls}")
        for mod in ("pathlib", "pathlib._local")
        for cls in ("WindowsPath", "PureWindowsPath")
    ]
    return [
        m.Metadata,
        m.TensorStorageMetadata,
        m.BytesStorageMetadata,
        m.ChunkStorageMetadata,
        m.TensorProperties,
        m._MEM_FORMAT_ENCODING,
        m.StorageMeta,
        m.MetadataIndex,
        _StorageInfo,
    ] + paths


def load_metadata(path: str):
    """The ``Metadata`` of a DCP ``.metadata`` file, unpickled with torch's weights_only unpickler
    allowing only the DCP metadata classes; anything else in the pickle is a ``CheckpointError``."""
    import torch
    from torch._weights_only_unpickler import Unpickler

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(
            f"{os.path.dirname(path)}: no {METADATA_NAME} file, so not a complete DCP "
            f"checkpoint (is dcp.save still running, or did it fail?)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read DCP metadata: {exc}") from exc
    try:
        data = as_protocol2(raw)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a DCP metadata pickle (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    allowed = _allowed_globals()
    from torch.distributed.checkpoint.metadata import Metadata

    with _UNPICKLE_LOCK:
        # only what is not allow-listed already: leaving the context removes exactly those again
        have = set(torch.serialization.get_safe_globals())
        missing = [g for g in allowed if g not in have]
        with torch.serialization.safe_globals(missing):
            try:
                md = Unpickler(io.BytesIO(data), encoding="utf-8").load()
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                hint = ""
                if "global" in msg.lower() or "reduce" in msg.lower() or "allowlisted" in msg:
                    hint = (
                        " (a DCP .metadata may hold only torch.distributed.checkpoint's metadata classes; this "
                        "one pickles something else, refused for safety)"
                    )
                raise CheckpointError(
                    f"{path}: refused or unreadable DCP metadata: {type(exc).__name__}: {msg}{hint}"
                ) from exc
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    return md


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Chunk:
    """One saved box of a tensor and where its bytes lie (``start``/``length`` within ``file``)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stored:
    """A chunk's storage inside its file: absolute offset of its first byte, the element offset
    of the chunk's ``[0, ..., 0]`` in it, and the chunk tensor's strides (elements)."""

    start: int
    offset: int
    strides: tuple[int, ...]


class Layout:
    """What a reader needs of one checkpoint: ``infos`` (served name -> TensorInfo), ``fqns``
    (served name -> FQN), ``chunks`` (FQN -> chunks), ``files`` (relative path -> (size, mtime))
    and ``stored`` (lazily located chunk storages, shared by the readers of this process)."""

    __slots__ = ("key", "infos", "fqns", "chunks", "files", "stored", "nbytes")

    def __init__(self, key, infos, fqns, chunks, files):
        self.key, self.infos, self.fqns, self.chunks, self.files = key, infos, fqns, chunks, files
        self.stored: dict[tuple, Stored] = {}
        self.nbytes: int | None = None  # set when the layout shares tables: what it adds to memory


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cover_problem(size: tuple, boxes: list[tuple[tuple, tuple]]) -> str | None:
    """Why the chunk boxes do not tile the tensor exactly, or None when they do."""
    nd = len(size)
    for o, z in boxes:
        if len(o) != nd or len(z) != nd or any(a < 0 or b < 0 or a + b > s for a, b, s in zip(o, z, size)):
            return f"chunk at offsets {list(o)} sizes {list(z)} lies outside the tensor of size {list(size)}"
    nz = [(o, z) for o, z in boxes if math.prod(z) > 0]
    total, held = math.prod(size), sum(math.prod(z) for _, z in nz)
    if held != total:
        return f"its chunks hold {held} elements, the tensor has {total} (chunks missing or overlapping)"
    if len(nz) <= 1:
        return None
    # chunks on a grid (every DTensor/ShardedTensor placement): each must be one distinct cell
    bounds = [sorted({o[d] for o, _ in nz} | {o[d] + z[d] for o, z in nz}) for d in range(nd)]
    if math.prod(len(b) - 1 for b in bounds) == len(nz):
        cells = set()
        for o, z in nz:
            cell = tuple(bisect.bisect_left(bounds[d], o[d]) for d in range(nd))
            if any(bounds[d][c + 1] != o[d] + z[d] for d, c in enumerate(cell)):
                break
            cells.add(cell)
        else:
            if len(cells) == len(nz):
                return None
    lo = np.array([o for o, _ in nz], dtype=np.int64)
    hi = lo + np.array([z for _, z in nz], dtype=np.int64)
    for i in range(0, len(nz), 256):
        over = np.all(np.maximum(lo[i : i + 256, None], lo[None]) < np.minimum(hi[i : i + 256, None], hi[None]), axis=2)
        over[np.arange(over.shape[0]), np.arange(i, i + over.shape[0])] = False
        if over.any():
            a, b = np.argwhere(over)[0]
            return f"chunks at offsets {list(nz[i + a][0])} and {list(nz[b][0])} overlap (and others leave a gap)"
    return None


def _served_names(fqns, planner_data, where: str) -> dict[str, str]:
    """``{served name: FQN}``: ``find_state_dict``'s rule applied to the un-flattened state dict."""
    paths = planner_data if isinstance(planner_data, Mapping) else {}

    def path_of(fqn):
        p = paths.get(fqn)
        if isinstance(p, (tuple, list)) and p and ".".join(map(str, p)) == fqn:
            return tuple(p)
        return (fqn,)  # no key path recorded (flatten_state_dict=False): a top-level key

    by_path = {fqn: path_of(fqn) for fqn in fqns}
    for key in STATE_DICT_KEYS:
        direct = {p[1]: fqn for fqn, p in by_path.items() if len(p) == 2 and p[0] == key and isinstance(p[1], str)}
        if direct:
            return direct
    top = {fqn: fqn for fqn, p in by_path.items() if len(p) == 1}
    if not top:
        keys = list(dict.fromkeys(str(p[0]) for p in by_path.values()))
        raise CheckpointError(
            f"{where}: no tensors found at the top level or under {'/'.join(STATE_DICT_KEYS)} "
            f"(top-level keys: {keys[:10]})"
        )
    return top


def _build_layout(directory: str, meta_path: str, key: tuple) -> Layout:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    if _parser() == "fast":
        return _build_fast(directory, meta_path, key)
    md = load_metadata(meta_path)
    sdm, storage = md.state_dict_metadata, md.storage_data
    if not isinstance(sdm, Mapping) or not isinstance(storage, Mapping):
        raise CheckpointError(
            f"{meta_path}: DCP metadata without state_dict_metadata/storage_data mappings "
            f"(written by a custom storage writer?)"
        )
    where: dict[tuple, object] = {}
    for idx, info in storage.items():
        off = getattr(idx, "offset", None)
        if off is not None:
            where[(idx.fqn, tuple(int(x) for x in off))] = info
    tensors = {}
    for fqn, m in sdm.items():
        if isinstance(m, TensorStorageMetadata):
            tensors[fqn] = m
        elif not isinstance(m, BytesStorageMetadata):
            raise CheckpointError(f"{meta_path}: entry {fqn!r} has unknown storage metadata {type(m).__name__}")
    names = _served_names(tensors, md.planner_data, directory)
    infos: dict[str, TensorInfo] = {}
    chunks: dict[str, list[Chunk]] = {}
    files: dict[str, tuple[int, int]] = {}
    for name, fqn in names.items():
        m = tensors[fqn]
        dtype = _dtype_name(m.properties.dtype)
        size = tuple(int(s) for s in m.size)
        boxes = [(tuple(int(x) for x in c.offsets), tuple(int(x) for x in c.sizes)) for c in m.chunks]
        why = _cover_problem(size, boxes)
        if why:
            raise CheckpointError(
                f"{meta_path}: tensor {fqn!r} of size {list(size)} is not covered by its chunks: {why}"
            )
        found = []
        for o, z in boxes:
            if math.prod(z) == 0:
                continue
            info = where.get((fqn, o))
            if info is None:
                raise CheckpointError(
                    f"{meta_path}: tensor {fqn!r}: no storage entry for its chunk at offsets {list(o)}"
                )
            rel = str(getattr(info, "relative_path", ""))
            if not rel or os.path.isabs(rel) or os.path.normpath(rel).startswith(os.pardir):
                raise CheckpointError(
                    f"{meta_path}: tensor {fqn!r}: chunk file {rel!r} is not inside the checkpoint directory"
                )
            start, length = int(info.offset), int(info.length)
            transforms = tuple(str(t) for t in (getattr(info, "transform_descriptors", None) or ()))
            if rel not in files:
                p = os.path.join(directory, rel)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"{directory}: DCP data file {rel} (holding tensor {fqn!r}) does not exist"
                    ) from None
                files[rel] = (st.st_size, st.st_mtime_ns)
            if start < 0 or length <= 0 or start + length > files[rel][0]:
                raise CheckpointError(
                    f"{os.path.join(directory, rel)}: truncated: the metadata puts tensor {fqn!r} "
                    f"(chunk at offsets {list(o)}) at bytes [{start}:{start + length}], the file "
                    f"holds {files[rel][0]}"
                )
            found.append(Chunk(o, z, rel, start, length, transforms))
        infos[name] = TensorInfo(dtype, size)
        chunks[fqn] = found
    return Layout(key, infos, names, chunks, files)


def _parser() -> str:
    try:
        from sed_dask import config

        how = config.get("readers.dcp-metadata")
    except Exception:  # noqa: BLE001  a process that never loaded the package's config
        how = "fast"
    if how not in ("fast", "torch"):
        raise CheckpointError(f"sed_dask.readers.dcp-metadata must be 'fast' or 'torch', got {how!r}")
    return how


class _Tables:
    """The content of one ``.metadata`` as a reader needs it, shared by every checkpoint whose
    metadata matches it: served names, infos, and per FQN the non-empty chunks as arrays (offsets,
    sizes, file index, start, length); the data files' sizes are checked per checkpoint."""

    __slots__ = ("arrays", "end", "files", "first_fqn", "fqns", "infos", "made", "owner", "start", "transforms")

    def __init__(self, infos, fqns, arrays, transforms, files, first_fqn, owner, start, end):
        self.infos, self.fqns, self.arrays, self.transforms = infos, fqns, arrays, transforms
        self.files, self.first_fqn, self.owner, self.start, self.end = files, first_fqn, owner, start, end
        self.made: dict[str, list[Chunk]] = {}

    def chunks(self, fqn: str) -> list[Chunk]:
        got = self.made.get(fqn)
        if got is None:
            offs, sizes, fidx, start, length = self.arrays[fqn]
            tr = self.transforms.get(fqn, {})
            got = [
                Chunk(tuple(o), tuple(z), self.files[f], s, n, tr.get(i, ()))
                for i, (o, z, f, s, n) in enumerate(
                    zip(offs.tolist(), sizes.tolist(), fidx.tolist(), start.tolist(), length.tolist())
                )
            ]
            got = self.made.setdefault(fqn, got)
        return got


class _ChunkMap(Mapping):
    """``FQN -> [Chunk]`` of a layout, made on first access from the shared tables."""

    __slots__ = ("_t",)

    def __init__(self, tables: _Tables):
        self._t = tables

    def __getitem__(self, fqn):
        if fqn not in self._t.arrays:
            raise KeyError(fqn)
        return self._t.chunks(fqn)

    def __iter__(self):
        return iter(self._t.arrays)

    def __len__(self):
        return len(self._t.arrays)


def _make_tables(rec, directory: str, meta_path: str) -> _Tables:
    """Check a parsed record as :func:`_build_layout` checks torch's ``Metadata`` (same messages) and
    reduce it to :class:`_Tables` (everything but the data files' sizes)."""
    tensors, storage = rec.tensors, rec.storage
    names = _served_names(tensors, rec.planner_data, directory)
    infos, arrays, transforms = {}, {}, {}
    files: dict[str, int] = {}
    first_fqn: list[str] = []
    owner_f, starts, ends = [], [], []
    for name, fqn in names.items():
        dtype, size, offs, sizes = tensors[fqn]
        nd = len(size)
        o = np.array(offs, dtype=np.int64).reshape(len(offs), nd) if all(len(x) == nd for x in offs) else None
        z = np.array(sizes, dtype=np.int64).reshape(len(sizes), nd) if all(len(x) == nd for x in sizes) else None
        if o is None or z is None or not tiles_exactly(size, o, z):
            why = _cover_problem(size, list(zip(offs, sizes)))
            if why:
                raise CheckpointError(
                    f"{meta_path}: tensor {fqn!r} of size {list(size)} is not covered by its chunks: {why}"
                )
        keep = [i for i, zz in enumerate(sizes) if math.prod(zz) > 0]
        fidx, st, ln, tr = [], [], [], {}
        for j, i in enumerate(keep):
            info = storage.get((fqn, offs[i]))
            if info is None:
                raise CheckpointError(
                    f"{meta_path}: tensor {fqn!r}: no storage entry for its chunk at offsets {list(offs[i])}"
                )
            rel, start, length, trans = info
            f = files.get(rel)
            if f is None:
                if not rel or os.path.isabs(rel) or os.path.normpath(rel).startswith(os.pardir):
                    raise CheckpointError(
                        f"{meta_path}: tensor {fqn!r}: chunk file {rel!r} is not inside the checkpoint directory"
                    )
                f = files[rel] = len(files)
                first_fqn.append(fqn)
            fidx.append(f)
            st.append(start)
            ln.append(length)
            if trans:
                tr[j] = trans
        arrays[fqn] = (
            o[keep] if o is not None else np.zeros((0, nd), np.int64),
            z[keep] if z is not None else np.zeros((0, nd), np.int64),
            np.array(fidx, dtype=np.int32),
            np.array(st, dtype=np.int64),
            np.array(ln, dtype=np.int64),
        )
        if tr:
            transforms[fqn] = tr
        infos[name] = TensorInfo(dtype, tuple(size))
        owner_f.append(arrays[fqn][2])
        starts.append(arrays[fqn][3])
        ends.append(arrays[fqn][3] + arrays[fqn][4])

    def cat(parts, dt):
        return np.concatenate(parts) if parts else np.zeros(0, dt)

    return _Tables(
        infos,
        names,
        arrays,
        transforms,
        tuple(files),
        tuple(first_fqn),
        cat(owner_f, np.int32),
        cat(starts, np.int64),
        cat(ends, np.int64),
    )


def _build_fast(directory: str, meta_path: str, key: tuple) -> Layout:
    """:func:`_build_layout` through :mod:`sed_dask.readers.dcp_metadata` (no torch objects)."""
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CheckpointError(f"{meta_path}: cannot read DCP metadata: {exc}") from exc
    tables, _meta, how = _TEMPLATES.tables(raw, meta_path, lambda rec: _make_tables(rec, directory, meta_path))
    stats = {}
    fsize = np.empty(len(tables.files), dtype=np.int64)
    for i, rel in enumerate(tables.files):
        try:
            st = os.stat(os.path.join(directory, rel))
        except FileNotFoundError:
            raise CheckpointError(
                f"{directory}: DCP data file {rel} (holding tensor {tables.first_fqn[i]!r}) does not exist"
            ) from None
        stats[rel] = (st.st_size, st.st_mtime_ns)
        fsize[i] = st.st_size
    bad = (tables.start < 0) | (tables.end <= tables.start) | (tables.end > fsize[tables.owner])
    if bad.any():
        at = int(np.argmax(bad))
        for fqn, (offs, _z, fidx, start, length) in tables.arrays.items():
            if at < fidx.size:
                rel = tables.files[int(fidx[at])]
                a, n = int(start[at]), int(length[at])
                raise CheckpointError(
                    f"{os.path.join(directory, rel)}: truncated: the metadata puts tensor {fqn!r} "
                    f"(chunk at offsets {offs[at].tolist()}) at bytes [{a}:{a + n}], the file "
                    f"holds {stats[rel][0]}"
                )
            at -= fidx.size
    lay = Layout(key, tables.infos, tables.fqns, _ChunkMap(tables), stats)
    # shared tables are charged to the layout that parsed them; a match adds its file stats only
    lay.nbytes = 2048 + 200 * len(stats) + (_tables_nbytes(tables) if how == "parsed" else 0)
    return lay


def _tables_nbytes(t: _Tables) -> int:
    arrays = sum(a.nbytes for arr in t.arrays.values() for a in arr) + 5 * 112 * len(t.arrays)
    return arrays + approx_nbytes((t.infos, 300), (t.fqns, 100)) + 250 * int(t.start.size)


def get_layout(directory: str) -> Layout:
    """The cached layout of a DCP directory (its metadata unpickled the first time)."""
    meta = os.path.join(directory, METADATA_NAME)
    if not os.path.isdir(directory):
        raise CheckpointError(f"DCP checkpoint directory {directory} does not exist")
    try:
        os.stat(meta)
    except FileNotFoundError:
        ranks = sorted(n for n in os.listdir(directory) if n.startswith("__") and n.endswith(METADATA_NAME))
        extra = (
            f"; it holds rank-local {', '.join(ranks[:3])} (saved without collectives), which this reader "
            "does not merge"
            if ranks
            else " (is dcp.save still running, or did it fail?)"
        )
        raise CheckpointError(
            f"{directory}: no {METADATA_NAME} file, so not a complete DCP checkpoint{extra}"
        ) from None
    return _LAYOUTS.for_file(meta, lambda key: _build_layout(directory, meta, key), size=_layout_nbytes)


def _layout_nbytes(lay: Layout) -> int:
    if lay.nbytes is not None:
        return lay.nbytes
    n_chunks = sum(len(c) for c in lay.chunks.values())
    return approx_nbytes((lay.infos, 300), (lay.fqns, 100)) + 250 * n_chunks


def clear_layout_cache() -> None:
    _LAYOUTS.clear()
    _TEMPLATES.clear()


class _Range(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable file (for ``zipfile``)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b):
        n = min(len(b), self._length - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(b)[:n]], self._start + self._pos)
        self._pos += got
        return got


def _c_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _is_c_order(strides, shape) -> bool:
    """Whether a tensor of ``shape`` with ``strides`` is laid out in C order (size-1 dims ignored)."""
    return all(s == c for s, c, m in zip(strides, _c_strides(shape), shape) if m > 1)


def _flat_span(shape, ch: Chunk) -> tuple[int, int] | None:
    """The chunk's elements as one flat C-order range ``[a, b)`` of the tensor, or None when they
    are not one range (a chunk of ``Shard(1)``): true of size-1 leading dims, one partial dim,
    then full dims (``Shard(0)`` shards, whole tensors)."""
    nd = len(shape)
    k = next((d for d in range(nd) if ch.sizes[d] != 1), nd)
    if any(ch.sizes[d] != shape[d] for d in range(k + 1, nd)):
        return None
    a = sum(o * c for o, c in zip(ch.offsets, _c_strides(shape)))
    return a, a + math.prod(ch.sizes)


def _torch_decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of the bytes of a dtype numpy lacks (float8), converted by torch."""
    import torch

    return torch.frombuffer(raw, dtype=getattr(torch, dtype)).float().numpy()


# ----------------------------------------------------------------------------- the reader
class DCPReader(ReaderBase):
    """A DCP checkpoint directory (or its ``.metadata`` file).

    ``extension_registry``: a ``torch.distributed.checkpoint._extension.ExtensionRegistry`` for
    chunks written with stream transforms torch does not register by default (None: torch's)."""

    format = "dcp"

    def __init__(self, path, *, extension_registry=None):
        path = os.fspath(path)
        if os.path.basename(path) == METADATA_NAME and not os.path.isdir(path):
            path = os.path.dirname(path) or "."
        self.path = str(path)
        self.extension_registry = extension_registry
        self._layout: Layout | None = None
        self._fds: dict[str, int] = {}

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = get_layout(self.path)
        return self._layout

    def tensors(self) -> dict[str, TensorInfo]:
        return self.layout.infos

    def fqn(self, name: str) -> str:
        """The FQN under which DCP stored tensor ``name`` (e.g. ``model.`` + name)."""
        return self.layout.fqns[name]

    def shared_groups(self) -> list[tuple[str, ...]]:
        """Empty: DCP writes each FQN's chunks on their own, so tied weights are two copies on disk
        (the selection policy's bit-identical alias rule still drops a tied head)."""
        return []

    # -- files
    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            p = os.path.join(self.path, rel)
            try:
                fd = open_if_unchanged(p, self.layout.files[rel])
            except FileNotFoundError:
                raise CheckpointError(f"{self.path}: DCP data file {rel} does not exist") from None
            if fd is None:
                raise CheckpointError(
                    f"{p}: the file changed since the checkpoint's metadata was read (size/mtime differ); open it again"
                )
            self._fds[rel] = fd
        return fd

    def _pread(self, ch: Chunk, view: memoryview, offset: int, fqn: str) -> None:
        if not pread_full(self._fd(ch.file), view, offset):
            raise CheckpointError(
                f"{os.path.join(self.path, ch.file)}: truncated: the chunk of tensor {fqn!r} "
                f"at offsets {list(ch.offsets)} ends before byte {offset + view.nbytes}"
            )

    # -- chunk archives
    def _chunk_error(self, ch: Chunk, fqn: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{os.path.join(self.path, ch.file)}: bytes [{ch.start}:{ch.start + ch.length}] "
            f"(tensor {fqn!r}, chunk at offsets {list(ch.offsets)}): {what}"
        )

    def _stored(self, fqn: str, ch: Chunk, info: TensorInfo) -> Stored:
        key = (fqn, ch.offsets)
        st = self.layout.stored.get(key)
        if st is None:
            st = self.layout.stored[key] = self._locate(fqn, ch, info)
        return st

    def _locate(self, fqn: str, ch: Chunk, info: TensorInfo) -> Stored:
        """Find a chunk's storage in its ``torch.save`` archive from the zip directory and ``data.pkl``
        alone (its data bytes are not read); every assumption is checked, none guessed."""
        import torch
        from torch._weights_only_unpickler import Unpickler

        view = _Range(self._fd(ch.file), ch.start, ch.length)
        try:
            zf = zipfile.ZipFile(view)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise self._chunk_error(
                ch, fqn, f"not a torch.save archive ({exc}); written by a non-default serialization format?"
            ) from exc
        with zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise self._chunk_error(ch, fqn, "not a torch.save archive (no single <archive>/data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
                raise self._chunk_error(ch, fqn, "stored big-endian, which this reader does not convert")
            pinfo = zf.getinfo(pkl[0])
            if pinfo.file_size > _MAX_PKL:
                raise self._chunk_error(ch, fqn, f"data.pkl of {pinfo.file_size} bytes is too large for one tensor")
            storages = []

            def persistent_load(pid):
                typename, storage_type, skey, _location, numel = pid
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                nbytes = int(numel) * torch._utils._element_size(dtype)
                storages.append((torch.serialization._maybe_decode_ascii(skey), nbytes))
                return torch.storage.TypedStorage(
                    wrap_storage=torch.UntypedStorage(nbytes, device="meta"), dtype=dtype, _internal=True
                )

            try:
                up = Unpickler(io.BytesIO(zf.read(pkl[0])), encoding="utf-8")
                up.persistent_load = persistent_load
                t = up.load()
            except Exception as exc:
                raise self._chunk_error(
                    ch, fqn, f"refused or unreadable data.pkl: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(t, torch.Tensor) or len(storages) != 1:
                raise self._chunk_error(
                    ch, fqn, f"data.pkl holds {type(t).__name__} with {len(storages)} storages, not one tensor"
                )
            if tuple(t.shape) != ch.sizes or _dtype_name(t.dtype) != info.dtype:
                raise self._chunk_error(
                    ch,
                    fqn,
                    f"holds a {_dtype_name(t.dtype)} tensor of shape {list(t.shape)}, "
                    f"the metadata says {info.dtype} {list(ch.sizes)}",
                )
            skey, nbytes = storages[0]
            try:
                entry = zf.getinfo(f"{prefix}data/{skey}")
            except KeyError:
                raise self._chunk_error(ch, fqn, f"no storage record data/{skey}") from None
            if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != nbytes:
                raise self._chunk_error(ch, fqn, f"storage record data/{skey} is compressed or not {nbytes} bytes")
            strides, offset = tuple(int(s) for s in t.stride()), int(t.storage_offset())
            item = t.element_size()
            last = offset + sum((s - 1) * d for s, d in zip(t.shape, strides))
            if offset < 0 or min(strides, default=0) < 0 or (last + 1) * item > nbytes:
                raise self._chunk_error(ch, fqn, "the tensor's strides reach outside its storage")
            try:
                data = zip_data_start(view, entry.header_offset)
            except ValueError as exc:
                raise self._chunk_error(ch, fqn, f"{exc} of data/{skey}") from None
            if data + nbytes > ch.length:
                raise self._chunk_error(ch, fqn, f"storage record data/{skey} runs past the chunk's end")
        return Stored(ch.start + data, offset, strides)

    def _decode(self, fqn: str, ch: Chunk, info: TensorInfo):
        """A chunk stored with stream transforms, undone and loaded whole (weights_only)."""
        import torch
        from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

        try:
            exts = (self.extension_registry or ExtensionRegistry()).from_descriptor_list(list(ch.transforms))
        except Exception as exc:
            raise self._chunk_error(
                ch,
                fqn,
                f"stored with transforms {list(ch.transforms)} that cannot be undone "
                f"here ({type(exc).__name__}: {exc}); pass an extension_registry",
            ) from exc
        raw = bytearray(ch.length)
        self._pread(ch, memoryview(raw), ch.start, fqn)
        stream = io.BytesIO(raw)
        for ex in exts:
            if isinstance(ex, StreamTransformExtension):
                stream = ex.transform_from(stream)
        try:
            t = torch.load(io.BytesIO(stream.read(-1)), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise self._chunk_error(
                ch, fqn, f"unreadable after undoing {list(ch.transforms)}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != ch.sizes or _dtype_name(t.dtype) != info.dtype:
            raise self._chunk_error(ch, fqn, f"does not hold a {info.dtype} tensor of shape {list(ch.sizes)}")
        return t

    # -- reads
    def _read_into(self, name, info, lo, hi, out):
        dtype = info.dtype
        if dtype not in RAW_DTYPES and dtype not in _TORCH_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {dtype}, which this reader does not convert "
                f"to float32 (supported: {', '.join(list(RAW_DTYPES) + list(_TORCH_DTYPES))})"
            )
        fqn = self.layout.fqns[name]
        shape = info.shape
        boxes = None
        decoded: dict[tuple, object] = {}
        for ch in self.layout.chunks[fqn]:
            span = _flat_span(shape, ch)
            if span is not None:
                a, b = max(lo, span[0]), min(hi, span[1])
                if a >= b:
                    continue  # the chunk holds none of the slice
                if not ch.transforms:
                    st = self._stored(fqn, ch, info)
                    if _is_c_order(st.strides, ch.sizes):  # Shard(0) and whole chunks: one positioned read
                        self._read_run(fqn, ch, st, dtype, st.offset + a - span[0], out[a - lo : b - lo])
                        continue
            if boxes is None:  # rectangular pieces of the slice, each a strided view of ``out``
                boxes, pos = [], 0
                for box in flat_slices(shape, lo, hi):
                    full = tuple(box) + tuple(slice(0, s) for s in shape[len(box) :])
                    bshape = tuple(s.stop - s.start for s in full)
                    n = math.prod(bshape)
                    boxes.append((full, out[pos : pos + n].reshape(bshape)))
                    pos += n
            for full, dst_box in boxes:
                inter = []
                for s, o, z in zip(full, ch.offsets, ch.sizes):
                    a, b = max(s.start, o), min(s.stop, o + z)
                    if a >= b:
                        break
                    inter.append((a, b))
                else:
                    dst = (
                        dst_box[tuple(slice(a - s.start, b - s.start) for (a, b), s in zip(inter, full))]
                        if inter
                        else dst_box
                    )
                    local = [(a - o, b - o) for (a, b), o in zip(inter, ch.offsets)]
                    if ch.transforms:
                        t = decoded.get(ch.offsets)
                        if t is None:
                            t = decoded[ch.offsets] = self._decode(fqn, ch, info)
                        piece = t[tuple(slice(a, b) for a, b in local)] if local else t
                        dst[...] = piece.float().numpy()
                    else:
                        self._read_box(fqn, ch, self._stored(fqn, ch, info), dtype, local, dst)

    def _read_run(self, fqn: str, ch: Chunk, st: Stored, dtype: str, first: int, dst: np.ndarray) -> None:
        """Storage elements ``[first, first + dst.size)`` of a chunk into the contiguous float32 ``dst``."""
        start = st.start + first * np.dtype(RAW_DTYPES.get(dtype, "u1")).itemsize
        decode = (lambda raw: _torch_decode(raw, dtype)) if dtype in _TORCH_DTYPES else None
        read_float32(lambda view, at: self._pread(ch, view, at, fqn), dtype, start, dst, decode=decode)

    def _read_box(self, fqn: str, ch: Chunk, st: Stored, dtype: str, local, dst: np.ndarray) -> None:
        """Copy the box ``local`` of a chunk into ``dst`` (a float32, possibly strided, view of the output)."""
        shape = tuple(b - a for a, b in local)
        first = st.offset + sum(a * s for (a, _), s in zip(local, st.strides))
        count = sum((b - a - 1) * s for (a, b), s in zip(local, st.strides)) + 1
        if count == math.prod(shape) and _is_c_order(st.strides, shape) and dst.flags.c_contiguous:
            self._read_run(fqn, ch, st, dtype, first, dst)  # the box is one run of the chunk (always, for
            return  # C-order chunks: see flat_slices), and of out
        raw = np.dtype(RAW_DTYPES.get(dtype, "u1"))
        buf = np.empty(count, dtype=raw)
        self._pread(ch, memoryview(buf).cast("B"), st.start + first * raw.itemsize, fqn)
        if dtype in _TORCH_DTYPES:
            buf, dtype = _torch_decode(buf, dtype), "float32"
        src = np.lib.stride_tricks.as_strided(buf, shape, tuple(s * buf.itemsize for s in st.strides), writeable=False)
        to_float32(dtype, src, dst)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
