"""Triton's python backend: runs ``model.py`` files written for Triton, unmodified."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from functools import partial
from typing import Any

from protocol import dtypes
from workers import triton_python_backend_utils as pb
from workers.runtime import BytesCountError, TensorError, Worker, describe

ERROR_CODES = ["UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED",
               "ALREADY_EXISTS", "CANCELLED"]


def _error(message: str, code: str = "INTERNAL", failed: bool = True) -> dict:
    """A request's error; ``failed`` is False for an error response the model chose to send
    (Triton counts those as successful inferences)."""
    result: dict = {"err": [message, code]}
    if failed:
        result["fail"] = True
    return result


class PythonBackend:
    """Loads a ``TritonPythonModel`` and feeds it requests built on shared memory."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.model: Any = None
        self.model_class: Any = None
        self.decoupled = False
        self.instance_name = ""

    def load(self, msg: dict) -> dict:
        """Import model.py and run its ``auto_complete_config`` if asked to."""
        sys.modules.setdefault("triton_python_backend_utils", pb)
        path = msg["model_file"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"unable to find '{path}'")
        version_dir = os.path.dirname(path)
        if version_dir not in sys.path:
            sys.path.insert(0, version_dir)
        spec = importlib.util.spec_from_file_location(f"model_{msg['name']}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.model_class = getattr(module, "TritonPythonModel", None)
        if self.model_class is None:
            raise AttributeError(f"'{path}' does not define class TritonPythonModel")
        config = msg["config"]
        if msg.get("autocomplete") and hasattr(self.model_class, "auto_complete_config"):
            result = self.model_class.auto_complete_config(pb.ModelConfig(config))
            if not isinstance(result, pb.ModelConfig):
                raise TypeError("auto_complete_config must return the pb_utils.ModelConfig it was given")
            config = result.as_dict()
        return config

    def initialize(self, msg: dict) -> None:
        self.decoupled = pb.using_decoupled_model_transaction_policy(msg["config"])
        self.instance_name = msg["args"]["model_instance_name"]
        self.model_name = msg["args"]["model_name"]
        self.model = self.model_class()
        if hasattr(self.model, "initialize"):
            self.model.initialize(msg["args"])

    def finalize(self) -> None:
        if self.model is not None and hasattr(self.model, "finalize"):
            self.model.finalize()

    def execute(self, msg: dict) -> None:
        worker = self.worker
        t0 = time.perf_counter_ns()
        specs = msg["reqs"]
        results: list[dict | None] = [None] * len(specs)
        batch: list[tuple[int, pb.InferenceRequest]] = []
        for i, spec in enumerate(specs):
            try:
                inputs = [pb.Tensor(loc[0], worker.input_array(loc)) for loc in spec["in"]]
            except BytesCountError as e:
                results[i] = _error(e.for_request(self.model_name, spec.get("rid", "")), "INVALID_ARG")
                continue
            except (TensorError, ValueError) as e:
                results[i] = _error(str(e), getattr(e, "code", "INVALID_ARG"))
                continue
            request = pb.InferenceRequest(
                model_name=self.model_name, inputs=inputs, requested_output_names=spec.get("out") or [],
                request_id=spec.get("rid", ""), correlation_id=spec.get("cid", 0), flags=spec.get("fl", 0),
                parameters=spec.get("p") or "{}")
            if self.decoupled:
                request._sender = pb.InferenceResponseSender(partial(self._stream, msg["id"], i, spec))
            batch.append((i, request))
        t1 = time.perf_counter_ns()
        responses: Any = None
        if batch:
            try:
                responses = self.model.execute([request for _, request in batch])
            except Exception as e:
                failed = {"err": [self._failure(e), "INTERNAL"], "fail": True}
                for i, _ in batch:
                    results[i] = failed
                batch = []
        t2 = time.perf_counter_ns()
        if batch and not self.decoupled:
            problem = self._check_responses(responses, len(batch))
            for k, (i, _) in enumerate(batch):
                results[i] = _error(problem) if problem else self._result(responses[k], specs[i])
        t3 = time.perf_counter_ns()  # CLOCK_MONOTONIC: the front reads it as its own clock
        worker.send({"t": "r", "id": msg["id"], "res": results, "d": self.decoupled,
                     "ts": [t1 - t0, t2 - t1, t3 - t2], "at": t3})

    def _failure(self, e: BaseException) -> str:
        return f"Failed to process the request(s) for model '{self.instance_name}', message: {describe(e)}"

    @staticmethod
    def _check_responses(responses: Any, count: int) -> str | None:
        if not isinstance(responses, (list, tuple)):
            return ("Failed to process the request(s): expected a list of InferenceResponse objects "
                    f"from execute, got {type(responses).__name__}")
        if len(responses) != count:
            return ("Number of InferenceResponse objects do not match number of InferenceRequest objects. "
                    f"InferenceRequest(s) size is:{count}, and InferenceResponse(s) size is:{len(responses)}\n")
        return None

    def _result(self, response: Any, spec: dict) -> dict:
        """Move one response's outputs into shared memory."""
        if not isinstance(response, pb.InferenceResponse):
            return _error(f"Expected an InferenceResponse object, got {type(response).__name__}")
        if response.has_error():
            err = response.error()
            code = err.code() if isinstance(err, pb.TritonError) else 1
            return _error(str(err.message() if hasattr(err, "message") else err),
                          ERROR_CODES[code] if 0 <= code < len(ERROR_CODES) else "INTERNAL", failed=False)
        wanted = spec.get("out")
        dests = spec.get("shm") or {}
        outs: list[list] = []
        try:
            for tensor in response.output_tensors():
                name = tensor.name()
                if wanted and name not in wanted:
                    continue
                array = tensor.as_numpy()
                datatype = dtypes.from_numpy(array.dtype)
                if datatype is None:
                    raise TensorError(f"output '{name}' has an unsupported datatype {array.dtype}", "INTERNAL")
                outs.append(self.worker.output_loc(name, array, datatype, dests.get(name)))
        except TensorError as e:
            self._free(outs)
            return _error(str(e), e.code)
        except Exception as e:  # e.g. /dev/shm full while growing the arena, a model's odd tensor
            self._free(outs)
            return _error(f"unable to return the outputs: {type(e).__name__}: {e}")
        result: dict = {"out": outs}
        if response._parameters:
            result["p"] = response._parameters
        return result

    def _free(self, outs: list[list]) -> None:
        for loc in outs:
            if loc[3] and not loc[6]:
                self.worker.arena.free(loc[3], loc[4])

    def _stream(self, batch_id: int, index: int, spec: dict, response: pb.InferenceResponse | None,
                flags: int) -> None:
        result = None if response is None else self._result(response, spec)
        self.worker.send({"t": "s", "id": batch_id, "i": index, "res": result,
                          "final": bool(flags & pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)})
