"""Prometheus metrics with Triton's names (``nv_inference_*``), from the statistics counters.

Samples carry Triton's exact names and labels (``model``, ``version``, ``reason``).
prometheus_client appends ``_total`` to the family of a counter-typed metric while
Triton does not, so the families are exposed as gauges: dashboards and queries
written for Triton (``rate(nv_inference_count[1m])``...) read them unchanged.
Python models' own families (``pb_utils.MetricFamily``, kernel.custom_metrics) follow,
with their kinds as Triton gives them; their series of a family of the server's name are shown in
the server's family, as in Triton's one registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from kernel.custom_metrics import CACHE_FAMILIES, TRITON_FAMILIES

if TYPE_CHECKING:
    from kernel.cache import ResponseCache
    from kernel.custom_metrics import CustomMetrics
    from kernel.server import Core

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: the duration families: name, ModelStats.durations key
_DURATIONS = [
    ("nv_inference_request_duration_us", "success"),
    ("nv_inference_queue_duration_us", "queue"),
    ("nv_inference_compute_input_duration_us", "compute_input"),
    ("nv_inference_compute_infer_duration_us", "compute_infer"),
    ("nv_inference_compute_output_duration_us", "compute_output"),
]
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
#: per-model response cache families, exposed (as Triton does) for versions whose config enables the cache:
#: name, ModelStats.durations key, index in its entry (0 the count, 1 the time)
_CACHE = [
    ("nv_cache_num_hits_per_model", "cache_hit", 0),
    ("nv_cache_hit_duration_per_model", "cache_hit", 1),
    ("nv_cache_num_misses_per_model", "cache_miss", 0),
    ("nv_cache_miss_duration_per_model", "cache_miss", 1),
]

#: the server-wide response cache families (when the server has a cache): name, ResponseCache attribute
_SERVER_CACHE = [
    ("nv_cache_num_entries", None),
    ("nv_cache_num_lookups", "lookups"),
    ("nv_cache_num_hits", "hits"),
    ("nv_cache_num_misses", "misses"),
    ("nv_cache_num_evictions", "evictions"),
    ("nv_cache_lookup_duration", "lookup_ns"),
    ("nv_cache_insertion_duration", "insertion_ns"),
]
#: Triton's descriptions, from the registry table a python model's MetricFamily of the same name joins
_HELP = {name: doc for name, (_, doc) in {**TRITON_FAMILIES, **CACHE_FAMILIES}.items()}


def _family(name: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    """The family ``name`` with Triton's description."""
    return GaugeMetricFamily(name, _HELP[name], labels=labels)


#: every family TritonCollector may show: the only ones whose samples a custom series can add to (sample_value)
SERVER_FAMILIES = frozenset(
    ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
     "nv_inference_pending_request_count", "nv_cache_util", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"]
    + [name for name, _ in _DURATIONS] + [name for name, _, _ in _CACHE]
    + [name for name, _ in _SERVER_CACHE])


class TritonCollector:
    """Reads every loaded model version's statistics at scrape time.

    ``cpu``: the CPU families (``--allow-cpu-metrics``); ``counter_latencies``: the ``*_duration_us``
    families (``--metrics-config counter_latencies=false`` leaves them out, as in Triton).
    """

    def __init__(self, core: Core, cpu: bool = True, counter_latencies: bool = True) -> None:
        self.core = core
        self.cpu = cpu
        self.counter_latencies = counter_latencies

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        success = _family("nv_inference_request_success", labels)
        failure = _family("nv_inference_request_failure", ["model", "reason", "version"])
        count = _family("nv_inference_count", labels)
        execs = _family("nv_inference_exec_count", labels)
        pending = _family("nv_inference_pending_request_count", labels)
        durations = [(_family(name, labels), key) for name, key in _DURATIONS]
        caches = [(_family(name, labels), key, i) for name, key, i in _CACHE]
        for model in sorted(self.core.models.values(), key=lambda m: m.name):
            for _, mv in sorted(model.versions.items()):
                if not mv.ready:
                    continue
                stats = mv.stats
                key = [mv.name, mv.version_str]
                success.add_metric(key, stats.durations["success"][0])
                for reason in FAILURE_REASONS:
                    failure.add_metric([mv.name, reason, mv.version_str], stats.failures.get(reason, 0))
                count.add_metric(key, stats.inference_count)
                execs.add_metric(key, stats.execution_count)
                queued = mv.scheduler.queued() if mv.scheduler is not None else 0
                pending.add_metric(key, queued + sum(i.waiting() for i in mv.instances))
                for family, name in durations:
                    family.add_metric(key, stats.durations[name][1] // 1000)
                if mv.config.response_cache.enable:
                    for family, name, i in caches:
                        value = stats.durations[name][i]
                        family.add_metric(key, value // 1000 if i else value)
        yield from (success, failure, count, execs, pending)
        if self.counter_latencies:
            yield from (family for family, _ in durations)
        yield from (family for family, _, _ in caches if family.samples)
        yield from _server_cache_metrics(self.core.response_cache)
        if self.cpu:
            yield from _cpu_metrics()


def _server_cache_metrics(cache: ResponseCache | None) -> Iterator[Metric]:
    """The server-wide response cache families, as Triton exposes them when it has a cache (2.51 leaves all
    but ``nv_cache_util`` at 0; these count)."""
    if cache is None:
        return
    for name, attribute in _SERVER_CACHE:
        family = _family(name)
        value = len(cache.entries) if attribute is None else getattr(cache, attribute)
        family.add_metric([], value // 1000 if attribute and attribute.endswith("_ns") else value)
        yield family
    util = _family("nv_cache_util")
    util.add_metric([], cache.used / cache.size)
    yield util


def _cpu_metrics() -> Iterator[Metric]:
    """Server-wide CPU memory (Triton's nv_cpu_memory_* on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(" ") >= 1}
    except OSError:
        return
    total = _family("nv_cpu_memory_total_bytes")
    used = _family("nv_cpu_memory_used_bytes")
    total.add_metric([], info.get("MemTotal", 0))
    used.add_metric([], info.get("MemTotal", 0) - info.get("MemAvailable", 0))
    yield total
    yield used


def registry(core: Core, cpu: bool = True, counter_latencies: bool = True) -> CollectorRegistry:
    """The server's families (:class:`TritonCollector`); there are no GPU families to leave out."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(TritonCollector(core, cpu, counter_latencies))
    return reg


class _Collected:
    """Families already collected, for generate_latest."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(reg: CollectorRegistry, custom: CustomMetrics | None = None) -> bytes:
    """The server's metrics, then the python models' own (``custom``) if given. Custom series of a family of the
    server's name go into the server's family (one ``# TYPE`` per name), added to the server's sample of the same
    labels: Triton's models share its registry, and a Metric with a server series' labels counts into it."""
    if custom is None:
        return generate_latest(reg)
    joined = custom.joined()
    if not joined:
        return generate_latest(reg) + custom.exposition().encode()
    families = list(reg.collect())
    shown: set[str] = set()
    for family in families:
        extra = joined.get(family.name)
        if extra is None:
            continue
        shown.add(family.name)
        index = {tuple(sorted(s.labels.items())): i for i, s in enumerate(family.samples)}
        for labels, value in extra:
            i = index.get(tuple(sorted(labels.items())))
            if i is None:
                family.samples.append(Sample(family.name, labels, value))
            else:
                family.samples[i] = family.samples[i]._replace(value=family.samples[i].value + value)
    return generate_latest(_Collected(families)) + custom.exposition(shown).encode()


def sample_value(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    """The server's own value of one sample (None: it has none), for custom series that add to it. Collects every
    family, but only for the families the server shows: a custom metric of one of their names is a rarity."""
    if name not in SERVER_FAMILIES:
        return None
    for family in reg.collect():
        if family.name == name:
            return next((s.value for s in family.samples if s.labels == labels), None)
    return None


__all__ = ["CONTENT_TYPE", "registry", "render", "sample_value"]
