"""``python -m bench`` (also ``kernel bench``): perf_analyzer's core options against any KServe v2 server,
``python -m bench compare``: ours against the reference Triton, and ``python -m bench soak``: a mixed load
with workers killed, watching for leaks."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from bench.clients import PROTOCOLS, ClientOptions
from bench.inputs import BenchError, parse_shapes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}


def parse_range(text: str, cast: type = int) -> list:
    """perf_analyzer's ``start[:end[:step]]`` -> the values start, start+step, ... <= end."""
    parts = text.split(":")
    try:
        values = [cast(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start[:end[:step]], got '{text}'") from None
    if not 1 <= len(values) <= 3 or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive start[:end[:step]], got '{text}'")
    start = values[0]
    end = values[1] if len(values) > 1 else start
    step = values[2] if len(values) > 2 else 1
    if end < start:
        raise argparse.ArgumentTypeError(f"range end {end} is below its start {start}")
    out = []
    value = start
    while value <= end + 1e-9:
        out.append(value)
        value += step
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Measure throughput and latency of a model on any KServe v2 / Triton server (perf_analyzer's "
                    "core options), or in-process. 'bench compare --help' runs ours against the reference Triton.",
        epilog="Latencies are client-side, in microseconds; the server-side split comes from the statistics "
               "extension. Exit status: 0 done, 1 error (message on stderr), 2 bad options.")
    p.add_argument("-m", "--model-name", required=True, help="model to measure")
    p.add_argument("-x", "--model-version", default="", help="model version (default: the server's choice)")
    p.add_argument("-u", "--url", help="server address host:port (default localhost:8000 for http, "
                                       "localhost:8001 for grpc)")
    p.add_argument("-i", "--protocol", choices=PROTOCOLS, default="http",
                   help="http, grpc, or inprocess (our kernel.api.Server on --model-repository)")
    p.add_argument("--model-repository", default=os.path.join(REPO_ROOT, "examples", "models"),
                   help="model repository for -i inprocess (default: examples/models)")
    p.add_argument("-b", "--batch-size", type=int, default=1, help="batch size of each request (default 1)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency-range", type=parse_range, metavar="START[:END[:STEP]]",
                      help="outstanding requests, e.g. 1:16:4 (default 1)")
    load.add_argument("--request-rate-range", type=lambda t: parse_range(t, float), metavar="START[:END[:STEP]]",
                      help="requests per second sent on a schedule, whatever the latency")
    p.add_argument("--request-distribution", choices=("constant", "poisson"), default="constant",
                   help="time between scheduled requests in request-rate mode (default constant)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="dims of an input with variable dims, batch dimension excluded (repeatable)")
    p.add_argument("--input-data", default="random",
                   help="random (default), zero, a perf_analyzer JSON file or a directory of raw files")
    p.add_argument("--string-length", type=int, default=128, help="length of random BYTES elements (default 128)")
    p.add_argument("--shared-memory", choices=("none", "system"), default="none",
                   help="system: send inputs and receive outputs through registered POSIX shared memory")
    p.add_argument("--output-shared-memory-size", type=int, default=102400, metavar="BYTES",
                   help="size of each output region with --shared-memory system (default 102400)")
    p.add_argument("-p", "--measurement-interval", type=int, default=5000, metavar="MS",
                   help="length of one measurement window in ms (default 5000)")
    p.add_argument("-s", "--stability-percentage", type=float, default=10.0,
                   help="largest spread of throughput and latency across the last windows, in %% (default 10)")
    p.add_argument("--stability-windows", type=int, default=3, help="windows that must agree (default 3)")
    p.add_argument("-r", "--max-trials", type=int, default=10, help="most windows per load level (default 10)")
    p.add_argument("--percentile", type=int, default=50,
                   help="latency percentile used for stability (default 50; 0 = the average)")
    p.add_argument("--warmup-request-count", type=int, default=10,
                   help="requests answered before measuring each load level (default 10)")
    p.add_argument("-f", "--csv", metavar="PATH", help="write one CSV row per load level")
    p.add_argument("--json", metavar="PATH", help="write settings, results and every window as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a PNG plot of latency against throughput")
    return p


def options_from_args(args: argparse.Namespace) -> ClientOptions:
    concurrency = max(args.concurrency_range or [1])
    return ClientOptions(
        protocol=args.protocol, url=args.url or DEFAULT_URLS.get(args.protocol, ""), model=args.model_name,
        model_version=args.model_version, batch_size=args.batch_size, shapes=parse_shapes(args.shape),
        input_data=args.input_data, string_length=args.string_length, shared_memory=args.shared_memory,
        output_shm_size=args.output_shared_memory_size, model_repository=os.path.abspath(args.model_repository),
        max_connections=max(100, concurrency))


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as KeyboardInterrupt: clean-ups (shared memory, servers) run as on Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, interrupt)
    if argv and argv[0] == "compare":
        from bench.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "soak":
        from bench.soak import main as soak_main

        return soak_main(argv[1:])
    args = build_parser().parse_args(argv)
    from bench.profiler import Settings, run
    from bench.report import emit

    try:
        if args.measurement_interval <= 0 or args.max_trials < 1 or args.stability_windows < 1:
            raise BenchError("--measurement-interval, --max-trials and --stability-windows must be positive")
        if args.max_trials < args.stability_windows:
            raise BenchError("--max-trials must be at least --stability-windows")
        options = options_from_args(args)
        settings = Settings(concurrency=args.concurrency_range or [], request_rates=args.request_rate_range or [],
                            request_distribution=args.request_distribution,
                            measurement_interval_ms=args.measurement_interval,
                            stability_percentage=args.stability_percentage,
                            stability_windows=args.stability_windows, max_trials=args.max_trials,
                            percentile=args.percentile or None, warmup_requests=max(args.warmup_request_count, 0))
        report = run(options, settings)
        emit(report, sys.stdout, args.csv, args.json, args.plot)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
