"""The ``kernel`` command: ``kernel start`` serves a Triton model repository."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from kernel import __version__, host_policy
from kernel.api import Server
from kernel.cache import cache_setting, parse_cache_config
from kernel.errors import ServerError
from kernel.restricted import GRPC_PREFIX, Restrictions
from kernel.server import default_repository
from kernel.tracing import Tracer

log = logging.getLogger("kernel")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{text}'")


def _backend_config(text: str) -> tuple[str, str, str]:
    """``<backend>,<key>=<value>``, or tritonserver's global ``<key>=<value>`` (backend "")."""
    comma, eq = text.find(","), text.find("=")
    if eq > 0 and (comma < 0 or eq < comma):
        return "", text[:eq], text[eq + 1:]
    backend, _, setting = text.partition(",")
    key, eq_sign, value = setting.partition("=")
    if comma <= 0 or not eq_sign or not key:
        raise argparse.ArgumentTypeError(f"expected <backend>,<key>=<value> or <key>=<value>, got '{text}'")
    return backend, key, value


def _cache_setting(text: str) -> tuple[str, str, str]:
    try:
        return cache_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _host_policy(text: str) -> tuple[str, str, str]:
    try:
        return host_policy.parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel",
        description="edge-kernel: a Triton-compatible inference server for edge devices. Serves Triton model "
                    "repositories over KServe v2 HTTP/REST and gRPC, with model instances in worker processes "
                    "that exchange tensors through POSIX shared memory.")
    parser.add_argument("--version", action="version", version=f"edge-kernel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", add_help=False, help="measure a model like perf_analyzer (same as python -m bench)")
    start = sub.add_parser(
        "start", help="start the server on one or more model repositories",
        description="Start the inference server. With no flags it serves the example model repository "
                    "shipped with the project on ports 8000 (HTTP), 8001 (gRPC) and 8002 (metrics). Flag names "
                    "follow tritonserver's.")
    start.add_argument("--model-repository", "--model-store", action="append", dest="model_repository",
                       metavar="PATH", help="a model repository directory (repeatable; default: the bundled "
                                            "example repository)")
    start.add_argument("--backend-directory", action="append", default=[], metavar="PATH",
                       help="a directory of third-party backends, DIR/<name>/backend.py (or a Triton python-based "
                            "backend, DIR/<name>/model.py), searched before the built-in backends (python, "
                            "onnxruntime, pytorch); repeatable")
    start.add_argument("--backend-config", action="append", type=_backend_config, default=[],
                       metavar="<backend>,<key>=<value>",
                       help="a backend setting, e.g. onnxruntime,default-max-batch-size=8, "
                            "pytorch,libomp-path=/usr/lib/aarch64-linux-gnu/libgomp.so.1 or "
                            "python,shm-default-byte-size=8388608 (each worker's output arena); <key>=<value> "
                            "applies to every backend; repeatable")
    start.add_argument("--host-policy", action="append", type=_host_policy, default=[],
                       metavar="<policy>,<setting>=<value>",
                       help="a host policy setting, as tritonserver's: cpu-cores=<lower>-<upper>[,...] (the cores "
                            "the instances of that policy run on) or numa-node=<id>; instance groups name their "
                            "policy in host_policy, by default cpu, model or gpu_<device>; repeatable")
    start.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000; -1 disables)")
    start.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; -1 disables)")
    start.add_argument("--metrics-port", type=int, default=8002,
                       help="Prometheus metrics port (default 8002; -1 disables)")
    start.add_argument("--host", "--http-address", dest="host", default="0.0.0.0",
                       help="address to listen on (default 0.0.0.0)")
    start.add_argument("--log-verbose", type=int, default=0, metavar="LEVEL",
                       help="verbose logging level; 0 (default) is off")
    start.add_argument("--exit-timeout-secs", type=float, default=30.0, metavar="SECONDS",
                       help="how long shutdown waits for in-flight requests (default 30)")
    start.add_argument("--strict-model-config", type=_bool, default=False, metavar="BOOL",
                       help="true: use config.pbtxt as is, without auto-completion by the backend "
                            "(default false)")
    start.add_argument("--disable-auto-complete-config", action="store_true",
                       help="same as --strict-model-config=true")
    start.add_argument("--model-control-mode", choices=("none", "explicit"), default="none",
                       help="none: load every model at start (default); explicit: only --load-model models, "
                            "others through the model repository API")
    start.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="with --model-control-mode=explicit, a model to load at start ('*' for all)")
    start.add_argument("--strict-readiness", type=_bool, default=True, metavar="BOOL",
                       help="true (default): /v2/health/ready is ready only when every model is ready")
    start.add_argument("--exit-on-error", type=_bool, default=False, metavar="BOOL",
                       help="true: exit if a model fails to load at start (default false: keep serving the "
                            "others, the failed model stays UNAVAILABLE with its reason)")
    start.add_argument("--http-restricted-api", action="append", default=[], metavar="<API>:<KEY>=<VALUE>",
                       help="answer the named API categories (comma-separated: health, metadata, inference, "
                            "shared-memory, model-config, model-repository, statistics, trace, logging) over "
                            "HTTP only to requests with header KEY: VALUE (repeatable)")
    start.add_argument("--grpc-restricted-protocol", action="append", default=[], metavar="<API>:<KEY>=<VALUE>",
                       help="the same for gRPC; the metadata key is triton-grpc-protocol-KEY, as Triton's")
    start.add_argument("--grpc-max-message-size", type=int, default=64 << 20, metavar="BYTES",
                       help="largest gRPC message accepted or sent (default 64 MiB, enough for a 4K RGB frame)")
    start.add_argument("--grpc-keepalive-time", type=int, default=7200000, metavar="MS",
                       help="ping each gRPC connection this often (default 7200000, as Triton)")
    start.add_argument("--grpc-keepalive-timeout", type=int, default=20000, metavar="MS",
                       help="close a connection whose ping is not answered within this long (default 20000)")
    start.add_argument("--cache-config", action="append", type=_cache_setting, default=[],
                       metavar="<cache>,<key>=<value>",
                       help="the response cache, as tritonserver's: local,size=<bytes> keeps up to that many bytes "
                            "of responses (least recently used evicted first) for models whose config has "
                            "response_cache { enable: true }")
    start.add_argument("--response-cache-byte-size", type=int, default=None, metavar="BYTES",
                       help="DEPRECATED (as in tritonserver): same as --cache-config local,size=BYTES")
    start.add_argument("--trace-config", action="append", type=_backend_config, default=[],
                       metavar="[<mode>,]<setting>=<value>",
                       help="tracing, as tritonserver's: level=OFF|TIMESTAMPS|TENSORS (repeatable to combine), "
                            "rate=<one in N requests>, count=<traces, -1: unlimited>, triton,file=<path>, "
                            "triton,log-frequency=<traces per numbered file, 0: one file written at shutdown>, "
                            "mode=triton|opentelemetry, opentelemetry,url=<OTLP/HTTP endpoint>, "
                            "opentelemetry,resource=<key>=<value>, opentelemetry,bsp_max_queue_size|"
                            "bsp_schedule_delay|bsp_max_export_batch_size=<n>; "
                            "the setting can then be changed at /v2/trace/setting")
    return parser


def trace_config(settings: list[tuple[str, str, str]]) -> dict[str, Any]:
    """``--trace-config`` settings as kernel.tracing.Tracer's config (errors raise ValueError). As in Triton,
    the settings of the mode not chosen are ignored (``triton,file`` in mode opentelemetry)."""
    config: dict[str, Any] = {}
    for mode, key, value in settings:
        if mode not in ("", "triton", "opentelemetry"):
            raise ValueError(f'--trace-config: invalid value for trace mode option: {mode}. Available options are '
                             '"triton" and "opentelemetry"')
        if mode == "opentelemetry":  # checked by Tracer (kernel.otel.settings)
            if not value:
                raise ValueError("--trace-config option format is '<trace mode>,<setting>=<value>'. "
                                 f"Got {mode},{key}=")
            config.setdefault("opentelemetry", []).append((key, value))
            continue
        key = key.replace("-", "_")
        if key == "level":
            config.setdefault("level", []).append(value)
        elif key in ("rate", "count", "log_frequency", "file", "mode"):
            config[key] = value
        else:
            raise ValueError(f"unknown trace setting '{key}'")
    try:
        Tracer(config, export=False)  # checks the values (and, in mode opentelemetry, that the SDK is there)
    except ServerError as e:
        raise ValueError(f"--trace-config: {e}") from None
    return config


def main(argv: list[str] | None = None) -> int:
    rest = sys.argv[1:] if argv is None else argv
    if rest[:1] == ["bench"]:  # `kernel bench ...` is `python -m bench ...`
        from bench.cli import main as bench_main

        return bench_main(rest[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "start":
        parser.print_help()
        return 0 if args.command is None and argv is not None and not argv else 2
    logging.basicConfig(level=logging.DEBUG if args.log_verbose else logging.INFO,
                        format="%(levelname).1s%(asctime)s %(process)d %(name)s] %(message)s",
                        datefmt="%m%d %H:%M:%S", stream=sys.stderr)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """Triton's model table."""
    head = ("Model", "Version", "Status")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    out.append(line)
    print("\n".join(out), flush=True)


def raise_fd_limit() -> None:
    """Take the hard limit on open files as the soft one (workers inherit it).

    systemd starts services with a soft limit of 1,024; a worker keeps one descriptor per client region it
    used (to see whether its owner shrank it), so a thousand registrations would otherwise exhaust it.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as e:  # pragma: no cover - kept as it is
        log.warning("could not raise the open files limit: %s", e)


async def serve(args: Any) -> int:
    """Run the server until SIGINT/SIGTERM, then shut down cleanly."""
    raise_fd_limit()
    from protocol.http import HttpFront
    from protocol.httpserver import HttpServer, Response, Router

    backend_config: dict[str, dict[str, str]] = {}
    for backend, key, value in args.backend_config:
        backend_config.setdefault(backend, {})[key] = value
    policies: dict[str, dict[str, str]] = {}
    for name, setting, value in args.host_policy:
        policies.setdefault(name, {})[setting] = value
    try:
        tracing = trace_config(args.trace_config)
        cache_size = parse_cache_config(args.cache_config, args.response_cache_byte_size)
    except ValueError as e:
        log.error("error: %s", e)
        return 1
    server = Server(args.model_repository or [default_repository()],
                    strict_model_config=args.strict_model_config or args.disable_auto_complete_config,
                    model_control_mode=args.model_control_mode, load_models=args.load_model,
                    log_verbose=args.log_verbose, backend_config=backend_config,
                    backend_directory=args.backend_directory, exit_timeout=args.exit_timeout_secs,
                    strict_readiness=args.strict_readiness, host_policy=policies, trace_config=tracing,
                    response_cache_size=cache_size)
    core = server.core
    try:
        core.http_restricted = Restrictions.parse(args.http_restricted_api)
        core.grpc_restricted = Restrictions.parse(args.grpc_restricted_protocol, key_prefix=GRPC_PREFIX)
    except ValueError as e:
        log.error("error: %s", e)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http_servers: list[HttpServer] = []
    grpc_server = None
    try:
        try:
            await server.start_async()
        except Exception as e:
            log.error("error: creating server: %s", e)
            return 1
        print_table(core.table())
        if args.exit_on_error and not core.ready():
            log.error("error: creating server: Internal - failed to load all models")
            return 1
        # HTTP last: once it answers, gRPC and metrics listen too (tests and probes rely on it).
        if args.grpc_port >= 0:
            from protocol.grpc import GrpcFront

            grpc_server = GrpcFront(core, max_message_size=args.grpc_max_message_size,
                                    keepalive_time=args.grpc_keepalive_time / 1000,
                                    keepalive_timeout=args.grpc_keepalive_timeout / 1000).server()
            await grpc_server.start(args.host, args.grpc_port, reuse_address=True)
            log.info("Started GRPCInferenceService at %s:%d", args.host, args.grpc_port)
        if args.metrics_port >= 0:
            from kernel import metrics

            registry = metrics.registry(core)

            router = Router()
            router.add("GET", "/metrics", lambda request: Response(metrics.render(registry, core.custom_metrics), 200,
                                                                   metrics.CONTENT_TYPE))
            scrape = HttpServer(router)
            await scrape.start(args.host, args.metrics_port)
            http_servers.append(scrape)
            log.info("Started Metrics Service at %s:%d", args.host, args.metrics_port)
        if args.http_port >= 0:
            http = HttpFront(core).server()
            await http.start(args.host, args.http_port)
            http_servers.append(http)
            log.info("Started HTTPService at %s:%d", args.host, args.http_port)
        await stop.wait()
        log.info("Waiting for in-flight requests to complete.")
    finally:
        if grpc_server is not None:
            grpc_server.close()
            await grpc_server.wait_closed(args.exit_timeout_secs)
        for http in http_servers:
            await http.close(args.exit_timeout_secs)
        await server.stop_async()
        log.info("All models are stopped, shared memory removed. Exiting.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
