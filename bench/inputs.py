"""Request tensors from model metadata: shapes (``--shape``), batch size and data (``--input-data``)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np


class BenchError(Exception):
    """A problem the user can fix (bad URL, unknown model, bad option): printed without a traceback."""


@dataclass
class TensorSpec:
    """One input of a request: name, Triton datatype and full shape (batch dimension included)."""

    name: str
    datatype: str
    shape: list[int]


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """``NAME:d1,d2,...`` (perf_analyzer's ``--shape``, batch dimension excluded) -> {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v < 0 for v in values):
            raise BenchError(f"--shape expects NAME:d1,d2,... with non-negative dims, got '{item}'")
        shapes[name] = values
    return shapes


def _dims(value: Any) -> list[int]:
    return [int(d) for d in value]


def resolve_inputs(metadata: dict[str, Any], max_batch_size: int, shapes: dict[str, list[int]],
                   batch_size: int) -> list[TensorSpec]:
    """Concrete input shapes: variable dims from ``shapes``, then the batch dimension if the model batches."""
    if batch_size < 1:
        raise BenchError("batch size must be >= 1")
    if max_batch_size == 0 and batch_size != 1:
        raise BenchError(f"can not specify batch size {batch_size}: the model does not support batching "
                         "(max_batch_size 0)")
    if max_batch_size and batch_size > max_batch_size:
        raise BenchError(f"batch size {batch_size} exceeds the model's max_batch_size {max_batch_size}")
    known = {i["name"] for i in metadata.get("inputs", [])}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise BenchError(f"--shape names unknown input(s) {', '.join(unknown)}; "
                         f"the model has {', '.join(sorted(known))}")
    specs = []
    for entry in metadata.get("inputs", []):
        dims = _dims(entry["shape"])
        if max_batch_size > 0 and dims:
            dims = dims[1:]
        given = shapes.get(entry["name"])
        if given is not None:
            if len(given) != len(dims) or any(d not in (-1, g) for d, g in zip(dims, given)):
                raise BenchError(f"--shape {entry['name']}:{','.join(map(str, given))} does not match the model's "
                                 f"dims {dims}")
            dims = list(given)
        if any(d < 0 for d in dims):
            raise BenchError(f"input {entry['name']} has variable dims {dims}: give its shape with "
                             f"--shape {entry['name']}:<d1>,<d2>,...")
        if max_batch_size > 0:
            dims = [batch_size, *dims]
        specs.append(TensorSpec(entry["name"], entry["datatype"], dims))
    if not specs:
        raise BenchError("the model has no inputs")
    return specs


def output_names(metadata: dict[str, Any]) -> list[str]:
    return [o["name"] for o in metadata.get("outputs", [])]


def numpy_dtype(datatype: str) -> Any:
    """numpy dtype of a Triton datatype (BYTES -> object)."""
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise BenchError(f"unsupported datatype {datatype}")
    return dtype


def make_data(specs: list[TensorSpec], kind: str, string_length: int = 128,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for each input: ``random``, ``zero``, or a path (perf_analyzer-style JSON file or a
    directory holding one raw binary file per input, named like the input)."""
    if kind not in ("random", "zero"):
        return _load_data(specs, kind)
    rng = np.random.default_rng(seed)
    data = {}
    for spec in specs:
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype == "BYTES":
            fill = b"0" * string_length if kind == "zero" else None
            values = [fill or bytes(rng.integers(97, 123, string_length, dtype=np.uint8))
                      for _ in range(int(np.prod(spec.shape)))]
            array = np.array(values, dtype=object).reshape(spec.shape)
        elif kind == "zero":
            array = np.zeros(spec.shape, dtype=dtype)
        elif spec.datatype == "BOOL":
            array = rng.integers(0, 2, spec.shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            array = rng.integers(0, 100, spec.shape).astype(dtype)
        else:
            array = rng.random(spec.shape, dtype=np.float64).astype(dtype)
        data[spec.name] = array
    return data


def _load_data(specs: list[TensorSpec], path: str) -> dict[str, np.ndarray]:
    if os.path.isdir(path):
        data = {}
        for spec in specs:
            file = os.path.join(path, spec.name)
            if not os.path.isfile(file):
                raise BenchError(f"--input-data directory {path} has no file for input {spec.name}")
            with open(file, "rb") as f:
                raw = f.read()
            if spec.datatype == "BYTES":
                data[spec.name] = np.array([raw] * int(np.prod(spec.shape)), dtype=object).reshape(spec.shape)
                continue
            array = np.frombuffer(raw, dtype=numpy_dtype(spec.datatype))
            if array.size != int(np.prod(spec.shape)):
                raise BenchError(f"{file}: {array.size} elements, input {spec.name} needs shape {spec.shape}")
            data[spec.name] = array.reshape(spec.shape)
        return data
    if not os.path.isfile(path):
        raise BenchError(f"--input-data must be random, zero, a JSON file or a directory; '{path}' is none of these")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        first = doc["data"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{path}: expected perf_analyzer's JSON input format {{\"data\": [{{...}}]}} ({e})") from e
    data = {}
    for spec in specs:
        if spec.name not in first:
            raise BenchError(f"{path}: no data for input {spec.name}")
        data[spec.name] = _json_tensor(first[spec.name], spec, path)
    return data


def _json_tensor(value: Any, spec: TensorSpec, path: str) -> np.ndarray:
    dtype = numpy_dtype(spec.datatype)
    shape = spec.shape
    if isinstance(value, dict):
        if "shape" in value:
            shape = _dims(value["shape"])
            if len(shape) < len(spec.shape):  # batch dimension left out, as perf_analyzer allows
                shape = spec.shape[: len(spec.shape) - len(shape)] + shape
        if "b64" in value:
            raw = base64.b64decode(value["b64"])
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
        value = value.get("content", [])
    if spec.datatype == "BYTES":
        array = np.array([v.encode() if isinstance(v, str) else v for v in np.ravel(value)], dtype=object)
    else:
        array = np.asarray(value, dtype=dtype)
    if array.size != int(np.prod(shape)):
        if array.size * shape[0] == int(np.prod(shape)):  # one sample given for a batched input
            array = np.concatenate([array.ravel()] * shape[0])
        else:
            raise BenchError(f"{path}: {array.size} values for input {spec.name}, shape {shape} needs "
                             f"{int(np.prod(shape))}")
    return array.reshape(shape)


def nbytes(array: np.ndarray) -> int:
    """Bytes of a tensor on the wire (BYTES: 4-byte length prefix per element)."""
    if array.dtype == np.object_:
        return sum(4 + len(v if isinstance(v, bytes) else str(v).encode()) for v in array.ravel())
    return int(array.nbytes)
