"""What a protocol layer alone costs: canned add_sub answers under perf_analyzer.

``python -m bench.floor measure --out DIR`` starts, one at a time, a server that answers every
``add_sub`` inference with a prebuilt response and loads it like the comparison does. The candidates:
``http`` (this project's HTTP server, :mod:`protocol.http.server`), ``grpc`` (this project's gRPC
server, :mod:`protocol.grpc.server`), ``grpclib`` and ``grpcio`` (grpc.aio with generic raw-bytes
handlers). No scheduler, no worker, no model: the server's CPU per request is the cost of that
protocol stack in one Python process, the throughput its ceiling on this machine.
The load is perf_analyzer (``--load perf_analyzer``, the device) or, where it is missing, a local
client process (``--load local``: grpc.aio or aiohttp, ``--concurrency`` calls in flight).
``python -m bench.floor serve --protocol P --port N`` runs one such server.
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
    from protocol.http.server import HttpServer, Response, Router

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


def _canned() -> dict[str, bytes]:
    from google.protobuf import json_format

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
    return {f"/inference.GRPCInferenceService/{name}": m.SerializeToString() for name, m in canned.items()}


def _serve_grpc(port: int, counter: list[int]) -> Any:
    from protocol.grpc.server import GrpcServer, Method

    methods = {}
    for path, data in _canned().items():
        async def handle(request: Any, call: Any, data: bytes = data,
                         infer: bool = path.endswith("/ModelInfer")) -> bytes:
            counter[0] += infer
            return data

        methods[path] = Method(bytes, handle)
    return GrpcServer(methods).start("127.0.0.1", port)


def _serve_grpclib(port: int, counter: list[int]) -> Any:
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server

    class Raw(CodecBase):  # bytes in, bytes out: no protobuf work in the measurement
        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return message

        def decode(self, data: bytes, message_type: Any) -> bytes:
            return data

    class Canned:
        def __mapping__(self) -> dict[str, Handler]:
            out = {}
            for path, data in _canned().items():
                async def handle(stream: Any, data: bytes = data, infer: bool = path.endswith("/ModelInfer")) -> None:
                    await stream.recv_message()
                    counter[0] += infer
                    await stream.send_message(data)

                out[path] = Handler(handle, Cardinality.UNARY_UNARY, bytes, bytes)
            return out

    server = Server([Canned()], codec=Raw())
    return server.start("127.0.0.1", port)


async def _serve_grpcio(port: int, counter: list[int]) -> Any:
    import grpc

    canned = _canned()

    class Generic(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            data = canned.get(details.method)
            if data is None:
                return None
            infer = details.method.endswith("/ModelInfer")

            async def handle(request: bytes, context: Any) -> bytes:
                counter[0] += infer
                return data

            return grpc.unary_unary_rpc_method_handler(handle)  # no (de)serializers: raw bytes

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Generic(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


_SERVERS = {"http": _serve_http, "grpc": _serve_grpc, "grpclib": _serve_grpclib, "grpcio": _serve_grpcio}
PROTOCOLS = tuple(_SERVERS)


def serve(protocol: str, port: int) -> None:
    """Answer until SIGTERM, then print ``requests=N cpu_s=S``."""
    import uvloop

    counter = [0]
    ready: list = []

    async def main() -> None:
        server = await _SERVERS[protocol](port, counter)  # kept: grpc.aio stops a server it collects
        ready.append(os.times())  # CPU from here on: imports and start-up are not per request
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        del server

    uvloop.run(main())
    t, t0 = os.times(), ready[0]
    print(f"requests={counter[0]} cpu_s={t.user + t.system - t0.user - t0.system:.3f}", flush=True)


def _infer_request() -> bytes:
    from protocol import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="add_sub")
    for i in (0, 1):
        request.inputs.add(name=f"INPUT{i}", datatype="INT32", shape=_SHAPE)
        request.raw_input_contents.append(bytes(64))
    return request.SerializeToString()


def load(protocol: str, port: int, concurrency: int, seconds: float) -> dict:
    """A local load: ``concurrency`` add_sub calls in flight on one connection for ``seconds``;
    the client's own p50 (it shares this machine's cores, so latency reads only within one run)."""
    import uvloop

    latencies: list[float] = []

    async def grpc_load() -> None:
        import grpc

        body = _infer_request()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            end = time.perf_counter() + seconds

            async def worker() -> None:
                while (t := time.perf_counter()) < end:
                    await infer(body)
                    latencies.append(time.perf_counter() - t)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def http_load() -> None:
        import aiohttp

        header = orjson.dumps({"inputs": [{"name": f"INPUT{i}", "datatype": "INT32", "shape": _SHAPE,
                                           "parameters": {"binary_data_size": 64}} for i in (0, 1)]})
        body = header + bytes(128)
        headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        url = f"http://127.0.0.1:{port}/v2/models/add_sub/infer"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            end = time.perf_counter() + seconds

            async def worker() -> None:
                while (t := time.perf_counter()) < end:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                    latencies.append(time.perf_counter() - t)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    uvloop.run(http_load() if protocol == "http" else grpc_load())
    latencies.sort()
    return {"throughput": len(latencies) / seconds,
            "latency_us": {"p50": round(1e6 * latencies[len(latencies) // 2]) if latencies else None},
            "stable": True}


def measure(out: Path, binary: str | None, concurrency: list[int], interval_ms: int,
            protocols: list[str] | None = None, how: str = "perf_analyzer") -> list[dict]:
    """Each protocol at each concurrency: the load's throughput and p50, the server's CPU per request."""
    from bench.inputs import BenchError
    from bench.perf_analyzer import PerfAnalyzerRun, run

    rows = []
    for n, protocol in enumerate(protocols or PROTOCOLS):
        port = 18350 + n
        for c in concurrency:
            server = subprocess.Popen([sys.executable, "-m", "bench.floor", "serve", "--protocol", protocol,
                                       "--port", str(port)], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            server.stdout.readline()  # "ready"
            t0 = time.perf_counter()
            try:
                if how == "local":
                    result: dict[str, Any] = load(protocol, port, c, 3 * interval_ms / 1000)
                else:
                    spec = PerfAnalyzerRun("add_sub", f"127.0.0.1:{port}", "http" if protocol == "http" else "grpc",
                                           concurrency=c, measurement_interval_ms=interval_ms, max_trials=5)
                    result = run(spec, binary)
            except (BenchError, OSError) as e:
                result = {"error": str(e)}
            wall = time.perf_counter() - t0
            server.send_signal(signal.SIGTERM)
            tail = server.communicate(timeout=30)[0]
            m = re.search(r"requests=(\d+) cpu_s=([0-9.]+)", tail)
            requests, cpu = (int(m[1]), float(m[2])) if m else (0, 0.0)
            rows.append({"protocol": protocol, "concurrency": c, "load": how, "infer_per_s": result.get("throughput"),
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
    s.add_argument("--protocol", choices=PROTOCOLS, required=True)
    s.add_argument("--port", type=int, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--perf-analyzer", default=None)
    m.add_argument("--concurrency", default="1,16")
    m.add_argument("--measurement-interval", type=int, default=2000)
    m.add_argument("--protocols", default=",".join(PROTOCOLS), help="candidates (default: all)")
    m.add_argument("--load", choices=["perf_analyzer", "local"], default="perf_analyzer",
                   help="the load generator (local: a client process here, no perf_analyzer needed)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.protocol, args.port)
    else:
        measure(args.out, args.perf_analyzer, [int(c) for c in args.concurrency.split(",")], args.measurement_interval,
                args.protocols.split(","), args.load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
