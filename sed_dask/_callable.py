"""Let ``sed_dask.<name>(...)`` call the function of the same name as its module.

``sed_dask.ingest``, ``sed_dask.sketch`` and ``sed_dask.directions`` are both public functions and
modules. Once ``import sed_dask.ingest`` runs, Python binds the package attribute to the module and
the lazy function lookup in ``sed_dask/__init__.py`` is bypassed; making the module callable keeps
``sed_dask.ingest(...)`` working either way.
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        name = self.__name__.rpartition(".")[2]
        return getattr(self, name)(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make ``sys.modules[module_name]`` forward calls to its function of the same short name."""
    sys.modules[module_name].__class__ = _CallableModule
