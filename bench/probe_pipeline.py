"""``python -m bench.probe_pipeline``: where a camera_pipeline request's time goes, server by server setting.

A probe, not a benchmark: one Python client (tritonclient.http, the frame in a registered system
shared-memory region) calls ``camera_pipeline`` on ``kernel start`` one request at a time, under
several ``--backend-config`` settings, and prints for each: the client's p50, each step's server-side
split (the statistics extension), and the CPU time each process of the server spent per request
(user/system, from /proc). The three steps' functions called directly in this process come first.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import types

import numpy as np

from bench.soak import worker_instances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["camera_preprocess", "camera_detector", "camera_postprocess"]
SETTINGS = {
    "default": [],
    "hold1ms": ["--backend-config", "python,front-hold-us=1000"],  # the default before stop 18
    "hold5ms": ["--backend-config", "python,front-hold-us=5000"],
    "workerspin5ms": ["--backend-config", "python,worker-spin-us=5000"],  # no worker sleeps between requests
    "nospin": ["--backend-config", "python,worker-spin-us=0", "--backend-config", "python,front-poll-us=0",
               "--backend-config", "ensemble,prewake=0"],
    "nochain": ["--backend-config", "ensemble,chain=0"],  # every hop through the front (before stop 20)
}


def _direct(frame: np.ndarray, calls: int) -> None:
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    fns = []
    for name in STEPS:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples/models", name, "1/model.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fns.append(getattr(module, {"camera_preprocess": "preprocess", "camera_detector": "detect",
                                    "camera_postprocess": "postprocess"}[name]))
    x = frame
    for name, fn in zip(STEPS, fns):
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            y = fn(x)
            samples.append(time.perf_counter_ns() - t0)
        samples.sort()
        print(f"direct {name}: p50 {samples[len(samples) // 2] / 1000:.0f} µs", flush=True)
        x = y


def _cpu(pid: int) -> tuple[float, float, int]:
    """A process's user and system CPU seconds and its minor page faults so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _top(raw: str, count: int = 30) -> None:
    """The functions a py-spy raw profile spent its samples in: self, then inclusive."""
    own: dict[str, int] = {}
    within: dict[str, int] = {}
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] = own.get(frames[-1], 0) + int(n)
            for frame in set(frames):
                within[frame] = within.get(frame, 0) + int(n)
    print(f"  py-spy of the front: {total} samples", flush=True)
    for title, table in (("self", own), ("inclusive", within)):
        print(f"  -- {title}")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:count]:
            print(f"  {100 * n / max(total, 1):5.1f} {frame}")


def _run(label: str, extra: list[str], frame: np.ndarray, requests: int, port: int, spy: str = "") -> None:
    import tritonclient.http as http
    import tritonclient.utils.shared_memory as shm

    cmd = [sys.executable, "-m", "kernel", "start", "--http-port", str(port), "--grpc-port", str(port + 1),
           "--metrics-port", str(port + 2), *extra]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handles = []
    try:
        client = http.InferenceServerClient(f"localhost:{port}")
        for _ in range(300):
            try:
                if client.is_server_ready():  # every model loaded: none starts during the measurement
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        key = f"/probe_{os.getpid()}_{port}"
        handles.append(shm.create_shared_memory_region("fin", key + "i", frame.nbytes))
        handles.append(shm.create_shared_memory_region("fout", key + "o", 4096))
        shm.set_shared_memory_region(handles[0], [frame])
        client.register_system_shared_memory("fin", key + "i", frame.nbytes)
        client.register_system_shared_memory("fout", key + "o", 4096)
        given = http.InferInput("FRAME", list(frame.shape), "UINT8")
        given.set_shared_memory("fin", frame.nbytes)
        wanted = http.InferRequestedOutput("DETECTIONS")
        wanted.set_shared_memory("fout", 4096)
        for _ in range(100):
            client.infer("camera_pipeline", [given], outputs=[wanted])
        names = {server.pid: "front", **worker_instances(server.pid)}
        pids = list(names)
        before_cpu = {p: _cpu(p) for p in pids}
        before = client.get_inference_statistics("")
        raw = f"/tmp/probe-{label}.raw"
        spying = subprocess.Popen([spy, "record", "-p", str(server.pid), "-r", "2000", "-f", "raw", "-o", raw,
                                   "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
            if spy else None
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter_ns()
            client.infer("camera_pipeline", [given], outputs=[wanted])
            samples.append(time.perf_counter_ns() - t0)
        after_cpu = {p: _cpu(p) for p in pids}
        after = client.get_inference_statistics("")
        if spying is not None:
            spying.send_signal(2)
            spying.wait()
        samples.sort()
        p50, p90 = samples[len(samples) // 2] / 1000, samples[len(samples) * 9 // 10] / 1000
        print(f"[{label}] p50 {p50:.0f} µs, p90 {p90:.0f}", flush=True)
        print("  CPU µs/request (user+sys): " + ", ".join(
            f"{names[p]} {(after_cpu[p][0] - before_cpu[p][0]) / requests * 1e6:.0f}"
            f"+{(after_cpu[p][1] - before_cpu[p][1]) / requests * 1e6:.0f}" for p in pids
            if after_cpu[p] != before_cpu[p]), flush=True)
        print("  minor page faults/request: " + ", ".join(
            f"{names[p]} {(after_cpu[p][2] - before_cpu[p][2]) / requests:.1f}" for p in pids), flush=True)
        stats0 = {m["name"]: m["inference_stats"] for m in before["model_stats"]}
        for m in after["model_stats"]:
            if m["name"] not in ["camera_pipeline", *STEPS]:
                continue
            s0, s1 = stats0[m["name"]], m["inference_stats"]
            n = max(s1["success"]["count"] - s0["success"]["count"], 1)
            parts = [(s1[k]["ns"] - s0[k]["ns"]) / n / 1000 for k in ("queue", "compute_input", "compute_infer",
                                                                        "compute_output")]
            print(f"  {m['name']}: " + " / ".join(f"{x:.0f}" for x in parts), flush=True)
        client.unregister_system_shared_memory()
        if spying is not None and os.path.exists(raw):
            _top(raw)
    finally:
        for h in handles:
            shm.destroy_shared_memory_region(h)
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--settings", default="default,hold1ms,workerspin5ms,nospin", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--py-spy", default="", help="a py-spy binary: profile the front of the first setting")
    args = parser.parse_args()
    frame = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    _direct(frame, 500)
    for i, label in enumerate(args.settings.split(",")):
        _run(label, SETTINGS[label], frame, args.requests, args.port + 10 * i, args.py_spy if i == 0 else "")


if __name__ == "__main__":
    main()
