"""Triton's classification extension: an output asked for with ``classification: k`` is answered
with its k largest elements as a BYTES tensor of labels ``"value:index[:label]"``.

Why it lives here, once: Triton computes the labels in its HTTP and gRPC frontends after the model
ran (the response cache and traces see the raw tensor). Ours has two codecs plus streaming and the
in-process API, so the codecs only read the parameter (each with Triton's words for a client's
mistake: the two protocols word them differently, see :func:`from_json` and :func:`from_grpc`) into
``InferRequest.classification`` ({output name: k}), the model version refuses an output type that
cannot be classified before the model runs (:func:`check`), and the core turns the outputs into labels
where it hands a response to whoever waits for it (:func:`apply`: kernel.model._deliver and the
decoupled stream callbacks). A request without classification pays one attribute check for it.

What Triton 2.51 answers (docs/triton-behaviour.md, "Classification"): elements sorted by value,
largest first (ties: lower index first, as its sort leaves up to 16 elements); integers printed as
integers, FP32/FP64 as C's ``%f`` (``0.500000``); ``:label`` appended from the output's
``label_filename`` when that line is not empty; k is ``min(k, elements)``; a batching model's output is
classified row by row, shape ``[batch, k]``; k is read as an unsigned 32-bit number (``2**32 + 2`` is 2;
``2**32`` is 0, which asks for no classification).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from kernel.errors import ServerError, invalid
from kernel.types import InferResponse, OutputTensor

PARAMETER = "classification"

#: Output datatypes Triton classifies; any other is refused (FP16, BF16 and BOOL with the error below;
#: Triton 2.51 crashes on BYTES: we refuse it with the same words).
SUPPORTED = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})

_U32 = struct.Struct("<I")
_U32_MASK = 0xFFFFFFFF
_JSON_ERROR = "Unable to set 'classification': attempt to access JSON non-unsigned-integer as unsigned-integer"


def from_json(params: dict) -> int:
    """k from an HTTP output's ``parameters`` (which hold ``classification``); 0: not classified.

    Triton answers a value that is not an unsigned 64-bit integer with a 500; a client's mistake is
    our 400, in its words. Its ``shared_memory_region`` check comes first, whatever the value.
    """
    if "shared_memory_region" in params:
        raise invalid("Output can't set both 'shared_memory_region' and 'classification'")
    value = params[PARAMETER]
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise invalid(_JSON_ERROR)
    return value & _U32_MASK


def from_grpc(which: str | None, value: Any, params: dict) -> int:
    """k from a gRPC output's ``classification`` InferParameter (``which`` member set, its value);
    0: not classified. The value is checked before the shared-memory conflict, as Triton does."""
    if which != "int64_param":
        raise invalid("invalid value type for 'classification' parameter, expected int64_param")
    if value < 1:  # (Triton's words for 0 as for -1)
        raise invalid("invalid value for 'classification' parameter, expected >= 0")
    if params.get("shared_memory_region") is not None:
        raise invalid("output can't set both 'shared_memory_region' and 'classification'")
    return value & _U32_MASK


def unsupported(datatype: str) -> ServerError:
    return invalid(f"class result not available for output due to unsupported type '{datatype}'")


def check(classification: dict[str, int], outputs: dict) -> None:
    """Refuse, before the model runs, an output whose configured type cannot be classified.
    (Triton runs the model, then answers 400 / INVALID_ARGUMENT; for BYTES it crashes.)"""
    for name in classification:
        spec = outputs.get(name)
        if spec is not None and spec.datatype not in SUPPORTED:
            raise unsupported(spec.datatype)


def labels(version: Any, name: str) -> list[str]:
    """The lines of output ``name``'s ``label_filename`` (in the model's directory), read once per
    configuration; empty when it has none or it cannot be read."""
    cache = version.labels
    found = cache.get(name)
    if found is None:
        found = []
        for t in version.config.output:
            if t.name == name and t.label_filename:
                try:
                    with open(os.path.join(version.model_dir, t.label_filename), encoding="utf-8",
                              errors="replace") as f:
                        found = f.read().split("\n")
                except OSError:
                    found = []
                if found and found[-1] == "":
                    found.pop()
        cache[name] = found
    return found


def top_k(values: np.ndarray, k: int, names: list[str]) -> list[bytes]:
    """The labels of the ``k`` largest of the 1-D ``values``: ``value:index[:label]``, largest first,
    ties by index."""
    n = values.size
    if n == 0 or k == 0:
        return []
    # descending and stable: a stable ascending sort of the reversed array, read backwards
    order = (n - 1 - np.argsort(values[::-1], kind="stable"))[::-1][: min(k, n)]
    floating = values.dtype.kind == "f"
    out = []
    for index, value in zip(order.tolist(), values[order].tolist()):
        text = f"{value:f}" if floating else str(value)
        text = f"{text}:{index}"
        if index < len(names) and names[index]:
            text = f"{text}:{names[index]}"
        out.append(text.encode("utf-8"))
    return out


def classify(out: OutputTensor, k: int, batched: bool, names: list[str]) -> OutputTensor:
    """Output ``out`` as its BYTES labels: shape ``[k]``, or ``[batch, k]`` for a batching model."""
    if out.datatype not in SUPPORTED:
        raise unsupported(out.datatype)
    array = out.as_numpy()
    shape = out.shape
    if batched and shape and shape[0] > 0:
        rows = array.reshape(shape[0], -1)
        new_shape = [shape[0], min(k, rows.shape[1])]
    else:
        rows = array.reshape(1, -1)
        new_shape = [min(k, rows.shape[1])]
    parts = []
    for row in rows:
        for label in top_k(row, k, names):
            parts.append(_U32.pack(len(label)))
            parts.append(label)
    blob = b"".join(parts)
    return OutputTensor(out.name, "BYTES", new_shape, len(blob), memoryview(blob))


def apply(response: InferResponse, classification: dict[str, int], version: Any) -> InferResponse:
    """``response`` with its classified outputs replaced by their labels (the others untouched; the
    response still holds, and releases, the model's buffers)."""
    batched = version.max_batch_size > 0
    outputs = response.outputs
    for i, out in enumerate(outputs):
        k = classification.get(out.name)
        if k:
            outputs[i] = classify(out, k, batched, labels(version, out.name))
    return response
