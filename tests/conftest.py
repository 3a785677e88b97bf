"""Fixtures: one server on the test repository for the whole session."""

from __future__ import annotations

import pytest

from tests.support import KernelServer, build_repository, shm_entries


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    before = shm_entries()
    srv = KernelServer(repository).start(tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    code = srv.stop()
    leftover = shm_entries() - before
    assert code == 0, srv.log()
    assert not leftover, f"shared memory left behind: {sorted(leftover)}"


@pytest.fixture
def http(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()
