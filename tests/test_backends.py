"""Third-party backends from --backend-directory, and what reaches a backend (--backend-config, environment).

The backends here are written into a temporary backend directory as a user would: a
``backend.py`` on this server's interface (workers.backend), a Triton python-based backend
(``model.py``), a native Triton backend this server cannot load, and broken ones.
"""

from __future__ import annotations

import ctypes.util
import json
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.support import KernelServer

SCALER = '''
import json, os
import numpy as np
from workers.backend import Backend as Base, BackendError, Response, batch_input, batch_sizes, split


class Backend(Base):
    """OUT = IN * factor + offset, batched; INFO: what the backend was told (JSON)."""

    def __init__(self, model):
        super().__init__(model)
        self.factor = float(model.backend_config.get("factor", "1"))
        self.offset = float(model.backend_config.get("offset", "0"))
        self.info = json.dumps({"kind": model.kind, "instance": model.instance_name, "artifact": model.artifact,
                                "config": model.backend_config, "ld_preload": os.environ.get("LD_PRELOAD", ""),
                                "maps": open("/proc/self/maps").read().count("libgomp")})

    @classmethod
    def auto_complete_config(cls, model):
        config = dict(model.config)
        if not config.get("input"):
            config["input"] = [{"name": "IN", "data_type": "TYPE_FP32", "dims": [-1]}]
            config["output"] = [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [-1]},
                                {"name": "INFO", "data_type": "TYPE_STRING", "dims": [1]}]
        return config

    def execute(self, requests):
        if any(r.inputs["IN"].size and r.inputs["IN"].reshape(-1)[0] < 0 for r in requests):
            raise BackendError("negative inputs are refused", "INVALID_ARG")
        sizes = batch_sizes(requests, True)
        out = batch_input(requests, "IN") * self.factor + self.offset
        info = np.array([[self.info.encode()]] * sum(sizes), dtype=object)
        return [Response({"OUT": o, "INFO": i}) for o, i in zip(split(out, sizes), split(info, sizes))]
'''

PY_BASED = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """A Triton python-based backend: one model.py serving every model that names the backend."""

    def initialize(self, args):
        self.name = args["model_name"]

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", x + 1),
                pb_utils.Tensor("INFO", np.array([[self.name.encode()]] * x.shape[0], dtype=object))]))
        return out
'''

IO = ('max_batch_size: 8\ninput [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
      'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] }, '
      '{ name: "INFO", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    first, second = root / "backends_a", root / "backends_b"
    (first / "scaler").mkdir(parents=True)
    (first / "scaler" / "backend.py").write_text(SCALER)
    (first / "pybased").mkdir()
    (first / "pybased" / "model.py").write_text(PY_BASED)
    (first / "native").mkdir()
    (first / "native" / "libtriton_native.so").write_bytes(b"\x7fELF")
    (second / "broken_import").mkdir(parents=True)
    (second / "broken_import" / "backend.py").write_text("import a_framework_that_is_not_installed\n")
    (second / "no_class").mkdir()
    (second / "no_class" / "backend.py").write_text("X = 1\n")
    (second / "fails_load").mkdir()
    (second / "fails_load" / "backend.py").write_text(textwrap.dedent('''
        from workers.backend import Backend as Base, BackendError
        class Backend(Base):
            def __init__(self, model):
                raise BackendError("the accelerator is busy", "UNAVAILABLE")
    '''))
    # Searched in order, before the built-ins: "scaler" of the first directory wins over the second's,
    # and the second's "onnxruntime" over the built-in one.
    (second / "scaler").mkdir()
    (second / "scaler" / "backend.py").write_text("raise ImportError('the second scaler must not be used')\n")
    (second / "onnxruntime").mkdir()
    (second / "onnxruntime" / "backend.py").write_text(SCALER)
    repo = root / "models"
    models = {
        "scaled": 'backend: "scaler"\n' + IO + "dynamic_batching { max_queue_delay_microseconds: 20000 }\n",
        "scaled_auto": 'backend: "scaler"\nmax_batch_size: 4\n',
        "py_based": 'backend: "pybased"\n' + IO,
        "native_model": 'backend: "native"\n' + IO,
        "broken_import_model": 'backend: "broken_import"\n' + IO,
        "no_class_model": 'backend: "no_class"\n' + IO,
        "fails_load_model": 'backend: "fails_load"\n' + IO,
        "unknown_backend": 'backend: "nowhere"\n' + IO,
        "shadowed_onnx": 'backend: "onnxruntime"\n' + IO,
    }
    for name, config in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
    gomp = ctypes.util.find_library("gomp")
    srv = KernelServer(repo, "--backend-directory", str(first), "--backend-directory", str(second),
                       "--backend-config", "scaler,factor=3", "--backend-config", "offset=0.5",
                       "--backend-config", f"scaler,libomp-path={gomp}" if gomp else "scaler,libomp-path=")
    srv.start(tmp_path_factory.mktemp("log") / "server.log")
    srv.gomp = gomp
    yield srv
    assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm()


def _inputs(module, x: np.ndarray) -> list:
    t = module.InferInput("IN", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return [t]


def test_third_party_backend_serves_http_and_grpc(server):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    http = httpclient.InferenceServerClient(server.http_url)
    result = http.infer("scaled", _inputs(httpclient, x))
    np.testing.assert_array_equal(result.as_numpy("OUT"), x * 3 + 0.5)  # backend-specific and global settings
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    result = grpc.infer("scaled", _inputs(grpcclient, x))
    np.testing.assert_array_equal(result.as_numpy("OUT"), x * 3 + 0.5)
    info = json.loads(result.as_numpy("INFO")[0, 0])
    assert info["kind"] == "CPU" and info["instance"] == "scaled_0"  # no instance_group: a group named "scaled"
    assert info["config"] == {"offset": "0.5", "factor": "3", "libomp-path": server.gomp or ""}
    assert info["artifact"].endswith("/scaled/1")  # no default model file: the version directory
    if server.gomp:  # preloaded before the worker's interpreter started, so mapped even though nothing uses it
        assert info["ld_preload"].split(":")[0] == server.gomp and info["maps"] > 0
    http.close()
    grpc.close()


def test_backend_directories_come_first_in_order(server):
    http = httpclient.InferenceServerClient(server.http_url)
    result = http.infer("shadowed_onnx", _inputs(httpclient, np.ones((1, 1), np.float32)))
    assert result.as_numpy("OUT").tolist() == [[1.5]]  # the directory's "onnxruntime": factor 1, offset 0.5
    http.close()


def test_a_backends_error_reaches_the_client(server):
    http = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(Exception) as e:
        http.infer("scaled", _inputs(httpclient, np.array([[-1.0]], np.float32)))
    assert "negative inputs are refused" in str(e.value) and e.value.status() == "400"
    np.testing.assert_array_equal(http.infer("scaled", _inputs(httpclient, np.ones((1, 1), np.float32)))
                                  .as_numpy("OUT"), [[3.5]])  # and the worker still serves
    http.close()


def test_third_party_auto_complete(server):
    http = httpclient.InferenceServerClient(server.http_url)
    config = http.get_model_config("scaled_auto")
    assert [t["name"] for t in config["input"]] == ["IN"] and [t["name"] for t in config["output"]] == ["OUT", "INFO"]
    assert http.infer("scaled_auto", _inputs(httpclient, np.ones((1, 2), np.float32))).as_numpy("OUT").tolist() == [
        [3.5, 3.5]]
    http.close()


def test_python_based_backend(server):
    http = httpclient.InferenceServerClient(server.http_url)
    result = http.infer("py_based", _inputs(httpclient, np.zeros((1, 2), np.float32)))
    np.testing.assert_array_equal(result.as_numpy("OUT"), [[1, 1]])
    assert result.as_numpy("INFO")[0, 0] == b"py_based"
    http.close()


@pytest.mark.parametrize("model, reason", [
    ("native_model", "backend 'native' in "),
    ("broken_import_model", "unable to load backend 'broken_import' from "),
    ("no_class_model", "must define class Backend, a subclass of workers.backend.Backend"),
    ("fails_load_model", "Unavailable: the accelerator is busy"),
    ("unknown_backend", "unable to find backend library for backend 'nowhere'"),
])
def test_backends_that_cannot_serve_leave_their_models_unavailable(server, model, reason):
    http = httpclient.InferenceServerClient(server.http_url)
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index[model]["state"] == "UNAVAILABLE" and reason in index[model]["reason"], index[model]
    assert http.is_model_ready("scaled")  # the others serve
    http.close()


def test_a_missing_framework_names_the_extra_to_install(tmp_path):
    """onnxruntime hidden from the workers: the model says which extra installs it."""
    blocker = tmp_path / "blocker" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\", "
                                         "name='onnxruntime')\n")
    repo = tmp_path / "models"
    (repo / "needs_onnx" / "1").mkdir(parents=True)
    (repo / "needs_onnx" / "1" / "model.onnx").write_bytes(b"")
    (repo / "needs_onnx" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    from tests.support import ROOT

    srv = KernelServer(repo, env={"PYTHONPATH": f"{tmp_path / 'blocker'}:{ROOT}"}).start(tmp_path / "log")
    try:
        http = httpclient.InferenceServerClient(srv.http_url)
        (entry,) = http.get_model_repository_index()
        assert entry["state"] == "UNAVAILABLE"
        assert entry["reason"] == ("Unavailable: unable to load backend 'onnxruntime': No module named "
                                   "'onnxruntime' (pip install 'edge-kernel[onnx]')")
        http.close()
    finally:
        assert srv.stop() == 0


def test_the_documented_example_backend(tmp_path):
    """examples/backends/linear, as docs/backends.md shows it (the page holds the file verbatim)."""
    from tests.support import ROOT

    source = (ROOT / "examples" / "backends" / "linear" / "backend.py").read_text()
    assert source in (ROOT / "docs" / "backends.md").read_text()
    rng = np.random.default_rng(0)
    weights, bias = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    repo = tmp_path / "models"
    (repo / "linear_model" / "1").mkdir(parents=True)
    np.savez(repo / "linear_model" / "1" / "model.npz", W=weights, b=bias)
    (repo / "linear_model" / "config.pbtxt").write_text('backend: "linear"\n')
    srv = KernelServer(repo, "--backend-directory", str(ROOT / "examples" / "backends"),
                       "--backend-config", "linear,scale=2").start(tmp_path / "log")
    try:
        http = httpclient.InferenceServerClient(srv.http_url)
        config = http.get_model_config("linear_model")
        assert config["max_batch_size"] == 8 and "dynamic_batching" in config
        assert [(t["name"], t["dims"]) for t in config["input"] + config["output"]] == [("X", [3]), ("Y", [2])]
        x = rng.standard_normal((4, 3)).astype(np.float32)
        t = httpclient.InferInput("X", [4, 3], "FP32")
        t.set_data_from_numpy(x)
        np.testing.assert_allclose(http.infer("linear_model", [t]).as_numpy("Y"), (x @ weights + bias) * 2, rtol=1e-6)
        http.close()
    finally:
        assert srv.stop() == 0
