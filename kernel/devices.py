"""What accelerators this machine has (without importing a GPU library)."""

from __future__ import annotations

import glob
import os


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process (Jetson's integrated GPU counts as one).

    ``EDGE_KERNEL_GPU_COUNT`` overrides the detection (tests on machines without a GPU).
    """
    forced = os.environ.get("EDGE_KERNEL_GPU_COUNT")
    if forced is not None and forced.strip().isdigit():
        return int(forced)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return 0
    count = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    if count == 0 and os.path.exists("/etc/nv_tegra_release"):
        count = 1
    if visible is not None and count:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def dla_count() -> int:
    """NVDLA cores (Jetson Xavier/Orin)."""
    return len(glob.glob("/dev/nvhost-nvdla*")) or len(glob.glob("/dev/nvdla*"))
