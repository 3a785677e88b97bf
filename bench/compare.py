"""``python -m bench compare``: edge-kernel against the reference NVIDIA Triton, same machine, same run.

Both servers are started once on the same model repository (ours: ``python -m kernel start``; Triton:
``scripts/reference-triton start``) on free ports. Every scenario is measured on both with the same
client and settings, one server at a time, the order alternating from one scenario to the next.
Results go to ``DIR/results.json`` and the table to ``docs/performance.md`` (and ``DIR/performance.md``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import perf_analyzer as pa
from bench.cli import interrupt
from bench.inputs import BenchError
from bench.process import run_child
from bench.stats import model_stats, server_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REPOSITORY = os.path.join(REPO_ROOT, "examples", "models")
DEFAULT_DOCS = os.path.join(REPO_ROOT, "docs", "performance.md")
READY_TIMEOUT_S = 240.0


@dataclass
class Target:
    """A pass/fail goal: ``throughput`` ours >= factor x theirs, or ``p50`` ours <= factor x reference."""

    metric: str  # "throughput" | "p50"
    factor: float
    against: str = "triton"  # "triton" | "direct" (the model called in-process, no server)

    def describe(self) -> str:
        ref = "Triton" if self.against == "triton" else "direct call"
        if self.factor == 1:
            factor = ""
        elif self.factor < 1 and round(1 / self.factor, 6).is_integer():
            factor = f"1/{round(1 / self.factor)} of "
        else:
            factor = f"{self.factor:g}x "
        return f"{'throughput >=' if self.metric == 'throughput' else 'p50 <='} {factor}{ref}"


@dataclass
class Scenario:
    """One row of the comparison."""

    name: str
    group: int  # the scenario number
    title: str
    model: str
    protocol: str  # http | grpc | inprocess (ours only; Triton then runs over HTTP)
    concurrency: int = 1
    shared_memory: str = "none"
    targets: list[Target] = field(default_factory=list)
    streaming: bool = False  # gRPC ModelStreamInfer (perf_analyzer --streaming)


SCENARIOS = [
    Scenario("add_sub_http_c1", 1, "add_sub, HTTP, c=1", "add_sub", "http", 1, targets=[Target("throughput", 1)]),
    Scenario("add_sub_http_c16", 1, "add_sub, HTTP, c=16", "add_sub", "http", 16, targets=[Target("throughput", 1)]),
    Scenario("add_sub_grpc_c1", 2, "add_sub, gRPC, c=1", "add_sub", "grpc", 1, targets=[Target("p50", 1)]),
    Scenario("add_sub_grpc_c16", 2, "add_sub, gRPC, c=16", "add_sub", "grpc", 16, targets=[Target("throughput", 1)]),
    Scenario("add_sub_grpc_stream_c16", 2, "add_sub, gRPC streaming, c=16", "add_sub", "grpc", 16,
             targets=[Target("throughput", 1)], streaming=True),
    Scenario("identity_http_c16", 3, "identity (dynamic batching), HTTP, c=16", "identity", "http", 16,
             targets=[Target("throughput", 1.2)]),
    Scenario("identity_grpc_c16", 3, "identity (dynamic batching), gRPC, c=16", "identity", "grpc", 16,
             targets=[Target("throughput", 1.2)]),
    Scenario("frame_http_c1", 4, "frame_stats 1080p frame, binary HTTP, c=1", "frame_stats", "http", 1),
    Scenario("frame_shm_c1", 4, "frame_stats 1080p frame, HTTP + system shared memory, c=1", "frame_stats", "http",
             1, "system", targets=[Target("p50", 1 / 3), Target("p50", 2, "direct")]),
    Scenario("frame_shm_grpc_c1", 4, "frame_stats 1080p frame, gRPC + system shared memory, c=1", "frame_stats",
             "grpc", 1, "system", targets=[Target("p50", 1 / 3)]),
    # Issue 14: a camera pipeline (ensemble: 1080p frame -> resize/normalize -> detector -> NMS), the frame in
    # the client's system shared memory; the same ensemble on both servers.
    Scenario("camera_pipeline_shm_http_c1", 6, "camera_pipeline ensemble, 1080p frame in system shm, HTTP, c=1",
             "camera_pipeline", "http", 1, "system", targets=[Target("p50", 1 / 2)]),
    Scenario("camera_pipeline_shm_grpc_c1", 6, "camera_pipeline ensemble, 1080p frame in system shm, gRPC, c=1",
             "camera_pipeline", "grpc", 1, "system", targets=[Target("p50", 1 / 2)]),
    Scenario("inprocess_add_sub", 5, "add_sub: ours in-process c=1 vs Triton HTTP c=1", "add_sub", "inprocess", 1),
    # The target compares throughputs: an application embedding the server keeps a few requests in flight.
    Scenario("inprocess_add_sub_c8", 5, "add_sub: ours in-process c=8 vs Triton HTTP c=1", "add_sub", "inprocess", 8,
             targets=[Target("throughput", 5)]),
]
OUTPUT_SHM_SIZE = 102400


def select(spec: str) -> list[Scenario]:
    """``all``, or a comma-separated list of scenario names and issue scenario numbers (1-6)."""
    if spec.strip() in ("", "all"):
        return list(SCENARIOS)
    chosen: list[Scenario] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [s for s in SCENARIOS if s.name == item or (item.isdigit() and s.group == int(item))]
        if not matches:
            names = ", ".join(s.name for s in SCENARIOS)
            raise BenchError(f"unknown scenario '{item}'; known: all, 1-6, {names}")
        chosen += [s for s in matches if s not in chosen]
    return chosen


# --------------------------------------------------------------------------- servers

def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: the sockets stay bound until all are chosen (asked one at a time,
    the system may give the same port twice, and a server's HTTP and gRPC ports then collide)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class ManagedServer:
    """A server process we start, wait for, and stop (its whole process group)."""

    def __init__(self, name: str, argv: list[str], log_path: str, ports: dict[str, int],
                 env: dict[str, str] | None = None, cwd: str = REPO_ROOT) -> None:
        self.name, self.argv, self.log_path, self.ports = name, argv, log_path, ports
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.ports['grpc' if protocol == 'grpc' else 'http']}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env=self.env, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.url('http')}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_ready(self, models: list[str], timeout: float = READY_TIMEOUT_S) -> dict[str, str]:
        """Wait until live and each model ready; return {model: reason} for models that never got ready."""
        deadline = time.monotonic() + timeout
        while self._get("/v2/health/live")[0] != 200:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"{self.name} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} server not live after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        pending = set(models)
        while pending and time.monotonic() < deadline:
            pending = {m for m in pending if self._get(f"/v2/models/{m}/ready")[0] != 200}
            if pending:
                time.sleep(0.25)
        return {m: f"not ready on {self.name} after {timeout:.0f} s" for m in sorted(pending)}

    def model_stats(self, model: str) -> dict[str, Any] | None:
        """The statistics extension's entry for ``model`` (None if unavailable)."""
        status, body = self._get(f"/v2/models/{model}/stats")
        try:
            return model_stats(json.loads(body), model) if status == 200 else None
        except ValueError:
            return None

    def metadata(self) -> dict[str, Any]:
        status, body = self._get("/v2")
        try:
            return json.loads(body) if status == 200 else {}
        except ValueError:
            return {}

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        try:  # leftovers of the group (python-backend stubs) after the leader left
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _ports() -> dict[str, int]:
    return dict(zip(("http", "grpc", "metrics"), free_ports(3)))


def ours_server(repository: str, out: str, extra: list[str] | None = None, tree: str = REPO_ROOT,
                name: str = "ours", log: str = "ours.log") -> ManagedServer:
    """This project's server, from this checkout or (``tree``) another one."""
    ports = _ports()
    argv = [sys.executable, "-m", "kernel", "start", "--model-repository", repository, "--host", "127.0.0.1",
            "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
            "--metrics-port", str(ports["metrics"]), *(extra or [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH", "")) if p)
    return ManagedServer(name, argv, os.path.join(out, log), ports, env, cwd=tree)


def triton_server(repository: str, out: str, extra: list[str]) -> ManagedServer:
    ports = _ports()
    argv = [sys.executable, os.path.join(REPO_ROOT, "scripts", "reference-triton"), "start",
            "--model-repository", repository, "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
            "--metrics-port", str(ports["metrics"]), "--exit-on-error=false", *extra]
    return ManagedServer("triton", argv, os.path.join(out, "triton.log"), ports)


# --------------------------------------------------------------------------- measurements

@dataclass
class Options:
    client: str  # perf_analyzer | bench
    measurement_interval_ms: int
    max_trials: int
    stability_percentage: float
    perf_analyzer: str | None
    repository: str
    out: str
    time_budget_s: float | None = None
    retry_unstable: bool = True


class Runner:
    """Runs measurements with the chosen client and keeps to the time budget."""

    def __init__(self, options: Options, planned: int) -> None:
        self.o = options
        self.planned = planned
        self.done = 0
        self.started = time.monotonic()
        self.client_log = os.path.join(options.out, "client.log")
        #: (scenario, side, start, first ns, last ns) of each measurement, CLOCK_MONOTONIC (for --trace)
        self.windows: list[tuple[str, str, int, int, int]] = []

    def typical_s(self) -> float:
        return 4 * self.o.measurement_interval_ms / 1000 + 3

    def may_retry(self, cost_s: float) -> bool:
        if not self.o.retry_unstable:
            return False
        if self.o.time_budget_s is None:
            return True
        left = self.o.time_budget_s - (time.monotonic() - self.started)
        return left - cost_s > (self.planned - self.done) * self.typical_s()

    def measure(self, scenario: Scenario, server: ManagedServer | None, client: str) -> dict[str, Any]:
        """One measurement; an unstable one is repeated once with windows twice as long if time allows."""
        interval = self.o.measurement_interval_ms
        result = self._measure(scenario, server, client, interval)
        if not result["stable"] and self.may_retry(self.o.max_trials * interval * 2 / 1000):
            print(f"  unstable; again with {2 * interval} ms windows", file=sys.stderr, flush=True)
            retry = self._measure(scenario, server, client, 2 * interval)
            retry["first_attempt"] = {k: result[k] for k in ("throughput", "latency_us", "stable", "command")}
            result = retry
        self.done += 1
        return result

    def _measure(self, scenario: Scenario, server: ManagedServer | None, client: str,
                 interval_ms: int) -> dict[str, Any]:
        """Measure, and read the server's statistics around the whole run: when the client reports no
        server-side split (perf_analyzer on an unstable run) the run-wide one stands in (``server_run``)."""
        before = server.model_stats(scenario.model) if server is not None else None
        result = self._client_run(scenario, server, client, interval_ms)
        after = server.model_stats(scenario.model) if server is not None else None
        if before and after:
            result["server_run"] = server_split(before, after)
            if not result.get("server"):
                result["server"] = dict(result["server_run"], whole_run=True)
        return result

    def _client_run(self, scenario: Scenario, server: ManagedServer | None, client: str,
                    interval_ms: int) -> dict[str, Any]:
        protocol = "http" if scenario.protocol == "inprocess" and server is not None else scenario.protocol
        if client == "perf_analyzer":
            spec = pa.PerfAnalyzerRun(
                model=scenario.model, url=server.url(protocol), protocol=protocol,
                concurrency=scenario.concurrency, shared_memory=scenario.shared_memory,
                output_shm_size=OUTPUT_SHM_SIZE, measurement_interval_ms=interval_ms, max_trials=self.o.max_trials,
                stability_percentage=self.o.stability_percentage, extra=["--streaming"] if scenario.streaming else [])
            result = pa.run(spec, self.o.perf_analyzer, self.client_log)
            result["client"] = "perf_analyzer"
            return result
        return self._bench(scenario, server, protocol, interval_ms)

    def _bench(self, scenario: Scenario, server: ManagedServer | None, protocol: str,
               interval_ms: int) -> dict[str, Any]:
        if scenario.streaming:
            raise BenchError("the bench client sends no streams: measure this scenario with --client perf_analyzer")
        with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
            json_path = os.path.join(tmp, "result.json")
            argv = [sys.executable, "-m", "bench", "-m", scenario.model, "-i", protocol,
                    "--concurrency-range", str(scenario.concurrency), "-p", str(interval_ms),
                    "-r", str(self.o.max_trials), "-s", f"{self.o.stability_percentage:g}",
                    "--shared-memory", scenario.shared_memory, "--output-shared-memory-size", str(OUTPUT_SHM_SIZE),
                    "--json", json_path]
            argv += ["-u", server.url(protocol)] if server is not None else ["--model-repository", self.o.repository]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
            timeout = self.o.max_trials * interval_ms / 1000 * 1.5 + 180
            try:
                proc = run_child(argv, timeout, cwd=REPO_ROOT, env=env)
            except subprocess.TimeoutExpired as e:
                raise BenchError(f"bench did not finish in {timeout:.0f} s: {shlex.join(argv)}") from e
            with open(self.client_log, "a", encoding="utf-8") as f:
                f.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}(rc={proc.returncode})\n\n")
            if proc.returncode != 0 or not os.path.exists(json_path):
                raise BenchError(f"bench failed (rc={proc.returncode}): {shlex.join(argv)}\n{proc.stderr[-2000:]}")
            with open(json_path, encoding="utf-8") as f:
                level = json.load(f)["results"][-1]
        summary = level["summary"]
        return {"client": "bench", "mode": level["mode"], "level": level["level"],
                "throughput": summary["throughput"], "latency_us": summary["latency_us"],
                "server": summary["server"], "stable": level["stable"], "command": argv}


def direct_baseline(repository: str, model: str, seconds: float = 2.0) -> dict[str, Any]:
    """Time the model's ``execute()`` on one request, called directly (no server), with our
    ``triton_python_backend_utils`` standing in for Triton's, on a random input as the clients send."""
    import numpy as np

    from bench.inputs import make_data, resolve_inputs
    from kernel import config as model_config
    from workers.backends.python import triton_python_backend_utils as pb_utils

    model_dir = os.path.join(repository, model)
    cfg = model_config.load(model_dir)
    model_config.complete(cfg, model_dir)
    versions = sorted((int(v) for v in os.listdir(model_dir) if v.isdigit()), reverse=True)
    path = next((os.path.join(model_dir, str(v), "model.py") for v in versions
                 if os.path.exists(os.path.join(model_dir, str(v), "model.py"))), None)
    if path is None:
        raise BenchError(f"{model_dir} has no <version>/model.py to call directly")
    sys.modules.setdefault("triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location(f"bench_direct_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    config_json = json.dumps(model_config.to_dict(cfg))
    if hasattr(instance, "initialize"):
        instance.initialize({"model_config": config_json, "model_instance_kind": "CPU",
                             "model_instance_name": f"{model}_0", "model_instance_device_id": "0",
                             "model_repository": model_dir, "model_version": str(versions[0]), "model_name": model})
    batch = [-1] if cfg.max_batch_size > 0 else []
    metadata = {"inputs": [{"name": t.name, "datatype": model_config.datatype(t.data_type),
                            "shape": batch + list(t.dims)} for t in cfg.input]}
    specs = resolve_inputs(metadata, cfg.max_batch_size, {}, 1)
    data = make_data(specs, "random")
    request = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor(k, v) for k, v in data.items()],
                                        requested_output_names=[o.name for o in cfg.output])
    times: list[int] = []
    for _ in range(5):
        instance.execute([request])
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        start = time.perf_counter_ns()
        responses = instance.execute([request])
        times.append(time.perf_counter_ns() - start)
        if responses and getattr(responses[0], "has_error", lambda: False)():
            raise BenchError(f"{model}.execute() answered an error: {responses[0].error()}")
    if hasattr(instance, "finalize"):
        instance.finalize()
    values = np.asarray(times, dtype=np.float64) / 1e3
    return {"calls": len(times), "latency_us": {"p50": float(np.percentile(values, 50)),
                                                "p99": float(np.percentile(values, 99)),
                                                "avg": float(values.mean())}, "model_path": path}


# --------------------------------------------------------------------------- machine and verdicts

def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def machine(triton: ManagedServer | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = _read("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    os_release = dict(line.split("=", 1) for line in _read("/etc/os-release").splitlines() if "=" in line)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    triton_meta = triton.metadata() if triton is not None else {}
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "os": os_release.get("PRETTY_NAME", platform.system()).strip('"'), "kernel": platform.release(),
            "python": f"{platform.python_version()} ({sys.executable})",
            "tritonserver": f"{triton_meta.get('name', 'triton')} {triton_meta.get('version', 'unknown')}"
            if triton_meta else "not started", "edge_kernel_commit": git_commit(), "gpu": gpus()}
    for name in ("tritonclient", "perf_analyzer", "numpy"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            info[name] = "not installed"
    return info


def gpus() -> str:
    """The accelerators nvidia-smi lists (none are used: the example models run on CPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return "none"
    return ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))


def git_commit() -> str:
    """$EDGE_KERNEL_COMMIT when set (device copies: their git metadata may be stale), else HEAD
    (``+dirty`` with local changes)."""
    if os.environ.get("EDGE_KERNEL_COMMIT"):
        return os.environ["EDGE_KERNEL_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def verdicts(scenario: Scenario, ours: dict | None, triton: dict | None, direct: dict | None) -> list[dict]:
    out = []
    for target in scenario.targets:
        ref = triton if target.against == "triton" else direct
        verdict: dict[str, Any] = {"target": target.describe(), "pass": None}
        if ours is None or ref is None:
            verdict["why"] = "not measured"
        elif target.metric == "throughput":
            ratio = ours["throughput"] / ref["throughput"] if ref.get("throughput") else None
            verdict.update(ratio=ratio, **{"pass": ratio is not None and ratio >= target.factor})
        else:
            mine, theirs = ours["latency_us"].get("p50"), ref["latency_us"].get("p50")
            ratio = mine / theirs if mine and theirs else None
            verdict.update(ratio=ratio, **{"pass": ratio is not None and ratio <= target.factor})
        out.append(verdict)
    return out


# --------------------------------------------------------------------------- docs/performance.md

def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _split(server: dict | None) -> str:
    if not server:
        return "—"
    text = " / ".join(_fmt(server.get(k)) for k in ("queue_us", "compute_input_us", "compute_infer_us",
                                                      "compute_output_us"))
    return text + (" (whole run)" if server.get("whole_run") else "")


def render(doc: dict[str, Any]) -> str:
    """The markdown page: machine, method, table, server-side split, notes."""
    m, s = doc["machine"], doc["settings"]
    lines = [
        "# Performance: edge-kernel vs NVIDIA Triton", "",
        "Generated by `bench compare`; do not edit by hand. Both servers ran on the same machine, in the same run,",
        "on the same model repository, measured with the same client and settings, one at a time.", "",
        *([] if doc.get("complete", True) else
          ["**Incomplete run** (interrupted): only the rows below were measured.", ""]),
        f"- Date: {doc['date']}",
        f"- Command: `{doc['command']}`",
        f"- Client: {s['client_description']}", "",
        "## Machine", "",
        "| | |", "| --- | --- |",
        f"| CPU | {m['cpu']} |",
        f"| Cores | {m['logical_cpus']} logical ({m['usable_cpus']} usable by this run) |",
        f"| Memory | {m['memory_gib']} GiB |",
        f"| GPU | {m.get('gpu', 'none')} (unused: every model here runs on CPU in both servers) |",
        f"| OS | {m['os']} (kernel {m['kernel']}) |",
        f"| Python | {m['python']} |",
        f"| Triton | {m['tritonserver']} (nvidia-pytriton 0.7.0 wheel, CPU only, python backend) |",
        f"| edge-kernel | commit {m['edge_kernel_commit']} |",
        f"| Clients | tritonclient {m['tritonclient']}, perf_analyzer {m['perf_analyzer']}, numpy {m['numpy']} |",
        "", "## Results", "",
        "Throughput in inferences/s, latencies in µs (client side). Ratio: ours / Triton. "
        "Unstable measurements (no 3 windows within "
        f"±{s['stability_percentage']:g}%) are marked `~`.", "",
        "| # | scenario | client | ours infer/s | Triton infer/s | ratio | ours p50 | Triton p50 | ours p99 | "
        "Triton p99 | target | result |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in doc["rows"]:
        ours, triton = row.get("ours"), row.get("triton")

        def cell(r: dict | None, key: str, sub: str | None = None) -> str:
            if r is None:
                return "—"
            value = r[key] if sub is None else r[key].get(sub)
            if value is None:
                return "—"
            return ("~" if not r.get("stable", True) else "") + _fmt(value)

        ratio = ours["throughput"] / triton["throughput"] if ours and triton and triton["throughput"] else None
        targets = "; ".join(v["target"] for v in row["verdicts"]) or "—"
        results = []
        for v in row["verdicts"]:
            if v["pass"] is None:
                results.append(f"n/a ({v.get('why', 'not measured')})")
            else:
                results.append(("**pass**" if v["pass"] else "**FAIL**") + f" ({v['ratio']:.2f}x)")
        if row.get("skipped"):
            results = [f"skipped: {row['skipped']}"]
        client = row.get("client_label", "")
        lines.append(f"| {row['group']} | {row['title']} | {client} | {cell(ours, 'throughput')} | "
                     f"{cell(triton, 'throughput')} | {_fmt(ratio, 2)} | {cell(ours, 'latency_us', 'p50')} | "
                     f"{cell(triton, 'latency_us', 'p50')} | {cell(ours, 'latency_us', 'p99')} | "
                     f"{cell(triton, 'latency_us', 'p99')} | {targets} | {'; '.join(results) or '—'} |")
    lines += ["", "## Server-side split", "",
              "Per-request averages from the statistics extension over the measured windows, µs: "
              "queue / compute input / compute infer / compute output. \"whole run\": the client gave none "
              "(unstable perf_analyzer run), so the harness's own reading around the whole run stands in.", "",
              "| scenario | ours | Triton |", "| --- | --- | --- |"]
    for row in doc["rows"]:
        if row.get("skipped"):
            continue
        lines.append(f"| {row['name']} | {_split((row.get('ours') or {}).get('server'))} | "
                     f"{_split((row.get('triton') or {}).get('server'))} |")
    lines += ["", "## Notes", ""]
    direct = doc.get("direct")
    if direct:
        lines.append(f"- Direct call (scenario 4's second target): `frame_stats` `execute()` called in-process with "
                     "`workers.backends.python.triton_python_backend_utils` standing in for Triton's, "
                     f"{direct['calls']} calls: p50 {_fmt(direct['latency_us']['p50'])} µs, "
                     f"p99 {_fmt(direct['latency_us']['p99'])} µs.")
    lines += [f"- Settings: windows of {s['measurement_interval_ms']} ms, at most {s['max_trials']} per measurement, "
              f"stable when the last 3 agree within ±{s['stability_percentage']:g}% in throughput and p50 latency; "
              "an unstable measurement is repeated once with windows twice as long when the time budget allows.",
              "- Scenario 5 measures ours with `bench -i inprocess` (the in-process API on the client's event loop, "
              "no sockets; 1 and 8 requests in flight) against Triton over HTTP at c=1, measured with the run's "
              "client; the target row is the one with 8 in flight.",
              "- Servers run with their defaults: one CPU instance of each python-backend model; "
              "Triton is the reference build from `scripts/reference-triton` (CPU only)."]
    starts = [r for r in doc["rows"] if r.get("starts")]
    if starts:
        lines.append(f"- Servers started {len(starts[0]['starts'])} times, each scenario measured on every start; a "
                     "row is the start whose ours/Triton ratio (of its target's metric) is the median, the worse "
                     "middle one for an even count. Ratios per start: " + "; ".join(
                         f"{r['name']} " + ", ".join("—" if x is None else f"{x:.2f}" for x in r["starts"])
                         for r in starts) + ".")
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench compare", description="Measure edge-kernel and the reference Triton side by side and write "
                                          "docs/performance.md.",
        epilog="Scenarios: " + "; ".join(f"{s.name} ({s.group})" for s in SCENARIOS))
    p.add_argument("--client", choices=("perf_analyzer", "bench"), default="perf_analyzer",
                   help="load generator for both servers (default perf_analyzer; scenario 5's in-process side "
                        "always uses bench)")
    p.add_argument("--scenarios", default="all", help="all (default), or names / issue numbers 1-6, comma-separated")
    p.add_argument("--starts", type=int, default=1, metavar="N",
                   help="start both servers N times, measure each scenario on each start, and report per row the "
                        "start whose ours/Triton ratio is the median (default 1)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "tmp", "compare"),
                   help="directory for results.json, logs and a copy of the page (default bench/results/tmp/compare, "
                        "git-ignored)")
    p.add_argument("--model-repository", default=DEFAULT_REPOSITORY,
                   help="model repository both servers serve (default examples/models)")
    p.add_argument("-p", "--measurement-interval", type=int, default=5000, metavar="MS",
                   help="measurement window in ms (default 5000)")
    p.add_argument("-r", "--max-trials", type=int, default=10, help="most windows per measurement (default 10)")
    p.add_argument("-s", "--stability-percentage", type=float, default=10.0, help="stability band in %% (default 10)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="skip retries of unstable measurements that would not fit in this many seconds")
    p.add_argument("--no-retry", action="store_true", help="never repeat an unstable measurement")
    p.add_argument("--perf-analyzer", metavar="PATH", help="perf_analyzer binary (default: the perf_analyzer wheel, "
                                                            "$PERF_ANALYZER or PATH)")
    p.add_argument("--docs", default=DEFAULT_DOCS, help="page to write (default docs/performance.md)")
    p.add_argument("--no-docs", action="store_true", help="write results.json only, leave docs/ alone")
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="extra tritonserver argument (repeatable)")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="trace one request in N on both servers (--trace-config) and write timeline.md: when each "
                        "event of a scenario's requests happens on each server (bench.timeline); the latencies of "
                        "a traced run include tracing, so docs/ is left alone")
    p.add_argument("--baseline-tree", metavar="DIR",
                   help="an A/B of two builds: measure against this project's server from another checkout (its "
                        "tree at DIR) instead of the reference Triton; the page's Triton columns are that build's "
                        "and docs/ is left alone")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the page's notes, e.g. what was special about this run (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "bench", "compare", *argv])
    signal.signal(signal.SIGTERM, interrupt)  # a timeout still stops the servers and keeps the results
    try:
        return _compare(args, command)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; partial results written", file=sys.stderr)
        return 130


class Page:
    """results.json and the page, rewritten after every scenario so that an interrupted run keeps its rows."""

    def __init__(self, args: argparse.Namespace, command: str, options: Options,
                 scenarios: list[Scenario]) -> None:
        self.args, self.out = args, options.out
        self.started = time.monotonic()
        self.doc: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "complete": False, "machine": {}, "rows": [], "direct": None, "notes": [],
            "settings": {"client": args.client, "client_description": "",
                         **{k: v for k, v in asdict(options).items() if k not in ("client", "out", "repository")},
                         "starts": args.starts,
                         "model_repository": options.repository, "scenarios": [s.name for s in scenarios]}}

    def describe_client(self) -> None:
        m = self.doc["machine"]
        self.doc["settings"]["client_description"] = (
            f"perf_analyzer {m.get('perf_analyzer')}, NVIDIA's C++ load generator: "
            "sync requests, stabilizing on p50 (--percentile=50)" if self.args.client == "perf_analyzer" else
            f"bench (this repository's load generator on tritonclient {m.get('tritonclient')} asyncio clients)")

    def add(self, row: dict[str, Any]) -> None:
        """Add a row, or replace the row of the same scenario (a later server start's median)."""
        self.doc["rows"] = [r for r in self.doc["rows"] if r["name"] != row["name"]]
        self.doc["rows"].append(row)
        self.doc["rows"].sort(key=lambda r: [s.name for s in SCENARIOS].index(r["name"]))
        self.save()

    def save(self, docs: bool = False) -> str:
        self.doc["elapsed_s"] = round(time.monotonic() - self.started, 1)
        with open(os.path.join(self.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(self.doc, f, indent=2, default=str)
            f.write("\n")
        page = render(self.doc)
        with open(os.path.join(self.out, "performance.md"), "w", encoding="utf-8") as f:
            f.write(page)
        if docs and not self.args.no_docs:
            from bench.backends import kept_section  # bench.backends' section of the page stays

            os.makedirs(os.path.dirname(os.path.abspath(self.args.docs)), exist_ok=True)
            kept = kept_section(self.args.docs)
            with open(self.args.docs, "w", encoding="utf-8") as f:
                f.write(page + ("\n" + kept if kept else ""))
        return page


def trace_args(rate: int, out: str, side: str, start: int) -> list[str]:
    """Both servers' flags for tracing one request in ``rate`` into ``out``/trace-<side>-<start>.json."""
    if not rate:
        return []
    path = os.path.join(out, f"trace-{side}-{start}.json")
    return ["--trace-config", f"triton,file={path}", "--trace-config", "level=TIMESTAMPS",
            "--trace-config", f"rate={rate}"]


def write_timeline(out: str, windows: list[tuple[str, str, int, int, int]], every: bool = False) -> None:
    """timeline.md: per scenario, each event's median time after arrival on each server (bench.timeline);
    ``every`` (``--trace 1``): also when the next request arrived."""
    from bench import timeline

    loaded: dict[str, list] = {}
    scenarios: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name, side, start, first, last in windows:
        path = os.path.join(out, f"trace-{side}-{start}.json")
        if path not in loaded:
            try:
                loaded[path] = timeline.load([path])
            except (OSError, ValueError) as e:
                print(f"warning: no trace from {path}: {e}", file=sys.stderr)
                loaded[path] = []
        events = scenarios.setdefault(name, {}).setdefault(side, {})
        for group in timeline.offsets(loaded[path], (first, last), every).values():
            for event, values in group.items():
                events.setdefault(event, []).extend(values)
    parts = ["# Where the time goes: traced requests, ours and Triton's\n",
             "Median µs after the request reached the server (HTTP_RECV_START, or GRPC_WAITREAD_END), from "
             "both servers' trace files (bench.timeline); an ensemble's steps as `<model>: <event>`.\n"]
    for name, sides in scenarios.items():
        parts.append(f"## {name}\n\n{timeline.table(dict(sorted(sides.items())))}\n")  # ours, then triton
    with open(os.path.join(out, "timeline.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    print("\n".join(parts), file=sys.stderr)


def _compare(args: argparse.Namespace, command: str) -> int:
    scenarios = select(args.scenarios)
    if args.trace:
        args.no_docs = True  # a traced run's latencies are not the page's
    if args.baseline_tree:
        args.baseline_tree = os.path.abspath(args.baseline_tree)
        if not os.path.isfile(os.path.join(args.baseline_tree, "kernel", "cli.py")):
            raise BenchError(f"--baseline-tree {args.baseline_tree} is not a checkout of this project")
        args.no_docs = True  # an A/B of two builds is not the comparison with Triton
    if args.starts < 1:
        raise BenchError("--starts must be at least 1")
    repository = os.path.abspath(args.model_repository)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in ("ours.log", "triton.log", "baseline.log", "client.log"):
        open(os.path.join(out, name), "w").close()
    if args.client == "perf_analyzer":
        args.perf_analyzer = pa.find_binary(args.perf_analyzer)
    options = Options(client=args.client, measurement_interval_ms=args.measurement_interval,
                      max_trials=args.max_trials, stability_percentage=args.stability_percentage,
                      perf_analyzer=args.perf_analyzer, repository=repository, out=out,
                      time_budget_s=args.time_budget, retry_unstable=not args.no_retry)
    page = Page(args, command, options, scenarios)
    notes: list[str] = page.doc["notes"]
    notes += args.note
    if args.baseline_tree:
        notes.append(f"A/B of two builds: the Triton columns are this project's server from {args.baseline_tree} "
                     "(--baseline-tree), not the reference Triton.")
    runnable = [s for s in scenarios if os.path.isdir(os.path.join(repository, s.model))]
    for s in scenarios:
        if s not in runnable:
            page.add(_row(s, args.client, skipped=f"model {s.model} is not in {repository}"))
    models = sorted({s.model for s in runnable})
    pairs: dict[str, list[tuple[dict | None, dict | None]]] = {}  # scenario -> (ours, triton) of each start
    runner = Runner(options, 2 * len(runnable) * args.starts)
    try:
        for start in range(args.starts):
            _one_start(args, page, runner, runnable, models, pairs, start)
        page.doc["complete"] = True
    finally:
        text = page.save(docs=bool(page.doc["rows"]))
        if args.trace:
            try:
                write_timeline(out, runner.windows, every=args.trace == 1)
            except Exception as e:  # noqa: BLE001 - the run's own outcome stays what it was
                print(f"warning: no timeline: {e}", file=sys.stderr)
    print(text)
    print(f"results: {os.path.join(out, 'results.json')}" + ("" if args.no_docs else f"; page: {args.docs}"),
          file=sys.stderr)
    return 0


def _one_start(args: argparse.Namespace, page: Page, runner: Runner, runnable: list[Scenario], models: list[str],
               pairs: dict[str, list], start: int) -> None:
    """Start both servers afresh, measure every scenario on each, stop them; each row becomes the median
    of its starts so far (median_pair)."""
    repository, out, notes = runner.o.repository, runner.o.out, page.doc["notes"]
    ours = ours_server(repository, out, trace_args(args.trace, out, "ours", start))
    if args.baseline_tree:  # the other side is a build of ours: it answers in the Triton columns
        triton = ours_server(repository, out, trace_args(args.trace, out, "triton", start), tree=args.baseline_tree,
                             name="triton", log="baseline.log")
    else:
        triton = triton_server(repository, out, [*args.triton_arg, *trace_args(args.trace, out, "triton", start)])
    not_ready: dict[str, dict[str, str]] = {"ours": {}, "triton": {}}
    triton_http_c1: dict[str, Any] | None = None
    try:
        if runnable:
            suffix = f" (start {start + 1} of {args.starts})" if args.starts > 1 else ""
            print(f"starting ours and the reference Triton{suffix} ...", file=sys.stderr, flush=True)
            ours.start()
            triton.start()
            for server in (ours, triton):
                try:
                    not_ready[server.name] = server.wait_ready(models)
                except BenchError as e:  # the other server's numbers are still worth a page
                    notes.append(f"{server.name} did not start: {e}".splitlines()[0])
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    not_ready[server.name] = {m: f"{server.name} did not start" for m in models}
        if not page.doc["machine"]:
            page.doc["machine"] = machine(triton if runnable else None)
            if args.client == "perf_analyzer":
                page.doc["machine"]["perf_analyzer"] = pa.version(args.perf_analyzer)
            page.describe_client()
        for index, s in enumerate(runnable):
            broken = {side: reasons[s.model] for side, reasons in not_ready.items() if s.model in reasons}
            if s.protocol != "inprocess" and broken:
                if not pairs.get(s.name):
                    page.add(_row(s, args.client, skipped="; ".join(broken.values())))
                continue
            print(f"[{index + 1}/{len(runnable)}] {s.name}", file=sys.stderr, flush=True)
            result: dict[str, Any] = {}
            order = ("ours", "triton") if (index + start) % 2 == 0 else ("triton", "ours")
            for side in order:
                began = time.monotonic_ns()
                try:
                    if s.protocol == "inprocess" and side == "ours":
                        result[side] = runner.measure(s, None, "bench")
                    elif s.protocol == "inprocess" and triton_http_c1 is not None:
                        result[side] = dict(triton_http_c1, reused_from="add_sub_http_c1")
                    elif side in broken:
                        result[side] = None
                    else:
                        result[side] = runner.measure(s, ours if side == "ours" else triton, args.client)
                except BenchError as e:
                    result[side] = None
                    notes.append(f"{s.name} on {side}: {e}".splitlines()[0])
                    print(f"  {side}: {e}", file=sys.stderr, flush=True)
                runner.windows.append((s.name, side, start, began, time.monotonic_ns()))
                _progress(side, result.get(side))
            if s.name == "add_sub_http_c1":
                triton_http_c1 = result.get("triton")
            if s.name == "frame_shm_c1" and page.doc["direct"] is None:
                page.doc["direct"] = direct_baseline(repository, s.model)
                print(f"  direct call: p50 {page.doc['direct']['latency_us']['p50']:.0f} usec", file=sys.stderr,
                      flush=True)
            pairs.setdefault(s.name, []).append((result.get("ours"), result.get("triton")))
            chosen, ratios = median_pair(s, pairs[s.name])
            label = args.client if s.protocol != "inprocess" else f"bench -i inprocess vs {args.client} HTTP"
            row = _row(s, label, ours=chosen[0], triton=chosen[1])
            row["verdicts"] = verdicts(s, chosen[0], chosen[1], page.doc["direct"])
            if len(pairs[s.name]) > 1:
                row["starts"] = ratios
            page.add(row)
    finally:
        ours.stop()
        triton.stop()


def median_pair(scenario: Scenario, pairs: list[tuple[dict | None, dict | None]]) -> tuple[tuple, list]:
    """The (ours, Triton) pair of one server start that stands for several: the median by the scenario's
    first target (the ratio of throughputs or of p50s; p50 when it has none), the worse of the two middle
    ones when their number is even. Also every start's ratio, in order (None: a side not measured).

    Each start measures both servers back to back on fresh processes, so a pair's ratio is what one
    placement of the processes on the machine's cores gave; the median is robust to the third of a c=1
    latency that placement alone can move (docs/performance-notes.md)."""
    metric = scenario.targets[0].metric if scenario.targets else "p50"

    def ratio(pair: tuple[dict | None, dict | None]) -> float | None:
        ours, theirs = pair
        if not ours or not theirs:
            return None
        if metric == "throughput":
            return ours["throughput"] / theirs["throughput"] if theirs.get("throughput") else None
        mine, other = ours["latency_us"].get("p50"), theirs["latency_us"].get("p50")
        return mine / other if mine and other else None

    ratios = [ratio(p) for p in pairs]
    ranked = sorted((r, i) for i, r in enumerate(ratios) if r is not None)
    if not ranked:
        return pairs[-1], ratios
    if metric == "throughput":
        ranked.reverse()  # best first: higher throughput ratios
    return pairs[ranked[len(ranked) // 2][1]], ratios


def _row(s: Scenario, client_label: str, ours: dict | None = None, triton: dict | None = None,
         skipped: str = "") -> dict[str, Any]:
    return {"name": s.name, "group": s.group, "title": s.title, "client_label": client_label, "ours": ours,
            "triton": triton, "skipped": skipped, "verdicts": [], "protocol": s.protocol,
            "shared_memory": s.shared_memory, "concurrency": s.concurrency, "model": s.model}


def _progress(side: str, result: dict | None) -> None:
    if result is None:
        print(f"  {side}: not measured", file=sys.stderr, flush=True)
        return
    p50 = result["latency_us"].get("p50")
    flag = "" if result.get("stable", True) else " (unstable)"
    print(f"  {side}: {result['throughput']:.1f} infer/sec, p50 {p50:.0f} usec{flag}", file=sys.stderr, flush=True)
