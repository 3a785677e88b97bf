"""Model configuration: config.pbtxt parsing, Triton's auto-completion and JSON form."""

from __future__ import annotations

import json
import os
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor

from kernel.errors import ServerError
from kernel.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup, ModelSequenceBatching
from shm import dtypes

# Built-in backends: default model file and platform name, in the order Triton looks for model files
# (TensorRT, ONNX Runtime, PyTorch, Python: AutoCompleteBackendFields).
DEFAULT_FILENAME = {
    "tensorrt": "model.plan",
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "python": "model.py",
}
_BACKEND_PLATFORM = {
    "tensorrt": "tensorrt_plan",
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
}
_PLATFORM_BACKEND = {platform: backend for backend, platform in _BACKEND_PLATFORM.items()}
_PLATFORM_BACKEND["pytorch_torchscript"] = "pytorch"  # Triton's alternative name


def config_path(model_dir: str, config_name: str = "") -> str:
    """The configuration file of a model: ``<model_dir>/configs/<config_name>.pbtxt`` where
    ``--model-config-name`` names one that exists, else ``<model_dir>/config.pbtxt`` (Triton's rule)."""
    if config_name:
        custom = os.path.join(model_dir, "configs", config_name + ".pbtxt")
        if os.path.isfile(custom):
            return custom
    return os.path.join(model_dir, "config.pbtxt")


def load(model_dir: str, config_name: str = "") -> ModelConfig:
    """Parse the model's configuration file (:func:`config_path`; an empty config if there is none)."""
    path = config_path(model_dir, config_name)
    config = ModelConfig()
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                text_format.Parse(f.read(), config)
        except (text_format.ParseError, UnicodeDecodeError) as e:
            raise ServerError(f"failed to read text proto from {path}: {e}", "INVALID_ARG") from e
    return config


def complete(config: ModelConfig, model_dir: str, gpu_count: int = 0) -> None:
    """Fill in what Triton fills in before a model loads (in place).

    Name, backend (from platform or model file), default model filename,
    version policy, instance groups (names, kinds, counts, devices) and the
    optimization defaults. Backend-specific auto-completion (a python model's
    ``auto_complete_config``) happens afterwards, in the worker.
    """
    name = os.path.basename(os.path.normpath(model_dir))
    if not config.name:
        config.name = name
    elif config.name != name:
        raise ServerError(
            f"unexpected directory name '{name}' for model '{config.name}', directory name must equal model name",
            "INVALID_ARG")
    if not config.backend:
        if config.platform in _PLATFORM_BACKEND:
            config.backend = _PLATFORM_BACKEND[config.platform]
        elif config.platform != "ensemble":
            config.backend = _detect_backend(model_dir, config.default_model_filename, config.platform)
    if not config.platform and config.backend in _BACKEND_PLATFORM:
        config.platform = _BACKEND_PLATFORM[config.backend]
    if not config.default_model_filename and config.backend in DEFAULT_FILENAME:
        config.default_model_filename = DEFAULT_FILENAME[config.backend]
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.HasField("dynamic_batching") and not config.dynamic_batching.preferred_batch_size \
            and config.max_batch_size > 0:
        # Triton's core does this (the configuration it reports says so); the dynamic batcher forms the same
        # batches with or without it (kernel.scheduling.scheduler: a full batch is sent at once either way).
        config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if config.HasField("sequence_batching"):
        sequence = config.sequence_batching
        if not sequence.max_sequence_idle_microseconds:
            sequence.max_sequence_idle_microseconds = 1_000_000
        if sequence.HasField("oldest") and not sequence.oldest.preferred_batch_size and config.max_batch_size > 0:
            sequence.oldest.preferred_batch_size.append(config.max_batch_size)
    if config.platform == "ensemble":
        # Triton's ensembles have no optimization settings and show their transaction policy (not decoupled)
        config.model_transaction_policy.SetInParent()
        return
    if not config.HasField("optimization"):
        config.optimization.input_pinned_memory.enable = True
        config.optimization.output_pinned_memory.enable = True
    if not config.instance_group:
        config.instance_group.add(name=config.name)  # Triton names the group it adds after the model
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.count < 1:
            group.count = 1
        if group.kind == ModelInstanceGroup.KIND_AUTO:
            group.kind = ModelInstanceGroup.KIND_GPU if gpu_count > 0 else ModelInstanceGroup.KIND_CPU
        if group.kind == ModelInstanceGroup.KIND_GPU and not group.gpus:
            group.gpus.extend(range(gpu_count))


def _detect_backend(model_dir: str, filename: str, platform: str) -> str:
    """The built-in backend a model's file implies: its ``default_model_filename``, else the files of its
    first version directory (TensorRT, ONNX Runtime, PyTorch, Python: Triton's order)."""
    for backend, default in DEFAULT_FILENAME.items():
        if filename == default:
            return backend
    if filename or platform:
        return ""
    versions = sorted(e for e in os.listdir(model_dir) if os.path.isdir(os.path.join(model_dir, e)))
    if not versions:
        return ""
    version_dir = os.path.join(model_dir, versions[0])
    for backend, default in DEFAULT_FILENAME.items():
        path = os.path.join(version_dir, default)
        # ONNX models may be directories (external data); the others are files.
        if os.path.isfile(path) or (backend == "onnxruntime" and os.path.isdir(path)):
            return backend
    return ""


def validate(config: ModelConfig) -> None:
    """Reject what Triton rejects at load time (the message becomes the model's reason)."""
    model = config.name
    if not config.backend and config.platform != "ensemble":
        raise ServerError(
            f"unexpected platform type '{config.platform}' for {model}" if config.platform
            else f"must specify 'backend' or 'platform' for model '{model}'", "INVALID_ARG")
    if config.max_batch_size < 0:
        raise ServerError(f"'max_batch_size' must be non-negative value for {model}", "INVALID_ARG")
    seen: set[str] = set()
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for t in tensors:
            if not t.name:
                raise ServerError(f"model {kind} must specify 'name' for {model}", "INVALID_ARG")
            if t.data_type == 0:
                raise ServerError(f"model {kind} '{t.name}' must specify 'data_type' for {model}", "INVALID_ARG")
            if (kind, t.name) in seen:
                raise ServerError(f"model {kind} '{t.name}' is specified more than once for {model}", "INVALID_ARG")
            seen.add((kind, t.name))
            for d in t.dims:
                if d < -1 or d == 0 and not t.HasField("reshape"):
                    raise ServerError(
                        f"model {kind} '{t.name}' dimension must be integer >= 1, or -1 to indicate a variable-size "
                        f"dimension", "INVALID_ARG")
    for t in config.input:
        if t.allow_ragged_batch:
            raise ServerError(f"input '{t.name}' of model '{model}' sets allow_ragged_batch: ragged batching is "
                              "not supported by this server yet", "UNSUPPORTED")
    for size in config.dynamic_batching.preferred_batch_size:
        if size < 1 or size > config.max_batch_size:
            raise ServerError(f"dynamic batching preferred size must be <= max batch size for {model}", "INVALID_ARG")
    for group in config.instance_group:
        if group.kind == ModelInstanceGroup.KIND_CPU and group.gpus:
            raise ServerError(f"instance group {group.name} of model {model} has kind KIND_CPU but specifies one or "
                              "more GPUs", "INVALID_ARG")
    _validate_queue_policies(config)
    if config.HasField("sequence_batching"):
        _validate_sequence_batching(config)


_FALSE_TRUE = ("int32_false_true", "fp32_false_true", "bool_false_true")
_CORRID_TYPES = (DataType.TYPE_UINT64, DataType.TYPE_INT64, DataType.TYPE_UINT32, DataType.TYPE_INT32,
                 DataType.TYPE_STRING)


def _validate_sequence_batching(config: ModelConfig) -> None:
    """Triton's checks of ``sequence_batching`` (its words; Triton leaves such a model out of the repository at
    poll time, where this server marks it UNAVAILABLE with the reason)."""
    sequence, model = config.sequence_batching, config.name
    kinds: set[int] = set()
    names: set[str] = set()
    for control_input in sequence.control_input:
        if not control_input.name:
            raise ServerError(f"sequence batching control tensor must have a name for {model}", "INVALID_ARG")
        if control_input.name in names:
            raise ServerError(f"sequence batching control tensor '{control_input.name}' is specified for multiple "
                              f"control kinds for {model}", "INVALID_ARG")
        names.add(control_input.name)
        for control in control_input.control:
            kind = ModelSequenceBatching.Control.Kind.Name(control.kind)
            if control.kind in kinds:
                raise ServerError(f"sequence batching specifies multiple {kind} tensors for {model}", "INVALID_ARG")
            kinds.add(control.kind)
            if control.kind == ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID:
                if control.data_type not in _CORRID_TYPES:
                    raise ServerError(f"unexpected data type for control {kind} for {model}. Allowed data types are "
                                      "TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 and TYPE_STRING", "INVALID_ARG")
                continue
            given = [field for field in _FALSE_TRUE if len(getattr(control, field))]
            if not given:
                raise ServerError(f"sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
                                  f"'bool_false_true' for {kind} for {model}", "INVALID_ARG")
            if len(given) > 1:
                raise ServerError(f"sequence batching specifies more than one from 'int32_false_true', "
                                  f"'fp32_false_true' and 'bool_false_true' for {kind} for {model}", "INVALID_ARG")
            if len(getattr(control, given[0])) != 2:
                raise ServerError(f"sequence batching control '{given[0]}' must have exactly 2 entries for {kind} for "
                                  f"{model}", "INVALID_ARG")
    utilization = sequence.direct.minimum_slot_utilization
    if utilization < 0 or utilization > 1:
        raise ServerError(f"sequence batching minimum slot utilization must be in range (0.0, 1.0] for {model}",
                          "INVALID_ARG")
    for size in sequence.oldest.preferred_batch_size:
        if size > config.max_batch_size:
            raise ServerError(f"sequence batching preferred batch size must be <= max batch size for {model}",
                              "INVALID_ARG")
    for state in sequence.state:
        for initial in state.initial_state:
            if initial.WhichOneof("state_data") is None:
                raise ServerError(f"initial_state setting expects state'{state.input_name}' to have state_data set",
                                  "INVALID_ARG")
            if list(initial.dims) != list(state.dims):
                mismatch = next(((a, b) for a, b in zip(initial.dims, state.dims) if a != b),
                                (len(initial.dims), len(state.dims)))
                raise ServerError(f"'initial_state' dim for input name '{state.input_name}' doesn't match 'state' dim "
                                  f"description. {mismatch[0]} != {mismatch[1]}", "INVALID_ARG")
            if initial.data_type != state.data_type:
                raise ServerError(f"The data type used for 'initial_state' field of state '{state.input_name}' does "
                                  "not match the state data type.", "INVALID_ARG")


def _validate_queue_policies(config: ModelConfig) -> None:
    """Triton's checks of priority levels and of what ``preserve_ordering`` excludes: a DELAY policy would let
    a later request overtake, and several priority levels reorder by design."""
    batching, model = config.dynamic_batching, config.name
    levels = batching.priority_levels
    if levels:
        if not 1 <= batching.default_priority_level <= levels:
            raise ServerError(f"default priority level must be in range [1, {levels}] for {model}", "INVALID_ARG")
        for level in batching.priority_queue_policy:
            if not 1 <= level <= levels:
                raise ServerError(f"priority queue policy must have priority level in range [1, {levels}] for "
                                  f"{model}", "INVALID_ARG")
    if batching.preserve_ordering:
        if levels > 1:
            raise ServerError(f"Only one priority level is allowed when 'preserve_ordering' is true for {model}",
                              "INVALID_ARG")
        for policy in (batching.default_queue_policy, *batching.priority_queue_policy.values()):
            if policy.default_timeout_microseconds and policy.timeout_action == policy.DELAY:
                raise ServerError("Queue policy can not have DELAY as timeout action when 'preserve_ordering' is "
                                  f"true for {model}", "INVALID_ARG")


def datatype(enum_value: int) -> str:
    """Triton datatype name of a ``DataType`` enum value (``TYPE_INT32`` -> ``INT32``)."""
    return dtypes.FROM_CONFIG.get(DataType.Name(enum_value), "INVALID")


#: Fields Triton 2.51's JSON leaves out when unset (an ensemble's config there has no such key; gRPC's proto3
#: leaves every unset field off the wire anyway)
_NOT_IN_TRITON_JSON = {"ModelEnsembling.max_inflight_requests"}


def to_dict(message: Any) -> dict:
    """Triton's JSON form of a config message: every field, int64 as numbers."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if f"{message.DESCRIPTOR.name}.{field.name}" in _NOT_IN_TRITON_JSON and not getattr(message, field.name):
            continue
        value = getattr(message, field.name)
        if field.containing_oneof is not None and not message.HasField(field.name):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            val_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(val_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        elif field.message_type is not None:
            if message.HasField(field.name):
                out[field.name] = to_dict(value)
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return to_dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    return value


def from_json(text: str) -> ModelConfig:
    """Parse a configuration given as JSON text (the model-load API's ``config``)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ServerError(f"failed to parse model configuration JSON: {e}", "INVALID_ARG") from e
    if not isinstance(data, dict):
        raise ServerError("model configuration JSON must be an object", "INVALID_ARG")
    return from_dict(data)


def from_dict(data: dict) -> ModelConfig:
    """Parse the JSON form back (as returned by a python model's auto-completion)."""
    config = ModelConfig()
    try:
        json_format.ParseDict(data, config, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise ServerError(f"failed to parse auto-completed model configuration: {e}", "INVALID_ARG") from e
    return config

