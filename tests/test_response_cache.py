"""Triton's response cache (``--cache-config local,size=N``, ``response_cache { enable: true }``), through
tritonclient over HTTP and gRPC. The models append a line to a file per execution, so a hit that ran the
model anyway would show."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, python_model, serving

COUNTING = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.log = os.path.join(os.path.dirname(__file__), "..", "executions")

    def execute(self, requests):
        responses = []
        for request in requests:
            with open(self.log, "a") as f:
                f.write("x\\n")
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if x.size and x.flat[0] < 0:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative input")))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
        return responses
'''

BLS = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            called = pb_utils.InferenceRequest(model_name="cached", requested_output_names=["OUTPUT0"],
                                               inputs=[pb_utils.Tensor("INPUT0", x.as_numpy())]).exec()
            if called.has_error():
                raise pb_utils.TritonModelException(called.error().message())
            out = pb_utils.get_output_tensor_by_name(called, "OUTPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", out + 1)]))
        return responses
'''

IO = ('input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
      'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]\n')
CACHE = "response_cache { enable: true }\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cache_repo")
    python_model(repo, "cached", COUNTING, IO + CACHE)
    python_model(repo, "plain", COUNTING, IO)
    python_model(repo, "bls_caller", BLS, IO)
    python_model(repo, "cached_dec", COUNTING, IO + CACHE + "model_transaction_policy { decoupled: true }\n")
    python_model(repo, "cached_seq", COUNTING, "max_batch_size: 4\n" + IO + CACHE + "sequence_batching { }\n")
    ensemble = ('platform: "ensemble"\n' + IO + CACHE + 'ensemble_scheduling { step [ { model_name: "plain" '
                'model_version: -1 input_map { key: "INPUT0" value: "INPUT0" } '
                'output_map { key: "OUTPUT0" value: "OUTPUT0" } } ] }\n')
    (repo / "cached_ensemble" / "1").mkdir(parents=True)
    (repo / "cached_ensemble" / "config.pbtxt").write_text(ensemble)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    # 600 bytes: a few 16-float responses fit, a 256-float one never does
    yield from serving(repo, tmp_path_factory.mktemp("cache_log"), "--cache-config", "local,size=600",
                       "--model-control-mode", "explicit", "--load-model", "cached", "--load-model", "plain",
                       "--load-model", "bls_caller", "--load-model", "cached_ensemble")


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def executions(repo: Path, model: str) -> int:
    path = repo / model / "executions"
    return len(path.read_text().splitlines()) if path.exists() else 0


def infer(client, model: str, x: np.ndarray, **kw):
    mod = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw)


def stats(client, model: str) -> dict:
    if isinstance(client, grpcclient.InferenceServerClient):
        return client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return client.get_inference_statistics(model)["model_stats"][0]


def count(s: dict, key: str) -> int:
    return int(s["inference_stats"].get(key, {}).get("count", 0))


def ns(s: dict, key: str) -> int:
    return int(s["inference_stats"].get(key, {}).get("ns", 0))


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_hit_answers_without_the_model(proto: str, request: pytest.FixtureRequest, repo: Path) -> None:
    client = request.getfixturevalue(proto)
    x = np.arange(16, dtype=np.float32) + (100 if proto == "grpc" else 200)
    before_runs, before = executions(repo, "cached"), stats(client, "cached")
    first = infer(client, "cached", x).as_numpy("OUTPUT0")
    miss = stats(client, "cached")
    second = infer(client, "cached", x, request_id="again").as_numpy("OUTPUT0")
    hit = stats(client, "cached")
    np.testing.assert_array_equal(first, x * 2)
    np.testing.assert_array_equal(second, x * 2)
    assert executions(repo, "cached") == before_runs + 1
    # the miss: an ordinary execution, plus cache_miss
    assert count(miss, "cache_miss") == count(before, "cache_miss") + 1
    assert ns(miss, "cache_miss") > ns(before, "cache_miss")
    assert count(miss, "cache_hit") == count(before, "cache_hit")
    # the hit: a success with queue time and cache_hit, no compute, no inference or execution
    assert count(hit, "cache_hit") == count(miss, "cache_hit") + 1
    assert ns(hit, "cache_hit") > ns(miss, "cache_hit")
    assert count(hit, "cache_miss") == count(miss, "cache_miss")
    assert count(hit, "success") == count(miss, "success") + 1
    assert count(hit, "queue") == count(miss, "queue") + 1
    assert count(hit, "compute_infer") == count(miss, "compute_infer")
    assert int(hit["inference_count"]) == int(miss["inference_count"])
    assert int(hit["execution_count"]) == int(miss["execution_count"])


def test_different_input_misses(http, repo: Path) -> None:
    x = np.full(16, 7, dtype=np.float32)
    runs = executions(repo, "cached")
    infer(http, "cached", x)
    y = infer(http, "cached", x + 1).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(y, (x + 1) * 2)
    assert executions(repo, "cached") == runs + 2


def test_same_bytes_any_encoding(http, repo: Path) -> None:
    """The key is the tensor's bytes: JSON, binary and a client's shm region hit the same entry."""
    x = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    infer(http, "cached", x)
    runs = executions(repo, "cached")
    inp = httpclient.InferInput("INPUT0", [3], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    np.testing.assert_array_equal(http.infer("cached", [inp]).as_numpy("OUTPUT0"), x * 2)
    key = f"/cache_in_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("cache_in", key, 16)
    try:
        shm.set_shared_memory_region(handle, [x])
        http.register_system_shared_memory("cache_in", key, 16)
        inp = httpclient.InferInput("INPUT0", [3], "FP32")
        inp.set_shared_memory("cache_in", 12)
        np.testing.assert_array_equal(http.infer("cached", [inp]).as_numpy("OUTPUT0"), x * 2)
        http.unregister_system_shared_memory("cache_in")
    finally:
        shm.destroy_shared_memory_region(handle)
    assert executions(repo, "cached") == runs


def test_eviction_and_oversized(http, repo: Path) -> None:
    base = np.arange(16, dtype=np.float32) + 1000
    for i in range(5):  # each entry takes ~120 of the 600 bytes: five fill the cache
        infer(http, "cached", base + i)
    runs = executions(repo, "cached")
    infer(http, "cached", base)  # a hit makes the oldest the most recently used...
    infer(http, "cached", base + 5)  # ...so this insertion evicts the second oldest
    assert executions(repo, "cached") == runs + 1
    infer(http, "cached", base)
    assert executions(repo, "cached") == runs + 1
    infer(http, "cached", base + 1)
    assert executions(repo, "cached") == runs + 2
    runs = executions(repo, "cached")
    big = np.arange(256, dtype=np.float32)  # larger than the whole cache: answered, never cached
    before = stats(http, "cached")
    infer(http, "cached", big)
    infer(http, "cached", big)
    assert executions(repo, "cached") == runs + 2
    assert count(stats(http, "cached"), "cache_miss") == count(before, "cache_miss") + 2


def test_error_response_not_cached(http, repo: Path) -> None:
    runs = executions(repo, "cached")
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="negative input"):
            infer(http, "cached", np.array([-1, 5], dtype=np.float32))
    assert executions(repo, "cached") == runs + 2


def test_hit_into_client_shm(http, repo: Path) -> None:
    key = f"/cache_out_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("cache_out", key, 64)
    try:
        http.register_system_shared_memory("cache_out", key, 64)
        x = np.arange(16, dtype=np.float32) + 500
        infer(http, "cached", x)  # cached from an ordinary response
        runs = executions(repo, "cached")
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        out.set_shared_memory("cache_out", 64)
        result = infer(http, "cached", x, outputs=[out])
        assert executions(repo, "cached") == runs
        assert result.get_output("OUTPUT0")["shape"] == [16]
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [16]), x * 2)
        # a miss written into the region is cached too, and answered as an ordinary response later
        y = x + 1
        infer(http, "cached", y, outputs=[out])
        np.testing.assert_array_equal(infer(http, "cached", y).as_numpy("OUTPUT0"), y * 2)
        assert executions(repo, "cached") == runs + 1
        http.unregister_system_shared_memory("cache_out")
    finally:
        shm.destroy_shared_memory_region(handle)


def test_bls_call_hits(grpc, repo: Path) -> None:
    """A BLS call answered from the cache: the calling model gets the bytes (in the front's arena)."""
    x = np.arange(16, dtype=np.float32) + 700
    runs = executions(repo, "cached")
    for _ in range(2):
        np.testing.assert_array_equal(infer(grpc, "bls_caller", x).as_numpy("OUTPUT0"), x * 2 + 1)
    assert executions(repo, "cached") == runs + 1
    np.testing.assert_array_equal(infer(grpc, "cached", x).as_numpy("OUTPUT0"), x * 2)  # from a BLS miss
    assert executions(repo, "cached") == runs + 1


def test_model_without_cache_unaffected(grpc, repo: Path) -> None:
    x = np.arange(16, dtype=np.float32)
    runs = executions(repo, "plain")
    for _ in range(2):
        np.testing.assert_array_equal(infer(grpc, "plain", x).as_numpy("OUTPUT0"), x * 2)
    assert executions(repo, "plain") == runs + 2
    s = stats(grpc, "plain")
    assert count(s, "cache_hit") == 0 and count(s, "cache_miss") == 0


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics(server, http) -> None:
    before = scrape(server.metrics_port)
    x = np.arange(4, dtype=np.float32) + 12345
    infer(http, "cached", x)  # a miss, inserted
    infer(http, "cached", x)  # a hit
    after = scrape(server.metrics_port)
    model = '{model="cached",version="1"}'
    assert after[f"nv_cache_num_hits_per_model{model}"] == before[f"nv_cache_num_hits_per_model{model}"] + 1
    assert after[f"nv_cache_num_misses_per_model{model}"] == before[f"nv_cache_num_misses_per_model{model}"] + 1
    assert not any(name.startswith('nv_cache_num_hits_per_model{model="plain"') for name in after)
    # server-wide, as Triton names them (and counting, where Triton 2.51 leaves them at 0)
    for name in ("nv_cache_num_lookups", "nv_cache_num_hits", "nv_cache_num_misses"):
        assert after[name] == before[name] + (2 if name == "nv_cache_num_lookups" else 1), name
    assert after["nv_cache_num_entries"] >= 1 and after["nv_cache_num_evictions"] >= before["nv_cache_num_evictions"]
    assert 0 < after["nv_cache_util"] <= 1
    assert after["nv_cache_lookup_duration"] >= before["nv_cache_lookup_duration"]
    assert after["nv_cache_insertion_duration"] >= before["nv_cache_insertion_duration"]


@pytest.mark.parametrize("model, message", [
    ("cached_dec", "Response Cache does not currently support model cached_dec with 'decoupled' transaction "
                   "policy. Please disable the response cache."),
    ("cached_seq", "Response Cache does not currently support model cached_seq with sequence batching "
                   "scheduler. Please disable the response cache."),
])
def test_refused_at_load(http, server, model: str, message: str) -> None:
    with pytest.raises(InferenceServerException, match=f"failed to load '{model}', failed to poll"):
        http.load_model(model)
    assert message in server.log()
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert "state" not in index[model] or index[model]["state"] != "READY"


def test_server_without_cache(repo: Path, tmp_path: Path) -> None:
    """Triton loads the model and does not cache (no error, no warning); the statistics stay at zero."""
    gen = serving(repo, tmp_path, "--model-control-mode", "explicit", "--load-model", "cached")
    srv = next(gen)
    try:
        client = httpclient.InferenceServerClient(srv.http_url)
        x = np.arange(16, dtype=np.float32) + 9000
        runs = executions(repo, "cached")
        for _ in range(2):
            np.testing.assert_array_equal(infer(client, "cached", x).as_numpy("OUTPUT0"), x * 2)
        assert executions(repo, "cached") == runs + 2
        s = stats(client, "cached")
        assert count(s, "cache_hit") == 0 and count(s, "cache_miss") == 0
        assert "nv_cache_num_lookups" not in scrape(srv.metrics_port)  # no server cache, no server-wide families
        client.close()
    finally:
        next(gen, None)


@pytest.mark.parametrize("args, message", [
    (["--cache-config", "local"], "No cache specified. --cache-config option format is"),
    (["--cache-config", "local,size"], "--cache-config option format is '<cache name>,<setting>=<value>'"),
    (["--cache-config", "local,size=abc"], "Failed to initialize LocalCache: 'size' must be a positive number"),
    (["--cache-config", "local,foo=1"], "config didn't contain a valid 'size' field"),
    (["--cache-config", "redis,host=x"], "unknown cache 'redis'"),
    (["--cache-config", "local,size=10", "--cache-config", "redis,host=x"], "found multiple cache configurations"),
    (["--cache-config", "local,size=10", "--response-cache-byte-size", "10"], "Incompatible flags"),
])
def test_bad_cache_config(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kernel", "start", "--model-repository", str(tmp_path),
                           "--http-port", "-1", "--grpc-port", "-1", "--metrics-port", "-1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_an_ensemble_caches_its_response(http, repo: Path) -> None:
    """Triton caches an ensemble's top-level response: a hit runs none of its steps."""
    x = np.arange(16, dtype=np.float32) + 700
    runs, before = executions(repo, "plain"), stats(http, "cached_ensemble")
    first = infer(http, "cached_ensemble", x).as_numpy("OUTPUT0")
    second = infer(http, "cached_ensemble", x).as_numpy("OUTPUT0")
    after = stats(http, "cached_ensemble")
    np.testing.assert_array_equal(first, x * 2)
    np.testing.assert_array_equal(second, x * 2)
    assert executions(repo, "plain") == runs + 1
    assert count(after, "cache_miss") == count(before, "cache_miss") + 1
    assert count(after, "cache_hit") == count(before, "cache_hit") + 1
    assert count(after, "success") == count(before, "success") + 2
    assert int(after["execution_count"]) == int(before["execution_count"]) + 1


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_classification_is_served_from_the_raw_entry(proto: str, request: pytest.FixtureRequest, repo: Path) -> None:
    """As Triton's: the entry holds the model's raw outputs, and classification is applied to a hit's as to a
    model's, so classified and plain requests of one input share the entry (observed on the reference)."""
    client = request.getfixturevalue(proto)
    mod = grpcclient if proto == "grpc" else httpclient
    x = np.array([3, 9, 1, 7], dtype=np.float32) + (1000 if proto == "grpc" else 2000)
    runs, before = executions(repo, "cached"), stats(client, "cached")

    def labels(k: int) -> list:
        out = mod.InferRequestedOutput("OUTPUT0", class_count=k)
        return [v.decode() for v in infer(client, "cached", x, outputs=[out]).as_numpy("OUTPUT0")]

    top = lambda k: [f"{v:f}:{i}" for i, v in sorted(enumerate(x * 2), key=lambda e: -e[1])[:k]]  # noqa: E731
    assert labels(2) == top(2)  # a miss: the model runs
    np.testing.assert_array_equal(infer(client, "cached", x).as_numpy("OUTPUT0"), x * 2)  # a hit, raw
    assert labels(3) == top(3)  # a hit, classified
    after = stats(client, "cached")
    assert executions(repo, "cached") == runs + 1
    assert (count(after, "cache_miss") - count(before, "cache_miss"), count(after, "cache_hit")
            - count(before, "cache_hit")) == (1, 2)
