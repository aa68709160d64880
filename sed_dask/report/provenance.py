"""Where a report's numbers come from: the data, the settings, the software and the command.

A report outlives the session that made it, so nothing here is a link to something transient (a
dashboard, a temporary folder): paths are given as text, marked when they no longer exist.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys

import xarray as xr

from sed_dask.schema import package_versions as installed_versions
from sed_dask.schema import utc_now

PACKAGES = (
    "sed_dask",
    "numpy",
    "scipy",
    "dask",
    "distributed",
    "zarr",
    "xarray",
    "pandas",
    "matplotlib",
    "torch",
    "safetensors",
)


def package_versions() -> dict[str, str]:
    """Python, platform and the installed versions of the packages the results depend on."""
    out = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    return out | installed_versions(PACKAGES, missing="not installed")


def _path_note(path: str) -> str:
    """The path as text, marked when a local one no longer exists (a report must not point at nothing)."""
    local = path[len("file://") :] if path.startswith("file://") else path
    if not local or "://" in local or ";" in local:
        return path
    return path if os.path.exists(local) else f"{path} (no longer there)"


def _runs(ds: xr.Dataset) -> str:
    runs = [str(r) for r in ds["run"].values]
    if "seed" not in ds.coords:
        return ", ".join(runs)
    seeds = [int(s) for s in ds["seed"].values]
    return ", ".join(f"{r} (seed {s})" if s >= 0 else f"{r} (seed unknown)" for r, s in zip(runs, seeds))


def provenance(ds: xr.Dataset, *, command: str | None = None, settings: dict | None = None) -> list[tuple[str, str]]:
    """``(what, value)`` rows: the results' source and size, the analysis settings, versions, command."""
    a = ds.attrs
    steps = ds["step"].values
    rows = [
        ("data", _path_note(str(a.get("source_store", "")))),
        ("runs", _runs(ds)),
        ("steps", f"{int(steps.min()):,} … {int(steps.max()):,} ({steps.size} update steps)" if steps.size else "none"),
        ("windows W", ", ".join(str(int(w)) for w in ds["window"].values)),
    ]
    if a.get("n_params"):
        try:
            n = json.loads(a["n_params"])
            rows.append(("parameters per run", ", ".join(f"{k}: {int(v):,}" for k, v in n.items())))
        except (TypeError, ValueError):
            rows.append(("parameters per run", str(a["n_params"])))
    if a.get("selection_policy"):
        try:
            pol = {json.dumps(v, sort_keys=True) for v in json.loads(a["selection_policy"]).values()}
            rows.append(("parameter selection", "; ".join(sorted(pol))))
        except (TypeError, ValueError):
            pass
    for key, label in (
        ("precision", "Gram precision"),
        ("spectra_source", "spectra from"),
        ("sed_dask_version", "results written by sed_dask"),
        ("created", "results written at"),
    ):
        if a.get(key) is not None:
            rows.append((label, str(a[key])))
    for k, v in (settings or {}).items():
        rows.append((k, str(v)))
    versions = package_versions()
    rows.append(("software", ", ".join(f"{k} {v}" for k, v in versions.items())))
    rows.append(("command", command or "make_report() from Python"))
    rows.append(("report written at", utc_now()))
    return rows


def invocation() -> str | None:
    """The ``sed-dask …`` command line of this process, or None when it is not the sed-dask CLI."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if argv and (os.path.basename(argv[0]) == "sed-dask" or getattr(spec, "name", "").startswith("sed_dask")):
        return " ".join(["sed-dask"] + [shlex.quote(a) for a in argv[1:]])
    return None
