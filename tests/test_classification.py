"""Triton's classification extension (kernel.classification), through the official tritonclient.

Every expected answer below is what Triton 2.51 gave for the same request (docs/triton-behaviour.md,
"Classification"), except where a test says ours differs on purpose (400 for Triton's 500, a BYTES output).
"""

from __future__ import annotations

import json
import queue
import shutil
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from tests.support import ROOT, KernelServer

TYPED_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("F32", x.astype(np.float32)),
                pb_utils.Tensor("F16", x.astype(np.float16)),
                pb_utils.Tensor("F64", x.astype(np.float64)),
                pb_utils.Tensor("I8", x.astype(np.int8)),
                pb_utils.Tensor("B", x > 0),
                pb_utils.Tensor("S", np.array([str(v).encode() for v in x], dtype=np.object_)),
            ]))
        return out
"""
TYPED_CONFIG = """
backend: "python"
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [
  { name: "F32", data_type: TYPE_FP32, dims: [ -1 ], label_filename: "labels.txt" },
  { name: "F16", data_type: TYPE_FP16, dims: [ -1 ] },
  { name: "F64", data_type: TYPE_FP64, dims: [ -1 ] },
  { name: "I8", data_type: TYPE_INT8, dims: [ -1 ] },
  { name: "B", data_type: TYPE_BOOL, dims: [ -1 ] },
  { name: "S", data_type: TYPE_STRING, dims: [ -1 ] }
]
"""
COUNTDOWN_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(n):
                out = np.array([i, 10 - i, 5, 0], dtype=np.int32)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
COUNTDOWN_CONFIG = """
backend: "python"
model_transaction_policy { decoupled: true }
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 4 ] } ]
"""
X = [0.5, -1.25, 3.0, 2.0, 0.1]
JSON_ERROR = "Unable to set 'classification': attempt to access JSON non-unsigned-integer as unsigned-integer"


# add_sub behind an ensemble, its outputs renamed.
ENSEMBLE_CONFIG = """
platform: "ensemble"
input [ { name: "A", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "B", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "SUM", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "DIFF", data_type: TYPE_INT32, dims: [ 16 ] } ]
ensemble_scheduling { step [ { model_name: "add_sub" model_version: -1
  input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
  output_map { key: "OUTPUT0" value: "SUM" } output_map { key: "OUTPUT1" value: "DIFF" } } ] }
"""


def _model(repo, name: str, model: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(model)
    (repo / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("classification_repo")
    for name in ("add_sub", "identity"):  # identity: max_batch_size 64, FP32 [16]
        shutil.copytree(ROOT / "examples" / "models" / name, repo / name)
    _model(repo, "typed", TYPED_MODEL, TYPED_CONFIG)
    (repo / "typed" / "labels.txt").write_text("cat\ndog\n\nbird\n")  # index 2 has an empty label
    _model(repo, "countdown", COUNTDOWN_MODEL, COUNTDOWN_CONFIG)
    (repo / "ens" / "1").mkdir(parents=True)
    (repo / "ens" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    return repo


@pytest.fixture(scope="module")
def srv(repo, tmp_path_factory):
    server = KernelServer(repo).start(tmp_path_factory.mktemp("classification") / "server.log")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def http(srv):
    client = httpclient.InferenceServerClient(srv.http_url)
    yield client
    client.close()


@pytest.fixture
def grpc_client(srv):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    yield client
    client.close()


def _text(array) -> list:
    """Labels as str, whether tritonclient gave bytes (binary, gRPC) or str (JSON)."""
    return [x.decode() if isinstance(x, bytes) else x for x in np.asarray(array).reshape(-1).tolist()]


def _add_sub_inputs(module):
    a, b = np.arange(16, dtype=np.int32), np.ones(16, dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [16], "INT32"), module.InferInput("INPUT1", [16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def _typed_inputs(module, x=X):
    inp = module.InferInput("X", [len(x)], "FP32")
    inp.set_data_from_numpy(np.array(x, dtype=np.float32))
    return [inp]


def _post(srv, model: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{srv.http_url}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _add_sub_body(params: dict, **extra) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [16], "data": list(range(16))},
                       {"name": "INPUT1", "datatype": "INT32", "shape": [16], "data": [1] * 16}],
            "outputs": [{"name": "OUTPUT0", "parameters": params}], **extra}


# -- HTTP --------------------------------------------------------------------------------------------------
def test_http_json(srv):
    status, doc = _post(srv, "add_sub", _add_sub_body({"classification": 2}))
    assert status == 200
    assert doc["outputs"] == [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [2], "data": ["16:15", "15:14"]}]


@pytest.mark.parametrize("binary", [False, True])
def test_http_tritonclient(http, binary):
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = http.infer("add_sub", _add_sub_inputs(httpclient), outputs=outputs)
    out = result.get_output("OUTPUT0")
    assert (out["datatype"], out["shape"]) == ("BYTES", [3])
    assert ("binary_data_size" in out.get("parameters", {})) is binary
    assert _text(result.as_numpy("OUTPUT0")) == ["16:15", "15:14", "14:13"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.arange(16) - 1)  # not classified


def test_http_binary_labels_are_length_prefixed(srv):
    body = json.dumps(_add_sub_body({"classification": 2, "binary_data": True})).encode()
    request = urllib.request.Request(f"http://{srv.http_url}/v2/models/add_sub/infer", body, method="POST")
    with urllib.request.urlopen(request) as response:
        length = int(response.headers["Inference-Header-Content-Length"])
        data = response.read()
    header = json.loads(data[:length])
    assert header["outputs"] == [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [2],
                                  "parameters": {"binary_data_size": 18}}]
    assert data[length:] == b"\x05\x00\x00\x0016:15\x05\x00\x00\x0015:14"


def test_http_listed_outputs_ignore_binary_data_output(srv):
    """Triton: the request's binary_data_output does not reach a listed output (classified or not)."""
    body = _add_sub_body({"classification": 2}, parameters={"binary_data_output": True})
    body["outputs"].append({"name": "OUTPUT1"})
    status, doc = _post(srv, "add_sub", body)  # (json.loads would fail on a binary body)
    assert status == 200
    assert doc["outputs"][0]["data"] == ["16:15", "15:14"]
    assert doc["outputs"][1]["data"] == list(range(-1, 15))


def test_http_zero_and_32_bit_counts(srv):
    status, doc = _post(srv, "add_sub", _add_sub_body({"classification": 0}))  # 0: not classified
    assert status == 200 and doc["outputs"][0]["datatype"] == "INT32" and doc["outputs"][0]["shape"] == [16]
    status, doc = _post(srv, "add_sub", _add_sub_body({"classification": (1 << 32) + 2}))  # read as uint32
    assert status == 200 and doc["outputs"][0]["data"] == ["16:15", "15:14"]


def test_http_count_larger_than_the_tensor(http):
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=False, class_count=20)]
    result = http.infer("add_sub", _add_sub_inputs(httpclient), outputs=outputs)
    assert _text(result.as_numpy("OUTPUT0")) == [f"{v}:{v - 1}" for v in range(16, 0, -1)]


@pytest.mark.parametrize("value", [-1, "2", 2.0, True, None])
def test_http_invalid_count_is_400_with_tritons_words(srv, value):
    assert _post(srv, "add_sub", _add_sub_body({"classification": value})) == (400, {"error": JSON_ERROR})


@pytest.mark.parametrize("value", [2, -1])
def test_http_classification_with_shared_memory(srv, value):
    params = {"classification": value, "shared_memory_region": "nope", "shared_memory_byte_size": 64}
    assert _post(srv, "add_sub", _add_sub_body(params)) == (
        400, {"error": "Output can't set both 'shared_memory_region' and 'classification'"})


# -- gRPC --------------------------------------------------------------------------------------------------
def test_grpc_tritonclient(grpc_client):
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=3), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = grpc_client.infer("add_sub", _add_sub_inputs(grpcclient), outputs=outputs)
    out = result.get_output("OUTPUT0")
    assert (out.datatype, list(out.shape)) == ("BYTES", [3])
    assert result.as_numpy("OUTPUT0").tolist() == [b"16:15", b"15:14", b"14:13"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.arange(16) - 1)


def _stub_infer(srv, setup) -> service_pb2.ModelInferResponse:
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, value in (("INPUT0", np.arange(16, dtype=np.int32)), ("INPUT1", np.ones(16, dtype=np.int32))):
        request.inputs.add(name=name, datatype="INT32", shape=[16])
        request.raw_input_contents.append(value.tobytes())
    setup(request.outputs.add(name="OUTPUT0").parameters)
    with grpc.insecure_channel(srv.grpc_url) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def test_grpc_count_is_read_as_uint32(srv):
    response = _stub_infer(srv, lambda p: setattr(p["classification"], "int64_param", (1 << 32) + 2))
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == [b"16:15", b"15:14"]


@pytest.mark.parametrize(("member", "value", "message"), [
    ("int64_param", 0, "invalid value for 'classification' parameter, expected >= 0"),
    ("int64_param", -1, "invalid value for 'classification' parameter, expected >= 0"),
    ("string_param", "2", "invalid value type for 'classification' parameter, expected int64_param"),
    ("uint64_param", 2, "invalid value type for 'classification' parameter, expected int64_param"),
    ("bool_param", True, "invalid value type for 'classification' parameter, expected int64_param"),
])
def test_grpc_invalid_count(srv, member, value, message):
    with pytest.raises(grpc.RpcError) as e:
        _stub_infer(srv, lambda p: setattr(p["classification"], member, value))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


@pytest.mark.parametrize(("value", "message"), [
    (2, "output can't set both 'shared_memory_region' and 'classification'"),
    (0, "invalid value for 'classification' parameter, expected >= 0"),  # (the value is checked first)
])
def test_grpc_classification_with_shared_memory(srv, value, message):
    def setup(p):
        p["classification"].int64_param = value
        p["shared_memory_region"].string_param = "nope"
        p["shared_memory_byte_size"].int64_param = 64

    with pytest.raises(grpc.RpcError) as e:
        _stub_infer(srv, setup)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_grpc_stream_of_a_decoupled_model(grpc_client):
    responses: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inp = grpcclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([2], dtype=np.int32))
        grpc_client.async_stream_infer("countdown", [inp],
                                       outputs=[grpcclient.InferRequestedOutput("OUT", class_count=2)])
        got = []
        for _ in range(2):
            result, error = responses.get(timeout=30)
            assert error is None
            got.append(result.as_numpy("OUT").tolist())
    finally:
        grpc_client.stop_stream()
    assert got == [[b"10:1", b"5:2"], [b"9:1", b"5:2"]]


# -- both: batching, types, labels, refused types ----------------------------------------------------------
@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_batched_rows_are_classified_one_by_one(http, grpc_client, module):
    client = http if module is httpclient else grpc_client
    inp = module.InferInput("INPUT0", [2, 16], "FP32")
    inp.set_data_from_numpy((np.arange(32) % 7).astype(np.float32).reshape(2, 16))
    result = client.infer("identity", [inp], outputs=[module.InferRequestedOutput("OUTPUT0", class_count=2)])
    labels = result.as_numpy("OUTPUT0")
    assert labels.shape == (2, 2)
    assert _text(labels) == ["6.000000:6", "6.000000:13", "6.000000:4", "6.000000:11"]  # ties: lower index first


@pytest.mark.parametrize(("output", "expected"), [
    ("F32", ["3.000000:2", "2.000000:3:bird", "0.500000:0:cat", "0.100000:4", "-1.250000:1:dog"]),
    ("F64", ["3.000000:2", "2.000000:3", "0.500000:0", "0.100000:4", "-1.250000:1"]),
    ("I8", ["3:2", "2:3", "0:0", "0:4", "-1:1"]),
])
@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_value_formats_and_labels(http, grpc_client, module, output, expected):
    client = http if module is httpclient else grpc_client
    result = client.infer("typed", _typed_inputs(module), outputs=[module.InferRequestedOutput(output, class_count=5)])
    assert _text(result.as_numpy(output)) == expected


@pytest.mark.parametrize("output", ["F16", "B", "S"])  # Triton crashes on BYTES (S): ours refuses it alike
@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_types_that_cannot_be_classified(http, grpc_client, module, output):
    client = http if module is httpclient else grpc_client
    datatype = {"F16": "FP16", "B": "BOOL", "S": "BYTES"}[output]
    with pytest.raises(InferenceServerException) as e:
        client.infer("typed", _typed_inputs(module), outputs=[module.InferRequestedOutput(output, class_count=1)])
    assert f"class result not available for output due to unsupported type '{datatype}'" in str(e.value)
    assert e.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


# -- in-process API ----------------------------------------------------------------------------------------
def test_in_process_api(repo):
    from kernel.api import Server

    with Server(model_repository=str(repo), model_control_mode="explicit", load_models=["add_sub"]) as server:
        result = server.model("add_sub").infer({"INPUT0": np.arange(16, dtype=np.int32),
                                                "INPUT1": np.ones(16, dtype=np.int32)},
                                               outputs=["OUTPUT1"], classification={"OUTPUT0": 2})
        assert result["OUTPUT0"].tolist() == [b"16:15", b"15:14"]
        np.testing.assert_array_equal(result["OUTPUT1"], np.arange(16) - 1)
        result.release()


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_an_ensemble_output_is_classified(module, http, grpc_client):
    """An ensemble's output is classified like a model's, beside a plain one (the same labels from Triton 2.51)."""
    client = http if module is httpclient else grpc_client
    a, b = np.array([5, 1, 9, 3] * 4, dtype=np.int32), np.arange(16, dtype=np.int32)
    inputs = [module.InferInput("A", [16], "INT32"), module.InferInput("B", [16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("ens", inputs, outputs=[module.InferRequestedOutput("SUM", class_count=3),
                                                  module.InferRequestedOutput("DIFF")])
    assert _text(result.as_numpy("SUM")) == ["23:14", "19:10", "18:15"]
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)
