"""Sanity checks for the Triton-compatible protobuf modules in protocol/ and kernel/ (model_config)."""

import ast
import subprocess
import sys
from pathlib import Path

from google.protobuf import text_format

from kernel import model_config_pb2
from protocol import grpc_service_grpc, grpc_service_pb2, health_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent

CONFIG_PBTXT = """
name: "resnet50"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { specific: { versions: [ 1, 3 ] } }
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  },
  {
    name: "MASK"
    data_type: TYPE_BOOL
    dims: [ -1 ]
    optional: true
    allow_ragged_batch: true
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
instance_group [
  {
    name: "gpu_group"
    count: 2
    kind: KIND_GPU
    gpus: [ 0, 1 ]
    secondary_devices [
      {
        kind: KIND_NVDLA
        device_id: 1
      }
    ]
    rate_limiter { resources [ { name: "R1" count: 2 } ] priority: 2 }
  },
  {
    count: 1
    kind: KIND_CPU
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy { timeout_action: REJECT max_queue_size: 16 }
  priority_queue_policy {
    key: 2
    value: {
      timeout_action: DELAY
      default_timeout_microseconds: 5000
      allow_timeout_override: true
    }
  }
}
optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
  input_pinned_memory { enable: false }
}
parameters: {
  key: "EXECUTION_ENV_PATH"
  value: { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" }
}
parameters { key: "intra_op_thread_count" value { string_value: "4" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    inputs { key: "INPUT__0" value { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true } }
  }
]
model_transaction_policy { decoupled: false }
response_cache { enable: true }
"""


def parse_config() -> model_config_pb2.ModelConfig:
    return text_format.Parse(CONFIG_PBTXT, model_config_pb2.ModelConfig())


def test_config_pbtxt_parses() -> None:
    cfg = parse_config()
    mc = model_config_pb2

    assert cfg.name == "resnet50"
    assert cfg.max_batch_size == 8
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(cfg.version_policy.specific.versions) == [1, 3]

    inp, mask = cfg.input
    assert inp.data_type == mc.TYPE_FP32
    assert inp.format == mc.ModelInput.FORMAT_NCHW
    assert list(inp.dims) == [3, 224, 224]
    assert list(inp.reshape.shape) == [1, 3, 224, 224]
    assert mask.optional and mask.allow_ragged_batch and list(mask.dims) == [-1]
    assert cfg.output[0].label_filename == "labels.txt"

    gpu_group, cpu_group = cfg.instance_group
    assert gpu_group.kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(gpu_group.gpus) == [0, 1]
    (dla,) = gpu_group.secondary_devices
    assert dla.kind == mc.ModelInstanceGroup.SecondaryDevice.KIND_NVDLA
    assert dla.device_id == 1
    assert gpu_group.rate_limiter.resources[0].count == 2
    assert cpu_group.kind == mc.ModelInstanceGroup.KIND_CPU

    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.default_queue_policy.max_queue_size == 16
    policy = db.priority_queue_policy[2]
    assert policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert policy.default_timeout_microseconds == 5000
    assert policy.allow_timeout_override

    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.parameters["precision_mode"] == "FP16"
    assert (
        cfg.parameters["EXECUTION_ENV_PATH"].string_value
        == "$$TRITON_MODEL_DIRECTORY/env.tar.gz"
    )
    assert cfg.parameters["intra_op_thread_count"].string_value == "4"
    assert (
        cfg.model_warmup[0].inputs["INPUT__0"].WhichOneof("input_data_type")
        == "zero_data"
    )
    assert cfg.response_cache.enable

    # Binary round trip, and embedding in a ModelConfigResponse (cross-module import).
    again = model_config_pb2.ModelConfig.FromString(cfg.SerializeToString())
    assert again == cfg
    # One descriptor pool: grpc_service.proto's ModelConfig is kernel.model_config_pb2's.
    assert (
        grpc_service_pb2.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"].message_type
        is model_config_pb2.ModelConfig.DESCRIPTOR
    )
    resp = grpc_service_pb2.ModelConfigResponse(config=cfg)
    assert (
        grpc_service_pb2.ModelConfigResponse.FromString(resp.SerializeToString()).config
        == cfg
    )


def field_number(message, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


def test_well_known_field_numbers() -> None:
    gs = grpc_service_pb2
    assert field_number(model_config_pb2.ModelConfig, "max_batch_size") == 4
    assert field_number(model_config_pb2.ModelConfig, "dynamic_batching") == 11
    assert field_number(model_config_pb2.ModelConfig, "instance_group") == 7
    assert field_number(model_config_pb2.ModelConfig, "parameters") == 14
    assert field_number(gs.ModelInferRequest, "raw_input_contents") == 7
    assert gs.ModelInferRequest.DESCRIPTOR.fields_by_name[
        "raw_input_contents"
    ].is_repeated
    assert field_number(gs.ModelInferRequest, "inputs") == 5
    assert field_number(gs.ModelInferResponse, "raw_output_contents") == 6
    assert field_number(gs.ModelStreamInferResponse, "infer_response") == 2

    param = gs.InferParameter.DESCRIPTOR
    assert list(param.oneofs_by_name) == ["parameter_choice"]
    assert {
        f.name: f.number for f in param.oneofs_by_name["parameter_choice"].fields
    } == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }

    assert model_config_pb2.TYPE_STRING == 13
    assert model_config_pb2.TYPE_BF16 == 14
    assert model_config_pb2.DataType.Name(11) == "TYPE_FP32"


def test_services() -> None:
    svc = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert svc.full_name == "inference.GRPCInferenceService"
    assert len(svc.methods) == 20
    stream = svc.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"
    assert not svc.methods_by_name["ModelInfer"].server_streaming
    # The grpclib base class declares one handler per RPC.
    assert grpc_service_grpc.GRPCInferenceServiceBase.__abstractmethods__ == {
        m.name for m in svc.methods
    }

    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert health.full_name == "grpc.health.v1.Health"
    assert health.methods_by_name["Watch"].server_streaming
    assert health_pb2.HealthCheckResponse.SERVING == 1


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_kernel_does_not_import_protocol() -> None:
    """Dependencies run protocol -> kernel -> shm <- workers: nothing under kernel/, shm/ or workers/
    imports protocol/ (type-checking imports included), except kernel/cli.py, which starts the fronts."""
    offenders = []
    for package in ("kernel", "shm", "workers"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel == "kernel/cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                if any(name == "protocol" or name.startswith("protocol.") for name in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
