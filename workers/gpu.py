"""Device tensors in a worker: recognising them, and moving them between the GPU and shared memory.

Backends may answer with framework tensors that live on the GPU (torch, cupy: anything
speaking DLPack). The runtime copies each one from the device straight into the output's
place in shared memory, the worker's arena or the client's region: one device-to-host
copy, never through a host tensor of the framework first. Inputs go the other way for
models that want them on the GPU (python models with ``FORCE_CPU_ONLY_INPUT_TENSORS: no``).

torch (or else cupy) is imported only when a device tensor shows up: the runtime itself
never imports a framework, and a CPU-only worker never pays for one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from protocol import dtypes

_KDL_CPU, _KDL_CUDA_HOST = 1, 3  # DLPack device types whose memory the CPU can read
_BF16 = dtypes.NUMPY["BF16"]


def on_device(value: Any) -> bool:
    """Whether ``value`` is a DLPack tensor in device (not host) memory."""
    if isinstance(value, np.ndarray):
        return False
    device = getattr(value, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        return device()[0] not in (_KDL_CPU, _KDL_CUDA_HOST)
    except Exception:
        return False


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _is_cupy(value: Any) -> bool:
    return type(value).__module__.startswith("cupy")


def _torch_dtype_map() -> dict:
    import torch

    return {torch.bool: np.dtype(np.bool_), torch.uint8: np.dtype(np.uint8), torch.int8: np.dtype(np.int8),
            torch.int16: np.dtype(np.int16), torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64),
            torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
            torch.float64: np.dtype(np.float64), torch.bfloat16: _BF16,
            getattr(torch, "uint16", None): np.dtype(np.uint16), getattr(torch, "uint32", None): np.dtype(np.uint32),
            getattr(torch, "uint64", None): np.dtype(np.uint64)}


_TORCH_DTYPES: dict | None = None


def numpy_dtype(torch_dtype: Any) -> np.dtype | None:
    """The numpy dtype of a torch dtype (bfloat16 as ml_dtypes' bfloat16)."""
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        _TORCH_DTYPES = _torch_dtype_map()
    return _TORCH_DTYPES.get(torch_dtype)


def _as_torch(value: Any) -> Any:
    if _is_torch(value):
        return value
    import torch

    return torch.from_dlpack(value)


def describe(value: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """The numpy dtype and shape of a device tensor."""
    if _is_cupy(value):
        return np.dtype(value.dtype), tuple(value.shape)
    tensor = _as_torch(value)
    dtype = numpy_dtype(tensor.dtype)
    if dtype is None:
        raise TypeError(f"unsupported tensor datatype {tensor.dtype}")
    return dtype, tuple(tensor.shape)


def host_view(dest: np.ndarray) -> Any:
    """A torch tensor over the host array ``dest`` (no copy; bfloat16 through an int16 view)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only inputs: torch warns, never writes them
        if dest.dtype == _BF16:
            return torch.from_numpy(dest.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(dest)


def copy_to_host(value: Any, dest: np.ndarray) -> None:
    """Copy device tensor ``value`` into the host array ``dest`` (its final place in shared memory)."""
    if _is_cupy(value):
        value.get(out=dest)
        return
    host_view(dest).copy_(_as_torch(value).reshape(dest.shape))


def as_host_array(value: Any) -> np.ndarray:
    """A host-side output that is not a numpy array yet (a CPU torch tensor, a list...) as one, without a
    copy where the framework allows it."""
    if _is_torch(value):
        tensor = value.detach()
        import torch

        if tensor.dtype == torch.bfloat16:
            return tensor.contiguous().view(torch.int16).numpy().view(_BF16)
        return tensor.numpy()
    if hasattr(value, "__dlpack__") and not isinstance(value, (bytes, str)):
        try:
            return np.from_dlpack(value)
        except (TypeError, BufferError, RuntimeError):
            pass
    return np.asarray(value)


def to_device(array: np.ndarray, device_id: int) -> Any:
    """A host array as a tensor on GPU ``device_id`` (torch, else cupy)."""
    try:
        tensor = host_view(array)
    except ImportError:
        import cupy

        with cupy.cuda.Device(device_id):
            return cupy.asarray(array)
    return tensor.to(f"cuda:{device_id}")
