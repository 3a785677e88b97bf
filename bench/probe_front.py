"""``python -m bench.probe_front``: where the front's time goes under perf_analyzer load, by py-spy.

A probe, not a benchmark: ``kernel start`` on examples/models, perf_analyzer loading one model
(``--model``, ``--protocol``, ``--concurrency``) for ``--seconds``, py-spy sampling the front for
the middle of that window; prints perf_analyzer's summary, the front's CPU per request and the
functions py-spy found it in (self, then inclusive).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request

from bench.perf_analyzer import find_binary
from bench.probe_pipeline import ROOT, _cpu, _top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="identity")
    parser.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--py-spy", default="")
    parser.add_argument("--port", type=int, default=18600)
    args = parser.parse_args()
    port = args.port
    server = subprocess.Popen([sys.executable, "-m", "kernel", "start", "--http-port", str(port), "--grpc-port",
                               str(port + 1), "--metrics-port", str(port + 2)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        url = f"localhost:{port + 1 if args.protocol == 'grpc' else port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://localhost:{port}/v2/health/ready", timeout=1)  # every model loaded
                break
            except OSError:
                time.sleep(0.1)
        interval = int(args.seconds * 1000 / 3)
        load = subprocess.Popen([find_binary(None), "-m", args.model, "-u", url, "-i", args.protocol,
                                 "--concurrency-range", str(args.concurrency), "-p", str(interval),
                                 "--max-trials", "3", "--stability-percentage", "100"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.seconds / 3)
        before, t0 = _cpu(server.pid), time.perf_counter()
        raw = "/tmp/probe-front.raw"
        spy = subprocess.Popen([args.py_spy, "record", "-p", str(server.pid), "-r", "2000", "-f", "raw", "-o", raw,
                                "-d", str(max(1, int(args.seconds / 3))), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if args.py_spy else None
        time.sleep(args.seconds / 3)
        after, t1 = _cpu(server.pid), time.perf_counter()
        out, _ = load.communicate(timeout=120)
        if spy is not None:
            spy.wait(30)
        print("\n".join(line for line in out.splitlines() if "throughput" in line.lower() or "latency" in line.lower()))
        stats = urllib.request.urlopen(f"http://localhost:{port}/v2/models/{args.model}/stats").read().decode()
        print(f"front CPU over {t1 - t0:.1f} s: user {after[0] - before[0]:.2f} s, sys {after[1] - before[1]:.2f} s",
              flush=True)
        print(stats[:600])
        if spy is not None and os.path.exists(raw):
            _top(raw, 40)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
