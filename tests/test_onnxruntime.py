"""The ONNX Runtime backend, through a real server and tritonclient, against onnxruntime called directly.

The models are built with onnx's helper API in a temporary repository (tests/framework_models.py).
"""

from __future__ import annotations

import subprocess
import threading

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from tests.framework_models import add_sub_graph, conv_graph, external_data_model, onnx_bytes, string_graph, write_model
from tests.support import serving

ADD_SUB_IO = """
input [ { name: "A", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "B", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "SUM", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "DIFF", data_type: TYPE_FP32, dims: [ 4 ] } ]
"""

#: name -> (file bytes, config.pbtxt or None, reason the model must fail with or None)
BROKEN = {
    "bad_dtype": (add_sub_graph(), 'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO.replace(
        'name: "A", data_type: TYPE_FP32', 'name: "A", data_type: TYPE_INT32'),
        "unable to load model 'bad_dtype', configuration expects datatype TYPE_INT32 for input 'A', model provides "
        "TYPE_FP32"),
    "bad_dims": (add_sub_graph(), 'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO.replace(
        'name: "SUM", data_type: TYPE_FP32, dims: [ 4 ]', 'name: "SUM", data_type: TYPE_FP32, dims: [ 5 ]'),
        "model 'bad_dims', tensor 'SUM': the model expects 2 dimensions (shape [-1,4]) but the model configuration "
        "specifies 2 dimensions (an initial batch dimension because max_batch_size > 0 followed by the explicit "
        "tensor shape, making complete shape [-1,5])"),
    "bad_name": (add_sub_graph(), 'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO.replace(
        'name: "B"', 'name: "C"'), "unexpected inference input 'C', allowed inputs are: A, B"),
    "bad_count": (add_sub_graph(), 'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO.replace(
        ', { name: "B", data_type: TYPE_FP32, dims: [ 4 ] }', ''),
        "unable to load model 'bad_count', configuration expects 1 inputs, model provides 2"),
    "not_batching": (add_sub_graph(batch=None), 'backend: "onnxruntime"\nmax_batch_size: 8\n',
                     "autofill failed for model 'not_batching': model does not support batching while non-zero "
                     "max_batch_size is specified"),
    "no_file": (None, 'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n' + ADD_SUB_IO, "unable to find '"),
    "corrupt": (b"this is not an onnx model", 'backend: "onnxruntime"\n' + ADD_SUB_IO,
                "unable to load model 'corrupt': "),
    "bad_mode": (add_sub_graph(), 'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO
                 + 'parameters { key: "execution_mode" value: { string_value: "7" } }\n',
                 "Expected values for  execution_mode are 0 or 1 but got 7"),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("onnx") / "models"
    write_model(repo, "onnx_add", "model.onnx", onnx_bytes(add_sub_graph()),
                'backend: "onnxruntime"\nmax_batch_size: 8\n' + ADD_SUB_IO
                + "dynamic_batching { max_queue_delay_microseconds: 50000 }\n"
                "instance_group [ { kind: KIND_CPU, count: 2 } ]\n")
    write_model(repo, "onnx_auto", "model.onnx", onnx_bytes(add_sub_graph()), None)  # no config.pbtxt at all
    write_model(repo, "onnx_fixed", "model.onnx", onnx_bytes(add_sub_graph(TensorProto.INT64, batch=2)), None)
    write_model(repo, "onnx_strings", "model.onnx", onnx_bytes(string_graph()), 'backend: "onnxruntime"\n'
                'max_batch_size: 4\ninput [ { name: "IN", data_type: TYPE_STRING, dims: [ 2 ] } ]\n'
                'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 2 ] } ]\n')
    write_model(repo, "onnx_conv", "model.onnx", onnx_bytes(conv_graph()),
                'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
                'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }\n'
                'parameters { key: "execution_mode" value: { string_value: "1" } }\n'
                'optimization { graph { level: 1 } }\n')
    external_data_model(repo / "onnx_external" / "1" / "model.onnx")
    write_model(repo, "onnx_reshape", "model.onnx", onnx_bytes(add_sub_graph(batch=None, width=4)),
                'backend: "onnxruntime"\n'
                'input [ { name: "A", data_type: TYPE_FP32, dims: [ 2, 2 ], reshape: { shape: [ 4 ] } },'
                '        { name: "B", data_type: TYPE_FP32, dims: [ 2, 2 ], reshape: { shape: [ 4 ] } } ]\n'
                'output [ { name: "SUM", data_type: TYPE_FP32, dims: [ 2, 2 ], reshape: { shape: [ 4 ] } },'
                '         { name: "DIFF", data_type: TYPE_FP32, dims: [ 2, 2 ], reshape: { shape: [ 4 ] } } ]\n')
    for name, (data, config, _) in BROKEN.items():
        write_model(repo, name, "model.onnx", onnx_bytes(data) if hasattr(data, "node") else data, config)
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    yield from serving(repo, tmp_path_factory.mktemp("log"), timeout=180)  # conftest's `http` fixture talks to it


def direct(repo, name: str, feed: dict) -> dict:
    """The model's outputs from onnxruntime itself."""
    path = repo / name / "1" / "model.onnx"
    if path.is_dir():
        path = path / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def http_inputs(arrays: dict, datatype: str = "FP32") -> list:
    inputs = []
    for name, array in arrays.items():
        t = httpclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def test_batched_model_over_http_and_grpc_matches_onnxruntime(server, repo, http):
    rng = np.random.default_rng(0)
    feed = {"A": rng.standard_normal((3, 4)).astype(np.float32), "B": rng.standard_normal((3, 4)).astype(np.float32)}
    want = direct(repo, "onnx_add", feed)
    result = http.infer("onnx_add", http_inputs(feed))
    for name in ("SUM", "DIFF"):
        np.testing.assert_array_equal(result.as_numpy(name), want[name])
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, array in feed.items():
        t = grpcclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        inputs.append(t)
    result = grpc.infer("onnx_add", inputs, outputs=[grpcclient.InferRequestedOutput("DIFF")])
    np.testing.assert_array_equal(result.as_numpy("DIFF"), want["DIFF"])
    assert result.as_numpy("SUM") is None  # only what was asked for
    grpc.close()


def test_dynamic_batching_over_two_instances(server, repo):
    rng = np.random.default_rng(1)
    feeds = [{"A": rng.standard_normal((1, 4)).astype(np.float32), "B": rng.standard_normal((1, 4)).astype(np.float32)}
             for _ in range(16)]
    client = httpclient.InferenceServerClient(server.http_url)
    before = client.get_inference_statistics("onnx_add")["model_stats"][0]
    results: dict[int, object] = {}

    def send(i: int) -> None:
        c = httpclient.InferenceServerClient(server.http_url)
        results[i] = c.infer("onnx_add", http_inputs(feeds[i]))
        c.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, feed in enumerate(feeds):
        want = direct(repo, "onnx_add", feed)
        np.testing.assert_array_equal(results[i].as_numpy("SUM"), want["SUM"])
    after = client.get_inference_statistics("onnx_add")["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 16 and executions < 16, (inferences, executions)  # requests were batched
    batched = [b for b in after["batch_stats"] if b["batch_size"] > 1]
    assert batched, after["batch_stats"]
    client.close()
    workers = subprocess.run(["pgrep", "-f", "-P", str(server.proc.pid), '"instance": "onnx_add_0_'],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers  # one worker process per instance


def test_auto_complete_with_no_config_pbtxt(repo, http):
    config = http.get_model_config("onnx_auto")
    assert config["backend"] == "onnxruntime" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 4  # Triton's default-max-batch-size
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("A", "TYPE_FP32", [4]), ("B", "TYPE_FP32", [4])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("SUM", "TYPE_FP32", [4]), ("DIFF", "TYPE_FP32", [4])]
    feed = {"A": np.ones((2, 4), np.float32), "B": np.full((2, 4), 3, np.float32)}
    np.testing.assert_array_equal(http.infer("onnx_auto", http_inputs(feed)).as_numpy("DIFF"), np.full((2, 4), -2))


def test_auto_complete_of_a_model_that_does_not_batch(repo, http):
    config = http.get_model_config("onnx_fixed")
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("A", "TYPE_INT64", [2, 4]), ("B", "TYPE_INT64", [2, 4])]
    feed = {"A": np.arange(8, dtype=np.int64).reshape(2, 4), "B": np.full((2, 4), 5, np.int64)}
    result = http.infer("onnx_fixed", http_inputs(feed, "INT64"))
    np.testing.assert_array_equal(result.as_numpy("SUM"), direct(repo, "onnx_fixed", feed)["SUM"])


def test_bytes_tensors(http):
    data = np.array([[b"hello", "w\u00f6rld".encode()], [b"", b"edge"]], dtype=object)
    result = http.infer("onnx_strings", http_inputs({"IN": data}, "BYTES"))
    np.testing.assert_array_equal(result.as_numpy("OUT"), data)
    with pytest.raises(InferenceServerException) as e:
        http.infer("onnx_strings", http_inputs({"IN": np.array([[b"\xff", b"x"]], dtype=object)}, "BYTES"))
    assert "input 'IN' holds bytes that are not UTF-8 text" in str(e.value)
    assert e.value.status() == "400"


def test_session_options_and_conv_net(repo, http):
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    result = http.infer("onnx_conv", http_inputs({"INPUT": x}))
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), direct(repo, "onnx_conv", {"INPUT": x})["OUTPUT"],
                               rtol=1e-5, atol=1e-5)


def test_model_directory_with_external_data(repo, http):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    result = http.infer("onnx_external", http_inputs({"X": x}))
    np.testing.assert_allclose(result.as_numpy("Y"), direct(repo, "onnx_external", {"X": x})["Y"], rtol=1e-6)


def test_reshape(repo, http):
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    b = np.ones((2, 2), np.float32)
    result = http.infer("onnx_reshape", http_inputs({"A": a, "B": b}))
    assert result.as_numpy("SUM").shape == (2, 2)
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)


def test_inputs_from_and_outputs_into_a_clients_shared_memory(http):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 0.5, np.float32)
    key = "/onnx_shm_test"
    region = shm.create_shared_memory_region("onnx_io", key, 3 * a.nbytes)
    try:
        shm.set_shared_memory_region(region, [a, b])
        http.register_system_shared_memory("onnx_io", key, 3 * a.nbytes)
        inputs = http_inputs({"A": a, "B": b})
        inputs[0].set_shared_memory("onnx_io", a.nbytes)
        inputs[1].set_shared_memory("onnx_io", b.nbytes, offset=a.nbytes)
        out = httpclient.InferRequestedOutput("SUM")
        out.set_shared_memory("onnx_io", a.nbytes, offset=2 * a.nbytes)
        http.infer("onnx_add", inputs, outputs=[out])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(region, np.float32, [2, 4], offset=2 * a.nbytes),
                                      a + b)
    finally:
        http.unregister_system_shared_memory("onnx_io")
        shm.destroy_shared_memory_region(region)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_load_errors_are_named(http, name):
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index[name]["state"] == "UNAVAILABLE"
    assert BROKEN[name][2] in index[name]["reason"], index[name]["reason"]
    assert not http.is_model_ready(name)
