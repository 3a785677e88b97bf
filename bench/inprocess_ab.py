"""``python -m bench.inprocess_ab --baseline-tree DIR``: an A/B of two builds' in-process overhead, one machine.

Issue 11's in-process target (``async_infer()`` within 100 µs of ONNX Runtime's ``session.run``) moves by
tens of µs between server starts on the device machines, more than most changes move it, so comparing
two builds needs both in one run. Each run is a fresh process in one tree (this one, then the baseline,
then the other way round): it starts ``kernel.api.Server`` on the small ONNX conv net of bench.backends
and alternates ``--calls`` direct calls with as many ``async_infer()`` calls, five times; its result is
the median of the five p50 differences. The page prints every run's and each build's median.

On the device: ``scripts/device-bundle --baseline REV``, then
``STEPS=none PROBE="python3 -m bench.inprocess_ab --baseline-tree .device-bundle/baseline.tar.gz" bash
bench/device_run.sh`` (a ``.tar.gz`` is unpacked into a temporary folder first).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

_RESULT = re.compile(r"^overhead_us ([\d.\-]+)$", re.M)


def _child(calls: int) -> None:
    """One run, in whatever tree PYTHONPATH names (its kernel and bench.backends)."""
    import asyncio
    import time

    import numpy as np

    from bench.backends import _onnx_models
    from kernel.api import Server

    repo = os.path.join(tempfile.mkdtemp(prefix="inprocess-ab-"), "models")
    os.makedirs(repo)
    model = _onnx_models(repo)[0]
    call = model["direct"]
    if not callable(call):  # a spec, as bench.backends has it since stop 23: the call is made here all the same
        from bench.backends import _direct_call

        call = _direct_call(call)
    for name in os.listdir(repo):
        if name != model["name"]:
            import shutil

            shutil.rmtree(os.path.join(repo, name))

    async def main() -> None:
        async with Server(model_repository=repo) as server:
            handle = server.model(model["name"])
            buffer = handle.input_buffer(model["input"], [1, *model["shape"]])
            buffer[:] = np.random.default_rng(0).standard_normal(buffer.shape)
            x, feed = np.array(buffer), {model["input"]: buffer}
            for _ in range(300):
                (await handle.async_infer(feed)).release()
            overheads = []
            for _ in range(5):
                direct, served = [], []
                for _ in range(calls):
                    t = time.perf_counter_ns()
                    call(x)
                    direct.append(time.perf_counter_ns() - t)
                for _ in range(calls):
                    t = time.perf_counter_ns()
                    (await handle.async_infer(feed)).release()
                    served.append(time.perf_counter_ns() - t)
                overheads.append((statistics.median(served) - statistics.median(direct)) / 1e3)
            print(f"overhead_us {statistics.median(overheads):.1f}", flush=True)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main())


def run(trees: dict[str, str], runs: int, calls: int) -> dict[str, list[float]]:
    """``runs`` runs of each tree, alternating which goes first; their overheads (µs) by tree."""
    results: dict[str, list[float]] = {name: [] for name in trees}
    names = list(trees)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            tree = trees[name]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p))
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--calls", str(calls)],
                                  cwd=tree, env=env, capture_output=True, text=True, timeout=300)
            found = _RESULT.search(done.stdout)
            if found is None:
                print(f"{name}: run {i + 1} failed\n{done.stderr[-1500:]}", flush=True)
                continue
            results[name].append(float(found.group(1)))
            print(f"{name}: run {i + 1}: {found.group(1)} µs", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inprocess_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-tree", help="a checkout of the build to compare with (or a .tar.gz of one)")
    p.add_argument("--runs", type=int, default=6, help="runs of each build (default 6)")
    p.add_argument("--calls", type=int, default=2000, help="calls per path in each of a run's 5 rounds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.calls)
        return 0
    if not args.baseline_tree:
        p.error("--baseline-tree is required")
    baseline = os.path.abspath(args.baseline_tree)
    if baseline.endswith(".tar.gz"):
        unpacked = tempfile.mkdtemp(prefix="baseline-tree-")
        with tarfile.open(baseline) as archive:
            if hasattr(tarfile, "data_filter"):  # (Python 3.10.12 and later)
                archive.extractall(unpacked, filter="data")
            else:  # pragma: no cover
                archive.extractall(unpacked)
        baseline = unpacked
    if not os.path.isfile(os.path.join(baseline, "kernel", "api.py")):
        p.error(f"{baseline} is not a checkout of this project")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = run({"this build": here, "baseline": baseline}, args.runs, args.calls)
    for name, values in results.items():
        median = f"{statistics.median(values):.1f} µs" if values else "none"
        print(f"{name}: median of {len(values)} runs {median} ({', '.join(f'{v:.1f}' for v in values)})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
