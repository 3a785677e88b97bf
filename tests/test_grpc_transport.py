"""The HTTP/2 side of protocol.grpc.server, with test handlers on an in-process server.

A raw-frame client (tests/h2client.py) breaks the rules on purpose; grpcio checks that the rules are
followed. Triton behaviours over the real server are in tests/test_grpc.py.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import struct
import threading
import time
import zlib

import grpc
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from protocol.grpc import server as grpcserver
from protocol.grpc.server import GrpcError, GrpcServer, Method
from tests.h2client import PREFACE, H2Client
from tests.support import free_port

BIG = 64 << 20


class Harness:
    """A GrpcServer with test methods on its own event loop thread."""

    def __init__(self, **options) -> None:
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server = GrpcServer(self._methods(), BIG, **options)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start("127.0.0.1", self.port))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def _methods(self) -> dict[str, Method]:
        async def echo(request: bytes, call) -> bytes:
            return request

        async def big(request: bytes, call) -> bytes:
            return b"x" * int(request)

        async def slow(request: bytes, call) -> bytes:
            self.started.set()
            try:
                await asyncio.sleep(float(request or b"30"))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return b"done"

        async def fail(request: bytes, call) -> bytes:
            raise GrpcError(grpcserver.NOT_FOUND, "nothing here: 100% sure, \u00e9t\u00e9")

        async def bug(request: bytes, call) -> bytes:
            raise RuntimeError("a bug")

        async def stream(call) -> None:
            while (message := await call.recv()) is not None:
                await call.send(message)

        async def two_writers(call) -> None:
            """Two tasks sending on one stream at once (as a handler may)."""
            await call.recv()

            async def writer(tag: bytes) -> None:
                for i in range(3):
                    await call.send(tag * 40000 + b"%d" % i)

            await asyncio.gather(writer(b"a"), writer(b"b"))

        loop = self.loop

        def later(request: bytes, call) -> grpcserver.Deferred:
            """Deferred: answered by the future's callback after ``request`` seconds ("fail": with an error)."""
            future = loop.create_future()
            self.started.set()
            timer = loop.call_later(float(request.split(b":")[-1] or b"30"), future.set_result, request)
            future.add_done_callback(lambda f: (timer.cancel(), f.cancelled() and self.cancelled.set()))
            return grpcserver.Deferred(future, finish)

        def finish(future: asyncio.Future) -> bytes:
            if future.result().startswith(b"fail"):
                raise GrpcError(grpcserver.FAILED_PRECONDITION, "it failed later")
            return b"later " + future.result()

        def now(request: bytes, call) -> bytes:
            if request == b"refuse":
                raise GrpcError(grpcserver.INVALID_ARGUMENT, "refused at once")
            if request == b"bug":
                raise RuntimeError("a bug at once")
            return b"now " + request

        return {"/t.T/Later": Method(bytes, later, deferred=True), "/t.T/Now": Method(bytes, now, deferred=True),
                "/t.T/Two": Method(bytes, two_writers, stream=True),
                "/t.T/Echo": Method(bytes, echo), "/t.T/Big": Method(bytes, big), "/t.T/Slow": Method(bytes, slow),
                "/t.T/Fail": Method(bytes, fail), "/t.T/Bug": Method(bytes, bug),
                "/t.T/Stream": Method(bytes, stream, stream=True)}

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def shut() -> None:
            self.server.close()
            await self.server.wait_closed(5)

        try:
            self.run(shut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()


def echo_ok(port: int) -> None:
    """The server still answers a well-behaved client."""
    c = H2Client(port)
    try:
        s = c.wait(c.call("/t.T/Echo", b"ping"))
        assert s.status == 0 and s.messages() == [(0, b"ping")]
    finally:
        c.close()


def rpc(port: int, method: str, request: bytes, **kwargs) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1),
                                                             ("grpc.max_send_message_length", -1)]) as ch:
        return ch.unary_unary(method)(request, **kwargs)


# -- the wire rules, as grpcio sees them ------------------------------------------------------------------
def test_grpcio_unary_stream_and_errors(harness):
    assert rpc(harness.port, "/t.T/Echo", b"hello") == b"hello"
    assert rpc(harness.port, "/t.T/Echo", b"") == b""
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, "/t.T/Fail", b"")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "nothing here: 100% sure, \u00e9t\u00e9"  # percent-encoded on the wire
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, "/t.T/Bug", b"")
    assert e.value.code() == grpc.StatusCode.INTERNAL and "RuntimeError: a bug" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, "/t.T/Nope", b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{harness.port}") as ch:
        call = ch.stream_stream("/t.T/Stream")
        assert list(call(iter([b"a", b"bb", b"ccc"]))) == [b"a", b"bb", b"ccc"]
        assert list(call(iter([]))) == []


def test_error_is_trailers_only(harness):
    c = H2Client(harness.port)
    s = c.wait(c.call("/t.T/Fail", b""))
    # One HEADERS frame: :status, content-type and grpc-status together, no DATA.
    assert s.trailers is None and s.headers[":status"] == "200"
    assert s.headers["content-type"] == "application/grpc" and s.status == grpcserver.NOT_FOUND
    assert s.message == "nothing here: 100%25 sure, %C3%A9t%C3%A9" and not s.data
    c.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compression_both_ways(harness, encoding):
    message = b"abc" * 10000
    packed = gzip.compress(message) if encoding == "gzip" else zlib.compress(message)
    c = H2Client(harness.port)
    s = c.wait(c.call("/t.T/Echo", packed, [("grpc-encoding", encoding)], flag=1))
    assert s.status == 0 and s.headers["grpc-encoding"] == encoding
    [(flag, body)] = s.messages()
    assert flag == 1 and len(body) < len(message)
    assert (gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body)) == message
    # grpcio's channel compression, both algorithms
    algorithm = grpc.Compression.Gzip if encoding == "gzip" else grpc.Compression.Deflate
    assert rpc(harness.port, "/t.T/Echo", message, compression=algorithm) == message
    c.close()


def test_compressed_message_errors(harness):
    c = H2Client(harness.port)
    s = c.wait(c.call("/t.T/Echo", b"not gzip at all", [("grpc-encoding", "gzip")], flag=1))
    assert s.status == grpcserver.INTERNAL and "decompress" in s.message
    s = c.wait(c.call("/t.T/Echo", b"x", [("grpc-encoding", "br")]))
    assert s.status == grpcserver.UNIMPLEMENTED and "'br' is not supported" in s.message
    s = c.wait(c.call("/t.T/Echo", b"x", flag=1))  # compressed flag without grpc-encoding
    assert s.status == grpcserver.INTERNAL
    s = c.wait(c.call("/t.T/Echo", b"x", flag=7))
    assert s.status == grpcserver.INTERNAL and "compression flag" in s.message
    c.close()
    echo_ok(harness.port)


def test_inflating_past_the_limit_is_refused():
    h = Harness()
    try:
        h.server.max_message_size = 1 << 20
        bomb = gzip.compress(bytes(64 << 20))  # 64 KiB that inflate to 64 MiB
        c = H2Client(h.port)
        s = c.wait(c.call("/t.T/Echo", bomb, [("grpc-encoding", "gzip")], flag=1), timeout=30)
        assert s.status == grpcserver.RESOURCE_EXHAUSTED
        c.close()
    finally:
        h.stop()


# -- sizes, flow control -----------------------------------------------------------------------------------
def test_64_mib_both_ways(harness):
    payload = os.urandom(1 << 16) * (BIG >> 16)
    assert rpc(harness.port, "/t.T/Echo", payload) == payload
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, "/t.T/Echo", payload + b"!")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max (67108865 vs. 67108864)" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, "/t.T/Big", str(BIG + 1).encode())
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Sent message larger than max" in e.value.details()


def test_size_limit_checked_at_the_prefix(harness):
    """A prefix declaring 1 GiB is refused at once: nothing of its body is waited for or buffered."""
    c = H2Client(harness.port)
    sid = c.headers("/t.T/Echo")
    c.frame(DataFrame(sid, struct.pack(">BI", 0, 1 << 30)))
    s = c.wait(sid, timeout=5)
    assert s.status == grpcserver.RESOURCE_EXHAUSTED
    assert s.message == f"Received message larger than max ({1 << 30} vs. {BIG})"
    # The rest of the body is ignored (the stream is closed), and the connection serves on.
    c.frame(DataFrame(sid, b"\0" * 16000))
    s = c.wait(c.call("/t.T/Echo", b"after"))
    assert s.messages() == [(0, b"after")]
    c.close()


def test_slow_reader_holds_only_its_own_stream(harness):
    """A 64 MiB answer to a client that reads nothing: other streams go on, the server buffers no more
    than the windows allow, and the answer completes once the client reads."""
    c = H2Client(harness.port)
    slow = c.headers("/t.T/Big")
    c.window_hold.add(slow)
    c.data(slow, struct.pack(">BI", 0, 8) + str(BIG).encode().rjust(8, b"0"))
    c.pump(lambda: len(c.streams[slow].data) >= 65535, timeout=10)
    for i in range(5):
        s = c.wait(c.call("/t.T/Echo", b"other %d" % i))
        assert s.messages() == [(0, b"other %d" % i)]
    assert len(c.streams[slow].data) == 65535  # the default stream window, nothing more

    async def buffered() -> int:
        return sum(conn.transport.get_write_buffer_size() for conn in harness.server.connections)

    assert harness.run(buffered()) < 1 << 20
    c.release(slow)
    c.frame(WindowUpdateFrame(slow, 1 << 30))  # a big window from now on
    s = c.wait(slow, timeout=60)
    assert s.status == 0 and len(s.messages()[0][1]) == BIG
    c.close()


def test_stream_credit_goes_back_in_quarters_of_the_window(harness):
    """A long request stream gets its flow-control credit back a quarter of the window at a time, not with
    every message read (a frame, and a write, per request on a busy stream)."""
    c = H2Client(harness.port)
    try:
        sid = c.headers("/t.T/Stream")
        messages = [b"s" * 1000] * 500 + [b"b" * (256 << 10)] * 40  # 10.5 MiB in all
        s = c.streams[sid]
        echoed = 0
        for m in messages:  # each echo read before the next message goes: the handler reads as data comes
            c.data(sid, struct.pack(">BI", 0, len(m)) + m, end_stream=False)
            echoed += len(m) + 5
            c.pump(lambda n=echoed: len(s.data) >= n)
        c.data(sid, b"", end_stream=True)
        c.wait(sid, timeout=30)
        assert s.status == 0 and [m for _, m in s.messages()] == messages
        credits = c.stream_credits.get(sid, [])
        assert 1 <= len(credits) <= 4, credits
        assert all(n >= grpcserver.WINDOW >> 2 for n in credits), credits
    finally:
        c.close()


def test_client_settings_initial_window_applies(harness):
    """INITIAL_WINDOW_SIZE from the client bounds what is sent before any WINDOW_UPDATE."""
    c = H2Client(harness.port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1000})
    sid = c.headers("/t.T/Big")
    c.window_hold.add(sid)
    c.data(sid, struct.pack(">BI", 0, 6) + b"100000")
    c.pump(lambda: len(c.streams[sid].data) >= 1000, timeout=10)
    time.sleep(0.2)
    c.pump(lambda: True)
    assert len(c.streams[sid].data) == 1000
    c.release(sid)
    c.frame(WindowUpdateFrame(sid, 1 << 20))
    assert c.wait(sid).status == 0
    c.close()


def test_many_concurrent_streams_on_one_connection(harness):
    c = H2Client(harness.port)
    sids = [c.call("/t.T/Echo", b"n%d" % i) for i in range(300)]
    for i, sid in enumerate(sids):
        s = c.wait(sid)
        assert s.status == 0 and s.messages() == [(0, b"n%d" % i)]
    c.close()

    async def many() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{harness.port}") as ch:
            echo = ch.unary_unary("/t.T/Echo")
            return await asyncio.gather(*(echo(b"%d" % i) for i in range(500)))

    assert asyncio.run(many()) == [b"%d" % i for i in range(500)]


def test_max_concurrent_streams_refuses_the_extra_stream():
    h = Harness(max_concurrent_streams=4)
    try:
        c = H2Client(h.port)
        c.pump(lambda: SettingsFrame.MAX_CONCURRENT_STREAMS in c.peer_settings)
        assert c.peer_settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 4
        sids = [c.call("/t.T/Slow", b"0.5") for _ in range(5)]
        assert c.wait(sids[4]).reset == 7  # REFUSED_STREAM: the client may retry it
        for sid in sids[:4]:
            assert c.wait(sid).messages() == [(0, b"done")]
        c.close()
    finally:
        h.stop()


# -- cancellation, deadlines, shutdown, keepalive -------------------------------------------------------
# Slow: a task's coroutine; Later: a Deferred call's future (ModelInfer's path).
@pytest.mark.parametrize("method", ["/t.T/Slow", "/t.T/Later"])
def test_rst_stream_cancels_the_handler(harness, method):
    c = H2Client(harness.port)
    sid = c.call(method, b"30")
    assert harness.started.wait(5)
    c.reset(sid)
    assert harness.cancelled.wait(5), "RST_STREAM did not reach the handler"
    c.close()
    echo_ok(harness.port)


@pytest.mark.parametrize("method", ["/t.T/Slow", "/t.T/Later"])
def test_deadline(harness, method):
    with pytest.raises(grpc.RpcError) as e:
        rpc(harness.port, method, b"30", timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert harness.cancelled.wait(5), "the deadline did not cancel the handler"
    c = H2Client(harness.port)  # a deadline already over when the call arrives
    s = c.wait(c.call("/t.T/Echo", b"x", [("grpc-timeout", "0n")]))
    assert s.status == grpcserver.DEADLINE_EXCEEDED and s.message == "Deadline Exceeded"
    s = c.wait(c.call("/t.T/Echo", b"x", [("grpc-timeout", "soon")]))
    assert s.status == grpcserver.INTERNAL and "grpc-timeout" in s.message
    c.close()


def test_deferred_calls_answer_from_their_futures(harness):
    """ModelInfer's path: no task; the answer leaves from the future's callback, errors as statuses."""
    assert rpc(harness.port, "/t.T/Later", b"0.01") == b"later 0.01"
    assert rpc(harness.port, "/t.T/Now", b"x") == b"now x"
    for method, request, code, text in [("/t.T/Later", b"fail:0", grpc.StatusCode.FAILED_PRECONDITION,
                                         "it failed later"),
                                        ("/t.T/Now", b"refuse", grpc.StatusCode.INVALID_ARGUMENT, "refused at once"),
                                        ("/t.T/Now", b"bug", grpc.StatusCode.INTERNAL, "RuntimeError: a bug at once")]:
        with pytest.raises(grpc.RpcError) as e:
            rpc(harness.port, method, request)
        assert e.value.code() == code and text in e.value.details()
    c = H2Client(harness.port)  # a second message on a unary call is refused, as for a task
    sid = c.headers("/t.T/Later")
    c.data(sid, struct.pack(">BI", 0, 3) + b"0.2", end_stream=False)
    c.data(sid, struct.pack(">BI", 0, 5) + b"again")
    s = c.wait(sid)
    assert s.status == grpcserver.UNIMPLEMENTED and "more than one" in s.message
    c.close()
    # Compressed both ways: the answer is awaited in a task, then compressed.
    with grpc.insecure_channel(f"127.0.0.1:{harness.port}", compression=grpc.Compression.Gzip) as ch:
        assert ch.unary_unary("/t.T/Later")(b"0.01") == b"later 0.01"


def test_goaway_finishes_in_flight_calls():
    h = Harness()
    try:
        c = H2Client(h.port)
        sid = c.call("/t.T/Slow", b"0.5")
        assert h.started.wait(5)
        h.loop.call_soon_threadsafe(h.server.close)
        c.pump(lambda: c.goaway is not None)
        assert c.goaway.last_stream_id == sid and c.goaway.error_code == 0
        s = c.wait(sid)
        assert s.status == 0 and s.messages() == [(0, b"done")]  # finished after the GOAWAY
        c.pump(lambda: c.closed, timeout=5)  # then the server closes the connection
        assert c.closed
        with pytest.raises(OSError):
            H2Client(h.port).wait(1, timeout=2)  # no longer listening
    finally:
        h.stop()


def test_keepalive_ping():
    h = Harness(keepalive_time=0.2, keepalive_timeout=0.3)
    try:
        c = H2Client(h.port)
        c.pump(lambda: len(c.pings) >= 3, timeout=5)  # answered: the server keeps pinging, connection open
        assert not c.closed
        c.answer_pings = False
        c.pump(lambda: c.closed, timeout=5)  # unanswered: closed after the timeout
        assert c.closed
    finally:
        h.stop()


def test_client_ping_is_answered(harness):
    c = H2Client(harness.port)
    c.frame(PingFrame(0, b"12345678"))
    c.sock.settimeout(5)
    data = b""
    while b"12345678" not in data:
        data += c.sock.recv(65536)
    c.close()


# -- malformed frames and messages -------------------------------------------------------------------------
def _connection_error(port: int, data: bytes, code: int) -> None:
    c = H2Client(port)
    c.send(data)
    c.pump(lambda: c.goaway is not None or c.closed, timeout=5)
    assert c.goaway is not None and c.goaway.error_code == code, c.goaway
    c.pump(lambda: c.closed, timeout=5)
    c.close()


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def test_malformed_frames_close_the_connection_not_the_server(harness):
    p = harness.port
    _connection_error(p, _frame(0, 0, 0, b"data on stream 0"), grpcserver.PROTOCOL_ERROR)
    _connection_error(p, _frame(0, 0, 0, b"x" * 10).replace(b"\x00\x00\x0a", b"\xff\xff\xff", 1),
                      grpcserver.FRAME_SIZE_ERROR)
    _connection_error(p, _frame(1, 4, 2, b"\x82"), grpcserver.PROTOCOL_ERROR)  # HEADERS on an even stream
    _connection_error(p, _frame(1, 4, 1, b"\xff\xff\xff\xff\xff"), grpcserver.COMPRESSION_ERROR)  # bad hpack
    _connection_error(p, _frame(9, 4, 1, b"\x82"), grpcserver.PROTOCOL_ERROR)  # CONTINUATION out of place
    _connection_error(p, _frame(4, 0, 0, b"\x00\x04\xff\xff\xff\xff"), grpcserver.FLOW_CONTROL_ERROR)
    _connection_error(p, _frame(4, 0, 0, b"\x00\x05\x00\x00\x00\x01"), grpcserver.PROTOCOL_ERROR)  # tiny frames
    _connection_error(p, _frame(4, 0, 0, b"\x00\x04\x00"), grpcserver.FRAME_SIZE_ERROR)
    _connection_error(p, _frame(6, 0, 0, b"short"), grpcserver.FRAME_SIZE_ERROR)  # PING
    _connection_error(p, _frame(8, 0, 0, b"\x00\x00\x00\x00"), grpcserver.PROTOCOL_ERROR)  # WINDOW_UPDATE 0
    _connection_error(p, _frame(3, 0, 9, b"\x00\x00\x00\x08"), grpcserver.PROTOCOL_ERROR)  # RST of an idle stream
    _connection_error(p, _frame(5, 4, 1, b"\x00\x00\x00\x03\x82"), grpcserver.PROTOCOL_ERROR)  # PUSH_PROMISE
    _connection_error(p, _frame(1, 0, 1, b"\x82") + _frame(0, 0, 1, b""), grpcserver.PROTOCOL_ERROR)
    # A bad preface: the connection is dropped.
    c = H2Client(p, preface=False)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.pump(lambda: c.closed, timeout=5)
    c.close()
    echo_ok(p)


def test_stream_errors_keep_the_connection(harness):
    c = H2Client(harness.port)
    sid = c.headers("/t.T/Echo")
    c.frame(WindowUpdateFrame(sid, 0))
    assert c.wait(sid).reset == grpcserver.PROTOCOL_ERROR
    # A request ending inside a message, a unary call without a message.
    sid = c.headers("/t.T/Echo")
    c.data(sid, struct.pack(">BI", 0, 10) + b"abc")
    s = c.wait(sid)
    assert s.status == grpcserver.INTERNAL and "inside a message" in s.message
    s = c.wait(c.headers("/t.T/Echo", end_stream=True))
    assert s.status == grpcserver.INTERNAL and "without its request message" in s.message
    # Not gRPC: HTTP 415, as gRPC's HTTP/2 mapping asks.
    s = c.wait(c.headers("/t.T/Echo", content_type="text/html", end_stream=True))
    assert s.headers[":status"] == "415"
    # Padded DATA, a header block split over CONTINUATION, unknown frame types: all fine.
    sid = c.headers("/t.T/Echo")
    body = struct.pack(">BI", 0, 3) + b"pad"
    c.send(_frame(0, 0x8 | 0x1, sid, bytes([4]) + body + b"\0" * 4))
    assert c.wait(sid).messages() == [(0, b"pad")]
    block = c.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"),
                              (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
    h = HeadersFrame(c.next_sid, block[:5])
    ct = ContinuationFrame(c.next_sid, block[5:])
    ct.flags.add("END_HEADERS")
    c.send(h.serialize() + ct.serialize())
    sid, c.next_sid = c.next_sid, c.next_sid + 2
    c.send(_frame(0xEE, 0, 0, b"unknown type"))
    c.data(sid, struct.pack(">BI", 0, 4) + b"cont")
    assert c.wait(sid).messages() == [(0, b"cont")]
    c.close()


def test_preface_in_pieces(harness):
    c = H2Client(harness.port, preface=False)
    for i in range(0, len(PREFACE), 5):
        c.send(PREFACE[i:i + 5])
        time.sleep(0.01)
    c.send(SettingsFrame(0).serialize())
    s = c.wait(c.call("/t.T/Echo", b"slowly"))
    assert s.messages() == [(0, b"slowly")]
    c.close()


def test_partial_messages_are_bounded_per_connection():
    """Big messages arriving on many streams at once: past ``max_buffered`` the connection window is
    not given back, so the client waits instead of the server's memory growing; a reset frees it."""
    h = Harness(max_buffered=1 << 20)
    try:
        c = H2Client(h.port)
        c.pump(lambda: c.send_window > 65535)  # the server's connection WINDOW_UPDATE
        sids = [c.headers("/t.T/Echo") for _ in range(3)]
        for sid in sids:
            c.frame(DataFrame(sid, struct.pack(">BI", 0, 12 << 20)))
            c.send_window -= 5
        sent, chunk = 0, b"\0" * 16384
        while sent < 33 << 20:
            if c.send_window < len(chunk):
                try:
                    c.pump(lambda: c.send_window >= len(chunk), timeout=0.5)
                except TimeoutError:
                    break
            c.frame(DataFrame(sids[(sent >> 14) % 3], chunk))
            c.send_window -= len(chunk)
            sent += len(chunk)
        assert not c.closed
        assert sent <= grpcserver.WINDOW + (1 << 20), sent  # held at one window past the bound

        async def buffered() -> int:
            return sum(conn.buffered for conn in h.server.connections)

        time.sleep(0.2)
        assert 0 < h.run(buffered()) <= grpcserver.WINDOW + (1 << 20)
        before = c.send_window
        for sid in sids:
            c.reset(sid)
        c.pump(lambda: c.send_window > before, timeout=5)  # credit returns once the partials are dropped
        assert h.run(buffered()) == 0
        c.close()
        echo_ok(h.port)
    finally:
        h.stop()


def test_two_writers_waiting_on_one_stream_window(harness):
    """Both writers blocked by the client's flow control resume when it reads (none is forgotten)."""
    c = H2Client(harness.port)
    sid = c.headers("/t.T/Two")
    c.window_hold.add(sid)
    c.data(sid, struct.pack(">BI", 0, 1) + b"x")
    c.pump(lambda: len(c.streams[sid].data) >= 65535, timeout=10)
    time.sleep(0.2)
    c.release(sid)
    c.frame(WindowUpdateFrame(sid, 1 << 24))
    s = c.wait(sid, timeout=10)
    assert s.status == 0
    bodies = sorted(body for _, body in s.messages())
    assert len(bodies) == 6 and bodies[0] == b"a" * 40000 + b"0" and bodies[-1] == b"b" * 40000 + b"2"
    c.close()
