"""What a protocol layer alone costs: canned add_sub answers under perf_analyzer.

``python -m bench.floor measure --out DIR`` starts, one at a time, a server that answers every
``add_sub`` inference with a prebuilt response — over this project's HTTP server
(:mod:`protocol.httpserver`) and over grpclib — and loads it like the comparison does. No scheduler,
no worker, no model: the throughput is the ceiling of that protocol stack in one Python process on
this machine, to read beside Triton's numbers in docs/performance.md.
``python -m bench.floor serve --protocol http|grpc --port P`` runs one such server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

_SHAPE = [16]
_META = {"name": "add_sub", "versions": ["1"], "platform": "python",
         "inputs": [{"name": f"INPUT{i}", "datatype": "INT32", "shape": _SHAPE} for i in (0, 1)],
         "outputs": [{"name": f"OUTPUT{i}", "datatype": "INT32", "shape": _SHAPE} for i in (0, 1)]}
_CONFIG = {"name": "add_sub", "max_batch_size": 0, "backend": "python",
           "input": [{"name": f"INPUT{i}", "data_type": "TYPE_INT32", "dims": ["16"]} for i in (0, 1)],
           "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_INT32", "dims": ["16"]} for i in (0, 1)]}


def _serve_http(port: int, counter: list[int]) -> Any:
    from protocol.httpserver import HttpServer, Response, Router

    header = orjson.dumps({"model_name": "add_sub", "model_version": "1", "outputs": [
        {"name": f"OUTPUT{i}", "datatype": "INT32", "shape": _SHAPE, "parameters": {"binary_data_size": 64}}
        for i in (0, 1)]})
    answer = header + bytes(128)
    hl = {"Inference-Header-Content-Length": str(len(header))}

    def infer(request: Any) -> Response:
        counter[0] += 1
        return Response(answer, 200, "application/octet-stream", hl)

    r = Router()
    r.add("POST", "/v2/models/add_sub/infer", infer)
    r.add("GET", "/v2/models/add_sub", lambda q: Response(orjson.dumps(_META), 200, "application/json"))
    r.add("GET", "/v2/models/add_sub/config", lambda q: Response(orjson.dumps(_CONFIG), 200, "application/json"))
    r.add("GET", "/v2", lambda q: Response(b'{"name":"triton","version":"2.51.0","extensions":[]}', 200,
                                           "application/json"))
    r.add("GET", "/v2/health/{what}", lambda q: Response())
    server = HttpServer(r)
    return server.start("127.0.0.1", port)


def _serve_grpc(port: int, counter: list[int]) -> Any:
    from google.protobuf import json_format
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server

    from protocol import grpc_service_pb2 as pb

    infer = pb.ModelInferResponse(model_name="add_sub", model_version="1")
    for i in (0, 1):
        infer.outputs.add(name=f"OUTPUT{i}", datatype="INT32", shape=_SHAPE)
        infer.raw_output_contents.append(bytes(64))
    config = pb.ModelConfigResponse()
    json_format.ParseDict(_CONFIG, config.config)
    canned = {"ModelInfer": infer, "ModelMetadata": json_format.ParseDict(_META, pb.ModelMetadataResponse()),
              "ModelConfig": config, "ServerMetadata": pb.ServerMetadataResponse(name="triton", version="2.51.0"),
              "ServerLive": pb.ServerLiveResponse(live=True), "ServerReady": pb.ServerReadyResponse(ready=True),
              "ModelReady": pb.ModelReadyResponse(ready=True)}

    class Raw(CodecBase):  # bytes in, bytes out: no protobuf work in the measurement
        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return message

        def decode(self, data: bytes, message_type: Any) -> bytes:
            return data

    class Canned:
        def __mapping__(self) -> dict[str, Handler]:
            out = {}
            for name, message in canned.items():
                data = message.SerializeToString()

                async def handle(stream: Any, data: bytes = data, infer: bool = name == "ModelInfer") -> None:
                    await stream.recv_message()
                    counter[0] += infer
                    await stream.send_message(data)

                out[f"/inference.GRPCInferenceService/{name}"] = Handler(handle, Cardinality.UNARY_UNARY, bytes, bytes)
            return out

    server = Server([Canned()], codec=Raw())
    return server.start("127.0.0.1", port)


def serve(protocol: str, port: int) -> None:
    """Answer until SIGTERM, then print ``requests=N cpu_s=S``."""
    import uvloop

    counter = [0]

    async def main() -> None:
        await (_serve_http if protocol == "http" else _serve_grpc)(port, counter)
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    uvloop.run(main())
    t = os.times()
    print(f"requests={counter[0]} cpu_s={t.user + t.system:.3f}", flush=True)


def measure(out: Path, binary: str | None, concurrency: list[int], interval_ms: int) -> list[dict]:
    """Each protocol at each concurrency: perf_analyzer's throughput and p50, the server's CPU per request."""
    from bench.inputs import BenchError
    from bench.perf_analyzer import PerfAnalyzerRun, run

    rows = []
    for protocol, port in (("http", 18350), ("grpc", 18351)):
        for c in concurrency:
            server = subprocess.Popen([sys.executable, "-m", "bench.floor", "serve", "--protocol", protocol,
                                       "--port", str(port)], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            server.stdout.readline()  # "ready"
            t0 = time.perf_counter()
            spec = PerfAnalyzerRun("add_sub", f"127.0.0.1:{port}", protocol, concurrency=c,
                                   measurement_interval_ms=interval_ms, max_trials=5)
            try:
                result: dict[str, Any] = run(spec, binary)
            except BenchError as e:
                result = {"error": str(e)}
            wall = time.perf_counter() - t0
            server.send_signal(signal.SIGTERM)
            tail = server.communicate(timeout=30)[0]
            m = re.search(r"requests=(\d+) cpu_s=([0-9.]+)", tail)
            requests, cpu = (int(m[1]), float(m[2])) if m else (0, 0.0)
            rows.append({"protocol": protocol, "concurrency": c, "infer_per_s": result.get("throughput"),
                         "p50_us": result.get("latency_us", {}).get("p50"),
                         "server_cpu_us_per_request": round(1e6 * cpu / requests, 1) if requests else None,
                         "requests": requests, "wall_s": round(wall, 1), "stable": result.get("stable", False),
                         **({"error": result["error"]} if "error" in result else {})})
            print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "floor.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--protocol", choices=["http", "grpc"], required=True)
    s.add_argument("--port", type=int, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--perf-analyzer", default=None)
    m.add_argument("--concurrency", default="1,16")
    m.add_argument("--measurement-interval", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.protocol, args.port)
    else:
        measure(args.out, args.perf_analyzer, [int(c) for c in args.concurrency.split(",")], args.measurement_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
