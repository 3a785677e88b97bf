"""Triton's generate extension over HTTP: ``POST /v2/models/<model>[/versions/<v>]/generate`` and
``.../generate_stream`` (docs/triton-behaviour.md §18 has what Triton 2.51 does, and where this differs).

Why: LLM-style python models (often decoupled, streaming tokens) are driven with a flat JSON body,
``{"text_input": "...", "max_tokens": 16, "parameters": {...}}``, instead of KServe's tensor lists;
clients of Triton's generate endpoint expect it here unchanged.

How, as Triton 2.51 does it:

* **Request**: every top-level key of the body that names one of the model's inputs becomes that input;
  every other key becomes a request parameter (string, integer, boolean or number; anything else is an
  error). ``parameters`` is an object whose keys are mapped the same way. ``id`` is the request id (and
  also a parameter). An input's datatype is the model's; its value is one JSON value or an array of them
  (nested arrays flattened); its shape is the model's metadata shape (batch dimension included) with the
  fixed dimensions taken from the element count and the innermost variable one given the rest (other
  variable ones: 1): a scalar for ``dims: [1]`` of a batching model is ``[1, 1]``, three numbers for
  ``dims: [-1]`` are ``[3]``. Inputs are built here as small numpy arrays (the JSON forces one copy);
  the request then goes the way ``/infer``'s does: :meth:`kernel.server.Core.stream`, which runs ordinary
  and decoupled models alike, with statistics, the response cache and tracing as for any request.
* **Response**: one flat JSON object, keys sorted (Triton writes a ``std::map``): ``id`` (when the request
  had one), ``model_name``, ``model_version``, the response's parameters, and each output by name, a
  single element unwrapped to a scalar, any other count a flat array (BYTES as UTF-8 text).
* ``/generate`` answers exactly one response (a decoupled model that sends one, then its final flag,
  is fine); ``/generate_stream`` answers Server-Sent Events, ``data: {...}\\n\\n`` per response, errors
  as ``data: {"error": "..."}\\n\\n``; its status (200, or the first response's error) is sent with the
  first response, so a later error arrives inside a 200 stream. Errors before the model runs are plain
  JSON errors, ``{"error": "..."}``, with ``application/json``.

The stream is a :class:`protocol.http.server.Stream` over an async generator of events fed by the core's
callback: if the client goes, the generator is cancelled and so is the request (its worker stops being
asked for more; its shared memory is freed as for any cancelled request); responses never sent are
released.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import Any

import numpy as np
import orjson

from kernel.errors import ServerError, invalid
from kernel.server import Core
from kernel.types import InferRequest, InferResponse, InputTensor
from protocol.http.server import Deferred, Request, Response, Stream
from protocol.http.v2json import flatten_json, json_array

log = logging.getLogger("kernel.http")

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_INT64 = (-(1 << 63), (1 << 63) - 1)

#: What /generate answers when the model does not give exactly one response (Triton's words).
NOT_ONE = ("generate expects model to produce exactly 1 response, use generate stream for model that generates "
           "various number of responses")

def _error(error: ServerError) -> Response:
    return Response(orjson.dumps({"error": error.message}), error.http_status, _JSON)


def _event(doc: bytes) -> bytes:
    """One Server-Sent Event."""
    return b"data: " + doc + b"\n\n"


# -- request -------------------------------------------------------------------
def parse_request(model: str, version: str, body: bytes | memoryview, mv: Any) -> InferRequest:
    """The body of a generate request as an :class:`InferRequest` for the model version ``mv``.

    Every client mistake is a 400 ``ServerError`` (Triton answers some of them 500: §18)."""
    if not bytes(body).strip(b" \t\n\r"):
        raise invalid(f"failed to parse the request JSON buffer: The document is empty. at {len(body)}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise invalid(f"failed to parse the request JSON buffer: {e}") from None
    if type(doc) is not dict:
        raise invalid("attempt to get members for non-object")
    request = InferRequest(model, version)
    rid = doc.get("id")
    if rid is not None:
        if type(rid) is not str:
            raise invalid("Unable to parse 'id': attempt to access JSON non-string as string")
        request.id = rid
    inputs = mv.inputs
    batched = mv.max_batch_size > 0
    for key, value in doc.items():
        if key == "parameters":
            if key in inputs:
                raise invalid("Keyword 'parameters' for nested schema also given as input tensor name")
            if type(value) is not dict:
                raise invalid("Expected JSON object for keyword: 'parameters': attempt to access JSON non-object "
                              "as object")
            try:
                for name, nested in value.items():
                    _map(request, name, nested, inputs, batched)
            except ServerError as e:
                e.message = f"Converting keyword: 'parameters': {e.message}"
                e.args = (e.message,)
                raise
        else:
            _map(request, key, value, inputs, batched)
    return request


def _map(request: InferRequest, name: str, value: Any, inputs: dict, batched: bool) -> None:
    """One key of the body: an input of the model, else a request parameter."""
    spec = inputs.get(name)
    if spec is None:
        if type(value) is int and not _INT64[0] <= value <= _INT64[1]:
            value = float(value)  # (rapidjson reads it as a double)
        elif type(value) not in (str, int, bool, float):
            raise invalid(f"parameter '{name}' has invalid type. It should be either 'int', 'bool', or 'string'.")
        request.parameters[name] = value
        return
    if any(t.name == name for t in request.inputs):
        raise invalid(f"[request id: {request.id or '<id_unknown>'}] input '{name}' already exists in request")
    datatype = spec.datatype
    flat = flatten_json(value)
    if datatype == "BYTES" and not all(type(s) is str for s in flat):
        raise invalid("Unable to parse JSON bytes array: attempt to access JSON non-string as string")
    count = len(value) if type(value) is list else 1
    shape = _shape(name, count, ([-1] if batched and not spec.shape_tensor else []) + list(spec.dims))
    if datatype in ("FP16", "BF16"):
        raise invalid(f"receiving {datatype} data via JSON is not supported. Please use the binary data format for "
                      f"input {name}")
    if len(flat) != count:  # nested arrays that do not make up the top level's count
        raise invalid("Unable to parse 'data': Shape does not match true shape of 'data' field")
    array = json_array(flat, datatype)
    request.inputs.append(InputTensor(name, datatype, shape, array.reshape(shape)))


def _shape(name: str, count: int, dims: list[int]) -> list[int]:
    """Triton's shape for ``count`` elements of an input of metadata shape ``dims``: the fixed dimensions
    divide the count (innermost first), the innermost variable one takes what is left, the others are 1."""
    shape = list(dims)
    left = count
    for d in reversed(shape):
        if d != -1:
            if d <= 0 or left % d:
                raise invalid(f"The schema can not convert input '{name}' to tensor with proper shape")
            left //= d
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] == -1:
            shape[i], left = left, 1
    if left != 1:
        raise invalid(f"The schema can not convert input '{name}' to tensor with proper shape")
    return shape


# -- response ------------------------------------------------------------------
def encode_response(response: InferResponse) -> bytes:
    """A response as the generate extension's flat JSON object (keys sorted, as Triton's)."""
    doc: dict[str, Any] = {}
    if response.id:
        doc["id"] = response.id
    doc["model_name"] = response.model_name
    doc["model_version"] = str(response.model_version)
    for key, value in (response.parameters or {}).items():
        if type(value) not in (str, int, bool, float):
            raise ServerError(f"Response parameter '{key}' has type 'TRITONSERVER_PARAMETER_BYTES' which is not "
                              "currently supported", "UNSUPPORTED")
        doc.setdefault(key, value)  # (Triton's map keeps the first of a name)
    for out in response.outputs:
        if out.name in doc:
            continue
        if out.datatype in ("FP16", "BF16"):
            raise invalid(f"sending {out.datatype} data via JSON is not supported. Please use the binary data "
                          "format for output")
        array = out.as_numpy().reshape(-1)
        if out.datatype == "BYTES":
            values: Any = [b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b)
                           for b in array.tolist()]
            doc[out.name] = values[0] if len(values) == 1 else values
        else:
            doc[out.name] = array[0] if array.size == 1 else np.ascontiguousarray(array)
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def _encoded(item: Any) -> tuple[bytes, int]:
    """(JSON, status) of one core callback's response or error; the response is released."""
    try:
        if isinstance(item, InferResponse):
            return encode_response(item), 200
        error = item if isinstance(item, ServerError) else ServerError(f"internal error: {item}", "INTERNAL")
        return orjson.dumps({"error": error.message}), error.http_status
    except ServerError as e:
        return orjson.dumps({"error": e.message}), e.http_status
    except Exception as e:  # noqa: BLE001 - a bug costs one response, not the front
        log.error("encoding a generate response failed", exc_info=e)
        return orjson.dumps({"error": f"internal error: {type(e).__name__}: {e}"}), 500
    finally:
        if isinstance(item, InferResponse):
            item.release()


# -- routes --------------------------------------------------------------------
class GenerateRoutes:
    """The two routes over a :class:`Core` (``protocol.http.front`` adds them behind its restricted-API check)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _start(self, request: Request, on_response: Any) -> tuple[asyncio.Future, InferRequest, Any]:
        """Parse and submit: (the core's future of the request, the request, its model version)."""
        m = request.match_info
        model, version = m["model"], m.get("version", "")
        mv = self.core.version(model, version)  # an unknown model: 404, as Triton's
        mv.wake()
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            raise invalid("Unsupported content-encoding, only 'identity' is supported.")
        tracer = self.core.tracer
        # An ordinary model's trace ends once its answer is sent; a decoupled model's with the request.
        trace = tracer.sample(mv.name, front=not mv.decoupled, header=request.headers.get) if tracer.on else None
        if trace is not None:
            trace.stamp("HTTP_RECV_START", request.received)
            trace.stamp("HTTP_RECV_END")
        try:
            infer_request = parse_request(model, version, request.body, mv)
        except BaseException:
            if trace is not None:
                trace.finish()
            raise
        request.release_body()  # (everything needed is in the request now)
        infer_request.trace = trace
        return self.core.stream(infer_request, on_response), infer_request, mv

    # /generate ---------------------------------------------------------------
    def generate(self, request: Request) -> Deferred:
        items: list = []
        done, infer_request, _ = self._start(request, lambda response, final: response is None
                                             or items.append(response))
        return Deferred(done, partial(self._answer, items, infer_request))

    @staticmethod
    def _answer(items: list, infer_request: InferRequest, done: asyncio.Future) -> Response:
        trace = infer_request.trace if infer_request.trace is not None and infer_request.trace.front else None
        if trace is not None:
            trace.stamp("HTTP_SEND_START")
        try:
            if done.cancelled():
                raise asyncio.CancelledError
            if len(items) == 1:
                body, status = _encoded(items.pop())
            else:  # a decoupled model's none or several: the client's choice of route (Triton: 200 and this)
                body, status = orjson.dumps({"error": NOT_ONE}), 400
        finally:
            for item in items:
                if isinstance(item, InferResponse):
                    item.release()
            items.clear()
        return Response(body, status, _JSON, sent=None if trace is None else partial(_sent, trace))

    # /generate_stream --------------------------------------------------------
    def generate_stream(self, request: Request) -> Deferred:
        events = _Events()
        done, infer_request, mv = self._start(request, events.put)
        events.done = done
        events.trace = infer_request.trace if infer_request.trace is not None and not mv.decoupled else None
        # The status goes with the first response: wait for it (the client going cancels the request).
        events.first.add_done_callback(lambda f: done.cancel() if f.cancelled() else None)
        done.add_done_callback(events.ended)
        return Deferred(events.first, events.start)


def _sent(trace: Any) -> None:
    trace.stamp("HTTP_SEND_END")
    trace.finish()


class _Events:
    """A generate_stream request's responses between the core's callback and the socket: an async
    iterator of Server-Sent Events whose ``aclose()`` (always called by the server, even when the
    client went before the first event) cancels the request if it still runs and releases what was
    never sent."""

    __slots__ = ("queue", "final", "first", "waiter", "done", "trace", "head", "closed")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.queue: deque = deque()
        self.final = False
        self.first: asyncio.Future = loop.create_future()  # the first response, or the end
        self.waiter: asyncio.Future | None = None
        self.done: asyncio.Future | None = None
        self.trace: Any = None  # an ordinary model's (the front finishes it)
        self.head: bytes | None = None
        self.closed = False

    def put(self, response: Any, final: bool) -> None:
        """The core's callback: a response, an error, or None (a decoupled model's bare final flag)."""
        if response is not None:
            if self.closed:
                if isinstance(response, InferResponse):
                    response.release()
                return
            self.queue.append(response)
        if final:
            self.final = True
        self._wake()

    def ended(self, done: asyncio.Future) -> None:
        """The request is over (cancelled included): nothing more will come."""
        self.final = True
        self._wake()

    def _wake(self) -> None:
        if not self.first.done():
            self.first.set_result(None)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def start(self, first: asyncio.Future) -> Stream:
        """The response's head: the first response's status (200 for none at all)."""
        first.result()  # (cancelled: the client went; nobody answers)
        status = 200
        if self.queue:
            body, status = _encoded(self.queue.popleft())
            self.head = _event(body)
        if self.trace is not None:
            self.trace.stamp("HTTP_SEND_START")
        return Stream(self, status, _SSE)

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> bytes:
        head, self.head = self.head, None
        if head is not None:
            return head
        while True:
            if self.queue:
                return _event(_encoded(self.queue.popleft())[0])
            if self.final or self.closed:
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter

    async def aclose(self) -> None:
        self.closed = True
        done = self.done
        if done is not None and not done.done():
            done.cancel()  # the client went: so does its request
        while self.queue:
            item = self.queue.popleft()
            if isinstance(item, InferResponse):
                item.release()
        trace, self.trace = self.trace, None
        if trace is not None:
            _sent(trace)
