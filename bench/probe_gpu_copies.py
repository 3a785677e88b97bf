"""``python -m bench.probe_gpu_copies``: what the PyTorch backend's copies cost on a GPU, against the direct call's.

A probe, not a benchmark. For resnet18's input (1x3x224x224 float32, 588 KiB) and output (1x1000
float32): the direct call's way (``torch.from_numpy(x).to(cuda)`` from pageable memory, ``.cpu()``)
against the backend's (workers.gpu.to_device from page-locked shared memory, non-blocking, and
copy_to_host into page-locked shared memory), and the pieces of each, timed alone, p50 µs. Then the
served sequence around a real forward (torchvision's resnet18 where installed, else a stand-in kernel of
about a millisecond), phase by phase, as the backend and the worker run it.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in the backend


def _p50(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1000


def _phases(steps: list, n: int = 400) -> dict[str, float]:
    """Run ``steps`` ((label, fn) in order) ``n`` times; each step's p50 µs, and the whole's."""
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {label: [] for label, _ in steps}
    whole = []
    for k in range(n + 20):
        start = t = clock()
        for label, fn in steps:
            fn()
            now = clock()
            if k >= 20:
                samples[label].append(now - t)
            t = now
        if k >= 20:
            whole.append(t - start)
    out = {label: statistics.median(s) / 1000 for label, s in samples.items()}
    out["whole"] = statistics.median(whole) / 1000
    return out


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
        shm_in_ro = shm_in.view()
        shm_in_ro.flags.writeable = False  # a request's input, as the worker maps it
        shm_out = np.frombuffer(region.buf, np.float32, 1000, offset=4 << 20).reshape(1, 1000)
        gpu.pin(shm_in)
        host_in = gpu.host_view(shm_in)
        host_out = gpu.host_view(shm_out)
        dev_in = torch.empty(x.shape, device=dev)
        y = torch.zeros((1, 1000), device=dev)
        sync = torch.cuda.synchronize
        stream = torch.cuda.current_stream(dev)
        rows = {
            "H2D, direct: from_numpy(x).to(cuda), pageable": lambda: (torch.from_numpy(x).to(dev), sync()),
            "H2D, backend: gpu.to_device from pinned shm (+ synchronize)": lambda: (gpu.to_device(shm_in_ro, dev),
                                                                                    sync()),
            "H2D, backend: gpu.to_device from pinned shm, no synchronize": lambda: gpu.to_device(shm_in_ro, dev),
            "  host_view of the read-only input": lambda: gpu.host_view(shm_in_ro),
            "  pin (already pinned: the lookup)": lambda: gpu.pin(shm_in_ro),
            "  host tensor .to(cuda, non_blocking=True)": lambda: host_in.to(dev, non_blocking=True),
            "  into a kept device tensor: copy_(non_blocking=True)": lambda: dev_in.copy_(host_in, non_blocking=True),
            "D2H, direct: y.cpu().numpy()": lambda: y.cpu().numpy(),
            "D2H, backend: gpu.copy_to_host into pinned shm": lambda: gpu.copy_to_host(y, shm_out),
            "  host_out.copy_(y) (a kept host view)": lambda: host_out.copy_(y),
            "  copy_(non_blocking=True) + stream.synchronize()": lambda: (host_out.copy_(y, non_blocking=True),
                                                                         stream.synchronize()),
            "  on_device + describe": lambda: (gpu.on_device(y), gpu.describe(y)),
            "synchronize alone": sync,
            "stream.synchronize alone": stream.synchronize,
        }
        for label, fn in rows.items():
            print(f"{label}: p50 {_p50(fn):.1f} µs", flush=True)

        try:
            import torchvision

            model = torch.jit.script(torchvision.models.resnet18(weights=None).eval()).to(dev)
            label = "resnet18 (TorchScript)"
        except ImportError:
            weight = torch.randn(2048, 2048, device=dev)
            model = lambda t: (weight @ weight @ weight)[:1, :1000] + t.mean()  # noqa: E731
            label = "a stand-in GPU kernel"
        state: dict = {}

        def forward() -> None:
            with torch.inference_mode(), torch.no_grad():
                state["y"] = model(state["x"])

        served = [
            ("to_device", lambda: state.__setitem__("x", gpu.to_device(shm_in_ro, dev))),
            ("forward (launches)", forward),
            ("synchronize", lambda: sync(dev)),
            ("output checks (contiguous, dtype, dims)", lambda: state.__setitem__(
                "y", state["y"].contiguous() if not state["y"].requires_grad else state["y"].detach())),
            ("copy_to_host", lambda: gpu.copy_to_host(state["y"], shm_out)),
        ]
        direct = [
            ("from_numpy(x).to(cuda)", lambda: state.__setitem__("x", torch.from_numpy(x).to(dev))),
            ("forward (launches)", forward),
            (".cpu().numpy()", lambda: state.__setitem__("out", state["y"].cpu().numpy())),
        ]
        for name, steps in (("served", served), ("direct", direct), ("served", served), ("direct", direct)):
            phases = _phases(steps)
            print(f"{label}, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + " (p50 µs)",
                  flush=True)
    finally:
        gpu.unpin_all()
        region.close()
        region.unlink()


if __name__ == "__main__":
    main()
