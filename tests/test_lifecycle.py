"""Server lifetime: clean shutdown, crashed workers, stale shared memory, model control."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ROOT, KernelServer
from tests.test_http import add_sub_inputs, assert_serving


def echo(x):
    t = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return [t]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_shared_memory(tmp_path, sig):
    server = KernelServer(ROOT / "examples" / "models").start(tmp_path / "log")
    client = httpclient.InferenceServerClient(server.http_url)
    assert_serving(client)
    workers = server.worker_pids()
    models = [m for m in (ROOT / "examples" / "models").iterdir() if m.is_dir()
              and 'platform: "ensemble"' not in (m / "config.pbtxt").read_text()]  # an ensemble has no worker
    assert len(workers) == len(models)  # one instance each
    during = server.owned_shm()
    assert any(e.startswith(f"ek.{server.proc.pid}.") for e in during)  # the front's arena and rings
    assert any(e.startswith(f"sem.ek.{server.proc.pid}.") for e in during)  # the rings' semaphores
    assert any(e.startswith(f"ek.{w}.") for w in workers for e in during)  # a worker's output arena
    client.close()
    assert server.stop(sig) == 0, server.log()
    assert server.owned_shm() == set(), server.log()
    for pid in workers:  # every worker has exited
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert re.search(r"^\| add_sub +\| 1 +\| READY +\|$", server.log(), re.MULTILINE), server.log()


def test_killed_server_leaves_nothing_after_next_start(tmp_path):
    first = KernelServer(ROOT / "examples" / "models").start(tmp_path / "log1")
    workers = first.worker_pids()
    first.stop(signal.SIGKILL)
    assert first.owned_shm(), "a killed front cannot clean up"
    deadline = time.monotonic() + 10  # orphaned workers are told (PR_SET_PDEATHSIG) and exit
    while any(subprocess.run(["kill", "-0", str(w)], capture_output=True).returncode == 0 for w in workers):
        assert time.monotonic() < deadline, "orphaned workers did not exit"
        time.sleep(0.05)
    second = KernelServer(ROOT / "examples" / "models").start(tmp_path / "log2")
    try:
        assert first.owned_shm() == set()
    finally:
        assert second.stop() == 0
    assert second.owned_shm() == set()


def test_crashed_worker_is_restarted(http):
    with pytest.raises(InferenceServerException) as e:
        http.infer("crasher", echo(np.array([-1.0], np.float32)))
    assert "crasher_0" in e.value.message() and "not healthy" in e.value.message()
    assert_serving(http)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            out = http.infer("crasher", echo(np.array([2.0], np.float32))).as_numpy("OUTPUT0")
            break
        except InferenceServerException:
            time.sleep(0.2)
    else:
        pytest.fail("crasher did not come back")
    np.testing.assert_array_equal(out, [2.0])


def test_explicit_model_control(tmp_path, repository):
    server = KernelServer(repository, "--model-control-mode=explicit", "--load-model=add_sub").start(tmp_path / "log")
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("add_sub")
        assert not client.is_model_ready("upper")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["upper"] == {"name": "upper"}
        client.load_model("upper")
        assert client.is_model_ready("upper")
        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["add_sub"] == {"name": "add_sub", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
        with pytest.raises(InferenceServerException) as e:
            client.infer("add_sub", add_sub_inputs(np.arange(16, dtype=np.int32), np.arange(16, dtype=np.int32)))
        assert e.value.message() == "Request for unknown model: 'add_sub' has no available versions"
        client.load_model("add_sub")
        assert_serving(client)
        with pytest.raises(InferenceServerException) as e:
            client.load_model("does_not_exist")
        assert e.value.message() == "failed to load 'does_not_exist', failed to poll from model repository"
        with pytest.raises(InferenceServerException) as e:
            client.load_model("broken_init")
        assert e.value.message().startswith("load failed for model 'broken_init': version 1 is at UNAVAILABLE "
                                            "state: Internal: RuntimeError: cannot initialize on purpose")
        # A bad config override keeps the loaded version serving.
        with pytest.raises(InferenceServerException):
            client.load_model("add_sub", config="{not json")
        assert_serving(client)
        config = client.get_model_config("add_sub")
        config["instance_group"] = [{"kind": "KIND_CPU", "count": 2}]
        import json

        client.load_model("add_sub", config=json.dumps(config))
        assert len(client.get_model_config("add_sub")["instance_group"]) == 1
        assert client.get_model_config("add_sub")["instance_group"][0]["count"] == 2
        assert_serving(client)
    finally:
        client.close()
        assert server.stop() == 0, server.log()


def test_load_unload_refused_without_explicit_mode(http):
    with pytest.raises(InferenceServerException) as e:
        http.unload_model("add_sub")
    assert e.value.message() == "explicit model load / unload is not allowed if polling is enabled"
    assert e.value.status() == "503"


def test_cli_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "kernel", "start", "--help"], capture_output=True, text=True,
                         cwd=ROOT).stdout
    for flag in ("--model-repository", "--backend-directory", "--backend-config", "--http-port", "--grpc-port",
                 "--metrics-port", "--host", "--log-verbose", "--exit-timeout-secs", "--strict-model-config",
                 "--host-policy"):
        assert flag in out
    top = subprocess.run([sys.executable, "-m", "kernel", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "start" in top
