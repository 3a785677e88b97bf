"""TensorRT backend: ``backend: "tensorrt"`` / ``platform: "tensorrt_plan"``, a serialized engine ``model.plan``.

Follows Triton's tensorrt backend on TensorRT 10's Python API: the engine's I/O tensors by name
(``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``), auto-completion of inputs,
outputs and max_batch_size from the engine and its optimization profiles (Triton's rules),
dynamic shapes through the profile of the instance group (``profile: [ "1" ]``, else 0), one
execution context and one CUDA stream per instance (``execute_async_v3``), CUDA through
cuda-python (workers.cuda), a DLA core chosen by ``secondary_devices { kind: KIND_NVDLA
device_id: N }`` (``IRuntime.DLA_core``; on a device without that core the engine runs on the
GPU and the model's status says so), and engines built for another TensorRT or another GPU
refused with a clear reason.

Inputs and outputs meet the GPU where they lie, in shared memory (workers.cuda.HostMemory):
on an integrated GPU (Jetson) the engine reads the client's or the arena's pages and writes
its outputs into their final place through mapped device pointers: no copy at all; on a
discrete GPU they are page-locked and copied by DMA to and from device buffers. The config
parameter ``shared_memory_io`` (``auto``, ``mapped``, ``staged``) overrides the choice.

Not run against real TensorRT: TensorRT cannot be installed on the machines this project is
built and tested on. The code path is complete and its logic is tested with a test double of
the ``tensorrt`` module (tests/fakes/tensorrt, over a stand-in CUDA runtime on host memory);
the CUDA side (registration, mapped pointers, copies) has run against a real GPU with
cuda-python on the project's device machine. docs/jetson.md says what that leaves unverified.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import tensorrt as trt

from shm import dtypes
from workers import cuda
from workers.backend import Backend, BackendError, Model, Request, Response, batch_input, batch_sizes, log

#: TensorRT datatypes -> Triton's config datatypes (others: FP8, INT4... have no Triton counterpart).
_CONFIG_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT8": "TYPE_INT8",
                 "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8"}

UNVERIFIED = "not run against real TensorRT here (docs/jetson.md)"


class _Logger(trt.ILogger):
    """Keeps TensorRT's errors, which say why an engine cannot be deserialized."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.errors: list[str] = []

    def log(self, severity: Any, msg: str) -> None:
        if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
            self.errors.append(msg)
        elif severity == trt.ILogger.Severity.WARNING:
            log(f"TensorRT: {msg}", "W")


def _config_type(dtype: Any) -> str:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in _CONFIG_TYPES:
        raise BackendError(f"unsupported TensorRT datatype {name}")
    return _CONFIG_TYPES[name]


def _dla_core(model: Model) -> int | None:
    for device in model.secondary_devices:
        if device.get("kind") == "KIND_NVDLA":
            return int(device.get("device_id", 0))
    return None


def _load(model: Model, dla_core: int | None) -> tuple[Any, Any, _Logger, str]:
    """The runtime and the deserialized engine (and a status note on the DLA)."""
    path = model.artifact
    if os.path.isdir(path):
        path = os.path.join(path, "model.plan")
    if not os.path.isfile(path):
        raise BackendError(f"unable to find '{path}' for model instance '{model.instance_name}'", "UNAVAILABLE")
    logger = _Logger()
    runtime = trt.Runtime(logger)
    note = ""
    if dla_core is not None:
        cores = int(getattr(runtime, "num_DLA_cores", 0))
        if dla_core < cores:
            runtime.DLA_core = dla_core
            note = f"engine on DLA core {dla_core}"
        else:
            note = (f"GPU fallback: the config asks for DLA core {dla_core}, this device has {cores} DLA cores; the "
                    "engine runs on the GPU")
            log(f"model '{model.name}': {note}", "W")
    with open(path, "rb") as f:
        data = f.read()
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        detail = "; ".join(logger.errors) or "no message from TensorRT"
        raise BackendError(
            f"unable to load model '{model.name}': TensorRT {trt.__version__} could not deserialize '{path}' "
            f"({detail}). An engine only runs on the TensorRT version and the GPU (or DLA) it was built for: "
            "rebuild it on this device with trtexec (docs/jetson.md)", "UNAVAILABLE")
    return runtime, engine, logger, note


def _io(engine: Any) -> dict[str, dict]:
    """The engine's I/O tensors by name, in the engine's order."""
    tensors = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors[name] = {"input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                         "data_type": _config_type(engine.get_tensor_dtype(name)),
                         "shape": list(engine.get_tensor_shape(name)),
                         "shape_tensor": bool(engine.is_shape_inference_io(name))}
    return tensors


def _profiles(config: dict, count: int, name: str) -> list[int]:
    """The optimization profiles the instance groups name (default: 0)."""
    chosen = []
    for group in config.get("instance_group") or []:
        for profile in group.get("profile") or []:
            index = int(profile)
            if not 0 <= index < count:
                raise BackendError(f"unable to autofill for '{name}', configuration specified invalid profile "
                                   f"{profile} . Number of profiles supported by TensorRT engine: {count}")
            chosen.append(index)
    return chosen or [0]


def _max_batch(engine: Any, tensors: dict, profiles: list[int]) -> int:
    """Triton's GetMaxSupportedBatchSize: the largest first dimension every input allows, over the profiles."""
    best = 0
    for profile in profiles:
        limit = None
        for name, t in tensors.items():
            if t["input"]:
                first = list(engine.get_tensor_profile_shape(name, profile)[2])[0]
                limit = first if limit is None else min(limit, first)
        best = max(best, limit or 0)
    return best


class TensorRTBackend(Backend):
    """One execution context and CUDA stream per instance, on the instance's GPU (or DLA core)."""

    default_model_filename = "model.plan"

    @classmethod
    def auto_complete_config(cls, model: Model) -> dict | None:
        _, engine, _, _ = _load(model, None)
        config = copy.deepcopy(model.config)
        tensors = _io(engine)
        name = model.name
        batching = _max_batch(engine, tensors, _profiles(config, engine.num_optimization_profiles, name))
        hint: bool | None = None  # does the config's dims say the engine batches (one dimension fewer)?
        for kind in ("input", "output"):
            for t in config.get(kind) or []:
                allowed = sorted(n for n, e in tensors.items() if e["input"] == (kind == "input"))
                if t["name"] not in allowed:
                    raise BackendError(f"unexpected inference {kind} '{t['name']}', allowed {kind}s are: "
                                       f"{', '.join(allowed)}", "INVALID_ARG")
                dims = (t.get("reshape") or {}).get("shape") if "reshape" in t else t.get("dims")
                if dims:
                    batched = len(tensors[t["name"]]["shape"]) == len(dims) + 1
                    if hint is not None and hint != batched:
                        raise BackendError(f"unable to autofill for '{name}', model tensor configurations are "
                                           "contradicting each other in terms of whether batching is supported")
                    hint = batched
        if hint and not batching:
            raise BackendError(f"autofill failed for model '{name}': model tensor shape configuration hints for "
                               "dynamic batching but the underlying engine doesn't support batching.")
        if hint is False:
            batching = 0
        mbs = int(config.get("max_batch_size", 0) or 0)
        if mbs == 0:
            config["max_batch_size"] = mbs = batching
        elif mbs > batching:
            raise BackendError(f"autofill failed for model '{name}': configuration specified max-batch {mbs} but "
                               f"TensorRT engine only supports max-batch {batching}")
        if mbs > 1 and "dynamic_batching" not in config and "sequence_batching" not in config:
            config["dynamic_batching"] = {}
        for kind in ("input", "output"):
            reference = [_config_tensor(n, t, mbs) for n, t in tensors.items() if t["input"] == (kind == "input")]
            if not config.get(kind):
                config[kind] = reference
                continue
            by_name = {t["name"]: t for t in reference}
            for t in config[kind]:
                ref = by_name[t["name"]]
                if t.get("data_type", "TYPE_INVALID") in ("", "TYPE_INVALID"):
                    t["data_type"] = ref["data_type"]
                if not t.get("dims"):
                    t["dims"] = ref["dims"]
        return config

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        if model.kind != "GPU":
            raise BackendError(f"unable to load model '{model.name}': TensorRT engines run on KIND_GPU instances, "
                               f"not KIND_{model.kind}", "INVALID_ARG")
        self.batched = model.max_batch_size > 0
        info = cuda.device_info(model.device_id)
        mode = model.parameter("shared_memory_io", "auto") or "auto"
        if mode not in ("auto", "mapped", "staged"):
            raise BackendError(f"parameter shared_memory_io of model '{model.name}' must be auto, mapped or staged, "
                               f"not '{mode}'", "INVALID_ARG")
        if mode == "mapped" and not info["can_map"]:
            raise BackendError(f"GPU {model.device_id} ({info['name']}) cannot map host memory: use "
                               "shared_memory_io 'staged'", "INVALID_ARG")
        #: The GPU works on the shared-memory pages themselves (integrated GPUs), else on device copies.
        self.mapped = mode == "mapped" or (mode == "auto" and info["integrated"] and info["can_map"])
        self.runtime, self.engine, self.logger, note = _load(model, _dla_core(model))
        self.tensors = _io(self.engine)
        self._check_config()
        self.stream = cuda.Stream()
        self.context = self.engine.create_execution_context()
        self.profile = _profiles(model.config, self.engine.num_optimization_profiles, model.name)[0]
        self.context.set_optimization_profile_async(self.profile, self.stream.handle)
        self.host = cuda.HostMemory()
        self.buffers: dict[str, cuda.DeviceBuffer] = {}
        io_mode = "mapped shared memory (no copies)" if self.mapped else "page-locked shared memory and device copies"
        self.status = "; ".join(p for p in (note, f"{info['name']}, {io_mode}", UNVERIFIED) if p)
        log(f"model '{model.name}' instance '{model.instance_name}': TensorRT {trt.__version__}, {self.status}")

    def _check_config(self) -> None:
        model = self.model
        for kind in ("input", "output"):
            allowed = sorted(n for n, t in self.tensors.items() if t["input"] == (kind == "input"))
            for t in model.config.get(kind) or []:
                engine_tensor = self.tensors.get(t["name"])
                if engine_tensor is None or engine_tensor["input"] != (kind == "input"):
                    raise BackendError(f"unexpected inference {kind} '{t['name']}', allowed {kind}s are: "
                                       f"{', '.join(allowed)}", "INVALID_ARG")
                if t["data_type"] != engine_tensor["data_type"]:
                    raise BackendError(f"unable to load model '{model.name}', configuration expects datatype "
                                       f"{t['data_type']} for {kind} '{t['name']}', model provides "
                                       f"{engine_tensor['data_type']}", "INVALID_ARG")
            missing = set(allowed) - {t["name"] for t in model.config.get(kind) or []}
            if kind == "input" and missing:
                raise BackendError(f"unable to load model '{model.name}', the engine's input(s) "
                                   f"{', '.join(sorted(missing))} are not in the model configuration", "INVALID_ARG")

    def finalize(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        self.host.close()
        self.stream.close()
        self.context = self.engine = self.runtime = None

    def forget_mapping(self, buffer: memoryview) -> None:
        self.host.forget(buffer)

    # -- execution ----------------------------------------------------------------------------
    def execute(self, requests: list[Request]) -> list[Response]:
        if not self.batched and len(requests) > 1:
            return [self.execute([r])[0] for r in requests]
        sizes = batch_sizes(requests, self.batched)
        rows = sum(sizes)
        context, stream = self.context, self.stream
        for t in self.model.config["input"]:
            name = t["name"]
            array = np.ascontiguousarray(batch_input(requests, name))
            reshape = (t.get("reshape") or {}).get("shape") if "reshape" in t else None
            if reshape is not None:
                array = array.reshape([rows, *reshape] if self.batched else reshape)
            if not context.set_input_shape(name, tuple(array.shape)):
                low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
                raise BackendError(f"input '{name}' has shape {list(array.shape)}, outside the engine's optimization "
                                   f"profile {self.profile} ({list(low)} to {list(high)})", "INVALID_ARG")
            context.set_tensor_address(name, self._input_address(name, array))
        placed: list[dict[str, np.ndarray]] = [{} for _ in requests]
        copies = []  # (device buffer, per-request host destinations) of outputs staged on the device
        for t in self.model.config["output"]:
            name = t["name"]
            if not any(r.wants(name) for r in requests):
                context.set_tensor_address(name, self._device(name, self._nbytes(name)))
                continue
            shape = list(context.get_tensor_shape(name))
            datatype = dtypes.FROM_CONFIG[t["data_type"]]
            if self.mapped and len(requests) == 1:  # written where the client reads it
                dest = requests[0].output_buffer(name, datatype, shape)
                context.set_tensor_address(name, self.host.device_pointer(dest))
                placed[0][name] = dest
                continue
            device = self._device(name, self._nbytes(name))
            context.set_tensor_address(name, device)
            offset = 0
            for request, n, out in zip(requests, sizes, placed):
                part = [n, *shape[1:]] if self.batched else shape
                if request.wants(name):
                    dest = request.output_buffer(name, datatype, part)
                    out[name] = dest
                    copies.append((device + offset, dest))
                offset += dtypes.element_count(part) * dtypes.SIZE[datatype]
        self.mark()
        if not context.execute_async_v3(stream.handle):
            raise BackendError(f"TensorRT could not run model '{self.model.name}'" + (
                f": {'; '.join(self.logger.errors[-3:])}" if self.logger.errors else ""))
        for source, dest in copies:
            self.host.device_pointer(dest)  # page-locked: a DMA copy
            stream.copy_to_host(dest.ctypes.data, source, dest.nbytes)
        stream.synchronize()
        self.mark()
        return [Response(outputs) for outputs in placed]

    def _input_address(self, name: str, array: np.ndarray) -> int:
        """Where the engine reads an input: the shared memory itself when mapped, else a device copy of it."""
        if self.mapped:
            pointer = self.host.device_pointer(array)
            if pointer is not None:
                return pointer
        device = self._device(name, array.nbytes)
        self.host.device_pointer(array)  # page-locked, when it is shared memory: a DMA copy
        self.stream.copy_to_device(device, array.ctypes.data, array.nbytes)
        return device

    def _device(self, name: str, nbytes: int) -> int:
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = cuda.DeviceBuffer()
        return buffer.reserve(nbytes)

    def _nbytes(self, name: str) -> int:
        shape = list(self.context.get_tensor_shape(name))
        return dtypes.element_count(shape) * dtypes.SIZE[dtypes.FROM_CONFIG[self.tensors[name]["data_type"]]]


def _config_tensor(name: str, t: dict, mbs: int) -> dict:
    """Triton's reference I/O entry for an engine tensor."""
    shape = t["shape"]
    tensor: dict[str, Any] = {"name": name.split(" ")[0], "data_type": t["data_type"],
                              "is_shape_tensor": t["shape_tensor"]}
    if t["shape_tensor"]:
        tensor["dims"] = [shape[0] - 1 if mbs else shape[0]] if shape else []
        return tensor
    dims = shape[1:] if mbs else shape
    tensor["dims"] = dims or [1]
    if not dims:
        tensor["reshape"] = {"shape": []}
    return tensor
