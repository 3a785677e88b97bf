"""Triton's HTTP/REST endpoint (KServe v2 plus Triton's extensions) on :mod:`protocol.http.server`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from functools import partial
from typing import Any

import orjson

from kernel import logs, tracing
from kernel.errors import CUDA_SHM_UNSUPPORTED, ServerError, invalid
from kernel.restricted import forward_headers, http_message
from kernel.server import Core
from protocol.http import v2json
from protocol.http.generate import GenerateRoutes
from protocol.http.server import (
    INFLATE_INLINE,
    Deferred,
    HttpError,
    HttpServer,
    Request,
    Response,
    Router,
    deflate,
    error_body,
    response_encoding,
)
from shm.arena import round_up

log = logging.getLogger("kernel.http")

_JSON = "application/json"
_TEXT = "text/plain"
_BINARY = "application/octet-stream"


#: Bytes of request bodies the HTTP endpoint keeps in the front's arena at once.
MAX_BODY_ARENA = 256 << 20


class ArenaBody:
    """A request body received into the front's shared-memory arena.

    The binary tensors in it reach the worker where they lie: no copy after the socket's. The
    body is placed so that its binary part (after the JSON header) starts aligned like arena blocks.
    """

    __slots__ = ("front", "arena", "key", "block", "offset", "view")

    def __init__(self, front: HttpFront, key: str, block: int, offset: int, size: int) -> None:
        self.front = front
        self.arena = front.core.arena
        self.key, self.block, self.offset = key, block, offset
        self.view = self.arena.view(key, offset, size)
        front.body_bytes += size

    def release(self) -> None:
        arena, self.arena = self.arena, None
        if arena is None:
            return
        self.front.body_bytes -= len(self.view)
        self.view = memoryview(b"")
        if arena is self.front.core.arena:  # not after the server stopped
            arena.free(self.key, self.block)


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, _JSON)


def _error(error: ServerError, content_type: str = _JSON) -> Response:
    return Response(v2json.error_body(error), error.http_status, content_type)


def _ok(content_type: str = _TEXT) -> Response:
    return Response(b"", 200, content_type)


def _not_ready(body: bytes = b"") -> Response:
    return Response(body, 400, _TEXT)


def _on_error(request: Request, error: BaseException) -> Response:
    """Every error as Triton's ``{"error": ...}`` body; a bug costs one request, not the server."""
    if isinstance(error, ServerError):
        return _error(error)
    if isinstance(error, HttpError):
        return Response(error_body(error.reason), error.status, error.content_type)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return _error(ServerError(f"internal error: {type(error).__name__}: {error}", "INTERNAL"))


def _check_uint(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid("attempt to access JSON non-unsigned-integer as unsigned-integer")


_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _atoi(text: str) -> int:
    """C's ``atoi`` as glibc's (``strtol`` cast to int): leading blanks, a sign, digits, the rest ignored; 0 if
    there is no number; out of range, ``long``'s limit cut to 32 bits (so 2**63 and more read as -1)."""
    m = _ATOI.match(text)
    if m is None:
        return 0
    value = max(-(1 << 63), min(int(m[1]), (1 << 63) - 1))
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _traced_send(trace: Any, release: Any) -> None:
    """A traced answer left for the socket: HTTP_SEND_END ends its trace."""
    if release is not None:
        release()
    trace.stamp("HTTP_SEND_END")
    trace.finish()


def _read_json(request: Request, empty: bool = True) -> dict:
    """A control route's JSON body; unreadable JSON is the client's mistake: 400 (Triton: 500).

    Triton's repository routes read an empty body as ``{}`` (``empty``); its trace and logging routes parse
    whatever came, so an empty or blank body there is rapidjson's "The document is empty" at the blank's end
    (docs/triton-behaviour.md §15).
    """
    body = request.body
    if not body and empty:
        return {}
    if not bytes(body).strip(b" \t\n\r"):  # (rapidjson's whitespace)
        raise invalid(f"failed to parse the request JSON buffer: The document is empty. at {len(body)}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise invalid(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(doc, dict):
        raise invalid("failed to parse the request JSON buffer: The document root must be an object.")
    return doc


class HttpFront:
    """Routes of the HTTP endpoint over a :class:`Core`."""

    def __init__(self, core: Core, max_body: int = 1 << 30) -> None:
        self.core = core
        self.router = Router()
        self.max_body = max_body
        self.body_bytes = 0  # of request bodies in the arena now (see _body_buffer)
        self._infer_routes: set[Any] = set()
        generate = GenerateRoutes(core)
        add = self._add
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            add("POST", base + "/infer", self.infer, "inference")  # first: the hot route matches at once
        add("GET", "/v2/health/live", self.live, "health")
        add("GET", "/v2/health/ready", self.ready, "health")
        add("GET", "/v2", self.server_metadata, "metadata")
        add("GET", "/v2/models/stats", self.stats, "statistics")
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            add("GET", base, self.model_metadata, "metadata")
            add("GET", base + "/ready", self.model_ready, "health")
            add("GET", base + "/config", self.model_config, "model-config")
            add("GET", base + "/stats", self.stats, "statistics")
            add("POST", base + "/generate", generate.generate, "inference")  # (protocol.http.generate)
            add("POST", base + "/generate_stream", generate.generate_stream, "inference")
        add("POST", "/v2/repository/index", self.repository_index, "model-repository")
        add("POST", "/v2/repository/models/{model}/load", self.load, "model-repository")
        add("POST", "/v2/repository/models/{model}/unload", self.unload, "model-repository")
        for kind, status, register, unregister in (
                ("system", self.shm_status, self.shm_register, self.shm_unregister),
                ("cuda", self.cuda_shm_status, self.cuda_shm_register, self.cuda_shm_unregister)):
            add("GET", f"/v2/{kind}sharedmemory/status", status, "shared-memory")
            add("GET", f"/v2/{kind}sharedmemory/region/{{name}}/status", status, "shared-memory")
            add("POST", f"/v2/{kind}sharedmemory/region/{{name}}/register", register, "shared-memory")
            add("POST", f"/v2/{kind}sharedmemory/unregister", unregister, "shared-memory")
            add("POST", f"/v2/{kind}sharedmemory/region/{{name}}/unregister", unregister, "shared-memory")
        for method in ("GET", "POST"):  # others: 405, as Triton
            add(method, "/v2/trace/setting", self.trace, "trace")
            add(method, "/v2/models/{model}/trace/setting", self.trace, "trace")
        for method in ("GET", "POST"):
            add(method, "/v2/logging", self.logging, "logging")

    def _add(self, method: str, path: str, handler: Any, category: str) -> None:
        """Route ``path`` to ``handler`` behind Triton's check of its restricted-API category.

        Like Triton, the check comes first: a restricted request learns nothing else (not even
        whether the model exists) and its body is not parsed.
        """
        core = self.core

        def guarded(request: Request) -> Any:
            restrictions = core.http_restricted
            if restrictions:
                key = restrictions.refusal(category, request.headers.get)
                if key is not None:
                    return Response(error_body(http_message(key)), 403, _JSON)
            return handler(request)

        guarded.category = category  # type: ignore[attr-defined]
        if handler == self.infer:
            self._infer_routes.add(guarded)
        # Triton's 405 is text/plain on the health and infer routes, application/json on the others
        plain = category == "health" or handler == self.infer
        self.router.add(method, path, guarded, _TEXT if plain else _JSON)

    def server(self) -> HttpServer:
        """An :class:`HttpServer` for these routes (``await server.start(host, port)``)."""
        return HttpServer(self.router, _on_error, self.max_body, body_buffer=self._body_buffer)

    def _body_buffer(self, method: str, url: str, headers: dict[str, str], size: int) -> ArenaBody | None:
        """An inference request with binary tensors goes straight to the arena (a 1080p frame: no 6 MB
        join, no copy at dispatch); other bodies are received in memory.

        Only from the arena's free space (it is never grown for a body: it does not shrink), and at
        most ``MAX_BODY_ARENA`` bytes of bodies at a time.
        """
        header = headers.get("inference-header-content-length", "")
        if not header.isdigit() or not 0 < int(header) < size:
            return None
        try:
            if self.router.resolve(method, url.partition("?")[0])[0] not in self._infer_routes:
                return None
        except HttpError:  # no such route: answered without reading the body
            return None
        arena = self.core.arena
        if arena is None or self.body_bytes + size > MAX_BODY_ARENA:
            return None
        pad = round_up(int(header)) - int(header)  # the binary part then starts aligned, as arena blocks do
        try:
            where = arena.alloc(size + pad, grow=False)
        except Exception as e:  # noqa: BLE001 - a body that cannot go to shared memory goes to memory
            log.warning("a request body of %d bytes could not go to shared memory: %s", size, e)
            return None
        if where is None:
            return None
        key, block = where
        return ArenaBody(self, key, block, block + pad, size)

    # -- health and metadata --------------------------------------------
    def live(self, request: Request) -> Response:
        return _ok() if self.core.live() else _not_ready()

    def ready(self, request: Request) -> Response:
        return _ok() if self.core.ready() else _not_ready()

    def server_metadata(self, request: Request) -> Response:
        meta = self.core.metadata()
        return _json({"name": meta["name"], "version": meta["version"], "extensions": meta["extensions"]})

    def model_metadata(self, request: Request) -> Response:
        m = request.match_info
        return _json(self.core.model_metadata(m["model"], m.get("version", "")))

    def model_ready(self, request: Request) -> Response:
        m = request.match_info
        try:
            ready = self.core.model_ready(m["model"], m.get("version", ""))
        except ServerError as e:  # a version Triton cannot read: its text, text/plain on this route
            return _error(e, _TEXT)
        if ready:
            return _ok()
        return _not_ready(b'{"error":"Model version not ready"}')

    def model_config(self, request: Request) -> Response:
        m = request.match_info
        return _json(self.core.model_config(m["model"], m.get("version", "")))

    def stats(self, request: Request) -> Response:
        m = request.match_info
        return _json(self.core.statistics(m.get("model", ""), m.get("version", "")))

    # -- inference ------------------------------------------------------
    def infer(self, request: Request) -> Response | Deferred:
        m = request.match_info
        model, version = m["model"], m.get("version", "")
        try:
            mv = self.core.version(model, version)
        except ServerError as e:
            return _error(e, _TEXT)  # Triton answers an unknown model on this route in text/plain
        mv.wake()  # its worker wakes while the request is parsed
        tracer = self.core.tracer
        trace = tracer.sample(mv.name, header=request.headers.get) if tracer.on else None  # (a traceparent)
        if trace is not None:
            trace.stamp("HTTP_RECV_START", request.received)
            trace.stamp("HTTP_RECV_END")
        body = request.body
        header = request.headers.get("inference-header-content-length")
        # Triton's reading: no header, the whole body is JSON (an empty one: a raw request); else C's atoi
        # of it, 0 a raw request, out of [0, body] its range error (text/plain)
        length = len(body) if header is None else int(header) if header.isdigit() and len(header) < 10 \
            else _atoi(header)
        if not 0 <= length <= len(body):
            if trace is not None:
                trace.finish()
            return _error(invalid(f"inference header size should be in range (0, {len(body)}), got: {header}"),
                          _TEXT)
        try:
            if length == 0:
                specs = [(s.name, s.datatype, s.dims, mv.max_batch_size > 0) for s in mv.inputs.values()]
                infer_request = v2json.raw_request(model, version, memoryview(body), specs)
            else:
                buffer = request.buffer
                where = (buffer.key, buffer.offset) if isinstance(buffer, ArenaBody) else None
                infer_request = v2json.parse_request(model, version, body, length, self.core.shm, where)
        except BaseException:
            if trace is not None:
                trace.finish()  # unparsable: the trace ends with what it has
            raise
        infer_request.trace = trace
        if self.core.http_forward is not None:
            forward_headers(self.core.http_forward, request.headers.items(), infer_request)
        future = self.core.submit(infer_request, mv)  # (which ends the trace if it refuses the request)
        accept = request.headers.get("accept-encoding")
        if accept is not None:
            encoding = response_encoding(accept)
            if encoding is not None:
                return self._compressed(future, infer_request, encoding)
        return Deferred(future, lambda f: self._infer_response(f, infer_request))

    def _compressed(self, future: asyncio.Future, infer_request: Any, encoding: str) -> Deferred:
        """The answer compressed, as Triton compresses /infer responses for ``Accept-Encoding: gzip`` or
        ``deflate`` (errors are not; binary outputs keep the uncompressed Inference-Header-Content-Length).
        A body up to INFLATE_INLINE bytes is compressed on the loop, a larger one in the executor."""
        loop = asyncio.get_running_loop()
        out = loop.create_future()  # what the connection waits for: cancelled if the client goes
        out.add_done_callback(lambda o: future.cancel() if o.cancelled() else None)

        def done(response: Response, body: bytes) -> None:
            if response.sent is not None:
                response.sent()  # the compressed body is a copy: the outputs' buffers go back now
                response.sent = None
            response.body = body
            response.headers = {**(response.headers or {}), "Content-Encoding": encoding}
            if not out.done():
                out.set_result(response)

        def answered(f: asyncio.Future) -> None:
            if out.done():  # the client went: nothing to answer, whatever came goes back
                if not f.cancelled() and f.exception() is None:
                    f.result().release()
                return
            try:
                response = self._infer_response(f, infer_request)
            except BaseException as e:  # noqa: BLE001 - handed to the connection, which answers it
                out.set_exception(e)
                return
            if response.status != 200:
                out.set_result(response)
                return
            parts = response.body if isinstance(response.body, list) else [response.body]
            if sum(len(p) for p in parts) <= INFLATE_INLINE:
                done(response, deflate(parts, encoding))
                return
            loop.run_in_executor(None, deflate, parts, encoding).add_done_callback(partial(compressed, response))

        def compressed(response: Response, task: asyncio.Future) -> None:
            if task.exception() is None:
                done(response, task.result())
                return
            if response.sent is not None:
                response.sent()
            if not out.done():
                out.set_exception(task.exception())

        future.add_done_callback(answered)
        return Deferred(out, asyncio.Future.result)

    @staticmethod
    def _infer_response(future: asyncio.Future, infer_request: Any) -> Response:
        trace = infer_request.trace
        if trace is not None:
            trace.stamp("HTTP_SEND_START")
        try:
            response = future.result()
        except ServerError as e:
            answer = _error(e, _TEXT)  # failures of the model itself: text/plain, like Triton
            if trace is not None:
                answer.sent = partial(_traced_send, trace, None)
            return answer
        except BaseException:
            if trace is not None:
                trace.finish()
            raise
        try:
            parts, json_length = v2json.encode_response(response, infer_request)
        except BaseException:
            response.release()
            if trace is not None:
                trace.finish()
            raise
        sent = response.release if trace is None else partial(_traced_send, trace, response.release)
        if json_length is None:
            return Response(parts[0], 200, _JSON, sent=sent)
        # Binary outputs go to the socket as views on shared memory, released once sent.
        return Response(parts, 200, _BINARY, {"Inference-Header-Content-Length": str(json_length)}, sent=sent)

    # -- model repository -----------------------------------------------
    def repository_index(self, request: Request) -> Response:
        doc = _read_json(request)
        ready = doc.get("ready", False)
        if type(ready) is not bool:  # (null too, as Triton's)
            raise invalid("attempt to access JSON non-boolean as boolean")
        return _json(self.core.repository_index(ready))

    async def load(self, request: Request) -> Response:
        """The model repository extension's load. Its parameters are read as Triton reads them, in order: each
        must be a string; ``config``, and ``file:<path>`` (base64); any other is refused. Triton's refusals
        are 500s; a client's mistake is a 400 here, in the same words."""
        doc = _read_json(request)
        params = doc.get("parameters", {})
        if not isinstance(params, dict):
            raise invalid("attempt to get members for non-object")
        config = None
        files = {}
        for key, value in params.items():
            if not isinstance(value, str):
                raise invalid("attempt to access JSON non-string as string")
            if key == "config":
                config = value
            elif key.startswith("file:"):  # the model's files, base64 (Triton's load from files)
                try:
                    files[key] = base64.b64decode(value, validate=True)
                except binascii.Error:
                    raise invalid(f"failed to decode the base64 content of load parameter '{key}'") from None
            else:
                raise invalid("unexpected error on creating Triton parameter")
        await self.core.load_model(request.match_info["model"], config, files or None)
        return _ok(_JSON)

    async def unload(self, request: Request) -> Response:
        doc = _read_json(request)
        dependents = (doc.get("parameters") or {}).get("unload_dependents") is True
        await self.core.unload_model(request.match_info["model"], dependents)
        return _ok(_JSON)

    # -- shared memory --------------------------------------------------
    def shm_status(self, request: Request) -> Response:
        return _json(self.core.shm.status(request.match_info.get("name")))

    def shm_register(self, request: Request) -> Response:
        doc = _read_json(request)
        # Triton's order: key (present, a string), offset (optional), byte_size (present); then the region.
        if "key" not in doc:
            raise invalid("Shared memory register request has no 'key' field")
        key = doc["key"]
        if not isinstance(key, str):
            raise invalid("attempt to access JSON non-string as string")
        offset = doc.get("offset", 0)
        _check_uint(offset)
        if "byte_size" not in doc:
            raise invalid("Shared memory register request has no 'byte_size' field")
        byte_size = doc["byte_size"]
        _check_uint(byte_size)
        self.core.shm.register(request.match_info["name"], key, offset, byte_size)
        return _ok(_JSON)

    def shm_unregister(self, request: Request) -> Response:
        self.core.shm.unregister(request.match_info.get("name"))
        return _ok(_JSON)

    # CUDA IPC does not exist on Jetson: like Triton without CUDA, no region can ever be registered.
    def cuda_shm_status(self, request: Request) -> Response:
        name = request.match_info.get("name")
        if name:
            raise ServerError(f"Unable to find cuda shared memory region: '{name}'", "NOT_FOUND")
        return _json([])

    def cuda_shm_register(self, request: Request) -> Response:
        raise ServerError(CUDA_SHM_UNSUPPORTED, "UNSUPPORTED")

    def cuda_shm_unregister(self, request: Request) -> Response:
        return _ok(_JSON)

    # -- trace and logging ----------------------------------------------
    def trace(self, request: Request) -> Response:
        """Triton's trace extension: the global setting, or a model's (kernel.tracing)."""
        model = request.match_info.get("model", "")
        if model and not self.core.model_ready(model):
            raise invalid(f"Request for unknown model : {model}")
        if request.method == "POST":
            self.core.tracer.update(model, tracing.changes_from_json(_read_json(request, empty=False)))
        return _json(self.core.tracer.settings(model))

    def logging(self, request: Request) -> Response:
        """Triton's logging extension: each setting checked and applied in Triton's order (a refusal keeps
        those before it); a JSON ``null`` is no setting. Triton's 500/501/503 refusals are 400 here."""
        if request.method == "POST":
            doc = _read_json(request, empty=False)
            try:
                self._apply_log_settings(doc)
            finally:  # (a refusal keeps the settings before it: those reach the workers too)
                self.core.log_settings_changed()
        return _json(logs.settings(self.core.verbose))

    def _apply_log_settings(self, doc: dict) -> None:
        """The settings of a POST, each checked and applied in Triton's order."""
        for key in logs.SETTINGS:
            value = doc.get(key)
            if value is None:
                continue
            if key == "log_file":
                raise ServerError(logs.LOG_FILE_FIXED, "UNSUPPORTED")
            if key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
                    raise invalid("attempt to access JSON non-unsigned-integer as unsigned-integer")
                self.core.verbose = value & 0xFFFFFFFF  # Triton keeps the low 32 bits
                logs.set_verbose(self.core.verbose)
            elif key == "log_format":
                if not isinstance(value, str):
                    raise invalid("attempt to access JSON non-string as string")
                if value not in logs.FORMATS:
                    raise invalid(f"invalid argument for --log_format, got: {value}")
                logs.set_format(value)
            else:
                if not isinstance(value, bool):
                    raise invalid("attempt to access JSON non-boolean as boolean")
                logs.set_level(key, value)
