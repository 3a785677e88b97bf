"""Triton's qa/L0_http behaviours on this server (restricted APIs, client mistakes), through tritonclient.http.

The server here protects three groups of endpoints the way ``L0_http``'s restricted-API runs do; the
tests check each category is refused without its header (403 and Triton's text), answered with it,
and that the categories left open stay open.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, serving
from tests.test_http import add_sub_inputs, raw_post

ADMIN = {"admin-key": "admin-value"}
STATS = {"stats-key": "stats-value"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("qa_repo")
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", repo / "add_sub")
    yield from serving(repo, tmp_path_factory.mktemp("qa_log"),
                       "--http-restricted-api", "model-repository,shared-memory,logging:admin-key=admin-value",
                       "--http-restricted-api", "statistics,trace,model-config:stats-key=stats-value",
                       "--model-control-mode", "explicit", "--load-model", "add_sub")


def _refused(call, key: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == "403"
    assert e.value.message() == f"This API is restricted, expecting header '{key}'"


def test_restricted_categories_need_their_header(http):
    checks = [
        ("admin-key", ADMIN, lambda h: http.get_model_repository_index(headers=h)),
        ("admin-key", ADMIN, lambda h: http.load_model("add_sub", headers=h)),
        ("admin-key", ADMIN, lambda h: http.get_system_shared_memory_status(headers=h)),
        ("admin-key", ADMIN, lambda h: http.unregister_system_shared_memory(headers=h)),
        ("admin-key", ADMIN, lambda h: http.get_cuda_shared_memory_status(headers=h)),
        ("admin-key", ADMIN, lambda h: http.get_log_settings(headers=h)),
        ("stats-key", STATS, lambda h: http.get_inference_statistics(headers=h)),
        ("stats-key", STATS, lambda h: http.get_inference_statistics("add_sub", headers=h)),
        ("stats-key", STATS, lambda h: http.get_trace_settings(headers=h)),
        ("stats-key", STATS, lambda h: http.get_trace_settings("add_sub", headers=h)),
        ("stats-key", STATS, lambda h: http.get_model_config("add_sub", headers=h)),
    ]
    for key, good, call in checks:
        other = STATS if good is ADMIN else ADMIN  # another category's key does not open this one
        for headers in (None, {key: "wrong"}, other):
            _refused(lambda c=call, h=headers: c(h), key)
        call(good)


def test_open_categories_stay_open(http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("add_sub")
    assert http.get_server_metadata()["name"] == "triton"
    assert http.get_model_metadata("add_sub")["name"] == "add_sub"
    a = np.arange(16, dtype=np.int32)
    np.testing.assert_array_equal(http.infer("add_sub", add_sub_inputs(a, a)).as_numpy("OUTPUT0"), 2 * a)


def test_refusal_comes_before_the_route_looks_at_anything(server):
    """Like Triton: a refused request learns nothing (an unknown model is refused, not 404) and its body
    is never parsed (a malformed one is refused, not 400)."""
    status, body = raw_post(server, "/v2/repository/models/no_such_model/load", b"{not json")
    assert (status, json.loads(body)) == (403, {"error": "This API is restricted, expecting header 'admin-key'"})
    status, body = raw_post(server, "/v2/repository/models/no_such_model/load", b"{not json", ADMIN)
    assert status == 400 and "failed to parse the request JSON buffer" in json.loads(body)["error"]


# -- client mistakes: 400 with a JSON error (Triton: 500) ---------------------------------------------------
def _infer_doc(data0, shape0=(16,), datatype="INT32") -> bytes:
    a = list(range(16))
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": list(shape0), "datatype": datatype, "data": data0},
                                  {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": a}]}).encode()


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "failed to parse the request JSON buffer"),
    (b"[1, 2, 3]", "Unable to parse 'inputs'"),
    (b'"a string"', "Unable to parse 'inputs'"),
    (_infer_doc(list(range(15))), "Shape does not match true shape of 'data' field"),
    (_infer_doc(list(range(16)), shape0=(-16,)), "Unable to parse 'shape'"),
    (_infer_doc(list(range(16)), shape0=(16.5,)), "Unable to parse 'shape'"),
    (_infer_doc(list(range(16)), shape0=("16",)), "Unable to parse 'shape'"),
    (_infer_doc(["x"] * 16), "Unable to parse 'data'"),
])
def test_client_mistakes_are_400_with_a_json_error(server, http, body, fragment):
    status, reply = raw_post(server, "/v2/models/add_sub/infer", body, {"Content-Type": "application/json"})
    assert status == 400, reply
    assert fragment in json.loads(reply)["error"]
    a = np.arange(16, dtype=np.int32)
    np.testing.assert_array_equal(http.infer("add_sub", add_sub_inputs(a, a)).as_numpy("OUTPUT0"), 2 * a)


def _exchange(server, raw: bytes) -> bytes:
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http10_post_without_length_is_411(server, http):
    body = _infer_doc(list(range(16)))
    reply = _exchange(server, b"POST /v2/models/add_sub/infer HTTP/1.0\r\nHost: x\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 411 "), reply[:200]
    assert b"Content-Length" in reply.partition(b"\r\n\r\n")[2]
    # With a length, HTTP/1.0 is served.
    reply = _exchange(server, b"POST /v2/models/add_sub/infer HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert http.is_server_live()
