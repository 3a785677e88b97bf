"""A small raw-frame HTTP/2 client (hyperframe + hpack) for the gRPC transport's tests.

tritonclient and grpcio follow the rules; these tests need a peer that can break them on purpose: send
any bytes, hold back flow-control credit, reset a stream, ignore a PING. Blocking sockets keep it simple.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Stream:
    headers: dict[str, str] | None = None
    trailers: dict[str, str] | None = None
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int | None:
        """grpc-status, from the trailers or a Trailers-Only response."""
        source = self.trailers if self.trailers is not None else self.headers
        value = (source or {}).get("grpc-status")
        return None if value is None else int(value)

    @property
    def message(self) -> str:
        source = self.trailers if self.trailers is not None else self.headers
        return (source or {}).get("grpc-message", "")

    def messages(self) -> list[tuple[int, bytes]]:
        """The gRPC messages received: (compressed flag, bytes)."""
        out, pos, data = [], 0, bytes(self.data)
        while pos + 5 <= len(data):
            flag, n = struct.unpack_from(">BI", data, pos)
            out.append((flag, data[pos + 5:pos + 5 + n]))
            pos += 5 + n
        return out


class H2Client:
    """One connection. ``window_hold`` lists streams whose flow-control credit is not given back."""

    def __init__(self, port: int, host: str = "127.0.0.1", settings: dict[int, int] | None = None,
                 preface: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.next_sid = 1
        self.streams: dict[int, Stream] = {}
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self.pings: list[bytes] = []
        self.answer_pings = True
        self.window_hold: set[int] = set()
        self.held: dict[int, int] = {}
        self.peer_settings: dict[int, int] = {}
        self.send_window = 65535
        self.stream_credits: dict[int, list[int]] = {}  # WINDOW_UPDATE increments the server sent, by stream
        if preface:
            s = SettingsFrame(0)
            s.settings = settings or {}
            self.send(PREFACE + s.serialize())

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True  # the server closed first: what it sent is still read

    def frame(self, frame: Frame) -> None:
        self.send(frame.serialize())

    def headers(self, path: str, extra: list[tuple[str, str]] | None = None, end_stream: bool = False,
                sid: int | None = None, content_type: str = "application/grpc") -> int:
        if sid is None:
            sid, self.next_sid = self.next_sid, self.next_sid + 2
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "localhost"), ("content-type", content_type),
                                     ("te", "trailers"), *(extra or [])])
        f = HeadersFrame(sid, block)
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        self.frame(f)
        self.streams.setdefault(sid, Stream())
        return sid

    def data(self, sid: int, payload: bytes, end_stream: bool = True, chunk: int = 16384) -> None:
        """Send ``payload`` in DATA frames as the server's windows allow (reading frames while waiting)."""
        view = memoryview(payload)
        while True:
            n = min(len(view), chunk)
            while self.send_window < n:
                self.pump(lambda n=n: self.send_window >= n or self.closed, timeout=30)
                if self.closed:
                    return
            f = DataFrame(sid, bytes(view[:n]))
            view = view[n:]
            self.send_window -= n
            if end_stream and not view:
                f.flags.add("END_STREAM")
            self.frame(f)
            if not view:
                return

    def call(self, path: str, message: bytes, extra: list[tuple[str, str]] | None = None,
             flag: int = 0) -> int:
        """Open a stream with one gRPC message (request closed)."""
        sid = self.headers(path, extra)
        self.data(sid, struct.pack(">BI", flag, len(message)) + message)
        return sid

    def wait(self, sid: int, timeout: float = 10) -> Stream:
        """Read until stream ``sid`` ends (or is reset, or the connection closes)."""
        s = self.streams.setdefault(sid, Stream())
        self.pump(lambda: s.ended or s.reset is not None or self.closed, timeout)
        return s

    def pump(self, until, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise TimeoutError("no answer in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self.buf += chunk
            self._frames()

    def _frames(self) -> None:
        buf, pos = self.buf, 0
        while len(buf) - pos >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[pos:pos + 9]))
            if len(buf) - pos < 9 + length:
                break
            frame.parse_body(memoryview(buf[pos + 9:pos + 9 + length]))
            pos += 9 + length
            self._on(frame)
        self.buf = buf[pos:]

    def _on(self, f: Frame) -> None:
        if isinstance(f, (HeadersFrame, ContinuationFrame)):
            headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                       for k, v in self.decoder.decode(f.data)}
            s = self.streams.setdefault(f.stream_id, Stream())
            if s.headers is None:
                s.headers = headers
            else:
                s.trailers = headers
            if "END_STREAM" in f.flags:
                s.ended = True
        elif isinstance(f, DataFrame):
            s = self.streams.setdefault(f.stream_id, Stream())
            s.data += f.data
            n = f.flow_controlled_length
            if n:
                self.frame(WindowUpdateFrame(0, n))
                if f.stream_id in self.window_hold:
                    self.held[f.stream_id] = self.held.get(f.stream_id, 0) + n
                elif "END_STREAM" not in f.flags:
                    self.frame(WindowUpdateFrame(f.stream_id, n))
            if "END_STREAM" in f.flags:
                s.ended = True
        elif isinstance(f, RstStreamFrame):
            self.streams.setdefault(f.stream_id, Stream()).reset = f.error_code
        elif isinstance(f, GoAwayFrame):
            self.goaway = f
        elif isinstance(f, PingFrame):
            if "ACK" not in f.flags:
                self.pings.append(f.opaque_data)
                if self.answer_pings:
                    p = PingFrame(0, f.opaque_data)
                    p.flags.add("ACK")
                    self.frame(p)
        elif isinstance(f, SettingsFrame):
            if "ACK" not in f.flags:
                self.peer_settings.update(f.settings)
                a = SettingsFrame(0)
                a.flags.add("ACK")
                self.frame(a)
        elif isinstance(f, WindowUpdateFrame):
            if f.stream_id == 0:
                self.send_window += f.window_increment
            else:
                self.stream_credits.setdefault(f.stream_id, []).append(f.window_increment)

    def release(self, sid: int) -> None:
        """Give back the credit held for ``sid`` and stop holding it."""
        self.window_hold.discard(sid)
        n = self.held.pop(sid, 0)
        if n:
            self.frame(WindowUpdateFrame(sid, n))

    def reset(self, sid: int, code: int = 8) -> None:
        self.frame(RstStreamFrame(sid, code))
