"""GPU backends on a machine with an NVIDIA GPU and CUDA torch (run with EDGE_KERNEL_DEVICE_TESTS=1).

Not collected elsewhere (tests/conftest.py): CI has no GPU. bench/device_run.sh runs these.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from tests.framework_models import onnx_bytes, write_model
from tests.support import KernelServer
from tests.test_dlpack import dlpack_repository, run_dlpack


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torchvision

    repo = tmp_path_factory.mktemp("gpu") / "models"
    torch.manual_seed(0)
    resnet = torch.jit.script(torchvision.models.resnet18(weights=None).eval())
    (repo / "resnet18" / "1").mkdir(parents=True)
    torch.jit.save(resnet, str(repo / "resnet18" / "1" / "model.pt"))
    (repo / "resnet18" / "config.pbtxt").write_text(
        'backend: "pytorch"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
        'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] } ]\n'
        'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1000 ] } ]\n')
    dlpack_repository(repo, "dlpack_gpu", 'instance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
                      'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n')
    from tests.framework_models import add_sub_graph

    write_model(repo, "onnx_gpu", "model.onnx", onnx_bytes(add_sub_graph()),
                'backend: "onnxruntime"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_GPU } ]\n')
    srv = KernelServer(repo, env={"EDGE_KERNEL_GPU_COUNT": str(torch.cuda.device_count())})
    srv.start(tmp_path_factory.mktemp("log") / "server.log", timeout=300)
    srv.resnet = resnet.cuda()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm()


@pytest.mark.parametrize("batch", [1, 8])
def test_resnet18_on_a_gpu_instance(server, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("resnet18", [inp])
    with torch.inference_mode():
        want = server.resnet(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), want, rtol=1e-3, atol=1e-3)
    stats = client.get_inference_statistics("resnet18")["model_stats"][0]
    assert any(b["batch_size"] == batch for b in stats["batch_stats"])
    client.close()


def test_gpu_output_lands_in_the_clients_region(server):
    x = np.ones((1, 3, 224, 224), np.float32)
    client = httpclient.InferenceServerClient(server.http_url)
    region = shm.create_shared_memory_region("resnet_out", "/resnet_out", 4000)
    try:
        client.register_system_shared_memory("resnet_out", "/resnet_out", 4000)
        inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT__0")
        out.set_shared_memory("resnet_out", 4000)
        client.infer("resnet18", [inp], outputs=[out])
        with torch.inference_mode():
            want = server.resnet(torch.from_numpy(x).cuda()).cpu().numpy()
        np.testing.assert_allclose(shm.get_contents_as_numpy(region, np.float32, [1, 1000]), want, rtol=1e-3,
                                   atol=1e-3)
    finally:
        client.unregister_system_shared_memory("resnet_out")
        shm.destroy_shared_memory_region(region)
        client.close()


def test_python_model_gets_and_returns_gpu_tensors(server):
    x, result = run_dlpack(server.http_url, "dlpack_gpu")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x + 1)
    assert result.as_numpy("WHERE")[0] == (b"False:cuda:0:False:Tensor is stored in GPU and cannot be converted to "
                                           b"NumPy.")


def test_onnxruntime_without_cuda_runs_a_gpu_instance_on_the_cpu(server):
    client = httpclient.InferenceServerClient(server.http_url)
    a = np.ones((1, 4), np.float32)
    inputs = []
    for name in ("A", "B"):
        t = httpclient.InferInput(name, [1, 4], "FP32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    np.testing.assert_array_equal(client.infer("onnx_gpu", inputs).as_numpy("SUM"), a * 2)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "has no CUDA execution provider (install onnxruntime-gpu): it runs on the CPU" in server.log()
    client.close()
