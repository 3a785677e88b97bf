"""Triton's generate extension (``/generate``, ``/generate_stream``; docs/triton-behaviour.md §18) against a real
server, over plain HTTP: the JSON <-> tensors mapping (read back by the models themselves), Server-Sent Events
from a decoupled model, errors, an unknown model, a client leaving mid-stream, statistics, tracing, and
``/infer`` alongside. The module's server checks at exit that no shared memory was left behind."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from protocol.http.generate import NOT_ONE
from tests.support import python_model, serving

_GEN_ECHO = ("""max_batch_size: 0
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "n", data_type: TYPE_FP32, dims: [ -1 ], optional: true },
  { name: "flag", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "k", data_type: TYPE_INT32, dims: [ 1 ], optional: true }
]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "values", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "info", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "matrix", data_type: TYPE_INT32, dims: [ 2, 2 ] },
  { name: "one", data_type: TYPE_INT64, dims: [ 1, 1 ] }
]
""", """import json
import numpy as np
import triton_python_backend_utils as pb_utils


def _describe(tensor):
    if tensor is None:
        return None
    a = tensor.as_numpy()
    return [list(a.shape), str(a.dtype), a.reshape(-1).tolist()]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            n = pb_utils.get_input_tensor_by_name(request, "n")
            flag = pb_utils.get_input_tensor_by_name(request, "flag")
            k = pb_utils.get_input_tensor_by_name(request, "k")
            info = {
                "text": [t.decode() if isinstance(t, bytes) else str(t) for t in text.reshape(-1)],
                "text_shape": list(text.shape),
                "n": _describe(n),
                "flag": _describe(flag),
                "k": _describe(k),
                "parameters": json.loads(request.parameters()),
                "request_id": request.request_id(),
            }
            upper = np.array([t.upper() for t in text.reshape(-1)], dtype=np.object_).reshape(text.shape)
            vals = (n.as_numpy() * 2) if n is not None else np.zeros([0], np.float32)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", upper),
                pb_utils.Tensor("values", vals.astype(np.float32)),
                pb_utils.Tensor("info", np.array([json.dumps(info).encode()], dtype=np.object_)),
                pb_utils.Tensor("matrix", np.arange(4, dtype=np.int32).reshape(2, 2)),
                pb_utils.Tensor("one", np.array([[7]], np.int64)),
            ]))
        return responses
""")

_GEN_BATCHED = ("""max_batch_size: 4
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "n", data_type: TYPE_INT64, dims: [ -1 ], optional: true },
  { name: "m", data_type: TYPE_FP32, dims: [ 2 ], optional: true }
]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "info", data_type: TYPE_STRING, dims: [ 1 ] }
]
""", """import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            info = {}
            for name in ("text_input", "n", "m"):
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    a = t.as_numpy()
                    values = [x.decode() if isinstance(x, bytes) else x for x in a.reshape(-1).tolist()]
                    info[name] = [list(a.shape), str(a.dtype), values]
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", text),
                pb_utils.Tensor("info", np.array([[json.dumps(info).encode()]] * text.shape[0], dtype=np.object_)),
            ]))
        return responses
""")

_GEN_STREAM = ("""max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "n", data_type: TYPE_INT32, dims: [ 1 ] }
]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "index", data_type: TYPE_INT32, dims: [ 1 ] }
]
""", """import threading
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy().reshape(-1)[0])
            sender = request.get_response_sender()
            threading.Thread(target=self._run, args=(text, n, sender)).start()
        return None

    @staticmethod
    def _run(text, n, sender):
        def resp(i, s):
            return pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", np.array([s.encode()], dtype=np.object_)),
                pb_utils.Tensor("index", np.array([i], np.int32))])
        if n == -1:  # one good response, then an error, then the final flag
            sender.send(resp(0, text))
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("boom mid-stream")))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if n == -2:  # an error first
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("boom first")))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        if n == -3:  # one response carrying the final flag
            sender.send(resp(0, text), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        for i in range(n):
            time.sleep(0.05)
            sender.send(resp(i, f"{text} {i}"))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
""")

_GEN_ERROR = ("""max_batch_size: 0
input [ { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] } ]
output [ { name: "text_output", data_type: TYPE_STRING, dims: [ 1 ] } ]
""", """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            if text == "raise":
                raise pb_utils.TritonModelException("raised by the model")
            if text == "err":
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("bad text")))
            elif text == "params":
                out = pb_utils.Tensor("text_output", np.array([b"p"], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse([out], parameters={"pi": 3, "ps": "s", "pb": True,
                                                                               "pd": 0.5}))
            else:
                out = pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse([out]))
        return responses
""")

_GEN_NUMERIC = ("""max_batch_size: 0
input [
  { name: "a", data_type: TYPE_UINT8, dims: [ -1 ] },
  { name: "b", data_type: TYPE_FP16, dims: [ 1 ], optional: true },
  { name: "c", data_type: TYPE_INT8, dims: [ 2, -1 ], optional: true },
  { name: "d", data_type: TYPE_FP64, dims: [ -1, -1 ], optional: true }
]
output [ { name: "info", data_type: TYPE_STRING, dims: [ 1 ] } ]
""", """import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            info = {}
            for name in ("a", "b", "c", "d"):
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    a = t.as_numpy()
                    info[name] = [list(a.shape), str(a.dtype), a.reshape(-1).tolist()]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("info", np.array([json.dumps(info).encode()], dtype=np.object_))]))
        return responses
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("generate")
    repo = base / "models"
    for name, (config, code) in {"gen_echo": _GEN_ECHO, "gen_batched": _GEN_BATCHED, "gen_stream": _GEN_STREAM,
                                 "gen_error": _GEN_ERROR, "gen_numeric": _GEN_NUMERIC}.items():
        python_model(repo, name, code, config)
    yield from serving(repo, base, "--trace-config", f"triton,file={base / 'trace.json'}")


def _call(server, path: str, body, headers: dict | None = None, method: str = "POST"):
    """(status, headers by lower-case name, body bytes) of one request on a new connection."""
    conn = http.client.HTTPConnection(*server.http_url.split(":"), timeout=30)
    try:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _gen(server, model: str, body, stream: bool = False, version: str = ""):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + \
        ("/generate_stream" if stream else "/generate")
    return _call(server, path, body)


def _ok(server, model: str, body) -> dict:
    status, headers, data = _gen(server, model, body)
    assert status == 200, data
    assert headers["content-type"] == "application/json"
    return json.loads(data)


def _info(doc: dict) -> dict:
    return json.loads(doc["info"])


def _error(status_headers_body, status: int) -> str:
    got, headers, data = status_headers_body
    assert got == status, data
    assert headers["content-type"] == "application/json"
    return json.loads(data)["error"]


def _events(data: bytes) -> list[dict]:
    """The Server-Sent Events of a generate_stream body (every one ``data: {json}\\n\\n``)."""
    assert data.endswith(b"\n\n") or not data
    chunks = data.split(b"\n\n")[:-1]
    assert all(c.startswith(b"data: ") for c in chunks), data
    return [json.loads(c[len(b"data: "):]) for c in chunks]


# -- request JSON -> inputs ------------------------------------------------------
def test_text_input_string_to_bytes_and_flat_response(server):
    status, headers, data = _gen(server, "gen_echo", {"text_input": "hello"})
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(data)
    assert list(doc) == sorted(doc)  # keys sorted, as Triton's
    assert doc["model_name"] == "gen_echo" and doc["model_version"] == "1"
    assert doc["text_output"] == "HELLO"  # one element: unwrapped
    assert doc["matrix"] == [0, 1, 2, 3]  # [2, 2]: flat
    assert doc["one"] == 7  # [1, 1]: one element, unwrapped
    assert doc["values"] == []  # no element: an empty array
    assert "id" not in doc
    info = _info(doc)
    assert info["text"] == ["hello"] and info["text_shape"] == [1] and info["parameters"] == {}
    assert _ok(server, "gen_echo", {"text_input": ["hello"]})["text_output"] == "HELLO"
    assert _ok(server, "gen_echo", {"text_input": [["nested"]]})["text_output"] == "NESTED"
    assert _ok(server, "gen_echo", {"text_input": "h\u00e9llo \u2603"})["text_output"] == "H\u00e9LLO \u2603"
    assert _ok(server, "gen_echo", {"text_input": "v1"}) == _ok(server, "gen_echo", {"text_input": "v1"})
    status, _, data = _gen(server, "gen_echo", {"text_input": "v"}, version="1")
    assert status == 200 and json.loads(data)["model_version"] == "1"


def test_numbers_take_the_model_datatypes(server):
    doc = _ok(server, "gen_echo", {"text_input": "hi", "n": [1, 2.5, 3], "flag": True, "k": 5})
    info = _info(doc)
    assert info["n"] == [[3], "float32", [1.0, 2.5, 3.0]]
    assert info["flag"] == [[1], "bool", [True]]
    assert info["k"] == [[1], "int32", [5]]
    assert doc["values"] == [2.0, 5.0, 6.0]
    doc = _ok(server, "gen_echo", {"text_input": "hi", "n": 4})
    assert _info(doc)["n"] == [[1], "float32", [4.0]] and doc["values"] == 8.0
    assert _info(_ok(server, "gen_echo", {"text_input": "hi", "n": []}))["n"] == [[0], "float32", []]
    info = _info(_ok(server, "gen_numeric", {"a": [1, 2, 255], "c": [1, 2, 3, 4], "d": [1, 2, 3]}))
    assert info == {"a": [[3], "uint8", [1, 2, 255]], "c": [[2, 2], "int8", [1, 2, 3, 4]],
                    "d": [[1, 3], "float64", [1.0, 2.0, 3.0]]}
    assert _info(_ok(server, "gen_numeric", {"a": [], "d": 1.25})) == {"a": [[0], "uint8", []],
                                                                       "d": [[1, 1], "float64", [1.25]]}


def test_batching_model_gets_a_batch_dimension(server):
    info = _info(_ok(server, "gen_batched", {"text_input": "b", "n": [1, 2, 3], "m": [1, 2]}))
    assert info == {"text_input": [[1, 1], "object", ["b"]], "n": [[1, 3], "int64", [1, 2, 3]],
                    "m": [[1, 2], "float32", [1.0, 2.0]]}
    assert _info(_ok(server, "gen_batched", {"text_input": "b", "n": 1}))["n"] == [[1, 1], "int64", [1]]
    doc = _ok(server, "gen_batched", {"text_input": ["b", "c"]})  # the batch dimension takes the count
    assert doc["text_output"] == ["b", "c"]
    assert json.loads(doc["info"][0])["text_input"] == [[2, 1], "object", ["b", "c"]]


def test_other_keys_and_parameters_object(server):
    doc = _ok(server, "gen_echo", {"text_input": "hi", "id": "42", "extra_str": "v", "extra_int": 7,
                                   "extra_bool": True, "extra_float": 1.5})
    assert doc["id"] == "42"
    info = _info(doc)
    assert info["request_id"] == "42"
    assert info["parameters"] == {"id": "42", "extra_str": "v", "extra_int": 7, "extra_bool": True,
                                  "extra_float": 1.5}
    doc = _ok(server, "gen_echo", {"text_input": "hi", "parameters": {"n": [1, 2], "temperature": 0.5,
                                                                       "stream": False, "top": 3, "s": "x"}})
    info = _info(doc)
    assert info["n"] == [[2], "float32", [1.0, 2.0]]  # an input's name inside "parameters": the input
    assert info["parameters"] == {"temperature": 0.5, "stream": False, "top": 3, "s": "x"}
    assert _info(_ok(server, "gen_echo", {"text_input": "hi", "parameters": {"parameters": "x"}}))["parameters"] \
        == {"parameters": "x"}
    assert "id" not in _ok(server, "gen_echo", {"text_input": "hi", "id": ""})


def test_response_parameters_are_keys(server):
    doc = _ok(server, "gen_error", {"text_input": "params"})
    assert doc == {"model_name": "gen_error", "model_version": "1", "pb": True, "pd": 0.5, "pi": 3, "ps": "s",
                   "text_output": "p"}


# -- client mistakes: 400 with a JSON error ------------------------------------------
@pytest.mark.parametrize("body, message", [
    ({"text_input": "hi", "extra_list": [1, 2]},
     "parameter 'extra_list' has invalid type. It should be either 'int', 'bool', or 'string'."),
    ({"text_input": "hi", "extra_null": None},
     "parameter 'extra_null' has invalid type. It should be either 'int', 'bool', or 'string'."),
    ({"text_input": "hi", "parameters": {"x": [1]}},
     "Converting keyword: 'parameters': parameter 'x' has invalid type. It should be either 'int', 'bool', or "
     "'string'."),
    ({"text_input": "hi", "parameters": 5},
     "Expected JSON object for keyword: 'parameters': attempt to access JSON non-object as object"),
    ({"text_input": "hi", "parameters": {"text_input": "again"}},
     "Converting keyword: 'parameters': [request id: <id_unknown>] input 'text_input' already exists in request"),
    ({"text_input": "hi", "id": 42}, "Unable to parse 'id': attempt to access JSON non-string as string"),
    ({"text_input": 5}, "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    ({"text_input": None}, "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    ({"text_input": ["a", "b"]}, "The schema can not convert input 'text_input' to tensor with proper shape"),
    ({"text_input": "hi", "k": "five"}, "Unable to parse 'data': attempt to access JSON non-signed-integer as "
                                        "signed-integer"),
    ({"text_input": "hi", "k": 2.5}, "Unable to parse 'data': attempt to access JSON non-signed-integer as "
                                     "signed-integer"),
    ({"text_input": "hi", "k": [1, 2]}, "The schema can not convert input 'k' to tensor with proper shape"),
    ({"text_input": "hi", "flag": 1}, "Unable to parse 'data': attempt to access JSON non-boolean as boolean"),
    ({"text_input": "hi", "n": [[1, 2], [3]]}, "Unable to parse 'data': Shape does not match true shape of 'data' "
                                               "field"),
    ({"text_input": "hi", "n": "x"}, "Unable to parse 'data': attempt to access JSON non-number as double"),
    ({"text_input": "hi", "n": True}, "Unable to parse 'data': attempt to access JSON non-number as double"),
    ({}, "[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model 'gen_echo'. Got input(s) [], "
         "but missing required input(s) ['text_input']. Please provide all required input(s)."),
    ("not json", None),
    ("", "failed to parse the request JSON buffer: The document is empty. at 0"),
    ("[1, 2]", "attempt to get members for non-object"),
    ('"str"', "attempt to get members for non-object"),
])
def test_client_mistakes_are_400_json(server, body, message):
    got = _error(_gen(server, "gen_echo", body), 400)
    if message is None:
        assert got.startswith("failed to parse the request JSON buffer: ")
    else:
        assert got == message
    # the same on the streaming route: a plain JSON error, before any event
    assert _error(_gen(server, "gen_echo", body, stream=True), 400) == got


@pytest.mark.parametrize("model, body, message", [
    ("gen_batched", {"text_input": "b", "m": [1, 2, 3]}, "The schema can not convert input 'm' to tensor with "
                                                         "proper shape"),
    ("gen_numeric", {"a": [256, -1]}, "Unable to parse 'data': attempt to access JSON non-unsigned-integer as "
                                      "unsigned-integer"),
    ("gen_numeric", {"a": [1.0]}, "Unable to parse 'data': attempt to access JSON non-unsigned-integer as "
                                  "unsigned-integer"),
    ("gen_numeric", {"a": [256]}, "Unable to parse 'data': value out of range for UINT8"),  # Triton: wraps to 0
    ("gen_numeric", {"a": [1], "b": 1.5}, "receiving FP16 data via JSON is not supported. Please use the binary "
                                          "data format for input b"),
    ("gen_numeric", {"a": [1], "c": [1, 2, 3]}, "The schema can not convert input 'c' to tensor with proper shape"),
    ("gen_numeric", {"a": [1], "c": 1}, "The schema can not convert input 'c' to tensor with proper shape"),
    ("gen_numeric", {"a": [1], "c": [[1, 2], [3, 4]]}, "Unable to parse 'data': Shape does not match true shape "
                                                       "of 'data' field"),
    ("gen_stream", {"text_input": "tok"}, "[request id: <id_unknown>] expected 2 inputs but got 1 inputs for model "
                                          "'gen_stream'. Got input(s) ['text_input'], but missing required input(s) "
                                          "['n']. Please provide all required input(s)."),
])
def test_conversion_errors(server, model, body, message):
    assert _error(_gen(server, model, body), 400) == message


def test_compressed_body_is_refused_as_triton_does(server):
    result = _call(server, "/v2/models/gen_echo/generate", gzip.compress(b'{"text_input": "gz"}'),
                   {"Content-Encoding": "gzip"})
    assert _error(result, 400) == "Unsupported content-encoding, only 'identity' is supported."


def test_unknown_model_and_version(server):
    for stream in (False, True):
        assert _error(_gen(server, "nope", {"text_input": "x"}, stream), 404) == \
            "Request for unknown model: 'nope' is not found"
        assert _error(_gen(server, "gen_echo", {"text_input": "x"}, stream, version="2"), 404) == \
            "Request for unknown model: 'gen_echo' version 2 is not found"
    status, _, data = _call(server, "/v2/models/gen_echo/generate", None, method="GET")
    assert status == 405 and json.loads(data) == {"error": "Method Not Allowed"}


# -- model errors -------------------------------------------------------------------
def test_model_errors_as_infer_answers_them(server):
    assert _error(_gen(server, "gen_error", {"text_input": "err"}), 500) == "bad text"
    message = _error(_gen(server, "gen_error", {"text_input": "raise"}), 500)
    assert message.startswith("Failed to process the request(s) for model 'gen_error_0', message: "
                              "TritonModelException: raised by the model")
    status, headers, data = _gen(server, "gen_error", {"text_input": "err"}, stream=True)
    assert status == 500 and headers["content-type"] == "text/event-stream; charset=utf-8"
    assert data == b'data: {"error":"bad text"}\n\n'
    status, _, data = _gen(server, "gen_error", {"text_input": "raise"}, stream=True)
    assert status == 500 and _events(data)[0]["error"].startswith("Failed to process the request(s)")


# -- generate_stream ------------------------------------------------------------------
def test_stream_from_a_decoupled_model(server):
    status, headers, data = _gen(server, "gen_stream", {"text_input": "tok", "n": 3, "id": "abc"}, stream=True)
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert data == b"".join(
        b'data: {"id":"abc","index":%d,"model_name":"gen_stream","model_version":"1","text_output":"tok %d"}\n\n'
        % (i, i) for i in range(3))


def test_stream_events_arrive_as_they_are_made(server):
    """Each event is its own chunk, sent when the model sends it (50 ms apart), not at the end."""
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    body = json.dumps({"text_input": "t", "n": 4}).encode()
    sock.sendall(b"POST /v2/models/gen_stream/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    received, seen, buffer = [], 0, b""
    sock.settimeout(10)
    while not buffer.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk
        buffer += chunk
        count = buffer.count(b"data: ")
        if count > seen:
            received.append(time.monotonic())
            seen = count
    sock.close()
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert seen == 4 and len(received) >= 3  # not one lump
    assert rest.startswith(b"%x\r\ndata: " % len(rest.split(b"\r\n")[1]))


def test_stream_error_after_first_response_keeps_200(server):
    status, _, data = _gen(server, "gen_stream", {"text_input": "tok", "n": -1}, stream=True)
    assert status == 200
    assert _events(data) == [{"index": 0, "model_name": "gen_stream", "model_version": "1", "text_output": "tok"},
                             {"error": "boom mid-stream"}]
    status, _, data = _gen(server, "gen_stream", {"text_input": "tok", "n": -2}, stream=True)
    assert status == 500 and _events(data) == [{"error": "boom first"}]


def test_stream_with_no_response_and_final_response(server):
    status, headers, data = _gen(server, "gen_stream", {"text_input": "tok", "n": 0}, stream=True)
    assert status == 200 and data == b"" and headers["content-type"] == "text/event-stream; charset=utf-8"
    status, _, data = _gen(server, "gen_stream", {"text_input": "tok", "n": -3}, stream=True)
    assert status == 200 and _events(data) == [{"index": 0, "model_name": "gen_stream", "model_version": "1",
                                                "text_output": "tok"}]


def test_stream_of_an_ordinary_model_is_one_event(server):
    status, _, data = _gen(server, "gen_error", {"text_input": "ok", "id": "s1"}, stream=True)
    assert status == 200
    assert data == b'data: {"id":"s1","model_name":"gen_error","model_version":"1","text_output":"ok"}\n\n'


# -- /generate on a decoupled model -------------------------------------------------
def test_generate_needs_exactly_one_response(server):
    assert _ok(server, "gen_stream", {"text_input": "tok", "n": 1}) == {
        "index": 0, "model_name": "gen_stream", "model_version": "1", "text_output": "tok 0"}
    assert _ok(server, "gen_stream", {"text_input": "tok", "n": -3})["text_output"] == "tok"
    for n in (3, 0, -1):  # Triton: 200 with this error
        assert _error(_gen(server, "gen_stream", {"text_input": "tok", "n": n}), 400) == NOT_ONE
    assert _error(_gen(server, "gen_stream", {"text_input": "tok", "n": -2}), 500) == "boom first"


# -- the connection and the rest of the server ---------------------------------------------
def test_keep_alive_after_a_stream(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        for _ in range(2):
            conn.request("POST", "/v2/models/gen_stream/generate_stream", body=json.dumps({"text_input": "a", "n": 2}))
            r = conn.getresponse()
            assert r.status == 200 and len(_events(r.read())) == 2
            conn.request("POST", "/v2/models/gen_echo/generate", body=json.dumps({"text_input": "b"}))
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["text_output"] == "B"
    finally:
        conn.close()


def test_http10_stream_ends_with_the_connection(server):
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    body = json.dumps({"text_input": "t", "n": 2}).encode()
    sock.sendall(b"POST /v2/models/gen_stream/generate_stream HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert len(_events(rest)) == 2


def test_client_leaving_mid_stream_breaks_nothing(server):
    body = json.dumps({"text_input": "t", "n": 40}).encode()
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(b"POST /v2/models/gen_stream/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
        sock.close()
    # A half-sent request, then gone.
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    sock.sendall(b"POST /v2/models/gen_stream/generate_stream HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"text")
    sock.close()
    status, _, data = _gen(server, "gen_stream", {"text_input": "x", "n": 3}, stream=True)
    assert status == 200 and [e["text_output"] for e in _events(data)] == ["x 0", "x 1", "x 2"]


def test_infer_alongside_streams(server):
    results: list = []

    def stream():
        results.append(_gen(server, "gen_stream", {"text_input": "s", "n": 6}, stream=True))

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    for _ in range(5):
        status, headers, data = _call(server, "/v2/models/gen_echo/infer", body)
        assert status == 200
        doc = json.loads(data)
        assert doc["outputs"][0] == {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["X"]}
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200] * 3
    assert all(len(_events(r[2])) == 6 for r in results)


def test_statistics_count_generate_requests(server):
    def success() -> int:
        _, _, data = _call(server, "/v2/models/gen_numeric/stats", None, method="GET")
        return json.loads(data)["model_stats"][0]["inference_stats"]["success"]["count"]

    before = success()
    _ok(server, "gen_numeric", {"a": [1]})
    _gen(server, "gen_numeric", {"a": [2]}, stream=True)
    _gen(server, "gen_numeric", {"a": "x"})  # refused before it runs: not counted
    assert success() == before + 2


def test_statistics_count_decoupled_requests(server):
    """A decoupled model's requests count as successes and inferences once their final response came, as
    Triton counts them (11 requests to its gen_stream: success 11, inference_count 11, execution_count 11)."""
    def stats() -> dict:
        _, _, data = _call(server, "/v2/models/gen_stream/stats", None, method="GET")
        return json.loads(data)["model_stats"][0]

    before = stats()
    for _ in range(3):
        status, _, data = _gen(server, "gen_stream", {"text_input": "abc", "n": 2}, stream=True)
        assert status == 200 and _events(data)
    after = stats()
    assert int(after["inference_stats"]["success"]["count"]) == int(before["inference_stats"]["success"]["count"]) + 3
    assert int(after["inference_count"]) == int(before["inference_count"]) + 3
    assert int(after["execution_count"]) == int(before["execution_count"]) + 3


def _trace_files(path: Path) -> set[Path]:
    return set(path.parent.glob(path.name + ".*"))


def test_tracing(server, tmp_path_factory):
    path = Path(next(a for a in server.args if a.startswith("triton,file="))[len("triton,file="):])
    settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"}
    off = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}
    for model in ("gen_error", "gen_stream"):
        assert _call(server, f"/v2/models/{model}/trace/setting", settings)[0] == 200
    try:
        before = _trace_files(path)
        assert _ok(server, "gen_error", {"text_input": "ok"})["text_output"] == "ok"
        assert _gen(server, "gen_error", {"text_input": "ok"}, stream=True)[0] == 200
        assert _gen(server, "gen_stream", {"text_input": "tok", "n": 2}, stream=True)[0] == 200
        deadline = time.monotonic() + 10
        while len(_trace_files(path) - before) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        traces = []
        for file in sorted(_trace_files(path) - before):
            records = json.loads(file.read_text())
            traces.append(([r["model_name"] for r in records if "model_name" in r],
                           [r["timestamps"][0]["name"] for r in records if "timestamps" in r]))
    finally:
        for model in ("gen_error", "gen_stream"):
            _call(server, f"/v2/models/{model}/trace/setting", off)
    ordinary = [names for models, names in traces if models == ["gen_error"]]
    decoupled = [names for models, names in traces if models == ["gen_stream"]]
    assert len(ordinary) == 2 and len(decoupled) == 1, traces
    for names in ordinary:
        assert names[:4] == ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START"]
        assert names[-2:] == ["HTTP_SEND_START", "HTTP_SEND_END"] and "REQUEST_END" in names
    assert decoupled[0][:2] == ["HTTP_RECV_START", "HTTP_RECV_END"] and decoupled[0][-1] == "REQUEST_END"


def test_restricted_like_infer(tmp_path_factory):
    base = tmp_path_factory.mktemp("generate_restricted")
    config, code = _GEN_ERROR
    python_model(base / "models", "gen_error", code, config)
    for srv in serving(base / "models", base, "--http-restricted-api", "inference:key=secret"):
        assert _error(_gen(srv, "gen_error", {"text_input": "ok"}), 403).startswith("This API is restricted")
        status, _, data = _call(srv, "/v2/models/gen_error/generate_stream", {"text_input": "ok"}, {"key": "secret"})
        assert status == 200 and _events(data)[0]["text_output"] == "ok"
