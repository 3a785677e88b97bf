"""Cancellation probe: each request holds its execute() until the request is cancelled, or WAIT_MS
(INPUT0's first value) has passed, then answers OUTPUT0 = [1] if it saw ``is_cancelled()``, else [0].

Every request it receives is recorded, as a JSON line ``{"id", "cancelled", "ms"}``, in
``executions.log`` beside the model's directory: a test counts which requests reached the model.
Decoupled (``model_transaction_policy { decoupled: true }``): sends a response every 50 ms until
``response_sender.is_cancelled()`` or WAIT_MS, then the final flag.
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.log = os.path.join(args["model_repository"], "executions.log")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))

    def _record(self, request, cancelled, started):
        with open(self.log, "a") as f:
            f.write(json.dumps({"id": request.request_id(), "cancelled": cancelled,
                                "ms": round((time.monotonic() - started) * 1000)}) + "\n")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            wait = float(x.reshape(-1)[0]) / 1000
            started = time.monotonic()
            if self.decoupled:
                sender = request.get_response_sender()
                while not sender.is_cancelled() and time.monotonic() - started < wait:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.zeros(1, np.int32))]))
                    time.sleep(0.05)
                cancelled = sender.is_cancelled()
                self._record(request, cancelled, started)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            while not request.is_cancelled() and time.monotonic() - started < wait:
                time.sleep(0.005)
            cancelled = request.is_cancelled()
            self._record(request, cancelled, started)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0",
                                                                         np.full(x.shape, int(cancelled), np.int32))]))
        return None if self.decoupled else responses
