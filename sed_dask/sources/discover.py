"""Find checkpoints and their training steps.

Steps come from file or directory names (``ckpt_000200.pt``, ``step200``, ``global_step200``,
``checkpoint-200``, ``step1000-tokens4B`` HF revisions, ``model_200.safetensors``, DCP folders
``step_200/``) or from an
explicit ``{step: path}`` mapping, and are sorted numerically (not lexicographically, docs/method.md §2.1).
Two files claiming one step is an error naming both: silently picking one would change the run.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import re
from collections.abc import Iterable, Mapping

from sed_dask.errors import CheckpointError
from sed_dask.readers import claims_dir, scan_suffixes

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = scan_suffixes()  # what a folder scan picks up (sed_dask.readers.registry)
_STEP_RX = (
    re.compile(r"(?:^|[^a-z])(?:global_)?step[_\-=]?(\d+)", re.I),
    re.compile(r"(?:^|[^a-z])(?:checkpoint|ckpt|iter|iteration)[_\-=]?(\d+)", re.I),
)
_INT = re.compile(r"\d+")


def step_from_name(path) -> int | None:
    """Training step encoded in a file or directory name, or None when there is none (or it is ambiguous)."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    for suf in CHECKPOINT_SUFFIXES + (".index.json",):
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    for rx in _STEP_RX:
        m = rx.search(name)
        if m:
            return int(m.group(1))
    ints = _INT.findall(name)
    return int(ints[0]) if len(ints) == 1 else None


def _scan_dir(path: str) -> list[str]:
    """Checkpoint files and checkpoint subdirectories directly inside ``path``."""
    out = []
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p) and name.endswith(CHECKPOINT_SUFFIXES):
            out.append(p)
        elif os.path.isdir(p) and claims_dir(p):
            out.append(p)
    return out


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def discover_checkpoints(sources, *, steps: Iterable[int] | None = None) -> dict[int, str]:
    """``{step: path}`` sorted by step from a directory, a glob, a list of files/dirs, or a mapping.

    ``steps`` restricts the result to those steps (each must be found). Inside a scanned
    directory, files whose names carry no step are skipped with a warning; a file named
    explicitly without a step is an error (pass a mapping instead).
    """
    found: dict[int, str] = {}

    def add(step: int, path: str) -> None:
        if step < 0:
            raise CheckpointError(f"negative step {step} for {path}")
        if step in found and os.path.realpath(found[step]) != os.path.realpath(path):
            raise CheckpointError(
                f"duplicate step {step}: both {found[step]} and {path} claim it; "
                "remove one or pass an explicit {step: path} mapping"
            )
        found[step] = path

    if isinstance(sources, Mapping):
        for k, v in sources.items():
            try:
                step = int(k)
            except (TypeError, ValueError):
                raise CheckpointError(f"step {k!r} for {v} is not an integer") from None
            p = os.fspath(v)
            if not os.path.exists(p):
                raise CheckpointError(f"checkpoint {p} (step {step}) does not exist")
            add(step, p)
    else:
        items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        if not items:
            raise CheckpointError("no checkpoint sources given")
        for item in items:
            item = os.fspath(item)
            if _has_magic(item) and not os.path.exists(item):
                matches = sorted(_glob.glob(item))
                if not matches:
                    raise CheckpointError(f"the pattern {item!r} matches no checkpoint")
                explicit = matches
            elif os.path.isdir(item) and not claims_dir(item):
                for p in _scan_dir(item):
                    s = step_from_name(p)
                    if s is None:
                        logger.warning("skipping %s: no step in its name", p)
                        continue
                    add(s, p)
                continue
            elif os.path.exists(item):
                explicit = [item]
            else:
                raise CheckpointError(f"checkpoint source {item} does not exist")
            for p in explicit:
                s = step_from_name(p)
                if s is None:
                    raise CheckpointError(
                        f"cannot find a training step in the name {p!r}; pass an explicit {{step: path}} mapping"
                    )
                add(s, p)
    if steps is not None:
        want = sorted({int(s) for s in steps})
        missing = [s for s in want if s not in found]
        if missing:
            raise CheckpointError(
                f"requested steps {missing[:10]} are not among the discovered checkpoints "
                f"(found steps {sorted(found)[:10]}{'...' if len(found) > 10 else ''})"
            )
        found = {s: found[s] for s in want}
    return dict(sorted(found.items()))
