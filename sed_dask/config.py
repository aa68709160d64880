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

from sed_dask.errors import SEDError


class ConfigError(SEDError, ValueError):
    """A sed_dask setting or config file is invalid (the message names the key or file)."""


_FN = os.path.join(os.path.dirname(__file__), "sed_dask.yaml")

with open(_FN) as _f:
    _DEFAULTS = yaml.safe_load(_f)

dask.config.update_defaults(_DEFAULTS)


def package_defaults(section: str) -> dict:
    """A copy of the package's own defaults for ``sed_dask.<section>`` (before any user config)."""
    import copy

    return copy.deepcopy(_DEFAULTS["sed_dask"][section])


def get(key: str, override=None):
    """``override`` if given, else ``dask.config.get("sed_dask." + key)``."""
    if override is not None:
        return override
    return dask.config.get("sed_dask." + key)


def get_bytes(key: str, override=None) -> int:
    """A byte-size setting ("4MiB" or an int) as an int."""
    value = get(key, override)
    return int(parse_bytes(value)) if isinstance(value, str) else int(value)


# ----------------------------------------------------------------------------- zarr on workers
def zarr_settings() -> dict:
    """The zarr I/O settings from ``sed_dask.store`` config, resolved in *this* process.

    Resolve on the client and ship the dict to tasks (or use ``ZarrConfigPlugin``) so that a
    client-side ``dask.config.set`` reaches remote workers, whose own config may differ.
    """
    return {
        "async_concurrency": get("store.zarr-async-concurrency"),
        "threading_max_workers": get("store.zarr-threading-max-workers"),
    }


def configure_zarr(*, async_concurrency=None, threading_max_workers=None) -> dict:
    """Apply ``zarr.config`` I/O concurrency in this process; return what is now in effect.

    Total I/O concurrency on a worker is about dask threads x ``async.concurrency`` (zarr's
    performance guide suggests 4-8 under many threads, not zarr's default 10). Idempotent and
    cheap, so task functions may call it first thing; ``sed_dask.cluster.connect`` also applies it
    on every worker through ``ZarrConfigPlugin``. ``None`` means the value from ``zarr_settings()``.
    ``threading.max_workers`` only takes effect before zarr's thread pool is first used.
    """
    import zarr

    want = zarr_settings()
    if async_concurrency is not None:
        want["async_concurrency"] = async_concurrency
    if threading_max_workers is not None:
        want["threading_max_workers"] = threading_max_workers
    new = {}
    if want["async_concurrency"] is not None:
        v = int(want["async_concurrency"])
        if v < 1:
            raise ConfigError(f"zarr async concurrency must be >= 1, got {v}")
        if zarr.config.get("async.concurrency") != v:
            new["async.concurrency"] = v
    if want["threading_max_workers"] is not None:
        v = int(want["threading_max_workers"])
        if zarr.config.get("threading.max_workers", None) != v:
            new["threading.max_workers"] = v
    if new:
        zarr.config.set(new)
    return {
        "async_concurrency": zarr.config.get("async.concurrency"),
        "threading_max_workers": zarr.config.get("threading.max_workers", None),
    }


# ----------------------------------------------------------------------------- config files
def load_config_file(path) -> dict:
    """The ``sed_dask`` section of a YAML file (a top-level ``sed_dask:`` key is optional).

    The same file can thus be passed to ``--config`` or dropped into ``~/.config/dask/`` (the
    latter needs the ``sed_dask:`` key).
    """
    import pathlib

    p = pathlib.Path(os.path.expanduser(str(path)))
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    if "sed_dask" in data:
        extra = sorted(set(data) - {"sed_dask"})
        if extra:
            raise ConfigError(
                f"config file {str(path)!r}: unexpected top-level keys {extra} next to "
                "'sed_dask' (put dask settings in ~/.config/dask/ instead)"
            )
        data = data["sed_dask"] or {}
    unknown = sorted(set(data) - set(_DEFAULTS["sed_dask"]))
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r}: unknown sed_dask sections {unknown}; known: {sorted(_DEFAULTS['sed_dask'])}"
        )
    return data


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v and key != "sed_dask.cluster":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def use_config(section: dict):
    """``dask.config.set`` for a ``sed_dask`` section dict, applied now; use as a context manager.

    Settings are merged key by key, except ``cluster``, which is replaced as a whole so that
    kwargs of another cluster class (e.g. from ``~/.config/dask``) never leak into it.
    """
    return dask.config.set(_flatten(section, "sed_dask"))
