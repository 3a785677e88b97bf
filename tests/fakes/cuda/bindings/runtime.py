"""TEST DOUBLE of cuda-python's CUDA runtime bindings (tests/fakes/README.md): not CUDA.

"Device" memory is host memory. Host memory registered as mapped gets device addresses of its own
(its host address plus MAPPED_BASE), so the fake engine (tests/fakes/tensorrt) knows whether it
reads the shared memory itself or a device copy; any other address is an illegal access, as it
would be on a GPU. The device is described by FAKE_CUDA_INTEGRATED (0/1), FAKE_CUDA_CAN_MAP (1),
FAKE_CUDA_CAPABILITY ("8.7") and FAKE_CUDA_NAME.
"""

from __future__ import annotations

import ctypes
import enum
import os

MAPPED_BASE = 1 << 48  # above every user-space address on x86-64 and ARM64 (47-48 bits)


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorIllegalAddress = 700
    cudaErrorHostMemoryAlreadyRegistered = 712
    cudaErrorHostMemoryNotRegistered = 713


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


_OK = cudaError_t.cudaSuccess
_allocations: dict[int, ctypes.Array] = {}
_registered: dict[int, int] = {}  # host address -> size
copies = {"h2d": 0, "d2h": 0}


class _Properties:
    def __init__(self) -> None:
        major, minor = os.environ.get("FAKE_CUDA_CAPABILITY", "8.7").split(".")
        self.name = os.environ.get("FAKE_CUDA_NAME", "Fake Orin").encode()
        self.integrated = int(os.environ.get("FAKE_CUDA_INTEGRATED", "0"))
        self.canMapHostMemory = int(os.environ.get("FAKE_CUDA_CAN_MAP", "1"))
        self.major, self.minor = int(major), int(minor)


def cudaGetErrorString(error):  # noqa: N802
    return _OK, f"fake CUDA error {int(error)}".encode()


def cudaSetDevice(device):  # noqa: N802
    return (_OK,) if device == 0 else (cudaError_t.cudaErrorInvalidDevice,)


def cudaGetDeviceProperties(device):  # noqa: N802
    return (_OK, _Properties()) if device == 0 else (cudaError_t.cudaErrorInvalidDevice, None)


def cudaStreamCreate():  # noqa: N802
    return _OK, object()


def cudaStreamSynchronize(stream):  # noqa: N802
    return (_OK,)


def cudaStreamDestroy(stream):  # noqa: N802
    return (_OK,)


def cudaMalloc(size):  # noqa: N802
    buffer = (ctypes.c_char * size)()
    address = ctypes.addressof(buffer)
    _allocations[address] = buffer
    return _OK, address


def cudaFree(pointer):  # noqa: N802
    return (_OK,) if _allocations.pop(pointer, None) is not None else (cudaError_t.cudaErrorInvalidValue,)


def host_address(pointer: int, nbytes: int) -> tuple[int, bool] | None:
    """The host address behind a device address and whether it is mapped host memory; None if illegal."""
    if pointer >= MAPPED_BASE:
        host = pointer - MAPPED_BASE
        for start, size in _registered.items():
            if start <= host and host + nbytes <= start + size:
                return host, True
        return None
    for start, buffer in _allocations.items():
        if start <= pointer and pointer + nbytes <= start + ctypes.sizeof(buffer):
            return pointer, False
    return None


def cudaMemcpyAsync(dst, src, count, kind, stream):  # noqa: N802
    device, host = (dst, src) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else (src, dst)
    found = host_address(device, count)
    if found is None:
        return (cudaError_t.cudaErrorIllegalAddress,)
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        ctypes.memmove(found[0], host, count)
        copies["h2d"] += 1
    else:
        ctypes.memmove(host, found[0], count)
        copies["d2h"] += 1
    return (_OK,)


def cudaHostRegister(pointer, size, flags):  # noqa: N802
    if pointer in _registered:
        return (cudaError_t.cudaErrorHostMemoryAlreadyRegistered,)
    _registered[pointer] = size
    return (_OK,)


def cudaHostGetDevicePointer(pointer, flags):  # noqa: N802
    for start, size in _registered.items():
        if start <= pointer < start + size:
            return _OK, pointer + MAPPED_BASE
    return cudaError_t.cudaErrorInvalidValue, 0


def cudaHostUnregister(pointer):  # noqa: N802
    return (_OK,) if _registered.pop(pointer, None) is not None else (cudaError_t.cudaErrorHostMemoryNotRegistered,)
