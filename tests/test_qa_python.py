"""Triton's qa/L0_backend_python (its python_models' ``pb_utils`` surface and auto-complete), L0_decoupled,
L0_model_queue and L0_model_config (the python backend's config checks), ported to this project's own
python models and run through tritonclient. What tests/test_scheduler.py, tests/test_grpc.py and
tests/test_api.py already check (batching, priorities, queue timeouts, full queues, ModelInfer refusing a
decoupled model) is not repeated here."""

from __future__ import annotations

import json
import queue
import textwrap
import threading
import time
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from tests.support import _PROBE_IO, ROOT, python_model, serving

_SURFACE = textwrap.dedent('''
    import json
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.args = args
            config = json.loads(args["model_config"])
            out = pb_utils.get_output_config_by_name(config, "OUTPUT0")
            self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])
            assert pb_utils.get_input_config_by_name(config, "NOPE") is None
            pb_utils.Logger.log_info("surface model initialised: QA-LOG-MARK")

        def execute(self, requests):
            responses = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                info = {"request_id": r.request_id(), "requested": sorted(r.requested_output_names()),
                        "args": {k: self.args[k] for k in ("model_name", "model_version", "model_instance_kind",
                                                           "model_instance_name")}}
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", (x * 2).astype(self.dtype)),
                    pb_utils.Tensor("INFO", np.array([json.dumps(info).encode()], np.object_))]))
            return responses
''')

_ERROR_CODE = textwrap.dedent('''
    import triton_python_backend_utils as pb_utils

    CODES = {name: getattr(pb_utils.TritonError, name) for name in (
        "UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS",
        "CANCELLED")}


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for r in requests:
                name = pb_utils.get_input_tensor_by_name(r, "ERROR_CODE").as_numpy()[0].decode()
                error = (pb_utils.TritonError("error code: " + name, CODES[name]) if name in CODES
                         else pb_utils.TritonError("unrecognized error code: " + name))
                responses.append(pb_utils.InferenceResponse(error=error))
            return responses
''')

_BAD_RETURN = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """INPUT0[0] picks the mistake: 0 returns None, 1 a list of None, 2 one response too many."""

        def execute(self, requests):
            kind = int(pb_utils.get_input_tensor_by_name(requests[0], "INPUT0").as_numpy()[0])
            if kind == 0:
                return None
            if kind == 1:
                return [None for _ in requests]
            ok = pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.zeros(2, np.float32))])
            return [ok for _ in range(len(requests) + 1)]
''')

_AUTO = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        @staticmethod
        def auto_complete_config(config):
            config.set_max_batch_size(4)
            config.add_input({"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [2]})
            config.add_output({"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [2]})
            config.set_dynamic_batching()
            return config

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + 1)]) for r in requests]
''')

_AUTO_BAD_MBS = _AUTO  # sets max_batch_size 4 below the configured 8
_AUTO_MISSING_DIMS = _AUTO.replace('"data_type": "TYPE_FP32", "dims": [2]}', '"data_type": "TYPE_FP32"}', 1)
_AUTO_DECOUPLED = _AUTO.replace("config.set_dynamic_batching()",
                                'config.set_model_transaction_policy({"decoupled": True})')
_AUTO_BAD_POLICY = _AUTO.replace("config.set_dynamic_batching()",
                                 'config.set_model_transaction_policy({"decoupled": True, "other": 1})')

_DECOUPLED_RETURNS = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """Returns a response from execute although decoupled; IN[0] == 1 first sends one with the final flag."""

        def execute(self, requests):
            out = []
            for r in requests:
                if int(pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()[0]) == 1:
                    r.get_response_sender().send(
                        pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([b"sent"], np.object_))]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([b"returned"], np.object_))]))
            return out
''')

_CLOSED = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        """Sends one response with the final flag, then tries another: the error it gets is reported by the
        next request (the first request's stream is closed by then)."""

        def initialize(self, args):
            self.seen = ""

        def execute(self, requests):
            for r in requests:
                sender = r.get_response_sender()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([self.seen.encode()],
                                                                                        np.object_))]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                try:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([b"late"],
                                                                                            np.object_))]))
                    self.seen = "no error"
                except pb_utils.TritonModelException as e:
                    self.seen = e.message()
            return None
''')


#: L0_model_queue's policies (the probe sleeps its INPUT0 in ms).
_QUEUES = {
    "q_override": "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 10000000 "
                  "allow_timeout_override: true }",
    "q_no_override": "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 10000000 }",
    "q_per_level": "priority_levels: 2 default_priority_level: 2 "
                   "priority_queue_policy { key: 1 value: { max_queue_size: 1 } }",
}

_IO = ('input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 2 ] } ]\n'
       'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 2 ] } ]\n')

#: L0_model_config's noautofill cases that apply to a python model: name -> config (the expected message is
#: Triton's, with the model's name, in test_invalid_configs_are_refused_with_tritons_message).
_BAD_CONFIGS = {
    "negative_max_batch_size": "max_batch_size: -1\n" + _IO,
    "missing_datatype": 'max_batch_size: 4\ninput [ { name: "INPUT0", dims: [ 2 ] } ]\n'
                        'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 2 ] } ]\n',
    "default_priority_level0": "max_batch_size: 4\ndynamic_batching { priority_levels: 3 }\n" + _IO,
    "default_priority_level1": "max_batch_size: 4\ndynamic_batching { priority_levels: 3 "
                               "default_priority_level: 4 }\n" + _IO,
    "priority_level0": "max_batch_size: 4\ndynamic_batching { priority_levels: 3 default_priority_level: 2 "
                       "priority_queue_policy { key: 0 value: { } } }\n" + _IO,
    "priority_level1": "max_batch_size: 4\ndynamic_batching { priority_levels: 3 default_priority_level: 2 "
                       "priority_queue_policy { key: 4 value: { } } }\n" + _IO,
    "preserve_ordering0": "max_batch_size: 4\ndynamic_batching { preserve_ordering: true priority_levels: 3 "
                          "default_priority_level: 2 }\n" + _IO,
    "preserve_ordering1": "max_batch_size: 4\ndynamic_batching { preserve_ordering: true default_queue_policy "
                          "{ timeout_action: DELAY default_timeout_microseconds: 100 } }\n" + _IO,
    "preserve_ordering2": "max_batch_size: 4\ndynamic_batching { preserve_ordering: true priority_levels: 1 "
                          "default_priority_level: 1 priority_queue_policy { key: 1 value: { timeout_action: "
                          "DELAY default_timeout_microseconds: 100 } } }\n" + _IO,
    "invalid_cpu": "max_batch_size: 4\ninstance_group [ { kind: KIND_CPU, gpus: [ 0 ] } ]\n" + _IO,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("qa_python")
    python_model(repo, "surface", _SURFACE,
           'input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
           'output [ { name: "OUTPUT0", data_type: TYPE_FP64, dims: [ -1 ] },\n'
           '         { name: "INFO", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
    python_model(repo, "error_code", _ERROR_CODE,
                 'input [ { name: "ERROR_CODE", data_type: TYPE_STRING, dims: [ 1 ] } ]\n'
                 'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
    python_model(repo, "execute_return_error", _BAD_RETURN,  # with L0_backend_python's instance group: _0_0
                 _IO + "instance_group [ { count: 1, kind: KIND_CPU } ]\n")
    python_model(repo, "auto", _AUTO, "")
    python_model(repo, "auto_bad_mbs", _AUTO_BAD_MBS, "max_batch_size: 8\n")
    python_model(repo, "auto_missing_dims", _AUTO_MISSING_DIMS, "")
    python_model(repo, "auto_decoupled", _AUTO_DECOUPLED, "")
    python_model(repo, "auto_bad_policy", _AUTO_BAD_POLICY, "")
    python_model(repo, "decoupled_returns", _DECOUPLED_RETURNS,
           'model_transaction_policy { decoupled: true }\n'
           'input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
           'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
    python_model(repo, "closed", _CLOSED, 'model_transaction_policy { decoupled: true }\n'
                                    'input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
                                    'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
    src = ROOT / "tests" / "models" / "repeat"
    python_model(repo, "repeat", (src / "1" / "model.py").read_text(),
           (src / "config.pbtxt").read_text().replace('backend: "python"\n', ""))
    probe = (ROOT / "tests" / "templates" / "probe_model.py").read_text()
    sleepy = 'parameters { key: "sleep_from_input" value: { string_value: "true" } }\n' + _PROBE_IO
    for name, batching in _QUEUES.items():
        python_model(repo, name, probe, f"max_batch_size: 1\ndynamic_batching {{ {batching} }}\n" + sleepy)
    for name, config in _BAD_CONFIGS.items():
        python_model(repo, name, _AUTO, config)
    yield from serving(repo, tmp_path_factory.mktemp("qa_python_log"))


def _reason(http, name: str) -> str:
    entry = next(m for m in http.get_model_repository_index() if m["name"] == name)
    assert entry.get("state") == "UNAVAILABLE", entry
    return entry.get("reason", "")


# -- L0_backend_python: the pb_utils surface its python_models use ----------------------------------------------
def test_initialize_args_config_helpers_and_request_accessors(server, http):
    x = np.arange(4, dtype=np.float32)
    t = httpclient.InferInput("INPUT0", [4], "FP32")
    t.set_data_from_numpy(x)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("INFO")]
    result = http.infer("surface", [t], request_id="qa-42", outputs=outputs)
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.float64  # get_output_config_by_name + triton_string_to_numpy
    np.testing.assert_array_equal(out, x * 2)
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["request_id"] == "qa-42"
    assert result.get_response()["id"] == "qa-42"
    assert info["requested"] == ["INFO", "OUTPUT0"]
    assert info["args"]["model_name"] == "surface"
    assert info["args"]["model_version"] == "1"
    assert info["args"]["model_instance_kind"] == "CPU"
    assert info["args"]["model_instance_name"].startswith("surface")
    # Only the requested output goes back, though the model produced both.
    only = http.infer("surface", [t], outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    assert only.as_numpy("INFO") is None
    assert "QA-LOG-MARK" in server.log()  # pb_utils.Logger reaches the server's log


@pytest.mark.parametrize("name, grpc_code, http_status", [
    ("UNKNOWN", "StatusCode.UNKNOWN", "500"), ("INTERNAL", "StatusCode.INTERNAL", "500"),
    ("NOT_FOUND", "StatusCode.NOT_FOUND", "404"), ("INVALID_ARG", "StatusCode.INVALID_ARGUMENT", "400"),
    ("UNAVAILABLE", "StatusCode.UNAVAILABLE", "503"), ("UNSUPPORTED", "StatusCode.UNIMPLEMENTED", "400"),
    ("ALREADY_EXISTS", "StatusCode.ALREADY_EXISTS", "400"), ("CANCELLED", "StatusCode.CANCELLED", "500"),
    ("(default)", "StatusCode.INTERNAL", "500"),
])
def test_triton_error_codes_reach_the_client(server, name, grpc_code, http_status):
    """lifecycle_test.test_error_code: each pb_utils.TritonError code is the call's status, the message intact
    (HTTP statuses as kernel/errors.py records Triton 2.51's)."""
    x = np.array([name.encode()], np.object_)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    t = grpcclient.InferInput("ERROR_CODE", [1], "BYTES")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        c.infer("error_code", [t])
    c.close()
    prefix = "unrecognized " if name == "(default)" else ""
    assert str(e.value) == f"[{grpc_code}] {prefix}error code: {name}"
    h = httpclient.InferenceServerClient(server.http_url)
    t = httpclient.InferInput("ERROR_CODE", [1], "BYTES")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        h.infer("error_code", [t])
    h.close()
    assert e.value.message() == f"{prefix}error code: {name}"
    assert e.value.status() == http_status


@pytest.mark.parametrize("kind, message", [
    (0, "Failed to process the request(s) for model instance 'execute_return_error_0_0', message: Expected a "
        "list in the execute return, found type '<class 'NoneType'>'."),
    (1, "Failed to process the request(s) for model instance 'execute_return_error_0_0', message: Expected an "
        "'InferenceResponse' object in the execute function return list, found type '<class 'NoneType'>'."),
    (2, "Number of InferenceResponse objects do not match number of InferenceRequest objects. "
        "InferenceRequest(s) size is:1, and InferenceResponse(s) size is:2"),
])
def test_wrong_execute_returns_are_clear_errors(http, kind, message):
    """lifecycle_test.test_incorrect_execute_return: the model's mistake is the request's error, and the
    model keeps serving."""
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.full(2, kind, np.float32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("execute_return_error", [t])
    assert message in e.value.message()
    assert http.is_model_ready("execute_return_error")


# -- L0_backend_python: auto_complete_config (python_models/auto_complete*) -------------------------------------
@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_auto_complete_fills_an_empty_config(server, module):
    c = module.InferenceServerClient(server.http_url if module is httpclient else server.grpc_url)
    config = c.get_model_config("auto")
    if module is grpcclient:
        config = json_format.MessageToDict(config.config, preserving_proto_field_name=True)
    assert int(config["max_batch_size"]) == 4
    assert [i["name"] for i in config["input"]] == ["INPUT0"]
    assert [o["name"] for o in config["output"]] == ["OUTPUT0"]
    assert [int(d) for d in config["input"][0]["dims"]] == [2]
    assert "dynamic_batching" in config
    x = np.ones((3, 2), np.float32)
    t = module.InferInput("INPUT0", [3, 2], "FP32")
    t.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("auto", [t]).as_numpy("OUTPUT0"), x + 1)
    c.close()


@pytest.mark.parametrize("name, message", [
    ("auto_bad_mbs", "configuration specified max_batch_size 8, but in auto-complete-config function for "
                     "model 'auto_bad_mbs' specified max_batch_size 4"),
    ("auto_missing_dims", "input 'INPUT0' in auto-complete-config function for model 'auto_missing_dims' "
                          "is missing 'dims' property."),
    ("auto_bad_policy", "model transaction property in auto-complete-config function for model "
                        "'auto_bad_policy' contains property other than 'decoupled'"),
])
def test_auto_complete_errors_leave_the_model_unavailable(http, name, message):
    assert message in _reason(http, name)
    assert not http.is_model_ready(name)
    assert http.is_model_ready("auto")  # one model's bad config does not touch the others


def test_auto_complete_can_make_a_model_decoupled(server, http):
    assert http.get_model_config("auto_decoupled")["model_transaction_policy"]["decoupled"] is True
    t = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    t.set_data_from_numpy(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("auto_decoupled", [t])
    assert "decoupled" in e.value.message()


# -- L0_decoupled ----------------------------------------------------------------------------------------------
def _stream(server, requests: list[tuple[str, str, np.ndarray]], expect_finals: int, timeout: float = 20.0):
    """Sends (model, request id, IN) on one stream; returns every result or error until ``expect_finals``
    responses carrying the final flag have arrived."""
    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
    for model, rid, values in requests:
        t = grpcclient.InferInput("IN", list(values.shape), "INT32")
        t.set_data_from_numpy(values)
        c.async_stream_infer(model, [t], request_id=rid, enable_empty_final_response=True)
    items, finals, deadline = [], 0, time.monotonic() + timeout
    while finals < expect_finals:
        result, error = got.get(timeout=max(0.1, deadline - time.monotonic()))
        items.append((result, error))
        if result is not None and result.get_response().parameters["triton_final_response"].bool_param:
            finals += 1
    c.stop_stream()
    c.close()
    return items


def test_decoupled_requests_interleave_on_one_stream_each_in_order(server):
    """L0_decoupled's one-to-many cases: several requests in flight on one stream, every response carries
    its request's id, each request's responses arrive in order, then one empty final response each."""
    sent = {"a": np.arange(1000, 1006, dtype=np.int32), "b": np.arange(5, dtype=np.int32),
            "c": np.array([], np.int32)}
    items = _stream(server, [("repeat", k, v) for k, v in sent.items()], expect_finals=3)
    assert all(error is None for _, error in items)
    per: dict[str, list[int]] = {k: [] for k in sent}
    finals: dict[str, int] = {k: 0 for k in sent}
    for result, _ in items:
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            finals[response.id] += 1
            assert not response.outputs, "the final flag came on an empty response"
            continue
        per[response.id].append(int(result.as_numpy("IDX")[0]))
        assert int(result.as_numpy("OUT")[0]) == sent[response.id][per[response.id][-1]]
    assert per == {k: list(range(len(v))) for k, v in sent.items()}
    assert finals == {"a": 1, "b": 1, "c": 1}


def test_decoupled_error_responses_do_not_end_the_request(server):
    items = _stream(server, [("repeat", "e", np.array([3, -1, 4], np.int32))], expect_finals=1)
    errors = [str(error) for _, error in items if error is not None]
    values = [int(r.as_numpy("OUT")[0]) for r, _ in items if r is not None and r.as_numpy("OUT") is not None]
    assert len(errors) == 1 and "negative value at 1" in errors[0]
    assert values == [3, 4]


def test_sending_after_the_final_flag_raises_in_the_model(server):
    first = _stream(server, [("closed", "1", np.array([0], np.int32))], expect_finals=1)
    assert [r.as_numpy("OUT")[0] for r, _ in first] == [b""]  # exactly one response, no late one
    second = _stream(server, [("closed", "2", np.array([0], np.int32))], expect_finals=1)
    assert second[0][0].as_numpy("OUT")[0] == b"Unable to send response. Response sender has been closed."


def test_a_decoupled_execute_returning_responses_is_an_error(server):
    """response_sender tests (test_decoupled_one_response_on_return / _pre_and_on_return): what execute returns
    is not sent; a request still open gets Triton's error, one the model already finished gets nothing more."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got: queue.Queue = queue.Queue()
    c.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), got))
    for rid, value in (("open", 0), ("done", 1)):
        t = grpcclient.InferInput("IN", [1], "INT32")
        t.set_data_from_numpy(np.array([value], np.int32))
        c.async_stream_infer("decoupled_returns", [t], request_id=rid)
    first, second = got.get(timeout=20), got.get(timeout=20)
    c.stop_stream()  # waits for the stream to end: nothing else came
    c.close()
    assert got.empty()
    errors = [e for _, e in (first, second) if e is not None]
    results = [r for r, _ in (first, second) if r is not None]
    assert len(errors) == 1 and "is using the decoupled mode and the execute function must return None" in str(
        errors[0])
    assert [r.as_numpy("OUT")[0] for r in results] == [b"sent"]


def test_decoupled_model_is_refused_on_http_infer(http):
    t = httpclient.InferInput("IN", [2], "INT32")
    t.set_data_from_numpy(np.array([1, 2], np.int32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("repeat", [t])
    assert "doesn't support models with decoupled transaction policy" in e.value.message()
    assert e.value.status() == "400"


def test_decoupled_stream_survives_many_requests(server):
    """L0_decoupled's many-request runs, scaled down: 50 requests of 0..4 responses on one stream."""
    sent = [("repeat", str(i), np.arange(i % 5, dtype=np.int32)) for i in range(50)]
    items = _stream(server, sent, expect_finals=50)
    assert all(error is None for _, error in items)
    data = [r for r, _ in items if r.as_numpy("OUT") is not None]
    assert len(data) == sum(i % 5 for i in range(50))


# -- L0_model_queue --------------------------------------------------------------------------------------------
def _probe_input(ms: float):
    t = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    t.set_data_from_numpy(np.full((1, 1), ms, np.float32))
    return [t]


def _infer_in_thread(server, model, ms, results, key, **kwargs):
    def run():
        c = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
        try:
            results[key] = c.infer(model, _probe_input(ms), **kwargs)
        except InferenceServerException as e:
            results[key] = e
        finally:
            c.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("model, overridden", [("q_override", True), ("q_no_override", False)])
def test_request_timeout_overrides_the_policy_only_when_allowed(server, model, overridden):
    """L0_model_queue's timeout-override cases: a request's own timeout replaces the policy's 10 s only with
    ``allow_timeout_override``; otherwise it is ignored and the request waits its turn."""
    results: dict = {}
    threads = [_infer_in_thread(server, model, 400, results, "busy")]
    time.sleep(0.15)  # the first request executes; the next one queues (as L0_model_queue does)
    threads.append(_infer_in_thread(server, model, 1, results, "short", timeout=50_000))
    threads.append(_infer_in_thread(server, model, 1, results, "default"))
    for t in threads:
        t.join(30)
    assert not isinstance(results["busy"], Exception)
    assert not isinstance(results["default"], Exception)
    if overridden:
        assert isinstance(results["short"], InferenceServerException)
        assert results["short"].message() == "Request timeout expired"
    else:
        assert not isinstance(results["short"], Exception), results["short"]


def test_max_queue_size_is_per_priority_level(server):
    """L0_model_queue's per-priority policies: level 1 holds one queued request, level 2 is unbounded."""
    results: dict = {}
    threads = [_infer_in_thread(server, "q_per_level", 500, results, "busy")]
    time.sleep(0.15)
    threads.append(_infer_in_thread(server, "q_per_level", 1, results, "p1", priority=1))
    threads += [_infer_in_thread(server, "q_per_level", 1, results, f"p2-{i}", priority=2) for i in range(3)]
    time.sleep(0.15)
    c = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as e:
        c.infer("q_per_level", _probe_input(1), priority=1, request_id="over")
    assert e.value.message() == "[request id: over] Exceeds maximum queue size"
    assert e.value.status() == "503"
    c.infer("q_per_level", _probe_input(1), priority=2)  # level 2 still takes requests
    c.close()
    for t in threads:
        t.join(30)
    assert not any(isinstance(r, Exception) for r in results.values()), results


# -- L0_model_config (noautofill cases that apply to python models) --------------------------------------------
_EXPECTED = {
    "negative_max_batch_size": "'max_batch_size' must be non-negative value for negative_max_batch_size",
    "missing_datatype": "model input 'INPUT0' must specify 'data_type'",
    "default_priority_level0": "default priority level must be in range [1, 3] for default_priority_level0",
    "default_priority_level1": "default priority level must be in range [1, 3] for default_priority_level1",
    "priority_level0": "priority queue policy must have priority level in range [1, 3] for priority_level0",
    "priority_level1": "priority queue policy must have priority level in range [1, 3] for priority_level1",
    "preserve_ordering0": "Only one priority level is allowed when 'preserve_ordering' is true for "
                          "preserve_ordering0",
    "preserve_ordering1": "Queue policy can not have DELAY as timeout action when 'preserve_ordering' is true "
                          "for preserve_ordering1",
    "preserve_ordering2": "Queue policy can not have DELAY as timeout action when 'preserve_ordering' is true "
                          "for preserve_ordering2",
    "invalid_cpu": "instance group invalid_cpu_0 of model invalid_cpu has kind KIND_CPU but specifies one or "
                   "more GPU",
}


@pytest.mark.parametrize("name", sorted(_BAD_CONFIGS))
def test_invalid_configs_are_refused_with_tritons_message(http, name):
    assert _EXPECTED[name] in _reason(http, name)
