"""Explicit model control's load with overrides (a config, files sent with the request), compared with
Triton 2.51's answers (docs/triton-behaviour.md §11)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from http.client import HTTPConnection

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo") / "models"
    for name in ("identity", "add_sub", "camera_pipeline", "camera_preprocess", "camera_detector",
                 "camera_postprocess"):
        shutil.copytree(ROOT / "examples" / "models" / name, repo / name)
    run = serving(repo, tmp_path_factory.mktemp("log"), "--model-control-mode=explicit", "--load-model=*")
    srv = next(run)
    yield srv
    pid = srv.proc.pid
    for _ in run:  # stops it (and checks it stopped cleanly)
        pass
    # a model still loaded from sent files at exit: its directory goes too
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"ek-model-{pid}.*-*")) == []


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _identity_serves(client: httpclient.InferenceServerClient) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    t = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("identity", [t]).as_numpy("OUTPUT0"), x)


NOSUCH = ("load failed for model 'identity': version 1 is at UNAVAILABLE state: Invalid argument: unable to find "
          "backend library for backend 'nosuch', try specifying runtime on the model configuration.;\n")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_failed_override_answers_its_own_reason_and_keeps_the_model_serving(http, grpc, protocol):
    client = http if protocol == "http" else grpc
    with pytest.raises(InferenceServerException) as e:
        client.load_model("identity", config=json.dumps({"backend": "nosuch"}))
    assert e.value.message() == NOSUCH
    assert e.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("identity", config=json.dumps({"max_batch_size": -3}))
    # Triton: 500 "failed to load 'identity', failed to poll from model repository" (the reason only in its log)
    assert e.value.message() == ("load failed for model 'identity': version 1 is at UNAVAILABLE state: Invalid "
                                 "argument: 'max_batch_size' must be non-negative value for identity;\n")
    assert e.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    index = [m for m in http.get_model_repository_index() if m["name"] == "identity"]
    assert index == [{"name": "identity", "version": "1", "state": "READY"}]
    _identity_serves(http)


@pytest.mark.parametrize("body, error", [
    (b'{"parameters":{"config":5}}', "attempt to access JSON non-string as string"),
    (b'{"parameters":{"config":null}}', "attempt to access JSON non-string as string"),
    (b'{"parameters":{"foo":1}}', "attempt to access JSON non-string as string"),
    (b'{"parameters":{"unload_dependents":true}}', "attempt to access JSON non-string as string"),
    (b'{"parameters":{"foo":"x"}}', "unexpected error on creating Triton parameter"),
    (b'{"parameters":{"foo":"x","config":5}}', "unexpected error on creating Triton parameter"),  # in order
    (b'{"parameters":{"config":5,"foo":"x"}}', "attempt to access JSON non-string as string"),
    (b'{"parameters":null}', "attempt to get members for non-object"),
])
def test_load_parameters_a_client_got_wrong(server, body, error):
    """Each refused as Triton 2.51 refuses it, in its words and order (docs/triton-behaviour.md §11), with a 400
    where Triton answers 500; the model is not touched."""
    conn = HTTPConnection(server.http_url, timeout=30)
    conn.request("POST", "/v2/repository/models/identity/load", body=body)
    reply = conn.getresponse()
    assert (reply.status, json.loads(reply.read())) == (400, {"error": error})
    conn.close()
    assert "Traceback" not in server.log()
    assert httpclient.InferenceServerClient(server.http_url).is_model_ready("identity")


def test_a_model_no_repository_has_is_not_remembered(http, grpc):
    for client in (http, grpc):
        with pytest.raises(InferenceServerException) as e:
            client.load_model("nope")
        assert e.value.message() == "failed to load 'nope', failed to poll from model repository"
    assert "nope" not in {m["name"] for m in http.get_model_repository_index()}
    assert http.is_server_ready()


# -- loading from files sent with the request (Triton's `file:<path>` load parameters) ---------------------------
IDENTITY_PY = (ROOT / "examples" / "models" / "identity" / "1" / "model.py").read_bytes()
FP32x4 = json.dumps({"backend": "python", "max_batch_size": 0,
                     "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
                     "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}]})


def _private_dirs(server) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"ek-model-{server.proc.pid}.*-*"))


def _echo4(client, name: str, module=httpclient) -> None:
    x = np.array([1.5, 2, 3, 4], np.float32)
    t = module.InferInput("INPUT0", [4], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer(name, [t]).as_numpy("OUTPUT0"), x)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_new_model_loads_from_the_files_sent(server, http, grpc, protocol):
    client, module = (http, httpclient) if protocol == "http" else (grpc, grpcclient)
    name = f"newm_{protocol}"
    client.load_model(name, config=FP32x4, files={"file:1/model.py": IDENTITY_PY})
    _echo4(client, name, module)
    assert len(_private_dirs(server)) == 1
    # As Triton's, the index lists only the repository's models.
    assert name not in {m["name"] for m in http.get_model_repository_index()}
    client.unload_model(name)
    assert not http.is_model_ready(name)
    assert _private_dirs(server) == []  # the files went with the model
    with pytest.raises(InferenceServerException) as e:
        client.load_model(name)  # no repository has it
    assert e.value.message() == f"failed to load '{name}', failed to poll from model repository"


@pytest.mark.parametrize("files, config", [
    ({"file:1/model.py": IDENTITY_PY}, None),  # Triton: "Load parameter 'config' must be specified ..."
    ({"file:../../x/model.py": IDENTITY_PY}, FP32x4),  # "... must stay within model directory."
    ({"file:1/../../../model.py": IDENTITY_PY}, FP32x4),
])
def test_files_without_a_config_or_outside_the_directory_fail_the_load(server, http, files, config):
    with pytest.raises(InferenceServerException) as e:
        http.load_model("newm2", config=config, files=files)
    # Triton: 500, the reason only in its log
    assert e.value.message() == "failed to load 'newm2', failed to poll from model repository"
    assert e.value.status() == "400"
    assert "newm2" not in {m["name"] for m in http.get_model_repository_index()}
    assert _private_dirs(server) == []


def test_a_path_that_stays_inside_after_normalising_is_accepted(http):
    http.load_model("newm3", config=FP32x4, files={"file:1/../1/./model.py": IDENTITY_PY})
    _echo4(http, "newm3")
    http.unload_model("newm3")


def test_files_replace_a_repository_model_until_it_loads_again(server, http):
    http.load_model("add_sub", config=FP32x4, files={"file:1/model.py": IDENTITY_PY})
    assert http.get_model_config("add_sub")["input"][0]["data_type"] == "TYPE_FP32"
    _echo4(http, "add_sub")
    assert [m for m in http.get_model_repository_index() if m["name"] == "add_sub"] == \
        [{"name": "add_sub", "version": "1", "state": "READY"}]
    http.load_model("add_sub")  # from its repository again
    assert http.get_model_config("add_sub")["input"][0]["data_type"] == "TYPE_INT32"
    assert _private_dirs(server) == []


def test_an_onnx_model_loads_from_the_files_sent(server, http):
    pytest.importorskip("onnxruntime")
    from tests.framework_models import add_sub_graph, onnx_bytes

    http.load_model("onnx_sent", config=json.dumps({"backend": "onnxruntime", "max_batch_size": 8}),
                    files={"file:1/model.onnx": onnx_bytes(add_sub_graph())})
    a, b = np.ones((2, 4), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = []
    for n, x in (("A", a), ("B", b)):
        inputs.append(httpclient.InferInput(n, [2, 4], "FP32"))
        inputs[-1].set_data_from_numpy(x)
    result = http.infer("onnx_sent", inputs)
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)
    http.unload_model("onnx_sent")
    assert _private_dirs(server) == []


def test_sent_files_at_exit_and_malformed_file_parameters(server, http):
    http.load_model("kept", config=FP32x4, files={"file:1/model.py": IDENTITY_PY})  # the fixture checks its exit
    assert len(_private_dirs(server)) == 1
    for value, error in (("5", b'{"error":"attempt to access JSON non-string as string"}'),
                         ('"!!notbase64"', b'{"error":"failed to decode the base64 content of load parameter '
                                           b"'file:1/model.py'\"}")):
        conn = HTTPConnection(server.http_url, timeout=30)
        body = f'{{"parameters":{{"config":{json.dumps(FP32x4)},"file:1/model.py":{value}}}}}'
        conn.request("POST", "/v2/repository/models/kept2/load", body=body.encode())
        reply = conn.getresponse()
        assert (reply.status, reply.read()) == (400, error)  # Triton: 500 for the first
        conn.close()


# -- the configuration as Triton's core normalises it ---------------------------------------------------------
def test_dynamic_batching_reports_max_batch_size_as_the_preferred_size(http, grpc):
    # examples' identity: max_batch_size 64, dynamic_batching { max_queue_delay_microseconds: 100 }
    assert http.get_model_config("identity")["dynamic_batching"]["preferred_batch_size"] == [64]
    assert list(grpc.get_model_config("identity").config.dynamic_batching.preferred_batch_size) == [64]
    _identity_serves(http)


def test_an_ensemble_config_is_tritons(server, http, grpc):
    conn = HTTPConnection(server.http_url, timeout=30)
    conn.request("GET", "/v2/models/camera_pipeline/config")
    body = conn.getresponse().read().decode()
    conn.close()
    assert '"optimization"' not in body and "max_inflight_requests" not in body
    assert body.endswith(',"model_warmup":[],"model_transaction_policy":{"decoupled":false}}')
    config = grpc.get_model_config("camera_pipeline").config
    assert not config.HasField("optimization") and config.HasField("model_transaction_policy")


def test_model_files_of_servers_that_are_gone_are_removed(tmp_path):
    """A server killed with a file-loaded model leaves its directory; the next server to start removes it,
    never one of a server still running, nor anything not named as ours."""
    import subprocess
    import sys

    from kernel.repository import remove_stale_overrides, write_override
    from shm.region import owner_token

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f"ek-model-{dead.pid}.12345-abc", "reused": f"ek-model-{os.getpid()}.1-def",
             "alive": f"ek-model-{owner_token()}-ghi", "old": f"ek-model-{dead.pid}-jkl", "other": "ek-models-x"}
    for name in names.values():
        (tmp_path / name / "m" / "1").mkdir(parents=True)
    (tmp_path / "ek-model-1.1-file").write_text("not a directory")
    removed = remove_stale_overrides(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ("dead", "reused"))
    assert sorted(os.listdir(tmp_path)) == sorted([names["alive"], names["old"], names["other"], "ek-model-1.1-file"])
    kept = write_override("m", {"file:1/model.py": b"x"})  # this process's own: named to be kept
    try:
        assert os.path.basename(os.path.dirname(kept)).startswith(f"ek-model-{owner_token()}-")
        assert kept not in remove_stale_overrides(os.path.dirname(os.path.dirname(kept)))
        assert os.path.isdir(kept)
    finally:
        shutil.rmtree(os.path.dirname(kept))
