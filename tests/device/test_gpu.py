"""GPU backends on a machine with an NVIDIA GPU and CUDA torch (run with EDGE_KERNEL_DEVICE_TESTS=1).

Not collected elsewhere (tests/conftest.py): CI has no GPU. bench/device_run.sh runs these.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.framework_models import onnx_bytes, write_model
from tests.support import ROOT, KernelServer
from tests.test_dlpack import dlpack_repository, run_dlpack

FRAME_CONFIG = ('backend: "python"\ninput [ { name: "FRAME", data_type: TYPE_UINT8, dims: [ 1080, 1920, 3 ] } ]\n'
                'output [ { name: "MEAN", data_type: TYPE_FP32, dims: [ 3 ] }, '
                '{ name: "WHERE", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torchvision

    repo = tmp_path_factory.mktemp("gpu") / "models"
    torch.manual_seed(0)
    resnet = torch.jit.script(torchvision.models.resnet18(weights=None).eval())
    (repo / "resnet18" / "1").mkdir(parents=True)
    torch.jit.save(resnet, str(repo / "resnet18" / "1" / "model.pt"))
    resnet_config = ('backend: "pytorch"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
                     'input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] } ]\n'
                     'output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 1000 ] } ]\n')
    (repo / "resnet18" / "config.pbtxt").write_text(resnet_config)
    (repo / "resnet18_batched" / "1").mkdir(parents=True)
    torch.jit.save(resnet, str(repo / "resnet18_batched" / "1" / "model.pt"))
    (repo / "resnet18_batched" / "config.pbtxt").write_text(
        resnet_config + 'dynamic_batching { max_queue_delay_microseconds: 200000 }\n')
    dlpack_repository(repo, "dlpack_gpu", 'instance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
                      'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n')
    from tests.framework_models import add_sub_graph

    write_model(repo, "onnx_gpu", "model.onnx", onnx_bytes(add_sub_graph()),
                'backend: "onnxruntime"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_GPU } ]\n')
    frame_model = (ROOT / "tests" / "templates" / "frame_gpu_model.py").read_text()
    for mode in ("mapped", "staged"):
        (repo / f"frame_{mode}" / "1").mkdir(parents=True)
        (repo / f"frame_{mode}" / "1" / "model.py").write_text(frame_model)
        (repo / f"frame_{mode}" / "config.pbtxt").write_text(FRAME_CONFIG + (
            'instance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
            'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n'
            f'parameters {{ key: "shared_memory_io" value: {{ string_value: "{mode}" }} }}\n'))
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


@contextlib.contextmanager
def _resnet_into_region(server, size: int):
    """A client, a ones image as resnet18's input, and OUTPUT__0 asked into a registered region of ``size`` bytes."""
    x = np.ones((1, 3, 224, 224), np.float32)
    client = httpclient.InferenceServerClient(server.http_url)
    name = f"resnet_out_{size}"
    region = shm.create_shared_memory_region(name, f"/{name}", size)
    try:
        client.register_system_shared_memory(name, f"/{name}", size)
        inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT__0")
        out.set_shared_memory(name, size)
        yield client, region, x, inp, out
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(region)
        client.close()


def test_gpu_output_lands_in_the_clients_region(server):
    with _resnet_into_region(server, 4000) as (client, region, x, inp, out):
        client.infer("resnet18", [inp], outputs=[out])
        with torch.inference_mode():
            want = server.resnet(torch.from_numpy(x).cuda()).cpu().numpy()
        np.testing.assert_allclose(shm.get_contents_as_numpy(region, np.float32, [1, 1000]), want, rtol=1e-3,
                                   atol=1e-3)


def test_each_request_of_a_gpu_batch_gets_its_own_rows(server):
    """The backend copies each request's rows of a batched GPU output into that request's place."""
    xs = [np.random.default_rng(10 + i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(4)]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    pending = []
    for x in xs:
        inp = httpclient.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        pending.append(client.async_infer("resnet18_batched", [inp]))
    results = [p.get_result().as_numpy("OUTPUT__0") for p in pending]
    with torch.inference_mode():
        want = server.resnet(torch.from_numpy(np.concatenate(xs)).cuda()).cpu().numpy()
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, want[i : i + 1], rtol=1e-3, atol=1e-3)
    stats = client.get_inference_statistics("resnet18_batched")["model_stats"][0]
    assert any(b["batch_size"] > 1 for b in stats["batch_stats"]), stats["batch_stats"]
    client.close()


def test_a_clients_region_too_small_for_a_gpu_output_fails_that_request(server):
    with _resnet_into_region(server, 100) as (client, _, _, inp, out):
        with pytest.raises(InferenceServerException, match="at least 4000 bytes"):
            client.infer("resnet18", [inp], outputs=[out])
        result = client.infer("resnet18", [inp])  # the instance serves on
        assert result.as_numpy("OUTPUT__0").shape == (1, 1000)


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


@pytest.mark.parametrize("mode", ["mapped", "staged"])
def test_a_frame_in_a_clients_region_reaches_the_gpu_in_place(server, mode):
    """Mapped: the GPU tensor the model gets *is* the client's region (its address lies in the worker's
    mapping of /dev/shm/<key>); this fails if the frame is staged through any other buffer. Staged: a
    device copy. Either way the result lands in the client's output region. (The device machine's H200
    is a discrete GPU: mapped there means reads across PCIe; on a Jetson it is the default, and free.)"""
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    key = f"/frame_gpu_{mode}"
    region = shm.create_shared_memory_region("frame_gpu", key, frame.nbytes + 12)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        shm.set_shared_memory_region(region, [frame])
        client.register_system_shared_memory("frame_gpu", key, frame.nbytes + 12)
        inp = httpclient.InferInput("FRAME", list(frame.shape), "UINT8")
        inp.set_shared_memory("frame_gpu", frame.nbytes)
        mean = httpclient.InferRequestedOutput("MEAN")
        mean.set_shared_memory("frame_gpu", 12, offset=frame.nbytes)
        result = client.infer(f"frame_{mode}", [inp], outputs=[mean, httpclient.InferRequestedOutput("WHERE")])
        np.testing.assert_allclose(shm.get_contents_as_numpy(region, np.float32, [3], offset=frame.nbytes),
                                   frame.reshape(-1, 3).mean(axis=0), rtol=1e-4)
        where = result.as_numpy("WHERE")[0].decode()
        if mode == "mapped":
            assert where == f"/dev/shm{key}", where
        else:  # device memory (CUDA may reserve its addresses as mappings of /dev/nvidia*)
            assert not where.startswith("/dev/shm"), where
    finally:
        client.unregister_system_shared_memory("frame_gpu")
        shm.destroy_shared_memory_region(region)
        client.close()


def test_cuda_python_layer_of_the_tensorrt_backend():
    """workers.cuda against the real CUDA runtime (cuda-python): the TensorRT backend's registrations,
    mapped device pointers, device buffers and copies (TensorRT itself cannot be installed here)."""
    from shm.region import Region
    from workers import cuda
    from workers.gpu import _CudaArray

    info = cuda.device_info(0)
    assert info["can_map"] and info["capability"]
    region = Region("/ek_cuda_layer_test", 1 << 20, create=True)
    host = cuda.HostMemory()
    stream = cuda.Stream()
    buffer = cuda.DeviceBuffer()
    try:
        data = np.ndarray((256,), np.float32, buffer=region.buf, offset=4096)
        data[:] = np.arange(256, dtype=np.float32)
        pointer = host.device_pointer(data)
        seen = torch.as_tensor(_CudaArray(pointer, data), device="cuda:0")  # the GPU reads the pages in place
        np.testing.assert_array_equal(seen.cpu().numpy(), data)
        device = buffer.reserve(data.nbytes)
        stream.copy_to_device(device, data.ctypes.data, data.nbytes)
        back = np.ndarray((256,), np.float32, buffer=region.buf, offset=8192)
        stream.copy_to_host(back.ctypes.data, device, data.nbytes)
        stream.synchronize()
        np.testing.assert_array_equal(back, data)
        assert host.registered(back)  # one registration for the whole mapping
        with pytest.raises(cuda.CudaError):
            cuda.device_info(99)
    finally:
        buffer.free()
        stream.close()
        host.close()
        region.close()
        region.unlink()


@pytest.mark.parametrize("mode", ["mapped", "staged"])
def test_pytorch_backend_reads_a_clients_frame_in_place(tmp_path, mode):
    """The PyTorch backend's input path on a KIND_GPU instance: mapped, the CUDA tensor handed to forward
    *is* the shared-memory region (its address lies inside the mapping; fails if the frame is staged
    through any other buffer); staged, it is a device copy. TorchScript cannot report an address, so
    this drives the backend in process; the end-to-end proof over HTTP is the python model's above."""
    from shm.region import Region
    from tests.torch_modules import FrameMean
    from workers.backend import Model
    from workers.backends.pytorch import PyTorchBackend

    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(FrameMean()), str(path))
    config = {"name": "frame_torch", "backend": "pytorch", "max_batch_size": 0,
              "input": [{"name": "FRAME", "data_type": "TYPE_UINT8", "dims": ["1080", "1920", "3"]}],
              "output": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": ["3"]}],
              "instance_group": [{"kind": "KIND_GPU", "gpus": [0]}],
              "parameters": {"shared_memory_io": {"string_value": mode}}}
    backend = PyTorchBackend(Model({"name": "frame_torch", "config": config, "model_file": str(path),
                                    "args": {"model_instance_kind": "GPU", "model_instance_device_id": "0"}}))
    region = Region(f"/ek_test_frame_torch_{mode}", 1080 * 1920 * 3, create=True)
    try:
        frame = np.frombuffer(region.buf, np.uint8).reshape(1080, 1920, 3)
        frame[:] = np.random.default_rng(1).integers(0, 256, frame.shape, dtype=np.uint8)
        view = frame.view()
        view.flags.writeable = False  # as a request's input arrives
        tensor = backend._tensor(view, torch.uint8)
        assert tensor.is_cuda
        start = frame.ctypes.data
        inside = start <= tensor.data_ptr() < start + frame.nbytes
        assert inside if mode == "mapped" else not inside
        np.testing.assert_allclose(backend.module(tensor).cpu().numpy(), frame.reshape(-1, 3).mean(axis=0),
                                   rtol=1e-4)
        del tensor, view, frame
    finally:
        backend.finalize()
        region.close()
        region.unlink()
