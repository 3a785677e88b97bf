"""KServe v2 gRPC codec: ModelInferRequest messages in, ModelInferResponse wire bytes out.

Requests are read from the wire format here, not by protobuf (:func:`decode_infer_request`). Parsing
into a protobuf message and then reading it back field by field (maps, repeated containers, oneof
look-ups: each access makes Python objects) was about a quarter of the gRPC front's busy time per small
request; the decoder makes only the values the core uses, in tuples and dicts (:class:`InferMessage`).
It reads as protobuf (upb) does, which tests/test_grpc_decoder.py checks on generated messages: the last
value of a singular field wins, map entries with a repeated key too, a missing key or value is the
default, an entry with a field unknown to it stays out of the map, int64 varints wrap, unknown fields
are skipped; malformed bytes and invalid UTF-8 raise protobuf's DecodeError. What it leaves to protobuf
is rare: an input's typed ``contents`` are parsed by protobuf where they occur, and a message with a
group or a known field under another wire type is decoded by protobuf whole.

Tensor bytes skip protobuf both ways:

- ``raw_input_contents`` are memoryview slices of the received message: the core copies them once,
  into the worker's arena.
- Responses are serialised by hand around protobuf (:func:`encode_infer_response`):
  the small header is a protobuf message and each ``raw_output_contents`` entry
  is joined straight from the worker's shared memory (one copy).
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from kernel.classification import PARAMETER as CLASSIFICATION
from kernel.classification import from_grpc
from kernel.errors import ServerError, invalid
from kernel.shm_registry import SharedMemoryRegistry
from kernel.types import InferRequest, InferResponse, InputTensor, RequestedOutput, ShmRef
from protocol import grpc_service_pb2 as pb
from protocol.http.v2json import shm_ref
from shm import dtypes

#: Request parameter keys starting with ``triton_`` that clients may send (Triton's list).
TRITON_RESERVED_REQUEST_PARAMS = ("triton_enable_empty_final_response",)
_INT64_MAX = (1 << 63) - 1
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_TWO64 = 1 << 64
_MASK64 = _TWO64 - 1

# Response wire tags (field number << 3 | wire type 2).
_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents (6)
_STREAM_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response (2)

# InferTensorContents field -> the request datatypes it may carry (Triton's rules); the first is the
# field's own type, the others travel widened to it.
_CONTENTS: dict[str, tuple[str, ...]] = {
    "bool_contents": ("BOOL",),
    "int_contents": ("INT32", "INT8", "INT16"),
    "int64_contents": ("INT64",),
    "uint_contents": ("UINT32", "UINT8", "UINT16"),
    "uint64_contents": ("UINT64",),
    "fp32_contents": ("FP32",),
    "fp64_contents": ("FP64",),
    "bytes_contents": ("BYTES",),
}
_CONTENTS_DTYPE = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
                   "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
                   "fp64_contents": np.float64}


#: One input as decoded: name, datatype, shape, parameters (values), typed contents (None when the
#: field is absent; the merged protobuf message when present, even empty).
DecodedInput = tuple[str, str, list[int], dict[str, Any], "pb.InferTensorContents | None"]
#: One requested output as decoded: name, parameters (values; ``classification`` as (member set, value):
#: its type is checked, and uint64_param 2 is not int64_param 2).
DecodedOutput = tuple[str, dict[str, Any]]


class InferMessage(NamedTuple):
    """A decoded ModelInferRequest, in plain Python values (no protobuf objects on the common path).

    Request ``parameters`` keep which InferParameter member was set, ``(member, value)``, for the
    type checks of :func:`_request_parameters`; tensor parameters are values only (None when no
    member is set). ``raw`` holds the raw input contents as views of the received bytes.

    Inputs and outputs may be shared with other messages (the decoder keeps recent ones): read them,
    never change them; :func:`parse_request` copies what the core may keep.
    """

    model_name: str
    model_version: str
    id: str
    parameters: dict[str, tuple[str | None, Any]]
    inputs: list[DecodedInput]
    outputs: list[DecodedOutput]
    raw: list[memoryview]


_new_tuple = tuple.__new__


class _Fallback(Exception):
    """The message uses a shape the wire decoder leaves to protobuf (a group, or a known field with
    another wire type than its own): the whole message is decoded by protobuf instead."""


def _varint_rest(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """The varint whose first byte ``value`` (>= 0x80) ends just before ``pos``: (value mod 2**64, end).

    Like upb: at most 10 bytes, bits beyond 64 dropped. Past the end of ``data``: IndexError.
    """
    value &= 0x7F
    shift = 7
    limit = pos + 9
    while pos < limit:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _MASK64, pos
        shift += 7
    raise DecodeError("varint longer than 10 bytes")


def _int64_rest(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """:func:`_varint_rest` read as an int64 (two's complement: 2**63 and above are negative)."""
    value, pos = _varint_rest(data, pos, value)
    return (value - _TWO64 if value > _INT64_MAX else value), pos


def _skip(data: bytes, pos: int, end: int, known: int) -> int:
    """Skip the field whose tag starts at ``pos``: one the fast loops do not read.

    A field numbered 1..``known`` is one of the message's own, under another wire type than its own or
    with a tag longer than needed; groups may nest: protobuf decides for those (:class:`_Fallback`).
    """
    tag = data[pos]
    pos += 1
    if tag >= 0x80:
        start = pos
        tag, pos = _varint_rest(data, pos, tag)
        if pos - start > 4 or tag > 0xFFFFFFFF:  # upb: a tag is at most 5 bytes, 32 bits
            raise DecodeError("invalid tag")
    wire = tag & 7
    if wire == 3 or wire == 4:
        raise _Fallback
    field = tag >> 3
    if field <= known:
        if field == 0:
            raise DecodeError("field number 0")
        raise _Fallback
    if wire == 0:
        byte = data[pos]
        pos += 1
        if byte >= 0x80:
            pos = _varint_rest(data, pos, byte)[1]
    elif wire == 2:
        size = data[pos]
        pos += 1
        if size >= 0x80:
            size, pos = _varint_rest(data, pos, size)
        pos += size
        if pos > end:
            raise DecodeError("truncated field")
    elif wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    else:
        raise DecodeError(f"invalid wire type {wire}")
    return pos  # past ``end``: the caller's end check reports it


def _map_entry(data: bytes, pos: int, end: int) -> tuple[str | None, str | None, Any]:
    """A ``map<string, InferParameter>`` entry: (key, member set or None, value).

    A missing key is ""; several value fields merge (protobuf's rule for a singular message field),
    so across them the last member set wins, as within one. An entry with a field of its own unknown
    to it is kept out of the map by upb (it goes to the message's unknown fields): key None.
    """
    key: str | None = ""
    which: str | None = None
    value: Any = None
    unknown = False
    while pos < end:
        tag = data[pos]
        if tag == 0x0A or tag == 0x12:
            size = data[pos + 1]
            pos += 2
            if size >= 0x80:
                size, pos = _varint_rest(data, pos, size)
            start = pos
            pos += size
            if pos > end:
                raise DecodeError("truncated map entry")
            if tag == 0x0A:
                key = data[start:pos].decode()
                continue
            while start < pos:  # the InferParameter; every field has a value byte after its tag
                tag = data[start]
                number = data[start + 1]
                start += 2
                if tag == 0x1A:
                    if number >= 0x80:
                        number, start = _varint_rest(data, start, number)
                    text = start
                    start += number
                    if start > pos:
                        raise DecodeError("truncated string_param")
                    which, value = "string_param", data[text:start].decode()
                elif tag == 0x10:
                    if number >= 0x80:
                        number, start = _int64_rest(data, start, number)
                    which, value = "int64_param", number
                elif tag == 0x08:
                    if number >= 0x80:
                        number, start = _varint_rest(data, start, number)
                    which, value = "bool_param", number != 0
                elif tag == 0x28:
                    if number >= 0x80:
                        number, start = _varint_rest(data, start, number)
                    which, value = "uint64_param", number
                elif tag == 0x21:
                    start -= 1
                    if start + 8 > pos:
                        raise DecodeError("truncated double_param")
                    which, value = "double_param", _F64.unpack_from(data, start)[0]
                    start += 8
                else:
                    start = _skip(data, start - 2, pos, 5)
            if start != pos:
                raise DecodeError("truncated InferParameter")
        else:
            pos = _skip(data, pos, end, 2)
            unknown = True
    if pos != end:
        raise DecodeError("truncated map entry")
    return (None if unknown else key), which, value


def _decode_input(data: bytes, pos: int, end: int) -> DecodedInput:
    """One ModelInferRequest.InferInputTensor."""
    name = datatype = ""
    shape: list[int] = []
    params: dict[str, Any] = {}
    contents = None
    while pos < end:
        tag = data[pos]
        if tag & 7 == 2 and tag <= 0x2A:
            size = data[pos + 1]
            pos += 2
            if size >= 0x80:
                size, pos = _varint_rest(data, pos, size)
            start = pos
            pos += size
            if pos > end:
                raise DecodeError("truncated input tensor")
            if tag == 0x0A:
                name = data[start:pos].decode()
            elif tag == 0x12:
                datatype = data[start:pos].decode()
            elif tag == 0x1A:  # shape, packed
                while start < pos:
                    dim = data[start]
                    start += 1
                    if dim >= 0x80:
                        dim, start = _int64_rest(data, start, dim)
                    shape.append(dim)
                if start != pos:
                    raise DecodeError("truncated shape")
            elif tag == 0x22:
                key, _, value = _map_entry(data, start, pos)
                if key is not None:
                    params[key] = value
            elif tag == 0x2A:  # typed contents: rare, left to protobuf (each occurrence merged, as protobuf does)
                if contents is None:
                    contents = pb.InferTensorContents()
                contents.MergeFromString(data[start:pos])
            else:
                raise DecodeError("field number 0")
        elif tag == 0x18:  # shape, one element
            dim = data[pos + 1]
            pos += 2
            if dim >= 0x80:
                dim, pos = _int64_rest(data, pos, dim)
            shape.append(dim)
        else:
            pos = _skip(data, pos, end, 5)
    if pos != end:
        raise DecodeError("truncated input tensor")
    return name, datatype, shape, params, contents


def _decode_output(data: bytes, pos: int, end: int) -> DecodedOutput:
    """One ModelInferRequest.InferRequestedOutputTensor."""
    name = ""
    params: dict[str, Any] = {}
    while pos < end:
        tag = data[pos]
        if tag == 0x0A or tag == 0x12:
            size = data[pos + 1]
            pos += 2
            if size >= 0x80:
                size, pos = _varint_rest(data, pos, size)
            start = pos
            pos += size
            if pos > end:
                raise DecodeError("truncated output tensor")
            if tag == 0x0A:
                name = data[start:pos].decode()
            else:
                key, which, value = _map_entry(data, start, pos)
                if key is not None:
                    params[key] = (which, value) if key == CLASSIFICATION else value
        else:
            pos = _skip(data, pos, end, 2)
    if pos != end:
        raise DecodeError("truncated output tensor")
    return name, params


#: Tensors as decoded, by their bytes. Clients describe the same tensors request after request
#: (perf_analyzer, tritonclient), and reading their parameter maps is the costly part of a request
#: (about 0.5 us an entry): a tensor seen before costs a dict look-up. Bounded in number and in the size
#: of what is kept (emptied when full); inputs with typed contents are not kept.
_INPUTS: dict[bytes, DecodedInput] = {}
_OUTPUTS: dict[bytes, DecodedOutput] = {}
_CACHED_TENSORS = 512
_CACHED_SIZE = 512


def _decode_wire(data: bytes | bytearray) -> InferMessage:
    model_name = model_version = request_id = ""
    params: dict[str, tuple[str | None, Any]] = {}
    inputs: list[DecodedInput] = []
    outputs: list[DecodedOutput] = []
    raw: list[memoryview] = []
    view = None
    frozen = type(data) is bytes  # a bytearray's slices are no dict keys
    pos, end = 0, len(data)
    while pos < end:
        tag = data[pos]
        if tag & 7 != 2 or tag > 0x3A:
            pos = _skip(data, pos, end, 7)
            continue
        size = data[pos + 1]
        pos += 2
        if size >= 0x80:
            size, pos = _varint_rest(data, pos, size)
        start = pos
        pos += size
        if pos > end:
            raise DecodeError("truncated message")
        if tag == 0x2A:
            key = data[start:pos] if frozen else bytes(data[start:pos])
            item = _INPUTS.get(key)
            if item is None:
                item = _decode_input(data, start, pos)
                if item[4] is None and size <= _CACHED_SIZE:
                    if len(_INPUTS) >= _CACHED_TENSORS:
                        _INPUTS.clear()
                    _INPUTS[key] = item
            inputs.append(item)
        elif tag == 0x3A:
            if view is None:
                view = memoryview(data)
            raw.append(view[start:pos])
        elif tag == 0x32:
            key = data[start:pos] if frozen else bytes(data[start:pos])
            out = _OUTPUTS.get(key)
            if out is None:
                out = _decode_output(data, start, pos)
                if size <= _CACHED_SIZE:
                    if len(_OUTPUTS) >= _CACHED_TENSORS:
                        _OUTPUTS.clear()
                    _OUTPUTS[key] = out
            outputs.append(out)
        elif tag == 0x0A:
            model_name = data[start:pos].decode()
        elif tag == 0x12:
            model_version = data[start:pos].decode()
        elif tag == 0x1A:
            request_id = data[start:pos].decode()
        elif tag == 0x22:
            key, which, value = _map_entry(data, start, pos)
            if key is not None:
                params[key] = (which, value)
        else:
            raise DecodeError("field number 0")
    if pos != end:
        raise DecodeError("truncated message")
    # tuple.__new__: what the NamedTuple's own constructor ends in, without its Python-level call
    return _new_tuple(InferMessage, (model_name, model_version, request_id, params, inputs, outputs, raw))


def decode_infer_request(data: bytes | bytearray) -> InferMessage:
    """A serialised ModelInferRequest as an :class:`InferMessage` (raw contents as views of ``data``).

    Malformed bytes raise protobuf's DecodeError, as protobuf would for the same bytes.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    try:
        return _decode_wire(data)
    except _Fallback:
        return _decode_with_protobuf(data)
    except IndexError:  # a varint or tag running past the end of the message
        raise DecodeError("truncated message") from None
    except UnicodeDecodeError:
        raise DecodeError("invalid UTF-8 in a string field") from None


def _decode_with_protobuf(data: bytes | bytearray) -> InferMessage:
    """The same decoding by protobuf (upb): the fallback for rare shapes, and the tests' reference."""
    msg = pb.ModelInferRequest.FromString(data)
    params = {key: (p.WhichOneof("parameter_choice"), param_value(p)) for key, p in msg.parameters.items()}
    inputs: list[DecodedInput] = [
        (item.name, item.datatype, list(item.shape), params_dict(item.parameters),
         item.contents if item.HasField("contents") else None)
        for item in msg.inputs]
    outputs: list[DecodedOutput] = []
    for o in msg.outputs:
        oparams = params_dict(o.parameters)
        if CLASSIFICATION in oparams:
            oparams[CLASSIFICATION] = (o.parameters[CLASSIFICATION].WhichOneof("parameter_choice"),
                                       oparams[CLASSIFICATION])
        outputs.append((o.name, oparams))
    raw = [memoryview(contents) for contents in msg.raw_input_contents]
    return InferMessage(msg.model_name, msg.model_version, msg.id, params, inputs, outputs, raw)


# -- requests ---------------------------------------------------------------------------------------------
def param_value(p: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (None when no choice is set)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def params_dict(params: Any) -> dict:
    """An InferParameter map as a plain dict."""
    return {k: param_value(v) for k, v in params.items()} if params else {}


def _request_parameters(params: dict[str, tuple[str | None, Any]]) -> dict:
    """Request parameters, type-checked like Triton's SetInferenceRequestMetadata.

    The first offending parameter in wire order is reported (protobuf's map, used before, iterated in
    its hash order, which changes from one process to the next).
    """
    out: dict[str, Any] = {}
    for key, (which, value) in params.items():
        if key == "sequence_id":
            if which not in ("int64_param", "string_param"):
                raise invalid("invalid value type for 'sequence_id' parameter, expected int64_param or string_param.")
        elif key in ("sequence_start", "sequence_end"):
            if which != "bool_param":
                raise invalid(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif key == "priority":
            if which not in ("int64_param", "uint64_param"):
                raise invalid("invalid value type for 'priority' parameter, expected int64_param or uint64_param.")
            if which == "int64_param" and value < 0:
                raise invalid("invalid value for 'priority', expected value >= 0.")
        elif key == "timeout":
            if which != "int64_param":
                raise invalid("invalid value type for 'timeout' parameter, expected int64_param.")
        elif key.startswith("triton_"):
            if key not in TRITON_RESERVED_REQUEST_PARAMS:
                raise invalid("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                              "following keys starting with 'triton_' are allowed: "
                              + " ".join(TRITON_RESERVED_REQUEST_PARAMS))
            if which != "bool_param":
                raise invalid(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif which not in ("int64_param", "bool_param", "string_param"):
            raise invalid(f"invalid value type for '{key}' parameter, expected int64_param, bool_param, "
                          "or string_param.")
        out[key] = value
    return out


def parse_request(decoded: InferMessage, shm: SharedMemoryRegistry) -> InferRequest:
    """Build the core's request from a decoded ModelInferRequest (raw inputs stay views)."""
    model = decoded.model_name
    request = InferRequest(model, decoded.model_version, decoded.id)
    if decoded.parameters:
        request.parameters = _request_parameters(decoded.parameters)
    raw = decoded.raw
    index = 0
    for name, datatype, shape, params, contents in decoded.inputs:
        tensor = InputTensor(name, datatype, list(shape), parameters=dict(params))
        if params and _SHM_KEYS.intersection(params):
            if contents is not None:
                raise invalid(f"unexpected 'content' provided when using shared memory for input tensor "
                              f"'{name}' for model '{model}'")
            tensor.data = _shm_ref(params, name, shm)
        elif contents is not None:
            if raw:
                raise invalid(f"contents field must not be specified when using raw_input_contents for "
                              f"'{name}' for model '{model}'")
            tensor.data = _typed_contents(name, datatype, contents, model)
        elif index < len(raw):
            tensor.data = raw[index]
            index += 1
        else:
            raise invalid(f"unable to find data for input tensor '{name}' for model '{model}' in request.")
        request.inputs.append(tensor)
    # Like Triton, raw_input_contents beyond the inputs that use them are ignored.
    if decoded.outputs:
        outputs = []
        for name, params in decoded.outputs:
            out = RequestedOutput(name, parameters=dict(params))
            if CLASSIFICATION in params:
                which, value = params[CLASSIFICATION]
                out.parameters[CLASSIFICATION] = value
                classes = from_grpc(which, value, params)
                if classes:
                    if request.classification is None:
                        request.classification = {}
                    request.classification[name] = classes
            if params and _SHM_KEYS.intersection(params):
                out.shm = _shm_ref(params, name, shm)
            outputs.append(out)
        request.outputs = outputs
    return request


_SHM_KEYS = frozenset(("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"))


def _shm_ref(params: dict, name: str, shm: SharedMemoryRegistry) -> ShmRef:
    """A tensor's shared_memory_* parameters checked in Triton's order and words (its gRPC front's
    ParseSharedMemoryParams), then resolved like HTTP's. (An integer parameter's wire type is not kept here:
    uint64_param passes where Triton asks for int64_param; tritonclient sends int64_param.)"""
    has_region = "shared_memory_region" in params
    if has_region and type(params["shared_memory_region"]) is not str:
        raise invalid(f"invalid value type for 'shared_memory_region' parameter for tensor '{name}', expected "
                      "string_param.")
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        if key in params:
            if not has_region:
                raise invalid(f"'{key}' can not be specified without 'shared_memory_region' parameter for tensor "
                              f"'{name}'")
            if type(params[key]) is not int:
                raise invalid(f"invalid value type for '{key}' parameter for tensor '{name}', expected int64_param.")
    if "shared_memory_byte_size" not in params:
        raise invalid(f"'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for "
                      f"tensor '{name}'")
    return shm_ref(params, name, shm)


def _typed_contents(name: str, datatype: str, contents: pb.InferTensorContents, model: str) -> memoryview | bytes:
    """An input's typed ``contents`` as raw little-endian bytes, as Triton turns them into its input buffer.

    Core then checks them like raw data, with Triton's byte-size and string-count messages.
    """
    data: memoryview | bytes | None = None
    for field, allowed in _CONTENTS.items():
        values = getattr(contents, field)
        if not values:
            continue
        if data is not None:
            raise invalid(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}', "
                          "binary data was already supplied.")
        if datatype not in allowed:
            expected = datatype if datatype in dtypes.NUMPY else "<invalid>"
            raise invalid(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type "
                          f"'{allowed[0]}', expected datatype '{expected}'")
        if field == "bytes_contents":
            data = b"".join(part for value in values for part in (_U32.pack(len(value)), value))
        else:
            array = np.array(values, dtype=_CONTENTS_DTYPE[field])
            if datatype != allowed[0]:  # INT8/INT16/UINT8/UINT16 travel widened: keep the low bytes
                array = array.astype(dtypes.NUMPY[datatype])
            data = memoryview(array).cast("B")
    return b"" if data is None else data


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# -- responses --------------------------------------------------------------------------------------------
def set_param(p: pb.InferParameter, value: Any) -> None:
    """Store a Python value in an InferParameter (bool/int64/uint64/double/string)."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        p.string_param = json.dumps(value)


def _response_parts(response: InferResponse, final: bool | None) -> list:
    """The ModelInferResponse wire form as parts: a protobuf header, then raw contents entries."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                id=response.id)
    for key, value in response.parameters.items():
        set_param(msg.parameters[key], value)
    if final is not None:
        msg.parameters["triton_final_response"].bool_param = final
    blobs = []
    for out in response.outputs:
        tensor = msg.outputs.add()
        tensor.name = out.name
        tensor.datatype = out.datatype
        tensor.shape.extend(out.shape)
        # Like Triton, every output has a raw_output_contents entry (empty when written to the
        # client's region): tritonclient indexes raw_output_contents by output position.
        blobs.append(out.data if out.shm is None and out.data is not None else b"")
    parts: list = [msg.SerializeToString()]
    for blob in blobs:
        parts.append(_RAW_OUTPUT_TAG + _varint(blob.nbytes if isinstance(blob, memoryview) else len(blob)))
        parts.append(blob)
    return parts


def encode_infer_response(response: InferResponse) -> bytes:
    """A serialised ModelInferResponse; the caller releases ``response`` afterwards."""
    return b"".join(_response_parts(response, None))


def encode_stream_response(response: InferResponse, final: bool) -> bytes:
    """A serialised ModelStreamInferResponse with Triton's ``triton_final_response`` parameter."""
    parts = _response_parts(response, final)
    size = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)
    return b"".join([_STREAM_RESPONSE_TAG + _varint(size), *parts])


def encode_stream_error(error: ServerError, request_id: str, model_name: str = "", model_version: str = "",
                        final: bool | None = None) -> bytes:
    """A ModelStreamInferResponse that reports ``error`` (the stream stays open)."""
    inner = pb.ModelInferResponse(id=request_id, model_name=model_name, model_version=model_version)
    if final is not None:
        inner.parameters["triton_final_response"].bool_param = final
    return pb.ModelStreamInferResponse(error_message=error.message, infer_response=inner).SerializeToString()


def encode_stream_empty_final(request: InferRequest) -> bytes:
    """Triton's empty final response of a decoupled request (``triton_enable_empty_final_response``)."""
    inner = pb.ModelInferResponse(id=request.id, model_name=request.model_name,
                                  model_version=request.model_version)
    inner.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=inner).SerializeToString()


