"""Shared graph construction for the store passes (Gram, sketch, directions).

Every pass is a plain task dict, as in ``dask.array.linalg``: tasks over (step block x P-range)
tiles whose partials are combined by a tree with a *fixed* operand order, so a result is
bit-identical on any scheduler and any number of workers. The block kernels live with each pass;
this module only holds what all of them share: their tuning settings, the reduction tree and how a
graph is run (a distributed client, or a local scheduler with BLAS pinned to one thread).
"""
from __future__ import annotations

import dataclasses

from sed_dask import config


@dataclasses.dataclass(frozen=True)
class PassSettings:
    """Tuning of one pass, from keywords or the ``sed_dask.spectrum`` config section."""

    tile_bytes: int      # float32 bytes of rows one task holds at once
    block_steps: int     # deltas per task along step
    split_every: int     # fan-in of the reduction tree


def pass_settings(*, tile_bytes=None, block_steps=None, split_every=None) -> PassSettings:
    """Resolve and validate the settings (unset ones from dask.config)."""
    tb = config.get_bytes("spectrum.tile-bytes", tile_bytes)
    bs = int(config.get("spectrum.block-steps", block_steps))
    se = int(config.get("spectrum.split-every", split_every))
    if tb < 1:
        raise ValueError(f"tile_bytes must be positive, got {tile_bytes!r}")
    if bs < 1:
        raise ValueError(f"block_steps must be >= 1, got {bs}")
    if se < 2:
        raise ValueError(f"split_every must be >= 2, got {se}")
    return PassSettings(int(tb), bs, se)


def tree_reduce(dsk: dict, keys: list, name: str, func, *args, split_every: int, prefix: tuple = ()):
    """Add tasks ``func(parts, *args)`` combining ``keys`` ``split_every`` at a time, in order, up to
    one root; return the root key (``keys[0]`` itself when there is only one).

    Keys are ``(name, *prefix, depth, index)``, so several trees (e.g. one per step block) can share
    a name. The grouping depends only on ``len(keys)`` and ``split_every``, never on timing.
    """
    level, depth = list(keys), 0
    while len(level) > 1:
        nxt = []
        for q in range(0, len(level), split_every):
            key = (name, *prefix, depth, q // split_every)
            dsk[key] = (func, level[q:q + split_every], *args)
            nxt.append(key)
        level, depth = nxt, depth + 1
    return level[0]


def compute_graph(dsk: dict, keys: list, *, client=None, scheduler: str | None = None, progress: bool = False,
                  desc: str = "sed_dask pass"):
    """Run a task dict on a distributed ``client`` or a local dask ``scheduler``; return results for ``keys``.

    ``progress`` draws a bar to 100 % and ends it with one line (:mod:`sed_dask.progress`).
    """
    if client is not None:
        futures = client.get(dsk, keys, sync=False)
        if progress:
            from distributed import futures_of

            from sed_dask.progress import distributed_bar

            distributed_bar(futures_of(futures), desc=desc)
        return client.gather(futures)
    import dask

    from sed_dask.progress import dask_local_bar

    get = {"threads": dask.threaded.get, "threading": dask.threaded.get,
           "sync": dask.get, "synchronous": dask.get, "single-threaded": dask.get}.get(scheduler)
    if get is None:
        raise ValueError(f"unknown local scheduler {scheduler!r} (use 'threads' or 'sync', or pass a client)")
    from sed_dask.cluster.blas import single_threaded_blas

    with single_threaded_blas(), dask_local_bar(len(dsk), desc=desc, enabled=progress):
        return get(dsk, keys)


def execute(dsk: dict, keys: list, *, client=None, scheduler: str | None = None, address: str | None = None,
            scheduler_file: str | None = None, progress: bool = False):
    """Run on a local ``scheduler`` when one is named (and no client), else on the cluster that
    ``sed_dask.cluster.connect`` gives for ``client``/``address``/``scheduler_file``."""
    if scheduler is not None and client is None:
        return compute_graph(dsk, keys, scheduler=scheduler, progress=progress)
    from sed_dask.cluster.client import connect

    with connect(client, address=address, scheduler_file=scheduler_file) as c:
        return compute_graph(dsk, keys, client=c, progress=progress)
