"""Which flat-vector ranges make up each requested layer group.

Gram matrices are additive over parameter blocks, so a per-group Gram is the same pass restricted
to the group's columns (docs/method.md §3.3, §9). This module only turns a user's group request into
``{group: [(start, stop), ...]}`` for one run's parameter index; ``sed_dask.engine.gram`` does the rest.

Requests:

* ``None`` - no groups (only the whole vector, ``"all"``);
* ``"default"`` - the labels stored in the run's parameter index (e.g. ``block0.attn``);
* ``"blocks"`` - the stored labels coarsened to one group per block (``block0.attn`` -> ``block0``);
* ``{name: regex}`` - user groups (first matching pattern wins; unmatched tensors go to ``other``);
* a list of names - a subset of the ``default`` or ``blocks`` groups.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from sed_dask.errors import StoreError
from sed_dask.sources.layers import regex_groups
from sed_dask.sources.param_index import ParamIndex

ALL = "all"
_BLOCK_LABEL = re.compile(r"^((?:decoder\.)?block\d+)(?:\.|$)")


def block_label(label: str) -> str:
    """``block3.attn`` -> ``block3``, ``decoder.block3.mlp`` -> ``decoder.block3`` (an
    encoder-decoder's decoder blocks, sed_dask.sources.layers); labels outside blocks are kept."""
    m = _BLOCK_LABEL.match(label)
    return m.group(1) if m else label


def parse_groups_arg(text: str | None):
    """CLI form ``default`` | ``blocks`` | ``NAME=REGEX,...`` | ``NAME,NAME`` -> a request."""
    if text is None or text == "":
        return None
    if text in ("default", "blocks"):
        return text
    items = [t for t in text.split(",") if t]
    if all("=" in t for t in items):
        return {k.strip(): v for k, v in (t.split("=", 1) for t in items)}
    if any("=" in t for t in items):
        raise ValueError(f"--groups {text!r}: mix of NAME=REGEX and plain names; use one form")
    return [t.strip() for t in items]


def resolve(index: ParamIndex, request, *, run: str) -> tuple[dict[str, list[tuple[int, int]]], dict[str, str]]:
    """``({group: ranges}, {group: description})`` for one run; ``({}, {})`` when ``request`` is None.

    Groups keep the order in which they first appear in the flat vector (regex groups keep the
    order of the request, ``other`` last). Errors name the run and the group.
    """
    if request is None:
        return {}, {}
    if isinstance(request, str):
        if request == "default":
            ranges = index.group_ranges()
            desc = {g: f"stored layer-group label {g!r}" for g in ranges}
        elif request == "blocks":
            ranges = index.regroup(lambda n, _lab={e.name: e.group for e in index}: block_label(_lab[n])).group_ranges()
            desc = {g: (f"all tensors of {g}" if _BLOCK_LABEL.match(g) else f"stored label {g!r}") for g in ranges}
        else:
            raise ValueError(
                f"unknown grouping {request!r}: use 'default', 'blocks', a {{name: regex}} "
                "dict or a list of group names"
            )
    elif isinstance(request, Mapping):
        if not request:
            raise ValueError("empty group mapping")
        for g, pat in request.items():
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"group {g!r}: invalid regex {pat!r}: {exc}") from None
        mapping = regex_groups(index.names, dict(request), default="other")
        found = index.regroup(mapping).group_ranges()
        empty = [g for g in request if g not in found]
        if empty:
            raise StoreError(
                f"run {run!r}: group(s) {empty} match no parameter tensor "
                f"(patterns {[request[g] for g in empty]}); tensors are e.g. {index.names[:5]}"
            )
        order = list(request) + (["other"] if "other" in found and "other" not in request else [])
        ranges = {g: found[g] for g in order}
        desc = {
            g: (f"tensors matching {request[g]!r}" if g in request else "tensors matching no pattern") for g in order
        }
    elif isinstance(request, Sequence):
        names = list(request)
        default = index.group_ranges()
        blocks = index.regroup(lambda n, _lab={e.name: e.group for e in index}: block_label(_lab[n])).group_ranges()
        if all(n in default for n in names):
            src, kind = default, "stored layer-group label"
        elif all(n in blocks for n in names):
            src, kind = blocks, "block"
        else:
            unknown = [n for n in names if n not in default and n not in blocks]
            raise StoreError(
                f"run {run!r}: unknown group(s) {unknown or names}; available: "
                f"{sorted(set(default) | set(blocks))} (names must all come from one grouping)"
            )
        ranges = {n: src[n] for n in names}
        desc = {n: f"{kind} {n!r}" for n in names}
    else:
        raise TypeError(f"groups must be None, a str, a dict or a list, not {type(request).__name__}")
    if ALL in ranges:
        raise ValueError(f"group name {ALL!r} is reserved for the whole parameter vector")
    return ranges, desc
