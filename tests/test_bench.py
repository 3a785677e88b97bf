"""bench: stability logic on synthetic windows, perf_analyzer CSV parsing, and small real runs against
``kernel start`` on the example repository (numbers, CSV/JSON/PNG, shared memory, clear errors)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from bench import perf_analyzer as pa
from bench.cli import parse_range
from bench.clients import ClientOptions
from bench.compare import SCENARIOS, Scenario, Target, median_pair, render, select, verdicts
from bench.inputs import BenchError, parse_shapes, resolve_inputs
from bench.profiler import Settings, run
from bench.stats import Window, is_stable, server_split, summarize
from tests.support import ROOT, KernelServer, free_port

EXAMPLES = ROOT / "examples" / "models"
QUICK = ["-p", "300", "-r", "4", "--warmup-request-count", "5"]


def window(throughput: float, p50_us: float, seconds: float = 1.0, **kw) -> Window:
    """A window of ``throughput * seconds`` requests, all of latency ``p50_us``."""
    count = round(throughput * seconds)
    return Window(0, int(seconds * 1e9), [int(p50_us * 1000)] * count, **kw)


# --------------------------------------------------------------------------- stability and merging

def test_stable_when_last_three_windows_agree():
    windows = [window(50, 900), window(100, 500), window(101, 510), window(99, 505)]
    assert is_stable(windows)
    assert not is_stable(windows[:2]), "fewer windows than the stability count are never stable"


def test_unstable_on_throughput_or_latency_spread():
    assert not is_stable([window(100, 500), window(100, 500), window(115, 500)])
    assert not is_stable([window(100, 500), window(100, 500), window(100, 600)])
    assert not is_stable([window(100, 500), window(0, 0), window(100, 500)]), "an empty window is not stable"
    # perf_analyzer's rule is max / min <= 1 + threshold: 10% apart is still stable, 11% is not.
    assert is_stable([window(100, 500), window(110, 550), window(105, 520)])
    assert not is_stable([window(100, 500), window(111, 500), window(105, 500)])
    assert is_stable([window(100, 500), window(125, 500), window(110, 500)], threshold=0.25)


def test_stability_on_the_chosen_latency():
    slow_tail = Window(0, 10**9, [500_000] * 95 + [50_000_000] * 5)
    steady = Window(0, 10**9, [500_000] * 100)
    assert is_stable([steady, slow_tail, steady], percentile=50)
    assert not is_stable([steady, slow_tail, steady], percentile=None), "the average sees the tail"


def test_summary_merges_windows_and_server_statistics():
    def stats(n: int, queue_ns: int, infer_ns: int) -> dict:
        phase = {"count": n, "ns": 0}
        return {"inference_count": n, "execution_count": n,
                "inference_stats": {"success": {"count": n, "ns": n * 100_000}, "queue": {"count": n, "ns": queue_ns},
                                    "compute_input": phase, "compute_infer": {"count": n, "ns": infer_ns},
                                    "compute_output": phase}}

    first = Window(0, 2 * 10**9, [1_000_000] * 100, batch_size=2, server_before=stats(10, 0, 0))
    second = Window(2 * 10**9, 3 * 10**9, [3_000_000] * 100, batch_size=2,
                    server_after=stats(210, 4_000_000, 20_000_000))
    summary = summarize([first, second])
    assert summary.requests == 200
    assert summary.throughput == pytest.approx(200 * 2 / 3)
    assert summary.latency_us["p50"] == pytest.approx(2000)
    assert summary.latency_us["avg"] == pytest.approx(2000)
    assert summary.latency_us["p99"] == pytest.approx(3000)
    server = summary.server
    assert server["success_count"] == 200 and server["inference_count"] == 200
    assert server["queue_us"] == pytest.approx(20) and server["compute_infer_us"] == pytest.approx(100)
    assert server["request_us"] == pytest.approx(100) and server["overhead_us"] == pytest.approx(0)


def test_server_split_of_grpc_json_strings():
    before = {"inference_stats": {"success": {}, "queue": {}}}  # gRPC as_json leaves zeros out
    after = {"inference_count": "4", "inference_stats": {"success": {"count": "4", "ns": "8000"},
                                                         "queue": {"count": "4", "ns": "4000"}}}
    split = server_split(before, after)
    assert split["request_us"] == pytest.approx(2) and split["queue_us"] == pytest.approx(1)
    assert split["compute_infer_us"] == 0 and split["inference_count"] == 4


# --------------------------------------------------------------------------- options and inputs

def test_ranges_and_shapes():
    assert parse_range("1:16:4") == [1, 5, 9, 13]
    assert parse_range("8") == [8]
    assert parse_range("100:300:100", float) == [100.0, 200.0, 300.0]
    assert parse_shapes(["IN:2,3", "ns:x:4"]) == {"IN": [2, 3], "ns:x": [4]}
    with pytest.raises(BenchError):
        parse_shapes(["IN"])


def test_inputs_from_metadata():
    meta = {"inputs": [{"name": "A", "datatype": "FP32", "shape": [-1, -1, 4]},
                       {"name": "B", "datatype": "INT32", "shape": [-1, 2]}]}
    specs = resolve_inputs(meta, 8, {"A": [3, 4]}, 5)
    assert [(s.name, s.shape) for s in specs] == [("A", [5, 3, 4]), ("B", [5, 2])]
    with pytest.raises(BenchError, match="--shape A"):
        resolve_inputs(meta, 8, {}, 1)
    with pytest.raises(BenchError, match="does not support batching"):
        resolve_inputs({"inputs": [{"name": "X", "datatype": "FP32", "shape": [4]}]}, 0, {}, 2)


# --------------------------------------------------------------------------- perf_analyzer driver

PA_CSV = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
          "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
          "request/response,response wait\n1,1993.08,51,395,9,16,10,12,0,447,565,602,1523,51,443\n")
PA_UNSTABLE = """Request concurrency: 16
  Pass [1] throughput: 321.5 infer/sec. p50 latency: 1846 usec
  Pass [2] throughput: 309.6 infer/sec. p50 latency: 2176 usec
  Pass [3] throughput: 475.8 infer/sec. p50 latency: 1735 usec
  Pass [4] throughput: 468.1 infer/sec. p50 latency: 1526 usec
Failed to obtain stable measurement within 4 measurement windows for concurrency 16. Please try to increase the
"""


def test_perf_analyzer_csv_and_passes():
    row = pa.normalize(pa.parse_csv(PA_CSV)[0])
    assert row["mode"] == "concurrency" and row["level"] == 1
    assert row["throughput"] == pytest.approx(1993.08)
    assert row["latency_us"] == {"p50": 447, "p90": 565, "p95": 602, "p99": 1523}
    assert row["server"]["queue_us"] == 9 and row["server"]["compute_infer_us"] == 10
    passes = pa.parse_passes(PA_UNSTABLE)
    assert len(passes) == 4 and passes[0] == {"throughput": 321.5, "p50": 1846}
    approx = pa.from_passes(passes, 3)
    assert approx["throughput"] == pytest.approx((309.6 + 475.8 + 468.1) / 3)
    assert approx["latency_us"] == {"p50": 1735}


def test_perf_analyzer_command_line():
    spec = pa.PerfAnalyzerRun(model="frame_stats", url="h:1", protocol="grpc", concurrency=4, shared_memory="system",
                              output_shm_size=4096, measurement_interval_ms=2000, shapes=["X:1"])
    cmd = spec.command("/pa", "/tmp/x.csv")
    text = " ".join(cmd)
    assert cmd[:7] == ["/pa", "-m", "frame_stats", "-u", "h:1", "-i", "grpc"]
    for part in ("--concurrency-range 4", "--measurement-interval 2000", "--shared-memory system",
                 "--output-shared-memory-size 4096", "--shape X:1", "-f /tmp/x.csv", "--percentile=50"):
        assert part in text
    assert "--collect-metrics" not in text


def test_perf_analyzer_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="not an executable"):
        pa.find_binary(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- compare harness (no servers)

def test_scenario_selection_and_verdicts():
    assert [s.name for s in select("1")] == ["add_sub_http_c1", "add_sub_http_c16"]
    assert select("all") == SCENARIOS
    with pytest.raises(BenchError, match="unknown scenario"):
        select("nope")
    s = Scenario("x", 4, "x", "m", "http", targets=[Target("p50", 1 / 3), Target("throughput", 1.2)])
    ours = {"throughput": 130.0, "latency_us": {"p50": 100.0}}
    triton = {"throughput": 100.0, "latency_us": {"p50": 400.0}}
    result = verdicts(s, ours, triton, None)
    assert [v["pass"] for v in result] == [True, True]
    assert result[0]["target"] == "p50 <= 1/3 of Triton"
    assert verdicts(s, None, triton, None)[0]["pass"] is None


def test_the_median_start_stands_for_several():
    def pair(ours_p50: float, theirs_p50: float, ours_tp: float = 100.0, theirs_tp: float = 100.0) -> tuple:
        return ({"throughput": ours_tp, "latency_us": {"p50": ours_p50}},
                {"throughput": theirs_tp, "latency_us": {"p50": theirs_p50}})

    latency = Scenario("x", 2, "x", "m", "grpc", targets=[Target("p50", 1)])
    starts = [pair(300, 200), pair(200, 250), pair(240, 240)]  # ratios 1.5, 0.8, 1.0
    chosen, ratios = median_pair(latency, starts)
    assert chosen is starts[2] and ratios == [1.5, 0.8, 1.0]
    chosen, _ = median_pair(latency, starts[:2])  # even: the worse of the two middle ones
    assert chosen is starts[0]
    throughput = Scenario("y", 2, "y", "m", "grpc", targets=[Target("throughput", 1)])
    starts = [pair(1, 1, 90, 100), pair(1, 1, 130, 100)]  # ratios 0.9, 1.3: the worse is 0.9
    assert median_pair(throughput, starts)[0] is starts[0]
    missing = [(None, starts[0][1]), starts[1]]  # a start where ours was not measured does not count
    assert median_pair(throughput, missing) == (starts[1], [None, 1.3])


def test_render_page():
    row = {"name": "add_sub_http_c1", "group": 1, "title": "add_sub, HTTP, c=1", "client_label": "bench",
           "ours": {"throughput": 2000.0, "latency_us": {"p50": 400.0, "p99": 900.0}, "stable": True,
                    "server": {"queue_us": 9, "compute_input_us": 16, "compute_infer_us": 10, "compute_output_us": 12}},
           "triton": {"throughput": 1000.0, "latency_us": {"p50": 800.0}, "stable": False, "server": None},
           "skipped": "", "verdicts": [{"target": "throughput >= Triton", "pass": True, "ratio": 2.0}]}
    doc = {"date": "d", "command": "python -m bench compare", "complete": True, "rows": [row], "notes": ["n1"],
           "direct": None, "machine": {"cpu": "CPU-X", "logical_cpus": 16, "usable_cpus": 16, "memory_gib": 1,
                                       "os": "OS", "kernel": "k", "python": "3.12", "tritonserver": "triton 2.51.0",
                                       "edge_kernel_commit": "abc", "tritonclient": "2", "perf_analyzer": "2.60.0",
                                       "numpy": "2", "gpu": "none"},
           "settings": {"client_description": "bench", "stability_percentage": 10, "measurement_interval_ms": 500,
                        "max_trials": 4}}
    page = render(doc)
    assert "| CPU | CPU-X |" in page and "triton 2.51.0" in page and "`python -m bench compare`" in page
    assert "| 2,000 | ~1,000 | 2.00 | 400 | ~800 | 900 | — |" in page
    assert "**pass** (2.00x)" in page and "9 / 16 / 10 / 12" in page and "- n1" in page
    assert "started" not in page
    row["starts"] = [2.0, None, 1.5]
    assert "Servers started 3 times" in render(doc) and "add_sub_http_c1 2.00, —, 1.50." in render(doc)


# --------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    srv = KernelServer(EXAMPLES).start(tmp_path_factory.mktemp("bench") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


def bench_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_http_run_writes_csv_json_png(kernel, tmp_path):
    out = tmp_path / "run"
    proc = bench_cli("-m", "add_sub", "-u", kernel.http_url, "--concurrency-range", "1:2", *QUICK,
                     "--csv", str(out / "r.csv"), "--json", str(out / "r.json"), "--plot", str(out / "r.png"))
    assert proc.returncode == 0, proc.stderr
    assert "Request concurrency: 2" in proc.stdout and "Avg request latency" in proc.stdout
    with open(out / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["Concurrency"] for r in rows] == ["1", "2"]
    for r in rows:
        assert float(r["Inferences/Second"]) > 0 and int(r["Request Count"]) > 0
        assert 0 < float(r["p50 latency"]) <= float(r["p99 latency"])
        assert float(r["Server Compute Infer"]) > 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["model"]["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [16]}
    level = doc["results"][0]
    assert 3 <= len(level["windows"]) <= 4 and level["summary"]["server"]["success_count"] > 0
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def shm_status(kernel: KernelServer) -> list:
    with urllib.request.urlopen(f"http://{kernel.http_url}/v2/systemsharedmemory/status", timeout=5) as r:
        return json.loads(r.read())


def test_grpc_system_shared_memory_cleans_up(kernel):
    options = ClientOptions(protocol="grpc", url=kernel.grpc_url, model="add_sub", shared_memory="system",
                            output_shm_size=64)
    report = run(options, Settings(concurrency=[2], measurement_interval_ms=300, max_trials=3, warmup_requests=5),
                 progress=False)
    level = report.levels[0]
    assert level.summary.throughput > 0 and level.summary.server["compute_infer_us"] > 0
    assert shm_status(kernel) == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"bench_{os.getpid()}_")]


def test_request_rate_mode(kernel):
    options = ClientOptions(protocol="http", url=kernel.http_url, model="add_sub")
    report = run(options, Settings(request_rates=[100.0], measurement_interval_ms=400, max_trials=3,
                                   warmup_requests=2), progress=False)
    level = report.levels[0]
    assert level.mode == "request_rate"
    assert 60 <= level.summary.throughput <= 140


def test_inprocess_mode():
    options = ClientOptions(protocol="inprocess", url="", model="add_sub", model_repository=str(EXAMPLES))
    report = run(options, Settings(concurrency=[1], measurement_interval_ms=300, max_trials=3, warmup_requests=5),
                 progress=False)
    assert report.levels[0].summary.throughput > 0 and report.levels[0].summary.latency_us["p50"] > 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_url_is_a_clear_error(protocol):
    url = f"127.0.0.1:{free_port()}"
    proc = bench_cli("-m", "add_sub", "-i", protocol, "-u", url, *QUICK)
    assert proc.returncode == 1
    assert f"error: cannot reach the server at {url} over {protocol}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_is_a_clear_error(kernel):
    proc = bench_cli("-m", "no_such_model", "-u", kernel.http_url, *QUICK)
    assert proc.returncode == 1
    assert "error: model 'no_such_model'" in proc.stderr and "unknown model" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = bench_cli("-m", "add_sub", "-u", kernel.http_url, "--shape", "NOPE:1", *QUICK)
    assert proc.returncode == 1 and "unknown input" in proc.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpclib", "grpcio"])
def test_floor_servers_answer_like_add_sub(protocol):
    """bench.floor's canned servers speak enough of the protocol for tritonclient (and perf_analyzer)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "serve", "--protocol", protocol, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        module = httpclient if protocol == "http" else grpcclient
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("add_sub", **({} if protocol == "http" else {"as_json": True}))["name"] \
            == "add_sub"
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = module.InferInput(name, [16], "INT32")
            t.set_data_from_numpy(np.ones(16, dtype=np.int32))
            inputs.append(t)
        for _ in range(3):
            out = client.infer("add_sub", inputs).as_numpy("OUTPUT0")
            assert out.shape == (16,) and not out.any()  # canned zeros: no model ran
        client.close()
    finally:
        proc.send_signal(subprocess.signal.SIGTERM)
        tail = proc.communicate(timeout=30)[0]
    assert "requests=3 " in tail


# --------------------------------------------------------------------------- bench.backends page
def _backends_doc(with_pa: bool) -> dict:
    def lat(p50: float) -> dict:
        return {"p50_us": p50, "p99_us": p50 * 2, "server": None}

    row = {"model": "conv", "batch": 1, "direct": lat(100), "inprocess": lat(260), "inprocess_async": lat(190),
           "http_shm": lat(500)}
    for path, over in (("inprocess", 150), ("inprocess_async", 120), ("http_shm", 400)):
        row[path]["paired"] = {"pairs": 10, "direct_p50_us": 130, "p50_us": 130 + over, "overhead_us": over}
    row["paired_overhead_us"] = {"inprocess": 150, "inprocess_async": 120, "http_shm": 400}
    if with_pa:
        row["http_shm_pa"] = {**lat(320), "direct_p50_us": 110, "stable": True}
    return {"date": "today", "seconds": 3, "rounds": 6, "rows": [row], "frame": {},
            "machine": {"cpu": "cpu", "usable_cpus": 2, "gpu": "none", "os": "linux", "python": "3.11 x",
                        "edge_kernel_commit": "abc"}}


def test_backends_page_judges_http_on_perf_analyzer_when_it_ran():
    from bench.backends import render

    page = render(_backends_doc(with_pa=False))
    assert "in process **pass**, HTTP+shm **FAIL**" in page  # 90 µs in process; 400 µs with the Python client
    page = render(_backends_doc(with_pa=True))
    assert "in process **pass**, HTTP+shm **pass**" in page  # perf_analyzer: 320 - 110 = 210 µs
    assert "| conv | 1 | 110 | 320 (640) | 210 |" in page
    # the pairs are shown, not judged: 120 µs in process in pairs leaves the back-to-back verdict as it is
    assert "| conv | 1 | 30 | 130 / 280 / 150 | 130 / 250 / 120 | 130 / 530 / 400 | 150 / 120 / 400 |" in page


def test_compare_against_a_baseline_tree(tmp_path):
    """``bench compare --baseline-tree``: an A/B of two builds of ours, run end to end (here the same tree on both
    sides): every row measured on both, per-start ratios, the note saying what the Triton columns hold, docs/
    left alone. A missing tree is a clear error."""
    from bench import compare

    docs = ROOT / "docs" / "performance.md"
    before = docs.read_bytes()
    out = tmp_path / "ab"
    argv = ["--client", "bench", "--scenarios", "add_sub_http_c1,add_sub_grpc_c1", "--baseline-tree", str(ROOT),
            "--starts", "2", "-p", "300", "-r", "4", "--no-retry", "--out", str(out)]
    assert compare.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["add_sub_http_c1", "add_sub_grpc_c1"]
    for row in doc["rows"]:
        assert row["ours"]["throughput"] > 0 and row["triton"]["throughput"] > 0
        assert len(row["starts"]) == 2 and all(r > 0 for r in row["starts"])
    assert any("--baseline-tree" in note for note in doc["notes"])
    assert (out / "baseline.log").read_text().count("kernel start") == 2  # one baseline server per start
    assert docs.read_bytes() == before
    assert compare.main([*argv[:4], "--baseline-tree", str(tmp_path)]) == 1  # not a checkout of this project


def test_inprocess_ab_of_two_trees(tmp_path, capsys):
    """``bench.inprocess_ab``: each tree's runs are fresh processes that serve the ONNX conv net in process and
    report async_infer()'s overhead over session.run (here the same tree on both sides, once as a .tar.gz, the
    way the device bundle carries a baseline); a folder that is no checkout is refused."""
    import tarfile

    from bench import inprocess_ab

    archive = tmp_path / "baseline.tar.gz"
    files = subprocess.run(["git", "ls-files", "kernel", "bench", "shm", "workers", "protocol"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(archive, "w:gz") as tar:
        for name in files:
            tar.add(ROOT / name, arcname=name)
    assert inprocess_ab.main(["--baseline-tree", str(archive), "--runs", "1", "--calls", "50"]) == 0
    out = capsys.readouterr().out
    medians = re.findall(r"^(this build|baseline): median of 1 runs ([\d.\-]+) µs", out, re.M)
    assert [name for name, _ in medians] == ["this build", "baseline"]
    assert all(-1000 < float(v) < 100_000 for _, v in medians)
    with pytest.raises(SystemExit):
        inprocess_ab.main(["--baseline-tree", str(tmp_path)])  # not a checkout of this project


def test_backends_end_to_end(tmp_path):
    """``bench.backends`` on this machine's CPU, briefly: every model and path measured on each of two in-process
    server starts, the direct calls made in processes of their own, the median start kept, docs/ left alone."""
    from bench import backends

    docs = ROOT / "docs" / "performance.md"
    before = docs.read_bytes()
    assert backends.main(["--device", "cpu", "--seconds", "0.3", "--rounds", "1", "--starts", "2", "--no-docs",
                          "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "backends.json").read_text())
    assert [(r["model"].split(",")[0], r["batch"]) for r in doc["rows"]] == [
        ("ONNX Runtime", 1), ("ONNX Runtime", 1), ("ONNX Runtime", 1), ("PyTorch", 1), ("PyTorch", 8)]
    for row in doc["rows"]:
        for path in ("direct", "inprocess", "inprocess_async", "http_shm"):
            assert row[path]["calls"] > 0 and row[path]["p50_us"] > 0, (row["model"], path)
        assert len(row["starts"]) == 2
        assert row["inprocess_async"]["p50_us"] - row["direct"]["p50_us"] == sorted(
            s["inprocess_async"] for s in row["starts"])[1]  # the median start of two: the worse one
        for path in ("inprocess", "inprocess_async", "http_shm"):  # then in pairs with a direct call each
            paired = row[path]["paired"]
            assert paired["pairs"] > 0 and paired["p50_us"] > 0 and paired["direct_p50_us"] > 0, (row["model"], path)
            assert row["paired_overhead_us"][path] == sorted(s["paired"][path] for s in row["starts"])[1]
    page = backends.render(doc)
    assert "in a process of its own" in page and "started 2 times" in page and "**In pairs**" in page
    assert docs.read_bytes() == before
