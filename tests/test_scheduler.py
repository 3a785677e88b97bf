"""Scheduling, observed through the model itself (tests/templates/probe_model.py).

Every probe reports, per request, how many requests its ``execute`` call received
(BATCH), the wall-clock window of that call (STARTED/ENDED) and its worker's PID.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import KernelServer


def probe_inputs(value: float = 0.0, batched: bool = True, width: int = 1):
    x = np.full((1, width) if batched else (width,), value, np.float32)
    t = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return [t]


def probe(result) -> dict:
    out = {k: int(result.as_numpy(k).reshape(-1)[0]) for k in ("BATCH", "STARTED", "ENDED", "PID")}
    out["OUTPUT0"] = result.as_numpy("OUTPUT0")
    return out


class Concurrent:
    """Sends requests from threads, optionally staggered, and records completion order and times."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: dict[int, object] = {}
        self.done_at: dict[int, int] = {}
        self.threads: list[threading.Thread] = []

    def send(self, key: int, model: str, inputs, **kwargs) -> None:
        def run():
            client = httpclient.InferenceServerClient(self.url, network_timeout=60)
            try:
                self.results[key] = client.infer(model, inputs, **kwargs)
            except InferenceServerException as e:
                self.results[key] = e
            finally:
                self.done_at[key] = time.time_ns()  # the clock of the probes' STARTED/ENDED
                client.close()

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def wait(self) -> dict:
        for thread in self.threads:
            thread.join(60)
        return self.results


def test_concurrent_requests_coalesce_up_to_max_batch_size(server):
    c = Concurrent(server.http_url)
    for i in range(6):
        c.send(i, "batch_max4", probe_inputs(i))
    results = {k: probe(r) for k, r in c.wait().items()}
    batches = sorted({(r["STARTED"], r["BATCH"]) for r in results.values()})
    sizes = [size for _, size in batches]
    assert max(sizes) == 4, sizes  # coalesced, and never beyond max_batch_size
    assert sum(sizes) == 6
    for i, r in results.items():
        np.testing.assert_array_equal(r["OUTPUT0"], [[i]])  # each request got its own rows back


def test_a_batch_is_stacked_in_one_block(server):
    """The inputs of one batch are copied once, back to back: one tensor the requests slice."""
    c = Concurrent(server.http_url)
    for i in range(4):
        c.send(i, "batch_max4", probe_inputs(i, width=3))
    results = c.wait()
    started = {int(r.as_numpy("STARTED")[0, 0]) for r in results.values()}
    assert len(started) == 1 and int(results[0].as_numpy("BATCH")[0, 0]) == 4  # one batch of all four
    addresses = sorted(int(r.as_numpy("ADDR")[0, 0]) for r in results.values())
    row = 3 * 4  # one request's INPUT0: 3 FP32 values
    assert [a - addresses[0] for a in addresses] == [0, row, 2 * row, 3 * row]


def test_preferred_batch_size_is_preferred(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_pref", probe_inputs(0))  # a preferred batch of 2 that occupies the instance for 300 ms
    c.send(1, "batch_pref", probe_inputs(1))
    time.sleep(0.1)
    for i in range(2, 7):
        c.send(i, "batch_pref", probe_inputs(i))
    results = {k: probe(r) for k, r in c.wait().items()}
    sizes = {r["STARTED"]: r["BATCH"] for r in results.values()}
    later = [size for started, size in sorted(sizes.items())][1:]
    # 5 requests were queued behind the first: the batcher sends the preferred size 2 at once
    # (twice) rather than one batch of 5; the last one waits for the delay and goes alone.
    assert later == [2, 2, 1], sorted(sizes.items())


def test_max_queue_delay_bounds_the_wait(http):
    started = time.monotonic()
    result = probe(http.infer("batch_delay", probe_inputs(1)))
    waited = time.monotonic() - started
    assert result["BATCH"] == 1
    assert 0.3 <= waited < 2.0, waited  # waited the 300 ms delay for company, then went alone
    started = time.monotonic()
    http.infer("batch_nodelay", probe_inputs(1))
    assert time.monotonic() - started < 0.3


def test_priorities_reorder(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_prio", probe_inputs(400))  # executing while the others queue
    time.sleep(0.15)
    for i in (1, 2, 3):
        c.send(i, "batch_prio", probe_inputs(50), priority=2)
    time.sleep(0.1)
    c.send(4, "batch_prio", probe_inputs(50), priority=1)
    results = {k: probe(r) for k, r in c.wait().items()}
    low = [results[i]["STARTED"] for i in (1, 2, 3)]
    assert results[4]["STARTED"] < min(low), "the priority 1 request did not jump the queue"
    assert results[0]["STARTED"] < results[4]["STARTED"]


def test_queue_timeout_rejects(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_reject", probe_inputs(400))
    time.sleep(0.15)
    c.send(1, "batch_reject", probe_inputs(1))  # its 100 ms queue timeout passes while 0 executes
    results = c.wait()
    assert probe(results[0])["BATCH"] == 1
    error = results[1]
    assert isinstance(error, InferenceServerException)
    assert error.message() == "Request timeout expired"
    assert error.status() == "503"


def test_queue_timeout_delays(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_delayed", probe_inputs(400))
    time.sleep(0.15)
    c.send(1, "batch_delayed", probe_inputs(10), timeout=50_000)  # expires in the queue: delayed
    time.sleep(0.1)
    c.send(2, "batch_delayed", probe_inputs(10))
    c.send(3, "batch_delayed", probe_inputs(10))
    results = {k: probe(r) for k, r in c.wait().items()}  # every request succeeds
    assert results[1]["STARTED"] > max(results[2]["STARTED"], results[3]["STARTED"])


def test_full_queue_rejects(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_qsize", probe_inputs(500))
    time.sleep(0.15)
    c.send(1, "batch_qsize", probe_inputs(10))
    c.send(2, "batch_qsize", probe_inputs(10))
    time.sleep(0.15)
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as e:
        client.infer("batch_qsize", probe_inputs(10))
    assert e.value.message() == "[request id: <id_unknown>] Exceeds maximum queue size"
    assert e.value.status() == "503"
    client.close()
    assert all(not isinstance(r, Exception) for r in c.wait().values())


@pytest.mark.parametrize("model,ordered", [("batch_ordered", True), ("batch_unordered", False)])
def test_preserve_ordering(server, model, ordered):
    c = Concurrent(server.http_url)
    c.send(0, model, probe_inputs(500))  # slow, on one instance
    time.sleep(0.15)
    c.send(1, model, probe_inputs(10))  # fast, on the other instance
    results = {k: probe(r) for k, r in c.wait().items()}
    assert results[0]["PID"] != results[1]["PID"]
    assert results[1]["ENDED"] < results[0]["ENDED"]  # executed out of order either way
    # Request 1 ended ~330 ms before request 0: its response may only arrive after 0 ended when ordered.
    if ordered:
        assert c.done_at[1] >= results[0]["ENDED"], "response 1 overtook response 0"
    else:
        assert c.done_at[1] < results[0]["ENDED"]


def overlap(a: dict, b: dict) -> bool:
    return a["STARTED"] < b["ENDED"] and b["STARTED"] < a["ENDED"]


def test_two_instances_execute_at_the_same_time(server):
    c = Concurrent(server.http_url)
    c.send(0, "two_instances", probe_inputs(batched=False))
    c.send(1, "two_instances", probe_inputs(batched=False))
    a, b = (probe(r) for r in c.wait().values())
    assert a["PID"] != b["PID"]
    assert overlap(a, b), (a, b)


def test_two_models_execute_at_the_same_time(server):
    c = Concurrent(server.http_url)
    c.send(0, "slow_a", probe_inputs(batched=False))
    c.send(1, "slow_b", probe_inputs(batched=False))
    results = c.wait()
    assert overlap(probe(results[0]), probe(results[1]))


def test_different_shapes_are_not_batched_together(server):
    c = Concurrent(server.http_url)
    c.send(0, "batch_max4", probe_inputs(0, width=3))
    c.send(1, "batch_max4", probe_inputs(0, width=3))
    c.send(2, "batch_max4", probe_inputs(0, width=5))
    c.send(3, "batch_max4", probe_inputs(0, width=5))
    results = {k: probe(r) for k, r in c.wait().items()}
    by_start: dict[int, set] = {}
    for key, r in results.items():
        by_start.setdefault(r["STARTED"], set()).add(3 if key < 2 else 5)
    assert all(len(widths) == 1 for widths in by_start.values()), by_start


def test_statistics_match_count_for_count(server, http):
    c = Concurrent(server.http_url)
    for i in range(4):
        c.send(i, "batch_stats", probe_inputs(i))
    c.wait()
    c = Concurrent(server.http_url)
    c.send(9, "batch_stats", probe_inputs(9))  # alone: waits out the delay, batch of 1
    c.wait()
    with pytest.raises(InferenceServerException):
        http.infer("batch_stats", probe_inputs(0, batched=False))  # rejected by validation: not counted
    stats = http.get_inference_statistics("batch_stats")["model_stats"]
    assert len(stats) == 1
    s = stats[0]
    assert (s["name"], s["version"]) == ("batch_stats", "1")
    assert s["inference_count"] == 5
    assert s["execution_count"] == 2
    inference = s["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == 5, key
    assert inference["fail"]["count"] == 0
    assert inference["queue"]["ns"] >= 1_000_000_000  # the lone request waited out the 1 s delay
    assert inference["success"]["ns"] >= inference["queue"]["ns"]
    batch = {b["batch_size"]: b for b in s["batch_stats"]}
    assert sorted(batch) == [1, 4]
    assert batch[4]["compute_infer"]["count"] == 1 and batch[1]["compute_infer"]["count"] == 1
    assert s["last_inference"] > 0
    everything = http.get_inference_statistics()["model_stats"]
    assert any(m["name"] == "batch_stats" for m in everything)
    with pytest.raises(InferenceServerException) as e:
        http.get_inference_statistics("nope")
    assert e.value.message() == "requested model 'nope' is not available"
    with pytest.raises(InferenceServerException) as e:
        http.get_inference_statistics("batch_stats", "3")
    assert e.value.message() == "requested model version is not available for model 'batch_stats'"


def test_ragged_batching_is_refused_clearly(http):
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["ragged"]["state"] == "UNAVAILABLE"
    assert "ragged batching is not supported" in index["ragged"]["reason"]


def test_gpu_instances_get_their_device_and_dla(tmp_path, repository):
    # No GPU on the test machines: EDGE_KERNEL_GPU_COUNT stands in for two detected GPUs.
    server = KernelServer(repository, "--model-control-mode=explicit", "--load-model=gpu_probe",
                          env={"EDGE_KERNEL_GPU_COUNT": "2"}).start(tmp_path / "log")
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        config = client.get_model_config("gpu_probe")
        assert config["instance_group"][0]["kind"] == "KIND_GPU"
        seen = {}
        c = Concurrent(server.http_url)
        for i in range(8):
            c.send(i, "gpu_probe", probe_inputs(batched=False))
        for result in c.wait().values():
            args = json.loads(result.as_numpy("ARGS").reshape(-1)[0])
            seen[args["model_instance_name"]] = args
        assert set(seen) <= {"gpu_probe_0_0", "gpu_probe_0_1"}
        for args in seen.values():
            assert args["model_instance_kind"] == "GPU"
            assert json.loads(args["model_instance_secondary_devices"]) == [{"kind": "KIND_NVDLA", "device_id": 1}]
        devices = {a["model_instance_name"]: a["model_instance_device_id"] for a in seen.values()}
        assert devices.get("gpu_probe_0_0", "0") == "0" and devices.get("gpu_probe_0_1", "1") == "1"
    finally:
        client.close()
        assert server.stop() == 0


@pytest.mark.parametrize("expect_ms, held", [(3, True), (8, False)])
def test_front_polls_as_long_as_answers_usually_take_within_the_hold(expect_ms, held):
    """After a send, the front polls for 0.1 ms, or for an answer's usual wait if under the hold (5 ms)."""
    from kernel.instance import Spinner

    polls: list[int] = []

    class Instance:
        def _receive(self) -> None:
            polls.append(time.perf_counter_ns())

    async def main() -> int:
        spinner = Spinner(window_us=100, hold_us=5000)
        spinner.busy.add(Instance())
        start = time.perf_counter_ns()
        spinner.kick(expect_ms * 1_000_000)
        await asyncio.sleep(0.012)
        return start

    start = asyncio.run(main())
    late = [t for t in polls if t - start > 2_000_000]  # still polling 2 ms after the send
    if held:
        assert len(late) > 10 and max(polls) - start >= 3_000_000
    else:
        assert len(late) <= 1  # a turn begun before the window closed may finish late, once
