"""KServe v2 JSON and Triton's binary tensor data extension: requests in, responses out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kernel.errors import ServerError, invalid
from kernel.shm_registry import SharedMemoryRegistry
from kernel.types import InferRequest, InferResponse, InputTensor, RequestedOutput, ShmRef
from protocol import dtypes

_SHM_KEYS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def parse_request(model: str, version: str, body: memoryview, header_length: int | None,
                  shm: SharedMemoryRegistry) -> InferRequest:
    """Parse an infer request body (JSON header, then binary tensor data)."""
    size = len(body)
    if header_length is None:
        header_length = size
    elif header_length < 0 or header_length > size:
        raise invalid(f"inference header size should be in range (0, {size}), got: {header_length}")
    try:
        doc = json.loads(body[:header_length].tobytes() if header_length != size else body.tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"failed to parse the request JSON buffer: {_json_error(e)}") from None
    if not isinstance(doc, dict):
        raise invalid("failed to parse the request JSON buffer: The document root must be an object.")
    request = InferRequest(model, version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise invalid("Unable to parse 'id': attempt to access JSON non-string as string")
        request.id = rid
    params = doc.get("parameters")
    if params is not None:
        request.parameters = _params(params, "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("Unable to parse 'inputs': attempt to access non-existent object member 'inputs'"
                      if inputs is None else "Unable to parse 'inputs': attempt to access JSON non-array as array")
    binary = body[header_length:]
    cursor = 0
    for item in inputs:
        tensor, used = _input(item, binary, cursor, shm)
        cursor += used
        request.inputs.append(tensor)
    if cursor != len(binary):
        raise invalid(f"unexpected additional input data for model '{model}'"
                      if cursor < len(binary) else "unexpected end of input data")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise invalid("Unable to parse 'outputs': attempt to access JSON non-array as array")
        request.outputs = [_output(o, shm) for o in outputs]
    return request


def _json_error(e: Exception) -> str:
    return str(e)


def _params(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"Unable to parse '{where}': attempt to access JSON non-object as object")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"Unable to parse '{what}': attempt to access JSON non-integer as integer")
    return value


def _input(item: Any, binary: memoryview, cursor: int, shm: SharedMemoryRegistry) -> tuple[InputTensor, int]:
    if not isinstance(item, dict):
        raise invalid("Unable to parse 'inputs': attempt to access JSON non-object as object")
    name = item.get("name")
    if not isinstance(name, str):
        raise invalid("Unable to parse 'name': attempt to access non-existent object member 'name'")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise invalid("Unable to parse 'datatype': attempt to access non-existent object member 'datatype'")
    if datatype not in dtypes.NUMPY:
        raise invalid(f"invalid datatype '{datatype}' of input '{name}'")
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise invalid("Unable to parse 'shape': attempt to access non-existent object member 'shape'")
    shape = [_int(d, "shape") for d in shape]
    if any(d < 0 for d in shape):
        raise invalid(f"unable to parse 'shape' of input '{name}': dimensions must be non-negative")
    params = _params(item.get("parameters") or {}, "parameters")
    tensor = InputTensor(name, datatype, shape, parameters=params)
    region = params.get("shared_memory_region")
    if region is not None:
        if "data" in item or "binary_data_size" in params:
            raise invalid(f"input '{name}' has shared memory and data given at the same time")
        tensor.data = shm_ref(params, name, shm)
        return tensor, 0
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        binary_size = _int(binary_size, "binary_data_size")
        if "data" in item:
            raise invalid(f"input '{name}' has binary data and JSON data given at the same time")
        if cursor + binary_size > len(binary):
            raise invalid("unexpected end of input data")
        tensor.data = binary[cursor : cursor + binary_size]
        return tensor, binary_size
    if "data" not in item:
        raise invalid(f"input '{name}' must specify 'data' or binary data or shared memory")
    tensor.data = _json_tensor(item["data"], datatype, shape, name)
    return tensor, 0


def shm_ref(params: dict, name: str, shm: SharedMemoryRegistry) -> ShmRef:
    """The registered-region span named by a tensor's shared_memory_* parameters."""
    region = params.get("shared_memory_region")
    if not isinstance(region, str):
        raise invalid(f"Unable to parse 'shared_memory_region' for tensor '{name}'")
    offset = params.get("shared_memory_offset", 0)
    byte_size = params.get("shared_memory_byte_size")
    if byte_size is None:
        raise invalid(f"'shared_memory_byte_size' must be specified for tensor '{name}'")
    offset, byte_size = _int(offset, "shared_memory_offset"), _int(byte_size, "shared_memory_byte_size")
    reg = shm.get(region)
    reg.check(offset, byte_size, name)
    return ShmRef(reg, offset, byte_size)


def _json_tensor(data: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    expected = dtypes.element_count(shape)
    try:
        if datatype == "BYTES":
            flat = _flatten(data)
            array = np.empty(len(flat), dtype=np.object_)
            array[:] = [s.encode("utf-8") if isinstance(s, str) else _not_string(s, name) for s in flat]
        else:
            if datatype == "BOOL" and not _all(data, lambda v: isinstance(v, bool)):
                raise ValueError("BOOL data must be JSON booleans")
            if datatype != "BOOL" and not _all(data, lambda v: isinstance(v, (int, float))
                                                and not isinstance(v, bool)):
                raise ValueError("numeric data must be JSON numbers")
            array = np.asarray(data, dtype=dtypes.NUMPY[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as e:
        raise invalid(f"Unable to parse 'data' of input '{name}': {e}") from None
    if array.size != expected:
        raise invalid(f"unexpected number of elements for input '{name}': expected {expected}, got {array.size}")
    return array.reshape(shape)


def _not_string(value: Any, name: str) -> bytes:
    raise ValueError(f"expected JSON strings for BYTES input '{name}'")


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _all(data: Any, check: Any) -> bool:
    return all(check(v) for v in _flatten(data))


def _output(item: Any, shm: SharedMemoryRegistry) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise invalid("Unable to parse 'name': attempt to access non-existent object member 'name'")
    params = _params(item.get("parameters") or {}, "parameters")
    out = RequestedOutput(item["name"], parameters=params)
    if params.get("shared_memory_region") is not None:
        out.shm = shm_ref(params, item["name"], shm)
    return out


def encode_response(response: InferResponse, request: InferRequest) -> tuple[list, int | None]:
    """Body parts and the JSON header length (None when there is no binary data)."""
    default_binary = bool(request.parameters.get("binary_data_output", False))
    wanted = {o.name: o.parameters for o in request.outputs} if request.outputs else None
    outputs = []
    blobs: list = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        params = wanted.get(out.name, {}) if wanted is not None else {}
        if out.shm is not None:
            entry["parameters"] = {"shared_memory_region": out.shm.region.name,
                                   "shared_memory_byte_size": out.byte_size}
            if out.shm.offset:
                entry["parameters"]["shared_memory_offset"] = out.shm.offset
        elif params.get("binary_data", default_binary):
            entry["parameters"] = {"binary_data_size": out.byte_size}
            blobs.append(out.data)
        else:
            entry["data"] = _json_data(out)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return [header], None
    return [header, *blobs], len(header)


def _json_data(out: Any) -> list:
    array = out.as_numpy().reshape(-1)
    if out.datatype == "BYTES":
        return [b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b) for b in array.tolist()]
    if out.datatype in ("FP16", "BF16"):
        return array.astype(np.float32).tolist()
    return array.tolist()


def error_body(error: ServerError) -> bytes:
    return json.dumps({"error": error.message}).encode()
