"""KServe v2 JSON and Triton's binary tensor data extension: requests in, responses out."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from kernel.classification import PARAMETER, from_json
from kernel.errors import ServerError, invalid
from kernel.shm_registry import SharedMemoryRegistry
from kernel.types import ArenaRef, InferRequest, InferResponse, InputTensor, RequestedOutput, ShmRef
from shm import dtypes


def _parse_error(message: str) -> ServerError:
    """JSON that cannot be read as a request: Triton's words, but 400, not its 500 (a client's mistake;
    a 5xx would tell load balancers and KServe that the server failed)."""
    return ServerError(message, "INVALID_ARG")


def parse_request(model: str, version: str, body: bytes | memoryview, header_length: int | None,
                  shm: SharedMemoryRegistry, arena_at: tuple[str, int] | None = None) -> InferRequest:
    """Parse an infer request body (JSON header, then binary tensor data, which stays in ``body``).

    ``arena_at`` is ``(segment, offset)`` of the body when it lies in the front's arena: binary
    tensors then refer to it there (:class:`ArenaRef`) and are never copied again.
    """
    size = len(body)
    if header_length is None:
        header_length = size
    elif header_length > size:
        raise ServerError(f"inference header size should be in range (0, {size}), got: {header_length}",
                          "INVALID_ARG")
    try:
        doc = orjson.loads(body if header_length == size else memoryview(body)[:header_length])
    except orjson.JSONDecodeError as e:
        if not bytes(body[:header_length]).strip(b" \t\n\r"):  # (rapidjson's words and whitespace)
            raise _parse_error(
                f"failed to parse the request JSON buffer: The document is empty. at {header_length}") from None
        raise _parse_error(f"failed to parse the request JSON buffer: {e}") from None
    if type(doc) is dict:
        try:
            return _parse_plain(model, version, doc, body, header_length, shm, arena_at)
        except _Unusual:
            pass
    return _parse_checked(model, version, doc, body, header_length, shm)


class _Unusual(Exception):
    """The request is not of the plain shape the fast path handles (or it is wrong)."""


_NUMERIC = frozenset(k for k in dtypes.NUMPY if k != "BYTES")


def _parse_plain(model: str, version: str, doc: dict, body: bytes | memoryview, header_length: int,
                 shm: SharedMemoryRegistry, arena_at: tuple[str, int] | None = None) -> InferRequest:
    """The common request in one pass: binary, shared-memory or numeric JSON inputs, plain outputs.

    Raises :class:`_Unusual` at the first thing it does not expect; the checked parser then
    reads the request again and words any error as Triton does.
    """
    rid = doc.get("id", "")
    params = doc.get("parameters", {})
    inputs = doc.get("inputs")
    if type(rid) is not str or type(params) is not dict or type(inputs) is not list:
        raise _Unusual
    binary = memoryview(body)[header_length:] if header_length < len(body) else None
    cursor = 0
    tensors = []
    for item in inputs:
        if type(item) is not dict:
            raise _Unusual
        name = item.get("name")
        shape = item.get("shape")
        datatype = item.get("datatype")
        if type(name) is not str or type(shape) is not list or datatype not in dtypes.NUMPY:
            raise _Unusual
        for d in shape:
            if type(d) is not int or d < 0:
                raise _Unusual
        tparams = item.get("parameters")
        data = item.get("data")
        if tparams:
            if type(tparams) is not dict or data is not None:
                raise _Unusual
            size = tparams.get("binary_data_size")
            if size is not None:
                if type(size) is not int or size < 0 or binary is None or cursor + size > len(binary) \
                        or "shared_memory_region" in tparams:
                    raise _Unusual
                data: Any = binary[cursor : cursor + size]
                if arena_at is not None:
                    at = arena_at[1] + header_length + cursor
                    if at % (dtypes.SIZE.get(datatype) or 1) == 0:  # else copied, aligned, at dispatch
                        data = ArenaRef(arena_at[0], at, size, data)
                tensor = InputTensor(name, datatype, shape, data, tparams)
                cursor += size
            elif "shared_memory_region" in tparams:
                tensor = InputTensor(name, datatype, shape, shm_ref(_shm_params(tparams), name, shm), tparams)
            else:
                raise _Unusual
        elif data is not None and datatype in _NUMERIC and type(data) is list:
            tensor = InputTensor(name, datatype, shape, _json_tensor(data, datatype, shape))
        else:
            raise _Unusual
        tensors.append(tensor)
    if cursor != (0 if binary is None else len(binary)):
        raise _Unusual
    if params:
        _sequence_params(params)
    request = InferRequest(model, version, rid, tensors, None, params)
    outputs = doc.get("outputs")
    if outputs is not None:
        if type(outputs) is not list:
            raise _Unusual
        requested = []
        names = set()
        for item in outputs:
            name = item.get("name") if type(item) is dict else None
            oparams = item.get("parameters", {}) if name is not None else None
            if type(name) is not str or type(oparams) is not dict or name in names or PARAMETER in oparams \
                    or ("binary_data" in oparams and type(oparams["binary_data"]) is not bool):
                raise _Unusual  # (classification: read by the checked parser)
            names.add(name)
            ref = shm_ref(_shm_params(oparams), name, shm) if "shared_memory_region" in oparams else None
            requested.append(RequestedOutput(name, ref, oparams))
        request.outputs = requested
    return request


def _parse_checked(model: str, version: str, doc: Any, body: bytes, header_length: int,
                   shm: SharedMemoryRegistry) -> InferRequest:
    """Parse a request checking every field, with Triton's error messages."""
    if not isinstance(doc, dict):
        raise _parse_error("Unable to parse 'inputs': attempt to access non-existing object member 'inputs'")
    request = InferRequest(model, version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise _parse_error("Unable to parse 'id': attempt to access JSON non-string as string")
        request.id = rid
    if "parameters" in doc:
        params = doc["parameters"]
        if not isinstance(params, dict):
            raise _parse_error("failed to get request params.: attempt to get members for non-object")
        request.parameters = _sequence_params(params)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise _parse_error("Unable to parse 'inputs': attempt to access non-existing object member 'inputs'"
                           if inputs is None else "Unable to parse 'inputs': attempt to access JSON non-array as array")
    binary = memoryview(body)[header_length:]
    cursor = 0
    for item in inputs:
        tensor, used = _input(item, binary, cursor, shm, model)
        cursor += used
        request.inputs.append(tensor)
    if cursor != len(binary):
        raise invalid(f"unexpected additional input data for model '{model}'")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _parse_error("Unable to parse 'outputs': attempt to access JSON non-array as array")
        seen: set[str] = set()
        request.outputs = []
        for item in outputs:
            out, classes = _output(item, shm)
            if out.name not in seen:  # Triton answers a repeated output once
                seen.add(out.name)
                request.outputs.append(out)
                if classes:
                    if request.classification is None:
                        request.classification = {}
                    request.classification[out.name] = classes
    return request


def raw_request(model: str, version: str, body: memoryview, inputs: list) -> InferRequest:
    """Triton's raw binary request: the whole body is the data of the model's only input.

    ``inputs`` are the model's (name, datatype, dims, batched) input specs.
    """
    if len(inputs) != 1:
        raise invalid(f"[request id: <id_unknown>] Raw request must only have 1 input (found 1) to be deduced but "
                      f"got {len(inputs)} inputs in '{model}' model configuration")
    name, datatype, dims, batched = inputs[0]
    shape = ([1] if batched else []) + list(dims)
    if -1 in shape:
        size = dtypes.SIZE.get(datatype)
        known = dtypes.element_count([d for d in shape if d != -1])
        if size is None or shape.count(-1) != 1 or not known or len(body) % (size * known):
            raise invalid(f"[request id: <id_unknown>] unable to deduce the shape of input '{name}' of model "
                          f"'{model}' from a raw request of {len(body)} bytes")
        shape[shape.index(-1)] = len(body) // (size * known)
    request = InferRequest(model, version)
    request.inputs.append(InputTensor(name, datatype, shape, body))
    request.parameters["binary_data_output"] = True
    return request


_BOOLEAN_PARAMS = frozenset(("sequence_start", "sequence_end", "binary_data_output"))
_UINT_PARAMS = frozenset(("priority", "timeout"))


def _sequence_params(params: dict) -> dict:
    """Triton's JSON types for a request's parameters (400 here, Triton's 500), checked in the body's order as
    Triton's: ``sequence_id`` an unsigned 64-bit integer or a string (or null); ``sequence_start``,
    ``sequence_end``, ``binary_data_output`` booleans; ``priority``, ``timeout`` unsigned 64-bit integers."""
    for key, value in params.items():
        if key in _BOOLEAN_PARAMS:
            if type(value) is not bool:
                raise _parse_error(f"Unable to parse '{key}': attempt to access JSON non-boolean as boolean")
        elif key in _UINT_PARAMS:
            if type(value) is not int or not 0 <= value < 1 << 64:
                raise _parse_error(f"Unable to parse '{key}': attempt to access JSON non-unsigned-integer as "
                                   "unsigned-integer")
        elif key == "sequence_id" and value is not None and type(value) is not str and (
                type(value) is not int or not 0 <= value < 1 << 64):
            raise _parse_error("Unable to parse 'sequence_id': attempt to access JSON non-string as string")
    return params


def _params(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _parse_error(f"Unable to parse '{where}': attempt to access JSON non-object as object")
    return value


def _member(item: dict, key: str) -> Any:
    value = item.get(key)
    if value is None:
        raise _parse_error(f"Unable to parse '{key}': attempt to access non-existing object member '{key}'")
    return value


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _parse_error(f"Unable to parse '{what}': attempt to access JSON non-unsigned-integer as "
                           "unsigned-integer")
    return value


_SOURCES = ("data", "binary_data_size", "shared_memory_region")


def _input(item: Any, binary: memoryview, cursor: int, shm: SharedMemoryRegistry,
           model: str) -> tuple[InputTensor, int]:
    if not isinstance(item, dict):
        raise _parse_error("Unable to parse 'inputs': attempt to access JSON non-object as object")
    name = _member(item, "name")
    if not isinstance(name, str):
        raise _parse_error("Unable to parse 'name': attempt to access JSON non-string as string")
    shape = _member(item, "shape")
    if not isinstance(shape, list):
        raise _parse_error("Unable to parse 'shape': attempt to access JSON non-array as array")
    shape = [_uint(d, "shape") for d in shape]
    datatype = _member(item, "datatype")
    if datatype not in dtypes.NUMPY:
        raise invalid(f"invalid datatype for input {name}")
    params = _params(item.get("parameters") or {}, "parameters")
    tensor = InputTensor(name, datatype, shape, parameters=params)
    given = [k for k in _SOURCES if (item if k == "data" else params).get(k) is not None]
    if len(given) != 1:
        which = "But no field is set" if not given else "But set " + " ".join(f"'{k}'" for k in given)
        raise invalid("Input must set only one of the following fields: 'data', 'binary_data_size' in "
                      f"'parameters', 'shared_memory_region' in 'parameters'. {which}")
    if given[0] == "shared_memory_region":
        tensor.data = shm_ref(_shm_params(params), name, shm)
        return tensor, 0
    if given[0] == "binary_data_size":
        size = _uint(params["binary_data_size"], "binary_data_size")
        if cursor + size > len(binary):
            raise invalid(f"unexpected size for input '{name}', expecting {cursor + size - len(binary)} "
                          f"additional bytes for model '{model}'")
        tensor.data = binary[cursor : cursor + size]
        return tensor, size
    tensor.data = _json_tensor(item["data"], datatype, shape)
    return tensor, 0


def _shm_params(params: dict) -> dict:
    """Triton's JSON checks of a tensor's shared_memory_* parameters (before the region is looked up)."""
    if not isinstance(params.get("shared_memory_region"), str):
        raise _parse_error("Unable to parse 'shared_memory_region': attempt to access JSON non-string as string")
    for key in ("shared_memory_offset", "shared_memory_byte_size"):
        if key in params:
            _uint(params[key], key)
    return params


def shm_ref(params: dict, name: str, shm: SharedMemoryRegistry) -> ShmRef:
    """The registered-region span named by a tensor's shared_memory_* parameters (HTTP and gRPC)."""
    region = params.get("shared_memory_region")
    if not isinstance(region, str):
        raise _parse_error("Unable to parse 'shared_memory_region': attempt to access JSON non-string as string")
    reg = shm.get(region)
    offset = params.get("shared_memory_offset", 0)
    byte_size = params.get("shared_memory_byte_size")
    if byte_size is None or not isinstance(offset, int) or not isinstance(byte_size, int):
        raise invalid(f"Invalid offset + byte size for shared memory region: '{region}'")
    reg.check(offset, byte_size, name)
    return ShmRef(reg, offset, byte_size)


# How Triton names a JSON value of the wrong type, per family of datatypes.
_WHAT = {"b": "boolean as boolean", "i": "signed-integer as signed-integer",
         "u": "unsigned-integer as unsigned-integer", "f": "number as double"}


def _json_tensor(data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """A JSON ``data`` array (flat or nested) as an array of ``datatype``."""
    array = json_array(flatten_json(data), datatype)
    if array.size != dtypes.element_count(shape):
        if datatype == "BYTES":
            return array  # counted by the model's checks, in Triton's words for string elements
        raise _parse_error("Unable to parse 'data': Shape does not match true shape of 'data' field")
    return array.reshape(shape)


# The JSON value types each family accepts, for a whole array at once (C speed: set(map(type, values)));
# unsigned integers also need each value checked for its sign.
_TYPES = {"b": frozenset((bool,)), "i": frozenset((int,)), "u": frozenset((int,)), "f": frozenset((float, int))}


def json_array(flat: list, datatype: str) -> np.ndarray:
    """The JSON values ``flat`` as a 1-D array of ``datatype``; a value of the wrong JSON type is Triton's
    400 (shared with the generate extension)."""
    if datatype == "BYTES":
        if not all(type(s) is str for s in flat):
            raise _parse_error("Unable to parse JSON bytes array: attempt to access JSON non-string as string")
        array = np.empty(len(flat), dtype=np.object_)
        array[:] = [s.encode("utf-8") for s in flat]
        return array
    target = dtypes.NUMPY[datatype]
    kind = "f" if target.kind == "V" else target.kind  # bfloat16 is a float
    if not _TYPES[kind].issuperset(map(type, flat)) or (kind == "u" and flat and min(flat) < 0):
        raise _parse_error(f"Unable to parse 'data': attempt to access JSON non-{_WHAT[kind]}")
    try:
        return np.array(flat, dtype=target)
    except OverflowError:
        raise _parse_error(f"Unable to parse 'data': value out of range for {datatype}") from None


def flatten_json(data: Any) -> list:
    """The leaves of a (nested) JSON array, in order; a scalar is a list of one."""
    if not isinstance(data, list):
        return [data]
    if list not in set(map(type, data)):  # flat already (the usual case): no walk in Python
        return data
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


def _output(item: Any, shm: SharedMemoryRegistry) -> tuple[RequestedOutput, int]:
    """A requested output, and its ``classification`` count (0: none)."""
    if not isinstance(item, dict):
        raise _parse_error("Unable to parse 'outputs': attempt to access JSON non-object as object")
    if not isinstance(_member(item, "name"), str):
        raise _parse_error("Unable to parse 'name': attempt to access JSON non-string as string")
    params = item.get("parameters")
    if not isinstance(params, dict):
        params = {}  # Triton ignores an output's parameters that are not an object
    elif "binary_data" in params and type(params["binary_data"]) is not bool:
        raise _parse_error("Unable to parse 'binary_data': attempt to access JSON non-boolean as boolean")
    out = RequestedOutput(item["name"], parameters=params)
    classes = from_json(params) if PARAMETER in params else 0
    if params.get("shared_memory_region") is not None:
        out.shm = shm_ref(_shm_params(params), item["name"], shm)
    return out, classes


def encode_response(response: InferResponse, request: InferRequest) -> tuple[list, int | None]:
    """Body parts and the JSON header length (None when there is no binary data)."""
    wanted = {o.name: o.parameters for o in request.outputs} if request.outputs else None
    # Triton applies the request's binary_data_output to the outputs it answers unasked only: a listed output
    # (a classified one too) is binary when its own binary_data says so
    default_binary = wanted is None and bool(request.parameters.get("binary_data_output", False))
    outputs = []
    blobs: list = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        params = wanted.get(out.name, {}) if wanted is not None else {}
        if out.shm is not None:  # written into the client's region: Triton answers name, datatype, shape
            pass
        elif params.get("binary_data", default_binary):
            entry["parameters"] = {"binary_data_size": out.byte_size}
            if out.byte_size:  # Triton: no binary bytes at all (tensors of 0 elements) is a plain JSON answer
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
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return [header], None
    return [header, *blobs], len(header)


def _json_data(out: Any) -> Any:
    """An output's ``data`` (numeric arrays are serialised by orjson without a Python list)."""
    array = out.as_numpy().reshape(-1)
    if out.datatype == "BYTES":
        return [b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b) for b in array.tolist()]
    if out.datatype == "BF16":
        return array.astype(np.float32)
    return np.ascontiguousarray(array)


def error_body(error: ServerError) -> bytes:
    return orjson.dumps({"error": error.message})
