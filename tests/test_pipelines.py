"""Pipelines: ensembles (and BLS, tests/test_bls.py) through the real tritonclient."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.pipeline_models import INVALID, POLL_FAILURES, build, build_invalid
from tests.support import ROOT, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build(tmp_path_factory.mktemp("pipelines") / "models")
    build_invalid(repo)
    for model in ("camera_pipeline", "camera_preprocess", "camera_detector", "camera_postprocess"):
        shutil.copytree(ROOT / "examples" / "models" / model, repo / model)
    yield from serving(repo, tmp_path_factory.mktemp("log"))


def _input(module, x: np.ndarray, name: str = "INPUT"):
    t = module.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def test_diamond_over_http_and_grpc(server, http):
    x = np.arange(16, dtype=np.float32)
    pre = x * 2
    expected = pre * 10 + (pre + 1)
    result = http.infer("diamond", [_input(httpclient, x)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), expected)
    np.testing.assert_array_equal(result.as_numpy("PRE"), pre)  # an intermediate tensor that is also an output
    assert result.get_response()["model_name"] == "diamond"
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        out = grpc.infer("diamond", [_input(grpcclient, x)], outputs=[grpcclient.InferRequestedOutput("OUTPUT")])
        np.testing.assert_array_equal(out.as_numpy("OUTPUT"), expected)
        assert out.as_numpy("PRE") is None  # only what was asked for
    finally:
        grpc.close()


def test_ensemble_metadata_config_and_statistics(http):
    meta = http.get_model_metadata("diamond")
    assert meta["platform"] == "ensemble"
    assert [t["name"] for t in meta["inputs"]] == ["INPUT"]
    config = http.get_model_config("diamond")
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["pre", "scale", "shift", "combine"]
    before = {s["name"]: s for s in http.get_inference_statistics()["model_stats"]}
    x = np.ones(4, dtype=np.float32)
    for _ in range(3):
        http.infer("diamond", [_input(httpclient, x)])
    after = {s["name"]: s for s in http.get_inference_statistics()["model_stats"]}
    for name in ("diamond", "pre", "scale", "shift", "combine"):
        grew = after[name]["inference_stats"]["success"]["count"] - before[name]["inference_stats"]["success"]["count"]
        assert grew == 3, name
    assert after["diamond"]["inference_count"] - before["diamond"]["inference_count"] == 3
    # Triton's figures for an ensemble: an execution per request, compute times summed over its steps
    assert after["diamond"]["execution_count"] - before["diamond"]["execution_count"] == 3
    infer_ns = {n: after[n]["inference_stats"]["compute_infer"]["ns"]
                - before[n]["inference_stats"]["compute_infer"]["ns"]
                for n in ("diamond", "pre", "scale", "shift", "combine")}
    assert infer_ns["diamond"] == sum(infer_ns[n] for n in ("pre", "scale", "shift", "combine")) > 0


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_ensemble_is_unavailable_with_tritons_reason(server, http, name):
    index = {m["name"]: m for m in http.get_model_repository_index()}
    entry = index[name]
    assert not http.is_model_ready(name)
    if name in POLL_FAILURES:  # as Triton: not loaded at all, the reason in the log
        assert "state" not in entry
        assert INVALID[name][1] in server.log()
    else:
        assert entry["state"] == "UNAVAILABLE"
        assert entry["reason"] == "Invalid argument: " + INVALID[name][1]


@pytest.fixture(scope="module")
def explicit(server, tmp_path_factory):
    """A second server on the same repository, in explicit model control mode, nothing loaded."""
    repo = next(a for a in server.args if a.endswith("models"))
    yield from serving(Path(repo), tmp_path_factory.mktemp("log"), "--model-control-mode", "explicit")


@pytest.mark.parametrize("name", sorted(INVALID))
def test_loading_an_invalid_ensemble_answers_tritons_error(explicit, name):
    client = httpclient.InferenceServerClient(explicit.http_url)
    try:
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(name)
        if name in POLL_FAILURES:
            assert failure.value.message() == f"failed to load '{name}', failed to poll from model repository"
        else:
            assert failure.value.message() == f"load failed for model '{name}': {INVALID[name][1]}\n"
            assert failure.value.status() == "400"
    finally:
        client.close()


def test_explicit_control_loads_and_unloads_composing_models_as_triton(explicit):
    client = httpclient.InferenceServerClient(explicit.http_url)
    composing = ["combine", "pre", "scale", "shift"]

    def ready() -> list[str]:
        return sorted(m["name"] for m in client.get_model_repository_index()
                      if m.get("state") == "READY" and m["name"] in ("diamond", *composing))

    try:
        client.load_model("diamond")  # loads what it composes
        assert ready() == sorted(["diamond", *composing])
        client.unload_model("diamond")  # they stay
        assert ready() == composing
        client.load_model("diamond")
        client.unload_model("pre")  # the ensemble goes with one of its models
        assert ready() == ["combine", "scale", "shift"]
        client.load_model("diamond")
        assert ready() == sorted(["diamond", *composing])
        client.unload_model("diamond", unload_dependents=True)
        assert ready() == []
    finally:
        client.close()


def test_failing_step_fails_the_request_with_its_message(http):
    with pytest.raises(InferenceServerException) as failure:
        http.infer("failing", [_input(httpclient, np.ones(4, dtype=np.float32))])
    assert failure.value.message().startswith("in ensemble 'failing', Failed to process the request(s) for model ")
    assert "ValueError: step failed on purpose" in failure.value.message()
    stats = http.get_inference_statistics("failing")["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] >= 1
    # the server still serves the good pipeline
    np.testing.assert_array_equal(http.infer("diamond", [_input(httpclient, np.zeros(2, np.float32))])
                                  .as_numpy("OUTPUT"), np.ones(2, np.float32))


def test_a_step_whose_worker_dies_fails_the_request_and_the_server_carries_on(http):
    with pytest.raises(InferenceServerException) as failure:
        http.infer("crashing", [_input(httpclient, -np.ones(4, dtype=np.float32))])
    assert failure.value.message().startswith("in ensemble 'crashing', Failed to process the request(s) for model "
                                              "instance 'crasher_0', message: Stub process")
    for _ in range(100):  # the worker is restarted
        if http.is_model_ready("crasher"):
            break
        time.sleep(0.1)
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(http.infer("crashing", [_input(httpclient, x)]).as_numpy("OUTPUT"), x * 2)


def test_wrong_input_is_refused_before_any_step(http):
    t = httpclient.InferInput("INPUT", [4], "INT32")
    t.set_data_from_numpy(np.ones(4, dtype=np.int32))
    with pytest.raises(InferenceServerException, match="data-type is 'INT32', but model 'diamond' expects 'FP32'"):
        http.infer("diamond", [t])


def test_ensemble_outputs_into_client_shm_region(http):
    x = np.arange(1024, dtype=np.float32)
    nbytes = x.nbytes
    handle_in = shm.create_shared_memory_region("pipe_in", "/pipe_in", nbytes)
    handle_out = shm.create_shared_memory_region("pipe_out", "/pipe_out", nbytes)
    try:
        shm.set_shared_memory_region(handle_in, [x])
        http.register_system_shared_memory("pipe_in", "/pipe_in", nbytes)
        http.register_system_shared_memory("pipe_out", "/pipe_out", nbytes)
        t = httpclient.InferInput("INPUT", [1024], "FP32")
        t.set_shared_memory("pipe_in", nbytes)
        out = httpclient.InferRequestedOutput("OUTPUT", binary_data=True)
        out.set_shared_memory("pipe_out", nbytes)
        result = http.infer("diamond", [t], outputs=[out])
        output = result.get_output("OUTPUT")
        assert output == {"name": "OUTPUT", "datatype": "FP32", "shape": [1024]}  # the bytes are in the region
        got = shm.get_contents_as_numpy(handle_out, np.float32, [1024])
        np.testing.assert_array_equal(got, x * 2 * 10 + x * 2 + 1)
    finally:
        http.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle_in)
        shm.destroy_shared_memory_region(handle_out)


def test_middle_step_batches_dynamically_under_concurrent_requests(server, http):
    before = http.get_inference_statistics("batched")["model_stats"][0]
    n = 8

    def one(i: int) -> np.ndarray:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            x = np.full((1, 3), i, dtype=np.float32)
            return client.infer("batching", [_input(httpclient, x)]).as_numpy("OUTPUT")
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out, np.full((1, 3), i * 2 * 3 + 1, dtype=np.float32))
    after = http.get_inference_statistics("batched")["model_stats"][0]
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]
    assert inferences == n
    assert executions < n, "the middle step never batched"
    assert any(b["batch_size"] > 1 for b in after["batch_stats"])


def test_intermediate_tensors_are_not_copied_through_the_front():
    """The front's copy counter grows by the ensemble's input only: the 4 MiB tensor between the
    two steps passes from one worker's arena to the next by reference."""
    import tempfile
    from pathlib import Path

    from kernel.api import Server

    with tempfile.TemporaryDirectory() as tmp:
        repo = build(Path(tmp) / "models")
        with Server(model_repository=str(repo), model_control_mode="explicit", load_models=["wide"]) as server:
            assert server.model("pre").ready() is False  # only the ensemble and what it composes
            core = server.core
            x = np.arange(256 * 1024, dtype=np.float32)  # 1 MiB; the intermediate is 4 MiB
            model = server.model("wide")
            start = core.copied_bytes
            result = model.infer({"INPUT": x})
            np.testing.assert_array_equal(result["OUTPUT"], x * 4)
            result.release()
            assert core.copied_bytes - start == x.nbytes
            # through an input buffer in the front's arena, nothing at all is copied
            buf = model.input_buffer("INPUT", [x.size])
            buf[:] = x
            start = core.copied_bytes
            result = model.infer({"INPUT": buf})
            np.testing.assert_array_equal(result["OUTPUT"], x * 4)
            result.release()
            assert core.copied_bytes - start == 0


def _example(name: str):
    """An example model's module, imported with our pb_utils (to compute the expected answer directly)."""
    from workers.backends.python import triton_python_backend_utils as pb

    sys.modules.setdefault("triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / "models" / name / "1" /
                                                  "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_camera_pipeline_frame_in_client_shm_over_grpc(server):
    frame = np.random.default_rng(3).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    expected = _example("camera_postprocess").postprocess(_example("camera_detector").detect(
        _example("camera_preprocess").preprocess(frame)))
    assert len(expected) > 0
    handle = shm.create_shared_memory_region("frame", "/pipe_frame", frame.nbytes)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        shm.set_shared_memory_region(handle, [frame])
        grpc.register_system_shared_memory("frame", "/pipe_frame", frame.nbytes)
        t = grpcclient.InferInput("FRAME", list(frame.shape), "UINT8")
        t.set_shared_memory("frame", frame.nbytes)
        result = grpc.infer("camera_pipeline", [t])
        np.testing.assert_allclose(result.as_numpy("DETECTIONS"), expected, rtol=1e-5)
    finally:
        grpc.unregister_system_shared_memory()
        grpc.close()
        shm.destroy_shared_memory_region(handle)


def test_decoupled_step_makes_a_decoupled_ensemble(server, http):
    """Each response of the decoupled step runs the steps after it once more; the ensemble streams."""
    import queue

    assert http.get_model_config("fanout")["model_transaction_policy"]["decoupled"] is True
    x = np.array([3, 1, 4], dtype=np.int32)
    t = httpclient.InferInput("IN", [3], "INT32")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="doesn't support models with decoupled transaction policy"):
        http.infer("fanout", [t])
    got: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        grpc.start_stream(callback=lambda result, error: got.put((result, error)))
        g = grpcclient.InferInput("IN", [3], "INT32")
        g.set_data_from_numpy(x)
        grpc.async_stream_infer("fanout", [g], enable_empty_final_response=True)
        answers = {}
        while True:
            result, error = got.get(timeout=30)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            answers[int(result.as_numpy("IDX")[0])] = int(result.as_numpy("OUTPUT")[0])
        assert answers == {0: 6, 1: 2, 2: 8}
    finally:
        grpc.stop_stream()
        grpc.close()
