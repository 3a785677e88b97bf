"""The ``kernel`` command: ``kernel start`` serves a Triton model repository.

``kernel start`` takes tritonserver 2.51's command line, so that the Kubernetes manifest or systemd unit
written for Triton starts this server unchanged: the same flag names, value syntax (booleans as
true/on/1, ``--flag value`` or ``--flag=value``) and, where a value is refused, tritonserver's words.
A flag is either applied, or accepted without effect (:data:`NO_EFFECT`: the parts of Triton this
server does not have, such as its memory pools or SageMaker endpoint), each one given logged at start
with the reason; an unknown flag is refused, as tritonserver refuses it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from kernel import __version__, host_policy, logs
from kernel.api import Server
from kernel.cache import cache_setting, parse_cache_config
from kernel.errors import ServerError
from kernel.restricted import GRPC_PREFIX, Restrictions
from kernel.server import default_repository
from kernel.tracing import Tracer

log = logging.getLogger("kernel")


def _bool(text: str) -> bool:
    """tritonserver's booleans: true/on/1, false/off/0 (any case; yes/no too)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid value for bool option: {text}")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid option value. Got {text}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid option value. Got {text}") from None


def _int_bool(text: str) -> int:
    """``--log-verbose``: a level, or true/false (1/0), as tritonserver reads it."""
    lowered = text.strip().lower()
    return 1 if lowered == "true" else 0 if lowered == "false" else _int(text)


def _pair(second: Callable[[str], Any]) -> Callable[[str], tuple[int, Any]]:
    """``<integer>:<value>`` (``--cuda-memory-pool-byte-size 0:67108864``, ``--model-load-gpu-limit 0:0.8``)."""
    def parse(text: str) -> tuple[int, Any]:
        first, sep, rest = text.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError("Cannot parse pair option due to incorrect number of inputs.--<pair "
                                              "option> argument requires format <first>:<second>. Found: " + text)
        return _int(first), second(rest)
    return parse


def _choice(flag: str, *choices: str, lower: bool = True) -> Callable[[str], str]:
    """A value among ``choices`` (case-insensitive unless ``lower`` is false), with tritonserver's error."""
    def parse(text: str) -> str:
        value = text.lower() if lower else text
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid argument for --{flag}")
        return value
    return parse


def _rate_limit_resource(text: str) -> tuple[str, int, int]:
    """``<resource_name>:<count>[:<device>]``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError("--rate-limit-resource option format is '<resource_name>:<count>:<device>' "
                                          f"or '<resource_name>:<count>'. Got {text}")
    return parts[0], _int(parts[1]), _int(parts[2]) if len(parts) == 3 else -1


def _setting(flag: str) -> Callable[[str], tuple[str, str]]:
    """``<setting>=<value>`` (``--metrics-config``)."""
    def parse(text: str) -> tuple[str, str]:
        key, eq, value = text.partition("=")
        if not eq or "," in key:
            raise argparse.ArgumentTypeError(f"--{flag} option format is <setting>=<value>. Got {text}")
        return key, value
    return parse


def _config_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("Error: empty argument for --model-config-name")
    return text


def backend_setting(text: str) -> tuple[str, str, str]:
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


#: tritonserver flags accepted here without effect: flag -> (value type, metavar, repeatable, why). Each one
#: given is logged once with its reason (log_no_effect), so a Triton command line starts unchanged.
NO_EFFECT: dict[str, tuple[Callable[[str], Any], str, bool, str]] = {
    "--pinned-memory-pool-byte-size": (_int, "BYTES", False, "tensors pass between the front and the workers in POSIX "
                                       "shared memory; there is no pinned staging pool (GPU workers page-lock their "
                                       "shared memory themselves)"),
    "--cuda-memory-pool-byte-size": (_pair(_int), "<device>:<bytes>", True, "the front allocates no CUDA memory; GPU "
                                     "tensors are the frameworks' own, in the workers"),
    "--cuda-virtual-address-size": (_pair(_int), "<device>:<bytes>", True, "implicit sequence state is kept by each "
                                    "instance's worker, not in growable CUDA memory"),
    "--min-supported-compute-capability": (_float, "FLOAT", False, "GPUs are not filtered by compute capability "
                                           "here; CUDA_VISIBLE_DEVICES chooses them"),
    "--buffer-manager-thread-count": (_int, "N", False, "there is no buffer manager: workers read inputs where they "
                                      "lie in shared memory"),
    "--model-namespacing": (_bool, "BOOL", False, "model names must be unique across the repositories here (as with "
                            "Triton's default, false)"),
    "--enable-peer-access": (_bool, "BOOL", False, "the front makes no CUDA peer mappings; the frameworks in the "
                             "workers manage their devices"),
    "--model-load-gpu-limit": (_pair(_float), "<device>:<fraction>", True, "GPU memory use is not checked before a "
                               "model loads"),
    "--rate-limit": (_choice("rate-limit", "execution_count", "off"), "execution_count|off", False,
                     "there is no rate limiter: a request runs as soon as an instance is free (Triton's off)"),
    "--rate-limit-resource": (_rate_limit_resource, "<name>:<count>[:<device>]", True, "there is no rate limiter "
                              "(see --rate-limit)"),
    "--repoagent-directory": (str, "PATH", False, "there are no repository agents"),
    "--cache-directory": (str, "PATH", False, "the response cache is built in (--cache-config local,size=N); no "
                          "cache library is loaded"),
    "--http-thread-count": (_int, "N", False, "one event loop serves every HTTP connection"),
    "--grpc-infer-allocation-pool-size": (_int, "N", False, "there is no pool of request and response objects"),
    "--grpc-infer-response-compression-level": (_choice("grpc_infer_response_compression_level", "none", "low",
                                                        "medium", "high"), "none|low|medium|high", False,
                                                "a response is compressed as its request was (grpc-encoding gzip "
                                                "or deflate), at that codec's default level"),
    "--grpc-keepalive-permit-without-calls": (_bool, "BOOL", False, "keepalive pings are sent every "
                                              "--grpc-keepalive-time whether or not calls are in flight"),
    "--grpc-http2-max-pings-without-data": (_int, "N", False, "the gRPC server answers every PING"),
    "--grpc-http2-min-recv-ping-interval-without-data": (_int, "MS", False, "the gRPC server answers every PING"),
    "--grpc-http2-max-ping-strikes": (_int, "N", False, "the gRPC server answers every PING"),
    "--grpc-max-connection-age": (_int, "MS", False, "gRPC connections are not closed for their age"),
    "--grpc-max-connection-age-grace": (_int, "MS", False, "gRPC connections are not closed for their age"),
    "--allow-sagemaker": (_bool, "BOOL", False, "there is no SageMaker endpoint"),
    "--sagemaker-port": (_int, "PORT", False, "there is no SageMaker endpoint"),
    "--sagemaker-safe-port-range": (str, "<low>-<high>", False, "there is no SageMaker endpoint"),
    "--sagemaker-thread-count": (_int, "N", False, "there is no SageMaker endpoint"),
    "--allow-vertex-ai": (_bool, "BOOL", False, "there is no Vertex AI endpoint"),
    "--vertex-ai-port": (_int, "PORT", False, "there is no Vertex AI endpoint"),
    "--vertex-ai-thread-count": (_int, "N", False, "there is no Vertex AI endpoint"),
    "--vertex-ai-default-model": (str, "NAME", False, "there is no Vertex AI endpoint"),
    "--allow-gpu-metrics": (_bool, "BOOL", False, "the server exposes no GPU metric families (nv_gpu_*)"),
    "--metrics-interval-ms": (_float, "MS", False, "metrics are read when /metrics is scraped, not polled"),
}

#: tritonserver's deprecated tracing flags -> the --trace-config setting each one is (mode, key), and its metavar
DEPRECATED_TRACE: dict[str, tuple[str, str, str]] = {
    "--trace-file": ("triton", "file", "PATH"),
    "--trace-level": ("", "level", "OFF|TIMESTAMPS|TENSORS"),
    "--trace-rate": ("", "rate", "N"),
    "--trace-count": ("", "count", "N"),
    "--trace-log-frequency": ("triton", "log-frequency", "N"),
}

#: Triton's backends that are built in here (ensemble: the pseudo-backend of --backend-config ensemble,...)
BUILT_IN_BACKENDS = ("python", "onnxruntime", "pytorch", "tensorrt", "ensemble")


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
                    "shipped with the project on ports 8000 (HTTP), 8001 (gRPC) and 8002 (metrics). Flags are "
                    "tritonserver's (2.51); those that do not apply here are accepted and say so in the log.")
    server = start.add_argument_group("Server")
    server.add_argument("--id", default="triton", metavar="ID",
                        help="the server's name, as GET /v2 and gRPC ServerMetadata report it (default triton)")
    server.add_argument("--exit-timeout-secs", type=float, default=30.0, metavar="SECONDS",
                        help="how long shutdown waits for in-flight requests (default 30)")
    logs_ = start.add_argument_group("Logging")
    logs_.add_argument("--log-verbose", type=_int_bool, default=0, metavar="LEVEL",
                       help="verbose logging level; 0 (default) is off")
    logs_.add_argument("--log-info", type=_bool, default=True, metavar="BOOL", help="info lines (default true)")
    logs_.add_argument("--log-warning", type=_bool, default=True, metavar="BOOL", help="warning lines (default true)")
    logs_.add_argument("--log-error", type=_bool, default=True, metavar="BOOL", help="error lines (default true)")
    logs_.add_argument("--log-format", type=_choice("log-format", *logs.FORMATS, lower=False), default="default",
                       metavar="default|ISO8601",
                       help="default: lines start LMMDD hh:mm:ss.ssssss; ISO8601: YYYY-MM-DDThh:mm:ssZ L (UTC, as "
                            "tritonserver)")
    logs_.add_argument("--log-file", default="", metavar="PATH",
                       help="append the log (the workers' and the model table included) to this file instead of "
                            "the console")
    repo = start.add_argument_group("Model Repository")
    repo.add_argument("--model-repository", "--model-store", action="append", dest="model_repository",
                      metavar="PATH", help="a model repository directory (repeatable; default: the bundled "
                                           "example repository)")
    repo.add_argument("--exit-on-error", type=_bool, default=False, metavar="BOOL",
                      help="true: exit if a model fails to load at start (default false: keep serving the "
                           "others, the failed model stays UNAVAILABLE with its reason)")
    repo.add_argument("--disable-auto-complete-config", action="store_true",
                      help="use config.pbtxt as is, without auto-completion by the backend")
    repo.add_argument("--strict-model-config", type=_bool, default=None, metavar="BOOL",
                      help="DEPRECATED (as in tritonserver): true is --disable-auto-complete-config")
    repo.add_argument("--strict-readiness", type=_bool, default=True, metavar="BOOL",
                      help="true (default): /v2/health/ready is ready only when every model is ready")
    repo.add_argument("--model-control-mode", type=_choice("model-control-mode", "none", "poll", "explicit"),
                      default="none", metavar="none|poll|explicit",
                      help="none: load every model at start (default); poll: also rescan the repositories every "
                           "--repository-poll-secs and load, reload and unload models as their files change; "
                           "explicit: only --load-model models, others through the model repository API")
    repo.add_argument("--repository-poll-secs", type=_int, default=15, metavar="SECONDS",
                      help="with --model-control-mode=poll, seconds between rescans (default 15; 0: none); "
                           "ignored in the other modes, as by tritonserver")
    repo.add_argument("--load-model", action="append", default=[], metavar="NAME",
                      help="with --model-control-mode=explicit, a model to load at start ('*' for all)")
    repo.add_argument("--model-config-name", type=_config_name, default=None, metavar="NAME",
                      help="load models from <model>/configs/NAME.pbtxt where there is one, else config.pbtxt")
    repo.add_argument("--model-load-thread-count", type=_int, default=0, metavar="N",
                      help="how many model versions load at once (default: all)")
    repo.add_argument("--model-load-retry-count", type=_int, default=0, metavar="N",
                      help="how many times a model version that fails to load is tried again (default 0)")
    http = start.add_argument_group("HTTP")
    http.add_argument("--allow-http", type=_bool, default=True, metavar="BOOL",
                      help="false: no HTTP/REST endpoint (default true)")
    http.add_argument("--http-port", type=_int, default=8000, metavar="PORT",
                      help="HTTP/REST port (default 8000; -1 disables)")
    http.add_argument("--host", default="0.0.0.0", metavar="ADDRESS",
                      help="the address every endpoint listens on unless its own flag says (default 0.0.0.0)")
    http.add_argument("--http-address", default=None, metavar="ADDRESS",
                      help="the HTTP endpoint's address (default --host); the metrics endpoint's too unless "
                           "--metrics-address says")
    http.add_argument("--reuse-http-port", type=_bool, default=False, metavar="BOOL",
                      help="true: listen with SO_REUSEPORT, so that several servers share the port")
    http.add_argument("--http-header-forward-pattern", default="", metavar="REGEX",
                      help="HTTP headers whose name matches (case-insensitive, anywhere in the name) reach the "
                           "model as request parameters of an inference request")
    http.add_argument("--http-restricted-api", action="append", default=[], metavar="<API>:<KEY>=<VALUE>",
                      help="answer the named API categories (comma-separated: health, metadata, inference, "
                           "shared-memory, model-config, model-repository, statistics, trace, logging) over "
                           "HTTP only to requests with header KEY: VALUE (repeatable)")
    grpc = start.add_argument_group("GRPC")
    grpc.add_argument("--allow-grpc", type=_bool, default=True, metavar="BOOL",
                      help="false: no gRPC endpoint (default true)")
    grpc.add_argument("--grpc-port", type=_int, default=8001, metavar="PORT",
                      help="gRPC port (default 8001; -1 disables)")
    grpc.add_argument("--grpc-address", default=None, metavar="ADDRESS", help="the gRPC endpoint's address "
                                                                              "(default --host)")
    grpc.add_argument("--reuse-grpc-port", type=_bool, default=False, metavar="BOOL",
                      help="true: listen with SO_REUSEPORT, so that several servers share the port")
    grpc.add_argument("--grpc-header-forward-pattern", default="", metavar="REGEX",
                      help="gRPC metadata whose key matches (case-insensitive, anywhere in the key) reach the model "
                           "as request parameters of ModelInfer and ModelStreamInfer requests")
    grpc.add_argument("--grpc-restricted-protocol", action="append", default=[], metavar="<API>:<KEY>=<VALUE>",
                      help="the same for gRPC; the metadata key is triton-grpc-protocol-KEY, as Triton's")
    grpc.add_argument("--grpc-use-ssl", type=_bool, default=False, metavar="BOOL",
                      help="true: gRPC over TLS, with --grpc-server-cert and --grpc-server-key")
    grpc.add_argument("--grpc-use-ssl-mutual", type=_bool, default=False, metavar="BOOL",
                      help="true: gRPC over TLS with client certificates, verified against --grpc-root-cert "
                           "(implies --grpc-use-ssl)")
    grpc.add_argument("--grpc-server-cert", default="", metavar="PATH", help="the server's PEM certificate (chain)")
    grpc.add_argument("--grpc-server-key", default="", metavar="PATH", help="the server's PEM private key")
    grpc.add_argument("--grpc-root-cert", default="", metavar="PATH",
                      help="PEM certificates that client certificates must chain to (mutual TLS)")
    grpc.add_argument("--grpc-max-message-size", type=_int, default=64 << 20, metavar="BYTES",
                      help="largest gRPC message accepted or sent (default 64 MiB, enough for a 4K RGB frame)")
    grpc.add_argument("--grpc-keepalive-time", type=_int, default=7200000, metavar="MS",
                      help="ping each gRPC connection this often (default 7200000, as Triton)")
    grpc.add_argument("--grpc-keepalive-timeout", type=_int, default=20000, metavar="MS",
                      help="close a connection whose ping is not answered within this long (default 20000)")
    metrics = start.add_argument_group("Metrics")
    metrics.add_argument("--allow-metrics", type=_bool, default=True, metavar="BOOL",
                         help="false: no metrics endpoint (default true)")
    metrics.add_argument("--metrics-port", type=_int, default=8002, metavar="PORT",
                         help="Prometheus metrics port (default 8002; -1 disables)")
    metrics.add_argument("--metrics-address", default=None, metavar="ADDRESS",
                         help="the metrics endpoint's address (default: the HTTP endpoint's)")
    metrics.add_argument("--allow-cpu-metrics", type=_bool, default=True, metavar="BOOL",
                         help="false: leave out the CPU families (nv_cpu_memory_*)")
    metrics.add_argument("--metrics-config", action="append", type=_setting("metrics-config"), default=[],
                         metavar="<setting>=<value>",
                         help="counter_latencies=false leaves out the *_duration_us families; other settings "
                              "(summary_latencies, summary_quantiles) have no effect here")
    tracing = start.add_argument_group("Tracing")
    tracing.add_argument("--trace-config", action="append", type=backend_setting, default=[],
                         metavar="[<mode>,]<setting>=<value>",
                         help="tracing, as tritonserver's: level=OFF|TIMESTAMPS|TENSORS (repeatable to combine), "
                              "rate=<one in N requests>, count=<traces, -1: unlimited>, triton,file=<path>, "
                              "triton,log-frequency=<traces per numbered file, 0: one file written at shutdown>, "
                              "mode=triton|opentelemetry, opentelemetry,url=<OTLP/HTTP endpoint>, "
                              "opentelemetry,resource=<key>=<value>, opentelemetry,bsp_max_queue_size|"
                              "bsp_schedule_delay|bsp_max_export_batch_size=<n>; "
                              "the setting can then be changed at /v2/trace/setting")
    for flag, (mode, key, metavar) in DEPRECATED_TRACE.items():
        tracing.add_argument(flag, action="append", default=[], metavar=metavar,
                             help=f"DEPRECATED (as in tritonserver): --trace-config {mode + ',' if mode else ''}{key}=")
    backend = start.add_argument_group("Backend")
    backend.add_argument("--backend-directory", action="append", default=[], metavar="PATH",
                         help="a directory of third-party backends, DIR/<name>/backend.py (or a Triton python-based "
                              "backend, DIR/<name>/model.py), searched before the built-in backends (python, "
                              "onnxruntime, pytorch, tensorrt); repeatable")
    backend.add_argument("--backend-config", action="append", type=backend_setting, default=[],
                         metavar="<backend>,<key>=<value>",
                         help="a backend setting, e.g. onnxruntime,default-max-batch-size=8, "
                              "pytorch,libomp-path=/usr/lib/aarch64-linux-gnu/libgomp.so.1 or "
                              "python,shm-default-byte-size=8388608 (each worker's output arena); <key>=<value> "
                              "applies to every backend; repeatable")
    backend.add_argument("--host-policy", action="append", type=_host_policy, default=[],
                         metavar="<policy>,<setting>=<value>",
                         help="a host policy setting, as tritonserver's: cpu-cores=<lower>-<upper>[,...] (the cores "
                              "the instances of that policy run on) or numa-node=<id>; instance groups name their "
                              "policy in host_policy, by default cpu, model or gpu_<device>; repeatable")
    cache = start.add_argument_group("Response Cache")
    cache.add_argument("--cache-config", action="append", type=_cache_setting, default=[],
                       metavar="<cache>,<key>=<value>",
                       help="the response cache, as tritonserver's: local,size=<bytes> keeps up to that many bytes "
                            "of responses (least recently used evicted first) for models whose config has "
                            "response_cache { enable: true }")
    cache.add_argument("--response-cache-byte-size", type=_int, default=None, metavar="BYTES",
                       help="DEPRECATED (as in tritonserver): same as --cache-config local,size=BYTES")
    ignored = start.add_argument_group(
        "Accepted without effect", "tritonserver's flags that do not apply here take its values; each one given is "
        "logged at start with the reason.")
    for flag, (kind, metavar, repeat, why) in NO_EFFECT.items():
        ignored.add_argument(flag, type=kind, metavar=metavar, action="append" if repeat else "store",
                             dest=_ignored_dest(flag), help=f"no effect: {why}")
    return parser


def _ignored_dest(flag: str) -> str:
    return "ignored_" + flag[2:].replace("-", "_")


def trace_config(settings: list[tuple[str, str, str]]) -> dict[str, Any]:
    """``--trace-config`` settings as kernel.tracing.Tracer's config (errors raise ValueError). As in Triton,
    the settings of the mode not chosen are ignored (``triton,file`` in mode opentelemetry)."""
    config: dict[str, Any] = {}
    for mode, key, value in settings:
        if mode not in ("", "triton", "opentelemetry"):
            raise ValueError(f'--trace-config: invalid value for trace mode option: {mode}. Available options are '
                             '"triton" and "opentelemetry"')
        if mode == "opentelemetry":  # checked by Tracer (kernel.otel_settings)
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


_TRACE_WARNINGS = {
    "--trace-file": "'--trace-config triton,file=<filepath> instead.",
    "--trace-level": "'--trace-config level=<OFF|TIMESTAMPS|TENSORS> instead.",
    "--trace-rate": "'--trace-config rate=<rate value> instead.",
    "--trace-count": "'--trace-config count=<count value> instead.",
    "--trace-log-frequency": "'--trace-config triton,log-frequency=<log frequency value> instead.",
}


def check_args(args: Any) -> str:
    """What tritonserver refuses after parsing (its message), or ""; prints its deprecation warnings."""
    if args.load_model and args.model_control_mode != "explicit":
        return "Error: Use of '--load-model' requires setting '--model-control-mode=explicit' as well."
    for flag, warning in _TRACE_WARNINGS.items():
        if getattr(args, flag[2:].replace("-", "_")):
            print(f"Warning: '{flag}' has been deprecated and will be removed in future releases. Please use "
                  f"{warning}", file=sys.stderr)
    if args.strict_model_config is not None:
        print("Warning: '--strict-model-config' has been deprecated! Please use '--disable-auto-complete-config' "
              "instead.", file=sys.stderr)
        if args.disable_auto_complete_config and not args.strict_model_config:
            print("Warning: Overriding deprecated '--strict-model-config' from False to True in favor of "
                  "'--disable-auto-complete-config'!", file=sys.stderr)
    return ""


def main(argv: list[str] | None = None) -> int:
    rest = sys.argv[1:] if argv is None else argv
    if rest[:1] == ["bench"]:  # `kernel bench ...` is `python -m bench ...`
        from bench.cli import main as bench_main

        return bench_main(rest[1:])
    if rest[:2] == ["start", "tritonserver"]:
        # A command line written for Triton, program name included, after this image's `kernel start`
        # entrypoint: KServe's Triton ServingRuntime passes its args so (`tritonserver --model-store=...`).
        rest = ["start", *rest[2:]]
    parser = build_parser()
    args = parser.parse_args(rest)
    if args.command != "start":
        parser.print_help()
        return 0 if args.command is None and argv is not None and not argv else 2
    problem = check_args(args)
    if problem:
        print(f"kernel start: error: {problem}", file=sys.stderr)
        return 2
    logs.configure(args.log_verbose, args.log_info, args.log_warning, args.log_error, args.log_format, args.log_file)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))


def log_no_effect(args: Any, backend_config: dict[str, dict[str, str]]) -> None:
    """One line for each flag given that does nothing here, with the reason."""
    for flag, (_, _, _, why) in NO_EFFECT.items():
        if getattr(args, _ignored_dest(flag)) is not None:
            log.info("%s has no effect here: %s", flag, why)
    known = set(BUILT_IN_BACKENDS)
    for directory in args.backend_directory:
        try:
            known.update(entry for entry in os.listdir(directory) if os.path.isdir(os.path.join(directory, entry)))
        except OSError:
            pass
    for name in sorted(set(backend_config) - known - {""}):
        log.info("--backend-config %s,...: there is no backend '%s' here; its settings have no effect", name, name)
    for key, _ in args.metrics_config:
        if key != "counter_latencies":
            log.info("--metrics-config %s has no effect here: only counter_latencies applies (no summaries)", key)


def forward_pattern(flag: str, pattern: str) -> re.Pattern | None:
    """A ``--*-header-forward-pattern`` compiled (case-insensitive, as Triton makes it); ValueError if invalid."""
    if not pattern:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{flag}: invalid regular expression '{pattern}': {e}") from None


def grpc_tls(args: Any) -> ssl.SSLContext | None:
    """``--grpc-use-ssl[-mutual]``: the TLS context of the gRPC endpoint (HTTP/2 negotiated by ALPN), or None;
    ValueError when a certificate or key cannot be used."""
    if not (args.grpc_use_ssl or args.grpc_use_ssl_mutual):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(args.grpc_server_cert, args.grpc_server_key or None)
        if args.grpc_use_ssl_mutual:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.grpc_root_cert)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"failed to start GRPC service: TLS: {e}") from None
    return context


def trace_settings(args: Any) -> list[tuple[str, str, str]]:
    """``--trace-config`` settings, after those of the deprecated flags (which they override, as in Triton)."""
    settings = [(mode, key, value) for flag, (mode, key, _) in DEPRECATED_TRACE.items()
                for value in getattr(args, flag[2:].replace("-", "_"))]
    return settings + list(args.trace_config)


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
    from protocol.http.front import HttpFront
    from protocol.http.server import HttpServer, Response, Router

    backend_config: dict[str, dict[str, str]] = {}
    for backend, key, value in args.backend_config:
        backend_config.setdefault(backend, {})[key] = value
    policies: dict[str, dict[str, str]] = {}
    for name, setting, value in args.host_policy:
        policies.setdefault(name, {})[setting] = value
    log_no_effect(args, backend_config)
    try:
        tracing = trace_config(trace_settings(args))
        cache_size = parse_cache_config(args.cache_config, args.response_cache_byte_size)
        tls = grpc_tls(args)
        http_forward = forward_pattern("--http-header-forward-pattern", args.http_header_forward_pattern)
        grpc_forward = forward_pattern("--grpc-header-forward-pattern", args.grpc_header_forward_pattern)
    except ValueError as e:
        log.error("error: %s", e)
        return 1
    server = Server(args.model_repository or [default_repository()],
                    strict_model_config=bool(args.strict_model_config) or args.disable_auto_complete_config,
                    model_control_mode=args.model_control_mode, load_models=args.load_model,
                    log_verbose=args.log_verbose, backend_config=backend_config,
                    backend_directory=args.backend_directory, exit_timeout=args.exit_timeout_secs,
                    strict_readiness=args.strict_readiness, host_policy=policies, trace_config=tracing,
                    response_cache_size=cache_size, repository_poll_secs=args.repository_poll_secs,
                    model_config_name=args.model_config_name or "",
                    model_load_thread_count=args.model_load_thread_count,
                    model_load_retry_count=args.model_load_retry_count, server_id=args.id)
    core = server.core
    core.http_forward, core.grpc_forward = http_forward, grpc_forward
    try:
        core.http_restricted = Restrictions.parse(args.http_restricted_api)
        core.grpc_restricted = Restrictions.parse(args.grpc_restricted_protocol, key_prefix=GRPC_PREFIX)
    except ValueError as e:
        log.error("error: %s", e)
        return 1
    http_address = args.http_address or args.host
    grpc_address = args.grpc_address or args.host
    metrics_address = args.metrics_address or http_address
    counter_latencies = dict(args.metrics_config).get("counter_latencies") != "false"
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
        if args.log_info:  # Triton logs its model table as an info line
            print_table(core.table())
        if args.exit_on_error and not core.all_loaded():
            log.error("error: creating server: Internal - failed to load all models")
            return 1
        # HTTP last: once it answers, gRPC and metrics listen too (tests and probes rely on it).
        if args.allow_grpc and args.grpc_port >= 0:
            from protocol.grpc.front import GrpcFront

            grpc_server = GrpcFront(core, max_message_size=args.grpc_max_message_size,
                                    keepalive_time=args.grpc_keepalive_time / 1000,
                                    keepalive_timeout=args.grpc_keepalive_timeout / 1000).server()
            await grpc_server.start(grpc_address, args.grpc_port, reuse_address=True, reuse_port=args.reuse_grpc_port,
                                    tls=tls)
            log.info("Started GRPCInferenceService at %s:%d", grpc_address, args.grpc_port)
        if args.allow_metrics and args.metrics_port >= 0:
            from kernel import metrics

            registry = metrics.registry(core, cpu=args.allow_cpu_metrics, counter_latencies=counter_latencies)
            core.custom_metrics.own_value = partial(metrics.sample_value, registry)

            router = Router()
            router.add("GET", "/metrics", lambda request: Response(metrics.render(registry, core.custom_metrics), 200,
                                                                   metrics.CONTENT_TYPE))
            scrape = HttpServer(router)
            await scrape.start(metrics_address, args.metrics_port)
            http_servers.append(scrape)
            log.info("Started Metrics Service at %s:%d", metrics_address, args.metrics_port)
        if args.allow_http and args.http_port >= 0:
            http = HttpFront(core).server()
            await http.start(http_address, args.http_port, reuse_port=args.reuse_http_port)
            http_servers.append(http)
            log.info("Started HTTPService at %s:%d", http_address, args.http_port)
        await stop.wait()
        log.info("Waiting for in-flight requests to complete.")
    finally:
        # --exit-timeout-secs bounds the whole stop, as Triton's: both fronts stop accepting at once and drain
        # together, then the models get what is left for their requests in flight (and finalize).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.exit_timeout_secs
        drains = [http.close(args.exit_timeout_secs) for http in http_servers]
        if grpc_server is not None:
            grpc_server.close()
            drains.append(grpc_server.wait_closed(args.exit_timeout_secs))
        await asyncio.gather(*drains)
        await server.stop_async(max(deadline - loop.time(), 0.0))
        log.info("All models are stopped, shared memory removed. Exiting.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
