"""Contract check: the queries run on a Dataset built by the real engine (``spectra.build_dataset``)
from exact banded Grams, and agree with it where they overlap. Catches schema drift between the
engine and the analysis layer; no store, no Dask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import make_deltas

import sed_dask  # noqa: F401

spectra = pytest.importorskip("sed_dask.results.spectra")
gram = pytest.importorskip("sed_dask.engine.gram")


def _engine_dataset():
    rng = np.random.default_rng(0)
    grams = []
    width, N, P = 9, 30, 400
    for run in ("s1", "s2"):
        D = make_deltas(N, P, rng=rng)
        bands = []
        for cols in (slice(None), slice(0, 200), slice(200, None)):
            G = D[:, cols] @ D[:, cols].T
            i, k = np.arange(N)[:, None], np.arange(width)[None, :]
            bands.append(np.where(i - k >= 0, G[i, np.clip(i - k, 0, None)], np.nan))
        grams.append(
            gram.GramResult(
                run,
                np.stack(bands),
                ["all", "a", "b"],
                {"all": P, "a": 200, "b": 200},
                {},
                200 * np.arange(N + 1),
                width,
                "float64",
                {},
            )
        )
    steps = 200 * np.arange(1, N + 1)
    metrics = {
        r: {
            "step": steps,
            "val_loss": 3 - 0.02 * np.arange(N) + 0.05 * rng.standard_normal(N),
            "val_acc": np.linspace(0, 1, N),
            "lr": np.full(N, 1e-3),
        }
        for r in ("s1", "s2")
    }
    return spectra.build_dataset(
        grams, [4, 8], grouped=True, metrics=metrics, attrs={"n_params": json.dumps({"s1": P, "s2": P})}
    )


def test_queries_on_engine_output():
    try:
        ds = _engine_dataset()
    except TypeError as exc:  # the engine's internal constructor changed
        pytest.fail(f"spectra.build_dataset / GramResult signature changed: {exc}")
    null = ds.sed.edge_null(norms="equal", n_null=19)
    np.testing.assert_allclose(
        null.observed.transpose(*ds.edge_ratio.dims).values, ds.edge_ratio.values, rtol=1e-12
    )  # same k* rule as the engine
    assert (ds.sed.signal_rank(window=8).k_mode == 2).all()  # planted rank 2
    for name, kw in [
        ("phases", {}),
        ("collapse_step", {"tau": "auto"}),
        ("lag_sweep", {}),
        ("sliding_correlation", {}),
        ("phase_correlation", {}),
        ("granger", {"n_perm": 9}),
        ("detect_shift", {}),
        ("lead_time", {"k": 1.3, "floor": None}),
    ]:
        out = getattr(ds.sed, name)(**kw)
        assert out.sizes["run"] == 2 and out.sizes["group"] == 3 and out.sizes["window"] == 2, name
