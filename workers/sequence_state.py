"""Implicit state of a sequence model (``sequence_batching { state [...] }``), kept by its worker.

Triton keeps a stateful model's state tensors for it: each request of a sequence gets the state its
previous request produced as an extra input (``input_name``), and the model returns the new state as an
extra output (``output_name``). The first request of a sequence (START) gets the ``initial_state``:
zeros (``zero_data``) or the bytes of ``<model dir>/initial_state/<data_file>``, zeros when none is
configured. The sequence batcher (kernel.scheduling.sequence) sends all of a sequence's requests to one instance,
so that instance's worker is where the state lives: it never crosses the front, and costs one copy of
the state output per request (out of the model's response, which may be gone before the next request).

A state output is the model's, not the client's: it is taken out of the response unless the
configuration also lists it as an ordinary output. A sequence's state goes at its END, or once it has
been idle for ``max_sequence_idle_microseconds`` (after which the front refuses the sequence anyway).
GPU tensors a python model returns as state are kept on the host.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from shm import dtypes
from workers.backend import BackendError, Model, Response

START, END = 1, 2


class States:
    """The implicit states of the sequences one instance serves."""

    def __init__(self, model: Model, specs: list[dict]) -> None:
        batching = model.config.get("sequence_batching") or {}
        self.idle_ns = int(batching.get("max_sequence_idle_microseconds") or 1_000_000) * 1000
        outputs = {o.get("name") for o in model.config.get("output") or ()}
        #: (input name, output name, initial array, also an ordinary output)
        self.specs: list[tuple[str, str, np.ndarray, bool]] = []
        for spec in specs:
            self.specs.append((spec["input_name"], spec["output_name"], _initial(model, spec),
                               spec["output_name"] in outputs))
        self.kept: dict[int | str, dict[str, np.ndarray]] = {}
        self.used: dict[int | str, int] = {}
        self._swept = time.perf_counter_ns()

    @classmethod
    def of(cls, model: Model) -> States | None:
        specs = (model.config.get("sequence_batching") or {}).get("state") or []
        return cls(model, specs) if specs else None

    def add_inputs(self, cid: int | str, flags: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's inputs with its sequence's state first, as Triton orders them (the initial state at
        START, or for a null request)."""
        kept = None if flags & START or not cid else self.kept.get(cid)
        out = {}
        for input_name, output_name, initial, _ in self.specs:
            value = kept.get(output_name) if kept is not None else None
            out[input_name] = initial if value is None else value
        out.update(inputs)
        return out

    def keep(self, cid: int | str, flags: int, response: Any) -> None:
        """Take the new state out of ``response``; forget the sequence at its END."""
        if not cid or not isinstance(response, Response) or response.error is not None:
            return
        outputs = response.outputs
        kept = self.kept.setdefault(cid, {})
        for _, output_name, _, public in self.specs:
            value = outputs.get(output_name) if public else outputs.pop(output_name, None)
            if value is not None:
                kept[output_name] = _host(value)
        now = time.perf_counter_ns()
        if flags & END:
            self.kept.pop(cid, None)
            self.used.pop(cid, None)
        else:
            self.used[cid] = now
        if now - self._swept > self.idle_ns:
            self._swept = now
            for stale in [c for c, at in self.used.items() if now - at > self.idle_ns]:
                del self.kept[stale], self.used[stale]


def _initial(model: Model, spec: dict) -> np.ndarray:
    """A state's first value: its ``initial_state``, else zeros (variable dimensions of size 0)."""
    datatype = dtypes.FROM_CONFIG.get(spec.get("data_type", ""), "BYTES" if spec.get("data_type") == "TYPE_STRING"
                                      else "")
    if not datatype or datatype == "BYTES":
        raise BackendError(f"state '{spec.get('input_name')}' of model '{model.name}': implicit state of type "
                           f"{spec.get('data_type')} is not supported", "INVALID_ARG")
    initial = (spec.get("initial_state") or [None])[0]
    dims = [int(d) for d in (initial or spec).get("dims") or []]
    shape = [max(d, 0) for d in dims]
    dtype = dtypes.NUMPY[datatype]
    if initial is not None and initial.get("data_file"):
        path = os.path.join(model.repository, "initial_state", initial["data_file"])
        size = dtypes.element_count(shape) * dtype.itemsize
        with open(path, "rb") as f:
            data = f.read(size)
        if len(data) < size:
            raise BackendError(f"initial state '{initial.get('name', '')}' of model '{model.name}' expects {size} "
                               f"bytes, but {path} has {len(data)}", "INVALID_ARG")
        array = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    else:
        array = np.zeros(shape, dtype=dtype)
    return array.reshape((1, *shape)) if model.max_batch_size > 0 else array


def _host(value: Any) -> np.ndarray:
    """A copy of an output tensor in host memory (numpy, or a framework's tensor through DLPack)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if hasattr(value, "cpu"):  # torch
        return value.detach().cpu().numpy().copy()
    if hasattr(value, "get"):  # cupy
        return np.asarray(value.get())
    return np.array(np.from_dlpack(value), copy=True)
