"""``python -m bench.probe_phases [bench.backends arguments]``: where a served request's time goes, function by
function and hop by hop, in the real front and worker processes.

A probe, not a benchmark. It runs ``python -m bench.backends`` (by default ``--only torch_cnn --paired 0
--no-docs``) with a ``sitecustomize`` on PYTHONPATH that, in every Python process of the run (the bench
process, which is the in-process front; a served front; the workers), wraps a few functions of the hot path
as their modules load and times each call. The ring's messages are stamped too, on both sides, so the hops
between the processes (the front's send of a batch -> the worker's take; the worker's answer -> the front's
take) are timed on the one clock they share (CLOCK_MONOTONIC). Each wrapper costs well under a
microsecond; what is timed includes the wrappers nested in it.

Why: the statistics extension splits a request into queue / compute input / infer / output, and the
trace adds the front's events; neither says which Python calls inside compute output, or which hop
between processes, hold the time (issue 11's resnet18 row: about 50 µs of compute output beyond its copy).
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ENV = "EK_PROBE_PHASES"  # the folder the processes dump their records into
_CAP = 200_000
_durations: dict[str, list[int]] = {}
_events: list[tuple] = []  # (what, kind, id, ns): ring sends/takes, and execute starts/ends
_last_dump = 0


def _dump(force: bool = False) -> None:
    global _last_dump
    now = time.perf_counter_ns()
    if not force and now - _last_dump < 1_000_000_000:
        return
    _last_dump = now
    path = os.path.join(os.environ[ENV], f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "argv": list(getattr(sys, "orig_argv", sys.argv)),
                   "durations": _durations, "events": _events}, f)
    os.replace(path + ".tmp", path)


def _timed(fn: Callable, label: str) -> Callable:
    samples = _durations.setdefault(label, [])
    clock = time.perf_counter_ns

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            if len(samples) < _CAP:
                samples.append(clock() - t)

    return timed


def _wrap(owner: Any, name: str, label: str) -> None:
    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    timed = _timed(getattr(owner, name), label)
    setattr(owner, name, staticmethod(timed) if static else timed)


def _ring(module: Any) -> None:
    ring = module.Ring
    send, take = ring.send, ring._take
    clock = time.perf_counter_ns

    def timed_send(self: Any, obj: Any, **kwargs: Any) -> None:
        t = clock()
        send(self, obj, **kwargs)
        if isinstance(obj, dict) and len(_events) < _CAP:
            _events.append(("send", obj.get("t"), obj.get("id"), t, clock()))
        _dump()

    def timed_take(self: Any) -> Any:
        t = clock()
        obj = take(self)
        if isinstance(obj, dict) and len(_events) < _CAP:
            _events.append(("take", obj.get("t"), obj.get("id"), t, clock()))
        return obj

    ring.send, ring._take = timed_send, timed_take


def _runtime(module: Any) -> None:
    worker = module.Worker
    execute = worker.execute
    clock = time.perf_counter_ns

    def timed_execute(self: Any, msg: dict) -> None:
        t = clock()
        try:
            execute(self, msg)
        finally:
            if len(_events) < _CAP:
                _events.append(("execute", "x", msg.get("id"), t, clock()))

    worker.execute = timed_execute
    for name in ("_inputs", "_result", "output_loc", "_place", "send", "_free"):
        _wrap(worker, name, f"worker.{name}")


def _gpu(module: Any) -> None:
    for name in ("copy_to_host", "pin", "on_device", "describe", "to_device", "host_view", "as_host_array"):
        _wrap(module, name, f"gpu.{name}")


def _pytorch(module: Any) -> None:
    backend = module.PyTorchBackend
    for name in ("execute", "_output", "_results", "_tensor"):
        _wrap(backend, name, f"pytorch.{name}")
    for name in ("split", "batch_input", "batch_sizes"):
        _wrap(module, name, f"pytorch.{name}")
    _wrap(module.torch.cuda, "synchronize", "torch.cuda.synchronize")


def _onnxruntime(module: Any) -> None:
    _wrap(module.OnnxRuntimeBackend, "execute", "onnxruntime.execute")


def _model(module: Any) -> None:
    _wrap(module.Batch, "done", "front.Batch.done")


def _instance(module: Any) -> None:
    _wrap(module.Instance, "execute", "front.Instance.execute")


def _http_server(module: Any) -> None:
    for name in ("data_received", "_respond"):  # a request's parse and dispatch; an answer's encoding and write
        _wrap(module._Connection, name, f"http.{name}")


def _http_front(module: Any) -> None:
    _wrap(module.HttpFront, "infer", "http.HttpFront.infer")
    _wrap(module.HttpFront, "_infer_response", "http.HttpFront._infer_response")


_PATCHES: dict[str, Callable[[Any], None]] = {
    "shm.ring": _ring, "workers.runtime": _runtime, "workers.gpu": _gpu, "workers.backends.pytorch": _pytorch,
    "workers.backends.onnxruntime": _onnxruntime, "kernel.model": _model, "kernel.instance": _instance,
    "protocol.http.server": _http_server, "protocol.http.front": _http_front,
}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches a module of _PATCHES right after it has run (the import system finds it as usual)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            loader_exec(module)
            try:
                patch(module)
            except Exception as e:  # a probe never breaks the run
                sys.stderr.write(f"probe_phases: patching {name} failed: {e!r}\n")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """In a process started with ``EK_PROBE_PHASES`` set (from the generated sitecustomize)."""
    sys.meta_path.insert(0, _Finder())
    atexit.register(_dump, True)


# -- the run and its report ---------------------------------------------------------------------------
def _p50(values: list[int]) -> float:
    return statistics.median(values) / 1000 if values else float("nan")


def report(folder: str) -> dict:
    """Per front/worker pair: the hops' p50 (µs) matched by batch id, and each timed function's p50."""
    dumps = []
    for name in os.listdir(folder):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                dumps.append(json.load(f))
    by_pid = {d["pid"]: d for d in dumps}
    out: dict = {}
    for worker in dumps:
        if "workers" not in " ".join(worker["argv"]):
            continue
        front = by_pid.get(worker["ppid"])
        if front is None:
            continue
        fe: dict[tuple, tuple] = {}
        for what, kind, ident, t0, t1 in front["events"]:
            fe[(what, kind, ident)] = (t0, t1)
        we: dict[tuple, tuple] = {}
        for what, kind, ident, t0, t1 in worker["events"]:
            we[(what, kind, ident)] = (t0, t1)
        hops: dict[str, list[int]] = {k: [] for k in (
            "front: pack+write 'x'", "ring in: front wrote -> worker took", "worker: took -> execute starts",
            "worker: execute (whole)", "worker: pack+write 'r'", "ring out: worker wrote -> front took",
            "front batch: sent -> answer taken")}
        for (what, kind, ident), (t0, t1) in fe.items():
            if what != "send" or kind != "x":
                continue
            took = we.get(("take", "x", ident))
            run = we.get(("execute", "x", ident))
            answer = we.get(("send", "r", ident))
            back = fe.get(("take", "r", ident))
            if not (took and run and answer and back):
                continue
            hops["front: pack+write 'x'"].append(t1 - t0)
            hops["ring in: front wrote -> worker took"].append(took[1] - t1)
            hops["worker: took -> execute starts"].append(run[0] - took[1])
            hops["worker: execute (whole)"].append(run[1] - run[0])
            hops["worker: pack+write 'r'"].append(answer[1] - answer[0])
            hops["ring out: worker wrote -> front took"].append(back[1] - answer[1])
            hops["front batch: sent -> answer taken"].append(back[1] - t1)
        if not hops["worker: execute (whole)"]:
            continue  # a model this run did not measure
        try:
            instance = json.loads(worker["argv"][-1]).get("instance", "?")
        except (ValueError, AttributeError):
            instance = "?"
        key = f"{' '.join(front['argv'][1:3])} (pid {front['pid']}) -> {instance} (pid {worker['pid']})"
        out[key] = {
            "batches": len(hops["worker: execute (whole)"]),
            "hops_p50_us": {k: round(_p50(v), 1) for k, v in hops.items()},
            "front_p50_us": {k: [len(v), round(_p50(v), 1)] for k, v in sorted(front["durations"].items()) if v},
            "worker_p50_us": {k: [len(v), round(_p50(v), 1)] for k, v in sorted(worker["durations"].items()) if v},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["--only", "torch_cnn", "--paired", "0", "--seconds", "2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="probe-phases-") as tmp:
        site, dumps = os.path.join(tmp, "site"), os.path.join(tmp, "dumps")
        os.makedirs(site)
        os.makedirs(dumps)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write("import os\nif os.environ.get('EK_PROBE_PHASES'):\n"
                    "    import bench.probe_phases\n    bench.probe_phases.install()\n")
        env = dict(os.environ, **{ENV: dumps})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, root, env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "bench.backends", "--no-docs", "--out", os.path.join(tmp, "bench"), *args]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=env, cwd=root).returncode
        result = report(dumps)
    for key, r in result.items():
        print(f"\n## {key}: {r['batches']} batches matched (p50 µs)")
        for part in ("hops_p50_us", "front_p50_us", "worker_p50_us"):
            print(f"  {part}:")
            for k, v in r[part].items():
                print(f"    {k:<45} {v}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe-phases.json"), "w") as f:
            json.dump(result, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
