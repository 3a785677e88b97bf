"""``python -m bench soak``: a mixed load for a set time, with workers killed on purpose; does anything leak?

Starts ``kernel start`` on a repository of its own (the examples plus a decoupled model) and drives it from
threads with the official clients: binary and JSON HTTP, gRPC (whatever transport serves it), system shared
memory (inputs and outputs in registered regions, plus register/unregister churn), gRPC streaming of a
decoupled model, and an ensemble over gRPC (two add_sub steps). Every ``--kill-every`` seconds one worker
is killed with SIGKILL and the time until its model is READY again is taken. Every ``--sample-every``
seconds the RSS and open descriptors of the front and of every worker, and the server's objects in
/dev/shm, are sampled; the report compares the first sample after warm-up with the last one.

Errors are counted per kind of load; an error on the killed model within a few seconds of a kill is
expected (its in-flight requests fail, then UNAVAILABLE until it is back) and counted apart.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTART_GRACE = 3.0  # seconds after a kill during which the killed model's errors are expected


# Two add_sub steps, the second fed by the first's outputs: (a + b) + (a - b) = 2a, (a + b) - (a - b) = 2b.
# Its intermediate tensors pass between the workers by reference, and a kill of add_sub's worker lands
# in the middle of pipelines too.
PIPELINE_CONFIG = """name: "soak_pipeline"
platform: "ensemble"
max_batch_size: 0
input [ { name: "A", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "B", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "TWICE_A", data_type: TYPE_INT32, dims: [ 16 ] },
         { name: "TWICE_B", data_type: TYPE_INT32, dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "add_sub", model_version: -1, input_map { key: "INPUT0", value: "A" },
    input_map { key: "INPUT1", value: "B" }, output_map { key: "OUTPUT0", value: "S" },
    output_map { key: "OUTPUT1", value: "D" } },
  { model_name: "add_sub", model_version: -1, input_map { key: "INPUT0", value: "S" },
    input_map { key: "INPUT1", value: "D" }, output_map { key: "OUTPUT0", value: "TWICE_A" },
    output_map { key: "OUTPUT1", value: "TWICE_B" } } ] }
"""


@dataclass
class Tally:
    """Requests and errors of one kind of load."""

    ok: int = 0
    errors: int = 0
    expected_errors: int = 0  # on the killed model, just after a kill
    messages: Counter = field(default_factory=Counter)



def worker_instances(front: int) -> dict[int, str]:
    """The worker processes of the front ``front``: pid -> instance name (from the spec on its command line;
    "?" when it cannot be read)."""
    found = {}
    for children in glob.glob(f"/proc/{front}/task/*/children"):
        try:
            with open(children) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    spec = f.read().split(b"\0")[3]
                found[pid] = json.loads(spec)["instance"]
            except (OSError, IndexError, ValueError, KeyError):
                found[pid] = "?"
    return found


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tallies: dict[str, Tally] = {}
        self.kills: list[dict] = []
        self.samples: list[dict] = []
        self.last_kill: dict[str, float] = {}
        self.proc: subprocess.Popen | None = None
        self.workdir = tempfile.mkdtemp(prefix="ek-soak-")
        self.http_url = self.grpc_url = ""
        self.seen: set[int] = set()  # the front and every worker seen: whose /dev/shm objects are ours

    # -- server -------------------------------------------------------------------------------------
    def repository(self) -> str:
        repo = os.path.join(self.workdir, "models")
        for name in ("add_sub", "identity", "upper"):
            shutil.copytree(os.path.join(REPO_ROOT, "examples", "models", name), os.path.join(repo, name))
        shutil.copytree(os.path.join(REPO_ROOT, "tests", "models", "repeat"), os.path.join(repo, "repeat"))
        os.makedirs(os.path.join(repo, "soak_pipeline", "1"))  # an ensemble's version directory is empty
        with open(os.path.join(repo, "soak_pipeline", "config.pbtxt"), "w") as f:
            f.write(PIPELINE_CONFIG)
        return repo

    def start_server(self) -> None:
        from bench.compare import free_ports

        http, grpc, metrics = free_ports(3)
        self.http_url, self.grpc_url = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        self.log = open(os.path.join(self.workdir, "server.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kernel", "start", "--model-repository", self.repository(),
                                      "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                                      str(metrics), "--host", "127.0.0.1"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not become ready in 120 s")

    def stop_server(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    def workers(self) -> dict[int, str]:
        """Worker pid -> model name."""
        found = {pid: name.rsplit("_", 2)[0] for pid, name in worker_instances(self.proc.pid).items()}  # add_sub_0_0
        self.seen.add(self.proc.pid)
        self.seen.update(found)
        return found

    # -- load ---------------------------------------------------------------------------------------
    def record(self, kind: str, model: str, error: BaseException | None) -> None:
        with self.lock:
            tally = self.tallies.setdefault(kind, Tally())
            if error is None:
                tally.ok += 1
                return
            if time.monotonic() - self.last_kill.get(model, -1e9) < RESTART_GRACE:
                tally.expected_errors += 1
            else:
                tally.errors += 1
            text = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            tally.messages[text] += 1

    def loop(self, kind: str, model: str, setup, call) -> None:
        state = setup()
        try:
            while not self.stop.is_set():
                try:
                    call(state)
                    self.record(kind, model, None)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    self.record(kind, model, e)
                    time.sleep(0.01)
        finally:
            closer = getattr(state, "close", None)
            if closer is not None:
                closer()

    def http_binary(self) -> None:
        import tritonclient.http as httpclient

        a = np.arange(16, dtype=np.int32)

        def call(client):
            inputs = [httpclient.InferInput(n, [16], "INT32") for n in ("INPUT0", "INPUT1")]
            for t in inputs:
                t.set_data_from_numpy(a)
            out = client.infer("add_sub", inputs).as_numpy("OUTPUT0")
            if not np.array_equal(out, 2 * a):
                raise AssertionError("wrong add_sub answer")

        self.loop("http binary (add_sub)", "add_sub", lambda: httpclient.InferenceServerClient(self.http_url), call)

    def http_json(self) -> None:
        import tritonclient.http as httpclient

        x = np.random.default_rng(1).random((4, 16), dtype=np.float32)
        text = np.array([b"hello soak"] * 3, dtype=np.object_)

        def call(client):
            t = httpclient.InferInput("INPUT0", [4, 16], "FP32")
            t.set_data_from_numpy(x, binary_data=False)
            if not np.array_equal(client.infer("identity", [t]).as_numpy("OUTPUT0"), x):
                raise AssertionError("wrong identity answer")
            s = httpclient.InferInput("TEXT", [3], "BYTES")
            s.set_data_from_numpy(text, binary_data=False)
            if client.infer("upper", [s]).as_numpy("UPPER")[0] != b"HELLO SOAK":
                raise AssertionError("wrong upper answer")

        self.loop("http json (identity, upper)", "identity", lambda: httpclient.InferenceServerClient(self.http_url),
                  call)

    def grpc(self) -> None:
        import tritonclient.grpc as grpcclient

        a = np.arange(16, dtype=np.int32)

        def call(client):
            inputs = [grpcclient.InferInput(n, [16], "INT32") for n in ("INPUT0", "INPUT1")]
            for t in inputs:
                t.set_data_from_numpy(a)
            if not np.array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT1"), 0 * a):
                raise AssertionError("wrong add_sub answer")

        self.loop("grpc (add_sub)", "add_sub", lambda: grpcclient.InferenceServerClient(self.grpc_url), call)

    def ensemble(self) -> None:
        import tritonclient.grpc as grpcclient

        a, b = np.arange(16, dtype=np.int32), np.full(16, 3, dtype=np.int32)

        def call(client):
            inputs = [grpcclient.InferInput(n, [16], "INT32") for n in ("A", "B")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("soak_pipeline", inputs)
            if not (np.array_equal(result.as_numpy("TWICE_A"), 2 * a) and
                    np.array_equal(result.as_numpy("TWICE_B"), 2 * b)):
                raise AssertionError("wrong soak_pipeline answer")

        self.loop("grpc ensemble (soak_pipeline: add_sub twice)", "add_sub",
                  lambda: grpcclient.InferenceServerClient(self.grpc_url), call)

    def shm(self) -> None:
        import tritonclient.http as httpclient
        import tritonclient.utils.shared_memory as shm

        a = np.arange(16, dtype=np.int32)
        tag = f"soak{os.getpid()}"

        class State:
            def __init__(self, soak: Soak) -> None:
                self.client = httpclient.InferenceServerClient(soak.http_url)
                self.handle = shm.create_shared_memory_region(f"{tag}_io", f"/{tag}_io", 256)
                shm.set_shared_memory_region(self.handle, [a, a])
                self.client.register_system_shared_memory(f"{tag}_io", f"/{tag}_io", 256)
                self.count = 0

            def close(self) -> None:
                try:
                    self.client.unregister_system_shared_memory()
                finally:
                    shm.destroy_shared_memory_region(self.handle)
                    self.client.close()

        def call(state):
            state.count += 1
            if state.count % 50 == 0:  # churn: a short-lived region registered, used once, unregistered
                name = f"{tag}_churn"
                handle = shm.create_shared_memory_region(name, "/" + name, 128)
                try:
                    shm.set_shared_memory_region(handle, [a, a])
                    state.client.register_system_shared_memory(name, "/" + name, 128)
                    inputs = [httpclient.InferInput(n, [16], "INT32").set_shared_memory(name, 64, offset=o)
                              for n, o in (("INPUT0", 0), ("INPUT1", 64))]
                    state.client.infer("add_sub", inputs)
                finally:
                    state.client.unregister_system_shared_memory(name)
                    shm.destroy_shared_memory_region(handle)
                return
            inputs = [httpclient.InferInput(n, [16], "INT32").set_shared_memory(f"{tag}_io", 64, offset=o)
                      for n, o in (("INPUT0", 0), ("INPUT1", 64))]
            outputs = [httpclient.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory(f"{tag}_io", 64, offset=128)
            state.client.infer("add_sub", inputs, outputs=outputs)
            out = shm.get_contents_as_numpy(state.handle, np.int32, [16], offset=128)
            if not np.array_equal(out, 2 * a):
                raise AssertionError("wrong add_sub answer in shared memory")

        self.loop("shared memory (add_sub)", "add_sub", lambda: State(self), call)

    def streaming(self) -> None:
        import tritonclient.grpc as grpcclient

        values = np.array([3, 1, 4, 1, 5], dtype=np.int32)

        class State:
            def __init__(self, soak: Soak) -> None:
                self.client = grpcclient.InferenceServerClient(soak.grpc_url)
                self.results: queue.Queue = queue.Queue()
                self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

            def close(self) -> None:
                self.client.stop_stream()
                self.client.close()

        def call(state):
            t = grpcclient.InferInput("IN", [len(values)], "INT32")
            t.set_data_from_numpy(values)
            state.client.async_stream_infer("repeat", [t], enable_empty_final_response=True)
            got = []
            while True:
                result, error = state.results.get(timeout=30)
                if error is not None:
                    raise error
                if result.get_response().parameters.get("triton_final_response").bool_param:
                    break
                got.append(int(result.as_numpy("OUT")[0]))
            if got != values.tolist():
                raise AssertionError(f"wrong stream {got}")

        self.loop("grpc streaming (repeat, decoupled)", "repeat", lambda: State(self), call)

    # -- faults and samples -------------------------------------------------------------------------
    def killer(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        rng = random.Random(7)
        while not self.stop.wait(self.args.kill_every):
            workers = [(pid, model) for pid, model in self.workers().items() if model in ("add_sub", "identity")]
            if not workers:
                continue
            pid, model = rng.choice(workers)
            with self.lock:
                self.last_kill[model] = time.monotonic()
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
            ready = None
            while time.monotonic() - killed < 60:
                try:
                    if client.is_model_ready(model):
                        ready = time.monotonic() - killed
                        break
                except Exception:  # noqa: BLE001 - keep polling
                    pass
                time.sleep(0.005)
            self.kills.append({"model": model, "pid": pid, "ready_after_s": ready})
        client.close()

    def sample(self) -> dict:
        pids = {self.proc.pid: "front", **{p: f"worker {m}" for p, m in self.workers().items()}}
        procs = {}
        for pid, role in pids.items():
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration):
                continue
            procs[str(pid)] = {"role": role, "rss_kb": rss, "fds": fds}
        shm_objects = sorted(e for e in os.listdir("/dev/shm")
                             if any(e.startswith((f"ek.{p}.", f"sem.ek.{p}.")) for p in pids))
        shm_bytes = sum(os.stat("/dev/shm/" + e).st_size for e in shm_objects if os.path.exists("/dev/shm/" + e))
        return {"t": round(time.monotonic() - self.t0, 1), "processes": procs, "shm_objects": len(shm_objects),
                "shm_bytes": shm_bytes, "shm_names": shm_objects}

    def sampler(self) -> None:
        while not self.stop.wait(self.args.sample_every):
            self.samples.append(self.sample())

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.t0 = time.monotonic()
        self.start_server()
        loads = [self.http_binary, self.http_binary, self.http_json, self.grpc, self.shm, self.streaming, self.ensemble]
        threads = [threading.Thread(target=f, daemon=True) for f in loads]
        threads.append(threading.Thread(target=self.sampler, daemon=True))
        if self.args.kill_every > 0:
            threads.append(threading.Thread(target=self.killer, daemon=True))
        for t in threads:
            t.start()
        time.sleep(min(self.args.warmup, self.args.duration / 4))
        first = self.sample()
        self.samples.append(first)
        try:
            self.stop.wait(max(self.args.duration - (time.monotonic() - self.t0), 0))
        finally:
            last = self.sample()
            self.samples.append(last)
            self.stop.set()
            for t in threads:
                t.join(60)
            code = self.stop_server()
        self.seen.update(k["pid"] for k in self.kills)
        left = sorted(e for e in os.listdir("/dev/shm")
                      if any(e.startswith((f"ek.{p}.", f"sem.ek.{p}.")) for p in self.seen))
        return self.report(first, last, code, left)

    def report(self, first: dict, last: dict, code: int, left: list[str]) -> dict:
        def by_role(sample: dict) -> dict:
            roles: dict[str, dict] = {}
            for proc in sample["processes"].values():
                entry = roles.setdefault(proc["role"], {"rss_kb": 0, "fds": 0, "processes": 0})
                entry["rss_kb"] += proc["rss_kb"]
                entry["fds"] += proc["fds"]
                entry["processes"] += 1
            return roles

        ours = str(self.proc.pid)
        return {
            "duration_s": round(time.monotonic() - self.t0, 1),
            "server_exit_code": code,
            "loads": {k: {"ok": t.ok, "errors": t.errors, "expected_errors_after_kills": t.expected_errors,
                          "messages": dict(t.messages.most_common(5))} for k, t in self.tallies.items()},
            "kills": self.kills,
            "longest_time_to_ready_s": max((k["ready_after_s"] or float("inf") for k in self.kills), default=None),
            "first": {"t": first["t"], "roles": by_role(first), "shm_objects": first["shm_objects"],
                      "shm_bytes": first["shm_bytes"]},
            "last": {"t": last["t"], "roles": by_role(last), "shm_objects": last["shm_objects"],
                     "shm_bytes": last["shm_bytes"]},
            "front_rss_kb": [(s["t"], s["processes"].get(ours, {}).get("rss_kb")) for s in self.samples],
            "front_fds": [(s["t"], s["processes"].get(ours, {}).get("fds")) for s in self.samples],
            "shm_objects": [(s["t"], s["shm_objects"]) for s in self.samples],
            "shm_left_after_exit": left,
        }


def render(report: dict) -> str:
    lines = [f"soak: {report['duration_s']} s, server exit code {report['server_exit_code']}", "",
             f"{'load':40} {'ok':>9} {'errors':>7} {'after kills':>12}"]
    for kind, t in sorted(report["loads"].items()):
        lines.append(f"{kind:40} {t['ok']:>9} {t['errors']:>7} {t['expected_errors_after_kills']:>12}")
        for message, count in t["messages"].items():
            lines.append(f"    {count:>6} x {message}")
    kills = report["kills"]
    lines += ["", f"workers killed: {len(kills)}, back READY: {sum(k['ready_after_s'] is not None for k in kills)}, "
                  f"longest time to READY: {report['longest_time_to_ready_s']}", "",
              f"{'process':28} {'RSS first (MB)':>15} {'RSS last (MB)':>14} {'fds first':>10} {'fds last':>9}"]
    first, last = report["first"]["roles"], report["last"]["roles"]
    for role in sorted(set(first) | set(last)):
        a, b = first.get(role, {}), last.get(role, {})
        lines.append(f"{role:28} {a.get('rss_kb', 0) / 1024:>15.1f} {b.get('rss_kb', 0) / 1024:>14.1f} "
                     f"{a.get('fds', 0):>10} {b.get('fds', 0):>9}")
    lines += ["", f"/dev/shm objects of the server: first {report['first']['shm_objects']} "
                  f"({report['first']['shm_bytes'] / 2**20:.1f} MB), last {report['last']['shm_objects']} "
                  f"({report['last']['shm_bytes'] / 2**20:.1f} MB); left after exit: "
                  f"{report['shm_left_after_exit'] or 'none'}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--warmup", type=float, default=30, help="seconds before the first sample (default 30)")
    p.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills (0: none)")
    p.add_argument("--sample-every", type=float, default=10, help="seconds between samples (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the whole report (every sample) as JSON")
    args = p.parse_args(argv)
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        if soak.proc is not None and soak.proc.poll() is None:
            soak.proc.kill()
        shutil.rmtree(soak.workdir, ignore_errors=True)
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "samples": soak.samples}, f, indent=1)
    failed = report["server_exit_code"] != 0 or any(t["errors"] for t in report["loads"].values()) \
        or report["shm_left_after_exit"] or any(k["ready_after_s"] is None for k in report["kills"])
    return 1 if failed else 0
