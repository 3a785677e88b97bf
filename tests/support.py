"""Start a real ``kernel start`` process for tests and check what it leaves behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import compare

ROOT = Path(__file__).resolve().parent.parent
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES"]


free_port = compare.free_port


def shm_entries(pids: set[int] | None = None) -> set[str]:
    """Objects of this server family in /dev/shm (regions and semaphores), of ``pids`` if given.

    Names are ``ek.<pid>.<start>.<tag>.<n>`` (semaphores ``sem.ek.<pid>...``); filtering by pid keeps
    servers that other test runs start at the same time out of the picture.
    """
    found = set()
    for entry in os.listdir("/dev/shm"):
        stem = entry[4:] if entry.startswith("sem.") else entry
        if stem.startswith("ek."):
            pid = stem.split(".")[1]
            if pids is None or (pid.isdigit() and int(pid) in pids):
                found.add(entry)
    return found


_PROBE_IO = """
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [
  { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "BATCH", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "STARTED", data_type: TYPE_INT64, dims: [ 1 ] },
  { name: "ENDED", data_type: TYPE_INT64, dims: [ 1 ] },
  { name: "PID", data_type: TYPE_INT64, dims: [ 1 ] },
  { name: "ADDR", data_type: TYPE_UINT64, dims: [ 1 ] },
  { name: "ARGS", data_type: TYPE_STRING, dims: [ 1 ] }
]
"""


def _sleep(ms: int, from_input: bool = False) -> str:
    text = f'parameters {{ key: "sleep_ms" value: {{ string_value: "{ms}" }} }}\n'
    if from_input:
        text += 'parameters { key: "sleep_from_input" value: { string_value: "true" } }\n'
    return text


#: Probe models (tests/templates/probe_model.py) for the scheduler tests: name -> config.
PROBES = {
    "batch_max4": "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 1000000 }\n" + _sleep(50),
    "batch_pref": "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 2 ] "
                  "max_queue_delay_microseconds: 1000000 }\n" + _sleep(300),
    "batch_delay": "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 300000 }\n",
    "batch_nodelay": "max_batch_size: 8\ndynamic_batching { }\n",
    "batch_prio": "max_batch_size: 1\ndynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"
                  + _sleep(0, from_input=True),
    "batch_reject": "max_batch_size: 1\ndynamic_batching { default_queue_policy { timeout_action: REJECT "
                    "default_timeout_microseconds: 100000 } }\n" + _sleep(0, from_input=True),
    "batch_delayed": "max_batch_size: 1\ndynamic_batching { default_queue_policy { timeout_action: DELAY "
                     "allow_timeout_override: true } }\n" + _sleep(0, from_input=True),
    "batch_qsize": "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
                   + _sleep(0, from_input=True),
    "batch_ordered": "max_batch_size: 1\ndynamic_batching { preserve_ordering: true }\n"
                     "instance_group [ { kind: KIND_CPU, count: 2 } ]\n" + _sleep(0, from_input=True),
    "batch_unordered": "max_batch_size: 1\ndynamic_batching { }\n"
                       "instance_group [ { kind: KIND_CPU, count: 2 } ]\n" + _sleep(0, from_input=True),
    "batch_stats": "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 1000000 }\n",
    "two_instances": "instance_group [ { kind: KIND_CPU, count: 2 } ]\n" + _sleep(400),
    "slow_a": _sleep(400),
    "slow_b": _sleep(400),
    "gpu_probe": "instance_group [ { kind: KIND_GPU, count: 1, gpus: [ 0, 1 ], "
                 "secondary_devices: [ { kind: KIND_NVDLA, device_id: 1 } ] } ]\n",
    "ragged": "max_batch_size: 4\ndynamic_batching { }\n",
}


def python_model(repo: Path, name: str, code: str, config: str) -> None:
    """A python-backend model ``name`` in ``repo``: ``code`` as its model.py, ``config`` after the backend line."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(code)
    (repo / name / "config.pbtxt").write_text('backend: "python"\n' + config)


def build_repository(dest: Path) -> Path:
    """The test repository: the examples, tests/models, one echo model per datatype and the probes."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in (ROOT / "examples" / "models", ROOT / "tests" / "models"):
        for model in source.iterdir():
            if model.is_dir():
                shutil.copytree(model, dest / model.name)
    template = (ROOT / "tests" / "templates" / "echo_model.py").read_text()
    for dt in DATATYPES:
        name = f"echo_{dt.lower()}"
        config_type = "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}"
        (dest / name / "1").mkdir(parents=True)
        (dest / name / "1" / "model.py").write_text(template)
        (dest / name / "config.pbtxt").write_text(
            f'backend: "python"\n'
            f'input [ {{ name: "INPUT0", data_type: {config_type}, dims: [ -1 ] }} ]\n'
            f'output [ {{ name: "OUTPUT0", data_type: {config_type}, dims: [ -1 ] }} ]\n')
    probe = (ROOT / "tests" / "templates" / "probe_model.py").read_text()
    for name, config in PROBES.items():
        (dest / name / "1").mkdir(parents=True)
        (dest / name / "1" / "model.py").write_text(probe)
        io = _PROBE_IO.replace("dims: [ -1 ] }", "dims: [ -1 ], allow_ragged_batch: true }", 1) \
            if name == "ragged" else _PROBE_IO
        (dest / name / "config.pbtxt").write_text('backend: "python"\n' + config + io)
    return dest


class KernelServer:
    """``kernel start`` in a subprocess on free ports."""

    def __init__(self, repository: Path | list[Path], *extra: str, env: dict | None = None) -> None:
        self.env = env or {}
        self.http_port, self.grpc_port, self.metrics_port = compare.free_ports(3)
        repos = repository if isinstance(repository, list) else [repository]
        self.args = [sys.executable, "-m", "kernel", "start", "--http-port", str(self.http_port),
                     "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                     "--host", "127.0.0.1", *[a for r in repos for a in ("--model-repository", str(r))], *extra]
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.pids: set[int] = set()  # the front and every worker seen

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, log_path: Path, timeout: float = 60.0) -> KernelServer:
        self.log_path = log_path
        log = open(log_path, "wb")
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        workers = [int(p) for p in out.split()]
        self.pids.update(workers)
        return workers

    def owned_shm(self) -> set[str]:
        """What the server and the workers seen so far have in /dev/shm now."""
        return shm_entries(self.pids | ({self.proc.pid} if self.proc else set()))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.worker_pids()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def serving(repository: Path, log_dir: Path, *extra: str, env: dict | None = None, timeout: float = 60.0):
    """A module's server (for a pytest fixture to yield from): started on ``repository``, stopped
    afterwards, checked to exit cleanly and to leave no shared memory behind."""
    srv = KernelServer(repository, *extra, env=env).start(log_dir / "server.log", timeout=timeout)
    yield srv
    assert srv.stop() == 0, srv.log()
    assert not srv.owned_shm(), f"shared memory left behind: {sorted(srv.owned_shm())}"
