"""Measurement windows, stability and server-side statistics arithmetic (no I/O here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
# Server-side phases reported per request, in perf_analyzer's column order.
SERVER_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Window:
    """One measurement window: the requests that completed inside it."""

    start_ns: int
    end_ns: int
    latencies_ns: list[int] = field(default_factory=list)
    batch_size: int = 1
    delayed: int = 0  # request-rate mode: requests sent late
    server_before: dict[str, Any] | None = None  # statistics snapshot at the window's start
    server_after: dict[str, Any] | None = None  # ... and at its end

    @property
    def duration_s(self) -> float:
        return max(self.end_ns - self.start_ns, 1) / 1e9

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def throughput(self) -> float:
        """Inferences per second (requests x batch size), as perf_analyzer counts them."""
        return self.count * self.batch_size / self.duration_s

    def latency_us(self, percentile: int | None) -> float:
        """A latency percentile, or the average when ``percentile`` is None, in microseconds."""
        return latency_us(self.latencies_ns, percentile)


def latency_us(latencies_ns: Sequence[int], percentile: int | None) -> float:
    if not latencies_ns:
        return 0.0
    values = np.asarray(latencies_ns, dtype=np.float64)
    if percentile is None:
        return float(values.mean()) / 1e3
    return float(np.percentile(values, percentile)) / 1e3


def is_stable(windows: Sequence[Window], count: int = 3, threshold: float = 0.10,
              percentile: int | None = 50) -> bool:
    """perf_analyzer's rule: the last ``count`` windows all completed requests, and their largest
    throughput and latency are within ``1 + threshold`` of the smallest ones."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    throughputs = [w.throughput for w in last]
    latencies = [w.latency_us(percentile) for w in last]
    if min(throughputs) <= 0 or min(latencies) <= 0:
        return False
    return (max(throughputs) / min(throughputs) <= 1 + threshold
            and max(latencies) / min(latencies) <= 1 + threshold)


@dataclass
class Summary:
    """The merged numbers of the windows a measurement reports."""

    requests: int
    duration_s: float
    throughput: float
    latency_us: dict[str, float]  # "p50", "p90", "p95", "p99", "avg"
    delayed: int
    server: dict[str, Any] | None


def summarize(windows: Sequence[Window], percentiles: Sequence[int] = PERCENTILES) -> Summary:
    """Merge windows: throughput over their total time, percentiles over all their requests."""
    if not windows:
        raise ValueError("no measurement windows")
    latencies = [lat for w in windows for lat in w.latencies_ns]
    duration = sum(w.duration_s for w in windows)
    requests = len(latencies)
    batch = windows[-1].batch_size
    values = {f"p{p}": latency_us(latencies, p) for p in percentiles}
    values["avg"] = latency_us(latencies, None)
    server = None
    if windows[0].server_before is not None and windows[-1].server_after is not None:
        server = server_split(windows[0].server_before, windows[-1].server_after)
    return Summary(requests=requests, duration_s=duration, throughput=requests * batch / duration,
                   latency_us=values, delayed=sum(w.delayed for w in windows), server=server)


def _counter(stats: dict[str, Any], phase: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(phase, {}) or {}
    return int(entry.get("count", 0) or 0), int(entry.get("ns", 0) or 0)


def server_split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-request averages (µs) of each server phase between two statistics snapshots of one
    model (``model_stats[i]`` of the statistics extension), as perf_analyzer computes them."""
    out: dict[str, Any] = {}
    for phase in ("success", *SERVER_PHASES):
        c0, n0 = _counter(before, phase)
        c1, n1 = _counter(after, phase)
        count, ns = c1 - c0, n1 - n0
        key = "request" if phase == "success" else phase
        out[f"{key}_us"] = ns / count / 1e3 if count > 0 else 0.0
        if phase == "success":
            out["success_count"] = count
    out["inference_count"] = int(after.get("inference_count", 0) or 0) - int(before.get("inference_count", 0) or 0)
    out["execution_count"] = int(after.get("execution_count", 0) or 0) - int(before.get("execution_count", 0) or 0)
    accounted = sum(out[f"{p}_us"] for p in SERVER_PHASES)
    out["overhead_us"] = max(out["request_us"] - accounted, 0.0)
    return out


def model_stats(response: dict[str, Any], model: str, version: str = "") -> dict[str, Any]:
    """The entry of ``model`` in a statistics response (HTTP JSON or gRPC as_json=True)."""
    for entry in response.get("model_stats", []):
        if entry.get("name") == model and (not version or str(entry.get("version")) == version):
            return entry
    return {}
