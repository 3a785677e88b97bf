"""Triton's OpenTelemetry trace mode (kernel.tracing, kernel.otel): a server started with
``--trace-config mode=opentelemetry`` exports its traces as spans over OTLP/HTTP to a receiver this module
runs, and the official tritonclient sends the requests, over HTTP and gRPC, with and without a W3C
``traceparent`` (docs/triton-behaviour.md §15)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # (the otel extra, in the test extra)
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from tritonclient.utils import InferenceServerException

from kernel import cli
from kernel.api import Server
from kernel.errors import ServerError
from kernel.tracing import Tracer
from tests.pipeline_models import _io, _python
from tests.support import ROOT, KernelServer, free_port, serving
from tests.test_tracing import _BLS_CALLER, _add_sub_inputs, _repository, _vector

TRACE_ID = "0af7651916cd43dd8448eb211c12666c"
SPAN_ID = "b7ad6b7169242424"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"  # Triton's qa/L0_trace one
HTTP_ROOT = ["HTTP_RECV_START", "HTTP_RECV_END", "INFER_RESPONSE_COMPLETE", "HTTP_SEND_START", "HTTP_SEND_END"]
GRPC_ROOT = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "INFER_RESPONSE_COMPLETE", "GRPC_SEND_START",
             "GRPC_SEND_END"]
REQUEST = ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
COMPUTE = ["COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"]
SERVER_KIND = 2  # opentelemetry.proto's SPAN_KIND_SERVER


class Collector:
    """An OTLP/HTTP receiver: POST /v1/traces bodies decoded as ExportTraceServiceRequest, kept as spans."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                collector.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.spans.append({
                            "name": s.name, "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "trace": s.trace_id.hex(), "kind": s.kind, "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano, "scope": scope_spans.scope.name, "resource": resource,
                            "attributes": {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes},
                            "events": [(e.name, e.time_unix_nano) for e in s.events]})

    def clear(self) -> None:
        with self.lock:
            self.spans = []

    def take(self, count: int, timeout: float = 3.0) -> list[dict]:
        """Wait for ``count`` spans (no more come within a short while after), and clear them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= count:
                    break
            time.sleep(0.02)
        time.sleep(0.2)  # (any extra span shows)
        with self.lock:
            spans, self.spans = self.spans, []
        assert len(spans) == count, [(s["name"], s["parent"]) for s in spans]
        return spans


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.shutdown()


def _otel_repository(dest: Path) -> Path:
    _repository(dest)
    # the BLS caller without test_tracing's check that the trace context is None (mode triton's answer)
    _python(dest, "bls_otel", _io([("IN", "FP32", "4")], [("OUT", "FP32", "4")]),
            _BLS_CALLER.replace("            assert r.trace().get_context() is None\n", ""))
    _python(dest, "context", _io([("IN", "FP32", "4")], [("CONTEXT", "STRING", "1")]), _CONTEXT)
    return dest


#: a python model that answers its request's OpenTelemetry context, as a model passes it on
_CONTEXT = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("CONTEXT", np.array(
            [r.trace().get_context() or "none"], dtype=object))]) for r in requests]
"""


@pytest.fixture(scope="module")
def otel(tmp_path_factory, collector):
    base = tmp_path_factory.mktemp("tracing_otel")
    repo = _otel_repository(base / "models")
    # As Triton's qa/L0_trace: a url without a scheme, two resources; bsp_schedule_delay=0 exports at once.
    # (triton,file belongs to the other mode: ignored, as Triton ignores it.)
    url = f"127.0.0.1:{collector.port}/v1/traces"
    yield from serving(repo, base, "--trace-config", "mode=opentelemetry", "--trace-config", "level=TIMESTAMPS",
                       "--trace-config", "rate=1", "--trace-config", f"opentelemetry,url={url}",
                       "--trace-config", "opentelemetry,resource=service.name=edge-test",
                       "--trace-config", "opentelemetry,resource=test.key=test.value",
                       "--trace-config", "opentelemetry,bsp_schedule_delay=0",
                       "--trace-config", f"triton,file={base / 'unused.json'}", "--backend-config", "ensemble,chain=0")


@pytest.fixture
def http(otel, collector):
    client = httpclient.InferenceServerClient(otel.http_url)
    client.update_trace_settings(settings={"trace_rate": "1", "trace_count": "-1"})
    collector.clear()
    yield client
    client.update_trace_settings(settings={"trace_rate": "1", "trace_count": "-1"})
    client.close()


def _by_name(spans: list[dict]) -> dict[str, dict]:
    names = [s["name"] for s in spans]
    assert len(set(names)) == len(names), names
    return {s["name"]: s for s in spans}


def _tree(spans: list[dict], root: dict) -> list[dict]:
    """``root`` and the spans under it."""
    ids, tree = {root["id"]}, [root]
    for _ in range(3):
        for s in spans:
            if s["parent"] in ids and s["id"] not in ids:
                ids.add(s["id"])
                tree.append(s)
    return tree


def _names(span: dict) -> list[str]:
    return [name for name, _ in span["events"]]


def _check_request(spans: list[dict], model: str, root_events: list[str], request_id: str = "") -> dict:
    """One model's request: InferRequest > <model> > compute, their events, attributes and times."""
    by = _by_name(spans)
    assert set(by) == {"InferRequest", model, "compute"}
    root, request, compute = by["InferRequest"], by[model], by["compute"]
    assert request["parent"] == root["id"] and compute["parent"] == request["id"]
    assert len({s["trace"] for s in spans}) == 1
    assert all(s["kind"] == SERVER_KIND and s["scope"] == "triton-server" for s in spans)
    assert root["resource"]["service.name"] == "edge-test" and root["resource"]["test.key"] == "test.value"
    assert root["attributes"] == {} and compute["attributes"] == {}
    expected = {"triton.model_name": model, "triton.model_version": 1, "triton.trace_parent_id": 0}
    if request_id:
        expected["triton.request_id"] = request_id
    assert {k: v for k, v in request["attributes"].items() if k != "triton.trace_id"} == expected
    assert request["attributes"]["triton.trace_id"] > 0
    assert _names(root) == root_events and _names(request) == REQUEST and _names(compute) == COMPUTE
    # times: each span holds its events, in order, and its children; the compute span starts at COMPUTE_START
    for span in spans:
        times = [t for _, t in span["events"]]
        assert times == sorted(times) and span["start"] <= times[0] and times[-1] <= span["end"], span
    assert root["start"] <= request["start"] <= compute["start"] <= compute["end"] <= request["end"] <= root["end"]
    assert request["start"] == request["events"][0][1] and compute["start"] == compute["events"][0][1]
    ns = dict(root["events"] + request["events"] + compute["events"])
    order = [*root_events[:2], "REQUEST_START", "QUEUE_START", *COMPUTE, "INFER_RESPONSE_COMPLETE", "REQUEST_END",
             *root_events[3:]]
    assert [ns[n] for n in order] == sorted(ns[n] for n in order), list(zip(order, (ns[n] for n in order)))
    assert abs(root["start"] - time.time_ns()) < 60e9  # wall-clock times
    return root


def test_settings_http_and_grpc(http, otel):
    """trace_mode reads opentelemetry, with the exporter's settings and no file or log frequency, as Triton
    2.51 answers; the rate can still be changed."""
    settings = http.get_trace_settings()
    assert settings == {
        "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1", "trace_mode": "opentelemetry",
        "url": settings["url"], "resource": ["service.name=edge-test", "test.key=test.value"],
        "bsp_schedule_delay": "0", "bsp_max_queue_size": "2048", "bsp_max_export_batch_size": "512"}
    assert settings["url"].startswith("127.0.0.1:") and settings["url"].endswith("/v1/traces")
    assert http.get_trace_settings(model_name="add_sub") == settings
    with grpcclient.InferenceServerClient(otel.grpc_url) as grpc:
        reply = grpc.update_trace_settings(settings={"trace_rate": "3"}, as_json=True)["settings"]
    values = {key: value["value"] for key, value in reply.items()}
    assert values["trace_mode"] == ["opentelemetry"] and values["trace_rate"] == ["3"]
    assert values["resource"] == ["service.name=edge-test", "test.key=test.value"]
    assert "trace_file" not in values and "log_frequency" not in values
    assert http.get_trace_settings()["trace_rate"] == "3"


def test_http_request_spans(http, collector):
    inputs, a, b = _add_sub_inputs(httpclient)
    np.testing.assert_array_equal(http.infer("add_sub", inputs, request_id="r1").as_numpy("OUTPUT0"), a + b)
    root = _check_request(collector.take(3), "add_sub", HTTP_ROOT, request_id="r1")
    assert root["parent"] == ""  # a new trace


def test_traceparent_joins_the_clients_trace_and_forces_sampling(http, collector):
    """A client's traceparent: the request is traced even when the rate would skip it, and its InferRequest
    span is a child of the client's span, in the client's trace (also with the sampled flag off, as in
    Triton). One that is not a valid traceparent is ignored."""
    http.update_trace_settings(settings={"trace_rate": "1000"})
    inputs, _, _ = _add_sub_inputs(httpclient)
    http.infer("add_sub", inputs)  # the rate skips it
    collector.take(0, timeout=0.5)
    for flags in ("01", "00"):
        http.infer("add_sub", inputs, headers={"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-{flags}"})
        spans = collector.take(3)
        root = _check_request(spans, "add_sub", HTTP_ROOT)
        assert root["parent"] == SPAN_ID and {s["trace"] for s in spans} == {TRACE_ID}
    http.infer("add_sub", inputs, headers={"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"})  # invalid: rate 1000
    collector.take(0, timeout=0.5)


def test_grpc_unary_and_stream_spans(http, otel, collector):
    inputs, _, _ = _add_sub_inputs(grpcclient)
    with grpcclient.InferenceServerClient(otel.grpc_url) as client:
        client.infer("add_sub", inputs)
        root = _check_request(collector.take(3), "add_sub", GRPC_ROOT)
        assert root["parent"] == ""
        client.infer("add_sub", inputs, headers={"traceparent": TRACEPARENT})
        spans = collector.take(3)
        assert _check_request(spans, "add_sub", GRPC_ROOT)["parent"] == SPAN_ID
        assert {s["trace"] for s in spans} == {TRACE_ID}
        results: list = []
        client.start_stream(callback=lambda result, error: results.append(error or result),
                            headers={"traceparent": TRACEPARENT})  # the stream's metadata: each request's context
        for _ in range(2):
            client.async_stream_infer("add_sub", inputs)
        spans = collector.take(6)
        client.stop_stream()
    assert len(results) == 2 and not any(isinstance(r, Exception) for r in results)
    roots = [s for s in spans if s["name"] == "InferRequest"]
    assert [r["parent"] for r in roots] == [SPAN_ID, SPAN_ID] and {s["trace"] for s in spans} == {TRACE_ID}
    for root in roots:
        _check_request(_tree(spans, root), "add_sub", GRPC_ROOT)


def test_ensemble_steps_are_child_spans(http, collector):
    """InferRequest > twice > (double > compute, inc > compute); the steps' trace_parent_id is the
    ensemble's trace_id, and the second step ran after the first."""
    out = http.infer("twice", [_vector("INPUT", np.arange(4))], headers={"traceparent": TRACEPARENT})
    np.testing.assert_array_equal(out.as_numpy("OUTPUT"), np.arange(4) * 2 + 1)
    spans = collector.take(6)
    by_id = {s["id"]: s for s in spans}
    tree = sorted((s["name"], by_id[s["parent"]]["name"] if s["parent"] in by_id else s["parent"]) for s in spans)
    assert tree == [("InferRequest", SPAN_ID), ("compute", "double"), ("compute", "inc"), ("double", "twice"),
                    ("inc", "twice"), ("twice", "InferRequest")]
    named = {s["name"]: s for s in spans if s["name"] != "compute"}
    whole, first, second = named["twice"], named["double"], named["inc"]
    assert _names(whole) == REQUEST and _names(named["InferRequest"]) == HTTP_ROOT
    assert first["attributes"]["triton.trace_parent_id"] == whole["attributes"]["triton.trace_id"]
    assert second["attributes"]["triton.trace_parent_id"] == whole["attributes"]["triton.trace_id"]
    assert whole["attributes"]["triton.trace_parent_id"] == 0
    assert whole["start"] <= first["start"] and second["end"] <= whole["end"]
    computes = {by_id[s["parent"]]["name"]: s for s in spans if s["name"] == "compute"}
    assert computes["double"]["end"] <= computes["inc"]["start"]
    assert {s["trace"] for s in spans} == {TRACE_ID}


def test_bls_request_is_a_child_span(http, collector):
    """As in Triton's qa/L0_trace: a BLS request made with the caller's trace is a span under the caller's
    request span, beside its compute span."""
    http.infer("bls_otel", [_vector("IN", np.arange(4))])
    spans = collector.take(5)
    by_id = {s["id"]: s for s in spans}
    tree = sorted((s["name"], by_id[s["parent"]]["name"] if s["parent"] in by_id else s["parent"]) for s in spans)
    assert tree == [("InferRequest", ""), ("bls_otel", "InferRequest"), ("compute", "bls_otel"),
                    ("compute", "double"), ("double", "bls_otel")]


def test_rate_count_and_forced_traces(http, collector):
    """Triton 2.51's sampling in this mode (observed): rate 2, count 1; a request with a traceparent is
    traced whatever the count, and takes from it only when the rate picked it."""
    http.update_trace_settings(settings={"trace_rate": "2", "trace_count": "1"})
    inputs, _, _ = _add_sub_inputs(httpclient)
    for rid, context in (("A", False), ("B", False), ("C", True), ("D", False), ("E", True)):
        http.infer("add_sub", inputs, request_id=rid, headers={"traceparent": TRACEPARENT} if context else None)
    assert http.get_trace_settings()["trace_count"] == "0"
    spans = collector.take(9)
    assert sorted(s["attributes"]["triton.request_id"] for s in spans if s["name"] == "add_sub") == ["B", "C", "E"]


def test_spans_are_flushed_at_shutdown(tmp_path, collector):
    """In process, with a 60 s export delay: the spans still queued go out when the server stops; rate 0
    (Triton's way to trace only the requests that bring a context) is taken at start."""
    repo = _repository(tmp_path / "models")
    config = {"mode": "opentelemetry", "level": ["TIMESTAMPS"], "rate": "1",
              "opentelemetry": [("url", f"http://127.0.0.1:{collector.port}/v1/traces"),
                                ("bsp_schedule_delay", "60000")]}
    a = np.arange(16, dtype=np.int32)
    with Server(repo, trace_config=config) as server:
        server.model("add_sub").infer({"INPUT0": a, "INPUT1": a})
        time.sleep(0.3)
        assert collector.take(0, timeout=0) == []
    spans = collector.take(3)
    assert _by_name(spans)["InferRequest"]["resource"]["service.name"] == "triton-inference-server"  # default
    assert _names(_by_name(spans)["InferRequest"]) == ["INFER_RESPONSE_COMPLETE"]
    with Server(repo, trace_config={**config, "rate": "0"}) as server:
        server.model("add_sub").infer({"INPUT0": a, "INPUT1": a})
    assert collector.take(0, timeout=0.5) == []
    # bsp_max_queue_size reaches the processor: with a queue of 1, spans are dropped while it is full (Triton's
    # qa/L0_trace: "BatchSpanProcessor queue is full - dropping span."; which ones, timing decides)
    config["opentelemetry"].append(("bsp_max_queue_size", "1"))
    with Server(repo, trace_config=config) as server:
        server.model("add_sub").infer({"INPUT0": a, "INPUT1": a})
    names = [s["name"] for s in collector.take(len(collector.spans), timeout=0)]  # (all came: the stop flushed)
    assert 1 <= len(names) < 3, names


@pytest.mark.parametrize("collector", ["closed", "silent"])
def test_stop_is_prompt_without_a_collector(tmp_path, collector):
    """SIGTERM with a span still queued and no collector answering at the url: nothing listening (the SDK's
    exporter retries with back-off, 7 s before the bounded stop) or a socket that never answers (the request
    waits for the exporter's 10 s timeout). The server exits within the stop's bound (kernel.otel
    STOP_TIMEOUT_MS, 1 s) and what is left of a loaded machine's stop."""
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", tmp_path / "models" / "add_sub")
    silent = socket.socket()
    try:
        if collector == "silent":  # (the system completes its connections; nobody reads them)
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
        else:
            port = free_port()
        server = KernelServer(tmp_path / "models", "--trace-config", "mode=opentelemetry",
                              "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
                              "--trace-config", f"opentelemetry,url=127.0.0.1:{port}/v1/traces",
                              "--trace-config", "opentelemetry,bsp_schedule_delay=60000")  # (queued until the stop)
        server.start(tmp_path / "server.log")
        try:
            client = httpclient.InferenceServerClient(server.http_url)
            inputs, _, _ = _add_sub_inputs(httpclient)
            client.infer("add_sub", inputs)
            client.close()
        finally:
            start = time.monotonic()
            code = server.stop(signal.SIGTERM)
            took = time.monotonic() - start
    finally:
        silent.close()
    assert code == 0, server.log()
    assert took < 4.0, f"the stop took {took:.1f} s"
    assert not server.owned_shm()


@pytest.mark.parametrize("settings, message", [
    ([("", "mode", "bogus")], 'invalid value for trace mode option: bogus. Available options are "triton" and '
                              '"opentelemetry"'),
    ([("bogus", "url", "x")], "invalid value for trace mode option: bogus"),
    ([("opentelemetry", "bsp_max_queue_size", "abc")],
     'Bad option: "--trace-config opentelemetry,bsp_max_queue_size". Invalid option value. Got abc'),
    ([("opentelemetry", "bsp_schedule_delay", "99999999999999999999999")],
     'Bad option: "--trace-config opentelemetry,bsp_schedule_delay". Provided option value is out of bound.'),
    ([("opentelemetry", "bsp_max_export_batch_size", "0")], "The value must be positive. Got 0"),
    ([("opentelemetry", "url", "")], "--trace-config option format is '<trace mode>,<setting>=<value>'. "
                                     "Got opentelemetry,url="),
    ([("opentelemetry", "resource", "service.name")], "Expected <key>=<value>, got service.name"),
    ([("opentelemetry", "bsp_max_queue", "8")], "unknown trace setting 'opentelemetry,bsp_max_queue'"),
    ([("", "level", "BOGUS")], "invalid trace level 'BOGUS'"),
    ([("", "count", "-2")], "Unable to parse 'trace_count'. Expecting value >= -1, got:-2"),
])
@pytest.mark.parametrize("sdk", [True, False], ids=["sdk", "no-sdk"])
def test_bad_opentelemetry_settings_are_refused(monkeypatch, settings, message, sdk):
    """Each with its own message, also without the otel extra: the settings are checked before the SDK is
    needed, so a bad one is not reported as missing packages."""
    if not sdk:
        _without_the_sdk(monkeypatch)
    with pytest.raises(ValueError) as e:
        cli.trace_config([("", "mode", "opentelemetry"), *settings])
    assert message in str(e.value) and "pip install" not in str(e.value)


def test_settings_of_the_mode_and_from_the_environment(monkeypatch):
    """Triton's reading: bsp_* as numbers (stoul: leading digits; -1 wraps), defaults from OTEL_BSP_*."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    config = cli.trace_config([("", "mode", "opentelemetry"), ("opentelemetry", "bsp_schedule_delay", "10ms"),
                               ("opentelemetry", "bsp_max_export_batch_size", "-1"), ("triton", "file", "/x")])
    settings = Tracer(config, export=False).settings()
    assert (settings["bsp_schedule_delay"], settings["bsp_max_export_batch_size"], settings["bsp_max_queue_size"]) \
        == ("10", "4294967295", "64")
    assert "trace_file" not in settings
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "x")
    with pytest.raises(ValueError, match='Bad option: "OTEL_BSP_MAX_QUEUE_SIZE". Invalid option value. Got x'):
        cli.trace_config([("", "mode", "opentelemetry")])


#: ``kernel start`` as without the otel extra: importing the SDK fails
_START_WITHOUT_THE_SDK = ("import sys; sys.modules['opentelemetry'] = None; "
                         "from kernel.cli import main; sys.exit(main())")


@pytest.mark.parametrize("sdk, setting, message", [
    (True, "bsp_max_queue_size=x",
     'Bad option: "--trace-config opentelemetry,bsp_max_queue_size". Invalid option value. Got x'),
    (False, "bsp_max_queue_size=x",
     'Bad option: "--trace-config opentelemetry,bsp_max_queue_size". Invalid option value. Got x'),
    (False, "bsp_max_queue_size=8", "needs the packages opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http: "
                                    "pip install 'edge-kernel[otel]'"),
], ids=["sdk", "no-sdk", "no-sdk-valid"])
def test_a_bad_setting_stops_the_server_at_start(tmp_path, sdk, setting, message):
    """Without the otel extra too, a bad setting is reported as such; a valid one, as the missing packages."""
    command = ["-m", "kernel"] if sdk else ["-c", _START_WITHOUT_THE_SDK]
    proc = subprocess.run([sys.executable, *command, "start", "--model-repository", str(tmp_path),
                           "--trace-config", "mode=opentelemetry", "--trace-config", f"opentelemetry,{setting}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr
    assert ("pip install" in proc.stderr) == ("pip install" in message)


def _without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """As without the otel extra: importing kernel.otel or the SDK raises ImportError."""
    import kernel

    monkeypatch.delattr(kernel, "otel", raising=False)
    monkeypatch.delitem(sys.modules, "kernel.otel", raising=False)
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith("opentelemetry.")] + ["opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)  # import opentelemetry... raises ImportError


def test_missing_packages_are_a_clear_error(monkeypatch):
    """Without the otel extra: mode opentelemetry is refused at start, naming what to install; the other
    mode does not need it."""
    _without_the_sdk(monkeypatch)
    with pytest.raises(ServerError, match=r"pip install 'edge-kernel\[otel\]'"):
        Tracer({"mode": "opentelemetry"})
    with pytest.raises(ValueError, match=r"pip install 'edge-kernel\[otel\]'"):
        cli.trace_config([("", "mode", "opentelemetry"), ("", "level", "TIMESTAMPS")])
    assert Tracer({}).mode == "triton"


#: the server's modules, then checks of settings; after each, whether kernel.otel and the SDK are loaded
_SDK_LOADED = """
import sys
from kernel import api, cli
import protocol.grpc.front, protocol.http.front


def loaded():
    print("kernel.otel" in sys.modules, any(m.split(".")[0] == "opentelemetry" for m in sys.modules), end=" ")


cli.trace_config([("", "mode", "triton"), ("", "level", "TIMESTAMPS"), ("triton", "file", "/nonexistent/t.json")])
loaded()
try:
    cli.trace_config([("", "mode", "opentelemetry"), ("opentelemetry", "bsp_max_queue_size", "x")])
except ValueError:
    loaded()
cli.trace_config([("", "mode", "opentelemetry")])
loaded()
"""


def test_the_sdk_is_loaded_only_for_a_valid_configuration_of_the_mode():
    """The server's modules and its settings' checks import nothing of the SDK in mode triton, nor for a bad
    setting of mode opentelemetry; a valid configuration of the mode loads it."""
    proc = subprocess.run([sys.executable, "-c", _SDK_LOADED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False"] * 4 + ["True"] * 2, proc.stdout + proc.stderr


def test_unknown_model_is_still_refused(http):
    with pytest.raises(InferenceServerException, match="Request for unknown model : nosuch"):
        http.get_trace_settings(model_name="nosuch")


def test_a_python_model_gets_its_request_span_context(http, collector):
    """``request.trace().get_context()`` is Triton's ``{"traceparent": ...}`` of the request's span (the one
    named after the model) while the model runs, though the spans are made when the trace ends; under a
    client's context its trace id is the client's. Not traced: None."""
    inputs = [httpclient.InferInput("IN", [4], "FP32")]
    inputs[0].set_data_from_numpy(np.zeros(4, np.float32))
    for client_context in (None, TRACEPARENT):
        headers = {"traceparent": client_context} if client_context else None  # (tritonclient adds to a dict)
        answer = http.infer("context", inputs, headers=headers).as_numpy("CONTEXT")[0]
        context = json.loads(answer)
        assert list(context) == ["traceparent"]
        version, trace_id, span_id, flags = context["traceparent"].split("-")
        spans = _by_name(collector.take(3))
        assert (version, flags) == ("00", "01")
        assert (spans["context"]["trace"], spans["context"]["id"]) == (trace_id, span_id)
        assert spans["compute"]["parent"] == span_id and spans["InferRequest"]["trace"] == trace_id
        if client_context:
            assert trace_id == TRACE_ID and spans["InferRequest"]["parent"] == SPAN_ID
    http.update_trace_settings(settings={"trace_count": "0"})
    assert http.infer("context", inputs).as_numpy("CONTEXT")[0] == b"none"
