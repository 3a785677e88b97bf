"""Finding a model's backend: backend directories first, then the built-in backends.

``--backend-directory DIR`` (repeatable) is searched before the built-ins, as Triton
searches its backend directory. ``DIR/<name>/`` may hold:

* ``backend.py``: a Python module defining ``Backend``, a subclass of
  workers.backend.Backend (this server's interface, docs/backends.md);
* ``model.py``: a Triton *python-based backend* (a ``TritonPythonModel`` serving every
  model that names the backend, as vLLM's backend does), run by the python backend;
* ``libtriton_<name>.so``: a backend built for Triton's C API, which this server cannot
  load; the model is UNAVAILABLE with that reason.

A backend that fails to import makes its models UNAVAILABLE with the reason; the
others serve. Frameworks are imported here, in the worker, never in the front.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from workers.backend import Backend, BackendError

#: Built-in backends: name -> (module, class, how to install its framework).
BUILTIN = {
    "python": ("workers.backends.python", "PythonBackend", ""),
    "onnxruntime": ("workers.backends.onnxruntime", "OnnxRuntimeBackend", "pip install 'edge-kernel[onnx]'"),
    "pytorch": ("workers.backends.pytorch", "PyTorchBackend", "pip install 'edge-kernel[torch]'"),
    "tensorrt": ("workers.backends.tensorrt", "TensorRTBackend",
                 "TensorRT comes with JetPack (python3-libnvinfer), elsewhere pip install tensorrt; and "
                 "pip install 'edge-kernel[tensorrt]' for cuda-python"),
}


def resolve(name: str, directories: list[str]) -> tuple[type[Backend], str | None]:
    """The backend class for ``name`` and, for a python-based backend, the model.py it imposes."""
    if not name:
        raise BackendError("must specify 'backend' or 'platform' for the model", "INVALID_ARG")
    for directory in directories:
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        module_file = os.path.join(path, "backend.py")
        if os.path.isfile(module_file):
            return _third_party(name, module_file), None
        model_file = os.path.join(path, "model.py")
        if os.path.isfile(model_file):
            return _builtin("python"), model_file
        native = os.path.join(path, f"libtriton_{name}.so")
        if os.path.exists(native):
            raise BackendError(
                f"backend '{name}' in {directory} is a shared library ({native}) built for Triton's C API; this "
                "server loads backends written in Python (backend.py or model.py, see docs/backends.md)",
                "UNAVAILABLE")
    if name in BUILTIN:
        return _builtin(name), None
    where = f" (searched {', '.join(directories)} and the built-in backends)" if directories else ""
    raise BackendError(f"unable to find backend library for backend '{name}', try specifying runtime on the model "
                       f"configuration.{where}", "INVALID_ARG")  # Triton's words, then where this server looked


def _builtin(name: str) -> type[Backend]:
    module_name, class_name, install = BUILTIN[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f" ({install})" if install else ""
        raise BackendError(f"unable to load backend '{name}': {e}{hint}", "UNAVAILABLE") from e
    return getattr(module, class_name)


def _third_party(name: str, module_file: str) -> type[Backend]:
    module_name = f"edge_kernel_backend_{name}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        raise BackendError(f"unable to load backend '{name}' from {module_file}: {type(e).__name__}: {e}",
                           "UNAVAILABLE") from e
    cls = getattr(module, "Backend", None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend '{name}' ({module_file}) must define class Backend, a subclass of "
                           "workers.backend.Backend", "UNAVAILABLE")
    return cls
