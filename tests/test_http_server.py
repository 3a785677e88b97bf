"""The HTTP/1.1 layer itself: connection handling that tritonclient relies on or that other clients send.

Raw sockets are used where the behaviour is below what tritonclient exposes (pipelining, chunked
bodies, ``Expect: 100-continue``, malformed requests); everything else goes through tritonclient.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.test_http import add_sub_inputs, assert_serving


def _connect(server) -> socket.socket:
    host, port = server.http_url.split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response from ``sock`` (leftover bytes stay in ``buf``)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        buf += chunk
    head, _, tail = bytes(buf).partition(b"\r\n\r\n")
    rest = bytearray(tail)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    buf[:] = rest[length:]
    return status, headers, bytes(rest[:length])


def _infer_body(a: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": n, "datatype": "INT32", "shape": [16], "data": a.tolist()}
                      for n in ("INPUT0", "INPUT1")]}
    return json.dumps(doc).encode()


def test_pipelined_requests_are_answered_in_order(server):
    with _connect(server) as sock:
        reqs = b""
        for i in range(20):
            body = _infer_body(np.full(16, i, dtype=np.int32))
            reqs += (b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
            reqs += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(reqs)
        buf = bytearray()
        for i in range(20):
            status, _, body = _read_response(sock, buf)
            assert status == 200
            out = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
            assert out["OUTPUT0"] == [2 * i] * 16
            status, headers, body = _read_response(sock, buf)
            assert (status, body, headers["content-type"]) == (200, b"", "text/plain")


def test_chunked_body_and_expect_continue(server):
    body = _infer_body(np.arange(16, dtype=np.int32))
    with _connect(server) as sock:
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, answer = _read_response(sock, bytearray())
        assert status == 200
        assert json.loads(answer)["outputs"][0]["data"] == [2 * i for i in range(16)]

        half = len(body) // 2
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunks)
        status, _, answer = _read_response(sock, bytearray())
        assert status == 200
        assert json.loads(answer)["outputs"][1]["data"] == [0] * 16


def test_connection_close_and_http10(server):
    for request in (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET /v2/health/live HTTP/1.0\r\n\r\n"):
        with _connect(server) as sock:
            sock.sendall(request)
            status, headers, _ = _read_response(sock, bytearray())
            assert status == 200 and headers["connection"] == "close"
            assert sock.recv(16) == b""  # the server closed the connection


def test_malformed_request_gets_400_and_the_server_goes_on(server, http):
    with _connect(server) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = _read_response(sock, bytearray())
        assert status == 400 and json.loads(body) == {"error": "Bad Request"}
        assert sock.recv(16) == b""
    with _connect(server) as sock:  # a body whose size does not parse
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
        assert _read_response(sock, bytearray())[0] == 400
    assert_serving(http)


def test_routing_errors_follow_triton(server):
    with _connect(server) as sock:
        buf = bytearray()
        sock.sendall(b"GET /v2/nothing HTTP/1.1\r\n\r\nPOST /v2/health/live HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
                     b"GET /v2/models/add_sub/versions/abc HTTP/1.1\r\n\r\n")
        assert _read_response(sock, buf)[::2] == (404, b'{"error":"Not Found"}')
        assert _read_response(sock, buf)[::2] == (405, b'{"error":"Method Not Allowed"}')
        assert _read_response(sock, buf)[::2] == (404, b'{"error":"Not Found"}')
        sock.sendall(b"HEAD /v2/models/add_sub HTTP/1.1\r\n\r\nGET /v2/health/ready HTTP/1.1\r\n\r\n")
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        # Triton answers HEAD 405 (it even sends the body; HTTP forbids one: none here)
        assert head.startswith(b"HTTP/1.1 405 Not Allowed") and b"Content-Type: application/json" in head
        buf[:] = rest  # HEAD: headers only, the next answer follows at once
        assert _read_response(sock, buf)[0] == 400  # not ready: the test repository holds broken models


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies(http, algorithm):
    a = np.arange(16, dtype=np.int32)
    result = http.infer("add_sub", add_sub_inputs(a, 3 * a), request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), -2 * a)


def test_bad_compressed_body(server):
    with _connect(server) as sock:
        body = zlib.compress(b"{}")[:-3]
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nContent-Encoding: deflate\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status, _, answer = _read_response(sock, bytearray())
        assert status == 400 and "decompress" in json.loads(answer)["error"]


def test_large_binary_outputs_stay_intact_under_load(server):
    """Outputs bigger than the socket takes at once are sent from shared memory, released after."""
    data = [np.random.default_rng(i).integers(0, 255, size=3 << 20, dtype=np.uint8) for i in range(4)]
    clients = [httpclient.InferenceServerClient(server.http_url, concurrency=4) for _ in range(2)]
    try:
        pending = []
        for _ in range(3):
            for i, arr in enumerate(data):
                t = httpclient.InferInput("INPUT0", list(arr.shape), "UINT8")
                t.set_data_from_numpy(arr)
                out = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)]
                pending.append((i, clients[i % 2].async_infer("echo_uint8", [t], outputs=out)))
        for i, p in pending:
            np.testing.assert_array_equal(p.get_result().as_numpy("OUTPUT0"), data[i])
    finally:
        for c in clients:
            c.close()


def test_output_buffers_outlive_a_slow_reader(server, http):
    """A client that does not read its answer: the output's shared memory is not reused meanwhile."""
    size = 16 << 20
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "UINT8", "shape": [size],
                                     "parameters": {"binary_data_size": size}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    body = header + bytes([1]) * size
    with _connect(server) as slow:
        slow.sendall(b"POST /v2/models/echo_uint8/infer HTTP/1.1\r\nInference-Header-Content-Length: %d\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(header), len(body)) + body)
        time.sleep(0.5)  # answered, but mostly still in the server's write buffer
        other = np.full(size, 2, dtype=np.uint8)
        for _ in range(3):
            t = httpclient.InferInput("INPUT0", [size], "UINT8")
            t.set_data_from_numpy(other)
            wanted = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)]
            result = http.infer("echo_uint8", [t], outputs=wanted)
            assert (result.as_numpy("OUTPUT0") == 2).all()
        status, headers, answer = _read_response(slow, bytearray())
        assert status == 200
        json_length = int(headers["inference-header-content-length"])
        out = np.frombuffer(answer, dtype=np.uint8, offset=json_length)
        assert out.size == size and int(out.min()) == int(out.max()) == 1  # not overwritten by the others


def test_oversized_heads_are_refused(server, http):
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
        status, _, body = _read_response(sock, bytearray())
        assert status == 431 and json.loads(body) == {"error": "Request Header Fields Too Large"}
    with _connect(server) as sock:
        sock.sendall(b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n")
        assert _read_response(sock, bytearray())[0] == 414
    assert_serving(http)


def test_idle_connections_are_closed():
    """A connection without a request in progress goes after ``idle_timeout``; busy ones stay."""
    import asyncio

    from protocol.http.server import Deferred, HttpServer, Response, Router

    async def main() -> None:
        loop = asyncio.get_running_loop()
        slow = loop.create_future()
        router = Router()
        router.add("GET", "/fast", lambda request: Response(b"ok"))
        router.add("GET", "/slow", lambda request: Deferred(slow, lambda f: Response(f.result())))
        server = HttpServer(router, idle_timeout=0.2)
        await server.start("127.0.0.1", 0)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", server.port)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", server.port)
        idle_w.write(b"GET /fast HTTP/1.1\r\n\r\n")
        assert (await idle_r.readuntil(b"ok")).startswith(b"HTTP/1.1 200 OK")
        busy_w.write(b"GET /slow HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.6)
        assert await asyncio.wait_for(idle_r.read(), 1) == b""  # closed by the server
        slow.set_result(b"late")
        assert (await asyncio.wait_for(busy_r.readuntil(b"late"), 1)).startswith(b"HTTP/1.1 200 OK")
        busy_w.close()
        await server.close(1)

    asyncio.run(main())


def test_deep_pipeline_behind_a_deferred_answer(server):
    """Thousands of queued answers after one that comes later: answered in a loop, not by recursion."""
    body = _infer_body(np.arange(16, dtype=np.int32))
    with _connect(server) as sock:
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                     + b"GET /v2/health/live HTTP/1.1\r\n\r\n" * 3000)
        buf = bytearray()
        assert _read_response(sock, buf)[0] == 200
        for _ in range(3000):
            assert _read_response(sock, buf)[:3:2] == (200, b"")


def test_h2c_upgrade_is_declined_and_the_request_served(server):
    """``curl --http2 http://...`` asks to upgrade to h2c; the request is answered over HTTP/1.1."""
    body = _infer_body(np.arange(16, dtype=np.int32))
    with _connect(server) as sock:
        sock.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body) + b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        buf = bytearray()
        status, _, answer = _read_response(sock, buf)
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [2 * i for i in range(16)]
        assert _read_response(sock, buf)[0] == 200


def _with_server(scenario, routes: tuple = (), **options) -> None:
    """Run ``scenario(port, release_slow)`` against an in-process HttpServer with /fast and /slow routes
    (and ``routes``: ``(method, path, handler)``)."""
    import asyncio

    from protocol.http.server import Deferred, HttpServer, Response, Router

    async def main() -> None:
        loop = asyncio.get_running_loop()
        slow: list[asyncio.Future] = []

        def slow_route(request):
            slow.append(loop.create_future())
            return Deferred(slow[-1], lambda f: Response(f.result()))

        router = Router()
        router.add("*", "/fast", lambda request: Response(b"ok"))
        router.add("*", "/slow", slow_route)
        for method, path, handler in routes:
            router.add(method, path, handler)
        server = HttpServer(router, **options)
        await server.start("127.0.0.1", 0)
        try:
            # (a reset connection has cancelled its slow answer already)
            await scenario(server.port, lambda: (f := slow.pop(0)).done() or f.set_result(b"late"))
        finally:
            await server.close(1)

    asyncio.run(main())


def test_answers_keep_their_order_with_errors_and_continues():
    import asyncio

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\n\r\nPOST /fast HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        await asyncio.sleep(0.1)
        release()
        first = await asyncio.wait_for(r.readuntil(b"late"), 2)
        assert first.startswith(b"HTTP/1.1 200 OK")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"hi")
        assert (await asyncio.wait_for(r.readuntil(b"ok"), 2)).startswith(b"HTTP/1.1 200 OK")
        # A request that does not parse, pipelined behind a late answer: answered after it, then closed.
        w.write(b"GET /slow HTTP/1.1\r\n\r\nPOST /fast HTTP/1.1\r\nContent-Encoding: deflate\r\n"
                b"Content-Length: 3\r\n\r\nabc")
        await asyncio.sleep(0.1)
        release()
        rest = await asyncio.wait_for(r.read(), 2)
        assert rest.startswith(b"HTTP/1.1 200 OK") and b"late" in rest.split(b"HTTP/1.1 400")[0]
        assert b"HTTP/1.1 400 Bad Request" in rest and b"decompress" in rest
        w.close()

    _with_server(scenario)


def test_compressed_body_cannot_exceed_the_limit():
    import asyncio

    async def scenario(port, release):
        bomb = zlib.compress(bytes(8 << 20))  # 8 MiB of zeros in a few KiB
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /fast HTTP/1.1\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb))
        answer = await asyncio.wait_for(r.read(), 2)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds the limit of 1048576 bytes" in answer
        w.close()

    _with_server(scenario, max_body=1 << 20)


def test_idle_clock_restarts_when_a_long_request_is_answered():
    import asyncio

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\n\r\n")
        await asyncio.sleep(0.5)  # longer than the idle timeout, but busy
        release()
        await asyncio.wait_for(r.readuntil(b"late"), 2)
        await asyncio.sleep(0.1)
        w.write(b"GET /fast HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(r.readuntil(b"ok"), 2)).startswith(b"HTTP/1.1 200 OK")
        w.close()

    _with_server(scenario, idle_timeout=0.2)


def test_half_closed_client_still_gets_its_answers():
    import asyncio

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /slow HTTP/1.1\r\n\r\nGET /fast HTTP/1.1\r\n\r\n")
        w.write_eof()  # nothing more to send; the answers are still owed
        await asyncio.sleep(0.1)
        release()
        answers = await asyncio.wait_for(r.read(), 2)  # both, then the server closes
        assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.index(b"late") < answers.index(b"ok")
        w.close()

    _with_server(scenario)


class _Buffers:
    """A body-buffer allocator that counts what is handed out and given back (twice is an error)."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.outstanding: set[int] = set()
        self.handed = 0
        self.errors: list[str] = []

    def __call__(self, method: str, url: str, headers: dict, size: int):
        if self.refuse:
            return None
        buffers = self
        self.handed += 1
        key = self.handed

        class Buffer:
            view = memoryview(bytearray(size))

            def release(self) -> None:
                if key not in buffers.outstanding:
                    buffers.errors.append(f"buffer {key} released twice")
                buffers.outstanding.discard(key)

        self.outstanding.add(key)
        return Buffer()


def _with_buffers(scenario, buffers: _Buffers) -> None:
    """``scenario(port, release_slow)`` on a server whose /echo answers where the body was received."""
    from protocol.http.server import Response

    def echo(request):
        where = b"buf" if request.buffer is not None else b"mem"
        assert bytes(request.body[:4]) == b"\x01\x02\x03\x04"[: len(request.body)]
        return Response(b"%s:%d" % (where, len(request.body)))

    routes = (("POST", "/echo", echo),
              ("POST", "/bad", lambda request: 42))  # a route that answers with something else
    _with_server(scenario, routes, body_buffer=buffers, body_buffer_min=4096)


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def test_large_bodies_are_received_into_the_buffer_and_given_back():
    import asyncio

    buffers = _Buffers()
    big = (b"\x01\x02\x03\x04" * 25_000)  # 100 kB
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (big[:50_000], big[50_000:])) + b"0\r\n\r\n"

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(big))  # large, with a length: into a buffer
        assert (await asyncio.wait_for(r.readuntil(b"buf:100000"), 2)).startswith(b"HTTP/1.1 200")
        w.write(_post(big[:1000]))  # small: in memory
        await asyncio.wait_for(r.readuntil(b"mem:1000"), 2)
        w.write(_post(zlib.compress(big), b"Content-Encoding: deflate\r\n"))  # must be inflated: in memory
        await asyncio.wait_for(r.readuntil(b"mem:100000"), 2)
        w.write(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)  # no length: in memory
        await asyncio.wait_for(r.readuntil(b"mem:100000"), 2)
        assert (buffers.handed, buffers.outstanding) == (1, set())

        # Queued behind a late answer when the connection is reset: their buffers come back all the same.
        w.write(b"GET /slow HTTP/1.1\r\n\r\n" + _post(big) + _post(big))
        await asyncio.sleep(0.1)
        assert len(buffers.outstanding) == 2
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.close()  # with linger 0: a reset, not an orderly close
        await asyncio.sleep(0.1)
        release()
        await asyncio.sleep(0.05)
        assert buffers.outstanding == set()

        # A client that stops half-way through a body.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(big)[:60_000])
        await asyncio.sleep(0.1)
        assert len(buffers.outstanding) == 1
        w.close()
        await asyncio.sleep(0.1)
        assert buffers.outstanding == set()

        # A request that does not parse after a large one: the large one is answered, then all is given back.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(big) + b"NOT HTTP\r\n\r\n")
        answers = await asyncio.wait_for(r.read(), 2)
        assert b"buf:100000" in answers and b"HTTP/1.1 400" in answers

        # A route that answers with neither a response nor a coroutine: a 500, and the buffer back.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /bad HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        assert (await asyncio.wait_for(r.readuntil(b"internal error"), 2)).startswith(b"HTTP/1.1 500")
        w.close()
        assert buffers.outstanding == set() and buffers.handed == 6 and buffers.errors == []

    _with_buffers(scenario, buffers)


def test_bodies_stay_in_memory_when_no_buffer_is_given():
    import asyncio

    buffers = _Buffers(refuse=True)

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_post(b"\x01\x02\x03\x04" * 2048))
        await asyncio.wait_for(r.readuntil(b"mem:8192"), 2)
        w.close()

    _with_buffers(scenario, buffers)


def test_request_bodies_in_the_front_arena_are_given_back():
    """Large infer bodies lie in shared memory until answered, whatever the outcome, then go back."""
    import asyncio

    from tritonclient.utils import InferenceServerException

    from kernel.api import Server
    from protocol.http.front import HttpFront
    from tests.support import ROOT

    with Server(model_repository=ROOT / "examples" / "models") as srv:
        http = HttpFront(srv.core).server()
        asyncio.run_coroutine_threadsafe(http.start("127.0.0.1", 0), srv._loop).result(10)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http.port}", network_timeout=60)
        frame = np.random.default_rng(5).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        try:
            t = httpclient.InferInput("FRAME", list(frame.shape), "UINT8")
            t.set_data_from_numpy(frame)
            mean = client.infer("frame_stats", [t]).as_numpy("MEAN")
            np.testing.assert_allclose(mean, frame[::4, ::4].reshape(-1, 3).mean(axis=0), rtol=1e-6)

            wrong = httpclient.InferInput("FRAME", [1080, 1920, 2], "UINT8")  # refused before it is queued
            wrong.set_data_from_numpy(frame[:, :, :2].copy())
            with pytest.raises(InferenceServerException, match="unexpected shape for input 'FRAME'"):
                client.infer("frame_stats", [wrong])
            with pytest.raises(InferenceServerException, match="Request for unknown model"):
                client.infer("no_such_model", [t])

            # BYTES in a large body are counted in the front, as in a small one: Triton's 400.
            text = np.array([b"x" * 100] * 1000, dtype=np.object_)
            for count in (10, 1000):  # a small and a large body
                strings = httpclient.InferInput("TEXT", [count], "BYTES")
                strings.set_data_from_numpy(text[:count].copy(), binary_data=True)
                strings.set_shape([count + 1])  # one more element than the data holds
                with pytest.raises(InferenceServerException, match=f"expected {count + 1} string elements"):
                    client.infer("upper", [strings])
            assert srv.model("upper").statistics()["model_stats"][0]["execution_count"] == 0

            host, port = "127.0.0.1", http.port
            with socket.create_connection((host, port)) as sock:  # a client gone half-way through its body
                sock.sendall(b"POST /v2/models/frame_stats/infer HTTP/1.1\r\nContent-Length: 6300000\r\n"
                             b"Inference-Header-Content-Length: 100\r\n\r\n" + bytes(3_000_000))
                time.sleep(0.2)
                assert srv._call(lambda core: core.arena.in_use()) >= 6_300_000
            deadline = time.monotonic() + 5
            while srv._call(lambda core: core.arena.in_use()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv._call(lambda core: core.arena.in_use()) == 0
        finally:
            client.close()
            asyncio.run_coroutine_threadsafe(http.close(1), srv._loop).result(10)


def test_only_binary_infer_bodies_go_to_the_arena_within_its_room_and_budget(monkeypatch):
    """The arena never shrinks: bodies take only its free room, at most MAX_BODY_ARENA bytes at once,
    and only inference requests with binary tensors (the rest is parsed in memory anyway)."""
    from protocol.http import front
    from shm.arena import Arena

    class Core:
        arena = Arena("t-body", 1 << 20)

    monkeypatch.setattr(front, "MAX_BODY_ARENA", 300_000)
    endpoint = front.HttpFront(Core())
    infer = "/v2/models/m/infer"
    binary = {"inference-header-content-length": "101"}
    try:
        assert endpoint._body_buffer("GET", infer, binary, 200_000) is None
        assert endpoint._body_buffer("POST", "/v2/repository/models/m/load", binary, 200_000) is None
        assert endpoint._body_buffer("POST", infer, {}, 200_000) is None  # all JSON
        first = endpoint._body_buffer("POST", infer + "?x=1", binary, 200_000)
        assert first is not None and endpoint.body_bytes == 200_000
        assert (first.offset + 101) % 64 == 0  # the binary part starts aligned
        assert endpoint._body_buffer("POST", infer, binary, 200_000) is None  # over the budget
        first.release()
        first.release()  # once only
        assert endpoint.body_bytes == 0 and Core.arena.in_use() == 0
        monkeypatch.setattr(front, "MAX_BODY_ARENA", 8 << 20)
        assert endpoint._body_buffer("POST", infer, binary, 2 << 20) is None  # no room: never grown
        assert len(Core.arena.names()) == 1
    finally:
        Core.arena.close()
