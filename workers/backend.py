"""The backend interface: what a backend implements to run models in a worker.

A worker process serves one model instance. The generic runtime (workers.runtime)
receives batches from the front, maps their tensors from shared memory and hands
the backend :class:`Request` objects whose inputs are numpy arrays *on* that shared
memory (nothing copied). The backend answers one :class:`Response` per request; the
runtime places the outputs in the worker's output arena, or straight into the
client's registered region when the request asked for that, and answers the front.

A backend is a subclass of :class:`Backend` (docs/backends.md has a complete example)::

    class Backend(workers.backend.Backend):
        @classmethod
        def auto_complete_config(cls, model: Model) -> dict | None: ...   # optional
        def __init__(self, model: Model) -> None: ...                     # load on model.kind / model.device_id
        def execute(self, requests: list[Request]) -> list[Response]: ...
        def finalize(self) -> None: ...                                   # optional

Errors: raise :class:`BackendError` (a message and one of Triton's codes) from any of
them. From ``auto_complete_config`` or ``__init__`` it makes the model UNAVAILABLE with
that message as its reason; from ``execute`` it fails every request of the batch; a
``Response(error=...)`` fails one request. Any other exception is reported the same
way, with its type and message.

Why the interface is per request and not per batch: that is Triton's contract
(``TRITONBACKEND_ModelInstanceExecute`` gets a list of requests), python models need
it, and a batching backend gets the batch as one array from :func:`batch_input`
without a copy, because the front stacks a batch's inputs back to back in one
shared-memory block.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kernel import logs
from shm import dtypes

#: Triton's error codes, as BackendError takes them.
CODES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS",
         "CANCELLED")


class BackendError(Exception):
    """An error with one of Triton's codes (:data:`CODES`), reported to the client or as the model's reason."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code in CODES else "INTERNAL"


class Model:
    """What a backend is told about the model and the instance it serves.

    ``config`` is the model configuration in Triton's JSON form (as ``GET
    /v2/models/<name>/config`` returns it). ``artifact`` is the model file (or
    directory) the backend should load: ``<repository>/<version>/<default_model_filename>``.
    ``backend_config`` holds this backend's ``--backend-config=<name>,<key>=<value>``
    settings (and the global ``--backend-config=<key>=<value>`` ones). ``kind`` is
    ``CPU``, ``GPU`` or ``MODEL``; ``secondary_devices`` lists e.g. ``{"kind": "KIND_NVDLA",
    "device_id": 0}``. During ``auto_complete_config`` the instance fields are those of the
    first instance group.
    """

    def __init__(self, msg: dict) -> None:
        self.name: str = msg["name"]
        self.version: str = str(msg.get("version", "1"))
        self.repository: str = msg.get("repository", "")
        self.artifact: str = msg.get("model_file", "")
        self.config: dict = msg["config"]
        self.backend_config: dict[str, str] = msg.get("backend_config") or {}
        args = msg.get("args") or {}
        self.args: dict[str, str] = args  # Triton's python-backend ``initialize(args)``
        self.instance_name: str = args.get("model_instance_name", f"{self.name}_0")
        self.kind: str = args.get("model_instance_kind", _first_kind(self.config))
        self.device_id: int = int(args.get("model_instance_device_id", 0) or 0)
        self.secondary_devices: list[dict] = json.loads(args.get("model_instance_secondary_devices") or "[]")

    @property
    def max_batch_size(self) -> int:
        return int(self.config.get("max_batch_size", 0) or 0)

    @property
    def decoupled(self) -> bool:
        return bool(self.config.get("model_transaction_policy", {}).get("decoupled", False))

    def parameter(self, key: str, default: str | None = None) -> str | None:
        """A ``parameters { key: ... value: { string_value: ... } }`` entry of the config."""
        entry = (self.config.get("parameters") or {}).get(key)
        return default if entry is None else str(entry.get("string_value", ""))

    def bool_parameter(self, key: str, default: bool) -> bool:
        """A boolean parameter, parsed as Triton's backends do (true/false/yes/no/on/off/1/0)."""
        value = self.parameter(key)
        if value is None or value == "":
            return default
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise BackendError(f"failed to convert '{value}' to boolean for parameter '{key}' of model "
                           f"'{self.name}'", "INVALID_ARG")

    def int_parameter(self, key: str, default: int) -> int:
        value = self.parameter(key)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise BackendError(f"failed to convert '{value}' to integer for parameter '{key}' of model "
                               f"'{self.name}'", "INVALID_ARG") from None


def _first_kind(config: dict) -> str:
    groups = config.get("instance_group") or [{}]
    return str(groups[0].get("kind", "KIND_CPU")).removeprefix("KIND_")


class Request:
    """One inference request.

    ``inputs`` maps names to numpy arrays in shared memory (read-only when they live in a
    client's region; BYTES inputs are object arrays of ``bytes``). ``requested_outputs``
    names the outputs the client asked for (empty: all of them).
    """

    __slots__ = ("inputs", "requested_outputs", "id", "correlation_id", "flags", "_parameters", "_spans",
                 "_dests", "_place", "_placed", "_send", "_board", "_flag", "trace_id", "trace_context",
                 "rescheduled")

    def __init__(self, inputs: dict[str, np.ndarray], requested_outputs: list[str], request_id: str = "",
                 correlation_id: int | str = 0, flags: int = 0, parameters: str = "") -> None:
        self.inputs = inputs
        self.requested_outputs = requested_outputs
        self.id = request_id
        self.correlation_id = correlation_id
        self.flags = flags
        self._parameters = parameters  # JSON text, parsed on demand
        self._spans: dict[str, tuple[memoryview, int]] = {}  # input -> (mapping, offset): see batch_input
        self._dests: dict[str, list] = {}  # output -> the client region the request asked to receive it in
        self._place: Callable[[Request, str, str, list[int]], np.ndarray] | None = None
        self._placed: dict[str, tuple[np.ndarray, list]] = {}
        self._send: Callable[[Response | None, bool], None] | None = None
        self._board: memoryview | None = None  # the front's cancel board, and this request's byte on it
        self._flag = -1
        self.trace_id = 0  # the front's trace of it (kernel.tracing), 0: not traced
        #: its span's W3C ``traceparent`` when the server traces in mode opentelemetry, else None
        self.trace_context: str | None = None
        #: set by :meth:`reschedule`: the request runs again in a later batch (an iterative sequence)
        self.rescheduled = False

    @property
    def parameters(self) -> dict:
        """The request's own parameters (those the server consumes left out)."""
        return json.loads(self._parameters) if self._parameters else {}

    def wants(self, name: str) -> bool:
        return not self.requested_outputs or name in self.requested_outputs

    def output_buffer(self, name: str, datatype: str, shape: list[int]) -> np.ndarray:
        """An array to write output ``name`` into, where the client will read it.

        It lies in the client's registered region when the request asked for that, else in
        the worker's output arena: returning it in the response costs no copy. Not for BYTES.
        """
        if self._place is None:
            raise BackendError("output buffers are only available while the request executes")
        return self._place(self, name, datatype, list(shape))

    def is_cancelled(self) -> bool:
        """True once the request's caller has given up (reset its stream, passed its deadline):
        a long execute() may stop early. One byte of shared memory the front raises: no message."""
        board = self._board
        return board is not None and self._flag >= 0 and board[self._flag] != 0

    def reschedule(self) -> None:
        """Run this request again in a later batch instead of answering it now: Triton's
        ``TRITONSERVER_REQUEST_RELEASE_RESCHEDULE``, for models with ``sequence_batching {
        iterative_sequence: true }`` (continuous batching: each execute is one step of every request in
        the batch). execute() returns None for it; a decoupled model may have sent responses, not the
        final one. Its sequence keeps its slot (and implicit state) until a step answers it for good."""
        self.rescheduled = True

    def send(self, response: Response | None = None, final: bool = False) -> None:
        """Send a response of a decoupled model (``final`` ends the request; the last may be None)."""
        if self._send is None:
            raise BackendError("send() is only available for decoupled models")
        self._send(response, final)


class Response:
    """The outputs of one request, or its error.

    ``outputs`` maps names to numpy arrays, or to tensors of a GPU framework (anything
    with ``__dlpack__``: torch, cupy), which are copied from the device straight into the
    output's place in shared memory. ``failed=False`` marks an error response the model
    chose to send (Triton's python backend counts those as successful inferences).
    """

    __slots__ = ("outputs", "error", "parameters", "failed")

    def __init__(self, outputs: dict[str, Any] | None = None, error: BackendError | None = None,
                 parameters: dict | None = None, failed: bool = True) -> None:
        self.outputs = outputs or {}
        self.error = error
        self.parameters = parameters or {}
        self.failed = failed


class Backend:
    """Base class of backends: one object per model instance, in that instance's worker."""

    #: The model file a model of this backend has when its config names none.
    default_model_filename = ""
    #: Said of the instance once it is loaded (the start-up table shows it beside READY): where it runs.
    status = ""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._marks: list[int] | None = None

    @classmethod
    def auto_complete_config(cls, model: Model) -> dict | None:
        """Complete ``model.config`` from the model itself (inputs, outputs, max_batch_size);
        return the completed config, or None to leave it as it is. Called once per model, in
        the first instance's worker, unless the server runs with ``--strict-model-config``."""
        return None

    def execute(self, requests: list[Request]) -> list[Response] | None:
        """Run a batch: one :class:`Response` per request, in order (None for a request it
        :meth:`rescheduled <Request.reschedule>`).

        A decoupled model answers through :meth:`Request.send` instead and returns None.
        """
        raise NotImplementedError

    def finalize(self) -> None:
        """Release what the instance holds; the worker exits afterwards."""

    def forget_mapping(self, buffer: memoryview) -> None:
        """A shared-memory mapping is about to go (a client's region was unregistered): undo anything
        registered on its pages (e.g. with CUDA) before they are unmapped."""

    def mark(self) -> None:
        """Note the end of a phase of ``execute`` for the statistics: call once when the
        inputs are gathered and once when inference is done (else all of execute counts as
        inference, as Triton's compute_infer)."""
        if self._marks is not None:
            self._marks.append(time.perf_counter_ns())


# -- helpers for batching backends -----------------------------------------------------------------

def batch_input(requests: list[Request], name: str) -> np.ndarray:
    """Input ``name`` of every request as one array along the batch dimension.

    The front stacks the inputs it copies for a batch back to back in one shared-memory
    block, so this is usually a view on that block: no copy. Inputs that lie apart (each
    in a client's own region) are concatenated, once.
    """
    first = requests[0].inputs[name]
    if len(requests) == 1:
        return first
    arrays = [r.inputs[name] for r in requests]
    spans = [r._spans.get(name) for r in requests]
    if first.dtype != object and all(spans):
        mapping, start = spans[0]
        end = start
        for array, (buf, offset) in zip(arrays, spans):
            if buf is not mapping or offset != end:
                break
            end += array.nbytes
        else:
            rows = sum(a.shape[0] for a in arrays)
            return np.frombuffer(mapping, first.dtype, (end - start) // first.itemsize, start).reshape(
                (rows, *first.shape[1:]))
    return np.concatenate(arrays)


def batch_sizes(requests: list[Request], batched: bool) -> list[int]:
    """Each request's rows of the batch (1 each when the model does not batch)."""
    if not batched:
        return [1] * len(requests)
    sizes = []
    for r in requests:
        first = next(iter(r.inputs.values()), None)
        sizes.append(first.shape[0] if first is not None and first.ndim else 1)
    return sizes


def split(batch_output: Any, sizes: list[int]) -> list[Any]:
    """A batch output cut back into each request's rows (views, no copy)."""
    if len(sizes) == 1:
        return [batch_output]
    parts, start = [], 0
    for n in sizes:
        parts.append(batch_output[start : start + n])
        start += n
    return parts


def log(message: str, level: str = "I") -> None:
    """A line in the server's log (the worker's stderr), in the front's format; ``level`` I, W or E
    (dropped where ``--log-info``/``--log-warning``/``--log-error`` turned that level off)."""
    if not logs.enabled(level):
        return
    sys.stderr.write(f"{logs.prefix(level, 'backend')}{message}\n")
    sys.stderr.flush()


def config_datatype(tensor: dict) -> str:
    """The Triton datatype (``FP32``...) of a config input or output (``TYPE_FP32``...)."""
    return dtypes.FROM_CONFIG.get(str(tensor.get("data_type", "")), "INVALID")
