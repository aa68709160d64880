"""Where the work runs: connecting to a Dask cluster, BLAS threads, deployment files.

``client``: :func:`connect` (an active Client, an address, a scheduler file, the ``sed_dask.cluster``
config section, or an in-process scheduler) and the worker plugin; ``blas``: one BLAS thread per task
thread; ``deploy``: SLURM / jobqueue / Kubernetes files from the ``sed_dask.deploy`` config section.
``connect`` and ``ZarrConfigPlugin`` are importable from here (``sed_dask.cluster.connect``) without
importing ``distributed`` until they are used.
"""

_EXPORTS = {
    "connect",
    "ZarrConfigPlugin",
    "PLUGIN_NAME",
    "probe_scheduler",
    "check_not_reimported",
    "ScriptReimportError",
}


def __getattr__(name):
    if name in _EXPORTS:
        from sed_dask.cluster import client

        return getattr(client, name)
    raise AttributeError(f"module 'sed_dask.cluster' has no attribute {name!r}")
