"""gRPC endpoint (Triton's GRPCInferenceService), through the official tritonclient.grpc."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from protocol import health_pb2
from tests.support import DATATYPES, ROOT, KernelServer

_BIG = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


# -- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(server):
    """A raw stub, for requests tritonclient cannot produce (typed contents, malformed requests)."""
    channel = grpc.insecure_channel(server.grpc_url, options=_BIG)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


REPEAT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            if n < 0:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative count")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
REPEAT_CONFIG = """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
"""


@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    """A second server: the examples and a decoupled model ('repeat': IN=n -> n responses), explicit
    model control, a 1 MiB gRPC message limit."""
    repo = tmp_path_factory.mktemp("explicit_repo")
    shutil.copytree(ROOT / "examples" / "models", repo, dirs_exist_ok=True)
    (repo / "repeat" / "1").mkdir(parents=True)
    (repo / "repeat" / "1" / "model.py").write_text(REPEAT_MODEL)
    (repo / "repeat" / "config.pbtxt").write_text(REPEAT_CONFIG)
    srv = KernelServer(repo, "--model-control-mode", "explicit", "--load-model", "add_sub", "--load-model", "repeat",
                       "--grpc-max-message-size", str(1 << 20))
    srv.start(tmp_path_factory.mktemp("explicit") / "server.log")
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()
    assert not srv.owned_shm(), f"shared memory left behind: {sorted(srv.owned_shm())}"


def add_sub_inputs(a, b):
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "INT32"),
              grpcclient.InferInput("INPUT1", list(b.shape), "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def assert_serving(client):
    """The server still answers add_sub correctly."""
    a = np.arange(16, dtype=np.int32)
    result = client.infer("add_sub", add_sub_inputs(a, 3 * a))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 4 * a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), -2 * a)


def expect_error(client, fragment, code, call):
    with pytest.raises(InferenceServerException) as e:
        call()
    assert fragment in e.value.message(), e.value.message()
    assert e.value.status() == f"StatusCode.{code}", (e.value.status(), e.value.message())
    assert_serving(client)
    return e.value


def raw_request(model, *tensors, raw=True):
    """A ModelInferRequest; ``tensors`` are (name, datatype, shape, bytes) with raw contents."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            request.raw_input_contents.append(data)
    return request


def expect_rpc_error(stub, request, fragment, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert fragment in e.value.details(), e.value.details()


def sample(dt: str, shape=(2, 3)):
    """Random data of a Triton datatype, spanning its whole range."""
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


# -- health and metadata -----------------------------------------------------------------------------------
def test_live_ready_and_metadata(client):
    assert client.is_server_live()
    assert not client.is_server_ready()  # Triton's strict readiness: the repository holds broken models
    meta = client.get_server_metadata()
    assert meta.name == "triton"
    assert meta.version
    assert "system_shared_memory" in meta.extensions
    assert "binary_tensor_data" in meta.extensions


def test_model_metadata_config_ready(client):
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "2")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("add_sub", as_json=True)
    assert meta == {
        "name": "add_sub", "versions": ["1"], "platform": "python",
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": ["16"]},
                   {"name": "INPUT1", "datatype": "INT32", "shape": ["16"]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": ["16"]},
                    {"name": "OUTPUT1", "datatype": "INT32", "shape": ["16"]}],
    }
    assert list(client.get_model_metadata("identity").inputs[0].shape) == [-1, 16]
    config = client.get_model_config("add_sub").config
    assert config.name == "add_sub"
    assert config.backend == "python"
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [16]
    assert config.input[0].data_type == model_config_pb2.TYPE_INT32
    assert config.instance_group[0].name == "add_sub_0"
    assert config.default_model_filename == "model.py"
    json_config = client.get_model_config("add_sub", as_json=True)["config"]
    assert json_config["input"][0]["data_type"] == "TYPE_INT32"
    expect_error(client, "Request for unknown model: 'nope' is not found", "NOT_FOUND",
                 lambda: client.get_model_metadata("nope"))
    expect_error(client, "Request for unknown model: 'nope' is not found", "NOT_FOUND",
                 lambda: client.get_model_config("nope"))
    expect_error(client, "Request for unknown model: 'add_sub' version 2 is not found", "NOT_FOUND",
                 lambda: client.get_model_metadata("add_sub", "2"))
    expect_error(client, "failed to get model version from specified version string 'abc'", "INVALID_ARGUMENT",
                 lambda: client.get_model_metadata("add_sub", "abc"))


def _health(url: str, service: str = "") -> int:
    with grpc.insecure_channel(url) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        return check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_check(server, explicit):
    # Triton answers Check with its readiness: a repository with broken models is NOT_SERVING ...
    assert _health(server.grpc_url) == health_pb2.HealthCheckResponse.NOT_SERVING
    # ... one whose models all loaded is SERVING.
    assert _health(explicit.grpc_url) == health_pb2.HealthCheckResponse.SERVING
    assert _health(explicit.grpc_url, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(explicit.grpc_url) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- inference ---------------------------------------------------------------------------------------------
def test_add_sub(client):
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, 16, dtype=np.int32)
    b = rng.integers(-1000, 1000, 16, dtype=np.int32)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("add_sub", add_sub_inputs(a, b), outputs=outputs, request_id="req-7",
                          parameters={"custom": "x", "flag": True, "n": 3})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "req-7"
    assert response.model_name == "add_sub"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == len(response.outputs) == 2
    assert response.outputs[0].datatype == "INT32"
    assert list(response.outputs[0].shape) == [16]


def test_requested_subset_of_outputs(client):
    a = np.arange(16, dtype=np.int32)
    result = client.infer("add_sub", add_sub_inputs(a, a), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros(16, np.int32))
    assert result.as_numpy("OUTPUT0") is None


@pytest.mark.parametrize("dt", DATATYPES)
def test_every_datatype_raw(client, dt):
    value = sample(dt, (2, 3)).reshape(-1)
    t = grpcclient.InferInput("INPUT0", list(value.shape), dt)
    t.set_data_from_numpy(value)
    result = client.infer(f"echo_{dt.lower()}", [t])
    out = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0").datatype == dt
    assert out.shape == value.shape
    if dt == "BYTES":
        assert [bytes(x) for x in out] == list(value)
    else:
        np.testing.assert_array_equal(out.astype(value.dtype), value)


_CONTENTS_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                   "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@pytest.mark.parametrize("dt", list(_CONTENTS_FIELD))
def test_every_datatype_typed_contents(client, stub, dt):
    value = sample(dt, (5,))
    request = raw_request(f"echo_{dt.lower()}", ("INPUT0", dt, [5], b""), raw=False)
    request.id = f"typed-{dt}"
    getattr(request.inputs[0].contents, _CONTENTS_FIELD[dt]).extend(value.tolist())
    response = stub.ModelInfer(request)
    assert response.id == f"typed-{dt}"
    assert response.outputs[0].datatype == dt
    assert list(response.outputs[0].shape) == [5]
    raw = response.raw_output_contents[0]
    if dt == "BYTES":
        assert list(deserialize_bytes_tensor(raw)) == list(value)
    else:
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=value.dtype), value)
    assert_serving(client)


def test_typed_contents_errors(client, stub):
    # FP16/BF16 have no typed field: contents of another type are refused, as Triton does.
    request = raw_request("echo_fp16", ("INPUT0", "FP16", [2], b""), raw=False)
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    expect_rpc_error(stub, request, "unexpected explicit tensor data for input tensor 'INPUT0' for model "
                                    "'echo_fp16' of type 'FP32', expected datatype 'FP16'")
    request = raw_request("echo_int32", ("INPUT0", "INT32", [2], b""), raw=False)
    request.inputs[0].contents.int_contents.extend([1, 2])
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    expect_rpc_error(stub, request, "binary data was already supplied")
    # Raw and typed contents may not be mixed (Triton rejects it).
    a = np.arange(16, dtype=np.int32)
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], a.tobytes()))
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[16]).contents.int_contents.extend(a.tolist())
    expect_rpc_error(stub, request, "contents field must not be specified when using raw_input_contents for "
                                    "'INPUT1' for model 'add_sub'")
    # Unknown datatype.
    request = raw_request("add_sub", ("INPUT0", "FOO", [16], b""), raw=False)
    request.inputs[0].contents.int_contents.extend(a.tolist())
    expect_rpc_error(stub, request, "unexpected explicit tensor data for input tensor 'INPUT0' for model 'add_sub' "
                                    "of type 'INT32', expected datatype '<invalid>'")
    # Element count mismatch: checked like raw data, as Triton does.
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], b""), ("INPUT1", "INT32", [16], b""), raw=False)
    request.inputs[0].contents.int_contents.extend(a[:15].tolist())
    request.inputs[1].contents.int_contents.extend(a.tolist())
    expect_rpc_error(stub, request, "input byte size mismatch for input 'INPUT0' for model 'add_sub'. "
                                    "Expected 64, got 60")
    request = raw_request("echo_bytes", ("INPUT0", "BYTES", [3], b""), raw=False)
    request.inputs[0].contents.bytes_contents.append(b"one")
    expect_rpc_error(stub, request, "expected 3 string elements for inference input 'INPUT0'")
    assert_serving(client)


def test_bytes_model(client):
    text = np.array([b"edge", b"kernel", b""], dtype=np.object_)
    t = grpcclient.InferInput("TEXT", [3], "BYTES")
    t.set_data_from_numpy(text)
    result = client.infer("upper", [t])
    assert list(result.as_numpy("UPPER")) == [b"EDGE", b"KERNEL", b""]
    np.testing.assert_array_equal(result.as_numpy("LENGTH"), [4, 6, 0])


def test_batched_model(client):
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    t = grpcclient.InferInput("INPUT0", [3, 16], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("identity", [t]).as_numpy("OUTPUT0"), x)


def test_4k_frame(client):
    frame = np.random.default_rng(4).integers(0, 256, 3840 * 2160 * 3, dtype=np.uint8)
    t = grpcclient.InferInput("INPUT0", [frame.size], "UINT8")
    t.set_data_from_numpy(frame)
    out = client.infer("echo_uint8", [t]).as_numpy("OUTPUT0")
    assert out.shape == frame.shape
    assert np.array_equal(out, frame)


def test_message_size_limit(explicit):
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        big = np.zeros(1 << 19, dtype=np.int32)  # 2 MiB > the server's 1 MiB limit
        with pytest.raises(InferenceServerException) as e:
            c.infer("add_sub", add_sub_inputs(big, big))
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "Received message larger than max" in e.value.message()
        assert_serving(c)
    finally:
        c.close()


# -- models that fail --------------------------------------------------------------------------------------
def test_model_that_raises(client):
    t = grpcclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.ones(2, np.float32))
    expect_error(client, "this model always fails", "INTERNAL", lambda: client.infer("raises", [t]))
    expect_error(client, "this model always fails", "INTERNAL", lambda: client.infer("raises", [t]))


def test_model_error_response(client):
    t = grpcclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.array([1, -1], np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("error_response", [t])
    assert "negative input" in e.value.message()
    assert e.value.status() != "StatusCode.OK"
    t.set_data_from_numpy(np.array([1, 2], np.float32))
    np.testing.assert_array_equal(client.infer("error_response", [t]).as_numpy("OUTPUT0"), [1, 2])
    assert_serving(client)


def test_failed_models_in_repository_index(client):
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("add_sub", "1")].state == "READY"
    assert index[("broken_init", "1")].state == "UNAVAILABLE"
    assert "cannot initialize on purpose" in index[("broken_init", "1")].reason
    broken = [m for (name, _), m in index.items() if name == "broken_config"]
    assert len(broken) == 1 and broken[0].state != "READY"
    ready = client.get_model_repository_index(as_json=True)
    assert any(m["name"] == "add_sub" for m in ready["models"])


# -- bad input ---------------------------------------------------------------------------------------------
def test_unknown_model(client):
    a = np.arange(16, dtype=np.int32)
    expect_error(client, "Request for unknown model: 'nope' is not found", "NOT_FOUND",
                 lambda: client.infer("nope", add_sub_inputs(a, a)))


def test_unknown_input(client):
    a = np.arange(16, dtype=np.int32)
    extra = grpcclient.InferInput("INPUT9", [16], "INT32")
    extra.set_data_from_numpy(a)
    expect_error(client, "unexpected inference input 'INPUT9' for model 'add_sub'", "INVALID_ARGUMENT",
                 lambda: client.infer("add_sub", add_sub_inputs(a, a)[:1] + [extra]))
    expect_error(client, "expected 2 inputs but got 3 inputs for model 'add_sub'", "INVALID_ARGUMENT",
                 lambda: client.infer("add_sub", add_sub_inputs(a, a) + [extra]))


def test_missing_input(client):
    a = np.arange(16, dtype=np.int32)
    expect_error(client, "expected 2 inputs but got 1 inputs for model 'add_sub'", "INVALID_ARGUMENT",
                 lambda: client.infer("add_sub", add_sub_inputs(a, a)[:1]))


def test_unknown_output(client):
    a = np.arange(16, dtype=np.int32)
    expect_error(client, "unexpected inference output 'OUTPUT7' for model 'add_sub'", "INVALID_ARGUMENT",
                 lambda: client.infer("add_sub", add_sub_inputs(a, a),
                                      outputs=[grpcclient.InferRequestedOutput("OUTPUT7")]))


def test_wrong_shape(client):
    a = np.arange(15, dtype=np.int32)
    expect_error(client, "unexpected shape for input 'INPUT0' for model 'add_sub'", "INVALID_ARGUMENT",
                 lambda: client.infer("add_sub", add_sub_inputs(a, a)))


def test_wrong_datatype(client):
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        t = grpcclient.InferInput(name, [16], "FP32")
        t.set_data_from_numpy(np.ones(16, np.float32))
        inputs.append(t)
    expect_error(client, "inference input 'INPUT0' data-type is 'FP32', but model 'add_sub' expects 'INT32'",
                 "INVALID_ARGUMENT", lambda: client.infer("add_sub", inputs))


def test_batch_too_large(client):
    t = grpcclient.InferInput("INPUT0", [65, 16], "FP32")
    t.set_data_from_numpy(np.ones((65, 16), np.float32))
    expect_error(client, "inference request batch-size must be <= 64 for 'identity'", "INVALID_ARGUMENT",
                 lambda: client.infer("identity", [t]))
    t = grpcclient.InferInput("INPUT0", [16], "FP32")
    t.set_data_from_numpy(np.ones(16, np.float32))
    expect_error(client, "Expected [-1,16], got [16]. NOTE: Setting a non-zero max_batch_size", "INVALID_ARGUMENT",
                 lambda: client.infer("identity", [t]))


def test_wrong_raw_byte_size(client, stub):
    a = np.arange(16, dtype=np.int32).tobytes()
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], a[:60]), ("INPUT1", "INT32", [16], a))
    expect_rpc_error(stub, request, "input byte size mismatch for input 'INPUT0' for model 'add_sub'. "
                                    "Expected 64, got 60")
    assert_serving(client)


def test_raw_contents_count_mismatch(client, stub):
    a = np.arange(16, dtype=np.int32).tobytes()
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], a), ("INPUT1", "INT32", [16], a))
    del request.raw_input_contents[1]
    expect_rpc_error(stub, request, "unable to find data for input tensor 'INPUT1' for model 'add_sub' in request.")
    # More raw contents than inputs: Triton ignores the extra ones.
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], a), ("INPUT1", "INT32", [16], a))
    request.raw_input_contents.append(b"extra")
    response = stub.ModelInfer(request)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.int32), 2 * np.arange(16))
    assert_serving(client)


def test_bad_bytes_serialization(client, stub):
    request = raw_request("echo_bytes", ("INPUT0", "BYTES", [2], b"\x05\x00\x00\x00abc"))
    expect_rpc_error(stub, request, "INPUT0")
    assert_serving(client)


def test_bad_request_parameters(client, stub):
    a = np.arange(16, dtype=np.int32).tobytes()
    request = raw_request("add_sub", ("INPUT0", "INT32", [16], a), ("INPUT1", "INT32", [16], a))
    request.parameters["priority"].string_param = "high"
    expect_rpc_error(stub, request, "invalid value type for 'priority' parameter")
    del request.parameters["priority"]
    request.parameters["triton_secret"].bool_param = True
    expect_rpc_error(stub, request, "parameter keys starting with 'triton_' are reserved")
    del request.parameters["triton_secret"]
    request.parameters["ratio"].double_param = 0.5
    expect_rpc_error(stub, request, "invalid value type for 'ratio' parameter")
    assert_serving(client)


def test_malformed_message(client, server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            infer(b"\x0a\xff\xff\xff\x0f", timeout=10)  # a length that runs past the end
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "Failed to parse" in e.value.details()
    assert_serving(client)


def test_malformed_message_on_a_stream(client, server):
    """A stream's request messages are taken as they are read (Connection._deliver); one that does not parse
    still ends the stream with Triton's status, after the good ones before it were answered."""
    a = np.arange(16, dtype=np.int32).tobytes()
    good = raw_request("add_sub", ("INPUT0", "INT32", [16], a), ("INPUT1", "INT32", [16], a)).SerializeToString()
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
        answers = []
        with pytest.raises(grpc.RpcError) as e:
            for answer in infer(iter([good, good, b"\x0a\xff\xff\xff\x0f"]), timeout=10):
                answers.append(service_pb2.ModelStreamInferResponse.FromString(answer))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "Failed to parse" in e.value.details()
    assert len(answers) <= 2 and all(not r.error_message and r.infer_response.model_name == "add_sub" for r in answers)
    assert_serving(client)


# -- streaming ---------------------------------------------------------------------------------------------
class Collector:
    """A start_stream callback that queues (result, error) pairs."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def next(self):
        return self.items.get(timeout=30)


def test_stream_bad_request_then_good(client):
    collect = Collector()
    client.start_stream(callback=collect)
    try:
        a = np.arange(16, dtype=np.int32)
        client.async_stream_infer("nope", add_sub_inputs(a, a), request_id="bad-1")
        result, error = collect.next()
        assert result is None
        assert "Request for unknown model: 'nope' is not found" in error.message()
        client.async_stream_infer("add_sub", add_sub_inputs(a, a[::-1].copy()), request_id="good-1")
        result, error = collect.next()
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a[::-1])
        response = result.get_response()
        assert response.id == "good-1"
        assert response.parameters["triton_final_response"].bool_param is True
        # A model failure on the stream is an error response too; the stream stays open.
        t = grpcclient.InferInput("INPUT0", [2], "FP32")
        t.set_data_from_numpy(np.ones(2, np.float32))
        client.async_stream_infer("raises", [t], request_id="bad-2")
        result, error = collect.next()
        assert result is None and "this model always fails" in error.message()
        wrong = add_sub_inputs(a[:15], a[:15])
        client.async_stream_infer("add_sub", wrong, request_id="bad-3")
        result, error = collect.next()
        assert result is None and "unexpected shape for input 'INPUT0'" in error.message()
        client.async_stream_infer("add_sub", add_sub_inputs(a, a), request_id="good-2")
        result, error = collect.next()
        assert error is None and result.get_response().id == "good-2"
    finally:
        client.stop_stream()
    assert_serving(client)


def test_stream_responses_in_request_order(client):
    collect = Collector()
    client.start_stream(callback=collect)
    rng = np.random.default_rng(3)
    pairs = [(rng.integers(0, 100, 16, dtype=np.int32), rng.integers(0, 100, 16, dtype=np.int32))
             for _ in range(40)]
    try:
        for i, (a, b) in enumerate(pairs):
            client.async_stream_infer("add_sub", add_sub_inputs(a, b), request_id=str(i))
        for i, (a, b) in enumerate(pairs):
            result, error = collect.next()
            assert error is None
            assert result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    finally:
        client.stop_stream()


def test_compressed_stream_keeps_request_order(client):
    """A gzip stream (tritonclient's start_stream(compression_algorithm=...)): every response goes through the
    stream's writer to be compressed, big ones off the event loop, and request order still holds."""
    collect = Collector()
    client.start_stream(callback=collect, compression_algorithm="gzip")
    big = np.arange(1 << 18, dtype=np.int32)  # 1 MiB: compressed in a thread
    tb = grpcclient.InferInput("INPUT0", [big.size], "INT32")
    tb.set_data_from_numpy(big)
    try:
        for i in range(12):
            if i % 3 == 1:
                client.async_stream_infer("echo_int32", [tb], request_id=str(i))
            else:
                a = np.full(16, i, np.int32)
                client.async_stream_infer("add_sub", add_sub_inputs(a, a), request_id=str(i))
        for i in range(12):
            result, error = collect.next()
            assert error is None and result.get_response().id == str(i)
            if i % 3 == 1:
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big)
            else:
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full(16, 2 * i, np.int32))
    finally:
        client.stop_stream()


def test_stream_cancelled_by_client(client, server):
    """A client that goes away with requests in flight costs the server nothing."""
    for _ in range(3):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        c.start_stream(callback=Collector())
        frame = np.zeros(1 << 20, np.uint8)
        t = grpcclient.InferInput("INPUT0", [frame.size], "UINT8")
        t.set_data_from_numpy(frame)
        for i in range(5):
            c.async_stream_infer("echo_uint8", [t], request_id=str(i))
        c.stop_stream(cancel_requests=True)
        c.close()
    assert_serving(client)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, algorithm):
    """tritonclient's compression_algorithm: the request is decompressed, the answer compressed alike."""
    a = np.arange(4096, dtype=np.int32)
    t0 = grpcclient.InferInput("INPUT0", [a.size], "INT32")
    t0.set_data_from_numpy(a)
    result = client.infer("echo_int32", [t0], compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)
    b = np.arange(16, dtype=np.int32)
    result = client.infer("add_sub", add_sub_inputs(b, b), compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * b)
    assert_serving(client)


def test_aio_client_and_stream(server):
    async def main():
        c = aioclient.InferenceServerClient(server.grpc_url)
        try:
            assert await c.is_server_live()
            assert (await c.get_model_metadata("add_sub")).name == "add_sub"
            a = np.arange(16, dtype=np.int32)
            result = await c.infer("add_sub", add_sub_inputs(a, a))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)

            async def requests():
                yield {"model_name": "nope", "inputs": add_sub_inputs(a, a), "request_id": "x"}
                for i in range(5):
                    yield {"model_name": "add_sub", "inputs": add_sub_inputs(a, a + i), "request_id": str(i)}

            answers = [(r, e) async for r, e in c.stream_infer(requests())]
            assert answers[0][0] is None and "unknown model" in answers[0][1].message()
            for i, (r, e) in enumerate(answers[1:]):
                assert e is None
                np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), np.full(16, -i, np.int32))
        finally:
            await c.close()

    asyncio.run(main())


def repeat_input(n: int):
    t = grpcclient.InferInput("IN", [1], "INT32")
    t.set_data_from_numpy(np.array([n], np.int32))
    return [t]


def test_decoupled_stream(explicit):
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    collect = Collector()
    c.start_stream(callback=collect)
    try:
        # n responses; the model's final flag comes alone, so without the opt-in nothing marks the end.
        c.async_stream_infer("repeat", repeat_input(3), request_id="r1")
        got = [collect.next() for _ in range(3)]
        for i, (result, error) in enumerate(got):
            assert error is None
            response = result.get_response()
            assert response.id == "r1"
            assert response.parameters["triton_final_response"].bool_param is False
            assert result.as_numpy("OUT").tolist() == [i]
        # With triton_enable_empty_final_response, Triton's empty final response follows.
        c.async_stream_infer("repeat", repeat_input(2), request_id="r2", enable_empty_final_response=True)
        got = [collect.next() for _ in range(3)]
        assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got] == [
            False, False, True]
        final = got[2][0].get_response()
        assert final.id == "r2" and final.model_name == "repeat" and not final.outputs
        # Zero responses, then only the empty final one.
        c.async_stream_infer("repeat", repeat_input(0), request_id="r3", enable_empty_final_response=True)
        result, error = collect.next()
        assert error is None and result.get_response().parameters["triton_final_response"].bool_param is True
        # An error response from the model, then the stream goes on.
        c.async_stream_infer("repeat", repeat_input(-1), request_id="r4")
        result, error = collect.next()
        assert result is None and "negative count" in error.message()
        c.async_stream_infer("repeat", repeat_input(1), request_id="r5")
        result, error = collect.next()
        assert error is None and result.get_response().id == "r5"
        # An ordinary model on the same stream.
        a = np.arange(16, dtype=np.int32)
        c.async_stream_infer("add_sub", add_sub_inputs(a, a), request_id="r6")
        result, error = collect.next()
        assert error is None and result.get_response().parameters["triton_final_response"].bool_param is True
    finally:
        c.stop_stream()
    assert collect.items.empty()
    # ModelInfer refuses decoupled models, as Triton does.
    expect_error(c, "ModelInfer RPC doesn't support models with decoupled transaction policy", "UNIMPLEMENTED",
                 lambda: c.infer("repeat", repeat_input(1)))
    c.close()


# -- statistics, repository, shared memory, trace, logging ---------------------------------------------------
def test_statistics(client):
    assert_serving(client)
    stats = client.get_inference_statistics("add_sub")
    assert len(stats.model_stats) == 1
    entry = stats.model_stats[0]
    assert entry.name == "add_sub" and entry.version == "1"
    assert entry.inference_count >= 1 and entry.execution_count >= 1
    assert entry.inference_stats.success.count >= 1
    assert entry.last_inference > 0
    assert entry.batch_stats
    everything = client.get_inference_statistics(as_json=True)
    assert any(m["name"] == "add_sub" for m in everything["model_stats"])
    expect_error(client, "requested model 'nope' is not available", "INVALID_ARGUMENT",
                 lambda: client.get_inference_statistics("nope"))


def test_repository_load_unload(explicit):
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        assert not c.is_model_ready("upper")
        assert c.is_server_ready()
        c.load_model("upper")
        assert c.is_model_ready("upper")
        states = {m.name: m.state for m in c.get_model_repository_index().models}
        assert states["upper"] == "READY"
        c.unload_model("upper")
        assert not c.is_model_ready("upper")
        # A config override (Triton's 'config' load parameter), as JSON.
        config = c.get_model_config("add_sub", as_json=True)["config"]
        config["max_batch_size"] = 0
        c.load_model("add_sub", config=json.dumps(config))
        assert_serving(c)
        with pytest.raises(InferenceServerException) as e:
            c.load_model("add_sub", config=json.dumps(config), files={"file:1/model.py": b"x = 1\n"})
        # Files sent replace the model's directory: this model.py has no TritonPythonModel; the old one serves on.
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert e.value.message().startswith("load failed for model 'add_sub': version 1 is at UNAVAILABLE state")
        with pytest.raises(InferenceServerException) as e:
            c.load_model("nope")
        assert e.value.status() == "StatusCode.INTERNAL"
        assert "failed to load 'nope'" in e.value.message()
        assert_serving(c)
    finally:
        c.close()


def test_load_unload_need_explicit_mode(client):
    for call in (lambda: client.load_model("add_sub"), lambda: client.unload_model("add_sub")):
        expect_error(client, "explicit model load / unload is not allowed if polling is enabled", "UNAVAILABLE", call)


def test_repository_load_parameters(explicit):
    with grpc.insecure_channel(explicit.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.RepositoryModelLoadRequest(model_name="add_sub")
        request.parameters["colour"].string_param = "blue"
        with pytest.raises(grpc.RpcError) as e:
            stub.RepositoryModelLoad(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unrecognized load parameter 'colour'." in e.value.details()
        request = service_pb2.RepositoryModelLoadRequest(model_name="add_sub", repository_name="elsewhere")
        with pytest.raises(grpc.RpcError) as e:
            stub.RepositoryModelLoad(request)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        request = service_pb2.RepositoryModelUnloadRequest(model_name="add_sub")
        request.parameters["unload_dependents"].string_param = "yes"
        with pytest.raises(grpc.RpcError) as e:
            stub.RepositoryModelUnload(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def region():
    key = f"/ek_grpc_test_{os.getpid()}"
    handle = shm.create_shared_memory_region("grpc_region", key, 256)
    yield key, handle
    shm.destroy_shared_memory_region(handle)


def test_system_shared_memory(client, region):
    key, handle = region
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 7, dtype=np.int32)
    shm.set_shared_memory_region(handle, [a, b])
    client.register_system_shared_memory("grpc_in", key, 128)
    client.register_system_shared_memory("grpc_out", key, 128, offset=128)
    try:
        status = client.get_system_shared_memory_status()
        assert status.regions["grpc_in"].key == key
        assert status.regions["grpc_out"].offset == 128
        assert client.get_system_shared_memory_status("grpc_in").regions["grpc_in"].byte_size == 128
        inputs = [grpcclient.InferInput("INPUT0", [16], "INT32"), grpcclient.InferInput("INPUT1", [16], "INT32")]
        inputs[0].set_shared_memory("grpc_in", 64)
        inputs[1].set_shared_memory("grpc_in", 64, offset=64)
        # OUTPUT0 into the region, OUTPUT1 back in the response: raw contents stay aligned with outputs.
        out0 = grpcclient.InferRequestedOutput("OUTPUT0")
        out0.set_shared_memory("grpc_out", 64)
        out1 = grpcclient.InferRequestedOutput("OUTPUT1")
        result = client.infer("add_sub", inputs, outputs=[out0, out1])
        response = result.get_response()
        assert len(response.raw_output_contents) == len(response.outputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        got = shm.get_contents_as_numpy(handle, np.int32, [16], offset=128)
        np.testing.assert_array_equal(got, a + b)
        with pytest.raises(InferenceServerException) as e:
            client.register_system_shared_memory("grpc_in", key, 128)
        assert e.value.status() == "StatusCode.ALREADY_EXISTS"
        with pytest.raises(InferenceServerException) as e:
            client.get_system_shared_memory_status("nope")
        assert e.value.status() == "StatusCode.NOT_FOUND"
        inputs[0].set_shared_memory("nope", 64)
        expect_error(client, "Unable to find shared memory region: 'nope'", "NOT_FOUND",
                     lambda: client.infer("add_sub", inputs))
    finally:
        client.unregister_system_shared_memory("grpc_in")
        client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions


def test_shared_memory_parameters_are_checked_as_triton_does(client, stub, region):
    """Triton 2.51's gRPC front words for shared_memory_* parameters of the wrong type or missing (its
    ParseSharedMemoryParams), for inputs and outputs; the region is registered, so only the parameters fail."""
    key, _ = region
    client.register_system_shared_memory("grpc_params", key, 128)
    try:
        def infer(setup_input, setup_output=None):
            request = raw_request("add_sub", ("INPUT1", "INT32", [16], bytes(64)))
            tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[16])
            setup_input(tensor.parameters)
            if setup_output is not None:
                setup_output(request.outputs.add(name="OUTPUT0").parameters)
            return request

        def shm(params, region="grpc_params", offset=None, size=64):
            if region is not None:
                params["shared_memory_region"].string_param = region
            if offset is not None:
                params["shared_memory_offset"].int64_param = offset
            if size is not None:
                params["shared_memory_byte_size"].int64_param = size

        cases = [
            (lambda p: p["shared_memory_region"].MergeFrom(service_pb2.InferParameter(int64_param=1)),
             "invalid value type for 'shared_memory_region' parameter for tensor 'INPUT0', expected string_param."),
            (lambda p: shm(p, size=None),
             "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for tensor "
             "'INPUT0'"),
            (lambda p: shm(p, region=None, offset=0, size=None),
             "'shared_memory_offset' can not be specified without 'shared_memory_region' parameter for tensor "
             "'INPUT0'"),
            (lambda p: shm(p, region=None),
             "'shared_memory_byte_size' can not be specified without 'shared_memory_region' parameter for tensor "
             "'INPUT0'"),
            (lambda p: (shm(p, size=None), p["shared_memory_byte_size"].MergeFrom(
                service_pb2.InferParameter(string_param="64"))),
             "invalid value type for 'shared_memory_byte_size' parameter for tensor 'INPUT0', expected int64_param."),
            (lambda p: (shm(p), p["shared_memory_offset"].MergeFrom(service_pb2.InferParameter(bool_param=True))),
             "invalid value type for 'shared_memory_offset' parameter for tensor 'INPUT0', expected int64_param."),
        ]
        for setup, message in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(infer(setup))
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        with pytest.raises(grpc.RpcError) as e:  # an output's parameters, in the same words
            stub.ModelInfer(infer(shm, lambda p: shm(p, size=None)))
        assert e.value.details() == ("'shared_memory_byte_size' must be specified along with 'shared_memory_region' "
                                     "parameter for tensor 'OUTPUT0'")
        assert len(stub.ModelInfer(infer(shm, shm)).outputs) == 1  # well-formed: served
    finally:
        client.unregister_system_shared_memory("grpc_params")
    assert_serving(client)


def test_cuda_shared_memory_is_unsupported(client):
    # Like a CPU-only Triton: no region exists and unregistering succeeds; registering fails clearly.
    assert not client.get_cuda_shared_memory_status().regions
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("x")
    expect_error(client, "Unable to find cuda shared memory region: 'x'", "NOT_FOUND",
                 lambda: client.get_cuda_shared_memory_status("x"))
    expect_error(client, "CUDA shared memory is not supported", "UNIMPLEMENTED",
                 lambda: client.register_cuda_shared_memory("x", b"\0" * 64, 0, 64))


def test_trace_and_log_settings(client, stub):
    trace = client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_level"]["value"] == ["OFF"]
    assert trace["trace_rate"]["value"] == ["1000"]
    assert client.update_trace_settings(settings={"trace_rate": "5"}).settings["trace_level"].value == ["OFF"]
    expect_error(client, "Request for unknown model", "INVALID_ARGUMENT",
                 lambda: client.get_trace_settings(model_name="nope"))
    log = client.get_log_settings().settings
    before = log["log_verbose_level"].uint32_param
    assert log["log_info"].bool_param is True
    assert log["log_format"].string_param == "default"
    try:
        updated = client.update_log_settings({"log_verbose_level": before + 1}).settings
        assert updated["log_verbose_level"].uint32_param == before + 1
    finally:
        client.update_log_settings({"log_verbose_level": before})
    request = service_pb2.LogSettingsRequest()
    request.settings["log_info"].string_param = "yes"  # tritonclient would coerce it
    with pytest.raises(grpc.RpcError) as e:
        stub.LogSettings(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "expect boolean for 'log_info'"


# -- HTTP and gRPC together --------------------------------------------------------------------------------
def test_concurrent_http_and_grpc(server):
    """Threads send over both protocols at once; every answer is checked."""
    count = 60
    rng = np.random.default_rng(11)
    work = [(proto, rng.integers(-500, 500, 16, dtype=np.int32), rng.integers(-500, 500, 16, dtype=np.int32))
            for proto in ("grpc", "http") for _ in range(count)]
    local = threading.local()
    clients: list = []

    def run(item):
        proto, a, b = item
        if proto == "grpc":
            c = getattr(local, "grpc", None)
            if c is None:
                c = local.grpc = grpcclient.InferenceServerClient(server.grpc_url)
                clients.append(c)
            result = c.infer("add_sub", add_sub_inputs(a, b))
        else:
            c = getattr(local, "http", None)
            if c is None:
                c = local.http = httpclient.InferenceServerClient(server.http_url)
                clients.append(c)
            inputs = [httpclient.InferInput("INPUT0", [16], "INT32"), httpclient.InferInput("INPUT1", [16], "INT32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = c.infer("add_sub", inputs)
        return np.array_equal(result.as_numpy("OUTPUT0"), a + b) and np.array_equal(result.as_numpy("OUTPUT1"), a - b)

    order = rng.permutation(len(work))
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(run, [work[i] for i in order]))
    finally:
        for c in clients:
            c.close()
    assert len(answers) == 2 * count and all(answers)


# -- deadlines, cancellation, restricted protocol ---------------------------------------------------------
def test_deadlines_are_answered_cleanly(client, server):
    """A deadline that passes (or is already over on arrival) is DEADLINE_EXCEEDED, never an error log."""
    t = grpcclient.InferInput("INPUT0", [1], "FP32")
    t.set_data_from_numpy(np.ones(1, np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("slow_a", [t], client_timeout=0.05)
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    from tests.h2client import H2Client

    request = service_pb2.ModelInferRequest(model_name="add_sub")
    c = H2Client(int(server.grpc_url.rsplit(":", 1)[1]))
    try:
        s = c.wait(c.call("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString(),
                          [("grpc-timeout", "0n")]))
        assert s.status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and s.message == "Deadline Exceeded"
    finally:
        c.close()
    assert_serving(client)
    assert "Traceback" not in server.log() and "unhandled error" not in server.log()


def test_cancelled_call_costs_nothing(client, server):
    """RST_STREAM from the client (grpc's cancel) reaches the request: the server goes on, nothing leaks."""
    t = grpcclient.InferInput("INPUT0", [1], "FP32")
    t.set_data_from_numpy(np.ones(1, np.float32))
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        request = service_pb2.ModelInferRequest(model_name="slow_b")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
        request.raw_input_contents.append(np.ones(1, np.float32).tobytes())
        del tensor
        futures = [infer.future(request.SerializeToString()) for _ in range(3)]
        time.sleep(0.1)
        for f in futures:
            f.cancel()
        for f in futures:
            assert f.cancelled()
    assert_serving(client)
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def restricted(tmp_path_factory):
    srv = KernelServer(ROOT / "examples" / "models",
                       "--grpc-restricted-protocol", "shared-memory,model-repository,statistics:admin-key=secret",
                       "--grpc-restricted-protocol", "trace,logging,model-config:ops=yes")
    srv.start(tmp_path_factory.mktemp("restricted") / "server.log")
    yield srv
    assert srv.stop() == 0


def test_restricted_protocol(restricted):
    """--grpc-restricted-protocol: Triton's categories, its metadata key prefix and UNAVAILABLE text."""
    c = grpcclient.InferenceServerClient(restricted.grpc_url)
    admin = {"triton-grpc-protocol-admin-key": "secret"}
    ops = {"triton-grpc-protocol-ops": "yes"}
    try:
        refused = [
            (lambda h: c.get_system_shared_memory_status(headers=h), admin),
            (lambda h: c.get_cuda_shared_memory_status(headers=h), admin),
            (lambda h: c.unregister_system_shared_memory(headers=h), admin),
            (lambda h: c.get_model_repository_index(headers=h), admin),
            (lambda h: c.get_inference_statistics("add_sub", headers=h), admin),
            (lambda h: c.get_trace_settings(headers=h), ops),
            (lambda h: c.get_log_settings(headers=h), ops),
            (lambda h: c.get_model_config("add_sub", headers=h), ops),
        ]
        for call, headers in refused:
            key = next(iter(headers))
            for wrong in (None, {key: "wrong"}):
                with pytest.raises(InferenceServerException) as e:
                    call(wrong)
                assert e.value.status() == "StatusCode.UNAVAILABLE"
                assert e.value.message() == f"This protocol is restricted, expecting header '{key}'"
            call(headers)  # the right value: answered
        with pytest.raises(InferenceServerException):
            c.get_model_config("add_sub", headers=admin)  # a key opens only its own categories
        # Categories not restricted stay open.
        assert c.is_server_live() and c.is_model_ready("add_sub")
        assert c.get_model_metadata("add_sub").name == "add_sub"
        a = np.arange(16, dtype=np.int32)
        np.testing.assert_array_equal(c.infer("add_sub", add_sub_inputs(a, a)).as_numpy("OUTPUT0"), 2 * a)
    finally:
        c.close()


def test_decoupled_responses_do_not_wait_behind_ordinary_ones(client):
    """On one stream, a decoupled model's responses go out while an earlier ordinary request still runs."""
    collect = Collector()
    client.start_stream(callback=collect)
    try:
        t = grpcclient.InferInput("INPUT0", [1], "FP32")
        t.set_data_from_numpy(np.ones(1, np.float32))
        start = time.monotonic()
        client.async_stream_infer("slow_a", [t], request_id="slow")  # 400 ms
        fast = grpcclient.InferInput("IN", [3], "INT32")  # tests/models/repeat: one response per element
        fast.set_data_from_numpy(np.array([1, 2, 3], np.int32))
        client.async_stream_infer("repeat", [fast], request_id="fast")
        got = []
        for _ in range(4):
            result, error = collect.next()
            assert error is None, error
            got.append(result.get_response().id)
        assert got == ["fast", "fast", "fast", "slow"], got
        assert time.monotonic() - start >= 0.35
    finally:
        client.stop_stream()


# -- a stream's responses on their way out (protocol.grpc._StreamOut), without a server -------------------
class _FakeConn:
    max_message = 1 << 20

    def __init__(self, wire: list) -> None:
        self.paused = False
        self.wire = wire

    def send_data(self, call, data, flag, end) -> None:
        (call.out.append if call.blocked or call.out else self.wire.append)(data)


class _FakeStream:
    """What _StreamOut uses of a Call: ``blocked`` makes sends queue as if flow control held them."""

    def __init__(self) -> None:
        self.wire: list[bytes] = []
        self.conn = _FakeConn(self.wire)
        self.out: list[bytes] = []
        self.closed = False
        self.encoding = "identity"
        self.blocked = False
        self.sends = 0  # through the writer task

    async def send(self, item: bytes) -> None:
        self.sends += 1
        self.conn.send_data(self, item, 0, False)
        while self.out:
            await asyncio.sleep(0.001)


def test_stream_out_keeps_request_order_and_flow_control_order():
    from protocol.grpc.front import _StreamOut

    async def main() -> None:
        stream = _FakeStream()
        out = _StreamOut(stream)
        writer = asyncio.ensure_future(out.write())
        a, b, c = out.slot(), out.slot(), out.slot()
        out.fill(b, b"B")  # answered before the request ahead of it: waits
        out.put(b"d1")  # a decoupled model's response: goes at once
        assert stream.wire == [b"d1"]
        out.fill(a, b"A")  # A, then B behind it, from this callback: no writer involved
        assert stream.wire == [b"d1", b"A", b"B"] and stream.sends == 0
        out.fill(a, b"again")  # a second fill is ignored
        stream.blocked = True  # flow control holds the stream: C waits in its queue
        out.fill(c, b"C")
        out.put(b"d2")  # behind C: handed to the writer
        stream.blocked = False
        stream.wire.extend(stream.out)  # the window opens: C leaves, d2 still with the writer
        stream.out.clear()
        out.put(b"d3")  # must not overtake d2
        assert stream.wire == [b"d1", b"A", b"B", b"C"]
        out.queue.put_nowait(None)
        await asyncio.wait_for(writer, 5)
        assert stream.wire == [b"d1", b"A", b"B", b"C", b"d2", b"d3"]
        assert stream.sends == 2  # only d2 and d3 went through the writer

    asyncio.run(main())


@pytest.mark.parametrize(("version", "message"), [
    ("abc", "failed to get model version from specified version string 'abc' (details: stol), version should be an "
            "integral value > 0"),
    ("99999999999999999999", "failed to get model version from specified version string '99999999999999999999' "
                             "(details: stol), version should be an integral value > 0"),
    ("-1", "invalid model version specified '-1' , version should be an integral value > 0")])
def test_unreadable_model_version(client, version, message):
    """Triton reads a version string with std::stol before it looks the model up: INVALID_ARGUMENT on every RPC
    that names a version (ModelReady included), an unknown model's too (docs/triton-behaviour.md §7)."""
    a = np.arange(16, dtype=np.int32)
    inputs = [grpcclient.InferInput(n, [16], "INT32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(a)
    for call in (lambda: client.is_model_ready("add_sub", version), lambda: client.is_model_ready("nope", version),
                 lambda: client.get_model_metadata("add_sub", version),
                 lambda: client.get_model_config("add_sub", version),
                 lambda: client.get_inference_statistics("add_sub", version),
                 lambda: client.get_inference_statistics("", version),
                 lambda: client.infer("add_sub", inputs, model_version=version)):
        assert expect_error(client, message, "INVALID_ARGUMENT", call).message() == message
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error))
    try:
        client.async_stream_infer("add_sub", inputs, model_version=version)
        assert results.get(timeout=30).message() == message
    finally:
        client.stop_stream()


@pytest.mark.parametrize("version", ["+1", " 1", "1x", "01"])
def test_model_version_read_as_stol(client, version):
    """std::stol's leniency: leading blanks and a sign are read, what follows the digits is ignored."""
    assert client.is_model_ready("add_sub", version)
    assert client.get_model_metadata("add_sub", version).versions == ["1"]
    assert client.get_inference_statistics("add_sub", version).model_stats[0].version == "1"


def test_request_errors_word_for_word(client, stub):
    """Triton 2.51's exact texts (docs/triton-behaviour.md §7): the inputs it got listed last first, an empty
    missing list printed as ``]``, a negative size a wrong shape, an unknown datatype ``<invalid>``, BYTES
    walked as its core walks them."""
    a = np.arange(16, dtype=np.int32)

    def infer_error(*tensors) -> str:
        with pytest.raises(InferenceServerException) as e:
            client.infer(tensors[0][0], [_infer_input(*t) for t in tensors[1:]])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        return e.value.message()

    p = "[request id: <id_unknown>] "
    assert infer_error(("add_sub",), ("INPUT0", "INT32", a), ("INPUT1", "INT32", a), ("BOGUS", "INT32", a)) == (
        f"{p}expected 2 inputs but got 3 inputs for model 'add_sub'. Got input(s) ['BOGUS','INPUT1','INPUT0'], but "
        "missing required input(s) ]. Please provide all required input(s).")
    assert infer_error(("add_sub",), ("INPUT1", "INT32", a)) == (
        f"{p}expected 2 inputs but got 1 inputs for model 'add_sub'. Got input(s) ['INPUT1'], but missing required "
        "input(s) ['INPUT0']. Please provide all required input(s).")
    rpc = [("add_sub", [("INPUT0", "INT32", [-5], a.tobytes()), ("INPUT1", "INT32", [16], a.tobytes())],
            f"{p}unexpected shape for input 'INPUT0' for model 'add_sub'. Expected [16], got [-5]. "),
           ("add_sub", [("INPUT0", "INT32", [-1], a.tobytes()), ("INPUT1", "INT32", [16], a.tobytes())],
            f"{p}All input dimensions should be specified for input 'INPUT0' for model 'add_sub', got [-1]"),
           ("add_sub", [("INPUT0", "FOO", [16], a.tobytes()), ("INPUT1", "INT32", [16], a.tobytes())],
            f"{p}inference input 'INPUT0' data-type is '<invalid>', but model 'add_sub' expects 'INT32'"),
           ("upper", [("TEXT", "BYTES", [1], b"\x05\0\0\0a")],
            "incomplete string data for inference input 'TEXT', expecting string of length 5 but only 1 bytes "
            "available"),
           ("upper", [("TEXT", "BYTES", [1], b"\x01\0\0\0a\x01\0\0\0b")],
            f"{p}unexpected number of string elements 2 for inference input 'TEXT' for model 'upper', expecting 1"),
           ("upper", [("TEXT", "BYTES", [2], b"\x09\0\0\0a")],
            f"{p}expected 2 string elements for inference input 'TEXT' for model 'upper', got 1"),
           ("upper", [("TEXT", "BYTES", [1], b"\x01\0")],
            f"{p}incomplete string length indicator for inference input 'TEXT' for model 'upper', expecting 4 bytes "
            "but only 2 bytes available. Please make sure the string length indicator is in one buffer.")]
    for model, tensors, message in rpc:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(raw_request(model, *tensors))
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    with pytest.raises(InferenceServerException) as e:
        client.update_trace_settings(settings={"trace_count": "-5"})
    assert e.value.message() == "Unable to parse 'trace_count'. Expecting value >= -1, got: -5"  # HTTP: "got:-5"
    assert_serving(client)


def _infer_input(name: str, datatype: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# -- tensors with zero elements (docs/triton-behaviour.md, section 6) ---------------------------------------
def test_zero_batch_is_refused_with_tritons_words(client, stub):
    """A batching model's batch of 0 rows: INVALID_ARGUMENT, never a request left unanswered (it used to
    reach the scheduler as a sequence batcher's null request does, and nobody answered it)."""
    mismatch = "[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' for model 'identity'. " \
               "Expected 64, got 0"
    for request in (raw_request("identity", ("INPUT0", "FP32", [0, 16], b"")),
                    raw_request("identity", ("INPUT0", "FP32", [0, 16], b""), raw=False)):
        if not request.raw_input_contents:
            request.inputs[0].contents.fp32_contents.extend([])
            request.inputs[0].contents.SetInParent()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=20)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, mismatch)
    t = grpcclient.InferInput("INPUT0", [0, 16], "FP32")
    t.set_data_from_numpy(np.zeros((0, 16), np.float32))
    expect_error(client, mismatch, "INVALID_ARGUMENT", lambda: client.infer("identity", [t], client_timeout=20))
    t = grpcclient.InferInput("INPUT0", [0, 0], "FP32")  # Triton never answers this one (dims [-1])
    t.set_data_from_numpy(np.zeros((0, 0), np.float32))
    expect_error(client, "[request id: <id_unknown>] inference request batch-size must be >= 1 for 'batch_nodelay'",
                 "INVALID_ARGUMENT", lambda: client.infer("batch_nodelay", [t], client_timeout=20))


def test_zero_element_tensors_are_served(client, stub):
    t = grpcclient.InferInput("TEXT", [0], "BYTES")
    t.set_data_from_numpy(np.array([], dtype=np.object_))
    result = client.infer("upper", [t], client_timeout=20)
    assert result.as_numpy("UPPER").shape == (0,) and result.as_numpy("LENGTH").shape == (0,)
    request = raw_request("upper", ("TEXT", "BYTES", [0], b""), raw=False)
    request.inputs[0].contents.SetInParent()  # typed contents, no element
    response = stub.ModelInfer(request, timeout=20)
    assert [(o.name, list(o.shape)) for o in response.outputs] == [("UPPER", [0]), ("LENGTH", [0])]
    assert list(response.raw_output_contents) == [b"", b""]
    t = grpcclient.InferInput("INPUT0", [0], "FP32")
    t.set_data_from_numpy(np.zeros(0, np.float32))
    assert client.infer("echo_fp32", [t], client_timeout=20).as_numpy("OUTPUT0").shape == (0,)
    assert_serving(client)
