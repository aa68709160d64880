"""Checks of a set of checkpoints that run before any task: shared by ingestion and direct reads.

Both :func:`sed_dask.ingest` (checkpoints -> store) and :func:`sed_dask.open_checkpoints`
(checkpoints read straight by the Gram pass) must refuse the same bad inputs with the same clear
messages, and must build the same parameter index from the same files (so a spectrum straight
from the files and one from the ingested store are bit-identical). So the policy resolution, the
header comparison of every checkpoint against the first, the "at least 2 checkpoints" rule and
the metrics parsing live here, once; ingestion adds only what concerns a store (rows, resume).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import numpy as np

from sed_dask.errors import CheckpointError, MetricsError, StepMismatchWarning, StoreError
from sed_dask.readers import open_checkpoint
from sed_dask.sources.run_source import RunSource
from sed_dask.sources.selection import Selection, SelectionPolicy, check_same_keys, resolve_policy, select, tie_broken


@dataclasses.dataclass
class CheckpointTodo:
    """One checkpoint to read: its step, path and (after :func:`check_headers`) tensor names."""

    step: int
    path: str
    row: int | None = None  # ingestion: its store row (None: new)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # index name -> name in this file


def require_deltas(run: str, n_total: int, paths) -> None:
    """A run needs two checkpoints to form one delta."""
    if n_total < 2:
        raise CheckpointError(
            f"run {run!r} needs at least 2 checkpoints to form a delta; found {n_total} ({', '.join(paths) or 'none'})"
        )


def policy_for(existing: RunSource | None, policy, include, exclude) -> SelectionPolicy:
    """The selection policy: an existing run's own when none is asked for, else the one asked for."""
    if existing is not None and policy is None and include is None and exclude is None:
        try:
            return SelectionPolicy.from_spec(existing.policy)
        except (KeyError, ValueError) as exc:
            raise StoreError(
                f"run {existing.name!r} was not written by checkpoint ingestion "
                f"(selection policy {existing.policy}); use a new run name"
            ) from exc
    return resolve_policy(policy, include=include, exclude=exclude)


def index_diff(old, new) -> str:
    """How two parameter indexes differ, for an error message."""
    a = {e.name: (e.shape, e.source_dtype) for e in old}
    b = {e.name: (e.shape, e.source_dtype) for e in new}
    missing = [n for n in a if n not in b]
    extra = [n for n in b if n not in a]
    if missing or extra:
        return f"tensors only in the run: {missing[:10]}; only in the new checkpoints: {extra[:10]}"
    for n in a:
        if a[n] != b[n]:
            return (
                f"tensor {n!r}: run has shape/dtype {list(a[n][0])}/{a[n][1]}, "
                f"new checkpoints {list(b[n][0])}/{b[n][1]}"
            )
    return "tensor order differs"


def check_headers(
    todo: list[CheckpointTodo], pol: SelectionPolicy, existing: RunSource | None, run: str, *, step_source: str = "name"
):
    """``(selection, format)`` of the first checkpoint, after checking every other header against it.

    Fills ``td.names``; reads headers (and a few small tensors) only. ``existing``: a stored run
    whose parameter index the first checkpoint must reproduce (None: no such constraint).
    """
    ref = todo[0]
    with open_checkpoint(ref.path) as r:
        sel: Selection = select(r, pol)
        fmt = r.format
        check_recorded_step(ref, r, step_source)
    ref.names = dict(sel.sources)
    if existing is not None and sel.index.hash != existing.attrs.get("param_index_hash"):
        raise StoreError(
            f"run {run!r}: the parameter index of {ref.path} (step {ref.step}) differs from the run's "
            f"(hash {sel.index.hash} vs {existing.attrs.get('param_index_hash')}): "
            f"{index_diff(existing.index, sel.index)}"
        )
    for td in todo[1:]:
        with open_checkpoint(td.path) as r:
            infos = r.tensors()
            check_recorded_step(td, r, step_source)
            norm = pol.names(infos, path=td.path)
            check_same_keys(
                sel.keys,
                {n: infos[raw] for n, raw in norm.items()},
                path=td.path,
                step=td.step,
                ref_path=ref.path,
                ref_step=ref.step,
            )
            for copy, kept in sel.ties.items():
                why = tie_broken(r, norm[copy], norm[kept])
                if why:
                    raise CheckpointError(
                        f"checkpoint {td.path} (step {td.step}): {copy!r} is no longer tied to {kept!r} "
                        f"({why}); it was left out of the parameter vector as a tied copy because the first "
                        f"checkpoint {ref.path} (step {ref.step}) ties them. Ingest the untied part of the "
                        f"run as its own run, or keep both tensors with policy='full_state_dict_sorted'"
                    )
        td.names = {n: norm[n] for n in sel.sources}
    return sel, fmt


def load_metrics_arg(metrics, *, nonfinite: str = "warn"):
    """``(parsed metrics, source description)``; parsed before anything is written or run.

    ``nonfinite``: what explicit NaN/Inf values get (:mod:`sed_dask.sources.metrics`; "warn" by default).
    """
    if metrics is None:
        return None, None
    from sed_dask.sources.metrics import load_metrics, parse_metrics

    if isinstance(metrics, (str, os.PathLike)):
        return load_metrics(metrics, nonfinite=nonfinite), os.path.abspath(os.fspath(metrics))
    if isinstance(metrics, Mapping):
        metrics = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics.items()}
    return parse_metrics(metrics, where="metrics", nonfinite=nonfinite), "<in memory>"


def check_metric_steps(data: dict | None, source: str | None, steps) -> None:
    """Metrics whose steps match none of the run's checkpoint steps are an error (every value would
    be dropped by the exact-step alignment); the message names the file and both step ranges."""
    if data is None:
        return
    have = np.asarray(sorted({int(s) for s in steps}), dtype=np.int64)
    ms = np.asarray(data["step"], dtype=np.int64)
    if have.size and ms.size and not np.isin(ms, have).any():
        raise MetricsError(
            f"metrics {source}: none of its {ms.size} steps ({_span(ms)}) is a checkpoint step of "
            f"the run ({_span(have)}); metrics are aligned by exact step, so every value would "
            "be dropped. Check the step column (e.g. optimizer steps vs. samples)"
        )


def _span(a) -> str:
    a = np.asarray(a)
    return f"{int(a[0])}..{int(a[-1])}" if a.size > 1 else f"{int(a[0])}"


STEP_SOURCES = ("name", "file")


def check_recorded_step(td: CheckpointTodo, reader, step_source: str) -> None:
    """Warn when a checkpoint records another step than its name gives (``step_source="name"``)."""
    rec = reader.recorded_step() if hasattr(reader, "recorded_step") else None
    if rec is not None and int(rec) != int(td.step) and step_source == "name":
        warnings.warn(
            f"{td.path}: its name gives step {td.step} but the file records step {rec}; using {td.step} "
            "(step_source='name', the default; --step-source file uses the recorded step)",
            StepMismatchWarning,
            stacklevel=3,
        )


def steps_from_files(ckpts: Mapping[int, str]) -> dict[int, str]:
    """``{recorded step: path}`` (``step_source="file"``): every file must record its own step."""
    out: dict[int, str] = {}
    for name_step, path in ckpts.items():
        with open_checkpoint(path) as r:
            rec = r.recorded_step() if hasattr(r, "recorded_step") else None
        if rec is None:
            raise CheckpointError(
                f"{path} records no step of its own (step_source='file' needs a top-level "
                "'step'/'global_step'/'iteration' entry); use step_source='name'"
            )
        if int(rec) in out:
            raise CheckpointError(f"step {rec} is recorded by both {out[int(rec)]} and {path} (step_source='file')")
        out[int(rec)] = path
    return dict(sorted(out.items()))
