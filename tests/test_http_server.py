"""The HTTP/1.1 layer itself: connection handling that tritonclient relies on or that other clients send.

Raw sockets are used where the behaviour is below what tritonclient exposes (pipelining, chunked
bodies, ``Expect: 100-continue``, malformed requests); everything else goes through tritonclient.
"""

from __future__ import annotations

import json
import socket
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
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: application/json" in head
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

    from protocol.httpserver import Deferred, HttpServer, Response, Router

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
