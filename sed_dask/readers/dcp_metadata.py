"""DCP ``.metadata`` parsed fast and safely into plain data, once per distinct content.

Why: an FSDP checkpoint's ``.metadata`` (500 tensors x 64 chunks: 4.4 MB, 2.2 M pickle opcodes)
takes seconds through torch's ``weights_only`` unpickler (a Python loop over every opcode, plus the
protocol-2 rewrite it needs), and a run has a thousand of them, read on the client and again in
every worker process.

Two steps, both building nothing but inert data:

* **Restricted parse** (:func:`parse_metadata`): C ``pickle.Unpickler`` whose ``find_class`` maps
  the few globals a DCP metadata names to *stand-ins*, never to torch's classes: the metadata
  dataclasses to empty sealed classes (``NEWOBJ`` + ``BUILD`` fill their ``__dict__`` in C),
  ``torch.Size`` to ``tuple``, a dtype to its name, the memory-format enum to ``int``, a path to a
  string. Any other global (``os.system``, a tensor rebuild, ...), persistent ids and extension
  codes are refused, so no code of the pickle's choosing runs and no class can be patched (the
  stand-in classes refuse attribute writes). The result is then type-checked field by field into a
  :class:`MetadataRecord` of str/int/tuple/dict only.
* **Differential parse** (:class:`TemplateStore`): consecutive checkpoints of one run pickle to
  byte-identical files except the strings of ``storage_meta`` (``checkpoint_id`` path parts,
  ``save_id``; see tests/test_dcp_metadata.py). A file of the same length as one parsed before is
  compared with it byte for byte; when every differing byte lies inside the payload of a string
  literal whose value feeds only ``storage_meta`` (located once per template with
  ``pickletools.genops``), unpickling it would perform the same operations on the same values
  except those strings, so its tensors, chunks and storage are the template's, exactly. Anything
  else is parsed in full. Both paths read and check every byte of every file.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import io
import pickle
import pickletools
import threading

import numpy as np

from sed_dask.errors import CheckpointError

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
#: attribute names of the metadata dataclasses (strings that must never change in a differential parse)
_FIELDS = (
    "state_dict_metadata",
    "planner_data",
    "storage_data",
    "storage_meta",
    "version",
    "properties",
    "size",
    "chunks",
    "offsets",
    "sizes",
    "fqn",
    "offset",
    "index",
    "relative_path",
    "length",
    "transform_descriptors",
    "checkpoint_id",
    "save_id",
    "load_id",
    "modules",
    "dtype",
    "layout",
    "requires_grad",
    "memory_format",
    "pin_memory",
)


class _Sealed(type):
    """Metaclass of the stand-ins: a pickle's ``BUILD`` on a stand-in *class* cannot set attributes."""

    def __setattr__(cls, name, value):
        raise pickle.UnpicklingError(f"attribute {name!r} of {cls.__name__} cannot be set")

    def __delattr__(cls, name):
        raise pickle.UnpicklingError(f"attribute {name!r} of {cls.__name__} cannot be deleted")


class _Record(metaclass=_Sealed):
    """Stand-in of a metadata dataclass: ``BUILD`` fills its ``__dict__`` (in C, no callback)."""

    def __setattr__(self, name, value):  # BUILD's slot state (never written by DCP) would land here
        raise pickle.UnpicklingError(f"attribute {name!r} of {type(self).__name__} cannot be set")


class _Properties(metaclass=_Sealed):
    """Stand-in of ``TensorProperties``, pickled with a tuple state (its ``__getstate__``)."""

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"attribute {name!r} of TensorProperties cannot be set")


class DTypeName(str):
    """A torch dtype as its name (``torch.float32`` -> ``"float32"``), told apart from plain strings."""

    __slots__ = ()


class _PathParts(metaclass=_Sealed):
    """Stand-in of ``pathlib`` paths (``StorageMeta.checkpoint_id``): the parts, as a tuple."""

    def __new__(cls, *parts):
        if not all(isinstance(p, str) for p in parts):
            raise pickle.UnpicklingError("a path whose parts are not strings")
        return PathValue(parts)


class PathValue(tuple):
    """A ``checkpoint_id`` path as its parts (no filesystem object is made)."""

    __slots__ = ()

    def __str__(self):
        if not self:
            return "."
        head, rest = self[0], self[1:]
        return head + "/".join(rest) if head.endswith(("/", "\\")) else "/".join(self)


_STAND_INS = {
    name: _Sealed(name, (_Record,), {"__module__": __name__})
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "StorageMeta",
        "MetadataIndex",
        "_StorageInfo",
    )
}
_GLOBALS = {
    (_MD, n): _STAND_INS[n]
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "StorageMeta",
        "MetadataIndex",
    )
}
_GLOBALS.update(
    {
        (_MD, "TensorProperties"): _Properties,
        (_MD, "_MEM_FORMAT_ENCODING"): int,
        (_FS, "_StorageInfo"): _STAND_INS["_StorageInfo"],
        ("torch", "Size"): tuple,
        ("torch.serialization", "_get_layout"): str,
        ("collections", "OrderedDict"): dict,
    }
)
_GLOBALS.update(
    {
        (mod, cls): _PathParts
        for mod in ("pathlib", "pathlib._local")
        for cls in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath")
    }
)
_DTYPES: dict[str, DTypeName] = {}


def _dtype(name: str):
    if not _DTYPES:
        import torch

        _DTYPES.update({n: DTypeName(n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)})
    return _DTYPES.get(name)


class _Refused(pickle.UnpicklingError):
    pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        got = _GLOBALS.get((module, name))
        if got is None and module == "torch":
            got = _dtype(name)
        if got is None:
            raise _Refused(f"global {module}.{name} is not allowed")
        return got

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not allowed")


class MetadataRecord:
    """A DCP ``Metadata`` as plain data.

    ``tensors``: FQN -> ``(dtype name, size, chunk offsets, chunk sizes)`` (tuples of ints);
    ``others``: FQNs of non-tensor entries (``BytesStorageMetadata``); ``storage``: ``(FQN, chunk
    offsets or None)`` -> ``(relative path, offset, length, transform descriptors)``;
    ``planner_data``: FQN -> key path; ``storage_meta``: ``checkpoint_id`` (a :class:`PathValue`
    or str), ``save_id``, ``load_id``, ``modules``; ``version``."""

    __slots__ = ("others", "planner_data", "storage", "storage_meta", "tensors", "version")

    def __init__(self, tensors, others, storage, planner_data, storage_meta, version):
        self.tensors, self.others, self.storage = tensors, others, storage
        self.planner_data, self.storage_meta, self.version = planner_data, storage_meta, version


def _ints(v, what: str) -> tuple:
    if type(v) is not tuple or not all(type(x) is int for x in v):
        raise ValueError(f"{what} is not a tuple of ints")
    return v


def _fields(obj, cls: str, what: str) -> dict:
    if type(obj) is not _STAND_INS[cls]:
        raise ValueError(f"{what} is a {type(obj).__name__}, not a {cls}")
    return obj.__dict__


def _record(md, where: str) -> MetadataRecord:
    """Type-check the stand-ins into a :class:`MetadataRecord` (errors name the entry)."""
    if type(md) is not _STAND_INS["Metadata"]:
        raise CheckpointError(f"{where}: holds a {type(md).__name__}, not DCP Metadata")
    f = md.__dict__
    sdm, storage = f.get("state_dict_metadata"), f.get("storage_data")
    if type(sdm) is not dict or type(storage) is not dict:
        raise CheckpointError(
            f"{where}: DCP metadata without state_dict_metadata/storage_data mappings "
            f"(written by a custom storage writer?)"
        )
    tcls, bcls, ccls = (
        _STAND_INS["TensorStorageMetadata"],
        _STAND_INS["BytesStorageMetadata"],
        _STAND_INS["ChunkStorageMetadata"],
    )
    tensors, others = {}, []
    for fqn, m in sdm.items():
        if type(fqn) is not str:
            raise CheckpointError(f"{where}: a state_dict_metadata key is a {type(fqn).__name__}, not a str")
        try:
            if type(m) is bcls:
                others.append(fqn)
                continue
            if type(m) is not tcls:
                raise ValueError(f"unknown storage metadata {type(m).__name__}")
            tf = m.__dict__
            props = tf.get("properties")
            if type(props) is not _Properties:
                raise ValueError("properties are not TensorProperties")
            st = props.__dict__.get("state")
            dtype = st[0] if type(st) is tuple and st else (st.get("dtype") if type(st) is dict else None)
            if type(dtype) is not DTypeName:
                raise ValueError("its dtype is not a torch dtype")
            size = _ints(tf.get("size"), "its size")
            chunks = tf.get("chunks")
            if type(chunks) is not list or not all(type(c) is ccls for c in chunks):
                raise ValueError("its chunks are not a list of ChunkStorageMetadata")
            offs = [c.__dict__.get("offsets") for c in chunks]
            sizes = [c.__dict__.get("sizes") for c in chunks]
            for o in offs:
                _ints(o, "a chunk's offsets")
            for z in sizes:
                _ints(z, "a chunk's sizes")
        except (ValueError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{where}: entry {fqn!r}: {exc}") from None
        tensors[fqn] = (str(dtype), size, offs, sizes)
    icls, scls = _STAND_INS["MetadataIndex"], _STAND_INS["_StorageInfo"]
    out = {}
    for idx, info in storage.items():
        try:
            ix, sf = (
                _fields(idx, "MetadataIndex", "a storage_data key"),
                _fields(info, "_StorageInfo", "a storage_data value"),
            )
            fqn, off = ix.get("fqn"), ix.get("offset")
            if type(fqn) is not str:
                raise ValueError("a storage_data key has no fqn")
            if off is not None:
                _ints(off, f"the chunk offsets of {fqn!r}")
            rel, start, length = sf.get("relative_path"), sf.get("offset"), sf.get("length")
            tr = sf.get("transform_descriptors") or ()
            if type(rel) is not str or type(start) is not int or type(length) is not int:
                raise ValueError(f"the storage of {fqn!r} has no relative_path/offset/length")
            if type(tr) not in (list, tuple) or not all(type(t) is str for t in tr):
                raise ValueError(f"the transform descriptors of {fqn!r} are not strings")
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        out[(fqn, off)] = (rel, start, length, tuple(tr))
    del icls, scls
    pd = f.get("planner_data")
    planner = (
        {
            k: tuple(v)
            for k, v in pd.items()
            if type(k) is str and type(v) in (tuple, list) and all(type(p) in (str, int) for p in v)
        }
        if type(pd) is dict
        else {}
    )
    sm = f.get("storage_meta")
    meta = {}
    if type(sm) is _STAND_INS["StorageMeta"]:
        for k in ("checkpoint_id", "save_id", "load_id", "modules"):
            v = sm.__dict__.get(k)
            if v is None or type(v) in (str, PathValue) or (type(v) is list and all(type(x) is str for x in v)):
                meta[k] = tuple(v) if type(v) is list else v
    version = f.get("version")
    return MetadataRecord(tensors, tuple(others), out, planner, meta, version if type(version) is str else None)


_GC_LOCK = threading.Lock()
_GC_HOLDS = [0, False]  # parses running, whether the collector was enabled before the first


@contextlib.contextmanager
def _no_gc():
    """The cyclic collector paused while a parse makes its ~500k small objects: with torch imported
    it would otherwise run full collections all along (5-10x the parse time, measured)."""
    with _GC_LOCK:
        if _GC_HOLDS[0] == 0:
            _GC_HOLDS[1] = gc.isenabled()
            gc.disable()
        _GC_HOLDS[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_HOLDS[0] -= 1
            if _GC_HOLDS[0] == 0 and _GC_HOLDS[1]:
                gc.enable()


def parse_metadata(raw: bytes, where: str) -> MetadataRecord:
    """The :class:`MetadataRecord` of the bytes of a ``.metadata`` file (restricted parse, see the module)."""
    with _no_gc():
        return _parse(raw, where)


def _parse(raw: bytes, where: str) -> MetadataRecord:
    try:
        md = _Unpickler(io.BytesIO(raw), fix_imports=False).load()
    except _Refused as exc:
        raise CheckpointError(
            f"{where}: refused or unreadable DCP metadata: {exc} (a DCP .metadata may hold only "
            f"torch.distributed.checkpoint's metadata classes; this one pickles something "
            f"else, refused for safety)"
        ) from None
    except Exception as exc:  # noqa: BLE001  truncated, corrupt, or a stand-in used the wrong way (BUILD on a class, ...)
        raise CheckpointError(
            f"{where}: not a DCP metadata pickle (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from None
    return _record(md, where)


def read_metadata(path: str) -> MetadataRecord:
    """:func:`parse_metadata` of a file."""
    with open(path, "rb") as f:
        return parse_metadata(f.read(), path)


# ----------------------------------------------------------------------------- differential parse
def _storage_meta_strings(meta: dict) -> set[str]:
    out: set[str] = set()
    for v in meta.values():
        if isinstance(v, str):
            out.add(v)
        elif isinstance(v, tuple):
            out.update(x for x in v if isinstance(x, str))
    return out


def _bound_strings(rec: MetadataRecord) -> set[str]:
    """Every string the layout depends on: names, paths, dtypes, attribute and global names."""
    out = set(_FIELDS) | {rec.version or ""} | set(rec.others)
    for fqn, (dtype, *_r) in rec.tensors.items():
        out.add(fqn)
        out.add(dtype)
    for (fqn, _), (rel, _s, _l, tr) in rec.storage.items():
        out.update((fqn, rel, *tr))
    for k, v in rec.planner_data.items():
        out.add(k)
        out.update(p for p in v if type(p) is str)
    for mod, name in _GLOBALS:
        out.update((mod, name))
    out.update(("torch", *_DTYPES))
    return out


#: string-literal opcodes and the bytes before their payload
_HEADS = {"SHORT_BINUNICODE": 2, "BINUNICODE": 5, "BINUNICODE8": 9}


class _Template:
    """A parsed file: its bytes, what was made of them, and (on first need) its string payloads."""

    __slots__ = ("counts", "free", "lock", "meta", "raw", "spans", "starts", "tables")

    def __init__(self, raw, tables, meta, free):
        self.raw, self.tables, self.meta, self.free = raw, tables, meta, free
        self.spans = self.starts = self.counts = None
        self.lock = threading.Lock()

    def payloads(self):
        """``(starts, spans, counts)``: byte ranges of the payloads of the template's string literals,
        and how many literals hold each free string."""
        with self.lock:
            if self.spans is None:
                spans, counts = [], collections.Counter()
                for op, arg, pos in pickletools.genops(self.raw):
                    if op.name in _HEADS:
                        n = len(arg.encode("utf-8", "surrogatepass"))
                        spans.append((pos + _HEADS[op.name], pos + _HEADS[op.name] + n))
                        if arg in self.free:
                            counts[arg] += 1
                self.starts, self.spans, self.counts = [s for s, _ in spans], spans, counts
            return self.starts, self.spans, self.counts


class TemplateStore:
    """Recently parsed ``.metadata`` files of this process, by length (see the module docstring)."""

    def __init__(self, max_templates: int = 8):
        self._max = max_templates
        self._lock = threading.Lock()
        self._by_len: collections.OrderedDict[int, _Template] = collections.OrderedDict()

    def clear(self) -> None:
        with self._lock:
            self._by_len.clear()

    def tables(self, raw: bytes, where: str, make_tables):
        """``(tables, storage_meta, how)`` for the bytes of one ``.metadata`` file: ``make_tables(record)``
        of its full parse (``how="parsed"``), or a template's tables when the file differs from it only
        in ``storage_meta`` strings (``how="template"``). ``make_tables`` may raise (bad metadata)."""
        with self._lock:
            tpl = self._by_len.get(len(raw))
            if tpl is not None:
                self._by_len.move_to_end(len(raw))
        if tpl is not None:
            meta = self._same_layout(tpl, raw)
            if meta is not None:
                return tpl.tables, meta, "template"
        with _no_gc():
            rec = _parse(raw, where)
            tables = make_tables(rec)
            free = _storage_meta_strings(rec.storage_meta) - _bound_strings(rec)
        with self._lock:
            self._by_len[len(raw)] = _Template(bytes(raw), tables, rec.storage_meta, free)
            self._by_len.move_to_end(len(raw))
            while len(self._by_len) > self._max:
                self._by_len.popitem(last=False)
        return tables, rec.storage_meta, "parsed"

    @staticmethod
    def _same_layout(tpl: _Template, raw: bytes):
        """The storage_meta of ``raw`` when it differs from the template only in free strings, else None."""
        a, b = np.frombuffer(tpl.raw, np.uint8), np.frombuffer(raw, np.uint8)
        diff = np.flatnonzero(a != b)
        if diff.size == 0:
            return tpl.meta
        if not tpl.free or diff.size > 4096:
            return None
        starts, spans, counts = tpl.payloads()
        subst: dict[str, str] = {}
        changed: collections.Counter = collections.Counter()
        i = 0
        while i < diff.size:
            k = bisect.bisect_right(starts, int(diff[i])) - 1
            if k < 0 or not spans[k][0] <= diff[i] < spans[k][1]:
                return None  # a differing byte outside every string payload
            s, e = spans[k]
            try:
                old, new = tpl.raw[s:e].decode("utf-8", "surrogatepass"), raw[s:e].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return None
            if old not in tpl.free or subst.setdefault(old, new) != new:
                return None
            changed[old] += 1
            i = int(np.searchsorted(diff, e))
        if any(changed[v] != counts[v] for v in changed):
            return None  # one copy of a string changed, another not: not a substitution of values
        out = {}
        for k, v in tpl.meta.items():
            if isinstance(v, PathValue):
                out[k] = PathValue(subst.get(x, x) for x in v)
            elif isinstance(v, tuple):
                out[k] = tuple(subst.get(x, x) for x in v)
            else:
                out[k] = subst.get(v, v) if isinstance(v, str) else v
        return out


# ----------------------------------------------------------------------------- chunk geometry
def tiles_exactly(size: tuple, offsets: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether the chunk boxes (``(k, ndim)`` int64 arrays) lie inside the tensor and tile it as the
    distinct cells of one grid, as every DTensor/ShardedTensor placement does: the vectorised proof.
    False decides nothing: the exact check (which also words the error) takes over."""
    nd = len(size)
    if offsets.shape != sizes.shape or offsets.ndim != 2 or offsets.shape[1] != nd:
        return False
    hi = offsets + sizes
    if (offsets < 0).any() or (sizes < 0).any() or (hi > np.asarray(size, np.int64)).any():
        return False
    vol = sizes.prod(axis=1)
    nz = vol > 0
    total = 1
    for s in size:
        total *= int(s)
    if int(vol.sum()) != total:
        return False
    lo, hi = offsets[nz], hi[nz]
    k = lo.shape[0]
    if k <= 1:
        return True
    cells, dims = [], []
    for d in range(nd):
        b = np.unique(np.concatenate([lo[:, d], hi[:, d]]))
        c = np.searchsorted(b, lo[:, d])
        if not np.array_equal(b[c + 1], hi[:, d]):
            return False
        cells.append(c)
        dims.append(b.size - 1)
    n = 1
    for x in dims:
        n *= x
    return n == k and np.unique(np.ravel_multi_index(cells, dims)).size == k
