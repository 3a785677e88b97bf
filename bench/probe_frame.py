"""frame_stats' compute on a 1080p frame, by where the frame's pages are: why served is slower than direct.

Served, frame_stats reads the frame where the client put it, a POSIX shared-memory region of 4 KiB
pages; bench compare's direct call reads a numpy array, which numpy asks the kernel to back with
transparent huge pages. This probe times ``channel_means`` (examples/models/frame_stats) on the same
frame in each kind of memory, back to back and after a pause, so the difference can be put on the
pages, the pause, or neither. ``madvise(MADV_COLLAPSE)`` (Linux 6.1+) asks the kernel to rebuild a
shared mapping with huge pages in place, contents kept.

    python -m bench.probe_frame [--seconds 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import mmap
import os
import statistics
import sys
import time
import types

import numpy as np

from bench.cli import REPO_ROOT

MADV_COLLAPSE = 25
SHAPE = (1080, 1920, 3)


def _channel_means():
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    path = os.path.join(REPO_ROOT, "examples", "models", "frame_stats", "1", "model.py")
    spec = importlib.util.spec_from_file_location("probe_frame_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.channel_means


def _busy_300us() -> None:
    end = time.perf_counter_ns() + 300_000
    while time.perf_counter_ns() < end:
        pass


def _p50(f, frame: np.ndarray, seconds: float, pause=None) -> float:
    """p50 (µs) of ``f(frame)``, each call after ``pause()`` if given."""
    for _ in range(10):
        f(frame)
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if pause is not None:
            pause()
        t = time.perf_counter_ns()
        f(frame)
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1000


def _huge_kib(address: int) -> str:
    """The huge-page fields of the mapping holding ``address`` (/proc/self/smaps), non-zero ones."""
    fields, inside = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and ("Huge" in head or "PmdMapped" in head):
                if line.split()[1] != "0":
                    fields.append(f"{head} {line.split()[1]} kB")
    return ", ".join(fields) or "none"


def main(argv: list[str] | None = None) -> int:
    import posix_ipc

    p = argparse.ArgumentParser(prog="python -m bench.probe_frame", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="measurement per memory and pause (default 1)")
    args = p.parse_args(argv)
    for name in ("enabled", "shmem_enabled"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                print(f"THP {name}: {f.read().strip()}")
        except OSError as e:
            print(f"THP {name}: {e}")
    channel_means = _channel_means()
    source = np.random.default_rng(0).integers(0, 255, size=SHAPE, dtype=np.uint8)
    n = source.nbytes
    frames: list[tuple[str, np.ndarray]] = [("numpy (its huge-page advice)", source.copy())]
    np._core.multiarray._set_madvise_hugepage(False)
    frames.append(("numpy, 4 KiB pages", source.copy()))
    np._core.multiarray._set_madvise_hugepage(True)
    maps = []
    for label, advice in (("POSIX shm", None), ("POSIX shm + MADV_HUGEPAGE", mmap.MADV_HUGEPAGE),
                          ("POSIX shm + MADV_COLLAPSE", MADV_COLLAPSE)):
        name = f"/probe-frame-{os.getpid()}-{len(maps)}"
        mem = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=n)
        m = mmap.mmap(mem.fd, n)
        mem.close_fd()
        posix_ipc.unlink_shared_memory(name)
        frame = np.frombuffer(m, np.uint8).reshape(SHAPE)
        frame[:] = source
        if advice is not None:
            try:
                m.madvise(advice)
            except OSError as e:
                label += f" ({e.strerror})"
        maps.append(m)
        frames.append((label, frame))
    print("| memory | huge pages (smaps) | back to back | after 300 µs sleep | after 300 µs busy wait |")
    print("| --- | --- | ---: | ---: | ---: |")

    for label, frame in frames:
        cells = [f"{_p50(channel_means, frame, args.seconds, pause):,.0f}"
                 for pause in (None, lambda: time.sleep(3e-4), _busy_300us)]
        print(f"| {label} | {_huge_kib(frame.ctypes.data)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
