"""The CUDA runtime through cuda-python (NVIDIA's prebuilt bindings, also shipped for JetPack).

The TensorRT backend needs device buffers, streams, copies and host-memory registration, and
no framework to get them from. cuda-python is the one NVIDIA maintains and ships as wheels
for x86-64 and Jetson; pycuda, which some TensorRT samples use, must be compiled against the
CUDA toolkit on every device (docs/jetson.md). Every call goes through :func:`check`, so a
CUDA error is a clear :class:`CudaError` naming the call.

Shared memory meets the GPU in one of two ways, chosen by the device (:func:`device_info`):

* **mapped** (integrated GPUs: Jetson, where the GPU and the CPU share one memory): the
  shared-memory mapping is registered with ``cudaHostRegisterMapped`` and the GPU reads and
  writes those very pages through a device pointer: no copy at all;
* **staged** (discrete GPUs): the mapping is page-locked the same way, and inputs and outputs
  are DMA copies between it and device buffers.

A registration is made once per mapping and undone when the mapping goes (:class:`HostMemory`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.gpu import mapping_of

try:  # cuda-python >= 12.6 (cuda-bindings)
    from cuda.bindings import runtime as cudart
except ImportError:  # older cuda-python
    from cuda import cudart  # type: ignore[no-redef]

HOST_REGISTER_PORTABLE, HOST_REGISTER_MAPPED = 1, 2


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def check(result: Any, call: str) -> Any:
    """The value(s) of a cuda-python call (which returns ``(error, *values)``), or CudaError."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        name = getattr(error, "name", str(error))
        try:
            text = cudart.cudaGetErrorString(error)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # the error text itself is best effort
            text = ""
        raise CudaError(f"{call} failed: {name}{': ' + text if text else ''}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_info(device: int) -> dict:
    """What decides how shared memory meets this GPU: integrated (shares the CPU's memory), whether it can
    map host memory, its compute capability and name."""
    check(cudart.cudaSetDevice(device), "cudaSetDevice")
    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
    return {"integrated": bool(prop.integrated), "can_map": bool(prop.canMapHostMemory),
            "capability": f"{prop.major}.{prop.minor}", "name": name}


class Stream:
    """A CUDA stream and the device buffers and copies of one model instance."""

    def __init__(self) -> None:
        self.handle = check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def copy_to_device(self, device_ptr: int, host_ptr: int, nbytes: int) -> None:
        check(cudart.cudaMemcpyAsync(device_ptr, host_ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                     self.handle), "cudaMemcpyAsync (host to device)")

    def copy_to_host(self, host_ptr: int, device_ptr: int, nbytes: int) -> None:
        check(cudart.cudaMemcpyAsync(host_ptr, device_ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     self.handle), "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        check(cudart.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cudart.cudaStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """``cudaMalloc``'d memory, grown on demand."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            cudart.cudaFree(self.ptr)
            self.ptr = self.nbytes = 0


class HostMemory:
    """Shared-memory mappings registered with CUDA: page-locked, and mapped into the GPU's address space.

    :meth:`device_pointer` gives the address the GPU uses for an array lying in such a mapping (on an
    integrated GPU, reading it there costs no copy). Registrations are cached per mapping, undone by
    :meth:`forget` (a client's region unregistered) and :meth:`close` (the worker stops).
    """

    def __init__(self) -> None:
        self._maps: dict[int, tuple[Any, np.ndarray, int]] = {}  # id(mapping) -> (mapping, byte view, device base)

    def device_pointer(self, array: np.ndarray) -> int | None:
        """The device address of ``array``'s first byte, registering its mapping first; None when the array
        is not in a shared-memory mapping."""
        mapping = mapping_of(array)
        if mapping is None:
            return None
        entry = self._maps.get(id(mapping))
        if entry is None:
            view = np.frombuffer(mapping, np.uint8)
            host = view.ctypes.data
            check(cudart.cudaHostRegister(host, view.nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED),
                  "cudaHostRegister")
            device = int(check(cudart.cudaHostGetDevicePointer(host, 0), "cudaHostGetDevicePointer"))
            entry = self._maps[id(mapping)] = (mapping, view, device)
        _, view, device = entry
        return device + (array.ctypes.data - view.ctypes.data)

    def registered(self, array: np.ndarray) -> bool:
        mapping = mapping_of(array)
        return mapping is not None and id(mapping) in self._maps

    def forget(self, buffer: memoryview) -> None:
        entry = self._maps.pop(id(buffer.obj), None)
        if entry is not None:
            cudart.cudaHostUnregister(entry[1].ctypes.data)

    def close(self) -> None:
        for _, view, _ in self._maps.values():
            cudart.cudaHostUnregister(view.ctypes.data)
        self._maps.clear()
