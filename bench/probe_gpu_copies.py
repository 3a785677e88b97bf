"""``python -m bench.probe_gpu_copies``: what the PyTorch backend's copies cost on a GPU, against the direct call's.

A probe, not a benchmark. For resnet18's input (1x3x224x224 float32, 588 KiB) and output (1x1000
float32): the direct call's way (``torch.from_numpy(x).to(cuda)`` from pageable memory, ``.cpu()``)
against the backend's (workers.gpu.to_device from page-locked shared memory, non-blocking, and
copy_to_host into page-locked shared memory), each timed alone with a synchronize, p50 µs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _p50(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1000


def main() -> None:
    import torch

    from shm.region import Region, new_name
    from workers import gpu

    dev = torch.device("cuda", 0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    region = Region(new_name("probe"), 8 << 20, create=True)
    try:
        shm_in = np.frombuffer(region.buf, np.float32, x.size).reshape(x.shape)
        shm_in[:] = x
        shm_out = np.frombuffer(region.buf, np.float32, 1000, offset=4 << 20).reshape(1, 1000)
        y = torch.zeros((1, 1000), device=dev)
        sync = torch.cuda.synchronize
        rows = {
            "H2D, direct: from_numpy(x).to(cuda), pageable": lambda: (torch.from_numpy(x).to(dev), sync()),
            "H2D, backend: gpu.to_device from pinned shm (+ synchronize)": lambda: (gpu.to_device(shm_in, dev), sync()),
            "H2D, backend: gpu.to_device from pinned shm, no synchronize": lambda: gpu.to_device(shm_in, dev),
            "host_view of a read-only array": lambda: gpu.host_view(np.frombuffer(bytes(16), np.float32)),
            "D2H, direct: y.cpu().numpy()": lambda: y.cpu().numpy(),
            "D2H, backend: gpu.copy_to_host into pinned shm": lambda: gpu.copy_to_host(y, shm_out),
            "synchronize alone": sync,
        }
        for label, fn in rows.items():
            print(f"{label}: p50 {_p50(fn):.1f} µs", flush=True)
    finally:
        gpu.unpin_all()
        region.close()
        region.unlink()


if __name__ == "__main__":
    main()
