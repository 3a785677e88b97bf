"""A lean HTTP/1.1 server for the front: httptools parses, routes answer.

aiohttp's web application costs about 59 µs of front CPU per request on its own (measured on the
development VM: canned add_sub answers under perf_analyzer); this server, on the same llhttp
parser through httptools, about 17 µs. Requests on one connection are answered in order
(pipelining), bodies may be chunked or gzip/deflate-compressed, ``Expect: 100-continue`` is
honoured, and a route may answer at once, with a coroutine, or with a :class:`Deferred`
(a future plus the function that turns its result into a response: no task per request); that
function may give a :class:`Stream`, a response whose body is sent in chunks as it comes (chunked
transfer encoding: Server-Sent Events).
Large bodies of known length can be received straight into a buffer the application provides
(:class:`BodyBuffer`, e.g. shared memory a worker reads): no joining of chunks, no copy after.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import httptools
import orjson

from protocol.futures import when_done

log = logging.getLogger("kernel.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[405] = b"Not Allowed"  # Triton's reason phrase
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
MAX_HEAD = 64 * 1024  # request line plus headers, bytes (llhttp itself has no limit)
MAX_HEADERS = 128
INFLATE_INLINE = 1 << 20  # bytes a compressed body may inflate to on the event loop; the rest in a thread
STREAM_HIGH = 1 << 20  # bytes of a Stream's chunks the socket may hold before the next chunk waits for it


class HttpError(Exception):
    """An error of the HTTP layer itself (no route, bad body): answered as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str | None = None, content_type: str = "text/plain") -> None:
        super().__init__(reason or HTTPStatus(status).phrase)
        self.status = status
        self.reason = reason or HTTPStatus(status).phrase
        self.content_type = content_type


class BodyBuffer(Protocol):
    """Where a large body is received: ``view`` (writable, the body's length) until ``release()``."""

    view: memoryview

    def release(self) -> None: ...


class Request:
    """One parsed request: header names are lower case; ``body`` is the whole (decoded) body.

    ``buffer`` is the :class:`BodyBuffer` that ``body`` is a view of, if it was received into one;
    the server releases it once the request is answered (or dropped).
    """

    __slots__ = ("method", "path", "headers", "body", "match_info", "keep_alive", "buffer", "received")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes | memoryview,
                 keep_alive: bool, buffer: BodyBuffer | None = None) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.match_info: dict[str, str] = {}
        self.buffer = buffer
        self.received = 0  # when its first byte was parsed (perf_counter ns): a trace's HTTP_RECV_START

    def release_body(self) -> None:
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self.body = b""
            buffer.release()


class Response:
    """Status, body (bytes or a list of buffers written in order) and headers.

    ``sent`` is called once the socket no longer needs the body's buffers (they may be views
    on shared memory that go back to a worker then).
    """

    __slots__ = ("status", "body", "content_type", "headers", "sent")

    def __init__(self, body: Any = b"", status: int = 200, content_type: str = "text/plain",
                 headers: dict[str, str] | None = None, sent: Callable[[], None] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.sent = sent


class Stream:
    """A response whose body comes later, piece by piece: ``chunks`` is an async iterator of bytes.

    The head goes at once (no Content-Length): each piece is one chunk (``Transfer-Encoding:
    chunked``), or, when the connection closes after the answer, the plain bytes up to the close.
    If the client goes, the task reading ``chunks`` is cancelled; ``chunks.aclose()``, where it has
    one, is awaited however the stream ends (even when the client went before the first chunk), so
    that it can clean up. Requests behind it on the connection wait for its end.
    """

    __slots__ = ("status", "content_type", "chunks", "headers")

    def __init__(self, chunks: Any, status: int = 200, content_type: str = "text/event-stream",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.content_type = content_type
        self.chunks = chunks
        self.headers = headers


def response_encoding(accept: str) -> str | None:
    """The encoding a response to ``Accept-Encoding: accept`` is compressed with: ``gzip`` or ``deflate``,
    the one of higher q-value (the first on a tie); None when the client accepts neither (``br``,
    ``identity``, ``*``: Triton compresses with these two only)."""
    best, best_q = None, 0.0
    for item in accept.split(","):
        name, _, param = item.partition(";")
        name = name.strip().lower()
        if name not in _INFLATE:
            continue
        q = 1.0
        param = param.strip().replace(" ", "")
        if param.startswith("q="):
            try:
                q = float(param[2:])
            except ValueError:
                q = 0.0
        if q > best_q:
            best, best_q = name, q
    return best


def deflate(parts: list, encoding: str) -> bytes:
    """``parts`` compressed as one body in ``encoding`` (zlib's default level, as Triton's)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _INFLATE[encoding])
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)


class Deferred:
    """A response that ``finish(future)`` builds once ``future`` is done."""

    __slots__ = ("future", "finish")

    def __init__(self, future: asyncio.Future, finish: Callable[[asyncio.Future], Response | Stream]) -> None:
        self.future = future
        self.finish = finish


Answer = Response | Stream | Deferred | Awaitable[Response]
Handler = Callable[[Request], Answer]


class Router:
    """Paths with ``{name}`` or ``{name:regex}`` segments; first match wins.

    A method a path has no handler for is 405 (``HEAD`` included: Triton's routes answer it 405, not as
    ``GET``), its Content-Type the one given with the path's first ``add`` (Triton: application/json on
    most routes, text/plain on health, infer and metrics).
    """

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler], str]] = []
        self._index: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler, not_allowed_type: str = "text/plain") -> None:
        """Route ``method`` ("*" for any) on ``path`` to ``handler``."""
        if path not in self._index:
            regex = re.sub(r"\{(\w+)(?::([^{}]+))?\}", lambda m: f"(?P<{m[1]}>{m[2] or '[^/]+'})", path)
            self._index[path] = {}
            self._routes.append((re.compile(regex + r"\Z"), self._index[path], not_allowed_type))
        self._index[path][method] = handler

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters, or :class:`HttpError` 404 / 405."""
        for regex, methods, not_allowed_type in self._routes:
            m = regex.match(path)
            if m is not None:
                handler = methods.get(method) or methods.get("*")
                if handler is None:
                    raise HttpError(405, "Method Not Allowed", not_allowed_type)
                params = m.groupdict()
                for k, v in params.items():
                    if "%" in v:
                        params[k] = unquote(v)
                return handler, params
        raise HttpError(404)


_CLOSING = Request("GET", "", {}, b"", keep_alive=False)  # answers an unparsable request, then closes


class _Inflating:
    """A request whose compressed body is being inflated off the event loop (``body``: its future)."""

    __slots__ = ("request", "body")

    def __init__(self, request: Request, body: asyncio.Future) -> None:
        self.request = request
        self.body = body


def _inflate_rest(inflater: Any, head: bytes, limit: int) -> bytes:
    """Finish inflating (in a thread: zlib lets go of the GIL) without ever holding more than ``limit``."""
    parts = [head]
    total = len(head)
    tail = inflater.unconsumed_tail
    try:
        while not inflater.eof:
            piece = inflater.decompress(tail, min(16 << 20, limit + 1 - total))
            tail = inflater.unconsumed_tail
            total += len(piece)
            if total > limit:
                raise HttpError(413, f"request body exceeds the limit of {limit} bytes")
            if not piece and not tail:
                raise HttpError(400, "failed to decompress the request body: incomplete or truncated stream")
            parts.append(piece)
    except zlib.error as e:
        raise HttpError(400, f"failed to decompress the request body: {e}") from None
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, write.

    ``queue`` holds parsed requests (and at most one :class:`HttpError`, the last: a request that
    did not parse) behind the one being answered (``busy``); :meth:`_next` works through it in a
    loop, never by recursion.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request | _Inflating | HttpError] = deque()
        self.busy = False
        # A Deferred's future being worked on (an inference): cancelled if the client goes. Coroutine routes
        # (model control) are left to finish: stopping a load half-way would help nobody.
        self.waiting: asyncio.Future | None = None
        self.paused = False
        self.failed = False  # a request did not parse: nothing after it is read
        self.eof = False  # the client half-closed: answer what is queued, then close
        self.continue_pending = False  # a 100 Continue waits for the answers before it
        self._draining = False
        self._upgrade_head: bytes | None = None
        self._url = b""
        self._begun = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head = 0
        self._sink: BodyBuffer | None = None  # this body's buffer, while it is received
        self.unsent: list[Callable[[], None]] = []  # ``sent`` callbacks of bodies still buffered
        self.drained: asyncio.Future | None = None  # a Stream waiting for the socket's buffer to empty
        self.last_active = time.monotonic()

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # pause_writing/resume_writing then tell when the write buffer fills and empties.
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self._drop_sink()
        waiting, self.waiting = self.waiting, None
        if waiting is not None:  # the client is gone (not half-closed: that one still reads): so is its request
            waiting.cancel()
        for item in self.queue:  # never answered: their body buffers go back now
            if isinstance(item, Request):
                item.release_body()
        self.queue.clear()
        self.resume_writing()

    def eof_received(self) -> bool:
        """The client will send no more; keep the socket open for the answers still owed."""
        self.eof = True
        return self.busy or bool(self.queue)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        """The write buffer is empty: buffers of earlier bodies are free again."""
        unsent, self.unsent = self.unsent, []
        for sent in unsent:
            sent()
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.last_active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:  # one of the callbacks below raised
            cause = e.__context__
            if isinstance(cause, HttpError):
                self._fail(cause.status, cause.reason)
            else:
                log.error("HTTP connection failed", exc_info=cause)
                self._fail(500, "internal error")
        except httptools.HttpParserUpgrade as e:
            self._drop_sink()
            head, self._upgrade_head = self._upgrade_head, None
            if head is None:
                self._fail(400, "Bad Request")
                return
            # Declined (curl --http2 asks for h2c): parse the request again without the upgrade.
            self.parser = httptools.HttpRequestParser(self)
            self.data_received(head + data[e.args[0]:])
        except httptools.HttpParserError:
            self._fail(400, "Bad Request")

    # -- httptools callbacks ------------------------------------------------
    def on_message_begin(self) -> None:
        self._begun = time.perf_counter_ns()
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._head = 0
        self._drop_sink()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEAD:
            raise HttpError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value)
        if self._head > MAX_HEAD or len(self._headers) >= MAX_HEADERS:
            raise HttpError(431)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        headers = self._headers
        length = headers.get("content-length")
        if length is None and "transfer-encoding" not in headers and self.parser.get_http_version() == "1.0" \
                and self.parser.get_method() in (b"POST", b"PUT"):
            # HTTP/1.0 has no chunked bodies: one without a length would run to the connection's end.
            raise HttpError(411, "Length Required: an HTTP/1.0 request body needs a Content-Length")
        if length is not None and length.isdigit():
            size = int(length)
            if size > self.server.max_body:
                raise HttpError(413, f"request body exceeds the limit of {self.server.max_body} bytes")
            allocate = self.server.body_buffer
            if allocate is not None and size >= self.server.body_buffer_min \
                    and "content-encoding" not in headers and "transfer-encoding" not in headers:
                self._sink = allocate(self.parser.get_method().decode("ascii"),
                                      self._url.decode("utf-8", "surrogateescape"), headers, size)
        if headers.get("expect", "").lower() == "100-continue" and not self.parser.should_upgrade():
            if self.busy or self.queue:
                self.continue_pending = True  # after the answers owed before it
            elif self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        start = self._size
        self._size += len(body)
        sink = self._sink
        if sink is not None:
            if self._size > len(sink.view):  # llhttp ends a body at its Content-Length: never expected
                raise HttpError(400, "request body longer than its Content-Length")
            sink.view[start : self._size] = body
            return
        if self._size > self.server.max_body:
            raise HttpError(413, f"request body exceeds the limit of {self.server.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            self._drop_sink()
            self._upgrade_head = self._head_without_upgrade()
            return
        sink, self._sink = self._sink, None
        if sink is not None:
            body: bytes | memoryview = sink.view[: self._size]
        else:
            parts = self._body
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            encoding = self._headers.get("content-encoding")
            if encoding is not None and body:
                body = self._inflate(body, encoding)
        url = self._url.decode("utf-8", "surrogateescape")
        q = url.find("?")
        request = Request(self.parser.get_method().decode("ascii"), url if q < 0 else url[:q],
                          self._headers, b"", self.parser.should_keep_alive(), sink)
        request.received = self._begun
        if isinstance(body, asyncio.Future):
            self.queue.append(_Inflating(request, body))
        else:
            request.body = body
            self.queue.append(request)
        if len(self.queue) > 32 and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._next()

    def _inflate(self, body: bytes, encoding: str) -> bytes | asyncio.Future:
        """The decompressed body, bounded by the body limit (no decompression bomb): at once when it
        inflates to at most ``INFLATE_INLINE`` bytes, else a future for the rest, inflated in the loop's
        executor so that a body inflating to a gigabyte stalls no other client."""
        wbits = _INFLATE.get(encoding.lower())
        if wbits is None:
            raise HttpError(415, f"unsupported content encoding '{encoding}'")
        inflater = zlib.decompressobj(wbits)
        limit = self.server.max_body
        try:
            out = inflater.decompress(body, min(INFLATE_INLINE, limit + 1))
        except zlib.error as e:
            raise HttpError(400, f"failed to decompress the request body: {e}") from None
        if inflater.eof:
            return out
        if len(out) > limit:
            raise HttpError(413, f"request body exceeds the limit of {limit} bytes")
        if not inflater.unconsumed_tail and len(out) < INFLATE_INLINE:
            raise HttpError(400, "failed to decompress the request body: incomplete or truncated stream")
        return asyncio.get_running_loop().run_in_executor(None, _inflate_rest, inflater, out, limit)

    def _drop_sink(self) -> None:
        """Give back the buffer of a body that will not be completed."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.release()

    def _head_without_upgrade(self) -> bytes:
        """This request's head with its Upgrade (and HTTP2-Settings) left out."""
        lines = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self._url, self.parser.get_http_version().encode())]
        for name, value in self._headers.items():
            if name in ("upgrade", "http2-settings"):
                continue
            if name == "connection":
                value = ", ".join(t for t in (v.strip() for v in value.split(","))
                                  if t.lower() not in ("upgrade", "http2-settings"))
                if not value:
                    continue
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        return b"".join(lines) + b"\r\n"

    # -- answering ----------------------------------------------------------
    def _next(self) -> None:
        """Answer queued requests in order while none is in progress."""
        if self._draining:
            return  # an outer call is looping already
        self._draining = True
        try:
            while not self.busy and self.queue and self.transport is not None:
                item = self.queue.popleft()
                if isinstance(item, HttpError):
                    self._respond(_CLOSING, Response(error_body(item.reason), item.status))
                    return
                if isinstance(item, _Inflating):
                    if not item.body.done():  # its body is still being inflated: answered in order, later
                        self.queue.appendleft(item)
                        self.busy = True
                        item.body.add_done_callback(self._inflated)
                        return
                    error = item.body.exception()
                    if error is not None:  # as for a body refused while it came: answered, then closed
                        status, reason = (error.status, error.reason) if isinstance(error, HttpError) \
                            else (400, f"failed to decompress the request body: {error}")
                        self.failed = True
                        self.queue.clear()
                        self._respond(_CLOSING, Response(error_body(reason), status))
                        return
                    item.request.body = item.body.result()
                    item = item.request
                self._dispatch(item)
            transport = self.transport
            if transport is None or self.busy:
                return
            # Idle, nothing queued: read again, let a waiting body come, or end a half-closed connection.
            if self.paused:
                self.paused = False
                transport.resume_reading()
            if self.continue_pending:
                self.continue_pending = False
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self.eof:
                transport.close()
        finally:
            self._draining = False

    def _inflated(self, future: asyncio.Future) -> None:
        self.busy = False
        if self.transport is None:
            return
        self._next()

    def _dispatch(self, request: Request) -> None:
        self.busy = True
        try:
            handler, request.match_info = self.server.router.resolve(request.method, request.path)
            answer = handler(request)
        except Exception as e:
            answer = self.server.on_error(request, e)
        if isinstance(answer, (Response, Stream)):
            self._respond(request, answer)
        elif isinstance(answer, Deferred):
            self.server.pending += 1
            self.waiting = answer.future
            when_done(answer.future, lambda f: self._finish(request, answer.finish, f))
        else:
            try:
                task = asyncio.ensure_future(answer)
            except TypeError as e:  # a route that answered with something else
                self._respond(request, self.server.on_error(request, e))
                return
            self.server.pending += 1
            task.add_done_callback(lambda f: self._finish(request, asyncio.Future.result, f))

    def _finish(self, request: Request, finish: Callable[[asyncio.Future], Response | Stream],
                future: asyncio.Future) -> None:
        self.server.pending -= 1
        self.waiting = None
        if self.transport is None and future.cancelled():  # cancelled because the client went: nothing to say
            request.release_body()
            return
        try:
            response = finish(future)
        except BaseException as e:  # noqa: BLE001 - cancellation included: the client still gets an answer
            response = self.server.on_error(request, e)
        self._respond(request, response)

    def _respond(self, request: Request, response: Response | Stream) -> None:
        if isinstance(response, Stream):
            self._stream(request, response)
            return
        transport = self.transport
        sent = response.sent
        try:
            if transport is None or transport.is_closing():
                return
            body = response.body
            parts = body if isinstance(body, list) else [body]
            length = sum(len(p) for p in parts) if len(parts) > 1 else len(parts[0])
            head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
                response.status, _REASONS.get(response.status, b"Unknown"), response.content_type.encode(), length)
            if response.headers:
                head += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in response.headers.items())
            if not request.keep_alive:
                head += b"Connection: close\r\n"
            head += b"\r\n"
            if request.method == "HEAD":
                transport.write(head)
            elif length < 65536:  # small: one copy, one write, buffers free at once
                transport.write(head + b"".join(parts))
            else:  # large: the socket takes the buffers themselves
                transport.writelines([head, *parts])
                if sent is not None and transport.get_write_buffer_size():
                    self.unsent.append(sent)
                    sent = None
        finally:
            request.release_body()  # answered: whatever read the body is done with it
            if sent is not None:
                sent()
        self.last_active = time.monotonic()
        if not request.keep_alive:
            transport.close()
            return
        self.busy = False
        self._next()

    def _stream(self, request: Request, response: Stream) -> None:
        """Send a :class:`Stream`'s head now and its chunks from a task; the connection stays busy until it ends."""
        transport = self.transport
        if transport is None or transport.is_closing():
            request.release_body()
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                asyncio.ensure_future(aclose())
            return
        chunked = request.keep_alive  # else the close ends the body
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s" % (
            response.status, _REASONS.get(response.status, b"Unknown"), response.content_type.encode(),
            b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n")
        if response.headers:
            head += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in response.headers.items())
        transport.write(head + b"\r\n")
        self.server.pending += 1
        task = asyncio.ensure_future(self._send_chunks(transport, response.chunks, chunked, request.method == "HEAD"))
        self.waiting = task  # cancelled if the client goes
        task.add_done_callback(lambda f: self._streamed(request, f))

    async def _send_chunks(self, transport: asyncio.Transport, chunks: Any, chunked: bool, head_only: bool) -> None:
        try:
            async for chunk in chunks:
                if transport.is_closing():
                    return
                if not chunk or head_only:
                    continue
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if transport.get_write_buffer_size() > STREAM_HIGH:  # a slow reader: wait for the socket
                    self.drained = asyncio.get_running_loop().create_future()
                    await self.drained
            if chunked and not transport.is_closing():
                transport.write(b"0\r\n\r\n")
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _streamed(self, request: Request, task: asyncio.Future) -> None:
        self.server.pending -= 1
        if self.waiting is task:
            self.waiting = None
        request.release_body()
        if not task.cancelled() and task.exception() is not None:
            log.error("a streamed response failed in %s %s", request.method, request.path, exc_info=task.exception())
            if self.transport is not None:
                self.transport.close()  # the body cannot be ended cleanly
            return
        transport = self.transport
        if transport is None:
            return
        self.last_active = time.monotonic()
        if not request.keep_alive:
            transport.close()
            return
        self.busy = False
        self._next()

    def _fail(self, status: int, reason: str) -> None:
        """Stop reading; answer ``status`` after the answers owed before it, then close."""
        log.debug("bad HTTP request: %s", reason)
        self._drop_sink()
        self.failed = True
        self.queue.append(HttpError(status, reason))
        self._next()


def error_body(reason: str) -> bytes:
    """Triton's error body, ``{"error": reason}``."""
    return orjson.dumps({"error": reason})


def _default_error(request: Request, error: BaseException) -> Response:
    if isinstance(error, HttpError):
        return Response(error_body(error.reason), error.status, error.content_type)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return Response(b'{"error":"internal error"}', 500)


class HttpServer:
    """Serve a :class:`Router` on a TCP port from the running event loop."""

    def __init__(self, router: Router, on_error: Callable[[Request, BaseException], Response] = _default_error,
                 max_body: int = 1 << 30, idle_timeout: float = 75.0,
                 body_buffer: Callable[[str, str, dict[str, str], int], BodyBuffer | None] | None = None,
                 body_buffer_min: int = 64 << 10) -> None:
        self.router = router
        self.on_error = on_error
        self.max_body = max_body
        # Bodies of at least body_buffer_min bytes with a Content-Length (and no Content-Encoding) are
        # received into body_buffer(method, url, headers, length), when it gives one.
        self.body_buffer = body_buffer
        self.body_buffer_min = body_buffer_min
        self.idle_timeout = idle_timeout  # seconds a connection may sit without a request in progress
        self.connections: set[_Connection] = set()
        self.pending = 0  # requests answered later (deferred or coroutine) and not yet answered
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen; ``reuse_port``: with SO_REUSEPORT, so that several servers share the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True,
                                                reuse_port=reuse_port or None)
        self._sweep()

    def _sweep(self) -> None:
        """Close connections idle for longer than ``idle_timeout`` (checked a few times per timeout)."""
        now = time.monotonic()
        for conn in list(self.connections):
            if not conn.busy and not conn.queue and not conn.unsent and conn.transport is not None \
                    and now - conn.last_active > self.idle_timeout:
                conn.transport.close()
        interval = min(max(self.idle_timeout / 4, 0.05), 10.0)
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, give in-flight requests up to ``timeout`` seconds, close every connection."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
