"""Parameter-selection policies: which tensors form the flat parameter vector, in which order.

The reference code flattens checkpoints three different ways (docs/method.md §2.2, §15.3): the full
state dict (mask buffers and a second copy of the tied embedding included) or a substring rule
(``"attn.bias" in key``) that also drops GPT-2's trainable ``c_attn.bias``. Here the choice is an
explicit, versioned, JSON-recordable policy stored with every run:

``params_dedup_no_buffers`` (default)
    Trainable tensors only. Drops non-float tensors, buffers with well-known exact names
    (``running_mean``, ``inv_freq`` …), causal-mask buffers recognised by *what they are* (a square
    ``(…1, T, T)`` tensor holding a 0/1 lower-triangular or additive 0/-inf mask) and second
    copies of tied tensors (shared storage in ``.pt`` files, or a known head/embedding alias
    with equal shape and bit-identical values in the first checkpoint). ``_orig_mod.`` and
    ``module.`` prefixes are stripped. Natural name order (``blocks.2`` < ``blocks.10``), so
    ``.pt`` and safetensors files of one model give the same vector.
``full_state_dict_sorted``
    The reference TinyStories rule: every tensor entry including buffers and duplicate tied
    copies, in lexicographic key order, names unchanged.

Both accept ``include``/``exclude`` regexes (``re.search`` on the normalised name).
The policy record (``spec`` + ``dropped: {name: reason}``) is stored in the run attrs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from sed_dask.errors import CheckpointError
from sed_dask.readers.base import TensorInfo
from sed_dask.sources.param_index import ParamIndex

DEFAULT_POLICY = "params_dedup_no_buffers"
POLICIES = {"params_dedup_no_buffers": 1, "full_state_dict_sorted": 1}
_DEFAULT_STRIP = {"params_dedup_no_buffers": ("_orig_mod.", "module."), "full_state_dict_sorted": ()}

#: last name components that are always non-trainable buffers
BUFFER_NAMES = frozenset(
    {
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "masked_bias",
        "inv_freq",
        "position_ids",
        "_float_tensor",
        "cos_cached",
        "sin_cached",
        "_cos_cached",
        "_sin_cached",
    }
)
#: output heads that are commonly tied to the input embedding
HEAD_ALIASES = ("lm_head.weight", "embed_out.weight", "output.weight")
EMBED_ALIASES = (
    "wte.weight",
    "tok_emb.weight",
    "embed_tokens.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "token_embedding.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
_BLOCK_ELEMS = 1 << 22  # elements per read when comparing/inspecting tensors on the client
_NUM = re.compile(r"(\d+)")


def natural_key(name: str):
    """Sort key that orders digit runs numerically: ``blocks.2.x`` < ``blocks.10.x``."""
    parts = _NUM.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _ends_with(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _as_tuple(x) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(str(v) for v in x)


@dataclasses.dataclass(frozen=True)
class SelectionPolicy:
    """A named, versioned selection rule with its options."""

    name: str = DEFAULT_POLICY
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown selection policy {self.name!r}; choose one of {sorted(POLICIES)}")
        object.__setattr__(self, "include", _as_tuple(self.include))
        object.__setattr__(self, "exclude", _as_tuple(self.exclude))
        strip = _DEFAULT_STRIP[self.name] if self.strip_prefixes is None else _as_tuple(self.strip_prefixes)
        object.__setattr__(self, "strip_prefixes", strip)
        for rx in self.include + self.exclude:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"invalid regex {rx!r} in the selection policy: {exc}") from None

    @property
    def version(self) -> int:
        return POLICIES[self.name]

    @property
    def order(self) -> str:
        return "lexicographic" if self.name == "full_state_dict_sorted" else "natural"

    def spec(self) -> dict:
        """JSON-safe identity of the policy (what must match to append to a run)."""
        return {
            "name": self.name,
            "version": self.version,
            "options": {
                "include": list(self.include),
                "exclude": list(self.exclude),
                "strip_prefixes": list(self.strip_prefixes),
                "order": self.order,
            },
        }

    @classmethod
    def from_spec(cls, spec: Mapping) -> "SelectionPolicy":
        opts = dict(spec.get("options") or {})
        if int(spec.get("version", POLICIES.get(spec["name"], 0))) != POLICIES.get(spec["name"]):
            raise ValueError(
                f"selection policy {spec['name']!r} version {spec.get('version')} is not "
                f"supported by this sed_dask (has {POLICIES.get(spec['name'])})"
            )
        return cls(
            spec["name"],
            tuple(opts.get("include", ())),
            tuple(opts.get("exclude", ())),
            tuple(opts["strip_prefixes"]) if "strip_prefixes" in opts else None,
        )

    def same_as(self, spec: Mapping) -> bool:
        """True when a stored policy record describes this policy (``dropped`` is ignored)."""
        mine = self.spec()
        return all(spec.get(k) == mine[k] for k in ("name", "version", "options"))

    # ------------------------------------------------------------------ names
    def normalize(self, raw: str) -> str:
        name = raw
        changed = True
        while changed and self.strip_prefixes:
            changed = False
            for p in self.strip_prefixes:
                if p and name.startswith(p) and len(name) > len(p):
                    name, changed = name[len(p) :], True
        return name

    def names(self, tensors: Mapping[str, TensorInfo], *, path: str = "?") -> dict[str, str]:
        """``{normalised name: name in the file}``; two names collapsing into one is an error."""
        out: dict[str, str] = {}
        for raw in tensors:
            n = self.normalize(raw)
            if n in out:
                raise CheckpointError(
                    f"{path}: tensors {out[n]!r} and {raw!r} both become {n!r} after "
                    f"stripping prefixes {list(self.strip_prefixes)}"
                )
            out[n] = raw
        return out

    def sort(self, names) -> list[str]:
        return sorted(names) if self.order == "lexicographic" else sorted(names, key=natural_key)

    def _regex_drop(self, name: str) -> str | None:
        if self.include and not any(re.search(rx, name) for rx in self.include):
            return f"not matched by include {list(self.include)}"
        for rx in self.exclude:
            if re.search(rx, name):
                return f"excluded by /{rx}/"
        return None


def resolve_policy(policy=None, *, include=None, exclude=None) -> SelectionPolicy:
    """A :class:`SelectionPolicy` from a name, a stored spec, a policy object or None (the default)."""
    if isinstance(policy, SelectionPolicy):
        base = policy
    elif isinstance(policy, Mapping):
        base = SelectionPolicy.from_spec(policy)
    else:
        base = SelectionPolicy(policy or DEFAULT_POLICY)
    changes = {}
    if include is not None:
        changes["include"] = _as_tuple(include)
    if exclude is not None:
        changes["exclude"] = _as_tuple(exclude)
    return dataclasses.replace(base, **changes) if changes else base


@dataclasses.dataclass
class Selection:
    """The outcome of applying a policy to one (the first) checkpoint."""

    policy: SelectionPolicy
    index: ParamIndex
    sources: dict[str, str]  # index name -> tensor name in that checkpoint
    dropped: dict[str, str]  # name -> why it is not in the vector
    keys: dict[str, TensorInfo]  # every (normalised) tensor of the checkpoint: the key set later files must match
    ties: dict[str, str] = dataclasses.field(default_factory=dict)  # dropped tied copy -> the name kept

    def record(self) -> dict:
        """The JSON policy record stored in the run attrs (``selection_policy``)."""
        dropped = {k: self.dropped[k] for k in sorted(self.dropped, key=natural_key)}
        return {**self.policy.spec(), "dropped": dropped}


def bit_identical(reader, a: str, b: str) -> bool:
    """Whether two tensors of one checkpoint hold the same values, bit for bit (read in blocks)."""
    ia, ib = reader.tensors()[a], reader.tensors()[b]
    if ia != ib:
        return False
    for lo in range(0, ia.size, _BLOCK_ELEMS):
        hi = min(ia.size, lo + _BLOCK_ELEMS)
        if not np.array_equal(reader.read(a, lo, hi).view(np.uint32), reader.read(b, lo, hi).view(np.uint32)):
            return False
    return True


def causal_mask_kind(reader, raw: str, info: TensorInfo) -> str | None:
    """``"0/1"`` or ``"additive"`` if the tensor is a causal attention mask, else None.

    Only square ``(1, …, 1, T, T)`` float tensors qualify, and the first row is checked before
    anything else is read, so trained square weight matrices cost one row each.
    """
    shape = info.shape
    if not info.is_float or len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] < 2:
        return None
    if any(s != 1 for s in shape[:-2]):
        return None
    T = shape[-1]
    row0 = reader.read(raw, 0, T)
    if row0[0] == 1 and not row0[1:].any():
        kind = "0/1"
    elif row0[0] == 0 and np.all(row0[1:] <= -1e4):
        kind = "additive"
    else:
        return None
    rows = max(1, _BLOCK_ELEMS // T)
    j = np.arange(T)
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        block = reader.read(raw, r0 * T, r1 * T).reshape(r1 - r0, T)
        lower = j[None, :] <= np.arange(r0, r1)[:, None]
        if kind == "0/1":
            ok = np.array_equal(block, lower.astype(np.float32))
        else:
            ok = not block[lower].any() and bool(np.all(block[~lower] <= -1e4))
        if not ok:
            return None
    return kind


def _canonical(names: Sequence[str]) -> str:
    """Which copy of a tied tensor to keep: an embedding rather than an output head, then natural order."""
    return sorted(names, key=lambda n: (_ends_with(n, HEAD_ALIASES), natural_key(n)))[0]


def select(reader, policy=None, *, include=None, exclude=None, group_of=None) -> Selection:
    """Apply a policy to a checkpoint reader: header reads plus the few small reads that tie and
    mask detection need (first row of square tensors, masks, a tied head/embedding pair)."""
    pol = resolve_policy(policy, include=include, exclude=exclude)
    infos = reader.tensors()
    path = getattr(reader, "path", "?")
    norm = pol.names(infos, path=path)
    keys = {n: infos[raw] for n, raw in norm.items()}
    dropped: dict[str, str] = {}
    ties: dict[str, str] = {}
    cands = dict(keys)
    if pol.name == "params_dedup_no_buffers":
        for n, info in keys.items():
            last = n.rsplit(".", 1)[-1]
            if not info.is_float:
                dropped[n] = f"non-float tensor ({info.dtype})"
            elif last in BUFFER_NAMES:
                dropped[n] = f"buffer (name {last!r})"
        cands = {n: i for n, i in keys.items() if n not in dropped}
        to_norm = {raw: n for n, raw in norm.items()}
        for group in reader.shared_groups():
            tied = [to_norm[r] for r in group if to_norm.get(r) in cands]
            if len(tied) > 1:
                keep = _canonical(tied)
                for n in tied:
                    if n != keep:
                        dropped[n] = f"tied to {keep} (shared storage)"
                        ties[n] = keep
                        cands.pop(n)
        heads = [n for n in cands if _ends_with(n, HEAD_ALIASES)]
        embeds = [n for n in cands if _ends_with(n, EMBED_ALIASES)]
        for h in heads:
            for e in embeds:
                if cands[e] == cands[h] and bit_identical(reader, norm[h], norm[e]):
                    dropped[h] = f"tied to {e} (known alias, bit-identical in the first checkpoint)"
                    ties[h] = e
                    cands.pop(h)
                    break
        for n in list(cands):
            kind = causal_mask_kind(reader, norm[n], cands[n])
            if kind:
                dropped[n] = f"causal-mask buffer ({kind} lower-triangular {list(cands[n].shape)})"
                cands.pop(n)
    for n in list(cands):
        why = pol._regex_drop(n)
        if why:
            dropped[n] = why
            cands.pop(n)
    if not cands:
        raise CheckpointError(
            f"{path}: the selection policy {pol.name} keeps no tensor "
            f"(include={list(pol.include)}, exclude={list(pol.exclude)})"
        )
    order = pol.sort(cands)
    index = ParamIndex.from_tensors([(n, cands[n].shape, cands[n].dtype) for n in order], group_of=group_of)
    return Selection(pol, index, {n: norm[n] for n in order}, dropped, keys, ties)


def tie_broken(reader, copy: str, kept: str, *, n_probes: int = 8, probe: int = 512) -> str | None:
    """Why the tensors ``copy`` and ``kept`` of this checkpoint are no longer one tensor, or None.

    Ties are judged on the first checkpoint; a later file that unties them (a head fine-tuned on its
    own, a resumed run saved differently) would otherwise be silently missing from the vector. Shared
    storage settles it at no cost; without it, ``n_probes`` slices spread over the tensor are
    compared bit for bit (untied copies of a trained matrix differ almost everywhere)."""
    if any(copy in g and kept in g for g in reader.shared_groups()):
        return None
    infos = reader.tensors()
    if infos[copy] != infos[kept]:
        return f"{copy!r} is {infos[copy]} but {kept!r} is {infos[kept]}"
    size = infos[copy].size
    starts = sorted({int(x) for x in np.linspace(0, max(0, size - probe), n_probes)})
    for lo in starts:
        hi = min(size, lo + probe)
        a, b = reader.read(copy, lo, hi).view(np.uint32), reader.read(kept, lo, hi).view(np.uint32)
        if not np.array_equal(a, b):
            i = lo + int(np.flatnonzero(a != b)[0])
            return f"{copy!r} and {kept!r} differ at flat element {i}"
    return None


def check_same_keys(
    reference: Mapping[str, TensorInfo],
    other: Mapping[str, TensorInfo],
    *,
    path: str,
    step: int,
    ref_path: str,
    ref_step: int,
) -> None:
    """Raise naming the keys/shapes/dtypes in which ``other`` differs from the reference checkpoint."""
    if reference == other:
        return
    head = f"checkpoint {path} (step {step}) does not match the first checkpoint {ref_path} (step {ref_step})"
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        raise CheckpointError(
            f"{head}: key set differs: missing {sorted(missing, key=natural_key)[:10]}, "
            f"unexpected {sorted(extra, key=natural_key)[:10]}"
        )
    for k, ri in reference.items():
        oi = other[k]
        if ri.shape != oi.shape:
            raise CheckpointError(f"{head}: tensor {k!r} has shape {list(oi.shape)}, expected {list(ri.shape)}")
        if ri.dtype != oi.dtype:
            raise CheckpointError(f"{head}: tensor {k!r} has dtype {oi.dtype}, expected {ri.dtype}")
