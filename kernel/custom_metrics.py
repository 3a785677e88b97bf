"""Custom metrics of python models (``pb_utils.MetricFamily``), the front's side: the families and series that
/metrics shows after the server's own.

Why here: a series is one value for the whole server, and only the front sees every worker. Workers never wait
for it to count: they buffer their operations and send them ahead of their next message (workers/metrics.py
has the protocol and the reasons), so applying them is a few dict lookups on the event loop, and a scrape
reads what is here. Semantics, as Triton's:

* a family is its name: a second MetricFamily of that name (any model, any instance) joins it and the first
  description stays; another kind is refused ("Family name already exists with different type");
* a series is its family and its labels: Metric objects with the same labels, in any instance, count into one,
  and a histogram keeps the buckets of the Metric that created its series;
* a series goes when the last MetricFamily object holding a Metric of it is gone: deleted by the model, or with
  its worker when the model unloads (or the worker dies and is restarted). A family with neither objects nor
  series goes as well, where Triton's registry keeps its ``# HELP``/``# TYPE`` lines until the server exits.

The text follows prometheus-cpp's serializer, which Triton uses: ``# HELP`` (when there is a description) and
``# TYPE`` (counter, gauge, histogram), labels sorted by name, values printed as C++ streams print doubles at
16 significant digits (``2023``, ``7.55``, ``+Inf``), a histogram as ``_count``, ``_sum`` and cumulative
``_bucket`` lines ending with ``le="+Inf"``. Unlike Triton, a family may not take the name of one of the
server's own metrics (``nv_inference_count``...): their families would be listed twice.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from typing import Any

log = logging.getLogger("kernel")

KINDS = ("counter", "gauge", "histogram")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


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
    __slots__ = ("name", "description", "kind", "owners", "series")

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name = name
        self.description = description
        self.kind = kind  # an index of KINDS
        self.owners = 0  # the MetricFamily objects (in any worker) of this name
        self.series: dict[tuple[tuple[str, str], ...], Series] = {}


class _Handles:
    """What one worker's handles stand for: family handle -> (family, its metric handles), and metric
    handle -> (family, series)."""

    __slots__ = ("families", "metrics")

    def __init__(self) -> None:
        self.families: dict[int, tuple[Family, list[int]]] = {}
        self.metrics: dict[int, tuple[Family, Series]] = {}


class CustomMetrics:
    """Every custom metric family of the server, fed by the workers' ``m`` and ``mq`` messages."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}  # by name, in creation order
        self._workers: dict[Any, _Handles] = {}  # by kernel.instance.Instance

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
        instance.reply({"q": msg["q"], "res": answer, "final": True})

    def forget(self, instance: Any) -> None:
        """The instance's worker is gone (stopped or dead): its families and metrics with it."""
        handles = self._workers.pop(instance, None)
        if handles is not None:
            for handle in list(handles.families):
                self._drop_family(handles, handle)

    def _apply(self, handles: _Handles, op: list) -> None:
        code = op[0]
        if code == 1:
            handles.metrics[op[1]][1].value += op[2]
        elif code == 2:
            handles.metrics[op[1]][1].value = op[2]
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
            return {"v": entry[1].value}
        if msg["op"] != "f":
            return {"err": f"unknown custom metric question {msg['op']!r}"}
        name, description, kind = msg["n"], msg["d"], int(msg["k"])
        if not 0 <= kind < len(KINDS):
            return {"err": "Unsupported kind passed to MetricFamily constructor."}
        if not _NAME.fullmatch(name) or name.startswith("__"):
            return {"err": "Invalid metric name"}
        from kernel.metrics import OWN_FAMILIES  # (prometheus_client: imported once a model has metrics)

        if name in OWN_FAMILIES:
            return {"err": f"Family name already exists: '{name}' is one of the server's own metrics"}
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Family(name, description, kind)
        elif family.kind != kind:
            return {"err": "Family name already exists with different type"}
        family.owners += 1
        handles.families[msg["h"]] = (family, [])
        return {}

    def _drop_family(self, handles: _Handles, handle: int) -> None:
        """A MetricFamily object is gone: its metrics release their series, and the family goes with its last
        object."""
        family, members = handles.families.pop(handle)
        for member in members:
            _, series = handles.metrics.pop(member)
            series.refs -= 1
            if series.refs <= 0 and family.series.get(series.labels) is series:
                del family.series[series.labels]
        family.owners -= 1
        if family.owners <= 0 and not family.series and self.families.get(family.name) is family:
            del self.families[family.name]

    def exposition(self) -> str:
        """The families in Prometheus' text format (empty when there are none)."""
        lines: list[str] = []
        for family in self.families.values():
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
