"""``kernel start`` with the command lines of tritonserver users (a Kubernetes manifest, a systemd unit).

Each test starts a real server with the flags and checks what they do: a front that does not listen,
the log going to a file in Triton's format, poll mode loading, reloading and unloading models as their
files change, and the flags that have no effect here saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, KernelServer

SCALE = '''
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

VALUE = {value}


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info("scale: initialize info")
        pb_utils.Logger.log_warn("scale: initialize warning")
        {init}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            params = np.array([request.parameters().encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x * VALUE).astype(np.float32)),
                                                         pb_utils.Tensor("PARAMS", params)]))
        return responses
'''

CONFIG = '''backend: "python"
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
         { name: "PARAMS", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
'''

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [IWE] \d+ ")
DEFAULT = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ ")


def write(path: Path, text: str) -> None:
    """Replace ``path`` at once (a poll never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scale_model(repo: Path, name: str, value: float = 1.0, init: str = "pass", config: str = CONFIG) -> None:
    write(repo / name / "1" / "model.py", SCALE.format(value=value, init=init))
    write(repo / name / "config.pbtxt", config)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], object], timeout: float = 60.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.2)


def launch(repo: Path, log_path: Path, *flags: str, probe: str = "http", host: str = "127.0.0.1",
           timeout: float = 60.0) -> KernelServer:
    """``kernel start`` on ``repo`` with ``flags``, ready once the ``probe`` front ("http" or "grpc") answers."""
    srv = KernelServer(repo, *flags)
    if probe == "http":
        return srv.start(log_path, timeout)
    srv.log_path = log_path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "PYTHONUNBUFFERED": "1"}
    srv.proc = subprocess.Popen(srv.args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def up() -> bool:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
        return listening(srv.grpc_port, host)

    deadline = time.monotonic() + timeout
    while not up():
        if time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError(f"server did not start:\n{srv.log()}")
        time.sleep(0.1)
    return srv


def infer(url: str, model: str, x: list[float], headers: dict | None = None) -> tuple[np.ndarray, dict]:
    client = httpclient.InferenceServerClient(url)
    try:
        inp = httpclient.InferInput("INPUT0", [len(x)], "FP32")
        inp.set_data_from_numpy(np.array(x, np.float32))
        result = client.infer(model, [inp], headers=headers)
        return result.as_numpy("OUTPUT0"), json.loads(result.as_numpy("PARAMS")[0])
    finally:
        client.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stopped(srv: KernelServer) -> None:
    assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm(), f"shared memory left behind: {sorted(srv.owned_shm())}"


# -- poll mode ------------------------------------------------------------------------------------------


def index(srv: KernelServer) -> list[dict]:
    return json.loads(post(f"http://{srv.http_url}/v2/repository/index")[1])


def test_poll_mode_loads_reloads_and_unloads_as_files_change(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m", 1.0)
    srv = launch(repo, tmp_path / "log", "--model-control-mode=poll", "--repository-poll-secs", "1")
    url = srv.http_url
    try:
        assert infer(url, "m", [1, 2])[0].tolist() == [1, 2]
        # The repository API's load and unload answer Triton's error in poll mode.
        for action in ("load", "unload"):
            code, body = post(f"http://{url}/v2/repository/models/m/{action}")
            assert (code, json.loads(body)) == (503, {"error": "explicit model load / unload is not allowed if "
                                                               "polling is enabled"})
        # A new model directory loads.
        scale_model(repo, "n", 5.0)
        wait_for(lambda: infer(url, "n", [1])[0].tolist() == [5], what="n to load")
        # A changed config reloads the model.
        write(repo / "m" / "config.pbtxt", CONFIG + 'parameters { key: "tag" value: { string_value: "v2" } }\n')
        wait_for(lambda: json.loads(get(f"http://{url}/v2/models/m/config")[1]).get("parameters", {})
                 .get("tag") == {"string_value": "v2"}, what="m's new config")
        # A changed model file reloads it too.
        scale_model(repo, "m", 2.0, config=CONFIG + 'parameters { key: "tag" value: { string_value: "v2" } }\n')
        wait_for(lambda: infer(url, "m", [1, 2])[0].tolist() == [2, 4], what="m's new model.py")
        # A broken version: the one that serves keeps serving, and the load is tried again at every poll.
        scale_model(repo, "m", 3.0, init='raise RuntimeError("initialize exploded")')
        wait_for(lambda: srv.log().count("failed to load 'm' version 1") >= 2, what="two failed loads of m")
        assert infer(url, "m", [1, 2])[0].tolist() == [2, 4]
        assert get(f"http://{url}/v2/models/m/ready")[0] == 200
        assert get(f"http://{url}/v2/health/ready")[0] == 200
        assert {"name": "m", "version": "1", "state": "READY"} in index(srv)
        # Once fixed, it loads.
        scale_model(repo, "m", 4.0)
        wait_for(lambda: infer(url, "m", [1, 2])[0].tolist() == [4, 8], what="m fixed")
        # A model whose directory goes away unloads, and leaves the index.
        shutil.rmtree(repo / "n")
        wait_for(lambda: get(f"http://{url}/v2/models/n/ready")[0] == 400, what="n to unload")
        assert [e["name"] for e in index(srv)] == ["m"]
        code, body = get(f"http://{url}/v2/models/n")
        assert (code, json.loads(body)) == (404, {"error": "Request for unknown model: 'n' has no available "
                                                           "versions"})
        wait_for(lambda: "successfully unloaded 'n' version 1" in srv.log(), what="n's unload to end")
        # A new model whose config cannot be read is listed by name, and the server stays ready (as Triton).
        write(repo / "bad" / "config.pbtxt", 'backend: "python"\ninput [\n')
        wait_for(lambda: srv.log().count("Poll failed for model directory 'bad'") >= 2, what="bad's poll errors")
        assert {"name": "bad"} in index(srv)
        assert get(f"http://{url}/v2/health/ready")[0] == 200
    finally:
        stopped(srv)


ENSEMBLE = '''platform: "ensemble"
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
ensemble_scheduling { step [ { model_name: "m" model_version: -1 input_map { key: "INPUT0" value: "X" }
                               output_map { key: "OUTPUT0" value: "Y" } } ] }
'''


def test_poll_mode_ensemble_follows_the_model_it_uses(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m", 3.0)
    write(repo / "e" / "config.pbtxt", ENSEMBLE)
    (repo / "e" / "1").mkdir()
    srv = launch(repo, tmp_path / "log", "--model-control-mode=poll", "--repository-poll-secs=1")
    url = f"http://{srv.http_url}"
    try:
        assert get(f"{url}/v2/models/e/ready")[0] == 200
        os.rename(repo / "m", tmp_path / "m")  # the model the ensemble uses goes away: both unload
        wait_for(lambda: get(f"{url}/v2/models/e/ready")[0] == 400, what="e to unload")
        assert get(f"{url}/v2/models/m/ready")[0] == 400
        time.sleep(2)  # polls meanwhile do not try the ensemble again
        os.rename(tmp_path / "m", repo / "m")  # back, unchanged: it loads, and the ensemble with it
        wait_for(lambda: get(f"{url}/v2/models/e/ready")[0] == 200, what="e to load again")
        client = httpclient.InferenceServerClient(srv.http_url)
        x = httpclient.InferInput("X", [2], "FP32")
        x.set_data_from_numpy(np.array([1, 2], np.float32))
        assert client.infer("e", [x]).as_numpy("Y").tolist() == [3, 6]
        client.close()
        assert "failed to load 'e'" not in srv.log()
    finally:
        stopped(srv)


def test_repository_poll_secs_is_ignored_in_the_other_modes(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    srv = launch(repo, tmp_path / "log", "--repository-poll-secs", "1")
    try:
        scale_model(repo, "late")
        time.sleep(3)
        assert {"name": "late"} in index(srv)  # found, never loaded
        assert get(f"http://{srv.http_url}/v2/models/late/ready")[0] == 400
    finally:
        stopped(srv)


# -- fronts, addresses, the server's id -----------------------------------------------------------------


def test_http_off_and_own_addresses(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    srv = launch(repo, tmp_path / "log", "--allow-http=false", "--id", "edge-02", "--grpc-address", "127.0.0.2",
                 "--metrics-address", "127.0.0.3", probe="grpc", host="127.0.0.2")
    try:
        assert not listening(srv.http_port)
        assert not listening(srv.grpc_port)  # on 127.0.0.2 only
        # (the metrics front starts after the gRPC one that the launch probed)
        wait_for(lambda: listening(srv.metrics_port, "127.0.0.3"), timeout=30, what="metrics on 127.0.0.3")
        assert not listening(srv.metrics_port)
        client = grpcclient.InferenceServerClient(f"127.0.0.2:{srv.grpc_port}")
        assert client.get_server_metadata().name == "edge-02"
        assert client.is_model_ready("m")
        client.close()
        assert "Started HTTPService" not in srv.log()
    finally:
        stopped(srv)


def test_grpc_and_metrics_off_and_what_reaches_the_model(tmp_path):
    repo = tmp_path / "repo"
    # --model-load-thread-count 1: one version loads at a time (each initialize records when it ran).
    slow = ('start = time.time()\n        time.sleep(1.0)\n'
            '        open(os.path.join(os.path.dirname(__file__), "ran"), "w").write(f"{start} {time.time()}")')
    scale_model(repo, "m", init=slow)
    # --model-config-name: a model with configs/<name>.pbtxt loads from it; one without, from config.pbtxt.
    scale_model(repo, "alt", init=slow)
    write(repo / "alt" / "configs" / "edge.pbtxt",
          CONFIG + 'parameters { key: "tag" value: { string_value: "edge" } }\n')
    # --model-load-retry-count: initialize fails the first time only.
    scale_model(repo, "flaky", init='marker = os.path.join(os.path.dirname(__file__), "tried")\n'
                                    '        if not os.path.exists(marker):\n'
                                    '            open(marker, "w").close()\n'
                                    '            raise RuntimeError("first load fails")')
    trace = tmp_path / "trace.json"
    srv = launch(repo, tmp_path / "log", "--allow-grpc=false", "--allow-metrics", "off", "--id", "edge-01",
                 "--model-config-name", "edge", "--model-load-retry-count", "1", "--model-load-thread-count", "1",
                 "--http-header-forward-pattern", "^x-fwd", "--trace-file", str(trace), "--trace-level",
                 "TIMESTAMPS", "--trace-rate", "1")
    url = srv.http_url
    try:
        assert not listening(srv.grpc_port) and not listening(srv.metrics_port)
        assert json.loads(get(f"http://{url}/v2")[1])["name"] == "edge-01"
        assert json.loads(get(f"http://{url}/v2/models/alt/config")[1])["parameters"] == {
            "tag": {"string_value": "edge"}}
        assert json.loads(get(f"http://{url}/v2/models/m/config")[1])["parameters"] == {}
        (m_start, m_end), (alt_start, alt_end) = (map(float, (repo / name / "1" / "ran").read_text().split())
                                                  for name in ("m", "alt"))
        assert m_end <= alt_start or alt_end <= m_start, "two models loaded at once"
        assert get(f"http://{url}/v2/models/flaky/ready")[0] == 200
        assert "retrying to load 'flaky' version(s) 1 (retry 1 of 1)" in srv.log()
        _, params = infer(url, "m", [1], headers={"X-Fwd-User": "alice", "Other": "no"})
        assert params == {"x-fwd-user": "alice"}
        settings = json.loads(get(f"http://{url}/v2/trace/setting")[1])
        assert (settings["trace_file"], settings["trace_level"], settings["trace_rate"]) == (
            str(trace), ["TIMESTAMPS"], "1")
        assert "Warning: '--trace-file' has been deprecated" in srv.log()
    finally:
        stopped(srv)


def test_metrics_families_and_grpc_forwarding(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    srv = launch(repo, tmp_path / "log", "--allow-cpu-metrics=false", "--metrics-config", "counter_latencies=false",
                 "--grpc-header-forward-pattern", "fwd", "--reuse-http-port", "true", "--allow-gpu-metrics", "false")
    try:
        infer(srv.http_url, "m", [1])
        text = get(f"http://127.0.0.1:{srv.metrics_port}/metrics")[1].decode()
        assert 'nv_inference_count{model="m",version="1"} 1.0' in text
        assert "nv_cpu_memory" not in text and "nv_inference_request_duration_us" not in text
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        inp = grpcclient.InferInput("INPUT0", [1], "FP32")
        inp.set_data_from_numpy(np.ones(1, np.float32))
        result = client.infer("m", [inp], headers={"my-fwd-key": "v", "other": "x"})
        assert json.loads(result.as_numpy("PARAMS")[0]) == {"my-fwd-key": "v"}
        client.close()
        # --reuse-http-port=true: another socket may bind the HTTP port with SO_REUSEPORT; not the gRPC port.
        for port, shared in ((srv.http_port, True), (srv.grpc_port, False)):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if shared:
                    s.bind(("127.0.0.1", port))
                else:
                    with pytest.raises(OSError):
                        s.bind(("127.0.0.1", port))
        assert "--allow-gpu-metrics has no effect here" in srv.log()
    finally:
        stopped(srv)


# -- logging --------------------------------------------------------------------------------------------


def test_log_file_in_iso8601_without_info(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    scale_model(repo, "broken", init='raise RuntimeError("initialize exploded")')
    log_file = tmp_path / "triton.log"
    srv = launch(repo, tmp_path / "console", "--log-file", str(log_file), "--log-format", "ISO8601",
                 "--log-info", "false", "--http-thread-count", "4")
    try:
        assert infer(srv.http_url, "m", [1])[0].tolist() == [1]
    finally:
        stopped(srv)
    text = log_file.read_text()
    lines = [line for line in text.splitlines() if ISO.match(line)]
    assert any("E" == line.split()[1] and "failed to load 'broken' version 1" in line for line in lines), text
    assert any(" W " in line and "scale: initialize warning" in line for line in lines), text  # a worker's line
    assert "scale: initialize info" not in text and "Started HTTPService" not in text and "| Model" not in text
    assert "--http-thread-count" not in text  # an info line
    assert "initialize exploded" not in srv.log() and "scale: initialize warning" not in srv.log()  # the console


def test_log_file_default_format(tmp_path):
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    log_file = tmp_path / "triton.log"
    srv = launch(repo, tmp_path / "console", "--log-file", str(log_file), "--log-warning=false",
                 "--pinned-memory-pool-byte-size=268435456", "--cuda-memory-pool-byte-size", "0:67108864",
                 "--rate-limit", "EXECUTION_COUNT", "--backend-config", "tensorflow,version=2", "--model-namespacing",
                 "true", "--min-supported-compute-capability", "6.0")
    try:
        assert infer(srv.http_url, "m", [1])[0].tolist() == [1]
    finally:
        stopped(srv)
    text = log_file.read_text()
    assert any(DEFAULT.match(line) and "kernel] Started HTTPService at 127.0.0.1:" in line
               for line in text.splitlines()), text
    assert any(DEFAULT.match(line) and "scale: initialize info" in line for line in text.splitlines()), text
    assert "| m     | 1       | READY  |" in text  # the model table
    assert "scale: initialize warning" not in text
    for flag in ("--pinned-memory-pool-byte-size", "--cuda-memory-pool-byte-size", "--rate-limit",
                 "--model-namespacing", "--min-supported-compute-capability"):
        assert text.count(f"] {flag} has no effect here: ") == 1, flag
    assert "--backend-config tensorflow,...: there is no backend 'tensorflow' here" in text
    assert "Started HTTPService" not in srv.log()


# -- command line errors ----------------------------------------------------------------------------------

#: every flag of ``tritonserver --help`` (2.51) with a value it accepts
TRITON_COMMAND_LINE = [
    "--id=edge", "--exit-timeout-secs=30", "--log-verbose=true", "--log-info=1", "--log-warning=on",
    "--log-error=TRUE", "--log-format=ISO8601", "--log-file=/tmp/t.log", "--model-store=/models",
    "--model-repository=/models2", "--exit-on-error=false", "--disable-auto-complete-config",
    "--strict-readiness=false", "--model-control-mode=explicit", "--repository-poll-secs=30", "--load-model=a",
    "--model-config-name=h100", "--model-load-thread-count=4", "--model-load-retry-count=1",
    "--model-namespacing=false", "--enable-peer-access=true", "--allow-http=true", "--http-address=0.0.0.0",
    "--http-port=8000", "--reuse-http-port=false", "--http-header-forward-pattern=^x-", "--http-thread-count=8",
    "--http-restricted-api=model-repository:admin-key=secret", "--allow-grpc=true", "--grpc-address=0.0.0.0",
    "--grpc-port=8001", "--reuse-grpc-port=false", "--grpc-header-forward-pattern=^x-",
    "--grpc-infer-allocation-pool-size=8", "--grpc-use-ssl=false", "--grpc-use-ssl-mutual=false",
    "--grpc-server-cert=/c.pem", "--grpc-server-key=/k.pem", "--grpc-root-cert=/r.pem",
    "--grpc-infer-response-compression-level=high", "--grpc-keepalive-time=7200000", "--grpc-keepalive-timeout=20000",
    "--grpc-keepalive-permit-without-calls=0", "--grpc-http2-max-pings-without-data=2",
    "--grpc-http2-min-recv-ping-interval-without-data=300000", "--grpc-http2-max-ping-strikes=2",
    "--grpc-max-connection-age=60000", "--grpc-max-connection-age-grace=5000",
    "--grpc-restricted-protocol=health:k=v", "--allow-sagemaker=false", "--sagemaker-port=8080",
    "--sagemaker-safe-port-range=8000-8002", "--sagemaker-thread-count=8", "--allow-vertex-ai=false",
    "--vertex-ai-port=8080", "--vertex-ai-thread-count=8", "--vertex-ai-default-model=a", "--allow-metrics=true",
    "--allow-gpu-metrics=false", "--allow-cpu-metrics=true", "--metrics-address=0.0.0.0", "--metrics-port=8002",
    "--metrics-interval-ms=2000", "--metrics-config=summary_latencies=true", "--trace-config=rate=100",
    "--backend-directory=/opt/tritonserver/backends", "--backend-config=python,shm-default-byte-size=1048576",
    "--repoagent-directory=/opt/tritonserver/repoagents", "--cache-config=local,size=1048576",
    "--cache-directory=/opt/tritonserver/caches", "--rate-limit=off", "--rate-limit-resource=R1:4:0",
    "--pinned-memory-pool-byte-size=268435456", "--cuda-memory-pool-byte-size=0:67108864",
    "--cuda-virtual-address-size=0:1073741824", "--min-supported-compute-capability=6.0",
    "--buffer-manager-thread-count=0", "--host-policy=gpu_0,numa-node=0", "--model-load-gpu-limit=0:0.8",
    "--strict-model-config=false", "--response-cache-byte-size=1048576", "--trace-file=/tmp/trace.json",
    "--trace-level=TIMESTAMPS", "--trace-rate=1000", "--trace-count=-1", "--trace-log-frequency=0",
]


def test_every_tritonserver_flag_is_accepted():
    from kernel.cli import build_parser

    names = {arg.split("=")[0] for arg in TRITON_COMMAND_LINE}
    assert len(names) == 86  # tritonserver 2.51's --help, less --help itself
    args = build_parser().parse_args(["start", *TRITON_COMMAND_LINE])
    assert (args.id, args.model_control_mode, args.log_verbose, args.strict_readiness) == ("edge", "explicit", 1, False)
    assert args.model_repository == ["/models", "/models2"]
    assert args.ignored_cuda_memory_pool_byte_size == [(0, 67108864)]
    assert args.ignored_model_load_gpu_limit == [(0, 0.8)]


@pytest.mark.parametrize("args, message", [
    (["--load-model", "m"], "Error: Use of '--load-model' requires setting '--model-control-mode=explicit' as well."),
    (["--pinned-memory-pool-byte-size=abc"], "argument --pinned-memory-pool-byte-size: Invalid option value. Got abc"),
    (["--allow-http=maybe"], "argument --allow-http: invalid value for bool option: maybe"),
    (["--log-format=iso8601"], "argument --log-format: invalid argument for --log-format"),
    (["--model-control-mode=sometimes"], "argument --model-control-mode: invalid argument for --model-control-mode"),
    (["--rate-limit-resource=gpu"], "--rate-limit-resource option format is '<resource_name>:<count>:<device>' or "
                                    "'<resource_name>:<count>'. Got gpu"),
    (["--model-config-name="], "Error: empty argument for --model-config-name"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_command_line_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "kernel", "start", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2, out
    assert message in out.stderr


# -- gRPC over TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    where = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(where / "key.pem"),
                    "-out", str(where / "cert.pem"), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return where / "cert.pem", where / "key.pem"


def test_grpc_over_mutual_tls(tmp_path, certificate):
    cert, key = certificate
    repo = tmp_path / "repo"
    scale_model(repo, "m")
    srv = launch(repo, tmp_path / "log", "--grpc-use-ssl-mutual=true", "--grpc-server-cert", str(cert),
                 "--grpc-server-key", str(key), "--grpc-root-cert", str(cert))
    try:
        url = f"localhost:{srv.grpc_port}"
        client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert),
                                                  private_key=str(key), certificate_chain=str(cert))
        assert client.is_model_ready("m")
        client.close()
        for refused in (grpcclient.InferenceServerClient(url),  # plaintext
                        grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))):  # no cert
            with pytest.raises(InferenceServerException):
                refused.is_server_live()
            refused.close()
    finally:
        stopped(srv)


def test_kserve_triton_runtime_args_after_the_entrypoint(monkeypatch):
    """KServe's Triton ServingRuntime gives its args with the program name first (`tritonserver --model-store=...`);
    after an image's `kernel start` entrypoint they start the server as Triton's command line would."""
    from kernel import cli

    seen = []

    async def serve(args):
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    kserve = ["--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080", "--allow-grpc=true",
              "--allow-http=true"]
    assert cli.main(["start", "tritonserver", *kserve]) == 0
    args = seen[0]
    assert (args.model_repository, args.grpc_port, args.http_port, args.allow_grpc, args.allow_http) == \
        (["/mnt/models"], 9000, 8080, True, True)
    with pytest.raises(SystemExit):  # elsewhere a stray word is still an error
        cli.main(["start", "--http-port=8080", "tritonserver"])
