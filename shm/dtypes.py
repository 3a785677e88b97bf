"""Triton datatypes: names, numpy dtypes, sizes and the BYTES wire format.

Here, below kernel/ and workers/, because it is how tensors are laid out in shared memory (a BYTES
tensor is its elements, each after its 4-byte length): the fronts, the core and the workers all read it.
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np

#: Triton datatype name -> numpy dtype (BYTES tensors are object arrays).
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(np.object_),
}

#: Element size in bytes; BYTES has none (variable length).
SIZE: dict[str, int] = {k: v.itemsize for k, v in NUMPY.items() if k != "BYTES"}

#: model_config.proto ``DataType`` enum names -> Triton datatype names.
FROM_CONFIG: dict[str, str] = {f"TYPE_{k}": k for k in NUMPY if k != "BYTES"}
FROM_CONFIG["TYPE_STRING"] = "BYTES"
TO_CONFIG: dict[str, str] = {v: k for k, v in FROM_CONFIG.items()}

_BY_NUMPY = {v: k for k, v in NUMPY.items()}
_U32 = struct.Struct("<I")


def from_numpy(dtype: np.dtype) -> str | None:
    """The Triton datatype of a numpy dtype (bytes/str arrays are BYTES)."""
    name = _BY_NUMPY.get(dtype)  # an array's dtype, the usual case: no np.dtype() call (per tensor)
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    name = _BY_NUMPY.get(dtype)
    if name is None and dtype.kind in "SU":
        return "BYTES"
    return name


def element_count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def byte_size(datatype: str, shape) -> int | None:
    """Bytes of a fixed-size tensor; None for BYTES."""
    size = SIZE.get(datatype)
    return None if size is None else size * element_count(shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    """Triton's BYTES serialisation: each element as <u32 length><bytes>, row-major."""
    parts = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def count_bytes_elements(buf) -> int:
    """Whole elements in serialised BYTES data (counted, like Triton, until the data runs out)."""
    mv = memoryview(buf).cast("B")
    pos, end, count = 0, len(mv), 0
    while pos + 4 <= end:
        pos += 4 + int.from_bytes(mv[pos : pos + 4], "little")
        if pos > end:
            break
        count += 1
    return count


def deserialize_bytes(buf, count: int | None = None) -> np.ndarray:
    """Parse serialised BYTES into a 1-D object array of ``bytes``.

    Raises ValueError if the buffer is truncated, or if ``count`` is given and
    the buffer holds a different number of elements.
    """
    mv = memoryview(buf).cast("B")
    items: list[bytes] = []
    pos, end = 0, len(mv)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated BYTES element length")
        (n,) = _U32.unpack_from(mv, pos)
        pos += 4
        if pos + n > end:
            raise ValueError("BYTES element runs past the end of the tensor data")
        items.append(bytes(mv[pos : pos + n]))
        pos += n
    if count is not None and len(items) != count:
        raise ValueError(f"expected {count} string elements, got {len(items)}")
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def to_array(datatype: str, shape, buf) -> np.ndarray:
    """A tensor's bytes (Triton's serialised form for BYTES) as an array of ``shape``: a view on ``buf``,
    but for BYTES, whose elements are decoded."""
    if datatype == "BYTES":
        return deserialize_bytes(buf).reshape(shape)
    return np.frombuffer(buf, dtype=NUMPY[datatype]).reshape(shape)
