"""Fuzzing the gRPC side: ModelInferRequest bytes through the codec, random HTTP/2 frames at the server.

CI runs a bounded budget (a few seconds per test); ``EK_FUZZ_EXAMPLES=N`` runs N examples per test
for a longer search (``EK_FUZZ_EXAMPLES=20000 pytest tests/test_grpc_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.errors import ServerError
from kernel.shm_registry import SharedMemoryRegistry
from protocol import grpc_service_pb2 as pb
from protocol.grpc import v2grpc
from tests.h2client import PREFACE, H2Client
from tests.test_grpc_transport import Harness, echo_ok

EXAMPLES = int(os.environ.get("EK_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=not EXAMPLES,
                    suppress_health_check=list(HealthCheck))


def _valid_request() -> bytes:
    r = pb.ModelInferRequest(model_name="add_sub", id="7")
    for i in (0, 1):
        t = r.inputs.add(name=f"INPUT{i}", datatype="INT32", shape=[16])
        t.parameters["binary_data_size"].int64_param = 64
    r.outputs.add(name="OUTPUT0").parameters["shared_memory_region"].string_param = "nope"
    r.parameters["sequence_id"].int64_param = 3
    r.raw_input_contents.extend([bytes(64), bytes(64)])
    return r.SerializeToString()


VALID = _valid_request()


@st.composite
def mutated(draw) -> bytes:
    """The valid request with bytes flipped, cut, inserted: near-valid input reaches deep."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@budget(400)
@given(st.one_of(st.binary(max_size=300), mutated()))
def test_infer_request_codec(data: bytes) -> None:
    """Any bytes: a parsed request or a clear error (what the server answers INTERNAL/INVALID_ARGUMENT)."""
    try:
        decoded = v2grpc.decode_infer_request(data)
    except (DecodeError, IndexError, ValueError):
        return
    try:
        request = v2grpc.parse_request(decoded, SharedMemoryRegistry())
    except ServerError as e:
        assert e.message
        return
    for tensor in request.inputs:
        assert tensor.data is not None


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    errors: list = []
    h.loop.call_soon_threadsafe(h.loop.set_exception_handler, lambda loop, ctx: errors.append(ctx))
    h.errors = errors
    yield h
    h.stop()


FRAME = st.tuples(st.integers(0, 10) | st.integers(0, 255),  # type: known ones mostly
                  st.integers(0, 255),  # flags
                  st.sampled_from([0, 1, 3, 5, 2]) | st.integers(0, 1 << 31),  # stream id
                  st.binary(max_size=64))


def _frames(frames: list) -> bytes:
    return b"".join(struct.pack(">IBI", len(p) << 8 | t, f, s) + p for t, f, s, p in frames)


@budget(60)
@given(st.lists(FRAME, max_size=8), st.booleans())
def test_random_frames(harness, frames: list, with_call: bool) -> None:
    """Random frames (after a valid request, or alone): the connection answers or closes, never the server."""
    c = H2Client(harness.port)
    try:
        if with_call:
            c.headers("/t.T/Echo")
        c.send(_frames(frames))
        try:
            c.pump(lambda: c.closed or c.goaway is not None, timeout=0.05)
        except TimeoutError:
            pass
    finally:
        c.close()
    echo_ok(harness.port)
    assert not harness.errors, harness.errors


@budget(60)
@given(st.binary(max_size=200))
def test_random_bytes_after_the_preface(harness, data: bytes) -> None:
    c = H2Client(harness.port, preface=False)
    try:
        c.send(PREFACE + data)
        try:
            c.pump(lambda: c.closed, timeout=0.05)
        except TimeoutError:
            pass
    finally:
        c.close()
    echo_ok(harness.port)
    assert not harness.errors, harness.errors


@budget(80)
@given(st.binary(max_size=120), st.integers(0, 3), st.sampled_from(["identity", "gzip", "deflate"]))
def test_random_grpc_messages(harness, body: bytes, flag: int, encoding: str) -> None:
    """Random message bytes, flags and encodings: every call ends with a status."""
    c = H2Client(harness.port)
    try:
        s = c.wait(c.call("/t.T/Echo", body, [("grpc-encoding", encoding)], flag=flag), timeout=5)
        assert s.status is not None
    finally:
        c.close()
    assert not harness.errors, harness.errors


def test_loop_errors_are_seen(harness) -> None:
    """The error hook the fuzz tests rely on does record a loop error."""
    harness.loop.call_soon_threadsafe(lambda: asyncio.get_event_loop().call_exception_handler({"message": "x"}))
    c = H2Client(harness.port)
    c.wait(c.call("/t.T/Echo", b""))
    c.close()
    assert harness.errors and harness.errors.pop()["message"] == "x"
