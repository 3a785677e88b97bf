"""PyTorch backend: ``backend: "pytorch"`` / ``platform: "pytorch_libtorch"``, a TorchScript ``model.pt``.

Follows Triton's pytorch backend (libtorch): input names are the forward function's
argument names, or ``<name>__<index>``, or else the config's order; a single
``Dict[str, Tensor]`` argument takes every input by name; outputs are
``<name>__<index>`` or the config's order; ``List[str]`` for STRING tensors; the same
load-time and run-time checks and messages; the parameters INFERENCE_MODE,
DISABLE_OPTIMIZED_EXECUTION, ENABLE_CACHE_CLEANING, INTRA_OP_THREAD_COUNT,
INTER_OP_THREAD_COUNT, DISABLE_CUDNN, ENABLE_TENSOR_FUSER, ENABLE_JIT_PROFILING and
ENABLE_JIT_EXECUTOR. Triton cannot auto-complete a TorchScript model's configuration
and neither does this backend.

A KIND_CPU instance runs on tensors that *are* the shared memory the inputs arrived
in, except inputs in a client's registered region: torch has no read-only tensors,
and a model writing into its input must never write into the client's frame, so those
are copied. A KIND_GPU instance (``cuda:<device id>``) returns its outputs as device
tensors, which the runtime copies from the GPU straight into their place in shared
memory (workers.gpu): no host tensor in between. Some builds of torch need an OpenMP
runtime loaded before anything else (Jetson's "cannot allocate memory in static TLS
block"): ``--backend-config=pytorch,libomp-path=<libgomp.so.1>`` preloads it in the
worker (kernel.server.Core.worker_env).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import numpy as np

# OpenMP's threads spin after each parallel region by default: beside a worker and a front that already
# poll, on a few cores, that starves them (a small CNN: 1.4 ms instead of 0.2 ms per request on 2 cores)
# and burns a Jetson's power budget. Read when torch loads libgomp, so set before the import (a value in
# the server's environment wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after OMP_WAIT_POLICY

from workers import gpu
from workers.backend import Backend, BackendError, Model, Request, Response, batch_input, batch_sizes, log, split

_TORCH = {
    "TYPE_BOOL": torch.bool, "TYPE_UINT8": torch.uint8, "TYPE_INT8": torch.int8, "TYPE_INT16": torch.int16,
    "TYPE_INT32": torch.int32, "TYPE_INT64": torch.int64, "TYPE_FP16": torch.float16, "TYPE_FP32": torch.float32,
    "TYPE_FP64": torch.float64, "TYPE_BF16": torch.bfloat16,
}
_CONFIG = {v: k for k, v in _TORCH.items()}

#: How inputs and outputs are matched to forward's arguments and results (Triton's NamingConvention).
FORWARD_ARGUMENT, NAMED_INDEX, CONFIG_ORDER = "forward argument", "<name>__<index>", "configuration order"


def _index(name: str) -> int | None:
    """The index of a ``<name>__<index>`` tensor name (Triton's rule: what follows the first ``__``)."""
    at = name.find("__")
    if at < 0:
        return None
    digits = name[at + 2:]
    return int(digits) if digits.isdigit() else (0 if digits == "" else None)


class PyTorchBackend(Backend):
    """One TorchScript module per model instance, on the instance's device."""

    default_model_filename = "model.pt"

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.batched = model.max_batch_size > 0
        self._parameters(model)
        self.device = self._device(model)
        #: A GPU instance reads its inputs' shared memory in place (integrated GPUs), else device copies of it.
        self.mapped = self.device.type == "cuda" and gpu.io_mode(model.parameter("shared_memory_io"), self.device,
                                                                 model.name)
        path = model.artifact
        if not os.path.isfile(path):
            raise BackendError(f"unable to find '{path}' for model instance '{model.instance_name}'", "UNAVAILABLE")
        try:
            with torch.inference_mode(self.inference_mode):
                self.module = torch.jit.load(path, map_location=None if model.kind == "MODEL" else self.device)
        except Exception as e:
            raise BackendError(f"failed to load model '{model.name}': {e}") from e
        self.module.eval()
        self._bind_inputs()
        self._bind_outputs()

    # -- loading ------------------------------------------------------------------------------
    def _parameters(self, model: Model) -> None:
        self.inference_mode = model.bool_parameter("INFERENCE_MODE", True)
        # Forward runs without autograd: inference mode implies it (one guard per execute, not two: 1.1 against
        # 2.4 µs on the development VM)
        self._guard = partial(torch.inference_mode, True) if self.inference_mode else torch.no_grad
        self.cache_cleaning = model.bool_parameter("ENABLE_CACHE_CLEANING", False)
        if model.bool_parameter("DISABLE_OPTIMIZED_EXECUTION", False):
            torch._C._set_graph_executor_optimize(False)
        if model.bool_parameter("DISABLE_CUDNN", False):
            torch.backends.cudnn.enabled = False
        for key, setter in (("ENABLE_TENSOR_FUSER", "_jit_set_texpr_fuser_enabled"),
                            ("ENABLE_JIT_PROFILING", "_jit_set_profiling_mode"),
                            ("ENABLE_JIT_EXECUTOR", "_jit_set_profiling_executor")):
            if model.parameter(key) is not None and hasattr(torch._C, setter):
                getattr(torch._C, setter)(model.bool_parameter(key, True))
        intra = model.int_parameter("INTRA_OP_THREAD_COUNT", 0)
        if intra > 0:
            torch.set_num_threads(intra)
        inter = model.int_parameter("INTER_OP_THREAD_COUNT", 0)
        if inter > 0:
            try:
                torch.set_num_interop_threads(inter)
            except RuntimeError as e:  # set once per process; this worker serves one instance
                log(f"INTER_OP_THREAD_COUNT of model '{model.name}' not applied: {e}", "W")

    @staticmethod
    def _device(model: Model) -> torch.device:
        if model.kind != "GPU":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            log(f"instance '{model.instance_name}' of model '{model.name}' is KIND_GPU but torch {torch.__version__} "
                "has no CUDA device: it runs on the CPU", "W")
            return torch.device("cpu")
        if model.device_id >= torch.cuda.device_count():
            raise BackendError(f"instance '{model.instance_name}' of model '{model.name}' asks for GPU "
                               f"{model.device_id}; torch sees {torch.cuda.device_count()}", "INVALID_ARG")
        return torch.device("cuda", model.device_id)

    def _bind_inputs(self) -> None:
        """Which forward argument each config input is (Triton's ValidateInputs and naming rules)."""
        name, config = self.model.name, self.model.config
        inputs = config.get("input") or []
        arguments = list(self.module.forward.schema.arguments)
        if arguments and arguments[0].type.kind() == "ClassType":
            arguments = arguments[1:]  # self
        self.dict_input = len(arguments) == 1 and arguments[0].type.kind() == "DictType"
        allowed = []
        if not self.dict_input:
            if any(a.type.kind() == "DictType" for a in arguments):
                raise BackendError("Multiple inputs of kind DictType were detected. Only a single input of type "
                                   "Dict(str, Tensor) is supported.")
            for a in arguments:
                if a.type.kind() not in ("TensorType", "ListType"):
                    raise BackendError(f"An input of type '{a.type}' was detected in the model. Only a single input "
                                       "of type Dict(str, Tensor) or input(s) of type Tensor are supported.")
                allowed.append(a.name)
            if len(arguments) != len(inputs):
                raise BackendError(f"unable to load model '{name}', configuration expects {len(inputs)} inputs, model "
                                   f"provides {len(arguments)}", "INVALID_ARG")
        if not inputs:
            raise BackendError("model configuration must contain at least one input, none were specified.")
        names = [t["name"] for t in inputs]
        if all(n in allowed for n in names):
            self.input_naming = FORWARD_ARGUMENT
            index = {n: allowed.index(n) for n in names}
        elif all(_index(n) is not None for n in names):
            self.input_naming = NAMED_INDEX
            index = {n: _index(n) for n in names}
        else:
            self.input_naming = CONFIG_ORDER
            if any("__" in n for n in names):
                log(f"input names of model '{name}' are neither arguments of forward nor <name>__<index>: falling back "
                    "to the order of the model configuration", "W")
            index = {n: i for i, n in enumerate(names)}
        #: (name, argument position, torch dtype or None for strings, reshape or None), in config order.
        self.inputs = []
        for t in inputs:
            self._check_type("input", t)
            self.inputs.append((t["name"], index[t["name"]], _TORCH.get(t["data_type"]), _reshape(t)))
        if not self.dict_input and sorted(i for _, i, _, _ in self.inputs) != list(range(len(self.inputs))):
            raise BackendError(f"the inputs of model '{name}' do not name each of forward's {len(self.inputs)} "
                               f"arguments once ({self.input_naming})", "INVALID_ARG")

    def _bind_outputs(self) -> None:
        outputs = self.model.config.get("output") or []
        if not outputs:
            raise BackendError("model configuration must contain at least one output, none were specified.")
        names = [t["name"] for t in outputs]
        named = all(_index(n) is not None for n in names)
        self.output_naming = NAMED_INDEX if named else CONFIG_ORDER
        #: (name, result position, config datatype, reshape dims or None)
        self.outputs = []
        for i, t in enumerate(outputs):
            self._check_type("output", t)
            self.outputs.append((t["name"], _index(t["name"]) if named else i, t["data_type"],
                                 list(t.get("dims") or []) if "reshape" in t else None))

    def _check_type(self, kind: str, t: dict) -> None:
        """A datatype torch has, and strings only as one-dimensional lists (Triton's rules)."""
        dtype, name = t["data_type"], self.model.name
        if dtype != "TYPE_STRING" and dtype not in _TORCH:
            raise BackendError(f"unsupported datatype {dtype} for {kind} '{t['name']}' for model '{name}'")
        if dtype == "TYPE_STRING" and len(_dims(t)) + self.batched > 1:
            raise BackendError(f"Triton only supports 1 dimensional List of String as {kind} for '{t['name']}' "
                               f"for model '{name}'")

    # -- execution ----------------------------------------------------------------------------
    def execute(self, requests: list[Request]) -> list[Response]:
        if not self.batched and len(requests) > 1:
            return [self.execute([r])[0] for r in requests]
        sizes = batch_sizes(requests, self.batched)
        rows = sum(sizes)
        present = requests[0].inputs
        arguments: list[Any] = [None] * len(self.inputs)
        by_name: dict[str, Any] = {}
        for name, position, dtype, reshape in self.inputs:
            if name not in present:
                continue
            array = batch_input(requests, name)
            if reshape is not None:
                array = array.reshape([rows, *reshape] if self.batched else reshape)
            value = self._tensor(array, dtype)
            by_name[name] = value
            arguments[position] = value
        self.mark()
        try:
            with self._guard():
                result = self.module.forward(by_name) if self.dict_input else self.module.forward(*arguments)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:
            raise BackendError(f"PyTorch execute failure: {e}") from e
        self.mark()
        results = self._results(result)
        responses = [Response({}) for _ in requests]
        for name, position, datatype, dims in self.outputs:
            if not any(r.wants(name) for r in requests):
                continue
            if position >= len(results) or position < 0:
                raise BackendError(f"The output {name} in the model configuration refers to an output index which "
                                   f"doesn't exist. This model has {len(results)} outputs", "INVALID_ARG")
            value = self._output(name, results[position], datatype, dims, rows)
            for request, response, part in zip(requests, responses, split(value, sizes)):
                if request.wants(name):
                    response.outputs[name] = part
        if self.cache_cleaning and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return responses

    def _tensor(self, array: np.ndarray, dtype: Any) -> Any:
        """An input as forward takes it: a tensor on the instance's device, or a list of str."""
        if dtype is None:  # TYPE_STRING: List[str]
            return [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in array.reshape(-1)]
        if self.device.type != "cpu":
            return gpu.to_device(array, self.device, self.mapped)
        if not array.flags.writeable:
            array = array.copy()  # a client's region: a model writing into its input must not write there
        return gpu.host_view(array)

    @staticmethod
    def _results(result: Any) -> list:
        if isinstance(result, torch.Tensor):
            return [result]
        if isinstance(result, tuple):
            for i, item in enumerate(result):
                if isinstance(item, list) and not all(isinstance(x, str) for x in item):
                    raise BackendError(f"PyTorch execute failure: output at index {i} must be of type Tensor or "
                                       "List[str]")
            return list(result)
        if isinstance(result, list) and all(isinstance(x, str) for x in result):
            return [result]
        raise BackendError("PyTorch execute failure: output must be of type Tensor, List[str] or Tuple containing one "
                           "of these two types. It should not be a List / Dictionary of Tensors or a Scalar")

    def _output(self, name: str, value: Any, datatype: str, dims: list[int] | None, rows: int) -> Any:
        """One result as the runtime takes it: a device tensor, or a host array (strings as an object array)."""
        if isinstance(value, list):
            if datatype != "TYPE_STRING":
                raise BackendError(f"configuration expects datatype {datatype} for output '{name}', model provides "
                                   "TYPE_STRING", "INVALID_ARG")
            return np.array([s.encode("utf-8") for s in value], dtype=object)
        if not isinstance(value, torch.Tensor):
            raise BackendError(f"output tensor '{name}' is not found")
        provided = _CONFIG.get(value.dtype, f"TYPE_{str(value.dtype).removeprefix('torch.').upper()}")
        if provided != datatype:
            raise BackendError(f"configuration expects datatype {datatype} for output '{name}', model provides "
                               f"{provided}", "INVALID_ARG")
        if value.dim() == 0:
            raise BackendError(f"output '{name}' is a scalar which is not supported.", "INVALID_ARG")
        if dims is not None:
            value = value.reshape([rows, *dims] if self.batched else dims)
        if self.batched and value.shape[0] != rows:
            raise BackendError(f"output '{name}' of model '{self.model.name}' has shape {list(value.shape)}: its first "
                               f"dimension should be the batch size {rows}")
        if value.requires_grad:
            value = value.detach()
        value = value.contiguous()
        return value if value.is_cuda else gpu.as_host_array(value)


def _dims(t: dict) -> list[int]:
    return list(t.get("dims") or [])


def _reshape(t: dict) -> list[int] | None:
    reshape = t.get("reshape")
    return None if reshape is None else list(reshape.get("shape") or [])
