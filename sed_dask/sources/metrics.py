"""Load training metrics (val_loss, lr, …) by step from the JSON/CSV shapes training scripts write.

Accepted shapes, all giving ``{"step": int64[m] ascending, name: float64[m], …}``:

* a list of records ``[{"step": 200, "val_loss": 3.1, …}, …]`` (the reference ``pilot_metrics.json``);
  records sharing a step are merged (train and eval logs), conflicting values are an error;
* a mapping by step ``{"200": {"val_loss": 3.1}, …}``;
* columns ``{"step": [...], "val_loss": [...]}``;
* a single wrapper key around a list of records (``{"metrics": [...]}``);
* CSV with a header row and a step column.

The step column may be called step, steps, global_step, iter, iteration or _step. Numbers and
booleans become float64 (None/empty -> NaN); text fields are ignored. A column name that cannot
be stored (``val/loss``, empty, hidden) is an error naming the file. Explicit NaN/Inf values:
``nonfinite``: "warn" (default: kept as they are, with a :class:`~sed_dask.errors.MetricsWarning`
naming the file, metric and steps), "raise" (a :class:`~sed_dask.errors.MetricsError`) or "ignore".
Missing entries (None, empty CSV cells, a metric absent from a record) are NaN without a word.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping

import numpy as np

from sed_dask.errors import MetricsError, MetricsWarning

NONFINITE = ("warn", "raise", "ignore")

STEP_KEYS = ("step", "steps", "global_step", "iter", "iteration", "_step")
_WRAPPERS = ("metrics", "history", "records", "log", "logs", "evals")


def _step_key(keys, where: str) -> str:
    for k in STEP_KEYS:
        if k in keys:
            return k
    raise MetricsError(f"{where}: no step field (looked for {', '.join(STEP_KEYS)}; found {sorted(keys)[:10]})")


def _as_step(v, where: str) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MetricsError(f"{where}: step {v!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise MetricsError(f"{where}: step {v!r} is not an integer")
    return int(f)


def _as_value(v):
    """float for numbers/bools/None, else None (the field is not a metric)."""
    if v is None:
        return math.nan
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None


def check_name(name, where: str) -> None:
    """A metric name must be usable as a variable and a Zarr array name (no '/', not empty or hidden)."""
    text = str(name)
    if (
        not text.strip()
        or "/" in text
        or "\\" in text
        or text.startswith(".")
        or text != text.strip()
        or any(ord(c) < 32 for c in text)
    ):
        raise MetricsError(
            f"{where}: metric column {text!r} cannot be stored (names must be non-empty, without "
            "'/', '\\', control characters, surrounding spaces or a leading '.'); rename it"
        )


def _report_nonfinite(bad: dict[str, list[int]], where: str, nonfinite: str) -> None:
    if not bad or nonfinite == "ignore":
        return
    what = "; ".join(f"{k!r} at step(s) {sorted(v)[:8]}{'...' if len(v) > 8 else ''}" for k, v in bad.items())
    if nonfinite == "raise":
        raise MetricsError(
            f"{where}: NaN/Inf metric values ({what}); fix the file, or pass "
            "metrics_nonfinite='warn' (--metrics-nonfinite warn) to keep them"
        )
    warnings.warn(
        f"{where}: NaN/Inf metric values kept as they are ({what}); analyses skip them "
        "(metrics_nonfinite='raise' / --metrics-nonfinite raise refuses such a file)",
        MetricsWarning,
        stacklevel=4,
    )


def _from_records(records, where: str, nonfinite: str = "warn") -> dict[str, np.ndarray]:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    by_step: dict[int, dict[str, float]] = {}
    names: dict[str, None] = {}
    bad: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise MetricsError(f"{where}: record {i} is not an object")
        sk = _step_key(rec.keys(), f"{where} record {i}")
        step = _as_step(rec[sk], f"{where} record {i}")
        cur = by_step.setdefault(step, {})
        for k, v in rec.items():
            if k == sk:
                continue
            val = _as_value(v)
            if val is None:
                continue
            if k not in names:
                check_name(k, where)
            if v is not None and not math.isfinite(val):
                bad.setdefault(k, []).append(step)
            old = cur.get(k)
            if old is not None and not math.isnan(old) and not math.isnan(val) and old != val:
                raise MetricsError(f"{where}: step {step} has two different values for {k!r} ({old} and {val})")
            if old is None or math.isnan(old):
                cur[k] = val
            names[k] = None
    if not by_step:
        raise MetricsError(f"{where}: no metric records")
    _report_nonfinite(bad, where, nonfinite)
    steps = np.array(sorted(by_step), dtype=np.int64)
    out = {"step": steps}
    for k in names:
        out[k] = np.array([by_step[s].get(k, math.nan) for s in steps], dtype=np.float64)
    return out


def parse_metrics(obj, *, where: str = "metrics", nonfinite: str = "warn") -> dict[str, np.ndarray]:
    """Metrics from an already-parsed JSON-like object (see module docstring for the shapes)."""
    if isinstance(obj, list):
        return _from_records(obj, where, nonfinite)
    if not isinstance(obj, Mapping) or not obj:
        raise MetricsError(f"{where}: expected a list of records or an object, got {type(obj).__name__}")
    keys = list(obj)
    step_cols = [k for k in STEP_KEYS if k in obj and isinstance(obj[k], (list, tuple))]
    if step_cols:
        sk = step_cols[0]
        n = len(obj[sk])
        records = [{sk: obj[sk][i]} for i in range(n)]
        for k, col in obj.items():
            if k == sk or not isinstance(col, (list, tuple)):
                continue
            if len(col) != n:
                raise MetricsError(f"{where}: column {k!r} has {len(col)} values for {n} steps")
            for i, v in enumerate(col):
                records[i][k] = v
        return _from_records(records, where, nonfinite)
    try:
        steps = [_as_step(k, where) for k in keys]
    except MetricsError:
        steps = None
    if steps is not None:
        if not all(isinstance(v, Mapping) for v in obj.values()):
            raise MetricsError(
                f"{where}: a mapping from step to a bare number has no metric name; "
                'use {step: {"val_loss": x}} or a list of records'
            )
        return _from_records([{"step": s, **v} for s, v in zip(steps, obj.values())], where, nonfinite)
    lists = {k: v for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v)}
    for w in _WRAPPERS:
        if w in lists:
            return _from_records(lists[w], f"{where}[{w!r}]", nonfinite)
    if len(lists) == 1:
        ((k, v),) = lists.items()
        return _from_records(v, f"{where}[{k!r}]", nonfinite)
    raise MetricsError(
        f"{where}: unrecognised metrics layout (top-level keys {keys[:10]}); expected records, "
        '{step: {...}} or {"step": [...], name: [...]}'
    )


def _load_csv(path: str, nonfinite: str = "warn") -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MetricsError(f"{path}: empty CSV")
    sk = _step_key(rows[0].keys(), path)
    numeric = []
    for k in rows[0]:
        if k == sk or k is None:
            continue
        try:
            [float(r[k]) for r in rows if r.get(k) not in (None, "")]
            numeric.append(k)
        except ValueError:
            continue
    records = [{sk: r[sk], **{k: (float(r[k]) if r.get(k) not in (None, "") else None) for k in numeric}} for r in rows]
    return _from_records(records, path, nonfinite)


def load_metrics(path, *, nonfinite: str = "warn") -> dict[str, np.ndarray]:
    """``{"step": int64 ascending, name: float64, …}`` from a JSON or CSV metrics file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsError(f"metrics file {path} does not exist")
    if path.lower().endswith((".csv", ".tsv")):
        return _load_csv(path, nonfinite)
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as exc:
        if path.lower().endswith(".json"):
            raise MetricsError(f"{path}: not valid JSON: {exc}") from exc
        return _load_csv(path, nonfinite)
    return parse_metrics(obj, where=path, nonfinite=nonfinite)
