"""ONNX Runtime backend: ``backend: "onnxruntime"`` / ``platform: "onnxruntime_onnx"``.

Follows Triton's onnxruntime backend: ``model.onnx`` (or ``default_model_filename``;
a directory of that name holds ``model.onnx`` and its external data), auto-completion
of inputs, outputs and max_batch_size from the model (with Triton's default max batch
size rule and its ``default-max-batch-size`` setting, 4), the session options under
Triton's parameter names, Triton's load-time checks and messages, and execution
providers: CPU by default; CUDA and TensorRT for KIND_GPU instances when the installed
onnxruntime has them (``optimization { execution_accelerators { gpu_execution_accelerator
[ { name: "tensorrt" } ] } }``).

Inputs reach ``InferenceSession.run`` as numpy views on shared memory (a batch as one
view: the front stacks it in one block), so ONNX Runtime reads them where the client's
bytes landed.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import onnxruntime as ort

from workers.backend import Backend, BackendError, Model, Request, Response, batch_input, batch_sizes, log, split

#: ONNX type strings -> Triton's config datatypes.
_TYPES = {
    "tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64", "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16", "tensor(string)": "TYPE_STRING",
}

#: The TensorRT execution provider's options, by Triton's parameter names (values as given).
_TRT_OPTIONS = {
    "max_workspace_size_bytes": "trt_max_workspace_size", "int8_calibration_table_name":
    "trt_int8_calibration_table_name", "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
    **{k: k for k in (
        "trt_max_partition_iterations", "trt_min_subgraph_size", "trt_dla_enable", "trt_dla_core",
        "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
        "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
        "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level",
        "trt_auxiliary_streams", "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes",
        "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model",
        "trt_ep_context_file_path", "trt_ep_context_embed_mode")},
}
_PRECISION = {"FP16": "trt_fp16_enable", "BF16": "trt_bf16_enable", "INT8": "trt_int8_enable"}

DEFAULT_MAX_BATCH_SIZE = 4  # Triton's default-max-batch-size


def _model_path(model: Model) -> str:
    """The ONNX file: the artifact, or ``model.onnx`` inside it when it is a directory (external data)."""
    path = model.artifact
    if os.path.isdir(path):
        path = os.path.join(path, "model.onnx")
    if not os.path.exists(path):
        raise BackendError(f"unable to find '{path}' for model instance '{model.instance_name}'", "UNAVAILABLE")
    return path


def _dims(shape: list) -> list[int]:
    """An ONNX shape with symbolic or unknown dimensions as -1."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _infos(args: list) -> dict[str, tuple[str, list[int]]]:
    return {a.name: (a.type, _dims(a.shape)) for a in args}


def _shape(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


class OnnxRuntimeBackend(Backend):
    """One ``InferenceSession`` per model instance."""

    default_model_filename = "model.onnx"

    # -- auto-completion ----------------------------------------------------------------------
    @classmethod
    def auto_complete_config(cls, model: Model) -> dict | None:
        config = model.config
        if config.get("input") and config.get("output"):
            log(f"skipping model configuration auto-complete for '{model.name}': inputs and outputs already "
                "specified")
            return None
        session = _session(model, _model_path(model), gpu=False)
        inputs, outputs = _infos(session.get_inputs()), _infos(session.get_outputs())
        config = copy.deepcopy(config)
        _complete_max_batch(model, config, inputs, outputs)
        mbs = int(config.get("max_batch_size", 0) or 0)
        if not config.get("input"):
            config["input"] = _complete_io(inputs, mbs)
        if not config.get("output"):
            config["output"] = _complete_io(outputs, mbs)
        return config

    # -- instance -----------------------------------------------------------------------------
    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.batched = model.max_batch_size > 0
        self.session = _session(model, _model_path(model), gpu=model.kind == "GPU")
        inputs = _infos(self.session.get_inputs())
        inputs.update(_infos(self.session.get_overridable_initializers()))
        outputs = _infos(self.session.get_outputs())
        self._check_inputs(inputs, len(self.session.get_inputs()))
        self._check_outputs(outputs)
        config = model.config
        #: (name, reshape or None, is_string) for each config input and output.
        self.inputs = [(t["name"], _reshape(t), t["data_type"] == "TYPE_STRING") for t in config["input"]]
        self.outputs = [(t["name"], list(t.get("dims") or []) if "reshape" in t else None)
                        for t in config["output"]]
        self._names = [name for name, _ in self.outputs]
        self._reshapes = dict(self.outputs)

    def _check_inputs(self, infos: dict, model_inputs: int) -> None:
        model, config = self.model, self.model.config
        expected = sum(1 for t in config.get("input") or [] if not t.get("optional"))  # optional: initializers
        if model_inputs != expected:
            raise BackendError(f"unable to load model '{model.name}', configuration expects {expected} inputs, model "
                               f"provides {model_inputs}", "INVALID_ARG")
        for t in config["input"]:
            name = t["name"]
            if t.get("optional") and self.batched:
                raise BackendError(f"unable to load model '{model.name}', optional input '{name}' is not supported "
                                   "for models that support batching", "INVALID_ARG")
            if name not in infos:
                raise BackendError(f"unexpected inference input '{name}', allowed inputs are: "
                                   f"{', '.join(sorted(infos))}", "INVALID_ARG")
            self._check_tensor("input", t, *infos[name], exact=False)

    def _check_outputs(self, infos: dict) -> None:
        for t in self.model.config["output"]:
            name = t["name"]
            if name not in infos:
                raise BackendError(f"unexpected inference output '{name}', allowed outputs are: "
                                   f"{', '.join(sorted(infos))}", "INVALID_ARG")
            self._check_tensor("output", t, *infos[name], exact=True)

    def _check_tensor(self, kind: str, t: dict, onnx_type: str, model_shape: list[int], exact: bool) -> None:
        """Triton's checks of a config tensor against the model's: datatype, then dimensions."""
        name, model = t["name"], self.model.name
        provided = _TYPES.get(onnx_type)
        if provided is None:
            raise BackendError(f"unsupported datatype {onnx_type} for {kind} '{name}' for model '{model}'")
        if t["data_type"] != provided:
            raise BackendError(f"unable to load model '{model}', configuration expects datatype {t['data_type']} for "
                               f"{kind} '{name}', model provides {provided}", "INVALID_ARG")
        dims = _reshape(t)
        if dims is None:
            dims = list(t.get("dims") or [])
        if not model_shape:  # a scalar
            if any(d != 1 for d in dims):
                raise BackendError(f"unable to load model '{model}', scalar tensor '{name}', should only provide 1 in "
                                   "the model configuration when the model doesn't support batching. Model "
                                   f"configuration provided: {_shape(dims)}.", "INVALID_ARG")
            return
        if self.batched:
            if model_shape[0] != -1:
                raise BackendError(f"model '{model}', tensor '{name}': for the model to support batching the shape "
                                   "should have at least 1 dimension and the first dimension must be -1; but shape "
                                   f"expected by the model is {_shape(model_shape)}", "INVALID_ARG")
            full = [-1, *dims]
            if not _dims_match(model_shape, full, exact):
                raise BackendError(
                    f"model '{model}', tensor '{name}': the model expects {len(model_shape)} dimensions (shape "
                    f"{_shape(model_shape)}) but the model configuration specifies {len(full)} dimensions (an initial "
                    "batch dimension because max_batch_size > 0 followed by the explicit tensor shape, making "
                    f"complete shape {_shape(full)})", "INVALID_ARG")
        elif not _dims_match(model_shape, dims, exact):
            raise BackendError(
                f"model '{model}', tensor '{name}': the model expects {len(model_shape)} dimensions (shape "
                f"{_shape(model_shape)}) but the model configuration specifies {len(dims)} dimensions (shape "
                f"{_shape(dims)})", "INVALID_ARG")

    # -- execution ----------------------------------------------------------------------------
    def execute(self, requests: list[Request]) -> list[Response]:
        if not self.batched and len(requests) > 1:  # each request is a whole input of the model
            return [self.execute([r])[0] for r in requests]
        sizes = batch_sizes(requests, self.batched)
        rows = sum(sizes)
        feed: dict[str, Any] = {}
        present = requests[0].inputs
        for name, reshape, is_string in self.inputs:
            if name not in present:
                continue  # an optional input left out
            array = batch_input(requests, name)
            if reshape is not None:
                array = array.reshape([rows, *reshape] if self.batched else reshape)
            feed[name] = _text(array, name) if is_string else array
        names = self._names if not any(r.requested_outputs for r in requests) else \
            [name for name in self._names if any(r.wants(name) for r in requests)]
        self.mark()
        try:
            values = self.session.run(names, feed)
        except Exception as e:  # ONNX Runtime's own errors (bad shapes, kernels...)
            raise BackendError(f"onnx runtime error: {e}") from e
        self.mark()
        responses = [Response({}) for _ in requests]
        reshapes = self._reshapes
        for name, value in zip(names, values):
            dims = reshapes[name]
            if dims is not None:
                value = value.reshape([rows, *dims] if self.batched else dims)
            if self.batched and (value.ndim == 0 or value.shape[0] != rows):
                raise BackendError(f"output '{name}' of model '{self.model.name}' has shape {list(value.shape)}: its "
                                   f"first dimension should be the batch size {rows}")
            for request, response, part in zip(requests, responses, split(value, sizes)):
                if request.wants(name):
                    response.outputs[name] = part
        return responses


def _reshape(t: dict) -> list[int] | None:
    reshape = t.get("reshape")
    return None if reshape is None else list(reshape.get("shape") or [])


def _dims_match(model_shape: list[int], dims: list[int], exact: bool) -> bool:
    return len(model_shape) == len(dims) and all(
        m == d for m, d in zip(model_shape, dims) if exact or m != -1)


def _text(array: np.ndarray, name: str) -> np.ndarray:
    """BYTES elements as str: ONNX Runtime's Python API takes string tensors as text only."""
    try:
        return np.array([b.decode("utf-8") if isinstance(b, bytes) else b for b in array.reshape(-1)],
                        dtype=object).reshape(array.shape)
    except UnicodeDecodeError:
        raise BackendError(f"input '{name}' holds bytes that are not UTF-8 text: onnxruntime takes string tensors "
                           "as text", "INVALID_ARG") from None


def _complete_max_batch(model: Model, config: dict, inputs: dict, outputs: dict) -> None:
    """Triton's rule: a model whose every input and output has a variable first dimension batches."""
    batching = all(shape and shape[0] == -1 for _, shape in [*inputs.values(), *outputs.values()])
    mbs = int(config.get("max_batch_size", 0) or 0)
    if batching:
        if mbs == 0:
            default = model.backend_config.get("default-max-batch-size", str(DEFAULT_MAX_BATCH_SIZE))
            try:
                mbs = max(int(default), 0)
            except ValueError:
                raise BackendError(f"failed to parse default-max-batch-size '{default}'", "INVALID_ARG") from None
            config["max_batch_size"] = mbs
            log(f"autofilled max_batch_size to {mbs} for model '{model.name}' since batching is supporrted but no "
                "max_batch_size is specified in model configuration. Must specify max_batch_size to utilize autofill "
                "with a larger max batch size", "W")
        if mbs > 1 and "dynamic_batching" not in config and "sequence_batching" not in config:
            config["dynamic_batching"] = {}
    elif mbs != 0:
        raise BackendError(f"autofill failed for model '{model.name}': model does not support batching while "
                           "non-zero max_batch_size is specified", "INVALID_ARG")


def _complete_io(infos: dict, mbs: int) -> list[dict]:
    tensors = []
    for name, (onnx_type, shape) in infos.items():
        if onnx_type not in _TYPES:
            raise BackendError(f"unsupported datatype {onnx_type} for '{name}'")
        dims = shape[1:] if mbs > 0 else shape
        tensor: dict[str, Any] = {"name": name, "data_type": _TYPES[onnx_type], "dims": dims or [1]}
        if not dims and mbs > 0:
            tensor["reshape"] = {"shape": []}
        tensors.append(tensor)
    return tensors


def _session(model: Model, path: str, gpu: bool) -> ort.InferenceSession:
    """A session with the model's options and, on a GPU instance, its execution providers."""
    try:
        return ort.InferenceSession(path, sess_options=_options(model),
                                    providers=_providers(model) if gpu else ["CPUExecutionProvider"])
    except BackendError:
        raise
    except Exception as e:  # a file ONNX Runtime cannot read
        raise BackendError(f"unable to load model '{model.name}': {e}", "INVALID_ARG") from e


def _options(model: Model) -> ort.SessionOptions:
    """Session options from the config, under Triton's names."""
    options = ort.SessionOptions()
    # ONNX Runtime's thread pools spin between runs by default. Beside a worker and a front that already
    # poll for work, on a few cores, that spinning starves them (a small conv net: 1.3 ms instead of 0.13 ms
    # per request on 2 cores) and burns a Jetson's power budget: off unless the config turns it on.
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        options.add_session_config_entry(key, "0")
    level = int(((model.config.get("optimization") or {}).get("graph") or {}).get("level", 0) or 0)
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL}.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    mode = model.int_parameter("execution_mode", 0)
    if mode not in (0, 1):
        raise BackendError("Invalid configuration value provided. Expected values for  execution_mode are 0 or 1 but "
                           f"got {mode} .", "INVALID_ARG")
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode else ort.ExecutionMode.ORT_SEQUENTIAL
    intra, inter = model.int_parameter("intra_op_thread_count", 0), model.int_parameter("inter_op_thread_count", 0)
    if intra > 0:
        options.intra_op_num_threads = intra
    if inter > 0:
        options.inter_op_num_threads = inter
    if model.parameter("enable_mem_arena") is not None:
        options.enable_cpu_mem_arena = model.bool_parameter("enable_mem_arena", True)
    if model.parameter("enable_mem_pattern") is not None:
        options.enable_mem_pattern = model.bool_parameter("enable_mem_pattern", True)
    for key, value in (model.config.get("parameters") or {}).items():
        if key.startswith("session."):  # session.use_device_allocator_for_initializers (Triton's), any other
            options.add_session_config_entry(key, str(value.get("string_value", "")))
    return options


def _providers(model: Model) -> list:
    """Execution providers of a KIND_GPU instance: TensorRT if asked for, CUDA, then CPU."""
    available = ort.get_available_providers()
    accelerators = ((model.config.get("optimization") or {}).get("execution_accelerators") or {}).get(
        "gpu_execution_accelerator") or []
    device = str(model.device_id)
    providers: list = []
    cuda: dict[str, str] = {}
    for accelerator in accelerators:
        name = accelerator.get("name", "")
        params = accelerator.get("parameters") or {}
        if name == "tensorrt":
            if "TensorrtExecutionProvider" not in available:
                raise BackendError(f"model '{model.name}' asks for the TensorRT execution accelerator, which the "
                                   f"installed onnxruntime {ort.__version__} does not have (it has "
                                   f"{', '.join(available)})", "UNAVAILABLE")
            options = {"device_id": device}
            for key, value in params.items():
                if key == "precision_mode":
                    if value in _PRECISION:
                        options[_PRECISION[value]] = "1"
                    elif value != "FP32":
                        raise BackendError(f"unsupported precision mode '{value}' is requested", "INVALID_ARG")
                elif key in _TRT_OPTIONS:
                    options[_TRT_OPTIONS[key]] = value
                else:
                    raise BackendError(f"unknown parameter '{key}' is provided for TensorRT Execution Accelerator",
                                       "INVALID_ARG")
            providers.append(("TensorrtExecutionProvider", options))
        elif name == "cuda":
            cuda.update({k: str(v) for k, v in params.items()})
        else:
            raise BackendError(f"unknown Execution Accelerator '{name}' is requested", "INVALID_ARG")
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {**cuda, "device_id": device}))
    else:
        log(f"instance '{model.instance_name}' of model '{model.name}' is KIND_GPU but onnxruntime "
            f"{ort.__version__} has no CUDA execution provider (install onnxruntime-gpu): it runs on the CPU", "W")
    providers.append("CPUExecutionProvider")
    return providers
