"""Hostile shared memory: aliases of the server's own objects, too many regions, a region shrunk then restored."""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

import kernel.shm_registry as registry_module
from kernel.errors import ServerError
from kernel.shm_registry import SharedMemoryRegistry
from shm.region import Region
from tests.support import ROOT, KernelServer


def _register_error(http, key: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        http.register_system_shared_memory("alias", key, 8)
    http.unregister_system_shared_memory("alias")
    return e.value


def _own_entries(server) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith((f"ek.{server.proc.pid}.",
                                                                     f"sem.ek.{server.proc.pid}.")))


def test_ring_semaphores_cannot_be_registered(http, server):
    """``shm_open("/sem.ek...")`` opens a ring's semaphore: writing an output there broke the front's futexes."""
    sems = [e for e in _own_entries(server) if e.startswith("sem.")]
    assert sems
    for entry in sems[:2]:
        error = _register_error(http, "/" + entry)
        assert (error.status(), error.message()) == ("400", f"Unable to open shared memory region: '/{entry}'")
    assert http.get_system_shared_memory_status() == []


def test_hard_links_to_server_objects_cannot_be_registered(http, server):
    """A name of the client's own choosing for one of the server's objects is refused all the same."""
    for entry in [e for e in _own_entries(server) if e.startswith("ek.")][:1] + \
            [e for e in _own_entries(server) if e.startswith("sem.")][:1]:
        link = f"/ek_test_link_{uuid.uuid4().hex[:8]}"
        os.link("/dev/shm/" + entry, "/dev/shm" + link)
        try:
            error = _register_error(http, link)
            assert (error.status(), error.message()) == ("400", f"Unable to open shared memory region: '{link}'")
        finally:
            os.unlink("/dev/shm" + link)
    assert http.get_system_shared_memory_status() == []


def test_registrations_are_bounded(monkeypatch):
    """Past the bound a registration is a clear 400, and unregistering makes room again."""
    monkeypatch.setattr(registry_module, "MAX_REGIONS", 8)
    region = Region(f"/ek_test_cap_{uuid.uuid4().hex[:8]}", 4096, create=True)  # a client's name
    registry = SharedMemoryRegistry()
    try:
        for i in range(8):
            registry.register(f"r{i}", region.name, 0, 64)
        with pytest.raises(ServerError) as e:
            registry.register("r8", region.name, 0, 64)
        assert e.value.http_status == 400
        assert "8 regions already" in e.value.message
        registry.unregister("r0")
        registry.register("r8", region.name, 0, 64)
    finally:
        registry.close()
        region.close()
        region.unlink()


def test_region_shrunk_before_first_use_then_restored(http, server):
    """A worker that first saw the object empty must not keep the empty mapping once it is restored."""
    key = f"/ek_test_{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 128, create_only=True)
    try:
        http.register_system_shared_memory("shrunk", key, 128)
        a = np.arange(16, dtype=np.int32)
        fd = os.open("/dev/shm" + key, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
            inputs = [httpclient.InferInput(n, [16], "INT32").set_shared_memory("shrunk", 64, offset=o)
                      for n, o in (("INPUT0", 0), ("INPUT1", 64))]
            with pytest.raises(InferenceServerException) as e:
                http.infer("add_sub", inputs)
            assert "smaller than the tensor" in e.value.message()
            os.ftruncate(fd, 128)
        finally:
            os.close(fd)
        shm.set_shared_memory_region(handle, [a, a])
        result = http.infer("add_sub", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    finally:
        http.unregister_system_shared_memory("shrunk")
        shm.destroy_shared_memory_region(handle)


def test_registrations_cost_the_front_no_descriptors(tmp_path):
    """Under systemd's default limit (1,024 open files, hard as well here), 1,100 registrations leave every
    request working: mappings keep no descriptor in the front (Python's mmap kept one each)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", repo / "add_sub")
    srv = KernelServer(repo)
    srv.args = ["sh", "-c", 'ulimit -n 1024 && exec "$@"', "sh", *srv.args]
    srv.start(tmp_path / "log")
    key = f"/ek_test_fds_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(key[1:], key, 4096, create_only=True)
    client = httpclient.InferenceServerClient(srv.http_url)
    try:
        before = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        for i in range(1100):
            client.register_system_shared_memory(f"fd{i}", key, 128)
        grown = len(os.listdir(f"/proc/{srv.proc.pid}/fd")) - before
        assert grown < 16, grown
        a = np.arange(16, dtype=np.int32)
        shm.set_shared_memory_region(handle, [a, a])
        inputs = [httpclient.InferInput(n, [16], "INT32").set_shared_memory("fd1099", 64, offset=o)
                  for n, o in (("INPUT0", 0), ("INPUT1", 64))]
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), 2 * a)
        inputs = [httpclient.InferInput(n, [16], "INT32") for n in ("INPUT0", "INPUT1")]
        for t in inputs:
            t.set_data_from_numpy(a)
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), 2 * a)
        client.unregister_system_shared_memory()
    finally:
        client.close()
        shm.destroy_shared_memory_region(handle)
        assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm()
