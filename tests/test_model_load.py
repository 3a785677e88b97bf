"""Explicit model control's load with overrides (a config, files sent with the request), compared with
Triton 2.51's answers (docs/triton-behaviour.md §11)."""

from __future__ import annotations

import json
import shutil
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
    for name in ("identity", "add_sub"):
        shutil.copytree(ROOT / "examples" / "models" / name, repo / name)
    yield from serving(repo, tmp_path_factory.mktemp("log"), "--model-control-mode=explicit", "--load-model=*")


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


def test_a_config_that_is_not_a_string_is_the_clients_mistake(server):
    # Triton: 500 with the same words
    conn = HTTPConnection(server.http_url, timeout=30)
    conn.request("POST", "/v2/repository/models/identity/load", body=b'{"parameters":{"config":5}}')
    reply = conn.getresponse()
    assert (reply.status, reply.read()) == (400, b'{"error":"attempt to access JSON non-string as string"}')
    conn.close()
    assert "Traceback" not in server.log()


def test_a_model_no_repository_has_is_not_remembered(http, grpc):
    for client in (http, grpc):
        with pytest.raises(InferenceServerException) as e:
            client.load_model("nope")
        assert e.value.message() == "failed to load 'nope', failed to poll from model repository"
    assert "nope" not in {m["name"] for m in http.get_model_repository_index()}
    assert http.is_server_ready()
