"""KServe v2 gRPC codec: ModelInferRequest messages in, ModelInferResponse wire bytes out.

Tensor bytes skip protobuf both ways:

- ``raw_input_contents`` are cut out of the received message as memoryview
  slices before protobuf parses the rest (:func:`decode_infer_request`): the
  core copies them once, into the worker's arena.
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

from kernel.errors import ServerError, invalid
from kernel.shm_registry import SharedMemoryRegistry
from kernel.types import InferRequest, InferResponse, InputTensor, RequestedOutput
from protocol import dtypes
from protocol import grpc_service_pb2 as pb
from protocol.v2json import shm_ref

#: Request parameter keys starting with ``triton_`` that clients may send (Triton's list).
TRITON_RESERVED_REQUEST_PARAMS = ("triton_enable_empty_final_response",)
_INT64_MAX = (1 << 63) - 1
_U32 = struct.Struct("<I")

# Wire tags (field number << 3 | wire type 2).
_RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
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


class InferMessage(NamedTuple):
    """A decoded ModelInferRequest: the message without its raw contents, and those as views."""

    message: pb.ModelInferRequest
    raw: list[memoryview]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_infer_request(data: bytes) -> InferMessage:
    """Split ``raw_input_contents`` out of a serialised ModelInferRequest (as views), parse the rest."""
    view = memoryview(data)
    raw: list[memoryview] = []
    kept: list[memoryview] = []
    pos, end, segment = 0, len(data), 0
    while pos < end:
        start = pos
        tag, pos = _read_varint(data, pos)
        wire = tag & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            if tag >> 3 == _RAW_INPUT_FIELD:
                if pos + length > end:
                    raise DecodeError("truncated raw_input_contents")
                if segment < start:
                    kept.append(view[segment:start])
                raw.append(view[pos : pos + length])
                segment = pos + length
            pos += length
        elif wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
    if pos != end:
        raise DecodeError("truncated message")
    if not raw:
        return InferMessage(pb.ModelInferRequest.FromString(data), raw)
    if segment < end:
        kept.append(view[segment:end])
    return InferMessage(pb.ModelInferRequest.FromString(b"".join(kept)), raw)


# -- requests ---------------------------------------------------------------------------------------------
def param_value(p: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (None when no choice is set)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def params_dict(params: Any) -> dict:
    """An InferParameter map as a plain dict."""
    return {k: param_value(v) for k, v in params.items()} if params else {}


def _request_parameters(params: Any) -> dict:
    """Request parameters, type-checked like Triton's SetInferenceRequestMetadata."""
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
            if key not in TRITON_RESERVED_REQUEST_PARAMS:
                raise invalid("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                              "following keys starting with 'triton_' are allowed: "
                              + " ".join(TRITON_RESERVED_REQUEST_PARAMS))
            if which != "bool_param":
                raise invalid(f"invalid value type for '{key}' parameter, expected bool_param.")
        elif which not in ("int64_param", "bool_param", "string_param"):
            raise invalid(f"invalid value type for '{key}' parameter, expected int64_param, bool_param, "
                          "or string_param.")
        out[key] = getattr(p, which)
    return out


def parse_request(decoded: InferMessage, shm: SharedMemoryRegistry) -> InferRequest:
    """Build the core's request from a decoded ModelInferRequest (raw inputs stay views)."""
    msg, raw = decoded
    model = msg.model_name
    request = InferRequest(model, msg.model_version, msg.id)
    if msg.parameters:
        request.parameters = _request_parameters(msg.parameters)
    index = 0
    for item in msg.inputs:
        name = item.name
        params = params_dict(item.parameters)
        tensor = InputTensor(name, item.datatype, list(item.shape), parameters=params)
        has_contents = item.HasField("contents")
        if params.get("shared_memory_region") is not None:
            if has_contents:
                raise invalid(f"unexpected 'content' provided when using shared memory for input tensor "
                              f"'{name}' for model '{model}'")
            tensor.data = shm_ref(params, name, shm)
        elif has_contents:
            if raw:
                raise invalid(f"contents field must not be specified when using raw_input_contents for "
                              f"'{name}' for model '{model}'")
            tensor.data = _typed_contents(item, model)
        elif index < len(raw):
            tensor.data = raw[index]
            index += 1
        else:
            raise invalid(f"unable to find data for input tensor '{name}' for model '{model}' in request.")
        request.inputs.append(tensor)
    # Like Triton, raw_input_contents beyond the inputs that use them are ignored.
    if msg.outputs:
        outputs = []
        for o in msg.outputs:
            params = params_dict(o.parameters)
            out = RequestedOutput(o.name, parameters=params)
            if params.get("shared_memory_region") is not None:
                out.shm = shm_ref(params, o.name, shm)
            outputs.append(out)
        request.outputs = outputs
    return request


def _typed_contents(item: Any, model: str) -> memoryview | bytes:
    """An input's typed ``contents`` as raw little-endian bytes, as Triton turns them into its input buffer.

    Core then checks them like raw data, with Triton's byte-size and string-count messages.
    """
    name, datatype = item.name, item.datatype
    contents = item.contents
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


