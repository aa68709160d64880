"""Names, dims and CF-like attributes of the result Dataset (the contract is docs/result_schema.md).

Kept apart from the computation so that analysis and report code can import the vocabulary
(``VARIABLES``, ``sed_role`` values) without pulling in the engine.
"""

from __future__ import annotations

import datetime

PU = "parameter units"

# name -> (long_name, units, sed_role or None); units "PU" are replaced per dataset (step normalisation)
VARIABLES: dict[str, tuple[str, str, str | None]] = {
    "sigma": ("singular values of the W-delta update stack", PU, "singular_values"),
    "ratio": ("consecutive singular-value ratio sigma_k / sigma_(k+1)", "1", "consecutive_ratio"),
    "pc_frac": ("fraction of window energy lambda_j / sum(lambda)", "1", None),
    "k_star": ("edge location k*: argmax ratio sigma_k / sigma_(k+1) over sigma_k >= noise floor", "1", "signal_rank"),
    "n_signal": ("signal count: values above the noise by a sequential Wishart test (alpha 0.01)", "1", "signal_count"),
    "k_star_naive": ("k*: argmax of all consecutive ratios (reference code)", "1", None),
    "k_star_weighted": ("k*: argmax (sigma_k / sum sigma) * ratio_k (companion repos)", "1", None),
    "edge_ratio": ("spectral edge ratio sigma_k* / sigma_(k*+1)", "1", "edge_ratio"),
    "edge_gap": ("spectral edge gap sigma_k* - sigma_(k*+1)", PU, None),
    "k95": ("smallest k with cumulative energy fraction >= 0.95", "1", None),
    "drift_speed": ("norm of the window-mean delta", PU, "drift_speed"),
    "noise_floor": ("Marchenko-Pastur edge sigma_MP of the window", PU, "noise_floor"),
    "bbp_ratio": ("sigma_W / BBP detection threshold d_crit", "1", None),
    "gamma": ("|<v1(t), v1(t-1)>| between consecutive windows", "1", None),
    "kappa": ("1 - gamma (turning of the top direction)", "1", None),
    "align_u": ("|<delta_last, v1>| / ||delta_last||", "1", None),
    "a_speed": ("component of the window-mean delta along v1", PU, None),
    "r_speed": ("component of the window-mean delta across v1", PU, None),
    "split_half": (
        "|cos| between the k-th right singular vectors of the window's first ceil(W/2) and last floor(W/2) deltas",
        "1",
        "split_half_stability",
    ),
}

PER_SV = ("sigma", "ratio", "pc_frac", "split_half")

DELTA_NORM = ("norm of the delta labelled by the step, sqrt(band[i, 0])", PU, "delta_norm")


def var_attrs(name: str, *, normalised: bool) -> dict:
    long_name, units, role = DELTA_NORM if name == "delta_norm" else VARIABLES[name]
    if units == PU and normalised:
        units = "parameter units per training step"
    out = {"long_name": long_name, "units": units}
    if role:
        out["sed_role"] = role
    return out


def metric_variables(metrics: dict, runs: list, steps, taken) -> dict:
    """``{variable name: (("run", "step"), values, attrs)}`` of every metric of ``{run: metrics dict}``
    on the ``steps`` grid, by exact step match (NaN where not recorded); a metric whose name is
    ``taken`` by another variable is stored as ``metric_<name>``."""
    import numpy as np

    out = {}
    for name in sorted({k for m in metrics.values() for k in m if k != "step"}):
        arr = np.full((len(runs), len(steps)), np.nan)
        for r, run in enumerate(runs):
            m = metrics.get(run) or {}
            if name in m:
                ms, mv = np.asarray(m["step"], np.int64), np.asarray(m[name], np.float64)
                hit = np.isin(ms, steps)
                arr[r, np.searchsorted(steps, ms[hit])] = mv[hit]
        out[name if name not in taken else f"metric_{name}"] = (("run", "step"), arr, metric_attrs(name))
    return out


def metric_attrs(name: str) -> dict:
    return {
        "long_name": f"{name} recorded at the step (exact match)",
        "units": "1",
        "sed_role": "metric",
        "metric_name": name,
    }


COORD_ATTRS = {
    "run": {"long_name": "run name"},
    "seed": {"long_name": "training seed of the run (-1: not known)", "units": "1"},
    "window": {"long_name": "window length W (deltas per window)", "units": "1"},
    "step": {"long_name": "training step of the newest checkpoint in the window", "units": "steps"},
    "sv": {"long_name": "singular-value index j (or ratio index k)", "units": "1"},
    "group": {"long_name": "layer group ('all' = whole selected parameter vector)"},
    "delta_span": {
        "long_name": "s_i - s_(i-1) of the delta labelled by step (-1: run lacks the step)",
        "units": "steps",
    },
    "mp_adjacent_ratio": {"long_name": "MP noise-level adjacent ratio 1 + 2 W^(-2/3)", "units": "1"},
    "param_count": {"long_name": "parameters in the group", "units": "1"},
}


# ----------------------------------------------------------------------------- provenance
def utc_now() -> str:
    """The ``created`` stamp of results and stores: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance_attrs(fields: dict) -> dict:
    """A result's attrs: ``sed_dask_version``, then ``fields``, then ``created`` (docs/result_schema.md).

    Every results writer stamps its Dataset here, so the names and formats a reader relies on
    (the report's provenance table, ``open_results``' interrupted-write hint) are the same everywhere.
    """
    from sed_dask import __version__

    return {"sed_dask_version": __version__, **fields, "created": utc_now()}


def package_versions(names, *, missing: str | None = None) -> dict[str, str]:
    """``{package: installed version}`` read from metadata (nothing is imported).

    A package that is not installed is left out, or given the text ``missing`` when that is set.
    """
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            if missing is not None:
                out[name] = missing
    return out
