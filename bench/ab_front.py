"""``python -m bench.ab_front --baseline-tree DIR``: this tree's front against another build's, on CPUs alone.

An A/B for machines without perf_analyzer (the 2-core VM): ``kernel start`` on examples/models from this
tree and from ``DIR`` (e.g. ``git worktree add DIR REV``), side by side, then rounds that load each in
turn with a lean HTTP/1.1 client (``--concurrency`` keep-alive connections, one JSON request in flight on
each, as perf_analyzer's; uvloop, no client library, so that the client leaves the front the CPU). Each
line: throughput, client p50, and the front's CPU per request (from /proc: with the front's polling on,
that includes its polling while it waits). Only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODIES = {
    "identity": {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]},
    "add_sub": {"inputs": [{"name": "INPUT0", "shape": [16], "datatype": "INT32", "data": [1] * 16},
                           {"name": "INPUT1", "shape": [16], "datatype": "INT32", "data": [2] * 16}]},
}


async def _connection(port: int, request: bytes, stop: float, latencies: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            start = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            at = head.find(b"Content-Length: ")
            body = await reader.readexactly(int(head[at + 16 : head.find(b"\r\n", at)]))
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the server answered {head[:12]!r}: {body[:200]!r}")
            latencies.append(time.perf_counter_ns() - start)
    finally:
        writer.close()


async def _load(port: int, model: str, concurrency: int, seconds: float) -> tuple[float, float]:
    body = json.dumps(BODIES[model]).encode()
    request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    warm: list = []
    await asyncio.gather(*(_connection(port, request, time.perf_counter() + 0.5, warm) for _ in range(concurrency)))
    latencies: list = []
    start = time.perf_counter()
    await asyncio.gather(*(_connection(port, request, start + seconds, latencies) for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), statistics.median(latencies) / 1000


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(tree: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "kernel", "start", "--model-repository",
                               os.path.join(ROOT, "examples", "models"), "--http-port", str(port), "--grpc-port",
                               str(port + 1), "--metrics-port", str(port + 2)], cwd=tree,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server of {tree} exited ({server.returncode})") from None
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"the server of {tree} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", required=True, help="the other build's source tree")
    parser.add_argument("--model", default="identity", choices=sorted(BODIES))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=19400)
    args = parser.parse_args()
    import uvloop

    sides = {"this": (ROOT, args.port), "baseline": (os.path.abspath(args.baseline_tree), args.port + 10)}
    servers = {name: _start(tree, port) for name, (tree, port) in sides.items()}
    try:
        for r in range(args.rounds):
            for name in (("baseline", "this") if r % 2 else ("this", "baseline")):
                pid, port = servers[name].pid, sides[name][1]
                before = _cpu_seconds(pid)
                rate, p50 = uvloop.run(_load(port, args.model, args.concurrency, args.seconds))
                cpu = (_cpu_seconds(pid) - before) / max(rate * args.seconds, 1) * 1e6
                print(f"{name:8s} {args.model} c={args.concurrency}: {rate:,.0f}/s, p50 {p50:,.0f} µs, front "
                      f"{cpu:.0f} µs of CPU per request", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
