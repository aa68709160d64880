"""``ds.sed.<name>`` has the signature of the analysis function it forwards to (minus ``ds``), so
``help()`` and IDEs show the real parameters, and the two cannot drift apart."""

import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from sed_dask.accessor import _FORWARD, SEDAccessor


@pytest.mark.parametrize("name", sorted(_FORWARD))
def test_method_signature_is_the_functions(name):
    mod, fn = _FORWARD[name].split(":")
    target = getattr(importlib.import_module(mod if mod.startswith("sed_dask.") else f"sed_dask.analysis.{mod}"), fn)
    want = list(inspect.signature(target).parameters.values())[1:]
    got = list(inspect.signature(getattr(SEDAccessor, name)).parameters.values())[1:]
    assert [(p.name, p.kind, p.default) for p in got] == [(p.name, p.kind, p.default) for p in want]
    assert getattr(SEDAccessor, name).__doc__.split("\n")[0] == inspect.getdoc(target).split("\n")[0]


def test_methods_forward_their_arguments():
    ds = xr.Dataset(
        {"edge_ratio": (("run", "window", "step"), np.arange(12.0).reshape(1, 2, 6))},
        coords={"run": ["a"], "window": [3, 5], "step": np.arange(6)},
    )
    xr.testing.assert_identical(ds.sed.var("edge_ratio"), ds["edge_ratio"])


def test_accessor_import_stays_light():
    code = (
        "import sys, sed_dask, inspect; inspect.signature(sed_dask.accessor.SEDAccessor.phases); "
        "assert 'sed_dask.analysis' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
