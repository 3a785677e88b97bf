"""ONNX Runtime's intra-op pool, called directly: what a run costs back to back and after a pause.

Served, a model always runs after a pause (the time the request took to reach the worker), and ONNX
Runtime's pool wakes its threads for it; called back to back in a benchmark loop, it never pauses. This
probe puts a number on the difference for bench.backends' small conv net, for each pool size asked for
(``0`` is ONNX Runtime's default: one thread per physical core it sees), with the backend's session
options (spinning off) and, with ``spin``, spinning on but stopped after each run
(``session.force_spinning_stop``). It prints, per setting: the threads the session added to the
process, and the p50 (µs) of a run back to back, after a 100 µs sleep and after a 1 ms sleep.

    python -m bench.probe_ort [--threads 0 1 2 4] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _p50(run, x: np.ndarray, seconds: float, pause: float) -> float:
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if pause:
            time.sleep(pause)
        t = time.perf_counter_ns()
        run(x)
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1000


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from bench.backends import _onnx_models
    from workers.backend import Model
    from workers.backends.onnxruntime import _options

    p = argparse.ArgumentParser(prog="python -m bench.probe_ort", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2, 4], help="intra-op pool sizes (0: default)")
    p.add_argument("--seconds", type=float, default=1.0, help="measurement per setting and pause (default 1)")
    args = p.parse_args(argv)
    affinity = len(os.sched_getaffinity(0))
    print(f"onnxruntime {ort.__version__}; os.cpu_count {os.cpu_count()}; affinity {affinity} cores")
    repo = tempfile.mkdtemp(prefix="probe-ort-")
    try:
        spec = _onnx_models(repo)[0]
        path = spec["direct"]["path"]
        x = np.random.default_rng(0).standard_normal((1, *spec["shape"]), dtype=np.float32)
        settings = [(str(n), {"intra_op_thread_count": {"string_value": str(n)}}) for n in args.threads]
        settings.append(("0, spin + stop", {"session.intra_op.allow_spinning": {"string_value": "1"},
                                            "session.force_spinning_stop": {"string_value": "1"}}))
        print("| intra-op threads | threads added | back to back | after 100 µs | after 1 ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, parameters in settings:
            before = _threads()
            options = _options(Model({"name": "probe", "config": {"parameters": parameters}}))
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            added = _threads() - before

            def run(x: np.ndarray, session=session) -> None:
                session.run(["OUTPUT"], {"INPUT": x})

            for _ in range(50):
                run(x)
            cells = [f"{_p50(run, x, args.seconds, pause):,.0f}" for pause in (0.0, 1e-4, 1e-3)]
            print(f"| {label} | {added} | " + " | ".join(cells) + " |", flush=True)
            del session
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
