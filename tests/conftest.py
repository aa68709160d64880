"""Shared fixtures: real distributed clusters on loopback."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_cluster():
    """A real LocalCluster with two worker processes (one thread each), shared by the session."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="4GiB"
    ) as cluster:
        yield cluster


@pytest.fixture
def client(local_cluster):
    from distributed import Client

    with Client(local_cluster, set_as_default=False) as c:
        yield c
