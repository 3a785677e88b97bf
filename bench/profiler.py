"""Load generation and measurement: concurrency and request-rate modes, windows until stable.

Concurrency N is N coroutines, each sending its next request as soon as the previous one answered.
Request rate R sends on a fixed (or Poisson) schedule whatever the answers do; a request sent more
than ``DELAY_NS`` after its scheduled time counts as delayed. After warm-up requests, windows of
``measurement_interval_ms`` follow one another until the last ``stability_windows`` agree within
``stability_percentage`` (perf_analyzer's rule) or ``max_trials`` windows were measured; the report
merges those last windows. Server statistics are read at every window boundary.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.clients import Client, ClientOptions, make_client
from bench.inputs import BenchError
from bench.stats import Summary, Window, is_stable, model_stats, summarize

DELAY_NS = 1_000_000
WARMUP_TIMEOUT_S = 120.0


@dataclass
class Settings:
    """How to load the server and when a measurement is good enough."""

    concurrency: list[int] = field(default_factory=list)
    request_rates: list[float] = field(default_factory=list)
    request_distribution: str = "constant"  # constant | poisson
    measurement_interval_ms: int = 5000
    stability_percentage: float = 10.0
    stability_windows: int = 3
    max_trials: int = 10
    percentile: int | None = 50  # latency that must be stable (None: the average)
    warmup_requests: int = 10


@dataclass
class LevelResult:
    """The outcome at one concurrency or request rate."""

    mode: str  # "concurrency" | "request_rate"
    level: float
    stable: bool
    windows: list[Window]
    summary: Summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "level": self.level, "stable": self.stable,
            "summary": asdict(self.summary),
            "windows": [{"duration_s": w.duration_s, "requests": w.count, "throughput": w.throughput,
                         "p50_us": w.latency_us(50), "avg_us": w.latency_us(None), "delayed": w.delayed}
                        for w in self.windows],
        }


@dataclass
class Report:
    """Everything one ``bench`` run measured."""

    options: ClientOptions
    settings: Settings
    model: dict[str, Any]
    levels: list[LevelResult]

    def to_dict(self) -> dict[str, Any]:
        options = asdict(self.options)
        return {"client": options, "settings": asdict(self.settings), "model": self.model,
                "results": [r.to_dict() for r in self.levels]}


class _Recorder:
    """Completed requests as (end time, latency, delayed), in completion order."""

    def __init__(self) -> None:
        self.done: list[tuple[int, int, bool]] = []
        self.error: BaseException | None = None
        self.failed = asyncio.Event()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.failed.set()


async def _send(client: Client, rec: _Recorder, delayed: bool = False) -> None:
    start = time.perf_counter_ns()
    try:
        await client.infer()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported by the controller
        rec.fail(e)
        return
    end = time.perf_counter_ns()
    rec.done.append((end, end - start, delayed))


async def _concurrency_worker(client: Client, rec: _Recorder, stop: asyncio.Event) -> None:
    while not stop.is_set() and rec.error is None:
        await _send(client, rec)


async def _rate_scheduler(client: Client, rec: _Recorder, stop: asyncio.Event, rate: float,
                          distribution: str, inflight: set[asyncio.Task]) -> None:
    rng = np.random.default_rng(0)
    gap_ns = 1e9 / rate
    next_ns = float(time.perf_counter_ns())
    while not stop.is_set() and rec.error is None:
        now = time.perf_counter_ns()
        while next_ns <= now:  # send every request that is due, late ones flagged
            task = asyncio.create_task(_send(client, rec, delayed=now - next_ns > DELAY_NS))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            next_ns += rng.exponential(gap_ns) if distribution == "poisson" else gap_ns
        await asyncio.sleep(max(next_ns - time.perf_counter_ns(), 0) / 1e9)


async def _wait(rec: _Recorder, seconds: float) -> None:
    """Sleep, but wake up as soon as a request fails."""
    try:
        await asyncio.wait_for(rec.failed.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
    _check(rec)


def _check(rec: _Recorder) -> None:
    if rec.error is not None:
        message = getattr(rec.error, "message", None)
        text = message() if callable(message) else str(rec.error)
        raise BenchError(f"inference request failed: {text or type(rec.error).__name__}")


async def _statistics(client: Client, warned: list[bool]) -> dict[str, Any] | None:
    try:
        response = await client.statistics()
    except Exception as e:  # noqa: BLE001 - the split is optional; the measurement goes on
        if not warned[0]:
            print(f"warning: no server statistics ({e}); the server-side split is left out", file=sys.stderr)
            warned[0] = True
        return None
    if response is None:
        return None
    return model_stats(response, client.options.model, client.options.model_version)


async def measure_level(client: Client, settings: Settings, mode: str, level: float) -> LevelResult:
    """Warm up, then measure windows at one load level until stable or out of trials."""
    rec = _Recorder()
    stop = asyncio.Event()
    inflight: set[asyncio.Task] = set()
    if mode == "concurrency":
        load = [asyncio.create_task(_concurrency_worker(client, rec, stop)) for _ in range(int(level))]
    else:
        load = [asyncio.create_task(_rate_scheduler(client, rec, stop, level, settings.request_distribution,
                                                    inflight))]
    warned = [False]
    windows: list[Window] = []
    threshold = settings.stability_percentage / 100
    try:
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while len(rec.done) < settings.warmup_requests:
            await _wait(rec, 0.01)
            if time.monotonic() > deadline:
                raise BenchError(f"warm-up: {len(rec.done)} of {settings.warmup_requests} requests answered in "
                                 f"{WARMUP_TIMEOUT_S:.0f} s")
        before = await _statistics(client, warned)
        start = time.perf_counter_ns()
        index = len(rec.done)  # everything so far ended before ``start``: warm-up
        batch = client.options.batch_size
        for _ in range(settings.max_trials):
            await _wait(rec, settings.measurement_interval_ms / 1000)
            end = time.perf_counter_ns()
            after = await _statistics(client, warned)
            window = Window(start, end, batch_size=batch, server_before=before, server_after=after)
            while index < len(rec.done) and rec.done[index][0] <= end:
                _, latency, delayed = rec.done[index]
                window.latencies_ns.append(latency)
                window.delayed += delayed
                index += 1
            windows.append(window)
            start, before = end, after
            if is_stable(windows, settings.stability_windows, threshold, settings.percentile):
                break
        _check(rec)
    finally:
        stop.set()
        await _finish(load, inflight, settings.measurement_interval_ms / 1000 + 30)
    stable = is_stable(windows, settings.stability_windows, threshold, settings.percentile)
    return LevelResult(mode, level, stable, windows, summarize(windows[-settings.stability_windows:]))


async def _finish(load: list[asyncio.Task], inflight: set[asyncio.Task], timeout: float) -> None:
    """Let the load tasks and in-flight requests end; cancel what is still running after ``timeout``."""
    tasks = [*load, *inflight]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: errors were reported through the recorder


def levels(settings: Settings) -> list[tuple[str, float]]:
    if settings.request_rates:
        return [("request_rate", r) for r in settings.request_rates]
    return [("concurrency", c) for c in (settings.concurrency or [1])]


async def profile(options: ClientOptions, settings: Settings, progress: bool = True) -> Report:
    """Measure every load level with one client; the client is closed (shared memory removed) at the end."""
    client = make_client(options)
    results: list[LevelResult] = []
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cancels the run: the client still unregisters and removes its regions
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await client.setup()
        for mode, level in levels(settings):
            if progress:
                name = "Request concurrency" if mode == "concurrency" else "Request rate"
                print(f"{name}: {level:g}", file=sys.stderr, flush=True)
            result = await measure_level(client, settings, mode, level)
            if not result.stable:
                print(f"warning: no stable measurement within {settings.max_trials} windows at {mode.replace('_', ' ')}"
                      f" {level:g}; increase --measurement-interval", file=sys.stderr)
            results.append(result)
    finally:
        await client.close()
    return Report(options, settings, client.describe(), results)


def run(options: ClientOptions, settings: Settings, progress: bool = True) -> Report:
    """``profile`` on a fresh event loop (uvloop when installed); SIGTERM ends it as KeyboardInterrupt."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        runner = asyncio.run
    try:
        return runner(profile(options, settings, progress))
    except asyncio.CancelledError:
        raise KeyboardInterrupt("terminated") from None
