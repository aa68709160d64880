"""Package defaults through dask.config, as dask-jobqueue and dask-kubernetes do.

Defaults live in ``sed_dask.yaml`` and are merged with ``dask.config.update_defaults`` so that
user YAML in ``~/.config/dask/``, ``DASK_SED_DASK__...`` environment variables and
``dask.config.set`` all take precedence over them.
"""
from __future__ import annotations

import os

import dask.config
import yaml
from dask.utils import parse_bytes

_FN = os.path.join(os.path.dirname(__file__), "sed_dask.yaml")

with open(_FN) as _f:
    _DEFAULTS = yaml.safe_load(_f)

dask.config.update_defaults(_DEFAULTS)


def get(key: str, override=None):
    """``override`` if given, else ``dask.config.get("sed_dask." + key)``."""
    if override is not None:
        return override
    return dask.config.get("sed_dask." + key)


def get_bytes(key: str, override=None) -> int:
    """A byte-size setting ("4MiB" or an int) as an int."""
    value = get(key, override)
    return int(parse_bytes(value)) if isinstance(value, str) else int(value)
