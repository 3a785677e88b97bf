"""Triton's trace extension: sampled requests' timelines (and, at level TENSORS, their tensors).

Settings follow Triton's trace manager (docs/triton-behaviour.md §15): one global setting from
``--trace-config``, per-model settings that override some of its fields and follow the global
one for the rest, and every update replaces the setting object (so its sample counter starts
again, and the traces it collected are written out first). A request is sampled where it enters:
the HTTP and gRPC fronts and the in-process API call :meth:`Tracer.sample`; an ensemble's steps
get child traces of their request's trace (``parent_id``).

The file is Triton's: a JSON array of one-key records, a header ``{"id", "model_name",
"model_version", "request_id"?, "parent_id"?}`` and one ``{"id", "timestamps": [{"name", "ns"}]}``
per event, nanoseconds of CLOCK_MONOTONIC (Triton's steady clock; the workers stamp on the same
clock, so COMPUTE_* come from the worker's own timings). With ``log_frequency`` 0 the traces go to
the file when their setting is replaced and at shutdown; with N they go to ``<file>.0``,
``<file>.1``, ... every N traces; when ``trace_count`` runs out, the rest go to a numbered file.
Unlike Triton's file, ours is valid JSON after every write (a later write replaces the closing
bracket), so a trace file can be read while the server runs.

In mode ``opentelemetry`` (``--trace-config mode=opentelemetry``) a trace collects the same stamps
and, once it is complete, becomes OpenTelemetry spans (kernel.otel, which alone imports the SDK, and
only in that mode): Triton's ``InferRequest`` span with the front's events, a span per request named
after its model, a ``compute`` span under it. A W3C ``traceparent`` the client sent (the fronts pass
their headers through to :meth:`Tracer.sample`) makes the request traced whatever the rate, and its
spans join the client's trace.

The cost when tracing is off is one attribute read per request (``Tracer.on``) in each front and
one ``request.trace`` check where the core stamps; traces are formatted as they happen and written
in batches, so a sampled request costs a few microseconds of string formatting and no syscall.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kernel import otel_settings
from kernel.errors import ServerError, invalid
from shm import dtypes

log = logging.getLogger("kernel.tracing")

TIMESTAMPS = 1
TENSORS = 2
TRITON = "triton"
OPENTELEMETRY = "opentelemetry"
_LEVEL_NAMES = {"TIMESTAMPS": TIMESTAMPS, "TENSORS": TENSORS}
_U32 = 1 << 32
_INT32_MAX = (1 << 31) - 1
MIN_TRACE_COUNT = -1
_FIELDS = ("level", "rate", "count", "log_frequency")
_LEADING_INT = re.compile(r"\s*[+-]?\d+")
_clock = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux, as the workers' timings and Pending.enqueued


class TraceFile:
    """One trace file path: traces appended to the file itself, or written to its numbered files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.index = 0  # of the next numbered file
        self.written = False  # the file itself holds a JSON array already

    def save(self, chunks: list[str], numbered: bool) -> None:
        if not chunks or not self.path:
            return
        body = ",".join(chunks)
        try:
            if numbered:
                name = f"{self.path}.{self.index}"
                self.index += 1
                with open(name, "w", encoding="utf-8") as f:
                    f.write(f"[{body}]")
            elif not self.written:
                with open(self.path, "w", encoding="utf-8") as f:
                    f.write(f"[{body}]")
                self.written = True
            else:  # replace the closing bracket: the file stays one valid JSON array
                with open(self.path, "r+b") as f:
                    f.seek(-1, os.SEEK_END)
                    f.write(f",{body}]".encode())
        except OSError as e:
            log.error("failed writing trace file %s: %s", self.path, e)


class Setting:
    """One trace setting (global or a model's): its values, which of them it specifies itself, and the
    traces it has sampled and collected."""

    __slots__ = ("level", "rate", "count", "log_frequency", "file", "mode", "specified", "sample", "created",
                 "collected", "chunks", "in_stream", "retired")

    def __init__(self, level: int, rate: int, count: int, log_frequency: int, file: TraceFile,
                 specified: frozenset[str] = frozenset(), mode: str = TRITON) -> None:
        self.mode = mode
        self.level = level
        self.rate = rate
        self.count = count
        self.log_frequency = log_frequency
        self.file = file
        self.specified = specified
        self.sample = 0  # requests seen while tracing was on
        self.created = 0  # traces sampled
        self.collected = 0  # traces finished
        self.chunks: list[str] = []  # finished traces not yet written
        self.in_stream = 0
        self.retired = False  # replaced: what it still collects is written at once

    def reason(self) -> str:
        """Why this setting traces nothing ('' when it traces)."""
        if not self.level:
            return "tracing is disabled"
        if self.rate == 0:
            return "sample rate must be non-zero"
        if self.mode == TRITON and not self.file.path:
            return "trace file name is not given"
        return ""

    def take(self, forced: bool = False) -> bool:
        """Count one request; whether it is traced (every ``rate``-th, while ``count`` lasts). ``forced``
        (mode opentelemetry: the client sent a trace context) traces it anyway, as Triton's
        ``SampleTrace(force_sample)``: it still counts towards the rate, and takes from the count only
        when the rate picked it; with rate 0 (allowed at start in this mode) only forced requests are traced."""
        if self.rate == 0:
            return forced
        if (self.count == 0 or self.reason()) and not forced:
            return False
        self.sample += 1
        if self.sample % self.rate:
            return forced
        if self.count > 0:
            self.count -= 1
        elif self.count == 0:  # (forced: the count ran out)
            return True
        self.created += 1
        return True

    def collect(self, records: str) -> None:
        """A finished trace's records: written every ``log_frequency`` traces, or once ``count`` ran out."""
        if records:  # (at level TENSORS alone, a request refused before it was queued has none)
            self.chunks.append(records)
        self.collected += 1
        self.in_stream += 1
        if (self.count == 0 and self.collected == self.created) or \
                (self.log_frequency and self.in_stream >= self.log_frequency):
            self.write(numbered=True)
        elif self.retired:
            self.write(numbered=bool(self.log_frequency))

    def write(self, numbered: bool) -> None:
        chunks, self.chunks = self.chunks, []
        self.in_stream = 0
        self.file.save(chunks, numbered)

    def retire(self) -> None:
        """Replaced (or the server stops): the traces it holds go out; later ones it collects go at once."""
        self.retired = True
        self.write(numbered=bool(self.log_frequency))

    def values(self) -> dict[str, Any]:
        """Triton's JSON of the setting (mode opentelemetry: no file, no log frequency)."""
        levels = [name for name, bit in _LEVEL_NAMES.items() if self.level & bit] or ["OFF"]
        if self.mode == OPENTELEMETRY:
            return {"trace_level": levels, "trace_rate": str(self.rate), "trace_count": str(self.count),
                    "trace_mode": self.mode}
        return {"trace_level": levels, "trace_rate": str(self.rate), "trace_count": str(self.count),
                "log_frequency": str(self.log_frequency), "trace_file": self.file.path, "trace_mode": "triton"}


def _guarded(method: Callable) -> Callable:
    """A trace method that never raises: tracing must never fail, or hang, the request it follows."""
    @functools.wraps(method)
    def guarded(self: Trace, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:  # noqa: BLE001
            log.exception("tracing failed (trace %d)", self.id)
    return guarded


def finish_if_cancelled(trace: Trace) -> Callable[[Any], None]:
    """A done callback for a traced request's future: a request its caller gave up (a client gone, a
    deadline) is answered by nobody, so its trace ends here, with what it has."""
    return lambda future: trace.finish() if future.cancelled() else None


class Trace:
    """One sampled request's records (a root trace also holds its children's)."""

    traceparent: str | None = None  # (mode triton: no OpenTelemetry context to give a model)

    __slots__ = ("setting", "id", "parent", "level", "records", "children", "front", "responded", "ended", "done",
                 "live")

    def __init__(self, tracer: Tracer, setting: Setting, parent: Trace | None = None, front: bool = True) -> None:
        tracer.last_id += 1
        self.id = tracer.last_id
        self.live = tracer.live
        tracer.live[self.id] = self  # until it ends: a BLS request its model makes may name it
        self.setting = setting
        self.parent = parent
        self.level = setting.level
        self.records: list[str] = []
        self.children: list[Trace] = []
        self.front = front  # a protocol front finishes it after sending; else it ends with the request
        self.responded = False  # INFER_RESPONSE_COMPLETE stamped
        self.ended = False
        self.done = False

    def child(self, tracer: Tracer) -> Trace:
        """The trace of a request this one's request makes (an ensemble step)."""
        trace = type(self)(tracer, self.setting, self, front=False)
        self.children.append(trace)
        return trace

    def stamp(self, name: str, ns: int | None = None) -> None:
        if self.level & TIMESTAMPS:
            at = _clock() if ns is None else ns
            self.records.append(f'{{"id":{self.id},"timestamps":[{{"name":"{name}","ns":{at}}}]}}')

    def begin(self, model: str, version: int, request_id: str, inputs: list, read: Any, ns: int) -> None:
        """The request is queued: its header record, REQUEST_START (at ``ns``), QUEUE_START, and its inputs."""
        head = {"id": self.id, "model_name": model, "model_version": version}
        if request_id:
            head["request_id"] = request_id
        if self.parent is not None:
            head["parent_id"] = self.parent.id
        self.records.append(json.dumps(head, separators=(",", ":")))
        self.stamp("REQUEST_START", ns)
        self.stamp("QUEUE_START")
        if self.level & TENSORS:
            for t in inputs:
                self.tensor("TENSOR_QUEUE_INPUT", t.name, t.datatype, t.shape, read(t))

    @_guarded
    def computed(self, end_ns: int, ci: int, cinf: int, co: int, outputs: list | None = None,
                 decoupled: bool = False) -> None:
        """The worker's answer, in Triton's order: the outputs, INFER_RESPONSE_COMPLETE (a request a client
        made: not an ensemble's step; a decoupled model's responses are not complete yet), then COMPUTE_*
        on the worker's clock."""
        if self.level & TENSORS and outputs:
            self._outputs(outputs)
        if self.parent is None and not decoupled:
            self.stamp("INFER_RESPONSE_COMPLETE")
            self.responded = True
        start = end_ns - co - cinf - ci
        for name, ns in (("COMPUTE_START", start), ("COMPUTE_INPUT_END", start + ci),
                         ("COMPUTE_OUTPUT_START", start + ci + cinf), ("COMPUTE_END", end_ns)):
            self.stamp(name, ns)

    def _outputs(self, outputs: list) -> None:
        for o in outputs:
            try:
                array = o.as_numpy()
            except Exception:  # noqa: BLE001 - a trace never fails its request: the values are left out
                array = None
            self.tensor("TENSOR_BACKEND_OUTPUT", o.name, o.datatype, o.shape, array)

    def tensor(self, activity: str, name: str, datatype: str, shape: list[int], array: np.ndarray | None) -> None:
        """A tensor record as Triton writes it: values joined by commas (FP16/BF16: none)."""
        if array is None or datatype in ("FP16", "BF16"):
            data = ""
        elif datatype == "BYTES":
            data = ",".join(f'"{v.decode("utf-8", "replace") if isinstance(v, bytes) else v}"' for v in array.flat)
        elif datatype == "BOOL":
            data = ",".join("1" if v else "0" for v in array.flat)
        elif datatype in ("FP32", "FP64"):
            data = ",".join(f"{v:g}" for v in array.flat)
        else:
            data = ",".join(map(str, array.flat))
        record = {"id": self.id, "activity": activity,
                  "tensor": {"name": name, "data": data, "shape": ",".join(map(str, shape)), "dtype": datatype}}
        self.records.append(json.dumps(record, separators=(",", ":")))

    @_guarded
    def end(self, outputs: list | None = None) -> None:
        """REQUEST_END: the core is done with the request (``outputs``: its response's); a trace no front
        waits on is finished."""
        if self.ended:
            return
        self.ended = True
        self.live.pop(self.id, None)
        if self.parent is None and not self.responded:  # an ensemble's, or one that failed before running
            if self.level & TENSORS and outputs:
                self._outputs(outputs)
            self.stamp("INFER_RESPONSE_COMPLETE")
        self.stamp("REQUEST_END")
        if not self.front:
            self.finish()

    @_guarded
    def discard(self) -> None:
        """A step's request that never ran (a chained ensemble step that was skipped: it runs the usual way
        under a trace of its own, or not at all) leaves no child trace, as in Triton, where a step is
        submitted once. (A root trace is never discarded: it ends with what it has.)"""
        if self.parent is None:
            self.end()
            self.finish()
            return
        self.done = self.ended = True
        self.live.pop(self.id, None)
        if self in self.parent.children:
            self.parent.children.remove(self)

    @_guarded
    def finish(self) -> None:
        """The trace is complete: its records (and its children's) go to its setting."""
        if self.done:
            return
        self.done = True
        self.live.pop(self.id, None)
        if self.parent is None:
            self.setting.collect(",".join(self._all()))

    def _all(self) -> list[str]:
        """Its children's records (the last step's first, as Triton writes them), then its own."""
        records = []
        for child in reversed(self.children):
            records.extend(child._all())
        records.extend(self.records)
        return records


class SpanTrace(Trace):
    """A trace in mode opentelemetry: the same stamps, kept as (name, ns); the root's end makes them spans
    (kernel.otel.Exporter.emit). Tensors are not traced in this mode, as in Triton."""

    __slots__ = ("stamps", "head", "context", "exporter", "trace_id", "span_id")

    def __init__(self, tracer: Tracer, setting: Setting, parent: Trace | None = None, front: bool = True) -> None:
        super().__init__(tracer, setting, parent, front)
        self.level &= TIMESTAMPS
        self.stamps: list[tuple[str, int]] = []
        self.head: tuple[str, int, str] | None = None  # model, version, request id: set once queued
        self.context: Any = None  # the client's trace context (a root's), or None
        self.exporter = tracer.exporter
        # The ids of its request's span, chosen now: the spans are made at the end, but the model may ask for
        # its context while it runs (a python model's request.trace().get_context(), to pass on).
        self.trace_id: int = parent.trace_id if isinstance(parent, SpanTrace) else random.getrandbits(128) or 1
        self.span_id: int = random.getrandbits(64) or 1

    @property
    def traceparent(self) -> str:
        """The W3C context of its request's span, as a python model's ``get_context()`` gives it."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"

    def stamp(self, name: str, ns: int | None = None) -> None:
        if self.level:
            self.stamps.append((name, _clock() if ns is None else ns))

    def begin(self, model: str, version: int, request_id: str, inputs: list, read: Any, ns: int) -> None:
        self.head = (model, version, request_id)
        self.stamp("REQUEST_START", ns)
        self.stamp("QUEUE_START")

    def _outputs(self, outputs: list) -> None:
        pass

    @_guarded
    def finish(self) -> None:
        """The trace is complete: a root's spans (its children's too) go to the exporter."""
        if self.done:
            return
        self.done = True
        self.live.pop(self.id, None)
        if self.parent is None and self.exporter is not None:
            self.exporter.emit(self, _clock())


class Tracer:
    """The global and per-model trace settings, and sampling.

    A model's setting is kept by name through its unload, as Triton 2.51 keeps it: the fronts refuse the
    model's setting URL while it is not ready, and a reload finds its setting again (docs/triton-behaviour.md
    §15), so nothing here follows model unloads.
    """

    def __init__(self, config: dict[str, Any] | None = None, export: bool = True) -> None:
        """``config``: ``--trace-config``'s settings (kernel.cli.trace_config); in mode opentelemetry, its
        ``opentelemetry`` item holds the ``(key, value)`` pairs of ``--trace-config opentelemetry,...``.
        ``export`` False only checks them (no exporter is made)."""
        config = config or {}
        self.mode = mode = config.get("mode", TRITON)
        if mode not in (TRITON, OPENTELEMETRY):
            raise ServerError(f'invalid value for trace mode option: {mode}. Available options are "triton" and '
                              '"opentelemetry"', "INVALID_ARG")
        #: mode opentelemetry: the exporter's settings as Triton reads them back (kernel.otel_settings)
        self.otel_settings: list[tuple[str, str]] = []
        self.exporter: Any = None  # kernel.otel.Exporter in mode opentelemetry
        if mode == OPENTELEMETRY:
            self.otel_settings = otel_settings.settings(config.get(OPENTELEMETRY) or ())
        level = 0
        for name in config.get("level", ["OFF"]):
            name = name.upper()
            if name == "OFF":
                level = 0
            elif name in _LEVEL_NAMES:
                level |= _LEVEL_NAMES[name]
            else:
                raise ServerError(f"invalid trace level '{name}': expected OFF, TIMESTAMPS or TENSORS", "INVALID_ARG")
        self.default = self.global_ = Setting(
            level, _u32("rate", str(config.get("rate", "1000"))),
            _count_of("trace_count", str(config.get("count", "-1"))),
            _u32("log_frequency", str(config.get("log_frequency", "0"))),
            TraceFile(str(config.get("file", "")) if mode == TRITON else ""), mode=mode)
        # e.g. a level and no file: it would never trace. (Mode opentelemetry: Triton's rate 0 at start traces
        # only the requests that bring a trace context.)
        if level and self.global_.reason() and mode == TRITON:
            raise invalid(f"Attempting to set invalid trace setting :{self.global_.reason()}")
        self.models: dict[str, Setting] = {}
        self.last_id = 0
        self.live: dict[int, Trace] = {}  # traces of requests in flight, by id (a BLS call's parent)
        self.on = bool(self.global_.level)
        self._no_tensors()
        if mode == OPENTELEMETRY:
            # Once every setting is checked: without the otel extra, a bad setting is reported as such. The
            # packages are checked at start, also by a check alone (export False).
            otel = load_otel()
            if export:  # last: nothing after it can fail and leave its thread running
                self.exporter = otel.Exporter(self.otel_settings)

    def sample(self, model: str, front: bool = True, header: Callable[[str], str | None] | None = None
               ) -> Trace | None:
        """The trace of a request to ``model`` entering now, if it is sampled (check ``on`` first).
        ``header``: the request's header (HTTP) or metadata (gRPC) by lower-case name, where a client's
        W3C trace context (``traceparent``, ``tracestate``) is read in mode opentelemetry."""
        setting = self.models.get(model, self.global_)
        if not setting.level:
            return None
        if self.exporter is None:
            return Trace(self, setting, front=front) if setting.take() else None
        context = None
        if header is not None and (parent := header("traceparent")):
            context = self.exporter.context(parent, header("tracestate"))
        if not setting.take(context is not None):
            return None
        trace = SpanTrace(self, setting, front=front)
        if context is not None:
            trace.context = context
            trace.trace_id = self.exporter.trace_id(context)  # (its spans join the client's trace)
        return trace

    def settings(self, model: str = "") -> dict[str, Any]:
        """Triton's trace setting JSON; mode opentelemetry adds the exporter's settings (a ``resource``
        given more than once: a list, as gRPC gives it; Triton's HTTP JSON repeats the key)."""
        values = self.models.get(model, self.global_).values()
        for key, value in self.otel_settings:
            if key in values:
                old = values[key]
                values[key] = [*old, value] if isinstance(old, list) else [old, value]
            else:
                values[key] = value
        return values

    def update(self, model: str, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (field -> value, or None to clear it back to the fallback) as Triton does: a
        global change reaches the models' settings that follow the global one for some field. All or
        nothing: every setting is derived (and checked) before any replaces its predecessor."""
        new = {model: self._derive(model, changes)}
        if not model:
            for name, setting in self.models.items():
                if setting.specified != frozenset(_FIELDS):
                    new[name] = self._derive(name, {}, new[""])
        for name, setting in new.items():
            current = self.models.get(name) if name else self.global_
            if current is not None:
                current.retire()
            if not name:
                self.global_ = setting
            elif setting is None:
                self.models.pop(name, None)
            else:
                self.models[name] = setting
        self.on = bool(self.global_.level) or any(s.level for s in self.models.values())
        self._no_tensors()

    def _no_tensors(self) -> None:
        if self.mode == OPENTELEMETRY and any(s.level & TENSORS for s in (self.global_, *self.models.values())):
            log.error("Tensor level tracing is not supported by the mode: opentelemetry")  # (Triton's words)

    def _derive(self, model: str, changes: dict[str, Any], global_: Setting | None = None) -> Setting | None:
        """The setting ``changes`` make of ``model``'s (the global one's for ""); None: the model's setting
        goes, leaving the global one. ``global_``: the global setting to follow, if it is changing too."""
        current = self.models.get(model) if model else self.global_
        fallback = (global_ or self.global_) if model else self.default
        specified = set(current.specified) if current is not None else set()
        for key, value in changes.items():
            if value is None:
                specified.discard(key)
            else:
                specified.add(key)
        if model and not specified:
            return None
        values = {}
        for key in _FIELDS:
            if key in changes and changes[key] is not None:
                values[key] = changes[key]
            elif key in specified and current is not None:
                values[key] = getattr(current, key)
            else:
                values[key] = getattr(fallback, key)
        setting = Setting(values["level"], values["rate"], values["count"], values["log_frequency"],
                          fallback.file, frozenset(specified), self.mode)
        problem = setting.reason()
        if problem and setting.level:
            raise invalid(f"Attempting to set invalid trace setting :{problem}")
        return setting

    def close(self) -> None:
        """The server stops: every setting's collected traces go to their files; the spans still queued
        are exported (mode opentelemetry; for at most kernel.otel.STOP_TIMEOUT_MS)."""
        for setting in (self.global_, *self.models.values()):
            setting.retire()
        if self.exporter is not None:
            self.exporter.shutdown()


def load_otel() -> Any:
    """kernel.otel, which imports the OpenTelemetry SDK: only mode opentelemetry needs it (the ``otel``
    extra), so a server without it starts in every other mode and this one says what to install."""
    try:
        from kernel import otel
    except ImportError as e:
        raise ServerError("trace mode 'opentelemetry' needs the packages opentelemetry-sdk and "
                          f"opentelemetry-exporter-otlp-proto-http: pip install 'edge-kernel[otel]' ({e})",
                          "INVALID_ARG") from None
    return otel


# -- requests to change the settings (HTTP JSON and gRPC), checked with Triton's messages --------

def changes_from_json(doc: Any) -> dict[str, Any]:
    """A POSTed trace setting object as :meth:`Tracer.update`'s changes (a value of null clears)."""
    if not isinstance(doc, dict):
        raise invalid("trace setting request must be a JSON object")
    if "trace_file" in doc:
        raise _no_file()
    changes: dict[str, Any] = {}
    if "trace_level" in doc:
        levels = doc["trace_level"]
        if levels is None:
            changes["level"] = None
        else:
            if not isinstance(levels, list):
                raise invalid("attempt to access JSON non-array as array")
            if not all(isinstance(v, str) for v in levels):
                raise invalid("attempt to access JSON non-string as string")
            _levels(levels, changes)
    for key, field, parse in _NUMBERS:
        if key in doc:
            value = doc[key]
            if value is None:
                changes[field] = None
            elif not isinstance(value, str):
                raise invalid("attempt to access JSON non-string as string")
            else:
                changes[field] = parse(key, value)
    return changes


def changes_from_grpc(settings: Any) -> dict[str, Any]:
    """A TraceSettingRequest's ``settings`` map as changes (an empty value list clears)."""
    if "trace_file" in settings:
        raise _no_file()
    changes: dict[str, Any] = {}
    if "trace_level" in settings:
        levels = list(settings["trace_level"].value)
        if levels:
            _levels(levels, changes)
        else:
            changes["level"] = None
    for key, field, parse in _NUMBERS:
        if key in settings:
            values = list(settings[key].value)
            if not values:
                changes[field] = None
            elif len(values) == 1:
                try:
                    changes[field] = parse(key, values[0])
                except ServerError as e:
                    # Triton's gRPC words have a space its HTTP ones lack (observed on 2.51)
                    raise invalid(str(e).replace("Expecting value >= -1, got:", "Expecting value >= -1, got: ")) \
                        from None
            else:
                raise invalid(f"expect only 1 value for '{key}'")
    return changes


def _no_file() -> ServerError:
    # Triton answers 501 (UNSUPPORTED); asking for it is the client's mistake, so 400 here.
    return ServerError("trace file location can not be updated through network protocol", "UNSUPPORTED")


def _levels(names: list[str], changes: dict[str, Any]) -> None:
    level = 0
    for name in names:
        if name == "OFF":
            if len(names) != 1:
                raise invalid("Expect only one trace level 'OFF' is specified")
            changes["level"] = 0
        elif name in _LEVEL_NAMES:  # other names are ignored, as Triton does
            level |= _LEVEL_NAMES[name]
            changes["level"] = level


def _parse_int(key: str, text: str, low: int, high: int) -> int:
    """``std::stoi`` as Triton calls it: leading digits count, the rest is ignored."""
    match = _LEADING_INT.match(text)
    if match is None:
        raise invalid(f"Unable to parse '{key}', got: {text}")
    value = int(match.group())
    if not -(_INT32_MAX + 1) <= value <= _INT32_MAX:
        raise invalid(f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {text}")
    return value


def _u32(key: str, text: str) -> int:
    return _parse_int(key, text, 0, _U32 - 1) % _U32  # "-1" reads back 4294967295, as in Triton


def _count_of(key: str, text: str) -> int:
    value = _parse_int(key, text, MIN_TRACE_COUNT, _INT32_MAX)
    if value < MIN_TRACE_COUNT:
        raise invalid(f"Unable to parse 'trace_count'. Expecting value >= {MIN_TRACE_COUNT}, got:{text}")
    return value


#: The numeric settings: the request's key, Tracer.update's field, the parser with Triton's checks.
_NUMBERS = (("trace_rate", "rate", _u32), ("trace_count", "count", _count_of), ("log_frequency", "log_frequency", _u32))


def tensor_array(datatype: str, shape: list[int], buf: Any) -> np.ndarray | None:
    """An input's bytes as an array for a tensor record (None when they cannot be read as one)."""
    try:
        return buf if isinstance(buf, np.ndarray) else dtypes.to_array(datatype, shape, buf)
    except (ValueError, KeyError, TypeError):
        return None
