"""Fixtures: one server on the test repository for the whole session."""

from __future__ import annotations

import os

import pytest

from tests.support import KernelServer, build_repository


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    srv = KernelServer(repository).start(tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()
    assert not srv.owned_shm(), f"shared memory left behind: {sorted(srv.owned_shm())}"


@pytest.fixture
def http(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


# GPU tests (tests/device) run on a machine with an NVIDIA GPU and CUDA torch, with
# EDGE_KERNEL_DEVICE_TESTS=1 (bench/device_run.sh does); elsewhere they are not collected.
collect_ignore = [] if os.environ.get("EDGE_KERNEL_DEVICE_TESTS") else ["device"]
