"""Prometheus metrics on the metrics port, with Triton's names and labels."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.test_http import add_sub_inputs


def scrape(server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.match(r"^(nv_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_inference_metrics_count_requests(server, http):
    key = '{model="error_response",version="1"}'
    before = scrape(server)
    a = np.arange(16, dtype=np.int32)
    for _ in range(3):
        http.infer("add_sub", add_sub_inputs(a, a))
    t = httpclient.InferInput("INPUT0", [2], "FP32")
    t.set_data_from_numpy(np.ones(2, np.float32))
    with pytest.raises(InferenceServerException):
        http.infer("raises", [t])
    after = scrape(server)
    add_sub = '{model="add_sub",version="1"}'
    assert after["nv_inference_request_success" + add_sub] - before.get("nv_inference_request_success" + add_sub,
                                                                        0) == 3
    assert after["nv_inference_count" + add_sub] - before.get("nv_inference_count" + add_sub, 0) == 3
    assert after["nv_inference_exec_count" + add_sub] - before.get("nv_inference_exec_count" + add_sub, 0) == 3
    backend = '{model="raises",reason="BACKEND",version="1"}'
    assert after["nv_inference_request_failure" + backend] - before.get("nv_inference_request_failure" + backend,
                                                                        0) == 1
    assert after["nv_inference_request_duration_us" + add_sub] > 0
    assert after["nv_inference_pending_request_count" + add_sub] == 0
    assert "nv_inference_queue_duration_us" + key in after
    assert after["nv_cpu_memory_total_bytes"] > 0


def test_pending_requests_are_those_not_started(server):
    """nv_inference_pending_request_count counts requests awaiting execution, as Triton's: queued, or sent to an
    instance behind the batch it executes, but not the one executing (shm_slow: 0.5 s each, one instance)."""
    key = 'nv_inference_pending_request_count{model="shm_slow",version="1"}'

    def call() -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        t = httpclient.InferInput("INPUT0", [1], "INT32")
        t.set_data_from_numpy(np.array([1], np.int32))
        client.infer("shm_slow", [t])
        client.close()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.25)  # one executes, three wait
    during = scrape(server)[key]
    for thread in threads:
        thread.join(10)
    assert during == 3
    assert scrape(server)[key] == 0
