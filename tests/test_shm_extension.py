"""Triton's system shared memory extension, through the official tritonclient (docs/triton-behaviour.md §8).

Clients own POSIX shm regions, register them once, and requests carry only (region, offset, size):
inputs are read in place by the worker, outputs are written straight into the client's region.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

# -- helpers -----------------------------------------------------------------------------------------------


class ClientRegions:
    """The regions one test creates and registers; all unregistered and destroyed at teardown."""

    def __init__(self, http: httpclient.InferenceServerClient) -> None:
        self.http = http
        self.handles: dict[str, Any] = {}  # key -> handle
        self.names: set[str] = set()

    def create(self, size: int) -> tuple[Any, str]:
        """A fresh POSIX shm object of ``size`` bytes, zeroed: (handle, key)."""
        key = f"/ek_test_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, size, create_only=True)
        self.handles[key] = handle
        return handle, key

    def destroy(self, key: str) -> None:
        shm.destroy_shared_memory_region(self.handles.pop(key))

    def register(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        self.names.add(name)
        self.http.register_system_shared_memory(name, key, byte_size, offset)

    def close(self) -> None:
        for name in self.names:
            self.http.unregister_system_shared_memory(name)
        for key in list(self.handles):
            self.destroy(key)
        left = {r["name"] for r in self.http.get_system_shared_memory_status()} & self.names
        assert not left, f"regions still registered: {left}"


@pytest.fixture
def regions(http) -> Iterator[ClientRegions]:
    client_regions = ClientRegions(http)
    yield client_regions
    keys = list(client_regions.handles)
    client_regions.close()
    assert not [k for k in keys if os.path.exists("/dev/shm" + k)]


def request_raw(server, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str, bytes]:
    """A hand-made request, for cases tritonclient cannot produce: (status, content type, body)."""
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers or {},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def raw_infer(server, model: str, doc: dict) -> tuple[int, str, Any]:
    status, content_type, body = request_raw(server, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode())
    return status, content_type, json.loads(body)


def expect_http_error(call, status: str, message: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert (e.value.status(), e.value.message()) == (status, message)


def int32_input(name: str, shape: list[int]) -> httpclient.InferInput:
    return httpclient.InferInput(name, shape, "INT32")


def assert_serving(http) -> None:
    """add_sub still answers correctly over plain binary HTTP."""
    a = np.arange(16, dtype=np.int32)
    inputs = [int32_input("INPUT0", [16]), int32_input("INPUT1", [16])]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    np.testing.assert_array_equal(http.infer("add_sub", inputs).as_numpy("OUTPUT0"), 2 * a)


def server_mappings(server, key: str, front: bool = True) -> list[int]:
    """The server processes (the front unless ``front`` is False, and the workers) that map the object ``key``."""
    path = "/dev/shm" + key
    found = []
    for pid in ([server.proc.pid] if front else []) + server.worker_pids():
        try:
            with open(f"/proc/{pid}/maps") as maps:
                names = [line.split(maxsplit=5)[5].rstrip("\n") for line in maps if len(line.split(maxsplit=5)) > 5]
        except FileNotFoundError:
            continue  # a worker that has exited
        if any(name == path or name == path + " (deleted)" for name in names):
            found.append(pid)
    return found


# -- register, status, unregister -------------------------------------------------------------------------
def test_register_status_unregister(http, server, regions):
    _, key_in = regions.create(128)
    _, key_out = regions.create(256)
    regions.register("shm_in", key_in, 128)
    regions.register("shm_out", key_out[1:], 128, offset=64)  # shm_open tolerates a key without the slash
    everything = http.get_system_shared_memory_status()
    mine = [r for r in everything if r["name"] in ("shm_in", "shm_out")]
    assert mine == [{"name": "shm_in", "key": key_in, "offset": 0, "byte_size": 128},
                    {"name": "shm_out", "key": key_out[1:], "offset": 64, "byte_size": 128}]
    assert [r["name"] for r in everything] == sorted(r["name"] for r in everything)
    assert http.get_system_shared_memory_status("shm_in") == [mine[0]]

    status, content_type, body = request_raw(server, "GET", "/v2/systemsharedmemory/region/shm_in/status")
    assert (status, content_type) == (200, "application/json")
    assert body == json.dumps([mine[0]], separators=(",", ":")).encode()
    status, content_type, body = request_raw(server, "GET", "/v2/systemsharedmemory/region/nope/status")
    assert (status, content_type, json.loads(body)) == (
        404, "application/json", {"error": "Unable to find system shared memory region: 'nope'"})
    expect_http_error(lambda: http.get_system_shared_memory_status("nope"), "404",
                      "Unable to find system shared memory region: 'nope'")

    status, content_type, body = request_raw(server, "POST", "/v2/systemsharedmemory/region/shm_in/unregister")
    assert (status, content_type, body) == (200, "application/json", b"")
    assert [r["name"] for r in http.get_system_shared_memory_status()].count("shm_in") == 0
    http.unregister_system_shared_memory("shm_in")  # already gone: still 200, like Triton
    http.unregister_system_shared_memory("never_registered")
    http.unregister_system_shared_memory()  # all
    assert http.get_system_shared_memory_status() == []
    status, _, body = request_raw(server, "GET", "/v2/systemsharedmemory/status")
    assert (status, body) == (200, b"[]")


def test_register_reply_is_empty_json(server, regions):
    _, key = regions.create(128)
    regions.names.add("raw_reg")
    status, content_type, body = request_raw(server, "POST", "/v2/systemsharedmemory/region/raw_reg/register",
                                             json.dumps({"key": key, "byte_size": 128}).encode())  # no offset: 0
    assert (status, content_type, body) == (200, "application/json", b"")


def test_register_errors(http, server, regions):
    _, key = regions.create(128)
    regions.register("dup", key, 128)
    expect_http_error(lambda: regions.register("dup", key, 64), "400", "shared memory region 'dup' already in manager")
    missing = f"/ek_test_missing_{uuid.uuid4().hex[:8]}"
    expect_http_error(lambda: regions.register("r1", missing, 64), "400",
                      f"Unable to open shared memory region: '{missing}'")
    for size, offset in ((129, 0), (128, 1), (64, 65), (1, 128), (1, 4096)):
        expect_http_error(lambda s=size, o=offset: regions.register("r2", key, s, o), "400",
                          "failed to register shared memory region 'r2': invalid args")
    expect_http_error(lambda: regions.register("r3", key, 0), "400",
                      "failed to register shared memory region 'r3': unable to process address spaceInvalid argument")
    assert {r["name"] for r in http.get_system_shared_memory_status()} & {"r1", "r2", "r3"} == set()

    def post(doc: Any) -> tuple[int, Any]:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        status, content_type, reply = request_raw(server, "POST", "/v2/systemsharedmemory/region/r4/register", body)
        assert content_type == "application/json"
        return status, json.loads(reply)["error"]

    regions.names.add("r4")
    assert post({"byte_size": 64}) == (400, "Shared memory register request has no 'key' field")
    assert post({"key": key}) == (400, "Shared memory register request has no 'byte_size' field")
    assert post({"key": key, "offset": -1, "byte_size": 64}) == (
        400, "attempt to access JSON non-unsigned-integer as unsigned-integer")
    assert post({"key": key, "offset": "0", "byte_size": 64}) == (
        400, "attempt to access JSON non-unsigned-integer as unsigned-integer")
    assert post({"key": 5, "byte_size": 64}) == (400, "attempt to access JSON non-string as string")
    status, message = post(b"{not json")
    assert status == 400 and message.startswith("failed to parse the request JSON buffer")
    assert_serving(http)


@pytest.mark.parametrize("key", ["/etc/passwd", "/../../etc/passwd", "../../etc/passwd", "/dev/shm/x", "/a/b",
                                 "/..", "/.", "", "/", "ek_test/../../etc/hostname"])
def test_keys_are_shm_names_never_paths(http, regions, key):
    expect_http_error(lambda: regions.register("path_key", key, 8), "400",
                      f"Unable to open shared memory region: '{key}'")
    assert http.get_system_shared_memory_status() == []


def test_server_objects_cannot_be_registered(http, server, regions):
    """The server's own arenas and message rings are not client regions (they would expose other requests)."""
    own = sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"ek.{server.proc.pid}."))
    assert own
    for entry in own[:3]:
        expect_http_error(lambda e=entry: regions.register("own", "/" + e, 8), "400",
                          f"Unable to open shared memory region: '/{entry}'")


def test_registration_offsets_need_no_page_alignment(http, regions):
    """Triton mmaps the registered span, so it refuses offsets that are not page multiples; we map the whole
    object and accept any offset inside it."""
    handle, key = regions.create(256)
    a = np.arange(16, dtype=np.int32)
    shm.set_shared_memory_region(handle, [a, a], offset=100)
    regions.register("odd", key, 128, offset=100)
    inputs = [int32_input("INPUT0", [16]).set_shared_memory("odd", 64),
              int32_input("INPUT1", [16]).set_shared_memory("odd", 64, offset=64)]
    np.testing.assert_array_equal(http.infer("add_sub", inputs).as_numpy("OUTPUT0"), 2 * a)


# -- inference ---------------------------------------------------------------------------------------------
def test_inputs_and_outputs_in_regions(http, server, regions):
    """Several tensors in one region, offsets other than 0, two registrations on one object."""
    handle, key = regions.create(4096 + 256)
    rng = np.random.default_rng(3)
    a = rng.integers(-1000, 1000, 16, dtype=np.int32)
    b = rng.integers(-1000, 1000, 16, dtype=np.int32)
    shm.set_shared_memory_region(handle, [a, b])
    regions.register("io_in", key, 128)
    regions.register("io_out", key, 256, offset=4096)
    inputs = [int32_input("INPUT0", [16]).set_shared_memory("io_in", 64),
              int32_input("INPUT1", [16]).set_shared_memory("io_in", 64, offset=64)]
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("io_out", 64, offset=64)
    outputs[1].set_shared_memory("io_out", 96, offset=160)
    result = http.infer("add_sub", inputs, outputs=outputs)
    assert result.get_response() == {
        "model_name": "add_sub", "model_version": "1",
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [16]},
                    {"name": "OUTPUT1", "datatype": "INT32", "shape": [16]}]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=4096 + 64), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=4096 + 160), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [8], offset=4096 + 224),
                                  np.zeros(8, np.int32))  # nothing written past OUTPUT1

    # The exact wire answer: JSON, no data, no parameters.
    doc = {"inputs": [{"name": n, "shape": [16], "datatype": "INT32",
                       "parameters": {"shared_memory_region": "io_in", "shared_memory_offset": o,
                                      "shared_memory_byte_size": 64}} for n, o in (("INPUT0", 0), ("INPUT1", 64))],
           "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "io_out",
                                                          "shared_memory_byte_size": 64}}]}
    status, content_type, body = request_raw(server, "POST", "/v2/models/add_sub/infer", json.dumps(doc).encode())
    assert (status, content_type) == (200, "application/json")
    assert body == (b'{"model_name":"add_sub","model_version":"1","outputs":'
                    b'[{"name":"OUTPUT0","datatype":"INT32","shape":[16]}]}')
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=4096), a + b)


def test_shm_inputs_without_requested_outputs(http, regions):
    handle, key = regions.create(128)
    a = np.arange(16, dtype=np.int32)
    shm.set_shared_memory_region(handle, [a, a * 3])
    regions.register("json_out", key, 128)
    inputs = [int32_input("INPUT0", [16]).set_shared_memory("json_out", 64),
              int32_input("INPUT1", [16]).set_shared_memory("json_out", 64, offset=64)]
    result = http.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 4 * a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), -2 * a)


@pytest.mark.parametrize("body_binary", [True, False], ids=["binary", "json"])
def test_mixed_shm_and_body_tensors(http, regions, body_binary):
    handle, key = regions.create(256)
    a = np.arange(16, dtype=np.int32) * 7
    b = np.arange(16, dtype=np.int32) - 5
    shm.set_shared_memory_region(handle, [a], offset=32)
    regions.register("mixed", key, 256)
    in0 = int32_input("INPUT0", [16]).set_shared_memory("mixed", 64, offset=32)
    in1 = int32_input("INPUT1", [16])
    in1.set_data_from_numpy(b, binary_data=body_binary)
    out0 = httpclient.InferRequestedOutput("OUTPUT0", binary_data=body_binary)
    out1 = httpclient.InferRequestedOutput("OUTPUT1", binary_data=body_binary)
    out1.set_shared_memory("mixed", 64, offset=128)
    result = http.infer("add_sub", [in0, in1], outputs=[out0, out1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    assert result.get_output("OUTPUT1") == {"name": "OUTPUT1", "datatype": "INT32", "shape": [16]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=128), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=32), a)  # untouched


def test_many_concurrent_requests_share_one_region(server, regions):
    """64 requests in flight at once, each with its own slice of one input region and one output region."""
    n = 64
    handle, key = regions.create(n * 128 + n * 128)
    rng = np.random.default_rng(11)
    pairs = [(rng.integers(0, 100, 16, dtype=np.int32), rng.integers(0, 100, 16, dtype=np.int32)) for _ in range(n)]
    shm.set_shared_memory_region(handle, [x for pair in pairs for x in pair])
    regions.register("many_in", key, n * 128)
    regions.register("many_out", key, n * 128, offset=n * 128)
    client = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    try:
        handles = []
        for i in range(n):
            inputs = [int32_input("INPUT0", [16]).set_shared_memory("many_in", 64, offset=i * 128),
                      int32_input("INPUT1", [16]).set_shared_memory("many_in", 64, offset=i * 128 + 64)]
            outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
            outputs[0].set_shared_memory("many_out", 64, offset=i * 128)
            outputs[1].set_shared_memory("many_out", 64, offset=i * 128 + 64)
            handles.append(client.async_infer("add_sub", inputs, outputs=outputs))
        for h in handles:
            h.get_result()
    finally:
        client.close()
    base = n * 128
    for i, (a, b) in enumerate(pairs):
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=base + i * 128), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=base + i * 128 + 64),
                                      a - b)


def test_output_region_too_small(http, server, regions):
    handle, key = regions.create(256)
    a = np.arange(16, dtype=np.int32)
    shm.set_shared_memory_region(handle, [a, a])
    regions.register("small_in", key, 128)
    regions.register("small_out", key, 128, offset=128)
    inputs = [int32_input("INPUT0", [16]).set_shared_memory("small_in", 64),
              int32_input("INPUT1", [16]).set_shared_memory("small_in", 64, offset=64)]
    out = httpclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("small_out", 32)
    message = ("shared memory size specified with the request for output 'OUTPUT0' (32 bytes) should be at least "
               "64 bytes to hold the results")
    expect_http_error(lambda: http.infer("add_sub", inputs, outputs=[out]), "400", message)  # Triton: 500
    doc = {"inputs": [{"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": list(range(16))},
                      {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": list(range(16))}],
           "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "small_out",
                                                          "shared_memory_byte_size": 32}}]}
    assert raw_infer(server, "add_sub", doc) == (400, "text/plain", {"error": message})
    assert_serving(http)


def test_inference_errors(http, server, regions):
    handle, key = regions.create(256)
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.int32)] * 2)
    regions.register("err_in", key, 128)
    regions.register("err_out", key, 128, offset=128)

    def add_sub(in0: tuple, in1: tuple = ("err_in", 64, 64), out: tuple | None = None) -> None:
        inputs = [int32_input("INPUT0", [16]).set_shared_memory(*in0),
                  int32_input("INPUT1", [16]).set_shared_memory(*in1)]
        outputs = None
        if out is not None:
            outputs = [httpclient.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory(*out)
        http.infer("add_sub", inputs, outputs=outputs)

    not_found = "Unable to find shared memory region: 'nope'"
    expect_http_error(lambda: add_sub(("nope", 64)), "404", not_found)
    expect_http_error(lambda: add_sub(("err_in", 64), out=("nope", 64)), "404", not_found)
    bounds_in = "Invalid offset + byte size for shared memory region: 'err_in'"
    expect_http_error(lambda: add_sub(("err_in", 64, 100)), "400", bounds_in)
    expect_http_error(lambda: add_sub(("err_in", 64, 200)), "400", bounds_in)
    expect_http_error(lambda: add_sub(("err_in", 129)), "400", bounds_in)
    expect_http_error(lambda: add_sub(("err_in", 64), out=("err_out", 64, 100)), "400",
                      "Invalid offset + byte size for shared memory region: 'err_out'")
    for size in (60, 128):
        expect_http_error(lambda s=size: add_sub(("err_in", s)), "400",
                          "[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' for model "
                          f"'add_sub'. Expected 64, got {size}")

    def doc(in0_params: dict, data: bool = False, out_params: dict | None = None) -> dict:
        first: dict = {"name": "INPUT0", "shape": [16], "datatype": "INT32", "parameters": in0_params}
        if data:
            first["data"] = list(range(16))
        d: dict = {"inputs": [first, {"name": "INPUT1", "shape": [16], "datatype": "INT32",
                                      "data": list(range(16))}]}
        if out_params is not None:
            d["outputs"] = [{"name": "OUTPUT0", "parameters": out_params}]
        return d

    json_ct = "application/json"
    assert raw_infer(server, "add_sub", doc({"shared_memory_region": "err_in"})) == (400, json_ct, {"error": bounds_in})
    assert raw_infer(server, "add_sub", doc({"shared_memory_region": "err_in", "shared_memory_byte_size": 64},
                                            out_params={"shared_memory_region": "err_out"})) == (
        400, json_ct, {"error": "Invalid offset + byte size for shared memory region: 'err_out'"})
    assert raw_infer(server, "add_sub", doc({"shared_memory_region": "nope", "shared_memory_byte_size": 64})) == (
        404, json_ct, {"error": not_found})
    assert raw_infer(server, "add_sub", doc({"shared_memory_region": "err_in", "shared_memory_byte_size": 64},
                                            data=True)) == (
        400, json_ct, {"error": "Input must set only one of the following fields: 'data', 'binary_data_size' in "
                                "'parameters', 'shared_memory_region' in 'parameters'. But set 'data' "
                                "'shared_memory_region'"})
    for field, value in (("shared_memory_offset", "8"), ("shared_memory_offset", -8),
                         ("shared_memory_byte_size", 64.0)):
        params = {"shared_memory_region": "err_in", "shared_memory_byte_size": 64, field: value}
        assert raw_infer(server, "add_sub", doc(params)) == (
            400, json_ct, {"error": f"Unable to parse '{field}': attempt to access JSON non-unsigned-integer as "
                                    "unsigned-integer"})
    assert raw_infer(server, "add_sub", doc({"shared_memory_region": 5, "shared_memory_byte_size": 64})) == (
        400, json_ct, {"error": "Unable to parse 'shared_memory_region': attempt to access JSON non-string as string"})
    assert_serving(http)


def test_bytes_tensors_in_regions(http, regions):
    """BYTES in shared memory use Triton's serialisation: a 4-byte little-endian length before each element."""
    text = np.array([b"edge", b"", "kernel-é".encode()], dtype=np.object_)
    serialized = serialize_byte_tensor(text)
    size = len(serialized.item())
    assert size == 4 * 3 + 4 + 0 + len("kernel-é".encode())
    handle, key = regions.create(512)
    shm.set_shared_memory_region(handle, [serialized], offset=16)
    regions.register("text", key, 512)
    t = httpclient.InferInput("TEXT", [3], "BYTES").set_shared_memory("text", size, offset=16)
    upper = httpclient.InferRequestedOutput("UPPER")
    upper.set_shared_memory("text", 256, offset=256)
    result = http.infer("upper", [t], outputs=[upper, httpclient.InferRequestedOutput("LENGTH")])
    assert result.get_output("UPPER") == {"name": "UPPER", "datatype": "BYTES", "shape": [3]}
    np.testing.assert_array_equal(result.as_numpy("LENGTH"), [4, 0, len("kernel-é".encode())])
    got = shm.get_contents_as_numpy(handle, np.object_, [3], offset=256)
    assert list(got) == [b"EDGE", b"", "KERNEL-é".encode()]
    raw = bytes(shm.get_contents_as_numpy(handle, np.uint8, [size], offset=256))
    assert raw == serialize_byte_tensor(np.array([b"EDGE", b"", "KERNEL-é".encode()], dtype=np.object_)).item()

    # Element count from the serialised data, as Triton counts it.
    t4 = httpclient.InferInput("TEXT", [4], "BYTES").set_shared_memory("text", size, offset=16)
    expect_http_error(lambda: http.infer("upper", [t4]), "400",
                      "[request id: <id_unknown>] expected 4 string elements for inference input 'TEXT' for model "
                      "'upper', got 3")
    small = httpclient.InferRequestedOutput("UPPER")
    small.set_shared_memory("text", 8, offset=256)
    expect_http_error(lambda: http.infer("upper", [t], outputs=[small]), "400",
                      f"shared memory size specified with the request for output 'UPPER' (8 bytes) should be at "
                      f"least {size} bytes to hold the results")


# -- lifetime of a registration ----------------------------------------------------------------------------
def test_unregister_while_a_request_is_in_flight(http, server, regions):
    """The mapping outlives the registration while a request uses it; a re-registration is seen afresh."""
    handle, key = regions.create(128)
    x = np.arange(16, dtype=np.int32) * 10
    shm.set_shared_memory_region(handle, [x])
    regions.register("slow_in", key, 64)
    regions.register("slow_out", key, 64, offset=64)
    outcome: dict[str, Any] = {}

    def slow_request() -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            inputs = [int32_input("INPUT0", [16]).set_shared_memory("slow_in", 64)]
            out = httpclient.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("slow_out", 64)
            outcome["result"] = client.infer("shm_slow", inputs, outputs=[out])
        except Exception as e:  # reported by the assertions below
            outcome["error"] = e
        finally:
            outcome["done"] = time.monotonic()
            client.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 10
    while not server_mappings(server, key, front=False):  # the worker maps the input, then sleeps 0.5 s
        assert time.monotonic() < deadline, "the worker never mapped the region"
        time.sleep(0.01)
    http.unregister_system_shared_memory("slow_in")
    http.unregister_system_shared_memory("slow_out")
    unregistered = time.monotonic()
    assert http.get_system_shared_memory_status() == []
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["done"] > unregistered  # it was still executing when its regions went away
    assert outcome["result"].get_output("OUTPUT0") == {"name": "OUTPUT0", "datatype": "INT32", "shape": [16]}
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=64), x + 1)

    # The registration is gone for new requests, with Triton's answer.
    inputs = [int32_input("INPUT0", [16]).set_shared_memory("slow_in", 64)]
    expect_http_error(lambda: http.infer("shm_slow", inputs), "404", "Unable to find shared memory region: 'slow_in'")
    # ... and once nothing uses it, no server process maps the client's object any more.
    deadline = time.monotonic() + 10
    while server_mappings(server, key):
        assert time.monotonic() < deadline, f"still mapped by {server_mappings(server, key)}"
        time.sleep(0.02)

    # A new object under the same key, registered under the same names: the worker sees the new one.
    regions.destroy(key)
    handle = shm.create_shared_memory_region(key[1:], key, 256, create_only=True)
    regions.handles[key] = handle
    y = np.arange(32, dtype=np.int32) - 7
    shm.set_shared_memory_region(handle, [y])
    regions.register("slow_in", key, 128)
    regions.register("slow_out", key, 128, offset=128)
    inputs = [int32_input("INPUT0", [32]).set_shared_memory("slow_in", 128)]
    out = httpclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("slow_out", 128)
    http.infer("shm_slow", inputs, outputs=[out])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [32], offset=128), y + 1)


def test_unregister_and_destroy_with_requests_still_queued(http, server, regions):
    """Three requests on one region (one executing, one in the worker's ring, one still queued in the front);
    the client unregisters and even destroys the object: the worker keeps the mapping until all are done."""
    handle, key = regions.create(3 * 64)
    values = [np.arange(16, dtype=np.int32) * (i + 2) for i in range(3)]
    shm.set_shared_memory_region(handle, values)
    regions.register("queued", key, 3 * 64)
    results: dict[int, Any] = {}

    def request(i: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            t = int32_input("INPUT0", [16]).set_shared_memory("queued", 64, offset=64 * i)
            results[i] = client.infer("shm_slow", [t]).as_numpy("OUTPUT0")
        except Exception as e:  # reported by the assertions below
            results[i] = e
        finally:
            client.close()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not server_mappings(server, key, front=False):
        assert time.monotonic() < deadline, "the worker never mapped the region"
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.2)  # all three reached the front; the first sleeps in execute for 0.5 s
    http.unregister_system_shared_memory("queued")
    regions.destroy(key)
    assert not os.path.exists("/dev/shm" + key)
    for thread in threads:
        thread.join(30)
    for i, value in enumerate(values):
        assert not isinstance(results[i], Exception), results[i]
        np.testing.assert_array_equal(results[i], value + 1)
    deadline = time.monotonic() + 10
    while server_mappings(server, key):
        assert time.monotonic() < deadline, f"still mapped by {server_mappings(server, key)}"
        time.sleep(0.02)


def test_unregister_all_releases_every_mapping(http, server, regions):
    handles = [regions.create(64) for _ in range(3)]
    for i, (handle, key) in enumerate(handles):
        shm.set_shared_memory_region(handle, [np.full(64, i + 1, np.uint8)])
        regions.register(f"all_{i}", key, 64)
        t = httpclient.InferInput("INPUT0", [64], "UINT8").set_shared_memory(f"all_{i}", 64)
        assert http.infer("shm_probe", [t]).as_numpy("SUM")[0] == 64 * (i + 1)
        assert server_mappings(server, key, front=False)  # the worker keeps its mapping between requests
    http.unregister_system_shared_memory()
    assert http.get_system_shared_memory_status() == []
    deadline = time.monotonic() + 10
    while any(server_mappings(server, key) for _, key in handles):
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- zero copy ---------------------------------------------------------------------------------------------
def test_zero_copy_the_model_reads_the_client_region(http, server, regions):
    """The model's input array lies in the worker's mapping of the client's object: nothing was copied."""
    handle, key = regions.create(4096)
    data = np.arange(1000, dtype=np.uint64).astype(np.uint8)
    shm.set_shared_memory_region(handle, [data], offset=24)
    regions.register("probe", key, 4096)
    t = httpclient.InferInput("INPUT0", [1000], "UINT8").set_shared_memory("probe", 1000, offset=24)
    result = http.infer("shm_probe", [t])
    assert result.as_numpy("MAPPING")[0].decode() == f"/dev/shm{key}"
    assert result.as_numpy("SUM")[0] == data.sum(dtype=np.uint64)

    # The client changes its frame in place; the next request sends no data and the model sees the change.
    changed = np.full(1000, 200, np.uint8)
    shm.set_shared_memory_region(handle, [changed], offset=24)
    result = http.infer("shm_probe", [t])
    assert result.as_numpy("SUM")[0] == 200 * 1000
    assert result.as_numpy("MAPPING")[0].decode() == f"/dev/shm{key}"

    # Tensor data in a small request body is copied once, into the front's arena, which the worker maps.
    body = httpclient.InferInput("INPUT0", [1000], "UINT8")
    body.set_data_from_numpy(data)
    result = http.infer("shm_probe", [body])
    assert re.fullmatch(rf"/dev/shm/ek\.{server.proc.pid}\.\d+\.front\.\d+", result.as_numpy("MAPPING")[0].decode())
    assert result.as_numpy("SUM")[0] == data.sum(dtype=np.uint64)
    assert b"binary_data_size" not in result.as_numpy("BEFORE")[0]  # a block of its own

    # A large body is received straight into the arena: the model reads the tensor where the socket's
    # bytes landed, right behind the request's own JSON header.
    big = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8)
    body = httpclient.InferInput("INPUT0", [big.size], "UINT8")
    body.set_data_from_numpy(big)
    for request_id in ("", "a", "abc"):  # the block is given back after each answer and taken anew
        result = http.infer("shm_probe", [body], request_id=request_id)
        assert re.fullmatch(rf"/dev/shm/ek\.{server.proc.pid}\.\d+\.front\.\d+", result.as_numpy("MAPPING")[0].decode())
        assert result.as_numpy("SUM")[0] == big.sum(dtype=np.uint64)
        before = result.as_numpy("BEFORE")[0]
        start = max(before.rfind(b'{"id"'), before.rfind(b'{"inputs"'))
        header = json.loads(before[start:])  # the request's JSON header, whole, right before the tensor
        assert header["inputs"][0]["parameters"]["binary_data_size"] == 200000
        assert result.as_numpy("ADDRESS")[0] % 64 == 0  # whatever the header's length: aligned


# -- the camera-frame example -----------------------------------------------------------------------------
def frame_and_mean() -> tuple[np.ndarray, np.ndarray]:
    frame = np.random.default_rng(7).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    return frame, frame[::4, ::4].reshape(-1, 3).mean(axis=0)  # the model meters on a 4x4 grid


def test_frame_stats_over_http_binary(http):
    config = http.get_model_config("frame_stats")
    assert config["max_batch_size"] == 0
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("FRAME", "TYPE_UINT8", [1080, 1920, 3])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [("MEAN", "TYPE_FP32", [3])]
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 1)]
    frame, mean = frame_and_mean()
    t = httpclient.InferInput("FRAME", list(frame.shape), "UINT8")
    t.set_data_from_numpy(frame)
    got = http.infer("frame_stats", [t]).as_numpy("MEAN")
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, mean, rtol=1e-6)


def test_frame_stats_over_shared_memory(http, regions):
    frame, mean = frame_and_mean()
    handle, key = regions.create(frame.nbytes + 4096)
    shm.set_shared_memory_region(handle, [frame])
    regions.register("frame_in", key, frame.nbytes)
    regions.register("frame_out", key, 4096, offset=frame.nbytes)
    t = httpclient.InferInput("FRAME", list(frame.shape), "UINT8").set_shared_memory("frame_in", frame.nbytes)
    out = httpclient.InferRequestedOutput("MEAN")
    out.set_shared_memory("frame_out", 12)
    result = http.infer("frame_stats", [t], outputs=[out])
    assert result.get_output("MEAN") == {"name": "MEAN", "datatype": "FP32", "shape": [3]}
    np.testing.assert_allclose(shm.get_contents_as_numpy(handle, np.float32, [3], offset=frame.nbytes), mean,
                               rtol=1e-6)
    # Only the input in shm, the answer in the body.
    np.testing.assert_allclose(http.infer("frame_stats", [t]).as_numpy("MEAN"), mean, rtol=1e-6)


# -- CUDA shared memory ------------------------------------------------------------------------------------
def test_cuda_shared_memory_is_not_supported(http, server):
    assert http.get_cuda_shared_memory_status() == []
    expect_http_error(lambda: http.get_cuda_shared_memory_status("x"), "404",
                      "Unable to find cuda shared memory region: 'x'")
    with pytest.raises(InferenceServerException) as e:
        http.register_cuda_shared_memory("x", base64.b64encode(bytes(64)).decode(), 0, 64)
    assert e.value.status() == "400"
    assert "CUDA shared memory is not supported" in e.value.message()
    http.unregister_cuda_shared_memory("x")
    http.unregister_cuda_shared_memory()
    assert http.get_cuda_shared_memory_status() == []


# -- gRPC ------------------------------------------------------------------------------------------------
@pytest.fixture
def grpc(server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.is_server_live()
    except InferenceServerException:
        client.close()
        pytest.skip("the gRPC endpoint is not served")
    yield client
    client.unregister_system_shared_memory()
    client.close()


def expect_grpc_error(call, code: str, message: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert (e.value.status(), e.value.message()) == (f"StatusCode.{code}", message)


def test_grpc_register_status_unregister(grpc, regions):
    _, key = regions.create(128)
    grpc.register_system_shared_memory("g_in", key, 128)
    grpc.register_system_shared_memory("g_out", key, 64, offset=64)
    status = grpc.get_system_shared_memory_status(as_json=True)
    assert status == {"regions": {"g_in": {"name": "g_in", "key": key, "byte_size": "128"},
                                  "g_out": {"name": "g_out", "key": key, "offset": "64", "byte_size": "64"}}}
    assert list(grpc.get_system_shared_memory_status("g_in").regions) == ["g_in"]
    expect_grpc_error(lambda: grpc.get_system_shared_memory_status("nope"), "NOT_FOUND",
                      "Unable to find system shared memory region: 'nope'")
    expect_grpc_error(lambda: grpc.register_system_shared_memory("g_in", key, 64), "ALREADY_EXISTS",
                      "shared memory region 'g_in' already in manager")
    missing = f"/ek_test_missing_{uuid.uuid4().hex[:8]}"
    expect_grpc_error(lambda: grpc.register_system_shared_memory("g_x", missing, 64), "INTERNAL",
                      f"Unable to open shared memory region: '{missing}'")
    expect_grpc_error(lambda: grpc.register_system_shared_memory("g_x", "/../../etc/passwd", 64), "INTERNAL",
                      "Unable to open shared memory region: '/../../etc/passwd'")
    expect_grpc_error(lambda: grpc.register_system_shared_memory("g_x", key, 129), "INVALID_ARGUMENT",
                      "failed to register shared memory region 'g_x': invalid args")
    expect_grpc_error(lambda: grpc.register_system_shared_memory("g_x", key, 0), "INVALID_ARGUMENT",
                      "failed to register shared memory region 'g_x': unable to process address spaceInvalid "
                      "argument")
    grpc.unregister_system_shared_memory("g_in")
    grpc.unregister_system_shared_memory("g_in")  # unknown: OK
    assert list(grpc.get_system_shared_memory_status().regions) == ["g_out"]
    grpc.unregister_system_shared_memory()
    assert not grpc.get_system_shared_memory_status().regions


def test_grpc_inference_with_regions(grpc, regions):
    handle, key = regions.create(4096 + 128)
    a = np.arange(16, dtype=np.int32)
    b = np.arange(16, dtype=np.int32) * 3
    shm.set_shared_memory_region(handle, [a, b])
    grpc.register_system_shared_memory("g_io_in", key, 128)
    grpc.register_system_shared_memory("g_io_out", key, 128, offset=4096)
    inputs = [grpcclient.InferInput("INPUT0", [16], "INT32"), grpcclient.InferInput("INPUT1", [16], "INT32")]
    inputs[0].set_shared_memory("g_io_in", 64)
    inputs[1].set_shared_memory("g_io_in", 64, offset=64)
    out0 = grpcclient.InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory("g_io_out", 64, offset=64)
    out1 = grpcclient.InferRequestedOutput("OUTPUT1")  # in the response
    result = grpc.infer("add_sub", inputs, outputs=[out0, out1])
    response = result.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT0", "INT32", [16]), ("OUTPUT1", "INT32", [16])]
    assert response.raw_output_contents[0] == b""  # written to the region; the entry stays, empty
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [16], offset=4096 + 64), a + b)

    small = grpcclient.InferRequestedOutput("OUTPUT0")
    small.set_shared_memory("g_io_out", 32)
    expect_grpc_error(lambda: grpc.infer("add_sub", inputs, outputs=[small]), "INVALID_ARGUMENT",
                      "shared memory size specified with the request for output 'OUTPUT0' (32 bytes) should be at "
                      "least 64 bytes to hold the results")
    beyond = grpcclient.InferInput("INPUT0", [16], "INT32")
    beyond.set_shared_memory("g_io_in", 64, offset=100)
    expect_grpc_error(lambda: grpc.infer("add_sub", [beyond, inputs[1]]), "INVALID_ARGUMENT",
                      "Invalid offset + byte size for shared memory region: 'g_io_in'")
    unknown = grpcclient.InferInput("INPUT0", [16], "INT32")
    unknown.set_shared_memory("nope", 64)
    expect_grpc_error(lambda: grpc.infer("add_sub", [unknown, inputs[1]]), "NOT_FOUND",
                      "Unable to find shared memory region: 'nope'")
    short = grpcclient.InferInput("INPUT0", [16], "INT32")
    short.set_shared_memory("g_io_in", 60)
    expect_grpc_error(lambda: grpc.infer("add_sub", [short, inputs[1]]), "INVALID_ARGUMENT",
                      "[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' for model 'add_sub'. "
                      "Expected 64, got 60")
    grpc.unregister_system_shared_memory()


def test_grpc_cuda_shared_memory_is_not_supported(grpc):
    assert not grpc.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException) as e:
        grpc.register_cuda_shared_memory("x", bytes(64), 0, 64)
    assert "CUDA shared memory is not supported" in e.value.message()
    grpc.unregister_cuda_shared_memory()
