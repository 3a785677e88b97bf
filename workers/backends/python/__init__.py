"""Triton's python backend: runs ``model.py`` files written for Triton, unmodified.

The model's ``TritonPythonModel`` gets ``pb_utils.InferenceRequest`` objects whose input
tensors are numpy views on shared memory, and answers ``pb_utils.InferenceResponse``
objects; this module translates between those and the backend interface
(workers.backend). Unlike Triton on JetPack, it hands GPU tensors to models that ask for
them (``FORCE_CPU_ONLY_INPUT_TENSORS: no`` on a KIND_GPU instance) and takes GPU tensors
back through DLPack (docs/backends.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import sys
from typing import Any

from workers import gpu
from workers.backend import CODES, Backend, BackendError, Model, Request, Response
from workers.backends.python import triton_python_backend_utils as pb

_MODULES: dict[str, Any] = {}  # model.py path -> its module: imported once per worker


def _model_class(path: str, name: str) -> Any:
    """``TritonPythonModel`` of the model file at ``path``."""
    module = _MODULES.get(path)
    if module is None:
        sys.modules.setdefault("triton_python_backend_utils", pb)
        if not os.path.isfile(path):
            raise BackendError(f"unable to find '{path}' for model '{name}'", "NOT_FOUND")
        version_dir = os.path.dirname(path)
        if version_dir not in sys.path:
            sys.path.insert(0, version_dir)
        spec = importlib.util.spec_from_file_location(f"model_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    cls = getattr(module, "TritonPythonModel", None)
    if cls is None:
        raise AttributeError(f"'{path}' does not define class TritonPythonModel")
    return cls


class PythonBackend(Backend):
    """Loads a ``TritonPythonModel`` and feeds it requests built on shared memory."""

    default_model_filename = "model.py"

    @classmethod
    def auto_complete_config(cls, model: Model) -> dict | None:
        model_class = _model_class(model.artifact, model.name)
        if not hasattr(model_class, "auto_complete_config"):
            return None
        result = model_class.auto_complete_config(pb.ModelConfig(model.config))
        if not isinstance(result, pb.ModelConfig):
            raise TypeError("auto_complete_config must return the pb_utils.ModelConfig it was given")
        return result.as_dict()

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self.name = model.name
        self.instance_name = model.instance_name
        self.decoupled = model.decoupled
        force_cpu = model.parameter("FORCE_CPU_ONLY_INPUT_TENSORS", "yes")
        if force_cpu not in ("yes", "no"):
            raise BackendError(f"Incorrect value for FORCE_CPU_ONLY_INPUT_TENSORS: {force_cpu}'", "UNSUPPORTED")
        #: Inputs go to the instance's GPU first (Triton on JetPack cannot do this: no GPU tensors there).
        self.gpu_inputs = force_cpu == "no" and model.kind == "GPU"
        self.device_id = model.device_id
        #: GPU inputs are the shared memory itself (integrated GPUs), else device copies of it.
        self.mapped = self.gpu_inputs and gpu.io_mode(model.parameter("shared_memory_io"), model.device_id,
                                                      model.name)
        self._loop: asyncio.AbstractEventLoop | None = None  # runs an ``async def execute``
        self.instance = _model_class(model.artifact, model.name)()
        if hasattr(self.instance, "initialize"):
            self.instance.initialize(model.args)

    def finalize(self) -> None:
        if hasattr(self.instance, "finalize"):
            self.instance.finalize()
        if self._loop is not None:
            self._loop.close()

    def execute(self, requests: list[Request]) -> list[Response] | None:
        batch = [self._request(r) for r in requests]
        responses = self.instance.execute(batch)
        if inspect.iscoroutine(responses):  # ``async def execute`` (BLS fan-out with asyncio.gather)
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            responses = self._loop.run_until_complete(responses)
        if self.decoupled:
            if responses is not None:  # Triton answers every request still open with this error
                error = pb.InferenceResponse(error=pb.TritonError(
                    f"Python model '{self.instance_name}' is using the decoupled mode and the execute function "
                    "must return None."))
                for request in batch:
                    if not request._sender._closed:
                        request._sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return None
            for request, inference in zip(requests, batch):
                if inference._release_flags == pb.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE \
                        and not inference._sender._closed:
                    request.reschedule()
            return None
        if not isinstance(responses, (list, tuple)):
            raise BackendError(self._failed(f"Expected a list in the execute return, found type "
                                            f"'{type(responses)}'."))
        out: list[Response | None] = []
        for k, r in enumerate(responses):  # (a count that differs from the requests' is the runtime's to word)
            if k < len(batch) and batch[k]._release_flags == pb.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
                if r is not None:  # (Triton's words, its typo kept)
                    raise BackendError(self._failed(f"Expected a None object in the execute function return list "
                                                    f"for reschduled request, found type '{type(r)}'."))
                requests[k].reschedule()
                out.append(None)
                continue
            if not isinstance(r, pb.InferenceResponse):
                raise BackendError(self._failed(f"Expected an 'InferenceResponse' object in the execute function "
                                                f"return list, found type '{type(r)}'."))
            out.append(_response(r))
        return out

    def _failed(self, message: str) -> str:
        """Triton's python backend words a model's wrong return so (lifecycle_test.test_incorrect_execute_return)."""
        return f"Failed to process the request(s) for model instance '{self.instance_name}', message: {message}"

    def _request(self, request: Request) -> pb.InferenceRequest:
        if self.gpu_inputs:
            tensors = [pb.Tensor._on_device(name, gpu.to_device(array, self.device_id, self.mapped), self.device_id)
                       if array.dtype != object else pb.Tensor(name, array) for name, array in request.inputs.items()]
        else:
            tensors = [pb.Tensor(name, array) for name, array in request.inputs.items()]
        inference = pb.InferenceRequest(
            model_name=self.name, inputs=tensors, requested_output_names=request.requested_outputs,
            request_id=request.id, correlation_id=request.correlation_id, flags=request.flags,
            parameters=request._parameters or "{}", trace=pb.InferenceTrace(request.trace_id, request.trace_context))
        inference._is_cancelled = request.is_cancelled
        if self.decoupled:
            inference._sender = pb.InferenceResponseSender(
                lambda response, flags: request.send(None if response is None else _response(response),
                                                     bool(flags & pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)),
                request.is_cancelled)
        return inference


def _response(response: Any) -> Response:
    """A pb_utils.InferenceResponse as the runtime's Response."""
    if not isinstance(response, pb.InferenceResponse):
        return Response(error=BackendError(f"Expected an InferenceResponse object, got {type(response).__name__}"))
    if response.has_error():
        err = response.error()
        code = err.code() if isinstance(err, pb.TritonError) else 1
        message = str(err.message() if hasattr(err, "message") else err)
        return Response(error=BackendError(message, CODES[code] if 0 <= code < len(CODES) else "INTERNAL"),
                        failed=False)
    outputs = {}
    for tensor in response.output_tensors():
        outputs[tensor.name()] = tensor._data
    return Response(outputs, parameters=response._parameters)
