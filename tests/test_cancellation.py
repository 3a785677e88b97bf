"""Request cancellation reaching the model, as Triton's qa/L0_request_cancellation checks it.

A request whose client gives up (a gRPC deadline, a cancelled stream, a cancelled aio task) and that
is still queued is never executed; one already executing sees ``request.is_cancelled()`` (decoupled:
``response_sender.is_cancelled()``) turn True. The model (tests/templates/cancel_model.py) records
every request it receives, so these tests count what reached it; afterwards the instance still
serves and no shared memory is left behind (the fixture checks at shutdown).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, serving

_IO = """input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 1 ] } ]
"""
MODELS = {
    "cancel_probe": "",  # the default scheduler: one executing, one waiting in the ring, the rest queued
    "cancel_batched": "max_batch_size: 1\ndynamic_batching { }\n",
    "cancel_decoupled": "model_transaction_policy { decoupled: true }\n",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("cancel") / "models"
    template = (ROOT / "tests" / "templates" / "cancel_model.py").read_text()
    for name, config in MODELS.items():
        (dest / name / "1").mkdir(parents=True)
        (dest / name / "1" / "model.py").write_text(template)
        (dest / name / "config.pbtxt").write_text('backend: "python"\n' + config + _IO)
    (dest / "cancel_ensemble" / "1").mkdir(parents=True)
    (dest / "cancel_ensemble" / "config.pbtxt").write_text('platform: "ensemble"\n' + _IO + """
ensemble_scheduling { step [ { model_name: "cancel_probe" model_version: -1
  input_map { key: "INPUT0" value: "INPUT0" } output_map { key: "OUTPUT0" value: "OUTPUT0" } } ] }
""")
    return dest


@pytest.fixture(scope="module")
def srv(repo, tmp_path_factory):
    yield from serving(repo, tmp_path_factory.mktemp("cancel-log"))


def executions(repo: Path, model: str) -> dict[str, dict]:
    """What reached the model, by request id."""
    log = repo / model / "executions.log"
    if not log.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, log.read_text().splitlines())}


def wait_for(repo: Path, model: str, rid: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = executions(repo, model).get(rid)
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError(f"request {rid!r} never reached {model}: {executions(repo, model)}")


def inputs(wait_ms: int, batched: bool = False, module=grpcclient) -> list:
    x = np.array([[wait_ms]] if batched else [wait_ms], np.int32)
    t = module.InferInput("INPUT0", list(x.shape), "INT32")
    t.set_data_from_numpy(x)
    return [t]


def canceled_failures(srv, model: str) -> int:
    """Triton's ``nv_inference_request_failure{reason="CANCELED"}`` for ``model``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_request_failure{") and f'model="{model}"' in line \
                and 'reason="CANCELED"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def hold(srv, model: str, rid: str, wait_ms: int, batched: bool = False) -> threading.Thread:
    """A request that keeps the instance busy for ``wait_ms``, from a thread."""
    def run():
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            client.infer(model, inputs(wait_ms, batched), request_id=rid)
        finally:
            client.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def served_after(srv, model: str, batched: bool = False) -> None:
    """The instance is not stuck: a fresh request is answered, uncancelled."""
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        result = client.infer(model, inputs(0, batched), client_timeout=10)
        assert result.as_numpy("OUTPUT0").reshape(-1).tolist() == [0]
    finally:
        client.close()


def deadline_exceeded(srv, model: str, rid: str, wait_ms: int, timeout: float, batched: bool = False) -> None:
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, inputs(wait_ms, batched), request_id=rid, client_timeout=timeout)
        assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()


# -- queued requests are never executed --------------------------------------------------------------------
def test_a_queued_request_past_its_deadline_never_reaches_the_model(srv, repo):
    before = canceled_failures(srv, "cancel_probe")
    first = hold(srv, "cancel_probe", "q-hold", 1500)
    time.sleep(0.3)
    second = hold(srv, "cancel_probe", "q-ring", 0)  # waits in the worker's ring (pipeline depth 2)
    time.sleep(0.2)
    deadline_exceeded(srv, "cancel_probe", "q-gone", 0, 0.3)  # waits in the scheduler's queue
    first.join(10)
    second.join(10)
    seen = executions(repo, "cancel_probe")
    assert "q-hold" in seen and "q-ring" in seen
    assert "q-gone" not in seen
    assert canceled_failures(srv, "cancel_probe") == before + 1
    served_after(srv, "cancel_probe")
    assert "q-gone" not in executions(repo, "cancel_probe")


def test_a_request_cancelled_in_the_workers_ring_never_reaches_the_model(srv, repo):
    """Sent to the worker while it executes another, then cancelled: the worker answers it
    CANCELLED without calling execute (its flag was raised before execute began)."""
    before = canceled_failures(srv, "cancel_probe")
    first = hold(srv, "cancel_probe", "r-hold", 1200)
    time.sleep(0.3)
    deadline_exceeded(srv, "cancel_probe", "r-gone", 0, 0.3)
    first.join(10)
    served_after(srv, "cancel_probe")
    assert "r-hold" in executions(repo, "cancel_probe")
    assert "r-gone" not in executions(repo, "cancel_probe")
    assert canceled_failures(srv, "cancel_probe") == before + 1


def test_the_dynamic_batcher_drops_a_cancelled_queued_request(srv, repo):
    before = canceled_failures(srv, "cancel_batched")
    first = hold(srv, "cancel_batched", "b-hold", 1200, batched=True)
    time.sleep(0.3)
    deadline_exceeded(srv, "cancel_batched", "b-gone", 0, 0.3, batched=True)
    first.join(10)
    served_after(srv, "cancel_batched", batched=True)
    assert "b-hold" in executions(repo, "cancel_batched")
    assert "b-gone" not in executions(repo, "cancel_batched")
    assert canceled_failures(srv, "cancel_batched") == before + 1


# -- executing requests see is_cancelled() -------------------------------------------------------------------
def test_an_executing_request_sees_is_cancelled_after_its_deadline(srv, repo):
    started = time.monotonic()
    deadline_exceeded(srv, "cancel_probe", "x-deadline", 20000, 0.5)
    record = wait_for(repo, "cancel_probe", "x-deadline")
    assert record["cancelled"] is True
    assert record["ms"] < 5000, record  # it stopped early, long before its 20 s
    assert time.monotonic() - started < 8
    served_after(srv, "cancel_probe")


def test_an_ensemble_request_cancelled_cancels_its_running_step(srv, repo):
    """Triton's test_ensemble_scheduler_request_cancellation: the step's model sees the cancellation."""
    before = canceled_failures(srv, "cancel_ensemble")
    deadline_exceeded(srv, "cancel_ensemble", "e-run", 20000, 0.5)
    record = wait_for(repo, "cancel_probe", "e-run")
    assert record["cancelled"] is True and record["ms"] < 5000, record
    deadline = time.monotonic() + 5
    while canceled_failures(srv, "cancel_ensemble") != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert canceled_failures(srv, "cancel_ensemble") == before + 1
    served_after(srv, "cancel_ensemble")


def test_an_aio_task_cancelled_cancels_the_request_in_the_model(srv, repo):
    async def main():
        client = aioclient.InferenceServerClient(srv.grpc_url)
        try:
            task = asyncio.ensure_future(client.infer("cancel_probe", inputs(20000, module=aioclient),
                                                      request_id="x-aio"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await client.close()

    asyncio.run(main())
    record = wait_for(repo, "cancel_probe", "x-aio")
    assert record["cancelled"] is True and record["ms"] < 5000, record
    served_after(srv, "cancel_probe")


def test_stop_stream_with_cancel_requests_reaches_the_executing_request(srv, repo):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)))
    client.async_stream_infer("cancel_probe", inputs(20000), request_id="s-run")
    client.async_stream_infer("cancel_probe", inputs(0), request_id="s-queued")  # in the ring behind it
    time.sleep(0.5)
    client.stop_stream(cancel_requests=True)
    client.close()
    record = wait_for(repo, "cancel_probe", "s-run")
    assert record["cancelled"] is True and record["ms"] < 5000, record
    served_after(srv, "cancel_probe")
    assert "s-queued" not in executions(repo, "cancel_probe")


def test_a_decoupled_model_sees_its_response_sender_cancelled(srv, repo):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)))
    client.async_stream_infer("cancel_decoupled", inputs(20000), request_id="d-run")
    result, error = results.get(timeout=10)  # it is executing: responses flow
    assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()
    record = wait_for(repo, "cancel_decoupled", "d-run")
    assert record["cancelled"] is True and record["ms"] < 5000, record

    # The instance is free again: a new stream's request runs to its end, uncancelled.
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    client.start_stream(lambda result, error: results.put((result, error)))
    client.async_stream_infer("cancel_decoupled", inputs(120), request_id="d-next")
    record = wait_for(repo, "cancel_decoupled", "d-next")
    client.stop_stream()
    client.close()
    assert record["cancelled"] is False, record


def test_uncancelled_requests_never_see_is_cancelled(srv, repo):
    """Flags are reused: a request sent after cancelled ones starts with its flag lowered."""
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        for i in range(20):
            result = client.infer("cancel_probe", inputs(1), request_id=f"u-{i}")
            assert result.as_numpy("OUTPUT0").tolist() == [0]
    finally:
        client.close()
    seen = executions(repo, "cancel_probe")
    assert all(seen[f"u-{i}"]["cancelled"] is False for i in range(20))


def test_an_http_connection_reset_cancels_its_request(srv, repo):
    """Newer Triton's http_cancellation_test: a client gone cancels its inference. Here a reset
    connection does; a plain close (FIN) reads as HTTP/1.1's half-close, which still gets its answer."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    body = json.dumps({"id": "h-gone", "inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32",
                                                   "data": [20000]}]})
    conn.request("POST", "/v2/models/cancel_probe/infer", body=body, headers={"Content-Type": "application/json"})
    time.sleep(0.5)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    conn.close()
    record = wait_for(repo, "cancel_probe", "h-gone")
    assert record["cancelled"] is True and record["ms"] < 5000, record
    served_after(srv, "cancel_probe")


# -- the in-process API -------------------------------------------------------------------------------------
def test_in_process_callers_cancelling_their_task_cancel_the_request(repo):
    """``Model.async_infer`` from a task on the server's loop and from another thread's loop:
    cancelling the caller's task reaches the model."""
    from kernel.api import Server

    with Server(model_repository=repo) as server:
        model = server.model("cancel_probe")
        x = {"INPUT0": np.array([20000], np.int32)}

        async def from_another_loop():
            task = asyncio.ensure_future(model.async_infer(x, request_id="api-thread"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(from_another_loop())
        record = wait_for(repo, "cancel_probe", "api-thread")
        assert record["cancelled"] is True and record["ms"] < 5000, record
        assert model.infer({"INPUT0": np.array([0], np.int32)})["OUTPUT0"].tolist() == [0]

    async def on_the_loop():
        async with Server(model_repository=repo) as server:
            model = server.model("cancel_probe")
            task = asyncio.ensure_future(model.async_infer(x, request_id="api-loop"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            record = await asyncio.to_thread(wait_for, repo, "cancel_probe", "api-loop")
            assert record["cancelled"] is True and record["ms"] < 5000, record

    asyncio.run(on_the_loop())
