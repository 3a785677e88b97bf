"""A lean gRPC server: HTTP/2 on an asyncio Protocol, built on python-hyper's hyperframe and hpack.

Why not grpclib or grpcio: measured on this project's protocol floor (docs/performance-notes.md), grpclib
spends most of a request in h2's general state machine (events, per-frame objects, a task per stream
plus a writer), and grpcio's generic handlers cross threads for each call. gRPC uses a small, fixed part
of HTTP/2, so the connection handler here keeps the hot path flat:

- frame headers are unpacked with one ``struct`` call; DATA and HEADERS payloads are sliced in place and
  only rare frames (SETTINGS, PRIORITY, padded ones) go through hyperframe's parsers;
- a request's header block is decoded by hpack once and cached on its raw bytes: clients repeat the same
  block for every call once their dynamic table is filled, and the cache is dropped whenever the decoder's
  table changes, so a cached block always means what hpack would decode;
- response headers and the ``grpc-status: 0`` trailers are encoded once, without the dynamic table (so
  the bytes hold for every connection), and a unary answer leaves in one transport write;
- a unary call is one task, except a :class:`Deferred` one (ModelInfer): its handler runs as soon as the
  message is in, within the same turn of the event loop, and its answer is sent from the request's future's
  callback: no task, no coroutine frames, one turn of the loop less per request (the HTTP front does the
  same); streaming calls get a :class:`Call` with ``recv``/``send``.

HTTP/2 is done as RFC 9113 and gRPC's PROTOCOL-HTTP2.md require: flow control both ways (a slow reader
holds only its own response, never the connection), SETTINGS, PING, RST_STREAM cancelling the handler,
GOAWAY with in-flight calls finished on shutdown, ``max_concurrent_streams``, keepalive pings, grpc-timeout
deadlines, gzip/deflate ``grpc-encoding`` both ways, Trailers-Only error responses and percent-encoded
``grpc-message``. A message's size is checked against the limit as soon as its 5-byte prefix arrives.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import hpack
from hpack import HPACKError
from hyperframe.frame import SettingsFrame

from protocol.futures import when_done

log = logging.getLogger("kernel.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, F_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, \
    REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = range(12)

# gRPC status codes.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, \
    RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, \
    DATA_LOSS, UNAUTHENTICATED = range(17)

_HDR = struct.Struct(">IBI")  # (length << 8 | type, flags, stream id)
_PREFIX = struct.Struct(">BI")  # gRPC message: compressed flag, length
_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65535
#: What this server advertises: frames up to 1 MiB (fewer frames for big tensors) and 16 MiB windows
#: per stream and for the connection (a 4K frame crosses in a few round trips).
MAX_FRAME = 1 << 20
WINDOW = 16 << 20
MAX_HEADER_LIST = 64 << 10
#: Compressed messages at least this big are (de)compressed off the event loop.
_OFFLOAD = 256 << 10
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_ENCODINGS = ("identity", "deflate", "gzip")
_ACCEPT = ",".join(_ENCODINGS)


class GrpcError(Exception):
    """A call's failure with its gRPC status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _stateless_block(headers: list[tuple[str, str]]) -> bytes:
    """An hpack block that uses no dynamic table (indexed or never-indexed literals), valid on any
    connection: what lets response headers and trailers be encoded once."""
    return hpack.Encoder().encode([(k, v, True) for k, v in headers])


def percent_encode(message: str) -> str:
    """grpc-message's encoding: UTF-8, bytes outside printable ASCII and '%' as %XX."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return message
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


_RESPONSE_HEADERS = {enc: _stateless_block([(":status", "200"), ("content-type", "application/grpc")]
                                           + ([("grpc-encoding", enc)] if enc != "identity" else [])
                                           + [("grpc-accept-encoding", _ACCEPT)])
                     for enc in _ENCODINGS}
_OK_TRAILERS = _stateless_block([("grpc-status", "0")])


def _error_block(status: int, message: str, trailers_only: bool) -> bytes:
    head = [(":status", "200"), ("content-type", "application/grpc")] if trailers_only else []
    return _stateless_block(head + [("grpc-status", str(status)), ("grpc-message", percent_encode(message))])


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(len(payload) << 8 | ftype, flags, sid) + payload


def parse_timeout(value: str) -> float | None:
    """grpc-timeout ("1S", "250m", ...) in seconds; None when malformed."""
    if len(value) < 2 or len(value) > 9 or value[-1] not in _TIMEOUT_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """Decompress with a bound: never more than ``limit`` bytes are produced."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise GrpcError(INTERNAL, f"Failed to decompress the message: {e}") from None
    if len(out) > limit:
        raise GrpcError(RESOURCE_EXHAUSTED, f"Received message larger than max (more than {limit} vs. {limit})")
    if not d.eof:
        raise GrpcError(INTERNAL, "Failed to decompress the message: truncated data")
    return out


def _deflate(data: Any, encoding: str) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


class Deferred:
    """A unary answer still to come: ``finish(future)`` makes the reply's bytes once ``future`` is done
    (raising :class:`GrpcError` for an error status). Cancelling the call cancels ``future``."""

    __slots__ = ("future", "finish")

    def __init__(self, future: asyncio.Future, finish: Callable[[asyncio.Future], bytes]) -> None:
        self.future = future
        self.finish = finish


class Method:
    """One RPC: ``stream=False``: ``handler(request, call) -> reply bytes``, a coroutine function, or with
    ``deferred=True`` a plain function returning the reply's bytes or a :class:`Deferred`; ``stream=True``:
    ``handler(call)`` reads with ``call.recv()`` and writes with ``call.send()``. ``decode`` turns a
    message's bytes into the handler's request (a protobuf error there is INTERNAL, "Failed to parse")."""

    __slots__ = ("decode", "handler", "stream", "category", "deferred")

    def __init__(self, decode: Callable[[Any], Any], handler: Callable[..., Any], stream: bool = False,
                 category: str = "", deferred: bool = False) -> None:
        self.decode, self.handler, self.stream, self.category = decode, handler, stream, category
        self.deferred = deferred


class Call:
    """One stream: the request's metadata, its messages in, replies out."""

    __slots__ = ("conn", "sid", "method", "headers", "encoding", "send_window", "out", "out_end", "task",
                 "inbox", "buf", "need", "closed_remote", "closed", "started", "recv_credit", "deadline",
                 "drained", "reset", "flag", "born", "on_message")

    def __init__(self, conn: Connection, sid: int, method: Method | None, headers: list, encoding: str) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.headers = headers
        self.encoding = encoding
        self.send_window = conn.peer_initial_window
        self.out: list[memoryview] = []  # DATA payload waiting for flow-control credit
        self.out_end: bytes | None = None  # the trailers block, sent once ``out`` is empty
        self.task: asyncio.Task | None = None
        self.inbox: asyncio.Queue | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the message being assembled (-1: waiting for its prefix)
        self.closed_remote = False
        self.closed = False
        self.started = False  # response headers sent
        self.recv_credit = 0
        self.deadline: asyncio.TimerHandle | None = None
        self.drained: asyncio.Future | None = None
        self.reset = False
        self.flag = 0
        self.born = time.perf_counter_ns()  # its HEADERS came (a trace's GRPC_WAITREAD_START)
        #: a streaming handler's synchronous taker of request messages (see Connection._deliver), else None
        self.on_message: Callable[[Any], None] | None = None

    def metadata(self, key: str) -> str | None:
        """The value of a request header (lower-case key), None when absent."""
        for k, v in self.headers:
            if k == key:
                return v
        return None

    async def recv(self) -> Any:
        """The next request message (decoded), None at the end of the request stream."""
        item = await self.inbox.get()
        if self.recv_credit >= WINDOW >> 2:  # credit held back while the inbox was full (Connection._on_data)
            self.conn.credit_stream(self)
        if item is None:
            return None
        return await self.conn.decode(self, *item)

    async def send(self, reply: Any) -> None:
        """Send one reply message; waits while flow control holds more than a window of this stream."""
        if self.closed:
            raise asyncio.CancelledError()
        await self.conn.send_message(self, reply)
        if self.out and not self.closed:
            # One future for every writer waiting on this stream (ModelStreamInfer has two).
            if self.drained is None or self.drained.done():
                self.drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.drained)


class Connection(asyncio.Protocol):
    """One client connection: frames in, calls dispatched, frames out."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.methods = server.methods
        self.max_message = server.max_message_size
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.want = 0
        self.preface = False
        self.calls: dict[int, Call] = {}
        self.last_sid = 0
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.block_cache: dict[bytes, list] = {}
        self.table_sig: tuple = (0, None, self.decoder.header_table.maxsize)
        self.partial: tuple[int, int, bytearray] | None = None  # (sid, flags, block) awaiting CONTINUATION
        self.peer_initial_window = _DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.send_window = _DEFAULT_WINDOW
        self.recv_window = WINDOW  # what the peer may still send on the connection
        self.recv_unacked = 0
        self.buffered = 0  # bytes of messages still being assembled, over all calls
        self.paused = False
        self.blocked: dict[int, Call] = {}  # calls with data waiting for connection credit or resume
        self.going_away = False
        self.closing = False
        self.keepalive: asyncio.TimerHandle | None = None
        self.ping_wait: asyncio.TimerHandle | None = None
        #: ``Call.task`` of a deferred call answered at once: a done future (a second message is refused)
        self.started: asyncio.Future = self.loop.create_future()
        self.started.set_result(None)
        self.corked: list | None = None  # writes held until a batch's takers have run (cork)

    # -- writing -----------------------------------------------------------------------------------
    # Answers that a batch's takers write (kernel.model.RequestFuture.after_takers) are held and leave in
    # one write once they all have: one system call, and one wake-up of the client, per batch.
    def _write(self, *parts: bytes | memoryview) -> None:
        corked = self.corked
        if corked is not None:
            corked.extend(parts)
        elif len(parts) == 1:
            self.transport.write(parts[0])
        else:
            self.transport.writelines(parts)

    def cork(self, future: asyncio.Future) -> None:
        """Hold this connection's writes until the takers ``future``'s answer came with have run, where
        the future can say when that is (a core request's); else nothing changes."""
        if self.corked is None:
            after = getattr(future, "after_takers", None)
            if after is not None and after(self.uncork):
                self.corked = []

    def uncork(self) -> None:
        corked, self.corked = self.corked, None
        if corked and self.transport is not None and not self.transport.is_closing():
            if len(corked) > 1 and sum(len(c) for c in corked) < 65536:  # small: one copy, one write
                corked = [b"".join(corked)]
            self._write(*corked)

    def _close(self) -> None:
        self.uncork()
        self.transport.close()

    # -- connection ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        s = SettingsFrame(0)
        s.settings = {SettingsFrame.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
                      SettingsFrame.INITIAL_WINDOW_SIZE: WINDOW, SettingsFrame.MAX_FRAME_SIZE: MAX_FRAME,
                      SettingsFrame.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
        transport.write(s.serialize() + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - _DEFAULT_WINDOW)))
        self._arm_keepalive()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        for h in (self.keepalive, self.ping_wait):
            if h is not None:
                h.cancel()
        for call in list(self.calls.values()):
            self._abandon(call)
        self.calls.clear()
        self.server.check_idle()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for call in list(self.blocked.values()):
            self._flush(call)

    def _arm_keepalive(self) -> None:
        if self.server.keepalive_time:
            self.keepalive = self.loop.call_later(self.server.keepalive_time, self._ping)

    def _ping(self) -> None:
        if self.closing:
            return
        self._write(_frame(PING, 0, 0, b"keepaliv"))
        self.ping_wait = self.loop.call_later(self.server.keepalive_timeout, self._ping_timeout)

    def _ping_timeout(self) -> None:
        log.info("gRPC keepalive: no PING ACK within %.0f s, closing the connection", self.server.keepalive_timeout)
        self.close_connection(NO_ERROR, b"keepalive timeout")

    def goaway(self, code: int = NO_ERROR, debug: bytes = b"") -> None:
        """Tell the peer that no stream after ``last_sid`` will be handled."""
        if not self.going_away and not self.closing:
            self.going_away = True
            self._write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, code) + debug))
        self.maybe_close()

    def maybe_close(self) -> None:
        if self.going_away and not self.calls and not self.closing:
            self.closing = True
            self._close()

    def close_connection(self, code: int, debug: bytes = b"") -> None:
        """A connection error: GOAWAY with ``code``, then close (calls are cancelled)."""
        if self.closing:
            return
        self._write(_frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, code) + debug))
        self.closing = True
        self._close()
        self.buf.clear()

    # -- frames in -------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.want:  # a big frame still arriving: no parse, no copy
                return
            data = bytes(buf)
            buf.clear()
        if not self.preface:
            if len(data) < 24:
                if not PREFACE.startswith(data):
                    self.closing = True
                    self._close()
                    return
                self.buf += data
                self.want = 24
                return
            if data[:24] != PREFACE:
                self.closing = True
                self._close()
                return
            self.preface = True
            data = data[24:]
        view = memoryview(data)
        pos, end = 0, len(data)
        self.want = 9
        unpack = _HDR.unpack_from
        while end - pos >= 9:
            lt, flags, sid = unpack(data, pos)
            length = lt >> 8
            if length > MAX_FRAME:
                self.close_connection(FRAME_SIZE_ERROR, b"frame too large")
                return
            if end - pos - 9 < length:
                self.want = 9 + length
                break
            start = pos + 9
            pos = start + length
            ftype = lt & 0xFF
            sid &= 0x7FFFFFFF
            try:
                if self.partial is not None and ftype != CONTINUATION:
                    raise _ConnError(PROTOCOL_ERROR, b"expected CONTINUATION")
                if ftype == DATA:
                    self._on_data(view[start:pos], flags, sid, length)
                elif ftype == HEADERS:
                    self._on_headers(view[start:pos], flags, sid)
                elif ftype == WINDOW_UPDATE:
                    self._on_window_update(data, start, length, sid)
                elif ftype == PING:
                    if length != 8 or sid:
                        raise _ConnError(FRAME_SIZE_ERROR if length != 8 else PROTOCOL_ERROR, b"bad PING")
                    if not flags & ACK:
                        self._write(_frame(PING, ACK, 0, bytes(view[start:pos])))
                    elif self.ping_wait is not None:
                        self.ping_wait.cancel()
                        self.ping_wait = None
                        self._arm_keepalive()
                elif ftype == SETTINGS:
                    self._on_settings(view[start:pos], flags, sid)
                elif ftype == RST_STREAM:
                    if length != 4 or not sid:
                        raise _ConnError(FRAME_SIZE_ERROR if length != 4 else PROTOCOL_ERROR, b"bad RST_STREAM")
                    if sid > self.last_sid:
                        raise _ConnError(PROTOCOL_ERROR, b"RST_STREAM on an idle stream")
                    call = self.calls.get(sid)
                    if call is not None:
                        call.reset = True
                        self._abandon(call)
                        self._forget(call)
                elif ftype == CONTINUATION:
                    self._on_continuation(view[start:pos], flags, sid)
                elif ftype == GOAWAY:
                    self.going_away = True  # the peer starts no new stream; ours finish
                    self.maybe_close()
                elif ftype == PRIORITY:
                    if length != 5 or not sid:
                        raise _ConnError(FRAME_SIZE_ERROR if length != 5 else PROTOCOL_ERROR, b"bad PRIORITY")
                elif ftype == PUSH_PROMISE:
                    raise _ConnError(PROTOCOL_ERROR, b"PUSH_PROMISE from a client")
                # unknown frame types are ignored (RFC 9113 section 4.1)
            except _ConnError as e:
                self.close_connection(e.code, e.debug)
                return
            if self.closing:
                return
        if pos < end:
            self.buf += view[pos:]
        self.credit_connection()

    def credit_connection(self) -> None:
        """Give the peer back connection credit for what was processed, unless partial messages already
        hold ``max_buffered`` bytes: many big messages arriving at once wait instead of filling memory."""
        if self.recv_unacked >= WINDOW >> 2 and self.buffered <= self.server.max_buffered and not self.closing:
            self._write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.recv_unacked)))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def _on_settings(self, payload: memoryview, flags: int, sid: int) -> None:
        if sid:
            raise _ConnError(PROTOCOL_ERROR, b"SETTINGS on a stream")
        if flags & ACK:
            if len(payload):
                raise _ConnError(FRAME_SIZE_ERROR, b"SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnError(FRAME_SIZE_ERROR, b"SETTINGS length")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == SettingsFrame.INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnError(FLOW_CONTROL_ERROR, b"INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in list(self.calls.values()):
                    call.send_window += delta
                    if delta > 0:
                        self._flush(call)
            elif key == SettingsFrame.MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise _ConnError(PROTOCOL_ERROR, b"MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == SettingsFrame.ENABLE_PUSH and value > 1:
                raise _ConnError(PROTOCOL_ERROR, b"ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: our blocks never use the dynamic table; the others do not bind a server.
        self._write(_frame(SETTINGS, ACK, 0))

    def _on_window_update(self, data: bytes, start: int, length: int, sid: int) -> None:
        if length != 4:
            raise _ConnError(FRAME_SIZE_ERROR, b"WINDOW_UPDATE length")
        inc = int.from_bytes(data[start:start + 4], "big") & 0x7FFFFFFF
        if not sid:
            if inc == 0:
                raise _ConnError(PROTOCOL_ERROR, b"WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > _MAX_WINDOW:
                raise _ConnError(FLOW_CONTROL_ERROR, b"connection window overflow")
            for call in list(self.blocked.values()):
                self._flush(call)
                if self.send_window <= 0:
                    break
            return
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_sid:
                raise _ConnError(PROTOCOL_ERROR, b"WINDOW_UPDATE on an idle stream")
            return
        if inc == 0:
            self._reset(call, PROTOCOL_ERROR)
            return
        call.send_window += inc
        if call.send_window > _MAX_WINDOW:
            self._reset(call, FLOW_CONTROL_ERROR)
            return
        if call.out or call.out_end is not None:
            self._flush(call)

    def _on_headers(self, payload: memoryview, flags: int, sid: int) -> None:
        if flags & (PADDED | F_PRIORITY):
            skip = 0
            pad = 0
            if flags & PADDED:
                if not len(payload):
                    raise _ConnError(PROTOCOL_ERROR, b"bad padding")
                pad = payload[0]
                skip = 1
            if flags & F_PRIORITY:
                skip += 5
            if skip + pad > len(payload):
                raise _ConnError(PROTOCOL_ERROR, b"bad padding")
            payload = payload[skip:len(payload) - pad]
        if not flags & END_HEADERS:
            self.partial = (sid, flags, bytearray(payload))
            return
        self._headers_complete(bytes(payload), flags, sid)

    def _on_continuation(self, payload: memoryview, flags: int, sid: int) -> None:
        if self.partial is None or self.partial[0] != sid:
            raise _ConnError(PROTOCOL_ERROR, b"unexpected CONTINUATION")
        block = self.partial[2]
        block += payload
        if len(block) > MAX_HEADER_LIST:
            raise _ConnError(ENHANCE_YOUR_CALM, b"header block too large")
        if flags & END_HEADERS:
            hflags = self.partial[1]
            self.partial = None
            self._headers_complete(bytes(block), hflags, sid)

    def _decode_block(self, block: bytes) -> tuple:
        """``(headers, path, method, content-type, grpc-encoding, grpc-timeout)`` of ``block``, decoded
        once per distinct block while the hpack table stands."""
        entry = self.block_cache.get(block)
        if entry is not None:
            return entry
        try:
            headers = self.decoder.decode(block)
        except HPACKError as e:
            raise _ConnError(COMPRESSION_ERROR, str(e).encode()[:200]) from None
        path = method = content_type = timeout = None
        encoding = "identity"
        for k, v in headers:
            if k == ":path":
                path = v
            elif k == ":method":
                method = v
            elif k == "content-type":
                content_type = v
            elif k == "grpc-encoding":
                encoding = v
            elif k == "grpc-timeout":
                timeout = v
        entry = (headers, path, method, content_type, encoding, timeout)
        table = self.decoder.header_table
        entries = table.dynamic_entries
        sig = (len(entries), id(entries[0]) if entries else None, table.maxsize)
        if sig != self.table_sig:  # the block changed the table: earlier blocks may mean something else now
            self.table_sig = sig
            self.block_cache.clear()
        elif len(self.block_cache) < 64:
            self.block_cache[block] = entry
        return entry

    def _headers_complete(self, block: bytes, flags: int, sid: int) -> None:
        # Always decoded (or found in the cache), even for a stream refused below: the hpack state must
        # follow the peer's.
        headers, path, method, content_type, encoding, timeout = self._decode_block(block)
        if not sid or not sid & 1:
            raise _ConnError(PROTOCOL_ERROR, b"HEADERS on an invalid stream id")
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: only allowed to end the request
            if not flags & END_STREAM:
                self._reset(call, PROTOCOL_ERROR)
                return
            self._end_remote(call)
            return
        if sid <= self.last_sid:
            raise _ConnError(STREAM_CLOSED, b"HEADERS on a closed stream")
        self.last_sid = sid
        if self.going_away:
            self._write(_frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        if len(self.calls) >= self.server.max_concurrent_streams:
            self._write(_frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
            return
        call = Call(self, sid, None, headers, "identity")
        self.calls[sid] = call
        if flags & END_STREAM:
            call.closed_remote = True
        if method != "POST" or path is None:
            self._respond_http(call, "405" if method not in (None, "POST") else "400")
            return
        if content_type is None or not content_type.startswith("application/grpc"):
            self._respond_http(call, "415")
            return
        m = self.methods.get(path)
        if m is None:
            self.finish(call, UNIMPLEMENTED, f"Method not found: {path.lstrip('/')}")
            return
        call.method = m
        if encoding not in _ENCODINGS:
            self.finish(call, UNIMPLEMENTED, f"Compression algorithm '{encoding}' is not supported; "
                                             f"accepted: {_ACCEPT}")
            return
        call.encoding = encoding
        if m.category:
            restricted = self.server.restrictions
            if restricted:
                key = restricted.refusal(m.category, call.metadata)
                if key is not None:
                    self.finish(call, UNAVAILABLE, self.server.restricted_message(key))
                    return
        if timeout is not None:
            seconds = parse_timeout(timeout)
            if seconds is None:
                self.finish(call, INTERNAL, f"Invalid grpc-timeout: {timeout}")
                return
            if seconds <= 0:
                self.finish(call, DEADLINE_EXCEEDED, "Deadline Exceeded")
                return
            call.deadline = self.loop.call_later(seconds, self._deadline, call)
        if m.stream:
            call.inbox = asyncio.Queue()
            call.task = self.loop.create_task(self._run_stream(call))
            if call.closed_remote:
                call.inbox.put_nowait(None)
        elif call.closed_remote:  # a unary call without its message
            self.finish(call, INTERNAL, "the call ended without its request message")

    def _on_data(self, payload: memoryview, flags: int, sid: int, length: int) -> None:
        # Flow control counts the whole frame, padding included (RFC 9113 section 6.9.1).
        self.recv_window -= length
        if self.recv_window < 0:
            raise _ConnError(FLOW_CONTROL_ERROR, b"connection window exceeded")
        self.recv_unacked += length
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise _ConnError(PROTOCOL_ERROR, b"bad padding")
            payload = payload[1:length - payload[0]]
        call = self.calls.get(sid)
        if call is None or call.closed_remote:
            if not sid or sid > self.last_sid:
                raise _ConnError(PROTOCOL_ERROR, b"DATA on an idle stream")
            if call is not None:
                self._reset(call, STREAM_CLOSED)
            # else: a stream this server ended or reset; frames in flight are ignored (RFC 9113 5.4.2)
            return
        if call.method is not None:
            call.recv_credit += length
            self._messages(call, payload)
        if flags & END_STREAM:
            self._end_remote(call)
        if call.recv_credit >= WINDOW >> 2 and (call.inbox is None or call.inbox.qsize() < 8):
            self.credit_stream(call)

    def credit_stream(self, call: Call) -> None:
        if call.recv_credit and not call.closed_remote and not call.closed:
            self._write(_frame(WINDOW_UPDATE, 0, call.sid, struct.pack(">I", call.recv_credit)))
        call.recv_credit = 0

    def _messages(self, call: Call, payload: memoryview) -> None:
        """Assemble gRPC messages from DATA payload; each complete one goes to its handler."""
        while payload:
            if call.need < 0:
                buf = call.buf
                if not buf and len(payload) >= 5:
                    flag, n = _PREFIX.unpack_from(payload)
                    payload = payload[5:]
                else:
                    take = 5 - len(buf)
                    buf += payload[:take]
                    payload = payload[take:]
                    if len(buf) < 5:
                        return
                    flag, n = _PREFIX.unpack_from(buf)
                    buf.clear()
                if n > self.max_message:  # checked before anything is buffered
                    self.finish(call, RESOURCE_EXHAUSTED,
                                f"Received message larger than max ({n} vs. {self.max_message})")
                    return
                if flag > 1:
                    self.finish(call, INTERNAL, f"invalid gRPC message compression flag {flag}")
                    return
                if flag and call.encoding == "identity":
                    self.finish(call, INTERNAL, "a compressed message without grpc-encoding")
                    return
                call.need = n
                call.flag = flag
                if len(payload) >= n and not call.buf:
                    message = payload[:n]
                    payload = payload[n:]
                    call.need = -1
                    self._deliver(call, bytes(message), flag)
                    if call.closed:
                        return
                    continue
            take = call.need - len(call.buf)
            piece = payload[:take]
            call.buf += piece
            self.buffered += len(piece)
            payload = payload[take:]
            if len(call.buf) == call.need:
                message = call.buf  # handed over whole: no copy of a big message
                self.buffered -= len(message)
                call.buf = bytearray()
                call.need = -1
                self._deliver(call, message, call.flag)
                if call.closed:
                    return

    def _deliver(self, call: Call, message: bytes | bytearray, flag: int) -> None:
        if call.method.stream:
            take = call.on_message
            if take is not None and call.encoding == "identity" and call.inbox.empty():
                # Handed over here, in data_received, as a unary request is (_run_deferred): no task wake-up
                # per message. Only behind an empty inbox, so that messages keep their order; a message
                # that does not parse goes the inbox's way, where the handler's recv() raises its error.
                try:
                    request = call.method.decode(message)
                except Exception:  # noqa: BLE001 - reported by recv(), below
                    pass
                else:
                    try:
                        take(request)
                    except Exception as e:  # noqa: BLE001 - a bug costs the call, never the connection
                        self._end_with(call, e)
                    return
            call.inbox.put_nowait((message, flag))
        elif call.task is None:
            if call.method.deferred and not flag and call.encoding == "identity":
                self._run_deferred(call, message)
            else:
                call.task = self.loop.create_task(self._run_unary(call, message, flag))
        else:
            self.finish(call, UNIMPLEMENTED, "a unary call with more than one request message")

    def _end_remote(self, call: Call) -> None:
        call.closed_remote = True
        if call.need >= 0 or call.buf:
            self.finish(call, INTERNAL, "the request ended inside a message")
        elif call.inbox is not None:
            call.inbox.put_nowait(None)
        elif call.task is None and call.method is not None and not call.closed:
            self.finish(call, INTERNAL, "the call ended without its request message")
        if call.closed:
            self._forget(call)

    # -- calls -----------------------------------------------------------------------------------------
    async def decode(self, call: Call, message: bytes | bytearray, flag: int) -> Any:
        """A request message's bytes, decompressed within the size limit, as the handler's request."""
        if flag:
            if len(message) >= _OFFLOAD:
                message = await self.loop.run_in_executor(None, _inflate, message, call.encoding, self.max_message)
            else:
                message = _inflate(message, call.encoding, self.max_message)
        return self._parse(call, message)

    @staticmethod
    def _parse(call: Call, message: bytes | bytearray) -> Any:
        try:
            return call.method.decode(message)
        except Exception as e:  # protobuf's DecodeError and the fast decoders' IndexError/ValueError
            raise GrpcError(INTERNAL, f"Failed to parse request: {e or type(e).__name__}") from None

    def _end_with(self, call: Call, e: Exception) -> None:
        """End ``call`` with the status its handler's exception stands for."""
        if isinstance(e, GrpcError):
            self.finish(call, e.status, e.message)
        else:  # a bug costs one call, never the connection
            log.error("unhandled error in %s", call.metadata(":path"), exc_info=e)
            self.finish(call, INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def _run_deferred(self, call: Call, message: bytes | bytearray) -> None:
        """A deferred unary call, uncompressed both ways: handled now, answered from its future's callback.

        The message's DATA frame may still carry END_STREAM, handled after this returns: what is known
        at once (a reply, an error) is sent on the next turn of the loop, as a task's would be."""
        call.task = self.started
        try:
            answer = call.method.handler(self._parse(call, message), call)
        except Exception as e:
            self.loop.call_soon(self._end_with, call, e)
            return
        if isinstance(answer, Deferred):
            call.task = answer.future
            when_done(answer.future, lambda future: self._deferred_done(call, answer.finish, future))
        else:
            self.loop.call_soon(self._reply, call, answer)

    def _deferred_done(self, call: Call, finish: Callable[[asyncio.Future], bytes], future: asyncio.Future) -> None:
        self.cork(future)
        if future.cancelled():
            self.finish(call, CANCELLED, "Cancelled")  # reset or deadline: nothing goes out
            return
        try:
            reply = finish(future)  # releases what the answer held, even for a call ended meanwhile
        except Exception as e:
            self._end_with(call, e)
            return
        self._reply(call, reply)

    def _reply(self, call: Call, reply: Any) -> None:
        """Send a unary call's reply, uncompressed, with its trailers."""
        if call.closed:
            return
        try:
            self.send_data(call, reply if isinstance(reply, (bytes, bytearray)) else reply.SerializeToString(), 0, True)
        except GrpcError as e:
            self.finish(call, e.status, e.message)

    async def _run_unary(self, call: Call, message: bytes | bytearray, flag: int) -> None:
        try:
            # no coroutine for the common case
            request = await self.decode(call, message, flag) if flag else self._parse(call, message)
            if call.method.deferred:  # compressed: the answer is awaited here, then compressed
                answer = call.method.handler(request, call)
                if isinstance(answer, Deferred):
                    try:
                        await answer.future  # cancelling this task cancels the request with it
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - finish() turns it into the call's status
                        pass
                    answer = answer.finish(answer.future)
                reply = answer
            else:
                reply = await call.method.handler(request, call)
            if call.encoding == "identity":
                self._reply(call, reply)
            elif not call.closed:
                await self.send_message(call, reply, end=True)
        except asyncio.CancelledError:
            self.finish(call, CANCELLED, "Cancelled")  # reset or deadline: nothing goes out
        except Exception as e:
            self._end_with(call, e)

    async def _run_stream(self, call: Call) -> None:
        try:
            await call.method.handler(call)
        except asyncio.CancelledError:
            self.finish(call, CANCELLED, "Cancelled")
        except Exception as e:
            self._end_with(call, e)
        else:
            self.finish(call, OK, "")

    def _deadline(self, call: Call) -> None:
        call.deadline = None
        self.finish(call, DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def send_message(self, call: Call, reply: Any, end: bool = False) -> None:
        """Queue one reply (bytes or a protobuf message); ``end`` adds the OK trailers."""
        data = reply if isinstance(reply, (bytes, bytearray)) else reply.SerializeToString()
        n = len(data)
        if n > self.max_message:
            raise GrpcError(RESOURCE_EXHAUSTED, f"Sent message larger than max ({n} vs. {self.max_message})")
        flag = 0
        if call.encoding != "identity":
            flag = 1
            if n >= _OFFLOAD:
                data = await self.loop.run_in_executor(None, _deflate, data, call.encoding)
            else:
                data = _deflate(data, call.encoding)
            if call.closed:
                return
        self.send_data(call, data, flag, end)

    def send_data(self, call: Call, data: Any, flag: int, end: bool) -> None:
        """Queue one serialised (and maybe compressed) message; the hot path writes it all at once."""
        n = len(data)
        if n > self.max_message and not flag:
            raise GrpcError(RESOURCE_EXHAUSTED, f"Sent message larger than max ({n} vs. {self.max_message})")
        sid = call.sid
        size = n + 5
        if (not call.started and end and not call.out and not self.paused and size <= self.peer_max_frame
                and size <= call.send_window and size <= self.send_window):
            # The hot path: headers, message and trailers in one write.
            head = _RESPONSE_HEADERS[call.encoding]
            call.started = True
            call.send_window -= size
            self.send_window -= size
            self._write(b"".join((
                _HDR.pack(len(head) << 8 | HEADERS, END_HEADERS, sid), head,
                _HDR.pack(size << 8 | DATA, 0, sid), _PREFIX.pack(flag, n), data,
                _HDR.pack(len(_OK_TRAILERS) << 8 | HEADERS, END_HEADERS | END_STREAM, sid), _OK_TRAILERS)))
            self._closed_local(call)
            return
        call.out.append(memoryview(_PREFIX.pack(flag, n) + data if n < 65536 else _PREFIX.pack(flag, n)))
        if n >= 65536:
            call.out.append(memoryview(data))
        if end:
            call.out_end = _OK_TRAILERS
        self._flush(call)

    def finish(self, call: Call, status: int, message: str) -> None:
        """End the call with ``status``: Trailers-Only when nothing was sent yet, else after its data."""
        if call.closed or call.out_end is not None:
            return
        if status == OK:
            block = _OK_TRAILERS
        else:
            block = _error_block(status, message, not call.started)
        if not call.started:
            call.started = True
            if status == OK:
                block = _RESPONSE_HEADERS[call.encoding] + _OK_TRAILERS
            self._write(_HDR.pack(len(block) << 8 | HEADERS, END_HEADERS | END_STREAM, call.sid) + block)
            self._closed_local(call)
            return
        call.out_end = block
        self._flush(call)

    def _respond_http(self, call: Call, status: str) -> None:
        """A plain HTTP answer to a request that is not gRPC (gRPC's PROTOCOL-HTTP2.md asks for 415)."""
        block = _stateless_block([(":status", status), ("content-type", "text/plain")])
        call.started = True
        self._write(_HDR.pack(len(block) << 8 | HEADERS, END_HEADERS | END_STREAM, call.sid) + block)
        self._closed_local(call)

    def _flush(self, call: Call) -> None:
        """Send what flow control allows of ``call``'s queued data, then its trailers."""
        if self.closing or call.closed:
            return
        if self.paused:
            self.blocked[call.sid] = call
            return
        sid = call.sid
        frames: list = []
        if not call.started:
            call.started = True
            head = _RESPONSE_HEADERS[call.encoding]
            frames += (_HDR.pack(len(head) << 8 | HEADERS, END_HEADERS, sid), head)
        out = call.out
        sent = 0
        while out:
            allowed = min(call.send_window, self.send_window, self.peer_max_frame)
            if allowed <= 0 or sent >= (4 << 20):  # at most 4 MiB per turn: other streams get theirs
                break
            chunk = out[0]
            if len(chunk) > allowed:
                piece, out[0] = chunk[:allowed], chunk[allowed:]
            else:
                piece = out.pop(0)
            size = len(piece)
            call.send_window -= size
            self.send_window -= size
            sent += size
            frames += (_HDR.pack(size << 8 | DATA, 0, sid), piece)
        done = not out and call.out_end is not None
        if done:
            block, call.out_end = call.out_end, None
            frames += (_HDR.pack(len(block) << 8 | HEADERS, END_HEADERS | END_STREAM, sid), block)
        if frames:
            self._write(*frames)
        if out:
            self.blocked[sid] = call
            if sent and call.send_window > 0 and self.send_window > 0 and not self.paused:
                self.loop.call_soon(self._flush, call)  # the 4 MiB turn ended: continue after others
        else:
            self.blocked.pop(sid, None)
            if call.drained is not None and not call.drained.done():
                call.drained.set_result(None)
        if done:
            self._closed_local(call)

    def _closed_local(self, call: Call) -> None:
        """The response is complete: the call is over (RST_STREAM NO_ERROR asks the client to stop sending)."""
        call.closed = True
        if not call.closed_remote and not self.closing:
            self._write(_frame(RST_STREAM, 0, call.sid, struct.pack(">I", NO_ERROR)))
        self._abandon(call)
        self._forget(call)

    def _reset(self, call: Call, code: int) -> None:
        if not self.closing:
            self._write(_frame(RST_STREAM, 0, call.sid, struct.pack(">I", code)))
        self._abandon(call)
        self._forget(call)

    def _abandon(self, call: Call) -> None:
        """Stop a call's work: its handler is cancelled (so is the request it waits on)."""
        call.closed = True
        if call.deadline is not None:
            call.deadline.cancel()
            call.deadline = None
        task = call.task
        if task is not None and not task.done() and task is not asyncio.current_task(self.loop):
            task.cancel()
        if call.drained is not None and not call.drained.done():
            call.drained.cancel()
        call.out.clear()
        if call.need >= 0 and call.buf:
            self.buffered -= len(call.buf)
            call.buf = bytearray()
            call.need = -1
            if not self.closing:
                self.credit_connection()

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.sid, None)
        self.blocked.pop(call.sid, None)
        if not self.calls:
            if self.going_away:
                self.maybe_close()
            self.server.check_idle()


class _ConnError(Exception):
    def __init__(self, code: int, debug: bytes) -> None:
        self.code, self.debug = code, debug


class GrpcServer:
    """Listens and serves ``methods`` (``{"/package.Service/Method": Method}``).

    Memory per connection stays bounded: a message's size is checked at its prefix, a response goes
    out as the peer's windows allow, and partial request messages hold at most ``max_buffered``
    bytes (plus one 16 MiB connection window) before the peer is made to wait.
    """

    def __init__(self, methods: dict[str, Method], max_message_size: int = 64 << 20, *,
                 max_concurrent_streams: int = 1000, keepalive_time: float = 7200.0,
                 keepalive_timeout: float = 20.0, max_buffered: int = 256 << 20, restrictions: Any = None,
                 restricted_message: Callable[[str], str] = str) -> None:
        self.methods = methods
        self.max_message_size = max_message_size
        self.max_concurrent_streams = max_concurrent_streams
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.max_buffered = max_buffered
        self.restrictions = restrictions
        self.restricted_message = restricted_message
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._idle: asyncio.Event | None = None

    async def start(self, host: str, port: int, reuse_address: bool = True, reuse_port: bool = False,
                    tls: ssl.SSLContext | None = None) -> None:
        """Listen; ``reuse_port``: with SO_REUSEPORT, so that several servers share the port; ``tls``: over TLS
        (the context offers h2 by ALPN)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, reuse_address=reuse_address,
                                                reuse_port=reuse_port or None, ssl=tls)

    @property
    def sockets(self) -> Any:
        return self._server.sockets if self._server is not None else ()

    def close(self) -> None:
        """Stop listening; every connection gets GOAWAY and closes once its calls have finished."""
        if self._server is not None:
            self._server.close()
        self._idle = asyncio.Event()
        for conn in list(self.connections):
            conn.goaway()
        self.check_idle()

    def check_idle(self) -> None:
        if self._idle is not None and not any(c.calls for c in self.connections):
            self._idle.set()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for in-flight calls (up to ``timeout`` seconds), then close every connection."""
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("gRPC: calls still in flight after %.0f s; closing their connections", timeout)
        for conn in list(self.connections):
            if not conn.closing:
                conn.closing = True
                conn._close()
        if self._server is not None:
            await self._server.wait_closed()
