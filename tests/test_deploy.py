"""deploy/: the images and the Kubernetes and KServe manifests start this server as they are written.

Every manifest must parse. The Deployment's and the KServe ServingRuntime's container command and args are run
as a real ``kernel start`` (only the model repository path and the port numbers replaced, by a copy of
examples/models/add_sub and free ports); the probe paths they name must answer 200, add_sub must infer over
HTTP and gRPC, metrics must be where the scrape annotations say, and SIGTERM must end the server with 0 within
the pod's grace period (less its preStop). The Dockerfiles' ENTRYPOINT, CMD, EXPOSE, USER and HEALTHCHECK must
agree with the manifests and the CLI's defaults, and the HEALTHCHECK's one-liner must pass against a ready
server and fail against an unready or stopped one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from bench import compare
from kernel.cli import build_parser
from tests.support import ROOT, KernelServer

DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.jetson"]
DEPLOYMENT = DEPLOY / "kubernetes" / "edge-kernel.yaml"
RUNTIME = DEPLOY / "kserve" / "servingruntime.yaml"
ISVC = DEPLOY / "kserve" / "inferenceservice.yaml"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))

#: config/runtimes/kserve-tritonserver.yaml (github.com/kserve/kserve) runs Triton with these args (after its
#: first, ``tritonserver``); the runtime here must pass exactly the same ones to ``kernel start``.
KSERVE_TRITON_ARGS = ["--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080", "--allow-grpc=true",
                      "--allow-http=true"]
#: where KServe's storage initializer puts the model repository
KSERVE_MODEL_DIR = "/mnt/models"
#: what the grace period must leave after the preStop hook and --exit-timeout-secs (which bounds the drain of
#: both fronts and the models' unload: kernel/cli.py) for the models' finalize and the workers' end
FINALIZE_MARGIN_S = 10
#: Kubernetes' default terminationGracePeriodSeconds
DEFAULT_GRACE_S = 30
#: a 1080p frame or a batch of them must fit in /dev/shm; the runtimes' default /dev/shm is 64 MiB
MIN_SHM_BYTES = 256 << 20

DEFAULTS = build_parser().parse_args(["start"])

BROKEN_MODEL = '''raise RuntimeError("broken on purpose")
'''
BROKEN_CONFIG = '''backend: "python"
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
'''


# -- reading the files --------------------------------------------------------------------------------------------


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(path: Path, kind: str) -> dict:
    found = [doc for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{path.name}: {len(found)} {kind} documents"
    return found[0]


def dockerfile(path: Path) -> dict[str, list[str]]:
    """Instruction -> the text of each of its lines (continuations joined, comments dropped)."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, f"{path.name} ends in a continuation"
    found: dict[str, list[str]] = {}
    for text in logical:
        word, _, rest = text.partition(" ")
        found.setdefault(word.upper(), []).append(rest.strip())
    return found


def last(instructions: dict[str, list[str]], name: str) -> str:
    assert name in instructions, f"no {name}"
    return instructions[name][-1]  # Docker uses the last one


def healthcheck(instructions: dict[str, list[str]]) -> list[str]:
    """The HEALTHCHECK's command, exec form."""
    text = last(instructions, "HEALTHCHECK")
    _, sep, command = text.partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {text}"
    return json.loads(command)


def cli(args: list[str]):
    """``kernel start``'s reading of ``args`` (argparse exits on any it refuses)."""
    return build_parser().parse_args(["start", *args])


def quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?", str(text)).groups()
    return int(number) * units.get(unit or "", 1)


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"probe port {port!r} is not a port of the container"
    return named[port]


def http_probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if kind in container}


def shm_volume(volumes: list[dict], mounts: list[dict]) -> dict:
    """The memory-backed emptyDir mounted at /dev/shm."""
    at = [m for m in mounts if m["mountPath"] == "/dev/shm"]
    assert at, "nothing is mounted at /dev/shm: the runtime's 64 MiB default fits no 1080p frames"
    volume = next(v for v in volumes if v["name"] == at[0]["name"])
    assert volume.get("emptyDir", {}).get("medium") == "Memory", volume
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= MIN_SHM_BYTES, volume
    return volume


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# -- running a manifest's command line ----------------------------------------------------------------------------


def substitute(args: list[str], model_dir: str, repo: Path, ports: dict[int, int]) -> list[str]:
    """``args`` with the model repository path and the port numbers replaced; everything else as written."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        assert flag.startswith("--") and eq, f"{arg!r}: the manifests write flags as --flag=value"
        if value == model_dir:
            arg = f"{flag}={repo}"
        elif flag.endswith("-port"):
            arg = f"{flag}={ports[int(value)]}"
        out.append(arg)
    return out


def launch(log: Path, command: list[str], args: list[str], model_dir: str, repo: Path, ports: dict[int, int],
           http: int, grpc: int, metrics: int, extra: tuple[str, ...] = ()) -> KernelServer:
    """``command`` + ``args`` as a subprocess (``kernel`` is pyproject's console script: ``python -m kernel``)."""
    assert command == ["kernel", "start"], command
    assert re.search(r'^kernel = "kernel\.cli:main"$', (ROOT / "pyproject.toml").read_text(), re.M)
    srv = KernelServer(repo)
    srv.args = [sys.executable, "-m", "kernel", "start", *substitute(args, model_dir, repo, ports), *extra]
    srv.http_port, srv.grpc_port, srv.metrics_port = ports[http], ports[grpc], ports[metrics]
    return srv.start(log)


def free_for(*numbers: int) -> dict[int, int]:
    return dict(zip(numbers, compare.free_ports(len(numbers))))


def model_repository(tmp_path: Path, broken: bool = False) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "examples" / "models" / "add_sub", repo / "add_sub")
    if broken:
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.py").write_text(BROKEN_MODEL)
        (repo / "broken" / "config.pbtxt").write_text(BROKEN_CONFIG)
    return repo


def infer_add_sub(srv: KernelServer) -> None:
    a, b = np.arange(16, dtype=np.int32), np.full(16, 3, np.int32)
    for module, url in ((httpclient, srv.http_url), (grpcclient, srv.grpc_url)):
        client = module.InferenceServerClient(url)
        try:
            inputs = [module.InferInput("INPUT0", [16], "INT32"), module.InferInput("INPUT1", [16], "INT32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("add_sub", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        finally:
            client.close()


def check_probes(srv: KernelServer, container: dict, ports: dict[int, int]) -> None:
    """Each probe path answers 200 on the port it names; liveness and startup on Triton's live route,
    readiness on its ready route."""
    probes = http_probes(container)
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(probes), sorted(probes)
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    for kind, probe in probes.items():
        port = ports[port_number(container, probe["port"])]
        assert get(f"http://127.0.0.1:{port}{probe['path']}") == 200, (kind, probe)


def check_metrics(srv: KernelServer, annotations: dict, key: str, ports: dict[int, int]) -> None:
    port, path = int(annotations[f"{key}/port"]), annotations[f"{key}/path"]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[port]}{path}", timeout=5) as r:
        assert r.status == 200
        assert b'nv_inference_count{model="add_sub",version="1"}' in r.read()


def stop_within(srv: KernelServer, seconds: float) -> None:
    """SIGTERM; the server must exit 0 within ``seconds`` and leave no shared memory."""
    began = time.monotonic()
    code = srv.stop(timeout=seconds)  # kills and raises past it
    assert code == 0, srv.log()
    assert time.monotonic() - began < seconds
    assert not srv.owned_shm(), f"shared memory left behind: {sorted(srv.owned_shm())}"


def run_healthcheck(http_port: int) -> subprocess.CompletedProcess:
    """The CPU image's HEALTHCHECK command, with this interpreter for ``python`` and ``http_port`` for the
    default HTTP port it asks."""
    command = healthcheck(dockerfile(DOCKERFILES[0]))
    assert command[0] == "python"
    default = f"127.0.0.1:{DEFAULTS.http_port}/"
    assert any(default in part for part in command), command
    command = [sys.executable, *(part.replace(default, f"127.0.0.1:{http_port}/") for part in command[1:])]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


# -- the tests ----------------------------------------------------------------------------------------------------


def test_the_deploy_files_are_there():
    assert {DEPLOYMENT, RUNTIME, ISVC} <= set(MANIFESTS), MANIFESTS
    assert all(path.exists() for path in DOCKERFILES)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_parses(path):
    docs = documents(path)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


def test_deployment_runs_as_written(tmp_path):
    deployment = one(DEPLOYMENT, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = cli(container["args"])
    # the ports the container declares are the ones the server is told to use, and the Service reaches them
    ports_by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports_by_name == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    service = one(DEPLOYMENT, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports_by_name)
    # the model repository is a read-only volume mount; /dev/shm a memory volume big enough
    (model_dir,) = args.model_repository
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert model_dir in mounts and mounts[model_dir].get("readOnly") is True
    shm_volume(pod["volumes"], container["volumeMounts"])
    # the grace period covers the preStop sleep, both fronts' drains and the models' finalize
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    assert grace >= pre_stop_s + args.exit_timeout_secs + FINALIZE_MARGIN_S, (grace, args.exit_timeout_secs)

    ports = free_for(args.http_port, args.grpc_port, args.metrics_port)
    srv = launch(tmp_path / "server.log", container["command"], container["args"], model_dir,
                 model_repository(tmp_path), ports, args.http_port, args.grpc_port, args.metrics_port)
    try:
        check_probes(srv, container, ports)
        infer_add_sub(srv)
        check_metrics(srv, deployment["spec"]["template"]["metadata"]["annotations"], "prometheus.io", ports)
        ran = run_healthcheck(ports[args.http_port])
        assert ran.returncode == 0, ran.stderr
    finally:
        stop_within(srv, grace - pre_stop_s)
    ran = run_healthcheck(ports[args.http_port])  # nothing listens now
    assert ran.returncode != 0


def test_readiness_and_healthcheck_fail_while_a_model_is_unavailable(tmp_path):
    """With a model that cannot load the server lives (liveness 200) but is not ready: the readiness probe's
    path answers 400 and the image's HEALTHCHECK fails."""
    pod = one(DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = cli(container["args"])
    ports = free_for(args.http_port, args.grpc_port, args.metrics_port)
    srv = launch(tmp_path / "server.log", container["command"], container["args"], args.model_repository[0],
                 model_repository(tmp_path, broken=True), ports, args.http_port, args.grpc_port, args.metrics_port)
    try:
        probes = http_probes(container)
        http = f"http://127.0.0.1:{ports[args.http_port]}"
        assert get(http + probes["livenessProbe"]["path"]) == 200
        assert get(http + probes["readinessProbe"]["path"]) == 400
        ran = run_healthcheck(ports[args.http_port])
        assert ran.returncode != 0 and "400" in ran.stderr, ran.stderr
    finally:
        stop_within(srv, pod["terminationGracePeriodSeconds"])


def test_kserve_runtime_runs_as_written(tmp_path):
    runtime = one(RUNTIME, "ServingRuntime")
    isvc = one(ISVC, "InferenceService")
    spec = runtime["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["args"] == KSERVE_TRITON_ARGS
    args = cli(container["args"])
    assert args.model_repository == [KSERVE_MODEL_DIR]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert {"triton", "onnx", "pytorch"} <= formats
    # the InferenceService names this runtime, a format and a protocol it serves
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["modelFormat"]["name"] in formats
    assert predictor["model"]["protocolVersion"] in spec["protocolVersions"]
    shm_volume(spec["volumes"], container["volumeMounts"])
    # KServe's args set no metrics port: the scrape annotation must name the CLI's default
    assert not any(a.startswith("--metrics-port") for a in container["args"])
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == args.metrics_port == DEFAULTS.metrics_port
    grace = predictor.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    assert grace >= args.exit_timeout_secs + FINALIZE_MARGIN_S, (grace, args.exit_timeout_secs)

    ports = free_for(args.http_port, args.grpc_port, args.metrics_port)
    # (the default metrics port, which the args leave alone, is the one thing moved: 8002 may be taken here)
    srv = launch(tmp_path / "server.log", container["command"], container["args"], KSERVE_MODEL_DIR,
                 model_repository(tmp_path), ports, args.http_port, args.grpc_port, args.metrics_port,
                 extra=(f"--metrics-port={ports[args.metrics_port]}",))
    try:
        check_probes(srv, container, ports)
        infer_add_sub(srv)
        check_metrics(srv, spec["annotations"], "prometheus.kserve.io", ports)
    finally:
        stop_within(srv, grace)


def test_dockerfiles_agree_with_the_manifests():
    pod = one(DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (runtime_container,) = one(RUNTIME, "ServingRuntime")["spec"]["containers"]
    readiness = container["readinessProbe"]["httpGet"]["path"]
    images = {}
    for path in DOCKERFILES:
        ins = images[path.name] = dockerfile(path)
        entrypoint = json.loads(last(ins, "ENTRYPOINT"))
        assert entrypoint == ["kernel", "start"] == container["command"] == runtime_container["command"]
        cmd = json.loads(last(ins, "CMD"))
        # the image's default model repository is the one the Deployment mounts and serves
        assert cli(cmd).model_repository == cli(container["args"]).model_repository == ["/models"]
        exposed = {int(p) for p in last(ins, "EXPOSE").split()}
        assert exposed == {DEFAULTS.http_port, DEFAULTS.grpc_port, DEFAULTS.metrics_port}
        assert exposed == {p["containerPort"] for p in container["ports"]}
        check = " ".join(healthcheck(ins))
        assert f"127.0.0.1:{DEFAULTS.http_port}{readiness}" in check, check
        uid = last(ins, "USER").split(":")[0]
        assert uid.isdigit() and int(uid) != 0
        assert int(uid) == pod["securityContext"]["runAsUser"] == runtime_container["securityContext"]["runAsUser"]
        # every package pyproject.toml builds is copied into the build context
        include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
        packages = {name.strip(' "*') for name in include.split(",")}
        copied = {line.split()[0] for line in ins["COPY"] if not line.startswith("--from")}
        assert packages <= copied, packages - copied
        assert {"pyproject.toml", "README.md"} <= {word for line in ins["COPY"] for word in line.split()}
    cpu, jetson = images["Dockerfile"], images["Dockerfile.jetson"]
    assert any(line.startswith("PYTHON_IMAGE=python:3.12-slim") for line in cpu["ARG"])
    assert any(line.startswith("BASE_IMAGE=nvcr.io/nvidia/l4t-") for line in jetson["ARG"])
    for name in ("ENTRYPOINT", "CMD", "EXPOSE", "HEALTHCHECK", "USER"):
        assert last(cpu, name) == last(jetson, name), name
