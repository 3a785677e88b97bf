"""Inference requests and responses as the core sees them, whatever the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shm import dtypes

if TYPE_CHECKING:
    from kernel.shm_registry import Registration


@dataclass(slots=True)
class ShmRef:
    """A span of a client's registered shared-memory region."""

    region: Registration
    offset: int
    byte_size: int


@dataclass(slots=True)
class ArenaRef:
    """Bytes already in the front's own arena: an in-process caller's input buffer, or a tensor of
    a large HTTP request body received there."""

    key: str
    offset: int
    byte_size: int
    owner: object = None  # keeps the caller's array (and so the block) alive while in flight


@dataclass(slots=True)
class InputTensor:
    """One input. ``data`` is raw little-endian bytes (BYTES: Triton's serialised form),
    a numpy array, or a span of a registered region."""

    name: str
    datatype: str
    shape: list[int]
    data: memoryview | bytes | np.ndarray | ShmRef | ArenaRef | None = None
    parameters: dict = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, possibly to be written into its region."""

    name: str
    shm: ShmRef | None = None
    parameters: dict = field(default_factory=dict)
    #: ``[segment, offset, byte_size, shape, datatype]``: a block of the front's arena the output must fill exactly
    #: (a chained pipeline step's output, read there by the next step: kernel.pipelines.ensemble)
    arena: list | None = None


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] | None = None
    parameters: dict = field(default_factory=dict)
    chain: Any = None  # a chained pipeline step's links (kernel.pipelines.ensemble._Ends)
    trace: Any = None  # its kernel.tracing.Trace when the request is traced
    #: {output name: k} of the outputs to answer as their top k labels (kernel.classification); None: none
    classification: dict[str, int] | None = None


@dataclass(slots=True)
class OutputTensor:
    """One output. ``data`` views shared memory until the response is released;
    when the client asked for its region, ``shm`` is set and the bytes are there."""

    name: str
    datatype: str
    shape: list[int]
    byte_size: int = 0
    data: memoryview | None = None
    shm: ShmRef | None = None
    #: (arena segment, offset) of ``data`` in a worker's arena: lets a pipeline hand the tensor to
    #: the next model by reference (kernel.pipelines.ensemble, kernel.pipelines.bls)
    ref: tuple[str, int] | None = None

    def as_numpy(self) -> np.ndarray:
        """The output as an array (a view on shared memory; BYTES are decoded)."""
        buf = self.data
        if buf is None and self.shm is not None:
            start = self.shm.offset
            buf = self.shm.region.buffer()[start : start + self.byte_size]
        return dtypes.to_array(self.datatype, self.shape, memoryview(b"") if buf is None else buf)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str = ""
    outputs: list[OutputTensor] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    error: Any = None  # a ServerError, for streamed/decoupled responses only
    final: bool = True
    _release: Callable[[], None] | None = None
    #: (compute_input, compute_infer, compute_output) ns of the execution that answered it: an ensemble's
    #: statistics add up its steps' (kernel.pipelines.ensemble)
    timings: tuple[int, int, int] | None = None

    def release(self) -> None:
        """Give the output buffers back to the worker (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()
