"""The TensorRT backend's logic, with TEST DOUBLES of TensorRT and of the CUDA runtime (tests/fakes).

TensorRT cannot be installed here and there is no GPU: the workers import the stand-ins of
tests/fakes instead (they say what they are). What runs for real is the backend itself, the
worker runtime, the front and tritonclient; docs/jetson.md lists what was not run against real
TensorRT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, KernelServer

FAKES = ROOT / "tests" / "fakes"


def plan(*tensors: dict, version: str = "10.3.0", capability: str = "8.7", profiles: int = 1) -> bytes:
    return json.dumps({"trt_version": version, "capability": capability, "profiles": profiles,
                       "tensors": list(tensors)}).encode()


def tin(name: str, shape: list[int], profiles: list | None = None, dtype: str = "FLOAT") -> dict:
    tensor = {"name": name, "mode": "INPUT", "dtype": dtype, "shape": shape}
    return {**tensor, "profiles": profiles} if profiles else tensor


def tout(name: str, like: str, fn: str, dtype: str = "FLOAT", dims: list[int] | None = None) -> dict:
    return {"name": name, "mode": "OUTPUT", "dtype": dtype, "shape": [-1, *(dims or [4])], "like": like, "fn": fn,
            **({"dims": dims} if dims is not None else {})}


BATCH_PROFILE = [[[1, 4], [4, 4], [8, 4]]]
ADD_SUB = plan(tin("INPUT0", [-1, 4], BATCH_PROFILE), tin("INPUT1", [-1, 4], BATCH_PROFILE),
               tout("OUTPUT0", "INPUT0", "sum"), tout("OUTPUT1", "INPUT0", "diff"),
               tout("MAPPED", "INPUT0", "mapped", "INT32", [1]), tout("DLA", "INPUT0", "dla", "INT32", [1]))
#: width varies too: dims [-1, -1] with a profile on both
DYNAMIC = plan(tin("X", [-1, -1], [[[1, 1], [2, 8], [4, 16]]]), tout("Y", "X", "scale", dims=None))

GPU = 'instance_group [ { kind: KIND_GPU } ]\n'
#: name -> (plan bytes or None, config.pbtxt or None, reason it must fail with, or None when it loads)
MODELS = {
    "trt_auto": (ADD_SUB, None, None),
    "trt_batched": (ADD_SUB, 'platform: "tensorrt_plan"\nmax_batch_size: 8\ndynamic_batching { '
                    'max_queue_delay_microseconds: 50000 }\n' + GPU, None),
    "trt_staged": (ADD_SUB, 'backend: "tensorrt"\n' + GPU
                   + 'parameters { key: "shared_memory_io" value: { string_value: "staged" } }\n', None),
    "trt_dla": (ADD_SUB, 'backend: "tensorrt"\ninstance_group [ { kind: KIND_GPU, secondary_devices: [ { kind: '
                'KIND_NVDLA, device_id: 1 } ] } ]\n', None),
    "trt_no_dla_core": (ADD_SUB, 'backend: "tensorrt"\ninstance_group [ { kind: KIND_GPU, secondary_devices: [ { '
                        'kind: KIND_NVDLA, device_id: 5 } ] } ]\n', None),
    "trt_dynamic": (DYNAMIC, 'backend: "tensorrt"\n' + GPU, None),
    "trt_version": (plan(tin("X", [-1, 4], BATCH_PROFILE), tout("Y", "X", "scale"), version="8.6.1"), GPU,
                    "could not deserialize"),
    "trt_other_gpu": (plan(tin("X", [-1, 4], BATCH_PROFILE), tout("Y", "X", "scale"), capability="9.0"), GPU,
                      "generated on an incompatible device, expecting compute 8.7 got compute 9.0"),
    "trt_bad_dtype": (ADD_SUB, 'backend: "tensorrt"\nmax_batch_size: 8\n' + GPU
                      + 'input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 4 ] } ]\n',
                      "configuration expects datatype TYPE_INT32 for input 'INPUT0', model provides TYPE_FP32"),
    "trt_bad_name": (ADD_SUB, 'backend: "tensorrt"\nmax_batch_size: 8\n' + GPU
                     + 'input [ { name: "NOPE", data_type: TYPE_FP32, dims: [ 4 ] } ]\n',
                     "unexpected inference input 'NOPE', allowed inputs are: INPUT0, INPUT1"),
    "trt_too_big": (ADD_SUB, 'backend: "tensorrt"\nmax_batch_size: 16\n' + GPU,
                    "configuration specified max-batch 16 but TensorRT engine only supports max-batch 8"),
    "trt_on_cpu": (ADD_SUB, 'backend: "tensorrt"\ninstance_group [ { kind: KIND_CPU } ]\n',
                   "TensorRT engines run on KIND_GPU instances, not KIND_CPU"),
    "trt_no_plan": (None, 'platform: "tensorrt_plan"\n' + GPU, "unable to find '"),
    "trt_garbage": (b"\x00\x01not an engine", 'platform: "tensorrt_plan"\n' + GPU, "magicTag"),
    "trt_bad_mode": (ADD_SUB, 'backend: "tensorrt"\n' + GPU
                     + 'parameters { key: "shared_memory_io" value: { string_value: "sideways" } }\n',
                     "must be auto, mapped or staged, not 'sideways'"),
}


def repository(root: Path) -> Path:
    for name, (data, config, _) in MODELS.items():
        (root / name / "1").mkdir(parents=True)
        if data is not None:
            (root / name / "1" / "model.plan").write_bytes(data)
        if config is not None:
            (root / name / "config.pbtxt").write_text(config)
    return root


def server_with_fakes(repo: Path, log: Path, **env: str) -> KernelServer:
    base = {"PYTHONPATH": f"{FAKES}:{ROOT}", "EDGE_KERNEL_GPU_COUNT": "1", "FAKE_TRT_DLA_CORES": "2"}
    return KernelServer(repo, env={**base, **env}).start(log)


@pytest.fixture(scope="module", params=["integrated", "discrete"])
def server(request, tmp_path_factory):
    """One server on a stand-in Jetson (integrated GPU: mapped memory), one on a stand-in discrete GPU."""
    repo = repository(tmp_path_factory.mktemp("trt") / "models")
    srv = server_with_fakes(repo, tmp_path_factory.mktemp("log") / "server.log",
                            FAKE_CUDA_INTEGRATED="1" if request.param == "integrated" else "0")
    srv.kind = request.param
    yield srv
    assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm()


def infer(url: str, model: str, arrays: dict, outputs: list | None = None):
    client = httpclient.InferenceServerClient(url)
    inputs = []
    for name, array in arrays.items():
        t = httpclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array)
        inputs.append(t)
    try:
        return client.infer(model, inputs, outputs=outputs)
    finally:
        client.close()


def test_auto_complete_from_the_engine(server):
    client = httpclient.InferenceServerClient(server.http_url)
    config = client.get_model_config("trt_auto")
    client.close()
    assert config["platform"] == "tensorrt_plan" and config["backend"] == "tensorrt"
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config  # the profile's largest batch
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("INPUT0", "TYPE_FP32", [4]), ("INPUT1", "TYPE_FP32", [4])]
    assert [t["name"] for t in config["output"]] == ["OUTPUT0", "OUTPUT1", "MAPPED", "DLA"]


def test_inference_through_mapped_or_staged_memory(server):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.full((3, 4), 0.5, np.float32)
    result = infer(server.http_url, "trt_auto", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    # On an integrated GPU the engine read the shared memory itself; on a discrete one, device copies.
    assert result.as_numpy("MAPPED").ravel().tolist() == [int(server.kind == "integrated")] * 3
    staged = infer(server.http_url, "trt_staged", {"INPUT0": a, "INPUT1": b})
    assert staged.as_numpy("MAPPED").ravel().tolist() == [0] * 3  # shared_memory_io: staged
    np.testing.assert_array_equal(staged.as_numpy("OUTPUT0"), a + b)


def test_a_clients_region_in_and_out(server):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    key = f"/trt_io_{server.kind}"
    region = shm.create_shared_memory_region("trt_io", key, 3 * a.nbytes)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        shm.set_shared_memory_region(region, [a, b])
        client.register_system_shared_memory("trt_io", key, 3 * a.nbytes)
        inputs = [httpclient.InferInput("INPUT0", [2, 4], "FP32"), httpclient.InferInput("INPUT1", [2, 4], "FP32")]
        inputs[0].set_shared_memory("trt_io", a.nbytes)
        inputs[1].set_shared_memory("trt_io", b.nbytes, offset=a.nbytes)
        out = httpclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("trt_io", a.nbytes, offset=2 * a.nbytes)
        mapped = httpclient.InferRequestedOutput("MAPPED")
        result = client.infer("trt_auto", inputs, outputs=[out, mapped])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(region, np.float32, [2, 4], offset=2 * a.nbytes),
                                      a + b)
        assert result.as_numpy("MAPPED").ravel().tolist() == [int(server.kind == "integrated")] * 2
    finally:
        client.unregister_system_shared_memory("trt_io")
        shm.destroy_shared_memory_region(region)
        client.close()
    # the worker let go of the region's registration: the same key registers and serves again
    region = shm.create_shared_memory_region("trt_io", key, 3 * a.nbytes)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        shm.set_shared_memory_region(region, [a * 2, b])
        client.register_system_shared_memory("trt_io", key, 3 * a.nbytes)
        inputs = [httpclient.InferInput("INPUT0", [2, 4], "FP32"), httpclient.InferInput("INPUT1", [2, 4], "FP32")]
        inputs[0].set_shared_memory("trt_io", a.nbytes)
        inputs[1].set_shared_memory("trt_io", b.nbytes, offset=a.nbytes)
        np.testing.assert_array_equal(client.infer("trt_auto", inputs).as_numpy("OUTPUT0"), a * 2 + b)
    finally:
        client.unregister_system_shared_memory("trt_io")
        shm.destroy_shared_memory_region(region)
        client.close()


def test_batches_of_several_requests(server):
    import threading

    pairs = [(np.full((1, 4), i, np.float32), np.full((1, 4), 10 * i, np.float32)) for i in range(8)]
    results: dict = {}

    def send(i: int) -> None:
        results[i] = infer(server.http_url, "trt_batched", {"INPUT0": pairs[i][0], "INPUT1": pairs[i][1]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (a, b) in enumerate(pairs):
        np.testing.assert_array_equal(results[i].as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(results[i].as_numpy("OUTPUT1"), a - b)
    client = httpclient.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics("trt_batched")["model_stats"][0]
    client.close()
    assert stats["execution_count"] < stats["inference_count"]


def test_dla_core_and_gpu_fallback(server):
    x = {"INPUT0": np.ones((1, 4), np.float32), "INPUT1": np.ones((1, 4), np.float32)}
    assert infer(server.http_url, "trt_dla", x).as_numpy("DLA").ravel().tolist() == [1]
    assert infer(server.http_url, "trt_no_dla_core", x).as_numpy("DLA").ravel().tolist() == [-1]  # on the GPU
    log = server.log()
    assert "engine on DLA core 1" in log
    assert "GPU fallback: the config asks for DLA core 5, this device has 2 DLA cores" in log
    assert "not run against real TensorRT here" in log  # the model's status says it, in the model table


def test_dynamic_shapes_within_the_profile(server):
    for width in (1, 7, 16):
        x = np.arange(3 * width, dtype=np.float32).reshape(3, width)
        np.testing.assert_array_equal(infer(server.http_url, "trt_dynamic", {"X": x}).as_numpy("Y"), x * 2 + 1)
    with pytest.raises(InferenceServerException) as e:
        infer(server.http_url, "trt_dynamic", {"X": np.ones((2, 17), np.float32)})
    assert "outside the engine's optimization profile 0 ([1, 1] to [4, 16])" in str(e.value)
    assert e.value.status() == "400"


@pytest.mark.parametrize("name", sorted(n for n, (_, _, reason) in MODELS.items() if reason))
def test_load_errors_are_named(server, name):
    client = httpclient.InferenceServerClient(server.http_url)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    client.close()
    assert index[name]["state"] == "UNAVAILABLE"
    assert MODELS[name][2] in index[name]["reason"], index[name]["reason"]


def test_without_tensorrt_the_reason_says_how_to_get_it(tmp_path):
    repo = tmp_path / "models"
    (repo / "engine" / "1").mkdir(parents=True)
    (repo / "engine" / "1" / "model.plan").write_bytes(ADD_SUB)
    srv = KernelServer(repo, env={"EDGE_KERNEL_GPU_COUNT": "1"}).start(tmp_path / "log")
    try:
        client = httpclient.InferenceServerClient(srv.http_url)
        (entry,) = client.get_model_repository_index()
        client.close()
        assert entry["state"] == "UNAVAILABLE"
        assert "unable to load backend 'tensorrt': No module named 'tensorrt' (TensorRT comes with JetPack" in \
            entry["reason"]
    finally:
        assert srv.stop() == 0
