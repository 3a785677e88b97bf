"""Device tensors in a worker: recognising them, and moving them between the GPU and shared memory.

Backends may answer with framework tensors that live on the GPU (torch, cupy: anything
speaking DLPack). The runtime copies each one from the device straight into the output's
place in shared memory, the worker's arena or the client's region: one device-to-host
copy, never through a host tensor of the framework first. Inputs go the other way for
models that want them on the GPU (python models with ``FORCE_CPU_ONLY_INPUT_TENSORS: no``).

Shared memory that meets the GPU is page-locked first (``cudaHostRegister``), once per
mapping: copies between it and the device are then DMA transfers, with no staging through a
driver buffer (pageable copies of a 1080p frame or a resnet input are several times slower).
The registration lasts until the mapping is forgotten (a client's region unregistered) or the
worker stops.

torch (or else cupy) is imported only when a device tensor shows up: the runtime itself
never imports a framework, and a CPU-only worker never pays for one.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from shm import dtypes
from shm.region import is_mapping

_KDL_CPU, _KDL_CUDA_HOST = 1, 3  # DLPack device types whose memory the CPU can read
_BF16 = dtypes.NUMPY["BF16"]


def on_device(value: Any) -> bool:
    """Whether ``value`` is a DLPack tensor in device (not host) memory."""
    if isinstance(value, np.ndarray):
        return False
    if _is_torch(value) and hasattr(value, "is_cpu"):  # a property read, where __dlpack_device__ is Python code
        return not value.is_cpu
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


#: Page-locked mappings: id(mapping) -> (the mapping, a byte view of it whose address was registered).
_pinned: dict[int, tuple[Any, np.ndarray]] = {}
_pin_failed = False


def mapping_of(array: np.ndarray) -> Any | None:
    """The shared-memory mapping an array lies in (its base chain ends in a view of a Region's mapping), if any."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if is_mapping(base) else None


def pin(array: np.ndarray) -> bool:
    """Page-lock the shared-memory mapping ``array`` lies in, for DMA by the GPU (once per mapping).

    False where it cannot be: memory that is not a mapping, or CUDA refusing (then copies stay
    pageable, as before; the first refusal is logged).
    """
    global _pin_failed
    mapping = mapping_of(array)
    if mapping is None or _pin_failed:
        return False
    if id(mapping) in _pinned:
        return True
    import torch

    view = np.frombuffer(mapping, np.uint8)
    cudart = torch.cuda.cudart()
    try:  # portable (every GPU) and mapped (in their address space: see mapped_tensor)
        torch.cuda.check_error(cudart.cudaHostRegister(view.ctypes.data, view.nbytes, 3))
    except Exception as e:  # e.g. no CUDA device, locked-memory limits
        _pin_failed = True
        sys.stderr.write(f"worker: shared memory stays pageable for the GPU (cudaHostRegister failed: {e})\n")
        return False
    _pinned[id(mapping)] = (mapping, view)
    return True


def unpin(buffer: memoryview) -> None:
    """Undo :func:`pin` for the mapping behind ``buffer`` (a region's ``buf``) before it is unmapped."""
    entry = _pinned.pop(id(buffer.obj), None) if _pinned else None
    if entry is not None:
        import torch

        torch.cuda.cudart().cudaHostUnregister(entry[1].ctypes.data)


def unpin_all() -> None:
    if _pinned:
        import torch

        for _, view in _pinned.values():
            torch.cuda.cudart().cudaHostUnregister(view.ctypes.data)
        _pinned.clear()


def host_view(dest: np.ndarray) -> Any:
    """A torch tensor over the host array ``dest`` (no copy; bfloat16 through an int16 view)."""
    import torch

    if dest.dtype == _BF16:
        return host_view(dest.view(np.int16)).view(torch.bfloat16)
    if dest.flags.writeable:
        return torch.from_numpy(dest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only inputs: torch warns, never writes them
        return torch.from_numpy(dest)


def copy_to_host(value: Any, dest: np.ndarray) -> None:
    """Copy device tensor ``value`` into the host array ``dest`` (its final place in shared memory)."""
    if _is_cupy(value):
        value.get(out=dest)
        return
    pin(dest)
    tensor = _as_torch(value)
    host_view(dest).copy_(tensor if tuple(tensor.shape) == dest.shape else tensor.reshape(dest.shape))


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


class _CudaArray:
    """Device memory described by ``__cuda_array_interface__``, for torch.as_tensor (no copy)."""

    def __init__(self, pointer: int, array: np.ndarray) -> None:
        # The read-only flag stays False even for a request's (read-only) inputs: torch refuses
        # ``(pointer, True)`` outright ("the read only flag is not supported"). Like Triton's own GPU
        # input tensors, a model must not write into its inputs.
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str, "strides": None,
                                         "data": (pointer, False), "version": 3}
        self.owner = array  # the host pages stay mapped while the tensor lives


def mapped_tensor(array: np.ndarray, device: Any) -> Any | None:
    """A GPU tensor that *is* ``array``'s shared-memory pages (mapped into the GPU's address space): no copy.

    On an integrated GPU (Jetson: one memory for CPU and GPU) kernels read those pages at full speed; on
    a discrete GPU every read crosses PCIe. Under unified virtual addressing (every 64-bit CUDA platform)
    a registered host page has the same address on the device. None where it cannot be (not shared
    memory, bfloat16, registration refused).
    """
    if array.dtype == _BF16 or not array.flags.c_contiguous or not pin(array):
        return None
    import torch

    return torch.as_tensor(_CudaArray(array.ctypes.data, array), device=device)


def integrated(device: Any) -> bool:
    """Whether the GPU shares the CPU's memory (Jetson)."""
    import torch

    return bool(torch.cuda.get_device_properties(device).is_integrated)


def to_device(array: np.ndarray, device: Any, mapped: bool = False) -> Any:
    """A host array as a tensor on ``device`` (a torch device or a GPU number; torch, else cupy): the shared
    memory itself when ``mapped`` (see mapped_tensor), else a copy from page-locked memory."""
    target = f"cuda:{device}" if isinstance(device, int) else device
    try:
        tensor = host_view(array)
    except ImportError:
        import cupy

        with cupy.cuda.Device(device if isinstance(device, int) else device.index):
            return cupy.asarray(array)
    if mapped:
        aliased = mapped_tensor(array, target)
        if aliased is not None:
            return aliased
    pinned = pin(array)
    return tensor.to(target, non_blocking=pinned)


def io_mode(setting: str | None, device: Any, name: str) -> bool:
    """Whether a GPU instance works on shared memory mapped (True) or on device copies: the config's
    ``shared_memory_io`` (``auto``: mapped on an integrated GPU), as the TensorRT backend reads it."""
    mode = setting or "auto"
    if mode not in ("auto", "mapped", "staged"):
        from workers.backend import BackendError

        raise BackendError(f"parameter shared_memory_io of model '{name}' must be auto, mapped or staged, not "
                           f"'{mode}'", "INVALID_ARG")
    return mode == "mapped" or (mode == "auto" and integrated(device))
