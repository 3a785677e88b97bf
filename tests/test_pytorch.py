"""The PyTorch backend, through a real server and tritonclient, against the TorchScript module called directly.

The models are scripted from tests/torch_modules.py into a temporary repository.
"""

from __future__ import annotations

import subprocess
import threading

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests import torch_modules as tm
from tests.framework_models import torchscript
from tests.support import serving


def io(inputs: list[tuple], outputs: list[tuple]) -> str:
    def tensors(items: list[tuple]) -> str:
        return ", ".join(f'{{ name: "{n}", data_type: {t}, dims: [ {", ".join(map(str, d))} ] }}' for n, t, d in items)
    return f"input [ {tensors(inputs)} ]\noutput [ {tensors(outputs)} ]\n"


ADD_SUB = io([("INPUT__0", "TYPE_FP32", [4]), ("INPUT__1", "TYPE_FP32", [4])],
             [("OUTPUT__0", "TYPE_FP32", [4]), ("OUTPUT__1", "TYPE_FP32", [4])])

GRAD_IO = io([("x", "TYPE_FP32", [3])], [("OUTPUT__0", "TYPE_FP32", [3])])

#: name -> (module or None, config, reason it must fail with at load, or None when it loads)
MODELS = {
    "torch_add": (tm.AddSub, 'backend: "pytorch"\nmax_batch_size: 8\n' + ADD_SUB
                  + "dynamic_batching { max_queue_delay_microseconds: 50000 }\n"
                  "instance_group [ { kind: KIND_CPU, count: 2 } ]\n", None),
    "torch_args": (tm.Arguments, 'platform: "pytorch_libtorch"\nmax_batch_size: 4\n'
                   + io([("y", "TYPE_FP32", [2]), ("x", "TYPE_FP32", [2])], [("OUT", "TYPE_FP32", [2])]), None),
    "torch_order": (tm.Arguments, 'backend: "pytorch"\n'
                    + io([("FIRST", "TYPE_FP32", [2]), ("SECOND", "TYPE_FP32", [2])], [("OUT", "TYPE_FP32", [2])]),
                    None),
    "torch_dict": (tm.DictInput, 'backend: "pytorch"\nmax_batch_size: 4\n'
                   + io([("beta", "TYPE_FP32", [3]), ("alpha", "TYPE_FP32", [3])], [("OUTPUT__0", "TYPE_FP32", [3])]),
                   None),
    "torch_strings": (tm.Strings, 'backend: "pytorch"\n'
                      + io([("words", "TYPE_STRING", [-1])], [("OUTPUT__0", "TYPE_STRING", [-1])]), None),
    "torch_inplace": (tm.InPlace, 'backend: "pytorch"\nmax_batch_size: 2\n'
                      + io([("x", "TYPE_FP32", [4])], [("OUTPUT__0", "TYPE_FP32", [4])]), None),
    "torch_grad": (tm.GradMode, 'backend: "pytorch"\n' + GRAD_IO, None),
    "torch_grad_no_inference_mode": (tm.GradMode, 'backend: "pytorch"\n' + GRAD_IO
                                     + 'parameters { key: "INFERENCE_MODE" value: { string_value: "false" } }\n',
                                     None),
    "torch_cnn": (tm.SmallCNN, 'backend: "pytorch"\nmax_batch_size: 8\n'
                  + io([("INPUT__0", "TYPE_FP32", [3, 32, 32])], [("OUTPUT__0", "TYPE_FP32", [10])])
                  + 'parameters { key: "INFERENCE_MODE" value: { string_value: "false" } }\n'
                  'parameters { key: "DISABLE_OPTIMIZED_EXECUTION" value: { string_value: "true" } }\n'
                  'parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "1" } }\n'
                  'parameters { key: "INTER_OP_THREAD_COUNT" value: { string_value: "1" } }\n'
                  'parameters { key: "ENABLE_CACHE_CLEANING" value: { string_value: "true" } }\n', None),
    "torch_wrong_type": (tm.WrongType, 'backend: "pytorch"\nmax_batch_size: 2\n'
                         + io([("x", "TYPE_FP32", [2])], [("OUTPUT__0", "TYPE_FP32", [2])]), None),
    "torch_missing_output": (tm.Arguments, 'backend: "pytorch"\n'
                             + io([("x", "TYPE_FP32", [2]), ("y", "TYPE_FP32", [2])],
                                  [("OUTPUT__0", "TYPE_FP32", [2]), ("OUTPUT__1", "TYPE_FP32", [2])]), None),
    # load errors
    "torch_count": (tm.AddSub, 'backend: "pytorch"\n' + io([("INPUT__0", "TYPE_FP32", [4])],
                                                           [("OUTPUT__0", "TYPE_FP32", [4])]),
                    "unable to load model 'torch_count', configuration expects 1 inputs, model provides 2"),
    "torch_uint16": (tm.Arguments, 'backend: "pytorch"\n' + io([("x", "TYPE_UINT16", [2]), ("y", "TYPE_FP32", [2])],
                                                               [("OUT", "TYPE_FP32", [2])]),
                     "unsupported datatype TYPE_UINT16 for input 'x' for model 'torch_uint16'"),
    "torch_no_outputs": (tm.Arguments, 'backend: "pytorch"\ninput [ { name: "x", data_type: TYPE_FP32, dims: [ 2 ] },'
                         ' { name: "y", data_type: TYPE_FP32, dims: [ 2 ] } ]\n',
                         "model configuration must contain at least one output, none were specified."),
    "torch_bad_param": (tm.Arguments, 'backend: "pytorch"\n' + io([("x", "TYPE_FP32", [2]), ("y", "TYPE_FP32", [2])],
                                                                  [("OUT", "TYPE_FP32", [2])])
                        + 'parameters { key: "INFERENCE_MODE" value: { string_value: "maybe" } }\n',
                        "failed to convert 'maybe' to boolean for parameter 'INFERENCE_MODE'"),
    "torch_no_file": (None, 'backend: "pytorch"\n' + io([("x", "TYPE_FP32", [2])], [("OUT", "TYPE_FP32", [2])]),
                      "unable to find '"),
    "torch_corrupt": (b"not a torchscript archive", 'backend: "pytorch"\n'
                      + io([("x", "TYPE_FP32", [2])], [("OUT", "TYPE_FP32", [2])]),
                      "failed to load model 'torch_corrupt': "),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch") / "models"
    for name, (module, config, _) in MODELS.items():
        version = repo / name / "1"
        version.mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        if isinstance(module, bytes):
            (version / "model.pt").write_bytes(module)
        elif module is not None:
            torchscript(module, version / "model.pt")
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    yield from serving(repo, tmp_path_factory.mktemp("log"), timeout=180)  # conftest's `http` fixture talks to it


def direct(repo, name: str, *args):
    """The module's result called directly (loaded the way the backend loads it)."""
    module = torch.jit.load(str(repo / name / "1" / "model.pt"))
    with torch.no_grad():
        return module(*args)


def inputs_for(module, arrays: dict, datatype: str = "FP32") -> list:
    out = []
    for name, array in arrays.items():
        t = module.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def test_named_index_batched_over_http_and_grpc(server, repo, http):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    want = direct(repo, "torch_add", torch.from_numpy(a), torch.from_numpy(b))
    result = http.infer("torch_add", inputs_for(httpclient, {"INPUT__0": a, "INPUT__1": b}))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), want[0].numpy())
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), want[1].numpy())
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    result = grpc.infer("torch_add", inputs_for(grpcclient, {"INPUT__0": a, "INPUT__1": b}))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), want[1].numpy())
    grpc.close()


def test_dynamic_batching_over_two_instances(server, repo):
    rng = np.random.default_rng(1)
    pairs = [(rng.standard_normal((1, 4)).astype(np.float32), rng.standard_normal((1, 4)).astype(np.float32))
             for _ in range(16)]
    results: dict[int, object] = {}

    def send(i: int) -> None:
        c = httpclient.InferenceServerClient(server.http_url)
        results[i] = c.infer("torch_add", inputs_for(httpclient, {"INPUT__0": pairs[i][0], "INPUT__1": pairs[i][1]}))
        c.close()

    client = httpclient.InferenceServerClient(server.http_url)
    before = client.get_inference_statistics("torch_add")["model_stats"][0]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (a, b) in enumerate(pairs):
        np.testing.assert_array_equal(results[i].as_numpy("OUTPUT__0"), a + b)
    after = client.get_inference_statistics("torch_add")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 16
    assert after["execution_count"] - before["execution_count"] < 16  # batched
    client.close()
    workers = subprocess.run(["pgrep", "-f", "-P", str(server.proc.pid), '"instance": "torch_add_0_'],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers


def test_inputs_named_after_forwards_arguments(repo, http):
    x, y = np.array([[1, 2]], np.float32), np.array([[3, 4]], np.float32)
    result = http.infer("torch_args", inputs_for(httpclient, {"y": y, "x": x}))  # config order: y, x
    np.testing.assert_array_equal(result.as_numpy("OUT"), x * 10 + y)


def test_inputs_in_configuration_order(http):
    first, second = np.array([1, 2], np.float32), np.array([3, 4], np.float32)
    result = http.infer("torch_order", inputs_for(httpclient, {"SECOND": second, "FIRST": first}))
    np.testing.assert_array_equal(result.as_numpy("OUT"), first * 10 + second)  # FIRST is forward's x


def test_dict_input(http):
    alpha, beta = np.array([[1, 2, 3]], np.float32), np.array([[1, 1, 1]], np.float32)
    result = http.infer("torch_dict", inputs_for(httpclient, {"alpha": alpha, "beta": beta}))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), alpha * 2 - beta)


def test_string_lists(http):
    words = np.array([b"edge", b"kernel"], dtype=object)
    result = http.infer("torch_strings", inputs_for(httpclient, {"words": words}, "BYTES"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), np.array([b"EDGE", b"KERNEL"], dtype=object))


@pytest.mark.parametrize("name", ["torch_grad", "torch_grad_no_inference_mode"])
def test_forward_runs_without_autograd_in_both_inference_modes(http, name):
    x = np.array([5, 6, 7], np.float32)
    result = http.infer(name, inputs_for(httpclient, {"x": x}))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), [0, 6, 7])  # 0: grad mode was off


def test_cnn_with_parameters_matches_torch(repo, http):
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want = direct(repo, "torch_cnn", torch.from_numpy(x)).numpy()
    result = http.infer("torch_cnn", inputs_for(httpclient, {"INPUT__0": x}))
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), want, rtol=1e-5, atol=1e-6)


def test_a_model_writing_into_its_input_never_writes_the_clients_region(http):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    key = "/torch_inplace_test"
    region = shm.create_shared_memory_region("torch_in", key, x.nbytes)
    try:
        shm.set_shared_memory_region(region, [x])
        http.register_system_shared_memory("torch_in", key, x.nbytes)
        inputs = inputs_for(httpclient, {"x": x})
        inputs[0].set_shared_memory("torch_in", x.nbytes)
        result = http.infer("torch_inplace", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), x * 2)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(region, np.float32, [1, 4]), x)  # untouched
        result = http.infer("torch_inplace", inputs_for(httpclient, {"x": x}))  # from the request body: in place
        np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), x * 2)
    finally:
        http.unregister_system_shared_memory("torch_in")
        shm.destroy_shared_memory_region(region)


def test_run_time_errors_are_tritons(http):
    with pytest.raises(InferenceServerException) as e:
        http.infer("torch_wrong_type", inputs_for(httpclient, {"x": np.ones((1, 2), np.float32)}))
    assert "configuration expects datatype TYPE_FP32 for output 'OUTPUT__0', model provides TYPE_INT64" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        http.infer("torch_missing_output", inputs_for(httpclient, {"x": np.ones(2, np.float32),
                                                                   "y": np.ones(2, np.float32)}))
    assert ("The output OUTPUT__1 in the model configuration refers to an output index which doesn't exist. This "
            "model has 1 outputs") in str(e.value)


@pytest.mark.parametrize("name", sorted(n for n, (_, _, reason) in MODELS.items() if reason))
def test_load_errors_are_named(http, name):
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index[name]["state"] == "UNAVAILABLE"
    assert MODELS[name][2] in index[name]["reason"], index[name]["reason"]
