"""Triton python-backend utilities (``import triton_python_backend_utils as pb_utils``).

Workers register this module under its Triton name so that ``model.py`` files
written for Triton's python backend run unmodified. Input tensors are numpy
views on shared memory: reading them copies nothing. Inputs that live in a
client's registered region are read-only views (the client owns those bytes).
"""

from __future__ import annotations

import json
import os
import re as _re
import sys
import threading
from collections.abc import Callable
from enum import IntEnum as _IntEnum
from typing import Any

import numpy as np

from kernel import logs as _logs
from shm import dtypes
from workers import metrics as _metrics

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
    "TYPE_BF16": dtypes.NUMPY["BF16"].type,
}

# DataType enum values of model_config.proto, in order from TYPE_BOOL (1).
_ENUM_ORDER = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
               "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16"]
_ENUM_TO_NUMPY = {i + 1: dtypes.NUMPY[name].type for i, name in enumerate(_ENUM_ORDER)}
_ENUM_TO_NUMPY[1] = np.bool_


class TritonModelException(Exception):
    """Raised by these utilities when a model uses them wrongly."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


class TritonError:
    """An error to put in an :class:`InferenceResponse` (or raise from execute)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = 1) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named tensor: a numpy array (``as_numpy()``), or a GPU tensor reached through DLPack."""

    __slots__ = ("_name", "_data", "_triton_dtype", "_device")

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None) -> None:
        if not isinstance(numpy_array, np.ndarray):
            numpy_array = np.asarray(numpy_array)
        if numpy_array.dtype.type == np.str_ or numpy_array.dtype == np.void:
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not support by Python backend. Please use np.object_ instead."
            )
        if triton_dtype is not None:
            np_type = triton_to_numpy_type(triton_dtype)
            if np_type is not None and numpy_array.dtype != np_type:
                numpy_array = numpy_array.view(np_type)
        self._name = name
        self._data: Any = numpy_array
        self._triton_dtype = triton_dtype
        self._device = -1  # the GPU holding the data; -1: host memory

    @classmethod
    def _on_device(cls, name: str, tensor: Any, device_id: int) -> Tensor:
        """A tensor whose data stays on GPU ``device_id`` (a torch or cupy tensor)."""
        self = cls.__new__(cls)
        self._name, self._data, self._triton_dtype, self._device = name, tensor, None, device_id
        return self

    @staticmethod
    def from_dlpack(name: str, dlpack_tensor: Any) -> Tensor:
        """Wrap a DLPack tensor (or a bare DLPack capsule) without copying: host tensors become numpy
        arrays, GPU tensors stay on their GPU."""
        if not hasattr(dlpack_tensor, "__dlpack__"):  # a capsule: only a framework can take it
            dlpack_tensor = _from_capsule(dlpack_tensor)
        device_type, device_id = dlpack_tensor.__dlpack_device__()
        if device_type in (1, 3):  # kDLCPU, kDLCUDAHost
            return Tensor(name, np.from_dlpack(dlpack_tensor) if not type(dlpack_tensor).__module__.startswith(
                "torch") else _torch_to_numpy(dlpack_tensor))
        return Tensor._on_device(name, dlpack_tensor, int(device_id))

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if self._device >= 0:
            raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._data

    def triton_dtype(self) -> int | None:
        if self._triton_dtype is not None:
            return self._triton_dtype
        if self._device >= 0:
            from workers import gpu

            return numpy_to_triton_type(gpu.describe(self._data)[0])
        return numpy_to_triton_type(self._data.dtype)

    def shape(self) -> list[int]:
        return list(self._data.shape)

    def is_cpu(self) -> bool:
        return self._device < 0

    def to_dlpack(self) -> Any:
        return self._data.__dlpack__()

    def __dlpack__(self, stream: Any = None) -> Any:
        if self._device >= 0:
            return self._data.__dlpack__(stream=stream) if stream is not None else self._data.__dlpack__()
        return self._data.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, self._device) if self._device >= 0 else (1, 0)

    def __repr__(self) -> str:
        where = f"cuda:{self._device}" if self._device >= 0 else "cpu"
        return f"Tensor({self._name!r}, {self._data.dtype}, {list(self._data.shape)}, {where})"


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    from workers import gpu

    return gpu.as_host_array(tensor)


def _from_capsule(capsule: Any) -> Any:
    """A framework tensor for a bare DLPack capsule (torch, else cupy, else numpy for host memory)."""
    try:
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(capsule)
    except ImportError:
        pass
    try:
        import cupy

        return cupy.from_dlpack(capsule)
    except ImportError:
        return _Capsule(capsule)


class _Capsule:
    """Give a bare DLPack capsule the protocol numpy's from_dlpack expects."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


class InferenceResponse:
    """The outputs (or the error) of one request."""

    def __init__(self, output_tensors: list | None = None, error: TritonError | None = None,
                 parameters: dict | str | None = None) -> None:
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        self._output_tensors = output_tensors
        self._error = error
        if isinstance(parameters, str):
            parameters = json.loads(parameters)
        self._parameters = parameters or {}

    def output_tensors(self) -> list:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class InferenceResponseSender:
    """Sends the responses of a decoupled model's request, one or many."""

    def __init__(self, send: Callable[[InferenceResponse | None, int], None],
                 is_cancelled: Callable[[], bool] | None = None) -> None:
        self._send = send
        self._closed = False
        self._is_cancelled = is_cancelled

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self._closed:
            raise TritonModelException("Unable to send response. Response sender has been closed.")
        if flags not in (0, TRITONSERVER_RESPONSE_COMPLETE_FINAL):
            raise TritonModelException("Invalid flags for the response sender.")
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self._closed = True
        elif response is None:
            raise TritonModelException("Inference Response object is needed when the flag is not final.")
        self._send(response, flags)

    def is_cancelled(self) -> bool:
        """True once the request's caller has given up (the client cancelled the stream)."""
        return self._is_cancelled is not None and self._is_cancelled()


TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2


class PreferredMemory:
    """Where a BLS caller would like the response's tensors (accepted; outputs arrive in shared memory,
    which is CPU memory, as on Jetson)."""

    def __init__(self, preferred_memory_type: int = TRITONSERVER_MEMORY_CPU, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class InferenceTrace:
    """A request's trace, as Triton's python backend gives it (``request.trace()``): a BLS request made
    with it (``InferenceRequest(..., trace=request.trace())``) is traced as a child of that request when the
    server traces it. ``get_context()`` is its request span's OpenTelemetry context, as Triton gives it
    (``{"traceparent": "00-<trace id>-<span id>-01"}``, JSON) when the server traces it in mode
    opentelemetry; None otherwise."""

    def __init__(self, trace_id: int = 0, context: str | None = None) -> None:
        self._id = trace_id
        self._context = context

    def get_context(self, mode: str = "opentelemetry") -> str | None:
        if self._context is None or mode != "opentelemetry":
            return None
        return json.dumps({"traceparent": self._context})


class InferenceRequest:
    """A request handed to ``execute``, or one a model builds to call another model (BLS:
    ``exec()``, ``async_exec()``, ``exec(decoupled=True)``; workers.bls sends it)."""

    def __init__(self, model_name: str = "", inputs: list | None = None,
                 requested_output_names: list | None = None, request_id: str = "",
                 correlation_id: int | str = 0, flags: int = 0, parameters: dict | str | None = None,
                 model_version: int = -1, timeout: int = 0, preferred_memory: PreferredMemory | None = None,
                 trace: Any = None, **_: Any) -> None:
        self._model_version = int(model_version)
        self._timeout = timeout  # microseconds, as Triton's request timeout
        self._preferred_memory = preferred_memory or PreferredMemory()
        self._model_name = model_name
        self._inputs = inputs or []
        self._requested = list(requested_output_names or [])
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        if isinstance(parameters, dict):
            parameters = json.dumps(parameters)
        self._parameters = parameters or "{}"
        self._sender: InferenceResponseSender | None = None
        self._is_cancelled: Callable[[], bool] | None = None  # set on a request handed to execute()
        self._trace = trace if isinstance(trace, InferenceTrace) else InferenceTrace()
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    def inputs(self) -> list:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def parameters(self) -> str:
        return self._parameters

    def model_name(self) -> str:
        return self._model_name

    def trace(self) -> InferenceTrace:
        """This request's trace: hand it to the BLS requests it makes to trace them with it."""
        return self._trace

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonModelException("get_response_sender is only available for decoupled models")
        return self._sender

    def is_cancelled(self) -> bool:
        """True once the client has given up on this request (reset its stream, passed its deadline,
        cancelled its task): a long execute() may stop early and answer CANCELLED."""
        return self._is_cancelled is not None and self._is_cancelled()

    def set_release_flags(self, flags: int) -> None:
        """``TRITONSERVER_REQUEST_RELEASE_RESCHEDULE``: run this request again in a later batch (a model
        with ``iterative_sequence``); execute() then returns None for it."""
        self._release_flags = flags

    def timeout(self) -> int:
        return self._timeout

    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on its model and wait: its response (decoupled: an iterator of responses)."""
        from workers import bls

        if bls.client is None:
            raise TritonModelException("business logic scripting is only available inside a model's worker")
        return bls.client.exec(self, decoupled)

    async def async_exec(self, decoupled: bool = False) -> Any:
        """:meth:`exec` as an awaitable: many may be in flight at once (``asyncio.gather``)."""
        from workers import bls

        if bls.client is None:
            raise TritonModelException("business logic scripting is only available inside a model's worker")
        return await bls.client.async_exec(self, decoupled)


class ModelConfig:
    """The model configuration handed to ``auto_complete_config``."""

    def __init__(self, model_config: str | dict) -> None:
        self._model_config = json.loads(model_config) if isinstance(model_config, str) else model_config

    def as_dict(self) -> dict:
        return self._model_config

    def _name(self) -> str:
        return self._model_config.get("name", "")

    def max_batch_size(self) -> int:
        return int(self._model_config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = self.max_batch_size()
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config function "
                f"for model '{self._name()}' specified max_batch_size {max_batch_size}")
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._model_config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but auto-complete-config function "
                    f"for model '{self._name()}' tries to set scheduling_choice as 'dynamic_batching'")
        self._model_config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    f"model transaction property in auto-complete-config function for model '{self._name()}' "
                    "contains property other than 'decoupled'")
        policy = self._model_config.setdefault("model_transaction_policy", {})
        policy.update(transaction_policy_dict)

    def add_input(self, input: dict) -> None:  # noqa: A002 - Triton's parameter name
        self._add_tensor("input", input)

    def add_output(self, output: dict) -> None:
        self._add_tensor("output", output)

    def add_model_warmup(self, model_warmup: dict) -> None:
        self._model_config.setdefault("model_warmup", []).append(model_warmup)

    def _add_tensor(self, kind: str, tensor: dict) -> None:
        model = self._name()
        valid = ("name", "data_type", "dims", "optional") if kind == "input" else ("name", "data_type", "dims")
        label = tensor.get("name", "")
        for prop in tensor:
            if prop not in valid:
                allowed = ("'name', 'data_type' and 'dims'" if kind == "output"
                           else "'name', 'data_type', 'dims' and 'optional'")
                raise ValueError(f"{kind} '{label}' in auto-complete-config function for model '{model}' "
                                 f"contains property other than {allowed}.")
        for prop in ("name", "data_type", "dims"):
            if prop not in tensor:
                where = f"{kind} '{label}'" if prop != "name" else kind
                raise ValueError(f"{where} in auto-complete-config function for model '{model}' "
                                 f"is missing '{prop}' property.")
        existing = self._model_config.setdefault(kind, [])
        for current in existing:
            if current.get("name") != tensor["name"]:
                continue
            if current.get("data_type", "TYPE_INVALID") not in ("TYPE_INVALID", tensor["data_type"]):
                raise ValueError(f"unable to load model '{model}', configuration expects datatype "
                                 f"{current['data_type']} for {kind} '{tensor['name']}', model provides "
                                 f"{tensor['data_type']}")
            if current.get("dims") and [int(d) for d in current["dims"]] != [int(d) for d in tensor["dims"]]:
                raise ValueError(f"model '{model}', tensor '{tensor['name']}': the model expects dims "
                                 f"{list(tensor['dims'])} but the model configuration specifies dims "
                                 f"{list(current['dims'])}")
            current.update(tensor)
            return
        existing.append(dict(tensor))


class LogLevel:
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


class Logger:
    """Triton's model logger: lines go to the server's log (stderr)."""

    _lock = threading.Lock()

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        # The settings are read at each line: the server sends new ones when they change (kernel.logs).
        tag = "IWEI"[level] if 0 <= level <= 3 else "I"
        if not _logs.verbose() if level == LogLevel.VERBOSE else not _logs.enabled(tag):
            return
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        with Logger._lock:
            sys.stderr.write(f"{_logs.prefix(tag, where)}{message}\n")
            sys.stderr.flush()

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, LogLevel.VERBOSE)


class MetricKind(_IntEnum):
    """The kind of a :class:`MetricFamily` (``pb_utils.MetricFamily.COUNTER`` ...)."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


_KIND_NAMES = {kind: f"TRITONSERVER_METRIC_KIND_{kind.name}" for kind in MetricKind}
_CLEARED = ("Invalid metric operation as the corresponding 'MetricFamily' has been deleted. The 'MetricFamily' "
            "object should be deleted AFTER its corresponding 'Metric' objects have been deleted.")
_LABEL_NAME = _re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _FamilyLife:
    """Whether a family object still exists: its Metric objects hold this, never the family itself."""

    __slots__ = ("alive",)

    def __init__(self) -> None:
        self.alive = True


class MetricFamily:
    """Triton's custom metric family: a name, a description and a kind, shared by every model and instance
    that creates one of the same name (the first description stays; another kind is an error). Its series
    appear on the server's /metrics; they go when this object is deleted, and stay (as in Triton) when the model
    unloads holding it. Operations are sent to the server without waiting for it (workers/metrics.py)."""

    COUNTER = MetricKind.COUNTER
    GAUGE = MetricKind.GAUGE
    HISTOGRAM = MetricKind.HISTOGRAM

    def __init__(self, name: str, description: str, kind: MetricKind) -> None:
        if not isinstance(name, str) or not isinstance(description, str):
            raise TypeError("MetricFamily(): name and description must be strings")
        try:
            kind = MetricKind(kind)
        except (TypeError, ValueError):
            raise TypeError("MetricFamily(): kind must be MetricFamily.COUNTER, MetricFamily.GAUGE or "
                            "MetricFamily.HISTOGRAM") from None
        reporter = _metrics.reporter
        if reporter is None:
            raise TritonModelException("Error when creating MetricFamily: custom metrics are only available inside "
                                       "a model's worker")
        handle, error = reporter.create_family(name, description, int(kind))
        if error is not None:
            raise TritonModelException(f"Error when creating MetricFamily: {error}")
        self._name = name
        self._kind = kind
        self._reporter = reporter
        self._life = _FamilyLife()
        self._metrics: dict[tuple, int] = {}  # labels -> the metric handle of this family with them
        self._handle = handle

    def Metric(self, labels: dict | None = None, buckets: list | None = None) -> Metric:  # noqa: N802 - Triton's
        """A metric of this family with ``labels`` (all values strings); ``buckets`` (upper bounds, strictly
        increasing) for a histogram only, and required there. Metrics with the same labels share one series."""
        if labels is not None and not isinstance(labels, dict):
            raise TritonModelException("Failed to create metric. Labels must be a dictionary.")
        pairs = json.loads(json.dumps(labels)) or {}  # as Triton reads them: through JSON
        bounds: list[float] | None = None
        if buckets is not None:
            if not isinstance(buckets, list):
                raise TritonModelException("Failed to create metric. Buckets must be a list.")
            if self._kind != MetricKind.HISTOGRAM:
                raise TritonModelException("Failed to create metric. Unexpected buckets found.")
            bounds = [float(b) for b in buckets]
        elif self._kind == MetricKind.HISTOGRAM:
            raise TritonModelException("Failed to create metric. Missing required buckets.")
        for value in pairs.values():
            if not isinstance(value, str):
                raise TritonModelException("Error when creating Metric: attempt to access JSON non-string as string")
        if bounds is not None and any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise TritonModelException("Error when creating Metric: Bucket Boundaries must be strictly sorted")
        for name in pairs:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__") or (
                    name == "le" and self._kind == MetricKind.HISTOGRAM):
                raise TritonModelException("Error when creating Metric: Invalid label name")
        key = tuple(sorted(pairs.items()))
        handle = self._metrics.get(key)
        if handle is None:  # (a second Metric with these labels is the same one: nothing to tell the server)
            handle = self._metrics[key] = self._reporter.new_metric(self._handle, [list(p) for p in key], bounds)
        return Metric(self._life, handle, self._kind, self._reporter)

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)  # (none: its creation failed)
        if handle is not None:
            self._life.alive = False
            self._reporter.record([4, handle], flush=False)  # may run inside a flush: only buffered


class Metric:
    """One series of a :class:`MetricFamily` (made by ``family.Metric(labels=...)``). ``increment``, ``set``
    and ``observe`` return at once; ``value()`` asks the server (the series may be shared)."""

    __slots__ = ("_life", "_handle", "_kind", "_reporter")

    def __init__(self, life: _FamilyLife, handle: int, kind: MetricKind, reporter: Any) -> None:
        self._life = life
        self._handle = handle
        self._kind = kind
        self._reporter = reporter

    def _check(self, operation: str, allowed: bool, verb: str) -> None:
        if not self._life.alive:
            raise TritonModelException(f"Failed to {operation} metric value: {_CLEARED}")
        if not allowed:
            raise TritonModelException(f"Failed to {operation} metric value: {_KIND_NAMES[self._kind]} does not "
                                       f"support {verb}")

    def increment(self, value: float) -> None:
        """Add ``value`` (a counter takes no negative value)."""
        value = float(value)
        self._check("increment", self._kind != MetricKind.HISTOGRAM, "Increment")
        if value < 0 and self._kind == MetricKind.COUNTER:
            raise TritonModelException("Failed to increment metric value: TRITONSERVER_METRIC_KIND_COUNTER can only "
                                       "be incremented monotonically by non-negative values.")
        self._reporter.record([1, self._handle, value])

    def set(self, value: float) -> None:
        """Set a gauge to ``value``."""
        value = float(value)
        self._check("set", self._kind == MetricKind.GAUGE, "Set")
        self._reporter.record([2, self._handle, value])

    def observe(self, value: float) -> None:
        """Count ``value`` in a histogram."""
        value = float(value)
        self._check("observe", self._kind == MetricKind.HISTOGRAM, "Observe")
        self._reporter.record([3, self._handle, value])

    def value(self) -> float:
        """The series' value on the server (a counter's or a gauge's; a histogram has none)."""
        self._check("get", self._kind != MetricKind.HISTOGRAM, "Value")
        try:
            return self._reporter.value(self._handle)
        except (RuntimeError, TimeoutError) as e:
            raise TritonModelException(f"Failed to get metric value: {e}") from None


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for props in model_config.get("input", []):
        if props["name"] == name:
            return props
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for props in model_config.get("output", []):
        if props["name"] == name:
            return props
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> Any:
    return _ENUM_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    if data_type in (np.object_, np.bytes_) or np.dtype(data_type).kind in "OS":
        return 13
    name = dtypes.from_numpy(np.dtype(data_type))
    return None if name is None else _ENUM_ORDER.index(name) + 1


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    if input_tensor.size == 0:
        return None
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    return dtypes.serialize_bytes(input_tensor)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    return dtypes.deserialize_bytes(encoded_tensor)


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    raise TritonModelException("is_model_ready is not supported by this server")


def load_model(model_name: str, config: str = "", files: dict | None = None) -> None:
    raise TritonModelException("model loading from a model is not supported by this server")


def unload_model(model_name: str) -> None:
    raise TritonModelException("model unloading from a model is not supported by this server")


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "Any", "Callable")]
