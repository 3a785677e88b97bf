"""HTTP/REST endpoint, through the official tritonclient.http."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from http.client import HTTPConnection

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.support import DATATYPES


def add_sub_inputs(a, b, binary=True):
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        t = httpclient.InferInput(name, list(value.shape), "INT32")
        t.set_data_from_numpy(value, binary_data=binary)
        inputs.append(t)
    return inputs


def assert_serving(http):
    """The server still answers add_sub correctly."""
    a = np.arange(16, dtype=np.int32)
    result = http.infer("add_sub", add_sub_inputs(a, a))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def raw_post(server, path, body: bytes, headers=None):
    """A hand-made request, for malformed bodies tritonclient cannot produce."""
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- health and metadata -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "content_type"), [
    ("HEAD", "/v2", "application/json"), ("HEAD", "/v2/health/live", "text/plain"),
    ("HEAD", "/v2/health/ready", "text/plain"), ("HEAD", "/v2/models/add_sub", "application/json"),
    ("HEAD", "/v2/models/add_sub/ready", "text/plain"), ("HEAD", "/v2/models/nonexistent", "application/json"),
    ("HEAD", "/v2/models/add_sub/config", "application/json"), ("HEAD", "/v2/logging", "application/json"),
    ("PUT", "/v2", "application/json"), ("PUT", "/v2/health/live", "text/plain"),
    ("POST", "/v2/models/add_sub/versions/1/ready", "text/plain"), ("PUT", "/v2/models/add_sub", "application/json"),
    ("POST", "/v2/models/add_sub/config", "application/json"), ("PUT", "/v2/models/stats", "application/json"),
    ("PUT", "/v2/models/add_sub/infer", "text/plain"), ("GET", "/v2/models/add_sub/versions/1/infer", "text/plain"),
    ("PUT", "/v2/models/add_sub/generate", "application/json"), ("GET", "/v2/repository/index", "application/json"),
    ("PUT", "/v2/repository/models/add_sub/load", "application/json"),
    ("GET", "/v2/systemsharedmemory/unregister", "application/json"),
    ("PUT", "/v2/cudasharedmemory/status", "application/json"), ("PUT", "/v2/trace/setting", "application/json"),
    ("DELETE", "/v2/logging", "application/json")])
def test_method_not_allowed(server, method, path, content_type):
    """Triton 2.51 answers HEAD (and any method a route lacks) 405 ``Not Allowed``, application/json except on
    the health and infer routes (docs/triton-behaviour.md §3)."""
    conn = HTTPConnection(server.http_url, timeout=30)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
        assert (r.status, r.reason, r.getheader("Content-Type")) == (405, "Not Allowed", content_type)
        assert body == (b"" if method == "HEAD" else b'{"error":"Method Not Allowed"}')
    finally:
        conn.close()


def test_live_and_metadata(http):
    assert http.is_server_live()
    meta = http.get_server_metadata()
    assert meta["name"] == "triton"
    assert "binary_tensor_data" in meta["extensions"]
    assert "system_shared_memory" in meta["extensions"]


def test_not_ready_while_a_model_failed(http):
    # Triton's strict readiness: the repository holds models that failed to load.
    assert not http.is_server_ready()


def test_model_metadata_config_ready(http):
    assert http.is_model_ready("add_sub")
    assert http.is_model_ready("add_sub", "1")
    assert not http.is_model_ready("add_sub", "2")
    meta = http.get_model_metadata("add_sub")
    assert meta == {
        "name": "add_sub", "versions": ["1"], "platform": "python",
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [16]},
                   {"name": "INPUT1", "datatype": "INT32", "shape": [16]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [16]},
                    {"name": "OUTPUT1", "datatype": "INT32", "shape": [16]}],
    }
    assert http.get_model_metadata("add_sub", "1") == meta
    config = http.get_model_config("add_sub")
    assert config["name"] == "add_sub"
    assert config["backend"] == "python"
    assert config["max_batch_size"] == 0
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == [16]
    assert config["instance_group"][0]["name"] == "add_sub_0"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["default_model_filename"] == "model.py"
    batched = http.get_model_metadata("identity")
    assert batched["inputs"][0]["shape"] == [-1, 16]


# -- inference ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_add_sub(http, binary):
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, 16, dtype=np.int32)
    b = rng.integers(-1000, 1000, 16, dtype=np.int32)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = http.infer("add_sub", add_sub_inputs(a, b, binary), outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "add_sub"
    assert response["model_version"] == "1"


def test_requested_subset_of_outputs(http):
    a = np.arange(16, dtype=np.int32)
    result = http.infer("add_sub", add_sub_inputs(a, a), outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros(16, np.int32))
    assert result.as_numpy("OUTPUT0") is None


def sample(dt: str, shape=(2, 3)):
    rng = np.random.default_rng(len(dt))
    n = int(np.prod(shape))
    if dt == "BOOL":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dt == "BYTES":
        return np.array([f"s{i}-é".encode() * i for i in range(n)], dtype=np.object_).reshape(shape)
    if dt == "BF16":
        return rng.standard_normal(n).astype(ml_dtypes.bfloat16).reshape(shape)
    np_type = np.dtype(dt.lower().replace("fp", "float"))
    if np_type.kind == "f":
        return rng.standard_normal(n).astype(np_type).reshape(shape)
    info = np.iinfo(np_type)
    return rng.integers(info.min, info.max, n, dtype=np_type, endpoint=True).reshape(shape)


# tritonclient sends BF16 only as binary data over HTTP.
@pytest.mark.parametrize("dt,binary", [(dt, b) for dt in DATATYPES for b in (True, False) if dt != "BF16" or b],
                         ids=lambda v: v if isinstance(v, str) else ("binary" if v else "json"))
def test_every_datatype(http, dt, binary):
    value = sample(dt, (3,))
    t = httpclient.InferInput("INPUT0", list(value.shape), dt)
    t.set_data_from_numpy(value, binary_data=binary)
    result = http.infer(f"echo_{dt.lower()}", [t],
                        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    out = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0")["datatype"] == dt
    assert out.shape == value.shape
    if dt == "BYTES":
        got = [x.encode() if isinstance(x, str) else bytes(x) for x in out.reshape(-1)]
        assert got == list(value.reshape(-1))
    else:
        np.testing.assert_array_equal(out.astype(value.dtype), value)


def test_bytes_model(http):
    text = np.array([b"edge", b"kernel", b""], dtype=np.object_)
    t = httpclient.InferInput("TEXT", [3], "BYTES")
    t.set_data_from_numpy(text)
    result = http.infer("upper", [t])
    assert list(result.as_numpy("UPPER")) == [b"EDGE", b"KERNEL", b""]
    np.testing.assert_array_equal(result.as_numpy("LENGTH"), [4, 6, 0])


def test_batched_model(http):
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    t = httpclient.InferInput("INPUT0", [3, 16], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(http.infer("identity", [t]).as_numpy("OUTPUT0"), x)


# -- models that fail --------------------------------------------------------------------------------------
def test_failed_models_are_unavailable_with_reason(http):
    index = {(m["name"], m.get("version", "")): m for m in http.get_model_repository_index()}
    assert index[("add_sub", "1")]["state"] == "READY"
    assert index[("broken_config", "")] == {"name": "broken_config"}  # as Triton lists a model it cannot read
    init = index[("broken_init", "1")]
    assert init["state"] == "UNAVAILABLE"
    assert init["reason"].startswith("Internal: RuntimeError: cannot initialize on purpose\n\nAt:\n")
    assert not http.is_model_ready("broken_init")
    with pytest.raises(InferenceServerException):
        http.get_model_metadata("broken_config")
    assert_serving(http)


def test_model_that_raises(http):
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.ones(2, np.float32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("raises", [t])
    assert e.value.message().startswith("Failed to process the request(s) for model 'raises_0', "
                                        "message: ValueError: this model always fails\n\nAt:\n")
    assert "/raises/1/model.py(6): execute" in e.value.message()
    assert e.value.status() == "500"
    assert_serving(http)
    with pytest.raises(InferenceServerException):
        http.infer("raises", [t])  # the worker survived and answers again


def test_model_error_response(http):
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.array([1, -1], np.float32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("error_response", [t])
    assert e.value.message() == "negative input"
    assert e.value.status() == "500"
    t.set_data_from_numpy(np.array([1, 2], np.float32))
    np.testing.assert_array_equal(http.infer("error_response", [t]).as_numpy("OUTPUT0"), [1, 2])


# -- bad input ---------------------------------------------------------------------------------------------
def expect_error(http, model, inputs, fragment, status="400", outputs=None):
    with pytest.raises(InferenceServerException) as e:
        http.infer(model, inputs, outputs=outputs)
    assert fragment in e.value.message(), e.value.message()
    assert e.value.status() == status, (e.value.status(), e.value.message())
    assert_serving(http)


def test_unknown_model_and_version(http):
    a = np.arange(16, dtype=np.int32)
    expect_error(http, "nope", add_sub_inputs(a, a), "Request for unknown model: 'nope' is not found", "404")
    with pytest.raises(InferenceServerException) as e:
        http.infer("add_sub", add_sub_inputs(a, a), model_version="7")
    assert e.value.message() == "Request for unknown model: 'add_sub' version 7 is not found"
    assert e.value.status() == "404"
    expect_error(http, "broken_init", [], "Request for unknown model: 'broken_init' has no available versions", "404")


def test_unknown_input(http):
    a = np.arange(16, dtype=np.int32)
    inputs = add_sub_inputs(a, a)
    extra = httpclient.InferInput("INPUT9", [16], "INT32")
    extra.set_data_from_numpy(a)
    expect_error(http, "add_sub", inputs + [extra], "[request id: <id_unknown>] expected 2 inputs but got 3 inputs "
                                                    "for model 'add_sub'")
    expect_error(http, "add_sub", [inputs[0], extra], "unexpected inference input 'INPUT9' for model 'add_sub'")


def test_missing_input(http):
    a = np.arange(16, dtype=np.int32)
    expect_error(http, "add_sub", add_sub_inputs(a, a)[:1],
                 "[request id: <id_unknown>] expected 2 inputs but got 1 inputs for model 'add_sub'. Got input(s) "
                 "['INPUT0'], but missing required input(s) ['INPUT1']. Please provide all required input(s).")


def test_unknown_output(http):
    a = np.arange(16, dtype=np.int32)
    expect_error(http, "add_sub", add_sub_inputs(a, a), "unexpected inference output 'OUTPUT7' for model 'add_sub'",
                 outputs=[httpclient.InferRequestedOutput("OUTPUT7")])


def test_wrong_shape(http):
    a = np.arange(15, dtype=np.int32)
    expect_error(http, "add_sub", add_sub_inputs(a, a), "[request id: <id_unknown>] unexpected shape for input "
                                                        "'INPUT0' for model 'add_sub'. Expected [16], got [15]. ")
    t = httpclient.InferInput("INPUT0", [16], "FP32")
    t.set_data_from_numpy(np.ones(16, np.float32))
    expect_error(http, "identity", [t], "Expected [-1,16], got [16]. NOTE: Setting a non-zero max_batch_size")


def test_wrong_datatype(http):
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = httpclient.InferInput(name, [16], "FP32")
        t.set_data_from_numpy(np.ones(16, np.float32))
        inputs.append(t)
    expect_error(http, "add_sub", inputs, "inference input 'INPUT0' data-type is 'FP32', but model 'add_sub' "
                                          "expects 'INT32'")


def test_batch_too_large(http):
    t = httpclient.InferInput("INPUT0", [65, 16], "FP32")
    t.set_data_from_numpy(np.ones((65, 16), np.float32))
    expect_error(http, "identity", [t], "inference request batch-size must be <= 64 for 'identity'")


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def test_malformed_json(server, http):
    status, body = raw_post(server, "/v2/models/add_sub/infer", b'{"inputs": [', {"Content-Type": "application/json"})
    assert status == 400  # Triton answers 500; a client mistake is a 4xx here
    assert json.loads(body)["error"].startswith("failed to parse the request JSON buffer")
    status, body = raw_post(server, "/v2/models/add_sub/infer", b'{"id": "x"}')
    assert (status, json.loads(body)["error"]) == (
        400, "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'")
    assert_serving(http)


def test_wrong_byte_size(server, http):
    a = np.arange(16, dtype=np.int32).tobytes()
    header = {"inputs": [
        {"name": "INPUT0", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 60}},
        {"name": "INPUT1", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}]}
    body, headers = _binary_body(header, a[:60], a)
    status, reply = raw_post(server, "/v2/models/add_sub/infer", body, headers)
    assert status == 400
    assert json.loads(reply)["error"] == ("[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' "
                                          "for model 'add_sub'. Expected 64, got 60")
    assert_serving(http)


def test_body_shorter_than_declared(server, http):
    a = np.arange(16, dtype=np.int32).tobytes()
    header = {"inputs": [
        {"name": "INPUT0", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}]}
    body, headers = _binary_body(header, a, a[:32])
    status, reply = raw_post(server, "/v2/models/add_sub/infer", body, headers)
    assert (status, json.loads(reply)["error"]) == (
        400, "unexpected size for input 'INPUT1', expecting 32 additional bytes for model 'add_sub'")
    assert_serving(http)


def test_body_larger_than_declared(server, http):
    a = np.arange(16, dtype=np.int32).tobytes()
    header = {"inputs": [
        {"name": "INPUT0", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "shape": [16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}]}
    body, headers = _binary_body(header, a, a, b"trailing garbage")
    status, reply = raw_post(server, "/v2/models/add_sub/infer", body, headers)
    assert status == 400
    assert "unexpected additional input data" in json.loads(reply)["error"]
    assert_serving(http)


def test_json_element_count_mismatch(server, http):
    doc = {"inputs": [{"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": list(range(15))},
                      {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": list(range(16))}]}
    status, reply = raw_post(server, "/v2/models/add_sub/infer", json.dumps(doc).encode())
    assert (status, json.loads(reply)["error"]) == (
        400, "Unable to parse 'data': Shape does not match true shape of 'data' field")
    doc["inputs"][0]["data"] = [1.5] * 16
    status, reply = raw_post(server, "/v2/models/add_sub/infer", json.dumps(doc).encode())
    assert (status, json.loads(reply)["error"]) == (
        400, "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer")
    del doc["inputs"][0]["data"]
    status, reply = raw_post(server, "/v2/models/add_sub/infer", json.dumps(doc).encode())
    assert status == 400
    assert json.loads(reply)["error"].endswith("But no field is set")
    assert_serving(http)


def test_concurrent_requests_all_correct(http, server):
    clients = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    try:
        rng = np.random.default_rng(5)
        pairs = [(rng.integers(0, 100, 16, dtype=np.int32), rng.integers(0, 100, 16, dtype=np.int32))
                 for _ in range(64)]
        handles = [clients.async_infer("add_sub", add_sub_inputs(a, b)) for a, b in pairs]
        for (a, b), h in zip(pairs, handles):
            r = h.get_result()
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    finally:
        clients.close()


def test_np_dtype_names_match():
    assert np_to_triton_dtype(np.int32) == "INT32"


def test_unreadable_model_version(http, server):
    """A version number out of int64's range is Triton's stol error (400) on every route that names one; the
    ready and infer routes answer it in text/plain (docs/triton-behaviour.md §3)."""
    version = "99999999999999999999"
    message = (f"failed to get model version from specified version string '{version}' (details: stol), version "
               "should be an integral value > 0")
    a = np.arange(16, dtype=np.int32)
    for call in (lambda: http.get_model_metadata("add_sub", version), lambda: http.get_model_config("add_sub", version),
                 lambda: http.get_inference_statistics("add_sub", version),
                 lambda: http.infer("add_sub", add_sub_inputs(a, a), model_version=version)):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert (e.value.status(), e.value.message()) == ("400", message)
    for path in (f"/v2/models/add_sub/versions/{version}/ready", f"/v2/models/nope/versions/{version}"):
        conn = HTTPConnection(server.http_url, timeout=30)
        conn.request("GET", path)
        r = conn.getresponse()
        assert (r.status, r.read()) == (400, json.dumps({"error": message}, separators=(",", ":")).encode())
        assert r.getheader("Content-Type") == ("text/plain" if path.endswith("/ready") else "application/json")
        conn.close()
    assert http.get_model_metadata("add_sub", "01")["versions"] == ["1"]
    assert http.get_inference_statistics("add_sub", "01")["model_stats"][0]["version"] == "1"


def test_wrong_type_request_parameters(http, server):
    """Triton types ``binary_data_output``, ``priority``, ``timeout`` and an output's ``binary_data`` (500 there,
    400 here, Triton's text), checking request parameters in the body's order (docs/triton-behaviour.md §6)."""
    a = np.arange(16, dtype=np.int32)
    uint = "attempt to access JSON non-unsigned-integer as unsigned-integer"
    for kwargs, message in (({"priority": "high"}, f"Unable to parse 'priority': {uint}"),
                            ({"priority": -1}, f"Unable to parse 'priority': {uint}"),
                            ({"timeout": -5}, f"Unable to parse 'timeout': {uint}"),
                            ({"timeout": 5.5}, f"Unable to parse 'timeout': {uint}")):
        with pytest.raises(InferenceServerException) as e:
            http.infer("add_sub", add_sub_inputs(a, a), **kwargs)
        assert (e.value.status(), e.value.message()) == ("400", message)
    ints = [1] * 16
    inputs = [{"name": n, "shape": [16], "datatype": "INT32", "data": ints} for n in ("INPUT0", "INPUT1")]
    boolean = "attempt to access JSON non-boolean as boolean"
    for extra, message in (
            ({"parameters": {"binary_data_output": "yes"}}, f"Unable to parse 'binary_data_output': {boolean}"),
            ({"parameters": {"binary_data_output": None}}, f"Unable to parse 'binary_data_output': {boolean}"),
            ({"parameters": {"timeout": "x", "priority": "x"}}, f"Unable to parse 'timeout': {uint}"),
            ({"parameters": {"sequence_start": 1, "binary_data_output": 1}},
             f"Unable to parse 'sequence_start': {boolean}"),
            ({"parameters": {"priority": 1 << 64}}, f"Unable to parse 'priority': {uint}"),
            ({"parameters": None}, "failed to get request params.: attempt to get members for non-object"),
            ({"parameters": "x"}, "failed to get request params.: attempt to get members for non-object"),
            ({"outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]},
             f"Unable to parse 'binary_data': {boolean}")):
        status, body = raw_post(server, "/v2/models/add_sub/infer", json.dumps({"inputs": inputs, **extra}).encode())
        assert (status, json.loads(body)) == (400, {"error": message}), extra
    for extra in ({"parameters": {"priority": 3, "timeout": (1 << 64) - 1, "binary_data_output": False}},
                  {"outputs": [{"name": "OUTPUT0", "parameters": "x"}]}):  # Triton ignores those output parameters
        status, body = raw_post(server, "/v2/models/add_sub/infer", json.dumps({"inputs": inputs, **extra}).encode())
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == [2] * 16
    for ready in ("yes", 1, None):
        status, body = raw_post(server, "/v2/repository/index", json.dumps({"ready": ready}).encode())
        assert (status, json.loads(body)) == (400, {"error": boolean})


def test_inference_header_length_read_as_triton(server):
    """No Inference-Header-Content-Length: the body is JSON, an empty one a raw request; the header is read with C's
    atoi (``+5``, `` 5``, ``5x`` are 5; ``-0``, ``abc`` are 0: raw), and outside [0, body] it is Triton's range
    error in text/plain (docs/triton-behaviour.md §6)."""
    raw = ("[request id: <id_unknown>] Raw request must only have 1 input (found 1) to be deduced but got 2 inputs "
           "in 'add_sub' model configuration")
    body = json.dumps({"inputs": [{"name": n, "shape": [16], "datatype": "INT32", "data": [1] * 16}
                                  for n in ("INPUT0", "INPUT1")]}).encode()
    cases = [(b"", {}, 400, "application/json", raw),
             (b"", {"Content-Length": "0"}, 400, "application/json", raw),
             (b" \n", {}, 400, "application/json",
              "failed to parse the request JSON buffer: The document is empty. at 2"),
             (body, {"Inference-Header-Content-Length": "-5"}, 400, "text/plain",
              f"inference header size should be in range (0, {len(body)}), got: -5"),
             (b"", {"Inference-Header-Content-Length": "-5"}, 400, "text/plain",
              "inference header size should be in range (0, 0), got: -5"),
             (body, {"Inference-Header-Content-Length": "99999999999999999999"}, 400, "text/plain",
              f"inference header size should be in range (0, {len(body)}), got: 99999999999999999999"),
             (body, {"Inference-Header-Content-Length": "-0"}, 400, "application/json", raw),
             (body, {"Inference-Header-Content-Length": f" +{len(body)}x"}, 200, "application/json", None)]
    for data, headers, status, content_type, message in cases:
        conn = HTTPConnection(server.http_url, timeout=30)
        try:
            conn.request("POST", "/v2/models/add_sub/infer", data, headers)
            r = conn.getresponse()
            answer = json.loads(r.read())
            assert (r.status, r.getheader("Content-Type")) == (status, content_type), (headers, answer)
            if message is not None:
                assert answer == {"error": message}
            else:
                assert answer["outputs"][0]["data"] == [2] * 16
        finally:
            conn.close()


def test_request_errors_word_for_word(http):
    """Triton 2.51's texts over HTTP too: the inputs got listed last first, an empty missing list as ``]``, JSON
    strings counted as its core counts serialised ones (docs/triton-behaviour.md §6)."""
    a = np.arange(16, dtype=np.int32)
    extra = httpclient.InferInput("BOGUS", [16], "INT32")
    extra.set_data_from_numpy(a)
    p = "[request id: <id_unknown>] "
    cases = [("add_sub", add_sub_inputs(a, a) + [extra],
              f"{p}expected 2 inputs but got 3 inputs for model 'add_sub'. Got input(s) ['BOGUS','INPUT1','INPUT0'], "
              "but missing required input(s) ]. Please provide all required input(s).")]
    for count, strings, message in (
            (1, ["a", "b"], f"{p}unexpected number of string elements 2 for inference input 'TEXT' for model 'upper', "
                            "expecting 1"),
            (3, ["a", "b"], f"{p}expected 3 string elements for inference input 'TEXT' for model 'upper', got 2")):
        text = httpclient.InferInput("TEXT", [len(strings)], "BYTES")
        text.set_data_from_numpy(np.array(strings, dtype=np.object_), binary_data=False)
        text.set_shape([count])
        cases.append(("upper", [text], message))
    for model, inputs, message in cases:
        with pytest.raises(InferenceServerException) as e:
            http.infer(model, inputs)
        assert (e.value.status(), e.value.message()) == ("400", message)


# -- tensors with zero elements (docs/triton-behaviour.md, section 6) ---------------------------------------
def test_zero_batch_is_refused_with_tritons_words(server):
    """A batching model's batch of 0 rows: 400, never a 500 or a request left unanswered."""
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=20.0)
    try:
        for binary in (True, False):
            t = httpclient.InferInput("INPUT0", [0, 16], "FP32")
            t.set_data_from_numpy(np.zeros((0, 16), np.float32), binary_data=binary)
            expect_error(http, "identity", [t], "[request id: <id_unknown>] input byte size mismatch for input "
                                                "'INPUT0' for model 'identity'. Expected 64, got 0")
        # dims [-1]: [0,0] holds the "row" Triton expects (0 bytes); Triton never answers it, here it is refused
        t = httpclient.InferInput("INPUT0", [0, 0], "FP32")
        t.set_data_from_numpy(np.zeros((0, 0), np.float32))
        expect_error(http, "batch_nodelay", [t], "inference request batch-size must be >= 1 for 'batch_nodelay'")
        # one row's bytes under a batch of 0 (Triton runs it without the batch dimension): refused as well
        header = {"inputs": [{"name": "INPUT0", "shape": [0, 16], "datatype": "FP32",
                              "parameters": {"binary_data_size": 64}}]}
        status, reply = raw_post(server, "/v2/models/identity/infer", *_binary_body(header, bytes(64)))
        assert (status, json.loads(reply)["error"]) == (
            400, "[request id: <id_unknown>] inference request batch-size must be >= 1 for 'identity'")
    finally:
        http.close()


def test_zero_element_tensors_are_served(server, http):
    """Shapes with a 0 that the model accepts run as Triton runs them: outputs of 0 elements, 200."""
    for binary in (True, False):
        t = httpclient.InferInput("TEXT", [0], "BYTES")
        t.set_data_from_numpy(np.array([], dtype=np.object_), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("UPPER", "LENGTH")]
        result = http.infer("upper", [t], outputs=outputs)
        assert result.as_numpy("UPPER").shape == (0,)
        assert result.as_numpy("LENGTH").shape == (0,) and result.as_numpy("LENGTH").dtype == np.int32
    # binary outputs of 0 bytes in all: a plain JSON answer, as Triton's
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [0], "data": []}],
                       "parameters": {"binary_data_output": True}}).encode()
    status, reply = raw_post(server, "/v2/models/upper/infer", body)
    assert status == 200
    assert json.loads(reply)["outputs"][1] == {"name": "LENGTH", "datatype": "INT32", "shape": [0],
                                               "parameters": {"binary_data_size": 0}}
    status, reply = raw_post(server, "/v2/models/upper/generate", b'{"TEXT": []}')
    assert (status, json.loads(reply)) == (200, {"model_name": "upper", "model_version": "1", "UPPER": [],
                                                 "LENGTH": []})
    t = httpclient.InferInput("INPUT0", [0], "FP32")  # (echo_fp32 does not batch: dims [-1])
    t.set_data_from_numpy(np.zeros(0, np.float32))
    assert http.infer("echo_fp32", [t]).as_numpy("OUTPUT0").shape == (0,)
    assert_serving(http)


# -- response compression (docs/triton-behaviour.md, section 3) ----------------------------------------------
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_responses_are_compressed_when_asked(http, server, algorithm):
    """tritonclient's response_compression_algorithm: the answer comes compressed (JSON and binary outputs,
    and a body large enough to be compressed off the event loop) and decodes to the same tensors."""
    import zlib

    data = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    for binary in (False, True):
        t = httpclient.InferInput("INPUT0", [4, 16], "FP32")
        t.set_data_from_numpy(data, binary_data=binary)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
        result = http.infer("identity", [t], outputs=[out], response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    text = np.array([b"camera frame " * 200_000], dtype=np.object_)  # 2.6 MB each way: past INFLATE_INLINE
    t = httpclient.InferInput("TEXT", [1], "BYTES")
    t.set_data_from_numpy(text)
    result = http.infer("upper", [t], response_compression_algorithm=algorithm)
    assert result.as_numpy("UPPER")[0] == text[0].upper()

    # On the wire: Content-Encoding, and the uncompressed JSON header's length, as Triton sends them.
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4, 16],
                                   "data": data.ravel().tolist()}],
                       "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    conn = HTTPConnection(server.http_url)
    try:
        for accept, expected in ((algorithm, algorithm), (f"br, {algorithm};q=0.5", algorithm),
                                 ("br", None), ("identity", None)):
            conn.request("POST", "/v2/models/identity/infer", body, {"Accept-Encoding": accept})
            r = conn.getresponse()
            raw = r.read()
            assert r.status == 200
            assert r.getheader("Content-Encoding") == expected
            if expected is not None:
                raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS if expected == "gzip" else zlib.MAX_WBITS)
            header = int(r.getheader("Inference-Header-Content-Length"))
            assert json.loads(raw[:header])["outputs"][0]["parameters"]["binary_data_size"] == data.nbytes
            np.testing.assert_array_equal(np.frombuffer(raw[header:], np.float32).reshape(4, 16), data)
    finally:
        conn.close()


def test_errors_are_not_compressed(server):
    conn = HTTPConnection(server.http_url)
    try:
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
        conn.request("POST", "/v2/models/identity/infer", body, {"Accept-Encoding": "gzip"})
        r = conn.getresponse()
        assert (r.status, r.getheader("Content-Encoding")) == (400, None)
        assert "unexpected shape" in json.loads(r.read())["error"]
    finally:
        conn.close()
