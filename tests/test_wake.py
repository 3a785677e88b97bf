"""Workers woken while a request is read (ModelVersion.wake): a request for a model whose worker sleeps
tells that worker to poll for its batch before the request is parsed, so that the wake-up overlaps the
reading; a worker still polling after its last answer gets nothing; an ensemble wakes the workers of
its first steps."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.http as httpclient

from kernel.api import Server
from protocol.http.front import HttpFront
from tests.pipeline_models import _ensemble, _io, arith

SPIN_US = 300_000  # a worker polls this long after each message (long: the test's own pauses stay shorter)


def _repository(dest):
    arith(dest, "double", "y = (x * 2).astype(np.float32)", dims="4")
    arith(dest, "inc", "y = (x + 1).astype(np.float32)", dims="4")
    _ensemble(dest, "twice", _io([("INPUT", "FP32", "4")], [("OUTPUT", "FP32", "4")]),
              [("double", {"IN": "INPUT"}, {"OUT": "t"}), ("inc", {"IN": "t"}, {"OUT": "OUTPUT"})])
    return dest


def _serve(tmp_path, **backend_config):
    server = Server(_repository(tmp_path / "models"), backend_config={
        "python": {"worker-spin-us": str(SPIN_US)}, **backend_config})
    return server


def _infer(client, model, name):
    x = httpclient.InferInput(name, [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return client.infer(model, [x]).as_numpy("OUTPUT" if model == "twice" else "OUT")


def _with_http(server, body):
    http = HttpFront(server.core).server()
    asyncio.run_coroutine_threadsafe(http.start("127.0.0.1", 0), server._loop).result(10)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http.port}", network_timeout=60)
    try:
        body(client, lambda: server._call(lambda core: core.arrival_wakes))
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(http.close(1), server._loop).result(10)


def test_a_sleeping_worker_is_woken_as_its_request_arrives(tmp_path):
    def body(client, wakes):
        time.sleep(SPIN_US / 1e6 + 0.2)  # every worker sleeps now
        np.testing.assert_array_equal(_infer(client, "double", "IN"), np.arange(4) * 2)
        assert wakes() == 1
        np.testing.assert_array_equal(_infer(client, "double", "IN"), np.arange(4) * 2)
        assert wakes() == 1  # it answered just now: still polling, nothing sent
        time.sleep(SPIN_US / 1e6 + 0.2)
        _infer(client, "double", "IN")
        assert wakes() == 2
        np.testing.assert_array_equal(_infer(client, "twice", "INPUT"), np.arange(4) * 2 + 1)
        assert wakes() == 2  # double answered just now; inc is woken while double runs, not on arrival
        time.sleep(SPIN_US / 1e6 + 0.2)
        np.testing.assert_array_equal(_infer(client, "twice", "INPUT"), np.arange(4) * 2 + 1)
        assert wakes() == 3  # the first step's worker only

    with _serve(tmp_path) as server:
        _with_http(server, body)


def test_no_ensemble_wakes_with_prewake_off(tmp_path):
    def body(client, wakes):
        time.sleep(SPIN_US / 1e6 + 0.2)
        np.testing.assert_array_equal(_infer(client, "twice", "INPUT"), np.arange(4) * 2 + 1)
        assert wakes() == 0

    with _serve(tmp_path, ensemble={"prewake": "0"}) as server:
        _with_http(server, body)
