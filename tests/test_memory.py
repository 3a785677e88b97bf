"""Memory is given back: the front's arena shrinks once a burst is over, in the front and in the workers."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from shm.arena import Arena
from tests.support import ROOT, serving


def test_arena_trims_segments_empty_for_a_whole_period():
    arena = Arena("t-trim", initial_size=4096)
    try:
        first = arena.alloc(100)
        big = arena.alloc(10_000)  # a second, larger segment
        assert len(arena.names()) == 2
        assert arena.trim() == []  # in use
        arena.free(*big)
        assert arena.trim() == []  # empty now, but not for a whole period yet
        again = arena.alloc(10_000)  # used again: the period starts over
        arena.free(*again)
        assert arena.trim() == []
        name = arena.names()[1]
        assert arena.trim() == [name]
        assert arena.names() == [arena.names()[0]] and not os.path.exists("/dev/shm" + name)
        assert arena.trim() == []  # the first segment stays
        arena.free(*first)
        assert arena.alloc(10_000)[0] not in (name, arena.names()[0])  # grows afresh, under a new name
    finally:
        arena.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("memory_repo")
    (repo / "echo" / "1").mkdir(parents=True)
    slow_echo = (ROOT / "tests" / "templates" / "echo_model.py").read_text().replace(
        "    def execute(self, requests):\n",
        "    def execute(self, requests):\n        __import__('time').sleep(1.0)\n")
    assert "sleep(1.0)" in slow_echo
    (repo / "echo" / "1" / "model.py").write_text(slow_echo)
    (repo / "echo" / "config.pbtxt").write_text(
        'backend: "python"\ninput [ { name: "INPUT0", data_type: TYPE_UINT8, dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0", data_type: TYPE_UINT8, dims: [ -1 ] } ]\n')
    yield from serving(repo, tmp_path_factory.mktemp("memory_log"), env={"EDGE_KERNEL_ARENA_TRIM_S": "0.3"})


def _front_segments(server) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"ek.{server.proc.pid}.") and ".front." in e)


def _mapped(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(name in line for line in f)


def test_front_arena_shrinks_after_a_burst_and_workers_unmap(server):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    before = _front_segments(server)
    assert len(before) <= 1  # made at the first request that needs it
    x = np.frombuffer(os.urandom(70 << 20), np.uint8)  # larger than the first segment (64 MiB)
    t = httpclient.InferInput("INPUT0", [x.size], "UINT8")
    t.set_data_from_numpy(x)
    result: list = []

    def send() -> None:  # from a thread: the model holds the request a second, its input block in use
        with httpclient.InferenceServerClient(server.http_url, network_timeout=120) as c:
            result.append(c.infer("echo", [t]).as_numpy("OUTPUT0"))

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30
    while len(_front_segments(server)) < len(before) + 1:
        assert time.monotonic() < deadline, _front_segments(server)
        time.sleep(0.01)
    grown = _front_segments(server)
    extra = next(e for e in grown if e not in before)
    while os.stat("/dev/shm/" + extra).st_size < 70 << 20:  # seen as it is made: reserved just after
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker = server.worker_pids()[0]
    while not _mapped(worker, extra):  # the worker reads the input where it lies
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sender.join(120)
    assert len(result) == 1 and np.array_equal(result[0], x)
    deadline = time.monotonic() + 10
    while _front_segments(server) != before or _mapped(worker, extra) or _mapped(server.proc.pid, extra):
        assert time.monotonic() < deadline, (_front_segments(server), _mapped(worker, extra))
        time.sleep(0.1)
    small = np.arange(100, dtype=np.uint8)  # and the server still serves
    t = httpclient.InferInput("INPUT0", [small.size], "UINT8")
    t.set_data_from_numpy(small)
    assert np.array_equal(client.infer("echo", [t]).as_numpy("OUTPUT0"), small)
    client.close()


def _gzip_zeros(size: int) -> bytes:
    """A gzip stream of ``size`` zero bytes (about size / 1000 bytes long)."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    parts = [packer.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


def test_gzip_bomb_is_413_and_stalls_no_other_client():
    """A small body inflating past the body limit: 413, inflated off the event loop, never more than the limit
    held (it once inflated on the loop: every client waited seconds, then a 500)."""
    import asyncio
    import zlib

    from tests.test_http_server import _with_server

    bomb = _gzip_zeros(768 << 20)
    fine = _gzip_zeros(8 << 20)
    began = time.monotonic()
    zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bomb, (256 << 20) + 1)
    inflating = time.monotonic() - began  # what the bomb once cost every client

    async def scenario(port, release):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        w.write(b"POST /fast HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb))
        await w.drain()
        await asyncio.sleep(0.02)  # the server reads the bomb (in this same event loop)
        w2.write(b"GET /fast HTTP/1.1\r\n\r\n")  # another client, right behind it
        assert (await asyncio.wait_for(r2.readuntil(b"ok"), 30)).startswith(b"HTTP/1.1 200")
        waited = time.monotonic() - start
        # A fine compressed body (inflated in a thread too) is served as usual.
        w2.write(b"POST /fast HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(fine), fine))
        assert (await asyncio.wait_for(r2.readuntil(b"ok"), 30)).startswith(b"HTTP/1.1 200")
        w2.close()
        answer = await asyncio.wait_for(r.read(), 30)  # answered, then closed
        assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 268435456 bytes" in answer, answer
        w.close()
        assert waited < inflating / 2, (waited, inflating)

    _with_server(scenario, max_body=256 << 20)
