"""The ModelInferRequest wire decoder against protobuf.

``v2grpc.decode_infer_request`` reads the wire format itself; whatever it returns must be what
protobuf (upb) would make of the same bytes, and ``parse_request`` must build the same core request,
or raise the same error, as the code it replaced. Three paths are compared on every input:

- the wire decoder + ``parse_request``;
- ``v2grpc._decode_with_protobuf`` (its fallback) + ``parse_request``;
- the pre-decoder path, kept here verbatim as the oracle: protobuf parses, ``_old_parse_request``
  reads the message.

Messages are generated, then written with a wire encoder of this file that uses every liberty
protobuf allows a writer: unpacked or mixed-packed repeated numbers, decoy values before the last
one (last wins), duplicate map entries, map entries with key and value swapped or missing, oneof
members set before the final one, a singular message split in parts (they merge), unknown fields of
every wire type, multi-byte tags.
"""

from __future__ import annotations

import os
import struct
from multiprocessing import shared_memory
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.classification import from_grpc
from kernel.errors import ServerError, invalid
from kernel.shm_registry import SharedMemoryRegistry
from kernel.types import InferRequest, InputTensor, RequestedOutput, ShmRef
from protocol import grpc_service_pb2 as pb
from protocol.grpc import v2grpc

EXAMPLES = int(os.environ.get("EK_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=not EXAMPLES,
                    suppress_health_check=list(HealthCheck))


# -- the oracle: the pre-decoder path ----------------------------------------------------------------------
def _old_request_parameters(params: Any) -> dict:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if key == "sequence_id":
            if which not in ("int64_param", "string_param"):
                raise invalid("invalid value type for 'sequence_id' parameter, expected int64_param or string_param.")
        elif key in ("sequence_start", "sequence_end"):
            if which != "bool_param":
                raise invalid(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif key == "priority":
            if which not in ("int64_param", "uint64_param"):
                raise invalid("invalid value type for 'priority' parameter, expected int64_param or uint64_param.")
            if which == "int64_param" and p.int64_param < 0:
                raise invalid("invalid value for 'priority', expected value >= 0.")
        elif key == "timeout":
            if which != "int64_param":
                raise invalid("invalid value type for 'timeout' parameter, expected int64_param.")
        elif key.startswith("triton_"):
            if key not in v2grpc.TRITON_RESERVED_REQUEST_PARAMS:
                raise invalid("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                              "following keys starting with 'triton_' are allowed: "
                              + " ".join(v2grpc.TRITON_RESERVED_REQUEST_PARAMS))
            if which != "bool_param":
                raise invalid(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif which not in ("int64_param", "bool_param", "string_param"):
            raise invalid(f"invalid value type for '{key}' parameter, expected int64_param, bool_param, "
                          "or string_param.")
        out[key] = getattr(p, which)
    return out


def _old_parse_request(msg: pb.ModelInferRequest, raw: list, shm: SharedMemoryRegistry) -> InferRequest:
    model = msg.model_name
    request = InferRequest(model, msg.model_version, msg.id)
    if msg.parameters:
        request.parameters = _old_request_parameters(msg.parameters)
    index = 0
    for item in msg.inputs:
        name = item.name
        params = v2grpc.params_dict(item.parameters)
        tensor = InputTensor(name, item.datatype, list(item.shape), parameters=params)
        has_contents = item.HasField("contents")
        if v2grpc._SHM_KEYS.intersection(params):  # (Triton's checks of these parameters added since)
            if has_contents:
                raise invalid(f"unexpected 'content' provided when using shared memory for input tensor "
                              f"'{name}' for model '{model}'")
            tensor.data = v2grpc._shm_ref(params, name, shm)
        elif has_contents:
            if raw:
                raise invalid(f"contents field must not be specified when using raw_input_contents for "
                              f"'{name}' for model '{model}'")
            tensor.data = v2grpc._typed_contents(item.name, item.datatype, item.contents, model)
        elif index < len(raw):
            tensor.data = raw[index]
            index += 1
        else:
            raise invalid(f"unable to find data for input tensor '{name}' for model '{model}' in request.")
        request.inputs.append(tensor)
    if msg.outputs:
        outputs = []
        for o in msg.outputs:
            params = v2grpc.params_dict(o.parameters)
            out = RequestedOutput(o.name, parameters=params)
            if "classification" in params:  # (added with the classification extension: its member matters)
                which = o.parameters["classification"].WhichOneof("parameter_choice")
                classes = from_grpc(which, params["classification"], params)
                if classes:
                    request.classification = {**(request.classification or {}), o.name: classes}
            if v2grpc._SHM_KEYS.intersection(params):
                out.shm = v2grpc._shm_ref(params, o.name, shm)
            outputs.append(out)
        request.outputs = outputs
    return request


# -- outcomes ----------------------------------------------------------------------------------------------
def _value(v: Any) -> Any:
    """A parameter value, comparable: its type too (True == 1), floats by repr (nan, -0.0)."""
    return (type(v).__name__, repr(v) if isinstance(v, float) else v)


def _params(params: dict) -> dict:
    return {k: _value(v) for k, v in params.items()}


def _data(data: Any) -> Any:
    if isinstance(data, ShmRef):
        return ("shm", data.region.name, data.offset, data.byte_size)
    return bytes(data)


def _request(r: InferRequest) -> tuple:
    inputs = [(t.name, t.datatype, t.shape, _params(t.parameters), _data(t.data)) for t in r.inputs]
    outputs = None if r.outputs is None else [
        (o.name, _params(o.parameters), None if o.shm is None else _data(o.shm)) for o in r.outputs]
    return (r.model_name, r.model_version, r.id, _params(r.parameters), inputs, outputs, r.classification)


def _outcome(decode, parse, data: bytes, shm: SharedMemoryRegistry) -> tuple:
    try:
        decoded = decode(data)
    except DecodeError:
        return ("DecodeError",)
    try:
        return ("ok", _request(parse(decoded, shm)))
    except ServerError as e:
        return ("ServerError", e.code, e.message)


def _oracle_decode(data: bytes) -> tuple:
    msg = pb.ModelInferRequest.FromString(data)
    return msg, [memoryview(r) for r in msg.raw_input_contents]


def outcomes(data: bytes, shm: SharedMemoryRegistry) -> tuple[tuple, tuple, tuple]:
    """(wire decoder, protobuf fallback, pre-decoder oracle), each a request or an error."""
    return (_outcome(v2grpc.decode_infer_request, v2grpc.parse_request, data, shm),
            _outcome(v2grpc._decode_with_protobuf, v2grpc.parse_request, data, shm),
            _outcome(_oracle_decode, lambda d, s: _old_parse_request(d[0], d[1], s), data, shm))


def _param_errors(data: bytes) -> set:
    """The error each request parameter alone would raise."""
    errors = set()
    for key, p in pb.ModelInferRequest.FromString(data).parameters.items():
        single = pb.ModelInferRequest()
        single.parameters[key].CopyFrom(p)
        try:
            _old_request_parameters(single.parameters)
        except ServerError as e:
            errors.add(("ServerError", e.code, e.message))
    return errors


def assert_same(data: bytes, shm: SharedMemoryRegistry) -> tuple:
    new, fallback, old = outcomes(data, shm)
    for other in (fallback, old):
        if other != new:
            # Request parameters read from protobuf's map come in its hash order, which changes from one
            # process to the next: with several bad ones, any of their errors is right.
            assert new[0] == other[0] == "ServerError" and {new, other} <= _param_errors(data), (new, other)
    return new


@pytest.fixture(scope="module")
def shm():
    """A registry with one registered region, "region0" (256 bytes), so shm parameters can resolve."""
    block = shared_memory.SharedMemory(create=True, size=256)
    registry = SharedMemoryRegistry()
    registry.register("region0", "/" + block.name, 0, 256)
    yield registry
    registry.close()
    block.close()
    block.unlink()


# -- a wire encoder with a writer's liberties --------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_VARINT_TYPES = {FD.TYPE_INT64, FD.TYPE_UINT64, FD.TYPE_INT32, FD.TYPE_UINT32, FD.TYPE_BOOL, FD.TYPE_ENUM}


def varint(n: int) -> bytes:
    n &= _MASK64
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def _scalar(fd: Any, value: Any) -> bytes:
    """One scalar's value bytes (no tag)."""
    if fd.type in _VARINT_TYPES:
        return varint(int(value))
    if fd.type == FD.TYPE_DOUBLE:
        return struct.pack("<d", value)
    if fd.type == FD.TYPE_FLOAT:
        return struct.pack("<f", value)
    payload = value.encode() if isinstance(value, str) else value
    return varint(len(payload)) + payload


def _wire(fd: Any) -> int:
    if fd.type in _VARINT_TYPES:
        return 0
    return {FD.TYPE_DOUBLE: 1, FD.TYPE_FLOAT: 5}.get(fd.type, 2)


def _decoy(draw, fd: Any) -> Any:
    """Some other valid value of ``fd``'s type."""
    if fd.type == FD.TYPE_STRING:
        return draw(st.text(max_size=4))
    if fd.type == FD.TYPE_BYTES:
        return draw(st.binary(max_size=4))
    if fd.type == FD.TYPE_BOOL:
        return draw(st.booleans())
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return draw(st.floats(width=32))
    return draw(st.integers(0, 1 << 31))


def _unknown(draw) -> bytes:
    """An unknown field (numbers 9 up: unknown to every message here), any parseable wire type."""
    field = draw(st.sampled_from([9, 15, 16, 2047, 2048, (1 << 29) - 1]))
    wire = draw(st.sampled_from([0, 1, 2, 5, 3]))
    if wire == 0:
        return tag(field, 0) + varint(draw(st.integers(0, _MASK64)))
    if wire == 1:
        return tag(field, 1) + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return tag(field, 5) + draw(st.binary(min_size=4, max_size=4))
    if wire == 2:
        return ld(field, draw(st.binary(max_size=6)))
    return tag(field, 3) + tag(1, 0) + b"\x05" + ld(2, b"xy") + tag(field, 4)  # a group


@st.composite
def encoded(draw, msg: Any) -> bytes:
    """``msg`` on the wire, as some writer might put it (see the module docstring)."""
    runs: list[list[bytes]] = []  # one per field, in order; interleaved below
    for fd, value in msg.ListFields():
        out: list[bytes] = []
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, param in value.items():
                if draw(st.integers(0, 4)) == 0:  # an earlier entry of the same key: replaced by the last
                    out.append(ld(fd.number, ld(1, key.encode()) + ld(2, tag(2, 0) + varint(7))))
                parts = []
                with_key = bool(key) or draw(st.booleans())  # an empty key may be left out
                if with_key:
                    parts.append(ld(1, key.encode()))
                body = draw(encoded(param))
                if body or draw(st.booleans()):  # so may an empty value
                    parts.append(ld(2, body))
                if draw(st.booleans()):
                    parts.reverse()
                if with_key and draw(st.integers(0, 5)) == 0:
                    parts.insert(0, ld(1, b"decoy"))  # the key's last value wins
                out.append(ld(fd.number, b"".join(parts)))
        elif fd.is_repeated:
            if fd.message_type is not None:
                out.extend(ld(fd.number, draw(encoded(item))) for item in value)
            elif _wire(fd) == 2:
                out.extend(tag(fd.number, 2) + _scalar(fd, item) for item in value)
            else:  # numbers: runs, each packed or not
                items = list(value)
                while items:
                    n = draw(st.integers(1, len(items)))
                    run, items = items[:n], items[n:]
                    if draw(st.booleans()):
                        out.append(ld(fd.number, b"".join(_scalar(fd, x) for x in run)))
                    else:
                        out.extend(tag(fd.number, _wire(fd)) + _scalar(fd, x) for x in run)
        elif fd.message_type is not None:  # a singular message: maybe in two parts, which merge
            body = draw(encoded(value))
            out.append(ld(fd.number, body))
            if body and draw(st.integers(0, 3)) == 0:
                whole = pb.InferTensorContents.FromString(body) if fd.message_type.name == "InferTensorContents" \
                    else None
                if whole is not None:
                    first = type(whole)()
                    second = type(whole)()
                    for sub, items in whole.ListFields():  # repeated fields: concatenated on merge
                        cut = draw(st.integers(0, len(items)))
                        getattr(first, sub.name).extend(items[:cut])
                        getattr(second, sub.name).extend(items[cut:])
                    out[-1:] = [ld(fd.number, first.SerializeToString()), ld(fd.number, second.SerializeToString())]
        else:  # a singular scalar or string: maybe after decoys, or after another oneof member
            if draw(st.integers(0, 4)) == 0:
                decoy_fd = fd
                if fd.containing_oneof is not None:
                    decoy_fd = draw(st.sampled_from(list(fd.containing_oneof.fields)))
                out.append(tag(decoy_fd.number, _wire(decoy_fd)) + _scalar(decoy_fd, _decoy(draw, decoy_fd)))
            out.append(tag(fd.number, _wire(fd)) + _scalar(fd, value))
        runs.append(out)
    for _ in range(draw(st.integers(0, 2))):
        runs.append([_unknown(draw)])
    chunks: list[bytes] = []
    while runs:  # interleave the fields, each keeping its own order
        run = runs[draw(st.integers(0, len(runs) - 1))]
        chunks.append(run.pop(0))
        runs = [r for r in runs if r]
    return b"".join(chunks)


# -- generated requests ------------------------------------------------------------------------------------
NAMES = st.sampled_from(["INPUT0", "OUTPUT0", "add_sub", "", "é", "名前", "😀x"]) | st.text(max_size=8)
DATATYPES = st.sampled_from(["FP32", "INT32", "INT8", "UINT16", "INT64", "UINT64", "BOOL", "FP64", "BYTES",
                             "FP16", "", "NOPE"])
KEYS = st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                        "triton_enable_empty_final_response", "triton_other", "binary_data_size",
                        "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification",
                        ""]) \
    | st.text(max_size=6)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
UINT64 = st.integers(0, _MASK64)


@st.composite
def param(draw, p: pb.InferParameter) -> None:
    kind = draw(st.sampled_from(["none", "bool", "int64", "string", "double", "uint64"]))
    if kind == "bool":
        p.bool_param = draw(st.booleans())
    elif kind == "int64":
        p.int64_param = draw(INT64 | st.integers(-2, 300))
    elif kind == "string":
        p.string_param = draw(st.sampled_from(["region0", "nope", ""]) | st.text(max_size=6))
    elif kind == "double":
        p.double_param = draw(st.floats())
    elif kind == "uint64":
        p.uint64_param = draw(UINT64 | st.integers(0, 300))


@st.composite
def params(draw, target: Any) -> None:
    for key in draw(st.lists(KEYS, max_size=4)):
        draw(param(target[key]))
    if draw(st.integers(0, 5)) == 0:  # a plausible shared-memory span of the registered region
        target["shared_memory_region"].string_param = "region0"
        target["shared_memory_byte_size"].int64_param = draw(st.integers(0, 300))
        if draw(st.booleans()):
            target["shared_memory_offset"].int64_param = draw(st.integers(0, 300))


@st.composite
def contents(draw, c: pb.InferTensorContents) -> None:
    for field in draw(st.lists(st.sampled_from(list(v2grpc._CONTENTS)), max_size=2)):
        values: Any = {
            "bool_contents": st.lists(st.booleans(), max_size=4),
            "int_contents": st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=4),
            "int64_contents": st.lists(INT64, max_size=4),
            "uint_contents": st.lists(st.integers(0, (1 << 32) - 1), max_size=4),
            "uint64_contents": st.lists(UINT64, max_size=4),
            "fp32_contents": st.lists(st.floats(width=32), max_size=4),
            "fp64_contents": st.lists(st.floats(), max_size=4),
            "bytes_contents": st.lists(st.binary(max_size=5), max_size=4),
        }[field]
        getattr(c, field).extend(draw(values))
    c.SetInParent()


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=draw(NAMES), model_version=draw(st.sampled_from(["", "1", "-1", "é"])),
                             id=draw(NAMES))
    draw(params(r.parameters))
    for _ in range(draw(st.integers(0, 3))):
        t = r.inputs.add(name=draw(NAMES), datatype=draw(DATATYPES),
                         shape=draw(st.lists(INT64 | st.integers(-2, 300), max_size=4)))
        draw(params(t.parameters))
        if draw(st.integers(0, 3)) == 0:
            draw(contents(t.contents))
    for _ in range(draw(st.integers(0, 3))):
        draw(params(r.outputs.add(name=draw(NAMES)).parameters))
    r.raw_input_contents.extend(draw(st.lists(st.binary(max_size=24), max_size=3)))
    return r


@st.composite
def messages(draw) -> tuple[pb.ModelInferRequest, bytes]:
    msg = draw(requests())
    data = msg.SerializeToString() if draw(st.booleans()) else draw(encoded(msg))
    return msg, data


def _canonical(msg: Any) -> bytes:
    msg.DiscardUnknownFields()
    return msg.SerializeToString(deterministic=True)


# -- tests -------------------------------------------------------------------------------------------------
@budget(500)
@given(messages())
def test_generated_requests(shm, generated) -> None:
    msg, data = generated
    assert _canonical(pb.ModelInferRequest.FromString(data)) == _canonical(msg)  # the encoder is right
    assert assert_same(data, shm)[0] != "DecodeError"


@budget(300)
@given(messages(), st.data())
def test_truncated_and_mutated(shm, generated, data) -> None:
    """A cut or a few changed bytes: both decoders fail, or agree on what they read."""
    _, wire = generated
    cut = data.draw(st.integers(0, len(wire)))
    assert_same(wire[:cut], shm)
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 3))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    assert_same(bytes(mutated), shm)


def _add_sub(shm_params: bool = False) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="add_sub", model_version="1", id="42")
    r.parameters["sequence_id"].int64_param = 5
    r.parameters["priority"].uint64_param = 1
    for i in (0, 1):
        t = r.inputs.add(name=f"INPUT{i}", datatype="FP32", shape=[1, 16])
        o = r.outputs.add(name=f"OUTPUT{i}")
        if shm_params:
            for p in (t.parameters, o.parameters):
                p["shared_memory_region"].string_param = "region0"
                p["shared_memory_byte_size"].int64_param = 64
                p["shared_memory_offset"].int64_param = 64 * i
        else:
            t.parameters["binary_data_size"].int64_param = 64
            r.raw_input_contents.append(bytes(range(i, i + 64)))
    return r


@pytest.mark.parametrize("shm_params", [False, True])
def test_every_truncation(shm, shm_params: bool) -> None:
    data = _add_sub(shm_params).SerializeToString()
    results = [assert_same(data[:cut], shm) for cut in range(len(data) + 1)]
    assert results[-1][0] == "ok"
    assert ("DecodeError",) in results


def test_the_fast_path_reads_the_request(shm) -> None:
    """Not a comparison: what the request says arrives, with no protobuf message in between."""
    decoded = v2grpc.decode_infer_request(_add_sub().SerializeToString())
    assert decoded.parameters == {"sequence_id": ("int64_param", 5), "priority": ("uint64_param", 1)}
    assert decoded.inputs[1] == ("INPUT1", "FP32", [1, 16], {"binary_data_size": 64}, None)
    request = v2grpc.parse_request(decoded, shm)
    assert (request.model_name, request.model_version, request.id) == ("add_sub", "1", "42")
    assert bytes(request.inputs[1].data) == bytes(range(1, 65))
    assert isinstance(request.inputs[0].data, memoryview)  # a view of the message, not a copy
    assert [o.name for o in request.outputs] == ["OUTPUT0", "OUTPUT1"]
    shm_request = v2grpc.parse_request(v2grpc.decode_infer_request(_add_sub(True).SerializeToString()), shm)
    assert _data(shm_request.inputs[1].data) == ("shm", "region0", 64, 64)
    assert _data(shm_request.outputs[0].shm) == ("shm", "region0", 0, 64)


def _shape(*fields: bytes) -> bytes:
    return ld(5, ld(1, b"x") + b"".join(fields))


def test_unpacked_and_mixed_packed_shapes() -> None:
    packed = ld(3, varint(2) + varint(-1) + varint(1 << 40))
    cases = {
        tag(3, 0) + varint(2) + tag(3, 0) + varint(-1) + tag(3, 0) + varint(1 << 40): [2, -1, 1 << 40],
        packed: [2, -1, 1 << 40],
        tag(3, 0) + varint(7) + packed + tag(3, 0) + varint(-5) + ld(3, b""): [7, 2, -1, 1 << 40, -5],
    }
    for fields, shape in cases.items():
        data = _shape(fields)
        assert v2grpc.decode_infer_request(data).inputs[0][2] == shape
        assert list(pb.ModelInferRequest.FromString(data).inputs[0].shape) == shape


def test_varints() -> None:
    """int64 from 10-byte varints (bits past 64 dropped, like upb); 11 bytes is an error."""
    assert v2grpc.decode_infer_request(_shape(tag(3, 0) + b"\xff" * 9 + b"\x7f")).inputs[0][2] == [-1]
    assert v2grpc.decode_infer_request(_shape(tag(3, 0) + b"\xff" * 9 + b"\x00")).inputs[0][2] == [(1 << 63) - 1]
    assert v2grpc.decode_infer_request(_shape(tag(3, 0) + b"\x80" * 9 + b"\x01")).inputs[0][2] == [-(1 << 63)]
    for bad in (_shape(tag(3, 0) + b"\xff" * 10 + b"\x01"), _shape(ld(3, b"\xff" * 10 + b"\x01")),
                _shape(ld(3, b"\x01\x80")), b"\x80\x80\x80\x80\x80\x08" + b"\x00", b"\x80\x80\x80\x80\x10\x00"):
        with pytest.raises(DecodeError):
            pb.ModelInferRequest.FromString(bad)
        with pytest.raises(DecodeError):
            v2grpc.decode_infer_request(bad)


def test_repeated_singular_fields_last_wins(shm) -> None:
    data = (ld(1, b"first") + ld(1, b"add_sub") + ld(3, b"a") + ld(3, b"b")
            + ld(5, ld(1, b"IN") + ld(2, b"INT8") + ld(1, b"INPUT0") + ld(2, b"FP32"))
            + ld(6, ld(1, b"X") + ld(1, b"OUTPUT0")))
    decoded = v2grpc.decode_infer_request(data)
    assert (decoded.model_name, decoded.id) == ("add_sub", "b")
    assert decoded.inputs[0][:2] == ("INPUT0", "FP32")
    assert decoded.outputs[0][0] == "OUTPUT0"
    assert_same(data, shm)


def _entry(*fields: bytes) -> bytes:
    return b"".join(fields)


def test_map_entries(shm) -> None:
    """Duplicate keys (the last entry wins whole), missing key or value, merged values, oneof order."""
    int64 = ld(2, tag(2, 0) + varint(-3))
    string = ld(2, ld(3, b"s"))
    data = (ld(4, _entry(ld(1, b"sequence_id"), int64)) + ld(4, _entry(ld(1, b"sequence_id"), string))
            + ld(4, _entry(string, ld(1, b"k"), ld(1, b"key")))  # value first, key twice
            + ld(4, _entry(ld(1, b"nothing")))  # no value: no member set
            + ld(4, string)  # no key: ""
            # two value fields merge: the last member set wins across them
            + ld(4, _entry(ld(1, b"m"), ld(2, tag(1, 0) + b"\x01"), ld(2, tag(4, 1) + struct.pack("<d", 0.5))))
            + ld(4, _entry(ld(1, b"n"), ld(2, tag(4, 1) + struct.pack("<d", 0.5) + tag(1, 0) + b"\x02"))))
    decoded = v2grpc.decode_infer_request(data)
    assert decoded.parameters == {"sequence_id": ("string_param", "s"), "key": ("string_param", "s"),
                                  "nothing": (None, None), "": ("string_param", "s"),
                                  "m": ("double_param", 0.5), "n": ("bool_param", True)}
    assert decoded.parameters == v2grpc._decode_with_protobuf(data).parameters
    assert assert_same(data, shm)[0] == "ServerError"  # "nothing" has no valid type
    with_inputs = ld(5, ld(1, b"i") + ld(4, ld(1, b"a") + int64) + ld(4, ld(1, b"a") + ld(2, b"")))
    assert v2grpc.decode_infer_request(with_inputs).inputs[0][3] == {"a": None}
    assert_same(with_inputs, shm)


@pytest.mark.parametrize("level", ["request", "input", "output", "entry", "parameter", "contents"])
@pytest.mark.parametrize("field", [
    tag(9, 0) + varint(1 << 63), tag(9, 1) + b"12345678", tag(10, 2) + b"\x02ab", tag(11, 5) + b"1234",
    tag(12, 3) + tag(1, 0) + b"\x01" + tag(12, 4), tag(20000, 3) + tag(20000, 4),
    tag(13, 0) + b"\x80\x01", tag(1 << 28, 2) + b"\x00",
])
def test_unknown_fields_are_skipped(shm, level: str, field: bytes) -> None:
    def build(extra: bytes) -> bytes:
        entry = ld(1, b"binary_data_size") + ld(2, tag(2, 0) + b"\x40" + (extra if level == "parameter" else b""))
        entry += extra if level == "entry" else b""
        contents = ld(5, tag(2, 0) + b"\x01" + (extra if level == "contents" else b"")) if level == "contents" else b""
        tensor = ld(1, b"INPUT0") + ld(2, b"INT32") + ld(3, b"\x01") + ld(4, entry) + contents
        tensor += extra if level == "input" else b""
        output = ld(1, b"OUTPUT0") + (extra if level == "output" else b"")
        return ld(1, b"m") + ld(5, tensor) + ld(6, output) + (b"" if contents else ld(7, b"abcd")) \
            + (extra if level == "request" else b"")
    expected = assert_same(build(b""), shm)
    assert expected[0] == "ok"
    if level == "entry":  # upb keeps a map entry with an unknown field out of the map
        expected[1][4][0][3].clear()
    assert assert_same(build(field), shm) == expected


@pytest.mark.parametrize("field", [
    tag(9, 6) + b"\x00", tag(9, 7) + b"\x00", tag(0, 0) + b"\x00", tag(0, 2) + b"\x00", tag(9, 4),
    tag(9, 3) + tag(10, 4), tag(9, 3) + tag(9, 0) + b"\x00",  # an unterminated group; one closed wrongly
    tag(9, 1) + b"1234567", tag(9, 5) + b"123", tag(9, 0) + b"\x80", tag(9, 2) + b"\x02a",  # cut short
    tag(1 << 28, 0)[:-1],
])
def test_unparseable_fields(shm, field: bytes) -> None:
    """Wire types 6 and 7, field number 0, stray or unterminated groups, fields cut short: DecodeError at
    every level, whether the message ends there or goes on (a field must not run into the next one)."""
    for data in (field, ld(5, field), ld(6, field), ld(4, field), ld(4, ld(2, field)), ld(5, ld(5, field)),
                 ld(5, ld(4, field)), ld(6, ld(2, ld(2, field)))):
        for after in (b"", ld(1, b"m") + ld(1, b"m")):
            assert assert_same(data + after, shm) == ("DecodeError",), data + after


def test_fields_cut_short_inside_known_fields(shm) -> None:
    """A packed shape, a map entry's value, a parameter's string that end inside a varint or a length."""
    for data in (ld(5, ld(3, b"\x01\x80")), ld(5, ld(4, ld(2, b"\x80"))), ld(5, ld(4, ld(2, tag(3, 2) + b"\x80"))),
                 ld(6, ld(2, ld(2, tag(2, 0) + b"\xff"))), ld(4, ld(2, tag(4, 1) + b"1234567"))):
        for after in (b"", ld(1, b"m") + ld(1, b"m")):
            assert assert_same(data + after, shm) == ("DecodeError",), data + after


def test_known_fields_with_other_wire_types(shm) -> None:
    """protobuf keeps them as unknown fields: so does the decoder (through its protobuf fallback)."""
    for field in (tag(1, 0) + b"\x05", tag(7, 5) + b"1234", ld(5, tag(3, 1) + b"12345678"),
                  ld(4, ld(2, tag(3, 0) + b"\x01")), ld(4, ld(2, ld(2, b"\x01"))), ld(6, tag(1, 1) + b"12345678"),
                  b"\x8a\x00\x02ab"):  # model_name with a two-byte tag
        assert assert_same(ld(1, b"add_sub") + field + ld(1, b"m"), shm)[0] != "DecodeError"


def test_invalid_utf8_in_every_string(shm) -> None:
    bad = b"a\xff"
    cases = [
        ld(1, bad), ld(2, bad), ld(3, bad), ld(4, ld(1, bad)), ld(4, ld(1, b"k") + ld(2, ld(3, bad))),
        ld(5, ld(1, bad)), ld(5, ld(2, bad)), ld(5, ld(4, ld(1, bad))), ld(5, ld(4, ld(2, ld(3, bad)))),
        ld(6, ld(1, bad)), ld(6, ld(2, ld(1, bad))), ld(6, ld(2, ld(2, ld(3, bad)))),
        ld(1, b"\xed\xa0\x80"), ld(1, b"\xc0\x80"), ld(1, b"\xf4\x90\x80\x80"),  # surrogate, overlong, > U+10FFFF
    ]
    for data in cases:
        with pytest.raises(DecodeError):
            v2grpc.decode_infer_request(data)
        assert assert_same(data, shm) == ("DecodeError",)
    assert assert_same(ld(5, ld(5, ld(8, bad))) + ld(1, b"m"), shm)[0] == "ServerError"  # bytes_contents: any bytes


def test_bytearray_and_memoryview_messages(shm) -> None:
    data = _add_sub().SerializeToString()
    expected = _outcome(v2grpc.decode_infer_request, v2grpc.parse_request, data, shm)
    for other in (bytearray(data), memoryview(data)):
        assert _outcome(v2grpc.decode_infer_request, v2grpc.parse_request, other, shm) == expected


def test_typed_contents(shm) -> None:
    r = pb.ModelInferRequest(model_name="m")
    t = r.inputs.add(name="S", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"ab", b""])
    t = r.inputs.add(name="I", datatype="INT8", shape=[3])
    t.contents.int_contents.extend([-1, 2, 300])
    t = r.inputs.add(name="E", datatype="FP32", shape=[0])
    t.contents.SetInParent()  # present, empty: no raw contents expected for it
    data = r.SerializeToString()
    request = v2grpc.parse_request(v2grpc.decode_infer_request(data), shm)
    assert [bytes(t.data) for t in request.inputs] == [b"\x02\x00\x00\x00ab\x00\x00\x00\x00", b"\xff\x02\x2c", b""]
    assert assert_same(data, shm)[0] == "ok"
    r.raw_input_contents.append(b"x")
    assert assert_same(r.SerializeToString(), shm)[2].startswith("contents field must not be specified")


def test_stream_error_keeps_the_request_id() -> None:
    """A streamed request that parse_request refuses is answered with its id (protocol/grpc/front.py)."""
    data = ld(1, b"m") + ld(3, b"req-9") + ld(5, ld(1, b"x"))
    decoded = v2grpc.decode_infer_request(data)
    assert decoded.id == "req-9"
    with pytest.raises(ServerError):
        v2grpc.parse_request(decoded, SharedMemoryRegistry())


def test_the_fallback_is_for_rare_shapes(shm, monkeypatch) -> None:
    calls = []
    fallback = v2grpc._decode_with_protobuf
    monkeypatch.setattr(v2grpc, "_decode_with_protobuf", lambda data: calls.append(data) or fallback(data))
    plain = _add_sub().SerializeToString()
    v2grpc.decode_infer_request(plain)
    assert not calls
    for rare in (tag(9, 3) + tag(9, 4), tag(1, 0) + b"\x01", ld(5, ld(1, b"x") + tag(1, 5) + b"1234")):
        assert v2grpc.decode_infer_request(plain + rare).model_name == "add_sub"
        assert calls.pop() == plain + rare


def test_recent_tensors_are_kept_safely(shm) -> None:
    """The decoder keeps recent tensors by their bytes: what the core gets is its own to change."""
    data = _add_sub(True).SerializeToString()
    first = v2grpc.parse_request(v2grpc.decode_infer_request(data), shm)
    first.inputs[0].shape.append(99)
    first.inputs[0].parameters["shared_memory_region"] = "changed"
    first.outputs[0].parameters.clear()
    again = v2grpc.decode_infer_request(bytearray(data))  # a bytearray finds the same tensors
    assert again.inputs[0] is v2grpc.decode_infer_request(data).inputs[0]
    assert _request(v2grpc.parse_request(again, shm)) == _request(_old_parse_request(
        pb.ModelInferRequest.FromString(data), [], shm))


def test_kept_tensors_are_bounded(shm, monkeypatch) -> None:
    monkeypatch.setattr(v2grpc, "_CACHED_TENSORS", 8)
    for i in range(20):
        data = ld(5, ld(1, b"x%d" % i) + ld(2, b"FP32")) + ld(6, ld(1, b"y%d" % i)) + ld(6, ld(1, b"z" * 600))
        assert v2grpc.decode_infer_request(data).inputs[0][0] == f"x{i}"
        assert len(v2grpc._INPUTS) <= 8 and len(v2grpc._OUTPUTS) <= 8
    assert all(len(key) <= v2grpc._CACHED_SIZE for key in v2grpc._OUTPUTS)
    typed = ld(5, ld(1, b"t") + ld(5, b""))
    v2grpc.decode_infer_request(typed)
    assert typed[2:] not in v2grpc._INPUTS  # typed contents are not kept
