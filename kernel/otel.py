"""Mode opentelemetry of Triton's trace extension: a finished trace's stamps as OpenTelemetry spans, exported
over OTLP/HTTP through the SDK's BatchSpanProcessor (docs/triton-behaviour.md §15).

Imported only in that mode (kernel.tracing.load_otel), once its settings are checked: the SDK is the
optional ``otel`` extra. The mode's own settings (``--trace-config opentelemetry,url=|resource=|bsp_*=``)
are read in kernel.otel_settings, which needs no SDK, so a bad one is reported as such without it.

The spans are Triton 2.51's: ``InferRequest`` (the front's events: ``HTTP_*``/``GRPC_*`` and
``INFER_RESPONSE_COMPLETE``), under it a span named after the request's model (``REQUEST_START``,
``QUEUE_START``, ``REQUEST_END``; attributes ``triton.model_name``, ``triton.model_version``,
``triton.trace_id``, ``triton.trace_parent_id``, ``triton.request_id``), under that a ``compute`` span
(``COMPUTE_*``); an ensemble step's or a BLS request's model span is a child of its parent request's model
span. All are SERVER spans of the tracer ``triton-server``. They are made when the trace is complete, from
the stamps it collected (times on the same clock as the triton mode's file; Triton's spans are reported
as they happen), so a request not traced costs nothing here.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from opentelemetry import trace as api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# -- the exporter ---------------------------------------------------------------------------------------

_SERVER = api.SpanKind.SERVER
#: How long the server's stop waits for the spans still queued to be exported. A collector that answers takes
#: far less; with none answering, the SDK's exporter retries with back-off within its 10 s timeout (a stop took
#: 7 s when nothing listened at the url, 10 s when nothing answered), and a pod or a Ctrl-C should stop promptly.
STOP_TIMEOUT_MS = 1000
_COMPUTE = frozenset(("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"))


def _front(name: str) -> bool:
    """An event of the root span (the front's, and the response's completion)."""
    return name.startswith(("HTTP_", "GRPC_")) or name == "INFER_RESPONSE_COMPLETE"


class _ChosenIds(RandomIdGenerator):
    """The ids of the span about to be made, when they were chosen before it (kernel.tracing.SpanTrace: a
    model may have passed its request span's context on already); random ones otherwise."""

    def __init__(self) -> None:
        self.span = self.trace = 0

    def generate_span_id(self) -> int:
        span, self.span = self.span, 0
        return span or super().generate_span_id()

    def generate_trace_id(self) -> int:
        trace, self.trace = self.trace, 0
        return trace or super().generate_trace_id()


class Exporter:
    """One server's tracer provider and OTLP/HTTP exporter, made from ``--trace-config opentelemetry,...``
    (kernel.otel_settings.settings, already checked).

    The provider is the server's own, not the process's global one: an application running the server in
    process keeps its own OpenTelemetry set-up. Its sampler is ALWAYS_ON, as Triton's (the C++ SDK's
    default): the server decided what to trace, and a client's context whose sampled flag is off still
    gets its spans, as in Triton."""

    def __init__(self, settings: list[tuple[str, str]]) -> None:
        attributes = {"service.name": "triton-inference-server"}
        url = None
        bsp: dict[str, int] = {}
        for key, value in settings:
            if key == "url":  # Triton's exporter (curl) takes "host:port/path"; requests needs the scheme
                url = value if "://" in value else f"http://{value}"
            elif key == "resource":
                name, _, attribute = value.partition("=")
                attributes[name] = attribute
            else:
                bsp[key] = int(value)
        queue = bsp["bsp_max_queue_size"]
        processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=url), max_queue_size=queue,
            # The SDK wants both positive and the batch no larger than the queue; Triton's C++ SDK takes a
            # delay of 0 (export at once) and a batch larger than the queue (the queue's size, in effect).
            schedule_delay_millis=max(bsp["bsp_schedule_delay"], 1),
            max_export_batch_size=min(bsp["bsp_max_export_batch_size"], queue))
        self.ids = _ChosenIds()
        self.processor = processor
        self.provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource.create(attributes), id_generator=self.ids)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("triton-server")
        self.propagator = TraceContextTextMapPropagator()

    def context(self, traceparent: str, tracestate: str | None) -> Any:
        """A client's W3C trace context, or None when it is not a valid one (the request is then sampled as
        any other, and its trace is a new one)."""
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        context = self.propagator.extract(carrier)
        return context if api.get_current_span(context).get_span_context().is_valid else None

    @staticmethod
    def trace_id(context: Any) -> int:
        """The trace id of a client's context (from :meth:`context`)."""
        return api.get_current_span(context).get_span_context().trace_id

    def emit(self, root: Any, end_ns: int) -> None:
        """A finished root trace (kernel.tracing.SpanTrace) and its children, as spans. ``end_ns``: when it
        finished (the ``InferRequest`` span's end, after the response was sent)."""
        if not root.stamps:  # (level TENSORS alone: nothing is traced in this mode)
            return
        offset = time.time_ns() - time.perf_counter_ns()  # the stamps' clock to the wall clock, as Triton's
        events = sorted((ns, name) for name, ns in root.stamps if _front(name))
        start = min(ns for _, ns in root.stamps)
        # (no client context: a new trace, never a child of whatever span the calling thread has open)
        if root.context is None:  # (with a client's context, the SDK takes the client's trace id)
            self.ids.trace = root.trace_id
        span = self.tracer.start_span("InferRequest", context=root.context or Context(), kind=_SERVER,
                                      start_time=start + offset)
        for ns, name in events:
            span.add_event(name, timestamp=ns + offset)
        self._request(root, span, offset)
        span.end(end_time=max(end_ns, *(ns for _, ns in root.stamps)) + offset)

    def _request(self, trace: Any, parent: Any, offset: int) -> None:
        """A request's span (under ``parent``), its children's, and its compute span."""
        if trace.head is None:  # never queued (refused, or unparsable): no request span, as in Triton
            return
        model, version, request_id = trace.head
        stamps = sorted((ns, name) for name, ns in trace.stamps if not _front(name))
        own = [(ns, name) for ns, name in stamps if name not in _COMPUTE]
        compute = [(ns, name) for ns, name in stamps if name in _COMPUTE]
        attributes = {"triton.model_name": model, "triton.model_version": version, "triton.trace_id": trace.id,
                      "triton.trace_parent_id": trace.parent.id if trace.parent is not None else 0}
        if request_id:
            attributes["triton.request_id"] = request_id
        self.ids.span = trace.span_id
        span = self.tracer.start_span(model, context=api.set_span_in_context(parent), kind=_SERVER,
                                      start_time=stamps[0][0] + offset, attributes=attributes)
        for ns, name in own:
            span.add_event(name, timestamp=ns + offset)
        for child in trace.children:
            self._request(child, span, offset)
        if compute:
            inner = self.tracer.start_span("compute", context=api.set_span_in_context(span), kind=_SERVER,
                                           start_time=compute[0][0] + offset)
            for ns, name in compute:
                inner.add_event(name, timestamp=ns + offset)
            inner.end(end_time=compute[-1][0] + offset)
        span.end(end_time=stamps[-1][0] + offset)

    def shutdown(self) -> None:
        """Export what is still queued, waiting at most :data:`STOP_TIMEOUT_MS`, then stop (the server stops).

        The SDK's own bounded stop: its batch processor waits that long for its worker's last exports, then
        shuts the exporter down, which ends a retry's back-off at once and refuses the batches left (a request
        already on the wire ends at the exporter's timeout, in the SDK's daemon thread, which exits then).
        ``BatchSpanProcessor.shutdown()`` takes no timeout (30 s), hence the processor it wraps, where the
        SDK has one with a timeout (opentelemetry-sdk >= 1.36); an older SDK stops as it does."""
        batch = getattr(self.processor, "_batch_processor", None)
        if batch is not None and "timeout_millis" in inspect.signature(batch.shutdown).parameters:
            batch.shutdown(timeout_millis=STOP_TIMEOUT_MS)
        self.provider.shutdown()  # (the processor's second shutdown does nothing; the SDK's atexit hook goes)
