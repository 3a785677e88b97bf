"""TEST DOUBLE of NVIDIA's ``tensorrt`` module, TensorRT 10's Python API (tests/fakes/README.md): not TensorRT.

An "engine" is JSON: its version and GPU, its I/O tensors (name, mode, dtype, shape with -1 for a
dynamic dimension, optimization profiles of [min, opt, max] shapes) and, for each output, what to
compute ("fn": "sum" of the inputs, "diff" of the first two, "scale": first * 2 + 1, "mapped": 1 if
every input was read from mapped host memory, "dla": the runtime's DLA core) and whose batch it has
("like": an input). Execution reads and writes through the addresses bound with set_tensor_address,
via the CUDA stand-in (tests/fakes/cuda), which refuses addresses that are neither device buffers
nor mapped host memory. FAKE_TRT_VERSION ("10.3.0") and FAKE_TRT_DLA_CORES (0) describe the library.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os

import ml_dtypes
import numpy as np
from cuda.bindings import runtime as _cudart

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.3.0")


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass

    def log(self, severity, msg) -> None:  # overridden by the backend
        pass


class Logger(ILogger):
    pass


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
          DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.BF16: ml_dtypes.bfloat16,
          DataType.INT64: np.int64}


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger
        self.DLA_core = -1
        self.num_DLA_cores = int(os.environ.get("FAKE_TRT_DLA_CORES", "0"))

    def deserialize_cuda_engine(self, data: bytes):
        error = ILogger.Severity.ERROR
        try:
            plan = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            self.logger.log(error, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                   "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)")
            return None
        built = plan.get("trt_version", __version__)
        if built.split(".")[:2] != __version__.split(".")[:2]:
            self.logger.log(error, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                   f"assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not "
                                   f"match. Note: Current Version: {__version__}, Serialized Engine Version: {built})")
            return None
        props = _cudart.cudaGetDeviceProperties(0)[1]
        here = f"{props.major}.{props.minor}"
        if plan.get("capability", here) != here:
            self.logger.log(error, "IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine plan "
                                   f"file is generated on an incompatible device, expecting compute {here} got compute "
                                   f"{plan['capability']}, please rebuild.)")
            return None
        return ICudaEngine(plan, self)


class ICudaEngine:
    def __init__(self, plan: dict, runtime: Runtime) -> None:
        self.plan = plan
        self.runtime = runtime
        self.tensors = {t["name"]: t for t in plan["tensors"]}
        self.num_io_tensors = len(plan["tensors"])
        self.num_optimization_profiles = int(plan.get("profiles", 1))

    def get_tensor_name(self, index: int) -> str:
        return self.plan["tensors"][index]["name"]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode[self.tensors[name]["mode"]]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.tensors[name]["dtype"]]

    def get_tensor_shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        profiles = self.tensors[name].get("profiles")
        if not profiles:
            shape = self.get_tensor_shape(name)
            return [shape, shape, shape]
        return [list(s) for s in profiles[profile]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, list[int]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile: int, stream) -> bool:
        self.profile = profile
        return 0 <= profile < self.engine.num_optimization_profiles

    def set_input_shape(self, name: str, shape) -> bool:
        shape = list(shape)
        declared = self.engine.get_tensor_shape(name)
        low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(declared) or any(
                s != d if d != -1 else not lo <= s <= hi for s, d, lo, hi in zip(shape, declared, low, high)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> list[int]:
        tensor = self.engine.tensors[name]
        if tensor["mode"] == "INPUT":
            return self.shapes.get(name, tensor["shape"])
        like = self.shapes[tensor["like"]]
        return [like[0], *tensor["dims"]] if "dims" in tensor else list(like)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = int(address)
        return True

    def _array(self, name: str) -> tuple[np.ndarray, bool] | None:
        dtype = np.dtype(_NUMPY[DataType[self.engine.tensors[name]["dtype"]]])
        shape = self.get_tensor_shape(name)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        found = _cudart.host_address(self.addresses.get(name, 0), nbytes)
        if found is None:
            return None
        raw = (ctypes.c_char * max(nbytes, 1)).from_address(found[0])
        return np.frombuffer(raw, np.uint8, nbytes).view(dtype).reshape(shape), found[1]

    def execute_async_v3(self, stream) -> bool:
        error = ILogger.Severity.ERROR
        inputs, mapped = [], True
        for t in self.engine.plan["tensors"]:
            if t["mode"] == "INPUT":
                found = self._array(t["name"])
                if found is None:
                    self.engine.runtime.logger.log(error, f"illegal address bound to input '{t['name']}'")
                    return False
                inputs.append(found[0])
                mapped &= found[1]
        for t in self.engine.plan["tensors"]:
            if t["mode"] != "OUTPUT":
                continue
            found = self._array(t["name"])
            if found is None:
                self.engine.runtime.logger.log(error, f"illegal address bound to output '{t['name']}'")
                return False
            out = found[0]
            fn = t.get("fn", "sum")
            if fn == "sum":
                out[...] = sum(inputs)
            elif fn == "diff":
                out[...] = inputs[0] - inputs[1]
            elif fn == "scale":
                out[...] = inputs[0] * 2 + 1
            elif fn == "mapped":
                out[...] = int(mapped)
            elif fn == "dla":
                out[...] = self.engine.runtime.DLA_core
        return True
