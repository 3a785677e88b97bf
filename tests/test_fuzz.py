"""Fuzzing (hypothesis) of what a client controls: the v2 JSON + binary codec, BYTES tensors, request
parameters, config.pbtxt, shared-memory registration and raw HTTP bytes.

Every case must end in a result or in the project's clear error (:class:`ServerError`, a ``ValueError``
for BYTES, an HTTP 4xx), never in another exception, a hang or an allocation sized by the client before
it was checked against the body. CI runs a bounded number of examples per target (``EK_FUZZ_EXAMPLES``,
default 150); ``scripts/fuzz`` runs many more. Crashes found stay below as explicit examples.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import tracemalloc
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernel import config as cfg
from kernel.errors import ServerError
from kernel.shm_registry import SharedMemoryRegistry
from protocol.http import v2json
from shm import dtypes
from shm.region import Region

EXAMPLES = int(os.environ.get("EK_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("EK_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

DATATYPES = [*dtypes.SIZE, "BYTES", "FOO", "", "int32"]
_ints = st.one_of(st.integers(-3, 20), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**40, 2**63, 2**64]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), st.text(max_size=8))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=24)
_params = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "shared_memory_region", "shared_memory_offset",
                     "shared_memory_byte_size", "classification", "sequence_id", "priority", "timeout",
                     "binary_data_output", "custom"]),
    st.one_of(_ints, st.booleans(), st.text(max_size=6), st.floats(allow_nan=False), st.none()), max_size=4)


@st.composite
def _tensor(draw) -> dict:
    item: dict = {}
    if draw(st.booleans()) or True:
        item["name"] = draw(st.sampled_from(["INPUT0", "INPUT1", "X", ""]))
    item["datatype"] = draw(st.sampled_from(DATATYPES))
    item["shape"] = draw(st.one_of(st.lists(_ints, max_size=4), _scalars))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        item["data"] = draw(_json)
    elif choice == 1:
        item["parameters"] = draw(_params)
    elif choice == 2:
        item["data"] = draw(st.lists(st.one_of(_ints, st.floats(allow_nan=False), st.text(max_size=4)),
                                     max_size=16))
    if draw(st.booleans()):
        item.setdefault("parameters", {}).update(draw(_params))
    return item


@st.composite
def _request(draw) -> tuple[bytes, int | None]:
    doc: dict = {"inputs": draw(st.lists(_tensor(), max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["OUTPUT0", "Y"])},
                                                             optional={"parameters": _params}), max_size=2))
    if draw(st.booleans()):
        doc["id"] = draw(_scalars)
    if draw(st.booleans()):
        doc["parameters"] = draw(st.one_of(_params, _scalars))
    head = json.dumps(doc).encode()
    tail = draw(st.binary(max_size=256))
    header = draw(st.sampled_from([None, len(head), len(head) + len(tail) + 1, 0, max(len(head) - 3, 1)]))
    return head + tail if header is not None else head, header


def _parse(body: bytes, header: int | None) -> None:
    try:
        request = v2json.parse_request("m", "", body, header, SharedMemoryRegistry())
    except ServerError as e:
        assert e.http_status < 500, e  # a client's mistake is never a 5xx
        assert e.message
        return
    for t in request.inputs:  # what was accepted is consistent with the body it came in
        assert all(isinstance(d, int) and d >= 0 for d in t.shape)


@fuzz
@given(_request())
@example((b'{"inputs":[{"name":"INPUT0","shape":[1099511627776],"datatype":"FP32","data":[]}]}', None))
@example((b'{"inputs":[{"name":"INPUT0","shape":[4294967296,4294967296],"datatype":"INT8",'
          b'"parameters":{"binary_data_size":0}}]}', None))
@example((b'{"inputs":[{"name":"I","shape":[3],"datatype":"BYTES","data":[1,2,3]}]}', None))
def test_v2_json_and_binary_requests(case):
    body, header = case
    tracemalloc.start()
    try:
        _parse(body, header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(body) + (4 << 20), peak  # nothing sized by the shape before it met the body


@fuzz
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600)))
@example(b"[]", None)
@example(b'{"inputs": 5}', None)
@example(b"\xff\xfe", 1)
def test_arbitrary_bytes_as_a_request(body, header):
    if header is not None and header <= 0:
        header = None
    _parse(body, header)


@fuzz
@given(st.binary(max_size=256), st.one_of(st.none(), st.integers(0, 64)))
@example(b"\xff\xff\xff\xff", None)
@example(b"\x00\x00\x00\x00" * 3, 2)
def test_bytes_tensors_deserialise_or_fail_clearly(buf, count):
    try:
        out = dtypes.deserialize_bytes(buf, count)
    except ValueError:
        return
    assert out.dtype == np.object_
    assert sum(4 + len(x) for x in out) == len(buf)
    assert count is None or len(out) == count


@fuzz
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_tensors_round_trip(items):
    array = np.array(items + [b""], dtype=np.object_)[:-1] if items else np.empty(0, dtype=np.object_)
    data = dtypes.serialize_bytes(array)
    assert list(dtypes.deserialize_bytes(data, len(items))) == items
    assert dtypes.count_bytes_elements(data) == len(items)


_VALID_CONFIG = """name: "m"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1, 3 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1, 3 ] } ]
dynamic_batching { preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 100 }
instance_group [ { kind: KIND_CPU, count: 2 } ]
parameters { key: "k" value: { string_value: "v" } }
"""


@st.composite
def _config_text(draw) -> str:
    text = _VALID_CONFIG
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.integers(0, 2))
        if action == 0:
            text = text[:pos] + text[pos + draw(st.integers(1, 8)):]
        elif action == 1:
            text = text[:pos] + draw(st.sampled_from(["{", "}", "[", "]", ":", '"', "-1", "0", "99999999999999999999",
                                                      "TYPE_STRING", "dims: [ 0 ]", "\x00", "é"])) + text[pos:]
        else:
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos:]
    return text


@fuzz
@given(_config_text())
@example('input [ { name: "I", data_type: TYPE_FP32, dims: [ -2 ] } ]\nbackend: "python"')
@example("max_batch_size: -1\nbackend: \"python\"")
def test_config_pbtxt_parses_or_fails_clearly(text):
    with tempfile.TemporaryDirectory() as model_dir:
        with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            config = cfg.load(model_dir)
            cfg.complete(config, model_dir)
            cfg.validate(config)
            cfg.from_dict(cfg.to_dict(config))
        except ServerError as e:
            assert e.message


@pytest.fixture(scope="module")
def client_region():
    region = Region(f"/ek_test_fuzz_{uuid.uuid4().hex[:8]}", 4096, create=True)
    yield region
    region.close()
    region.unlink()


@fuzz
@given(names=st.lists(st.text(max_size=12), min_size=1, max_size=4),
       key=st.one_of(st.text(max_size=20), st.sampled_from(["", "/", "/..", "../etc/passwd", "/dev/shm/x"])),
       offset=_ints, byte_size=_ints, use_real=st.booleans())
def test_shm_registration_registers_or_fails_clearly(client_region, names, key, offset, byte_size, use_real):
    registry = SharedMemoryRegistry()
    key = client_region.name if use_real else key
    try:
        for name in names:
            try:
                registry.register(name, key, offset, byte_size)
            except ServerError as e:
                assert e.http_status in (400, 404), e
                continue
            reg = registry.get(name)
            assert 0 <= reg.offset and 0 < reg.byte_size and reg.offset + reg.byte_size <= client_region.size
            assert len(reg.buffer()) == reg.byte_size
        assert len(registry.status()) <= len(set(names))
    finally:
        registry.close()


# -- raw HTTP bytes at the server ------------------------------------------------------------------------------
_HTTP_PIECES = st.sampled_from([
    b"POST /echo HTTP/1.1\r\n", b"GET /echo HTTP/1.0\r\n", b"POST /echo HTTP/1.0\r\n", b"Host: x\r\n",
    b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999999999999\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Content-Encoding: gzip\r\n", b"Content-Encoding: br\r\n",
    b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Upgrade: h2c\r\n", b"\r\n", b"5\r\nhello\r\n0\r\n\r\n",
    b"hello", b"\x1f\x8b\x08\x00", b"\x00", b" ", b"\r\n\r\n",
])


@settings(parent=fuzz, max_examples=max(EXAMPLES // 3, 10))
@given(st.lists(st.one_of(_HTTP_PIECES, st.binary(max_size=24)), max_size=12))
def test_raw_http_bytes_never_break_the_server(pieces):
    from protocol.http.server import HttpServer, Response, Router

    async def main() -> None:
        router = Router()
        router.add("*", "/echo", lambda request: Response(bytes(request.body)))
        server = HttpServer(router, max_body=1 << 16)
        await server.start("127.0.0.1", 0)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"".join(pieces))
            try:
                await w.drain()
                w.write_eof()
                reply = await asyncio.wait_for(r.read(), 5)
            except (ConnectionError, OSError):
                reply = b""
            w.close()
            for status in (reply.split(b" ", 2)[1:2] if reply.startswith(b"HTTP/1.1 ") else []):
                assert int(status) < 500, reply[:200]
            # The server still serves a good request on a new connection.
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            assert (await asyncio.wait_for(r.read(), 5)).endswith(b"\r\n\r\nok")
            w.close()
        finally:
            await server.close(1)

    asyncio.run(main())
