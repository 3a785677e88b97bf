"""Custom metrics of python models (``pb_utils.MetricFamily``), the front's side: the families and series that
/metrics shows after the server's own.

Why here: a series is one value for the whole server, and only the front sees every worker. Workers never wait
for it to count: they buffer their operations and send them ahead of their next message (workers/metrics.py
has the protocol and the reasons), so applying them is a few dict lookups on the event loop, and a scrape
reads what is here. Semantics, as observed on Triton 2.51 (docs/triton-behaviour.md §12a):

* a family is its name, registered for the server's lifetime as prometheus-cpp's registry keeps it: a second
  MetricFamily of that name (any model, any instance, even after every object of the first is gone) joins it,
  the first description stays, and another kind is refused ("Family name already exists with different type");
* the server's own families are in that registry from the start (:data:`TRITON_FAMILIES`): a custom family of
  one of their names joins it, with Triton's description, and its series are shown in the server's block; a
  series with the labels of one of the server's adds to it (``value()`` reads the sum, a gauge's ``set()`` sets
  the sum);
* a series is its family and its labels: Metric objects with the same labels, in any instance, count into one,
  and a histogram keeps the buckets of the Metric that created its series;
* a family without series shows nothing, not even its ``# HELP``/``# TYPE`` lines (prometheus-cpp skips it);
* a series goes when the last MetricFamily object holding a Metric of it is deleted by its model. Objects a
  worker still holds when it stops (the model unloads) or dies are never deleted, as a Triton stub's: their
  series stay with their values, and a model loaded again counts on from them. Unlike Triton, where the first
  deleted holder removes a series that another MetricFamily object (or the server) still counts into and leaves
  that one writing freed memory, the series stays until its last holder goes.

The text follows prometheus-cpp's serializer, which Triton uses: ``# HELP`` (when there is a description) and
``# TYPE`` (counter, gauge, histogram), labels sorted by name, values printed as C++ streams print doubles at
16 significant digits (``2023``, ``7.55``, ``+Inf``), a histogram as ``_count``, ``_sum`` and cumulative
``_bucket`` lines ending with ``le="+Inf"``.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kernel")

KINDS = ("counter", "gauge", "histogram")
_SUMMARY = 3  # a kind no custom family has: Triton's summary families refuse every MetricFamily
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")

#: The families Triton 2.51's registry holds from its start, whatever its flags (core ``src/metrics.cc``): name ->
#: (kind, description). A custom family takes them as Triton's registry gives them (observed: a COUNTER
#: ``nv_inference_count`` joins it, a GAUGE of that name or anything of a summary's name is refused).
TRITON_FAMILIES: dict[str, tuple[int, str]] = {
    "nv_inference_request_success": (0, "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": (0, "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": (0, "Number of inferences performed (does not include cached requests)"),
    "nv_inference_exec_count": (0, "Number of model executions performed (does not include cached requests)"),
    "nv_inference_request_duration_us": (0, "Cumulative inference request duration in microseconds (includes cached "
                                            "requests)"),
    "nv_inference_queue_duration_us": (0, "Cumulative inference queuing duration in microseconds (includes cached "
                                          "requests)"),
    "nv_inference_compute_input_duration_us": (0, "Cumulative compute input duration in microseconds (does not "
                                                  "include cached requests)"),
    "nv_inference_compute_infer_duration_us": (0, "Cumulative compute inference duration in microseconds (does not "
                                                  "include cached requests)"),
    "nv_inference_compute_output_duration_us": (0, "Cumulative inference compute output duration in microseconds "
                                                   "(does not include cached requests)"),
    "nv_inference_pending_request_count": (1, "Instantaneous number of pending requests awaiting execution "
                                              "per-model."),
    "nv_pinned_memory_pool_total_bytes": (1, "Pinned memory pool total memory size, in bytes"),
    "nv_pinned_memory_pool_used_bytes": (1, "Pinned memory pool used memory size, in bytes"),
    "nv_cache_num_hits_per_model": (0, "Number of cache hits per model"),
    "nv_cache_hit_duration_per_model": (0, "Total cache hit duration per model, in microseconds"),
    "nv_cache_num_misses_per_model": (0, "Number of cache misses per model"),
    "nv_cache_miss_duration_per_model": (0, "Total cache miss (insert+lookup) duration per model, in microseconds"),
    "nv_inference_request_summary_us": (_SUMMARY, "Summary of inference request duration in microseconds "
                                                  "(includes cached requests)"),
    "nv_inference_queue_summary_us": (_SUMMARY, "Summary of inference queuing duration in microseconds (includes "
                                                "cached requests)"),
    "nv_inference_compute_input_summary_us": (_SUMMARY, "Cumulative compute input duration in microseconds (does "
                                                        "not include cached requests)"),
    "nv_inference_compute_infer_summary_us": (_SUMMARY, "Cumulative compute inference duration in microseconds "
                                                        "(does not include cached requests)"),
    "nv_inference_compute_output_summary_us": (_SUMMARY, "Cumulative inference compute output duration in "
                                                         "microseconds (does not include cached requests)"),
    "nv_cache_hit_summary_per_model": (_SUMMARY, "Summary of cache hit counts/durations per model, in "
                                                 "microseconds."),
    "nv_cache_miss_summary_per_model": (_SUMMARY, "Summary of cache miss counts/durations per model, in "
                                                  "microseconds."),
    "nv_gpu_utilization": (1, "GPU utilization rate [0.0 - 1.0)"),
    "nv_gpu_memory_total_bytes": (1, "GPU total memory, in bytes"),
    "nv_gpu_memory_used_bytes": (1, "GPU used memory, in bytes"),
    "nv_gpu_power_usage": (1, "GPU power usage in watts"),
    "nv_gpu_power_limit": (1, "GPU power management limit in watts"),
    "nv_energy_consumption": (0, "GPU energy consumption in joules since the Triton Server started"),
    "nv_cpu_utilization": (1, "CPU utilization rate [0.0 - 1.0]"),
    "nv_cpu_memory_total_bytes": (1, "CPU total memory (RAM), in bytes"),
    "nv_cpu_memory_used_bytes": (1, "CPU used memory (RAM), in bytes"),
}
#: The server-wide families of Triton's local response cache (gauges), registered when the server has a cache.
CACHE_FAMILIES: dict[str, tuple[int, str]] = {
    "nv_cache_num_entries": (1, "Number of responses stored in response cache"),
    "nv_cache_num_lookups": (1, "Number of cache lookups in response cache"),
    "nv_cache_num_hits": (1, "Number of cache hits in response cache"),
    "nv_cache_num_misses": (1, "Number of cache misses in response cache"),
    "nv_cache_num_evictions": (1, "Number of cache evictions in response cache"),
    "nv_cache_lookup_duration": (1, "Total cache lookup duration (hit and miss), in microseconds"),
    "nv_cache_insertion_duration": (1, "Total cache insertion duration, in microseconds"),
    "nv_cache_util": (1, "Cache utilization [0.0 - 1.0]"),
}


class Series:
    """One series: a counter's or a gauge's value, or a histogram's counts (``counts[i]``: observations in
    bucket ``i``, not cumulative; the last is above every bound)."""

    __slots__ = ("labels", "refs", "value", "buckets", "counts", "sum", "count")

    def __init__(self, labels: tuple[tuple[str, str], ...], buckets: list[float] | None) -> None:
        self.labels = labels
        self.refs = 0  # the metric handles (in any worker) that count into it
        self.value = 0.0
        self.buckets = tuple(buckets) if buckets is not None else None
        self.counts = [0] * (len(buckets) + 1) if buckets is not None else []
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # prometheus-cpp's bucket: the first bound >= value (NaN: none of them)
        index = len(self.buckets) if math.isnan(value) else bisect.bisect_left(self.buckets, value)
        self.counts[index] += 1
        self.sum += value
        self.count += 1


class Family:
    """A registered family: it stays for the server's lifetime, as in prometheus-cpp's registry."""

    __slots__ = ("name", "description", "kind", "own", "series")

    def __init__(self, name: str, description: str, kind: int, own: bool = False) -> None:
        self.name = name
        self.description = description
        self.kind = kind  # an index of KINDS (_SUMMARY: one of the server's summaries)
        self.own = own  # one of the server's families: its series add to the server's samples of their labels
        self.series: dict[tuple[tuple[str, str], ...], Series] = {}


class _Handles:
    """What one worker's handles stand for: family handle -> (family, its metric handles), and metric
    handle -> (family, series)."""

    __slots__ = ("families", "metrics")

    def __init__(self) -> None:
        self.families: dict[int, tuple[Family, list[int]]] = {}
        self.metrics: dict[int, tuple[Family, Series]] = {}


class CustomMetrics:
    """Every custom metric family of the server, fed by the workers' ``m`` and ``mq`` messages. ``cache``: the
    server has a response cache (its families are registered, as Triton's local cache registers them)."""

    def __init__(self, cache: bool = False) -> None:
        #: by name, in registration order: the server's own first (shown by kernel.metrics unless joined)
        self.families: dict[str, Family] = {}
        own = dict(TRITON_FAMILIES, **CACHE_FAMILIES) if cache else TRITON_FAMILIES
        for name, (kind, description) in own.items():
            self.families[name] = Family(name, description, kind, own=True)
        self._workers: dict[Any, _Handles] = {}  # by kernel.instance.Instance
        #: the server's own value of a sample, (family name, labels) -> value or None (kernel.metrics.sample_value
        #: on the scrape registry; None: the server has no metrics endpoint)
        self.own_value: Callable[[str, dict[str, str]], float | None] | None = None

    def handle(self, instance: Any, msg: dict) -> None:
        """An ``m`` (operations) or ``mq`` (a question, answered on the instance's replies ring) message."""
        handles = self._workers.get(instance)
        if handles is None:
            handles = self._workers[instance] = _Handles()
        if msg["t"] == "m":
            for op in msg["o"]:
                try:
                    self._apply(handles, op)
                except (KeyError, IndexError, TypeError, ValueError) as e:  # a worker's bug: never the front's end
                    log.warning("instance %s: bad custom metric operation %r: %r", instance.name, op, e)
            return
        try:
            answer = self._answer(handles, msg)
        except (KeyError, TypeError, ValueError) as e:
            answer = {"err": f"bad custom metric question: {e!r}"}
        if "err" in answer and msg.get("op") == "f":  # as Triton's python backend words the registry's refusals
            answer = {"err": f"Failed to process the request for model '{instance.name}', message: {answer['err']}"}
        instance.reply({"q": msg["q"], "res": answer, "final": True})

    def forget(self, instance: Any) -> None:
        """The instance's worker is gone (stopped or dead). The MetricFamily objects it still held were never
        deleted, as a Triton stub's are not: their series stay, with their values, for a model loaded again to
        count on from (observed on Triton 2.51)."""
        self._workers.pop(instance, None)

    def _apply(self, handles: _Handles, op: list) -> None:
        code = op[0]
        if code == 1:
            handles.metrics[op[1]][1].value += op[2]
        elif code == 2:
            family, series = handles.metrics[op[1]]
            # a series of the server's own family holds what it adds to the server's sample of its labels
            series.value = op[2] - self._server_value(family, series) if family.own else op[2]
        elif code == 3:
            handles.metrics[op[1]][1].observe(op[2])
        elif code == 0:
            _, handle, family_handle, labels, buckets = op
            family, members = handles.families[family_handle]
            key = tuple(sorted((str(k), str(v)) for k, v in labels))
            series = family.series.get(key)
            if series is None:
                series = family.series[key] = Series(key, buckets if family.kind == 2 else None)
            series.refs += 1
            handles.metrics[handle] = (family, series)
            members.append(handle)
        elif code == 4:
            self._drop_family(handles, op[1])
        else:
            raise ValueError(f"unknown operation {code}")

    def _answer(self, handles: _Handles, msg: dict) -> dict:
        if msg["op"] == "v":
            entry = handles.metrics.get(msg["h"])
            if entry is None:
                return {"err": "Could not get metric value. Metric has been invalidated."}
            family, series = entry
            return {"v": series.value + self._server_value(family, series) if family.own else series.value}
        if msg["op"] != "f":
            return {"err": f"unknown custom metric question {msg['op']!r}"}
        name, description, kind = msg["n"], msg["d"], int(msg["k"])
        if not 0 <= kind < len(KINDS):
            return {"err": "Unsupported kind passed to MetricFamily constructor."}
        if not _NAME.fullmatch(name) or name.startswith("__"):  # (the latter aborts Triton 2.51)
            return {"err": "Invalid metric name"}
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Family(name, description, kind)
        elif family.kind != kind:
            return {"err": "Family name already exists with different type"}
        handles.families[msg["h"]] = (family, [])
        return {}

    def _server_value(self, family: Family, series: Series) -> float:
        """The server's own value of the sample that ``series`` of its family ``family`` adds to (0: none)."""
        value = self.own_value(family.name, dict(series.labels)) if self.own_value is not None else None
        return value or 0.0

    def _drop_family(self, handles: _Handles, handle: int) -> None:
        """A MetricFamily object is gone: its metrics release their series (the family stays registered)."""
        family, members = handles.families.pop(handle)
        for member in members:
            _, series = handles.metrics.pop(member)
            series.refs -= 1
            if series.refs <= 0 and family.series.get(series.labels) is series:
                del family.series[series.labels]

    def joined(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The series of the server's own families that custom metrics hold: family name -> (labels, value)."""
        return {f.name: [(dict(s.labels), s.value) for s in f.series.values()]
                for f in self.families.values() if f.own and f.series}

    def exposition(self, skip: frozenset[str] | set[str] = frozenset()) -> str:
        """The families that have series, in Prometheus' text format (empty when none has), but those in ``skip``
        (the server's own that kernel.metrics showed with the series of :meth:`joined` in them)."""
        lines: list[str] = []
        for family in self.families.values():
            if not family.series or family.name in skip:
                continue  # prometheus-cpp serializes no family without series
            name = family.name
            if family.description:
                lines.append(f"# HELP {name} {_help(family.description)}")
            lines.append(f"# TYPE {name} {KINDS[family.kind]}")
            for series in sorted(family.series.values(), key=lambda s: s.labels):
                labels = ",".join(f'{k}="{_label(v)}"' for k, v in series.labels)
                if family.kind != 2:
                    lines.append(f"{name}{{{labels}}} {_number(series.value)}" if labels
                                 else f"{name} {_number(series.value)}")
                    continue
                braces = f"{{{labels}}}" if labels else ""
                lines.append(f"{name}_count{braces} {series.count}")
                lines.append(f"{name}_sum{braces} {_number(series.sum)}")
                prefix = labels + "," if labels else ""
                total = 0
                for bound, count in zip(series.buckets, series.counts):
                    total += count
                    lines.append(f'{name}_bucket{{{prefix}le="{_number(bound)}"}} {total}')
                lines.append(f'{name}_bucket{{{prefix}le="+Inf"}} {series.count}')
        return "\n".join(lines) + "\n" if lines else ""


def _number(value: float) -> str:
    """A double as prometheus-cpp writes it (an ostream at 16 significant digits)."""
    if math.isnan(value):
        return "Nan"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.16g}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


__all__ = ["CustomMetrics", "KINDS"]
