"""Triton's trace extension (kernel.tracing), through the official tritonclient over HTTP and gRPC and
through the in-process API: settings (global, per model, cleared back), sampling by rate and count,
and the trace file's records (docs/triton-behaviour.md §15)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kernel.api import Server
from kernel.errors import ServerError
from kernel.tracing import Tracer
from tests.pipeline_models import _ensemble, _io, _python, arith
from tests.support import ROOT, serving

#: calls double with its request's trace (traced as its child) and inc without (not traced)
_BLS_CALLER = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN")
            assert r.trace().get_context() is None
            outs = []
            for model, trace in (("double", r.trace()), ("inc", None)):
                kwargs = {"trace": trace} if trace is not None else {}
                answer = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor("IN", x.as_numpy())],
                                                   requested_output_names=["OUT"], **kwargs).exec()
                outs.append(pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy())
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", outs[0] + outs[1])]))
        return responses
"""
HTTP_NAMES = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "INFER_RESPONSE_COMPLETE",
              "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END",
              "HTTP_SEND_START", "HTTP_SEND_END"]
#: the order the events happen in (the file keeps Triton's order, where INFER_RESPONSE_COMPLETE comes first)
HAPPENED = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START",
            "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "INFER_RESPONSE_COMPLETE", "REQUEST_END",
            "HTTP_SEND_START", "HTTP_SEND_END"]
OFF = {"trace_level": None, "trace_rate": None, "trace_count": None, "log_frequency": None}


def _repository(dest: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", dest / "add_sub")
    shutil.copytree(ROOT / "tests" / "models" / "repeat", dest / "repeat")  # decoupled
    arith(dest, "slow", "import time\n            time.sleep(float(x.flat[0]))\n            y = x", dims="4")
    _python(dest, "bls_caller", _io([("IN", "FP32", "4")], [("OUT", "FP32", "4")]), _BLS_CALLER)
    arith(dest, "double", "y = (x * 2).astype(np.float32)", dims="4")
    arith(dest, "inc", "y = (x + 1).astype(np.float32)", dims="4")
    _ensemble(dest, "twice", _io([("INPUT", "FP32", "4")], [("OUTPUT", "FP32", "4")]),
              [("double", {"IN": "INPUT"}, {"OUT": "t"}), ("inc", {"IN": "t"}, {"OUT": "OUTPUT"})])
    return dest


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    base = tmp_path_factory.mktemp("tracing")
    repo = _repository(base / "models")
    path = base / "trace.json"
    # chain=0: the ensemble's steps go through the front one by one (their stamps do not depend on chaining)
    yield from ((srv, path) for srv in serving(repo, base, "--trace-config", f"triton,file={path}",
                                               "--backend-config", "ensemble,chain=0"))


@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    """A server with explicit model control (so add_sub can be unloaded), its global setting OFF."""
    base = tmp_path_factory.mktemp("tracing_explicit")
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", base / "models" / "add_sub")
    path = base / "trace.json"
    yield from ((srv, path) for srv in serving(base / "models", base, "--model-control-mode", "explicit",
                                               "--load-model", "add_sub", "--trace-config", f"triton,file={path}"))


@pytest.fixture
def http(traced):
    srv, _ = traced
    client = httpclient.InferenceServerClient(srv.http_url)
    yield client
    for model in ("", "add_sub", "twice", "double", "slow", "repeat", "bls_caller"):  # the command line's settings
        client.update_trace_settings(model_name=model or None, settings=OFF)
    client.close()


def _files(path: Path) -> dict[int, Path]:
    """The numbered trace files: index -> path."""
    return {int(p.name.rsplit(".", 1)[1]): p for p in path.parent.glob(path.name + ".*")}


def _new_traces(path: Path, before: dict[int, Path]) -> list[list[dict]]:
    """The records of the numbered files written since ``before``, by trace id (in file order)."""
    records = []
    for index, file in sorted(_files(path).items()):
        if index not in before:
            records.extend(json.loads(file.read_text()))
    traces: dict[int, list[dict]] = {}
    for record in records:
        traces.setdefault(record["id"], []).append(record)
    return list(traces.values())


def _names(trace: list[dict]) -> list[str]:
    return [r["timestamps"][0]["name"] for r in trace if "timestamps" in r]


def _ns(trace: list[dict]) -> dict[str, int]:
    return {r["timestamps"][0]["name"]: r["timestamps"][0]["ns"] for r in trace if "timestamps" in r}


def _add_sub_inputs(module):
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 3, dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [16], "INT32"), module.InferInput("INPUT1", [16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def _trace_each(http, model: str | None, *levels: str) -> None:
    """Trace every request (of ``model``; None: all) at ``levels`` (TIMESTAMPS by default), each trace in a
    numbered file of its own."""
    http.update_trace_settings(model_name=model, settings={
        "trace_level": list(levels) or ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"})


def _stream(srv, model: str, requests: list, answers: int, compression: str | None = None) -> None:
    """Send ``requests`` (each a list of gRPC inputs) on one stream and wait for ``answers`` results, none an
    error."""
    results: list = []
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        client.start_stream(callback=lambda result, error: results.append(error or result),
                            compression_algorithm=compression)
        for inputs in requests:
            client.async_stream_infer(model, inputs)
        deadline = time.monotonic() + 10
        while len(results) < answers and time.monotonic() < deadline:
            time.sleep(0.01)
        client.stop_stream()
    assert len(results) == answers and not any(isinstance(r, Exception) for r in results), results


def _vector(name: str, values) -> httpclient.InferInput:
    """An FP32 input of ``values`` for the HTTP client."""
    x = httpclient.InferInput(name, [len(values)], "FP32")
    x.set_data_from_numpy(np.asarray(values, dtype=np.float32))
    return x


def test_settings_global_per_model_and_cleared(http):
    """Triton's JSON; a model's setting overrides some fields and follows the global one for the rest;
    null clears a field back to its fallback (docs/triton-behaviour.md §15)."""
    settings = http.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_rate"] == "1000"
    assert settings["trace_count"] == "-1" and settings["log_frequency"] == "0"
    assert settings["trace_file"].endswith("trace.json") and settings["trace_mode"] == "triton"

    http.update_trace_settings(model_name="add_sub", settings={"trace_rate": "2"})
    assert http.get_trace_settings(model_name="add_sub")["trace_rate"] == "2"
    assert http.get_trace_settings()["trace_rate"] == "1000"
    updated = http.update_trace_settings(settings={"trace_rate": "7", "trace_count": "-1"})
    assert updated["trace_rate"] == "7"
    model = http.get_trace_settings(model_name="add_sub")
    assert model["trace_rate"] == "2" and model["trace_level"] == ["OFF"]
    http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert http.get_trace_settings(model_name="add_sub")["trace_level"] == ["TIMESTAMPS"]  # followed the global
    http.update_trace_settings(model_name="add_sub", settings={"trace_rate": None})
    assert http.get_trace_settings(model_name="add_sub")["trace_rate"] == "7"
    assert http.update_trace_settings(settings={"trace_rate": "-1"})["trace_rate"] == "4294967295"  # Triton's


@pytest.mark.parametrize("body, message", [
    ({"trace_file": "/tmp/x"}, "trace file location can not be updated through network protocol"),
    ({"trace_rate": 5}, "attempt to access JSON non-string as string"),
    ({"trace_rate": "abc"}, "Unable to parse 'trace_rate', got: abc"),
    ({"trace_count": "-2"}, "Unable to parse 'trace_count'. Expecting value >= -1, got:-2"),
    ({"log_frequency": "x"}, "Unable to parse 'log_frequency', got: x"),
    ({"trace_level": "TIMESTAMPS"}, "attempt to access JSON non-array as array"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "Expect only one trace level 'OFF' is specified"),
    ({"trace_rate": "0", "trace_level": ["TIMESTAMPS"]},
     "Attempting to set invalid trace setting :sample rate must be non-zero"),
])
def test_bad_settings_are_400(http, body, message):
    with pytest.raises(InferenceServerException) as e:
        http.update_trace_settings(settings=body)
    assert message in e.value.message()
    assert e.value.status() == "400"
    assert http.get_trace_settings()["trace_level"] == ["OFF"]  # nothing changed


def test_other_methods_are_405(traced):
    srv, _ = traced
    for url in ("/v2/trace/setting", "/v2/models/add_sub/trace/setting"):
        request = urllib.request.Request(f"http://{srv.http_url}{url}", data=b"{}", method="PUT")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 405
        assert json.loads(e.value.read()) == {"error": "Method Not Allowed"}


@pytest.mark.parametrize("url", ["/v2/trace/setting", "/v2/models/add_sub/trace/setting", "/v2/logging"])
@pytest.mark.parametrize("body", [b"", b" \t\r\n"])
def test_empty_post_body_is_400(http, traced, url, body):
    """An empty or blank POST body to the trace and logging routes is an error, not a read: Triton 2.51 answers
    500 with rapidjson's words (at the blank's end); the client's mistake, so 400 here with the same text
    (docs/triton-behaviour.md §15). tritonclient always sends an object (``{}`` for no settings: a read, as an
    empty gRPC settings map is, in both servers), so the empty body goes raw."""
    srv, _ = traced
    logging = url == "/v2/logging"
    model = "add_sub" if "/models/" in url else None
    if logging:
        settings = http.update_log_settings({"log_verbose_level": 0})
    else:
        settings = http.update_trace_settings(model_name=model, settings={"trace_rate": "2"})
    request = urllib.request.Request(f"http://{srv.http_url}{url}", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400
    assert json.loads(e.value.read()) == {
        "error": f"failed to parse the request JSON buffer: The document is empty. at {len(body)}"}
    if logging:
        assert http.get_log_settings() == settings  # nothing changed
        return
    settings = http.get_trace_settings(model_name=model)
    assert settings["trace_rate"] == "2"  # nothing changed
    assert http.update_trace_settings(model_name=model, settings={}) == settings
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        reply = client.update_trace_settings(model_name=model, settings={}, as_json=True)["settings"]
    assert {key: value["value"] for key, value in reply.items()} == {
        key: value if isinstance(value, list) else [value] for key, value in settings.items()}


def test_unknown_model_and_no_file():
    with pytest.raises(ServerError, match="trace file name is not given"):
        Tracer({}).update("", {"level": 1})
    with pytest.raises(ServerError, match="invalid value for trace mode option: bogus"):  # (opentelemetry:
        Tracer({"mode": "bogus"})  # tests/test_tracing_otel.py)


def test_unknown_model_http_and_grpc(http, traced):
    with pytest.raises(InferenceServerException, match="Request for unknown model : nosuch"):
        http.get_trace_settings(model_name="nosuch")
    with grpcclient.InferenceServerClient(traced[0].grpc_url) as client:
        with pytest.raises(InferenceServerException, match="Request for unknown model : nosuch"):
            client.update_trace_settings(model_name="nosuch", settings={"trace_rate": "1"})


def test_model_setting_outlives_its_unload(explicit):
    """As in Triton 2.51 (docs/triton-behaviour.md §15): an unloaded model's setting is not dropped. While the
    model is unloaded its URL is 400 (gRPC INVALID_ARGUMENT) ``Request for unknown model``, not the global
    setting; a global change made meanwhile reaches it; reloaded, the model has its setting again, and traces
    by it."""
    srv, path = explicit
    mine = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"}
    with httpclient.InferenceServerClient(srv.http_url) as http, \
            grpcclient.InferenceServerClient(srv.grpc_url) as grpc:
        http.update_trace_settings(model_name="add_sub", settings=mine)
        http.unload_model("add_sub")
        for client, status in ((http, "400"), (grpc, "StatusCode.INVALID_ARGUMENT")):
            for call, kwargs in ((client.get_trace_settings, {}),
                                 (client.update_trace_settings, {"settings": {"trace_rate": "5"}})):
                with pytest.raises(InferenceServerException) as e:
                    call(model_name="add_sub", **kwargs)
                assert (e.value.status(), e.value.message()) == (status, "Request for unknown model : add_sub")
        http.update_trace_settings(settings={"trace_count": "7"})
        http.load_model("add_sub")
        assert http.get_trace_settings(model_name="add_sub") == {
            **mine, "trace_count": "7", "trace_file": str(path), "trace_mode": "triton"}
        http.infer("add_sub", _add_sub_inputs(httpclient)[0], request_id="reloaded")
        http.get_trace_settings()  # (the trace ends once the answer is sent: this waits for that)
    traces = _new_traces(path, {})
    assert [[r["request_id"] for r in t if "request_id" in r] for t in traces] == [["reloaded"]]


def test_http_trace_records(http, traced):
    """One trace per request in numbered files (log_frequency 1), Triton's names in Triton's order, the
    times in the order the events happen; a model without a setting of its own is not traced."""
    _, path = traced
    before = _files(path)
    _trace_each(http, "add_sub")
    inputs, a, b = _add_sub_inputs(httpclient)
    for i in range(3):
        result = http.infer("add_sub", inputs, request_id=f"r{i}")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    http.infer("double", [_vector("IN", np.ones(4))])  # the global setting is OFF: not traced
    traces = _new_traces(path, before)
    assert len(traces) == 3, traces
    for i, trace in enumerate(traces):
        assert trace[0] == {"id": trace[0]["id"], "timestamps": [{"name": "HTTP_RECV_START",
                                                                   "ns": trace[0]["timestamps"][0]["ns"]}]}
        head = [r for r in trace if "model_name" in r]
        assert head == [{"id": head[0]["id"], "model_name": "add_sub", "model_version": 1, "request_id": f"r{i}"}]
        assert _names(trace) == HTTP_NAMES
        ns = _ns(trace)
        times = [ns[name] for name in HAPPENED]
        assert times == sorted(times), list(zip(HAPPENED, times))
    assert len({t[0]["id"] for t in traces}) == 3


def test_grpc_trace_records_and_settings(http, traced):
    srv, path = traced
    before = _files(path)
    with grpcclient.InferenceServerClient(srv.grpc_url) as client:
        reply = client.update_trace_settings(model_name="add_sub", settings={
            "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"}, as_json=True)
        assert reply["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        assert reply["settings"]["trace_rate"]["value"] == ["1"]
        inputs, a, b = _add_sub_inputs(grpcclient)
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT1"), a - b)
        with pytest.raises(InferenceServerException, match="trace file location can not be updated"):
            client.update_trace_settings(settings={"trace_file": "/tmp/x"})
        with pytest.raises(InferenceServerException, match="Unable to parse 'trace_rate', got: x"):
            client.update_trace_settings(settings={"trace_rate": "x"})
        cleared = client.update_trace_settings(model_name="add_sub", settings={"trace_level": None}, as_json=True)
        assert cleared["settings"]["trace_level"]["value"] == ["OFF"]  # the global level again
    traces = _new_traces(path, before)
    assert len(traces) == 1
    names = _names(traces[0])
    assert names == ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *HTTP_NAMES[2:-2], "GRPC_SEND_START",
                     "GRPC_SEND_END"]
    ns = _ns(traces[0])
    order = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *HAPPENED[2:-2], "GRPC_SEND_START", "GRPC_SEND_END"]
    times = [ns[n] for n in order]
    assert times == sorted(times), list(zip(order, times))


def test_rate_and_count(http, traced):
    """Every second request while the count lasts; the traces go to a numbered file once it runs out."""
    _, path = traced
    before = _files(path)
    http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "2"})
    inputs, _, _ = _add_sub_inputs(httpclient)
    for i in range(7):
        http.infer("add_sub", inputs, request_id=str(i))
    assert http.get_trace_settings()["trace_count"] == "0"
    traces = _new_traces(path, before)
    assert [[r["request_id"] for r in t if "request_id" in r] for t in traces] == [["1"], ["3"]]
    assert len(_files(path)) == len(before) + 1  # both in one file, written when the count ran out


def test_ensemble_steps_are_child_traces(http, traced):
    _, path = traced
    before = _files(path)
    _trace_each(http, "twice")
    out = http.infer("twice", [_vector("INPUT", np.arange(4))]).as_numpy("OUTPUT")
    np.testing.assert_array_equal(out, np.arange(4) * 2 + 1)
    http.get_trace_settings()  # answered after the trace was written (it is, once its answer is sent)
    traces = _new_traces(path, before)
    heads = {t[0]["id"]: next(r for r in t if "model_name" in r) for t in traces}
    parent = next(h for h in heads.values() if h["model_name"] == "twice")
    children = sorted((h for h in heads.values() if h["model_name"] != "twice"), key=lambda h: h["id"])
    assert [(c["model_name"], c["parent_id"]) for c in children] == [("double", parent["id"]),
                                                                     ("inc", parent["id"])]
    # As Triton writes them: the steps' traces first, the last step's first, then the ensemble's own
    assert [t[0]["id"] for t in traces] == [children[1]["id"], children[0]["id"], parent["id"]]
    by_id = {t[0]["id"]: t for t in traces}
    for child in children:  # a step's request was made by the ensemble, not a client: no response stamp
        assert _names(by_id[child["id"]]) == [n for n in HTTP_NAMES[2:-2] if n != "INFER_RESPONSE_COMPLETE"]
    assert _names(by_id[parent["id"]]) == ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START",
                                           "INFER_RESPONSE_COMPLETE", "REQUEST_END", "HTTP_SEND_START",
                                           "HTTP_SEND_END"]
    steps = [_ns(by_id[c["id"]]) for c in children]
    assert steps[0]["COMPUTE_END"] <= steps[1]["COMPUTE_START"]  # the second step ran on the first's output
    whole = _ns(by_id[parent["id"]])
    assert whole["REQUEST_START"] <= steps[0]["REQUEST_START"] and steps[1]["REQUEST_END"] <= whole["REQUEST_END"]


def test_tensors(http, traced):
    _, path = traced
    before = _files(path)
    _trace_each(http, "add_sub", "TIMESTAMPS", "TENSORS")
    inputs, a, b = _add_sub_inputs(httpclient)
    http.infer("add_sub", inputs)
    http.get_trace_settings()  # answered after the trace was written (it is, once its answer is sent)
    (trace,) = _new_traces(path, before)
    kinds = [r["activity"] if "activity" in r else r["timestamps"][0]["name"] for r in trace if "model_name" not in r]
    assert kinds[3:10] == ["QUEUE_START", "TENSOR_QUEUE_INPUT", "TENSOR_QUEUE_INPUT", "TENSOR_BACKEND_OUTPUT",
                           "TENSOR_BACKEND_OUTPUT", "INFER_RESPONSE_COMPLETE", "COMPUTE_START"]  # Triton's places
    tensors = {(r["activity"], r["tensor"]["name"]): r["tensor"] for r in trace if "activity" in r}
    csv = lambda v: ",".join(map(str, v))  # noqa: E731
    assert tensors == {
        ("TENSOR_QUEUE_INPUT", "INPUT0"): {"name": "INPUT0", "data": csv(a), "shape": "16", "dtype": "INT32"},
        ("TENSOR_QUEUE_INPUT", "INPUT1"): {"name": "INPUT1", "data": csv(b), "shape": "16", "dtype": "INT32"},
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT0"): {"name": "OUTPUT0", "data": csv(a + b), "shape": "16", "dtype": "INT32"},
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT1"): {"name": "OUTPUT1", "data": csv(a - b), "shape": "16", "dtype": "INT32"},
    }
    # An ensemble's own trace has its inputs and outputs too (its steps', theirs)
    before = _files(path)
    _trace_each(http, "twice", "TIMESTAMPS", "TENSORS")
    http.infer("twice", [_vector("INPUT", [0.5, 1e-7, -2, 3.25])])
    http.get_trace_settings()
    records = [r for t in _new_traces(path, before) for r in t if "activity" in r]
    assert [(r["activity"], r["tensor"]["name"], r["tensor"]["data"]) for r in records] == [
        ("TENSOR_QUEUE_INPUT", "IN", "1,2e-07,-4,6.5"), ("TENSOR_BACKEND_OUTPUT", "OUT", "2,1,-3,7.5"),  # inc
        ("TENSOR_QUEUE_INPUT", "IN", "0.5,1e-07,-2,3.25"), ("TENSOR_BACKEND_OUTPUT", "OUT", "1,2e-07,-4,6.5"),
        ("TENSOR_QUEUE_INPUT", "INPUT", "0.5,1e-07,-2,3.25"), ("TENSOR_BACKEND_OUTPUT", "OUTPUT", "2,1,-3,7.5")]


def test_in_process_traces_written_at_shutdown(tmp_path):
    """log_frequency 0: traces go to the file itself when their setting is replaced and at shutdown; the
    file is one JSON array after each write."""
    repo = _repository(tmp_path / "models")
    path = tmp_path / "trace.json"
    a = np.arange(16, dtype=np.int32)
    with Server(repo, trace_config={"level": ["TIMESTAMPS"], "rate": "1", "file": str(path)}) as server:
        model = server.model("add_sub")
        for _ in range(2):
            model.infer({"INPUT0": a, "INPUT1": a})
        assert not path.exists()  # nothing written before the setting is replaced or the server stops
        server._call(lambda core: core.tracer.update("", {"rate": 2}))  # replaced: its two traces are written
        assert len(json.loads(path.read_text())) == 2 * 9  # a header and eight stamps each
        for _ in range(4):
            model.infer({"INPUT0": a, "INPUT1": a})
    records = json.loads(path.read_text())
    ids = sorted({r["id"] for r in records})
    assert len(ids) == 4  # two, then every second of four
    trace = [r for r in records if r["id"] == ids[-1]]
    assert _names(trace) == HTTP_NAMES[2:-2]
    assert not list(tmp_path.glob("trace.json.*"))
    from bench import timeline  # reads in-process traces from their REQUEST_START

    groups = timeline.offsets(timeline.load([str(path)]))
    assert list(groups) == ["add_sub in process"]
    events = groups["add_sub in process"]
    assert events["REQUEST_START"] == [0] * 4 and len(events["REQUEST_END"]) == 4
    median = {name: sorted(v)[1] for name, v in events.items()}
    assert [median[n] for n in HAPPENED[2:-2]] == sorted(median[n] for n in HAPPENED[2:-2]), median


def test_timeline_of_our_traces(http, traced):
    """bench.timeline reads our trace files: each event's offset after arrival, an ensemble's steps on its clock."""
    from bench import timeline

    _, path = traced
    before = _files(path)
    _trace_each(http, None)
    for _ in range(3):
        http.infer("twice", [_vector("INPUT", np.arange(4))])
    http.get_trace_settings()
    files = [str(p) for i, p in sorted(_files(path).items()) if i not in before]
    groups = timeline.offsets(timeline.load(files))
    assert list(groups) == ["twice HTTP"]
    events = groups["twice HTTP"]
    assert all(len(v) == 3 for v in events.values())
    median = {name: sorted(v)[1] for name, v in events.items()}
    order = ["HTTP_RECV_END", "REQUEST_START", "double: REQUEST_START", "double: COMPUTE_START",
             "double: COMPUTE_END", "inc: COMPUTE_START", "inc: COMPUTE_END", "REQUEST_END", "HTTP_SEND_END"]
    assert [median[n] for n in order] == sorted(median[n] for n in order), median
    text = timeline.table({"ours": events})
    assert "| double: COMPUTE_START |" in text and "| requests traced | 3 |" in text
    assert timeline.NEXT not in events  # (only when every request was traced, which the files cannot say)
    # Every request was traced: the next request's arrival, after this one's answer, for all but the last.
    arrived = timeline.offsets(timeline.load(files), every=True)["twice HTTP"][timeline.NEXT]
    assert len(arrived) == 2 and all(a > sent for a, sent in zip(arrived, events["HTTP_SEND_END"])), (
        arrived, events["HTTP_SEND_END"])  # (the files, and so the lists, in the order of the requests)


def test_a_request_given_up_still_ends_its_trace(http, traced):
    """A client that goes away (a reset) leaves a trace nobody answers: it still ends, so that a trace_count
    runs out and its traces are written."""
    srv, path = traced
    before = _files(path)
    http.update_trace_settings(model_name="slow", settings={
        "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "2"})
    body = json.dumps({"inputs": [{"name": "IN", "shape": [4], "datatype": "FP32", "data": [0.5] * 4}]}).encode()
    host, port = srv.http_url.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    http.infer("slow", [_vector("IN", np.zeros(4))])
    http.get_trace_settings()
    traces = _new_traces(path, before)
    assert len(traces) == 2, traces  # both, in the file written when the count ran out
    assert "HTTP_SEND_END" not in _names(traces[0])  # the first was never answered
    assert _names(traces[1]) == HTTP_NAMES


def test_refused_requests_end_their_traces(tmp_path):
    """An in-process request refused at once ends its trace; at level TENSORS alone it has no records, and
    the file stays valid JSON."""
    repo = _repository(tmp_path / "models")
    path = tmp_path / "trace.json"
    with Server(repo, trace_config={"level": ["TENSORS"], "rate": "1", "count": "2", "file": str(path)}) as server:
        model = server.model("add_sub")
        with pytest.raises(ServerError, match="data-type"):
            model.infer({"INPUT0": np.zeros(16, np.float32), "INPUT1": np.zeros(16, np.float32)})
        a = np.arange(16, dtype=np.int32)
        model.infer({"INPUT0": a, "INPUT1": a})
        records = json.loads((tmp_path / "trace.json.0").read_text())  # written once the count ran out
    assert [(r["activity"], r["tensor"]["name"]) for r in records if "activity" in r] == [
        ("TENSOR_QUEUE_INPUT", "INPUT0"), ("TENSOR_QUEUE_INPUT", "INPUT1"),
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT0"), ("TENSOR_BACKEND_OUTPUT", "OUTPUT1")]


def test_decoupled_stream_traces(http, traced):
    """A decoupled model's streamed requests, answered from execute or from a thread: each trace has the
    worker's COMPUTE_* and ends once the final response came."""
    srv, path = traced
    before = _files(path)
    _trace_each(http, "repeat")
    requests = []
    for values in ([-7], [1, 2, 3]):
        x = grpcclient.InferInput("IN", [len(values)], "INT32")
        x.set_data_from_numpy(np.array(values, dtype=np.int32))
        requests.append([x])
    _stream(srv, "repeat", requests, 4)
    http.get_trace_settings()
    traces = _new_traces(path, before)
    assert len(traces) == 2
    for trace in traces:
        assert sorted(_names(trace)) == sorted([
            "GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START",
            "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "INFER_RESPONSE_COMPLETE", "REQUEST_END"])
        ns = _ns(trace)
        order = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_END", "INFER_RESPONSE_COMPLETE",
                 "REQUEST_END"]
        assert [ns[n] for n in order] == sorted(ns[n] for n in order)


def test_streamed_requests_are_traced_to_their_send(http, traced):
    """An ordinary model's streamed requests: each trace ends with GRPC_SEND_START/END around the writing of its
    response, as over unary gRPC (also a stream with gzip, whose responses go through the stream's writer)."""
    srv, path = traced
    before = _files(path)
    _trace_each(http, "add_sub")
    inputs = _add_sub_inputs(grpcclient)[0]
    for compression in (None, "gzip"):
        _stream(srv, "add_sub", [inputs] * 3, 3, compression)
    http.get_trace_settings()
    traces = _new_traces(path, before)
    assert len(traces) == 6
    order = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *HAPPENED[2:-2], "GRPC_SEND_START", "GRPC_SEND_END"]
    for trace in traces:
        assert sorted(_names(trace)) == sorted(order)
        ns = _ns(trace)
        assert [ns[n] for n in order] == sorted(ns[n] for n in order), list(zip(order, (ns[n] for n in order)))


def test_tensors_of_a_pipeline_that_would_chain(tmp_path, monkeypatch):
    """A traced ensemble request at level TENSORS runs its steps unchained: a chained step's inputs are
    not there yet when it is queued. Untraced, the same request chains."""
    from kernel.pipelines import ensemble

    monkeypatch.setattr(ensemble, "PREWAKE_MAX_NS", 50_000_000)  # chain on a loaded machine too
    repo = _repository(tmp_path / "models")
    path = tmp_path / "trace.json"
    x = np.array([0.5, 1, 2, 3], dtype=np.float32)
    with Server(repo, trace_config={"level": ["TENSORS"], "rate": "1", "log_frequency": "1",
                                    "file": str(path)}) as server:
        model = server.model("twice")
        for _ in range(3):
            np.testing.assert_array_equal(model.infer({"INPUT": x})["OUTPUT"], x * 2 + 1)
        assert server._call(lambda core: core.chained_steps) == 0
        server._call(lambda core: core.tracer.update("", {"level": 0}))
        for _ in range(3):
            model.infer({"INPUT": x})
        assert server._call(lambda core: core.chained_steps) >= 1
    records = json.loads((tmp_path / "trace.json.2").read_text())
    # the ensemble's INPUT, the first step's IN, and the second step's IN: the first step's output
    assert sorted((r["tensor"]["name"], r["tensor"]["data"]) for r in records
                  if r.get("activity") == "TENSOR_QUEUE_INPUT") == [
        ("IN", "0.5,1,2,3"), ("IN", "1,2,4,6"), ("INPUT", "0.5,1,2,3")]


def test_bls_requests_made_with_the_trace_are_its_children(http, traced):
    """As in Triton's python backend: ``InferenceRequest(..., trace=request.trace())`` traces the BLS request
    as a child of the calling request's trace; one made without it is not traced."""
    _, path = traced
    before = _files(path)
    _trace_each(http, "bls_caller")
    np.testing.assert_array_equal(http.infer("bls_caller", [_vector("IN", np.arange(4))]).as_numpy("OUT"),
                                  np.arange(4) * 3 + 1)
    http.get_trace_settings()
    traces = _new_traces(path, before)
    heads = [next(r for r in t if "model_name" in r) for t in traces]
    caller = next(h for h in heads if h["model_name"] == "bls_caller")
    assert [(h["model_name"], h.get("parent_id")) for h in heads if h is not caller] == [("double", caller["id"])]
    child = next(t for t in traces if t[0]["id"] != caller["id"])
    assert "COMPUTE_START" in _names(child) and "REQUEST_END" in _names(child)
