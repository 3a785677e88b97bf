"""Triton's qa/L0_parameters, L0_optional_input, L0_nan_inf, L0_string_io and L0_logging checks, ported to this
project's own python models and run through tritonclient (HTTP and gRPC)."""

from __future__ import annotations

import json
import re
import textwrap
import time
from http.client import HTTPConnection

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, python_model, serving

_PARAMS = textwrap.dedent('''
    import json
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                params = r.parameters()
                json.loads(params)  # what the model gets is JSON text, as in Triton
                out.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()),
                    pb_utils.Tensor("PARAMS", np.array([params.encode()], dtype=np.object_))]))
            return out
''')

_OPTIONAL = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                a = pb_utils.get_input_tensor_by_name(r, "INPUT0")
                b = pb_utils.get_input_tensor_by_name(r, "INPUT1")
                present = np.array([int(a is not None), int(b is not None)], np.int32)
                total = sum(t.as_numpy() for t in (a, b) if t is not None)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.asarray(total, np.float32)),
                                                       pb_utils.Tensor("PRESENT", present)]))
            return out
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("qa_models")
    python_model(repo, "params", _PARAMS,
           'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
           'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },\n'
           '         { name: "PARAMS", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
    python_model(repo, "optional", _OPTIONAL,
           'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ], optional: true },\n'
           '        { name: "INPUT1", data_type: TYPE_FP32, dims: [ 4 ], optional: true } ]\n'
           'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] },\n'
           '         { name: "PRESENT", data_type: TYPE_INT32, dims: [ 2 ] } ]\n')
    echo = (ROOT / "tests" / "templates" / "echo_model.py").read_text()
    for name, dtype in (("echo_fp32", "TYPE_FP32"), ("echo_fp16", "TYPE_FP16"), ("echo_fp64", "TYPE_FP64"),
                        ("echo_bytes", "TYPE_STRING")):
        python_model(repo, name, echo, f'input [ {{ name: "INPUT0", data_type: {dtype}, dims: [ -1 ] }} ]\n'
                                 f'output [ {{ name: "OUTPUT0", data_type: {dtype}, dims: [ -1 ] }} ]\n')
    yield from serving(repo, tmp_path_factory.mktemp("qa_models_log"))


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    module = httpclient if request.param == "http" else grpcclient
    c = module.InferenceServerClient(server.http_url if request.param == "http" else server.grpc_url)
    c.module = module
    yield c
    c.close()


def _input(client, name, array, datatype, binary=True):
    t = client.module.InferInput(name, list(array.shape), datatype)
    if client.module is httpclient:
        t.set_data_from_numpy(array, binary_data=binary)
    else:
        t.set_data_from_numpy(array)
    return t


# -- L0_parameters ---------------------------------------------------------------------------------------------
def test_request_parameters_reach_the_model(client):
    """String, integer and boolean parameters arrive as the model's ``request.parameters()`` JSON, unchanged."""
    sent = {"key_str": "value", "key_int": 42, "key_bool": True, "empty": ""}
    x = np.arange(3, dtype=np.float32)
    result = client.infer("params", [_input(client, "INPUT0", x, "FP32")], parameters=sent)
    got = json.loads(result.as_numpy("PARAMS")[0])
    assert got == sent
    result = client.infer("params", [_input(client, "INPUT0", x, "FP32")])
    assert json.loads(result.as_numpy("PARAMS")[0]) == {}


def test_reserved_parameters_are_not_model_parameters(server):
    """Parameters the server itself consumes (``binary_data_output``, priority, timeout) are left out."""
    c = httpclient.InferenceServerClient(server.http_url)
    x = np.arange(3, dtype=np.float32)
    t = httpclient.InferInput("INPUT0", [3], "FP32")
    t.set_data_from_numpy(x)
    result = c.infer("params", [t], parameters={"mine": 1}, priority=0, timeout=10_000_000)
    assert json.loads(result.as_numpy("PARAMS")[0]) == {"mine": 1}
    c.close()


# -- L0_optional_input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [("INPUT0",), ("INPUT1",), ("INPUT0", "INPUT1")])
def test_optional_inputs_may_be_left_out(client, given):
    arrays = {"INPUT0": np.full(4, 1.0, np.float32), "INPUT1": np.full(4, 10.0, np.float32)}
    result = client.infer("optional", [_input(client, n, arrays[n], "FP32") for n in given])
    np.testing.assert_array_equal(result.as_numpy("PRESENT"), [int("INPUT0" in given), int("INPUT1" in given)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), sum(arrays[n] for n in given))


def test_unknown_input_is_still_an_error_with_optional_inputs(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("optional", [_input(client, "BOGUS", np.zeros(4, np.float32), "FP32")])
    assert "unexpected inference input 'BOGUS'" in e.value.message()


# -- L0_nan_inf ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, datatype, dtype", [("echo_fp32", "FP32", np.float32),
                                                     ("echo_fp16", "FP16", np.float16),
                                                     ("echo_fp64", "FP64", np.float64)])
def test_nan_and_inf_pass_through_binary_tensors(client, model, datatype, dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5], dtype=dtype)
    out = client.infer(model, [_input(client, "INPUT0", x, datatype)]).as_numpy("OUTPUT0")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, x)  # NaN == NaN for assert_array_equal
    assert np.signbit(out[4])


# -- L0_string_io ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["http binary", "http json", "grpc"])
def test_strings_empty_nul_and_non_utf8_round_trip(server, mode):
    items = [b"", b"plain", b"with\x00nul", "ünïcödé".encode(), b"x" * 5000]
    if mode != "http json":
        items.append(b"\xff\xfe not utf-8")  # only binary tensors can carry these (JSON data is text)
    x = np.array(items, dtype=np.object_)
    if mode == "grpc":
        c = grpcclient.InferenceServerClient(server.grpc_url)
        t = grpcclient.InferInput("INPUT0", [len(items)], "BYTES")
        t.set_data_from_numpy(x)
        got = c.infer("echo_bytes", [t]).as_numpy("OUTPUT0")
    else:
        binary = mode == "http binary"
        c = httpclient.InferenceServerClient(server.http_url)
        t = httpclient.InferInput("INPUT0", [len(items)], "BYTES")
        t.set_data_from_numpy(x, binary_data=binary)
        got = c.infer("echo_bytes", [t], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]) \
            .as_numpy("OUTPUT0")
    c.close()
    assert [g if isinstance(g, bytes) else g.encode() for g in got] == items


# -- L0_logging ------------------------------------------------------------------------------------------------
def test_log_settings_read_and_update(server):
    c = httpclient.InferenceServerClient(server.http_url)
    settings = c.get_log_settings()
    assert {"log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format"} <= set(settings)
    assert c.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert c.get_log_settings()["log_verbose_level"] == 1
    with pytest.raises(InferenceServerException) as e:
        c.update_log_settings({"log_verbose_level": "loud"})
    assert e.value.status() == "400"
    assert c.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
    c.close()


def test_log_settings_apply_and_refuse(tmp_path):
    """log_info/warning/error and log_format reach the server's lines; refusals keep Triton's order and text
    (docs/triton-behaviour.md §15a): a setting before the refused one stays applied."""
    repo = tmp_path / "repo"
    python_model(repo, "echo", (ROOT / "tests" / "templates" / "echo_model.py").read_text(),
                 'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
                 'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
                 'response_cache { enable: true }\n')  # an info line at each load (no cache configured)
    line = "model 'echo' enables the response cache but the server has none"
    for srv in serving(repo, tmp_path, "--model-control-mode=explicit"):
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc_ = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert http.update_log_settings({"log_format": "ISO8601"})["log_format"] == "ISO8601"
            http.load_model("echo")
            assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ I \d+ \S+\] " + re.escape(line),
                             _wait_for(srv, line), re.M)
            settings = grpc_.update_log_settings({"log_info": False, "log_format": "default"}).settings
            assert settings["log_info"].bool_param is False
            assert settings["log_format"].string_param == "default"
            assert http.get_log_settings()["log_info"] is False
            http.unload_model("echo")
            http.load_model("echo")
            time.sleep(0.5)
            assert srv.log().count(line) == 1  # info lines are off
            for body, text in (
                    ({"log_verbose_level": -1}, "attempt to access JSON non-unsigned-integer as unsigned-integer"),
                    ({"log_info": True, "log_format": "bogus"}, "invalid argument for --log_format, got: bogus"),
                    ({"log_format": 5}, "attempt to access JSON non-string as string"),
                    ({"log_warning": "yes"}, "attempt to access JSON non-boolean as boolean"),
                    ({"log_file": "x", "log_error": False},
                     "log file location can not be updated through network protocol")):
                with pytest.raises(InferenceServerException) as e:
                    http.update_log_settings(body)
                assert (e.value.status(), e.value.message()) == ("400", text)
            assert http.get_log_settings() == {"log_file": "", "log_info": True, "log_warning": True,
                                               "log_error": True, "log_verbose_level": 0, "log_format": "default"}
            assert http.update_log_settings({"log_verbose_level": 4294967297})["log_verbose_level"] == 1
            with pytest.raises(InferenceServerException) as e:
                grpc_.update_log_settings({"log_file": "x"})
            assert (e.value.status(), e.value.message()) == (
                "StatusCode.UNIMPLEMENTED", "log file location can not be updated through network protocol")
            with pytest.raises(InferenceServerException) as e:
                grpc_.update_log_settings({"log_warning": False, "log_format": "bogus"})
            assert e.value.message() == "invalid argument for log_format, got: bogus"
            assert grpc_.get_log_settings().settings["log_warning"].bool_param is False
            for method in ("PUT", "DELETE", "PATCH"):
                conn = HTTPConnection(srv.http_url)
                conn.request(method, "/v2/logging", b"{}")
                response = conn.getresponse()
                assert (response.status, response.getheader("Content-Type"), response.read()) == (
                    405, "application/json", b'{"error":"Method Not Allowed"}')
                conn.close()
        finally:
            http.close()
            grpc_.close()


def _wait_for(srv, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return srv.log()


LOGGING_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            pb_utils.Logger.log_info(f"info line {int(x[0])}")
            pb_utils.Logger.log_verbose(f"verbose line {int(x[0])}")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
'''


def test_log_settings_reach_running_workers(tmp_path):
    """A model's Logger lines follow the settings as they change, in a worker started before the change (in
    Triton the backends share the server's process, so its settings apply to them at once)."""
    repo = tmp_path / "repo"
    python_model(repo, "talker", LOGGING_MODEL, 'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
                                                'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 1 ] } ]\n')
    for srv in serving(repo, tmp_path):
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc_ = grpcclient.InferenceServerClient(srv.grpc_url)

        def say(n: int, srv=srv, http=http) -> str:
            inp = httpclient.InferInput("INPUT0", [1], "FP32")
            inp.set_data_from_numpy(np.array([n], dtype=np.float32))
            http.infer("talker", [inp])
            return _wait_for(srv, f"info line {n}" if n in (1, 4) else f"verbose line {n}", 5.0)

        try:
            log = say(1)
            assert "info line 1" in log and "verbose line 1" not in log
            http.update_log_settings({"log_info": False, "log_verbose_level": 1})
            log = say(2)
            assert "verbose line 2" in log and "info line 2" not in log
            grpc_.update_log_settings({"log_format": "ISO8601"})
            log = say(3)
            assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ I \d+ model\.py:\d+\] verbose line 3$", log, re.M)
            with pytest.raises(InferenceServerException):  # refused at log_format: log_info before it stays
                http.update_log_settings({"log_info": True, "log_verbose_level": 0, "log_format": "bogus"})
            log = say(4)
            assert "info line 4" in log and "verbose line 4" not in log
        finally:
            http.close()
            grpc_.close()
