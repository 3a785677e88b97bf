"""Probe: echoes INPUT0 and reports how it was executed.

Per request: BATCH (requests in this execute call), STARTED/ENDED (wall-clock ns of the
execute call), PID (worker process), ADDR (where its INPUT0 lies in the worker's memory),
ARGS (the initialize args, JSON). Config parameters:
``sleep_ms`` (sleep in every execute) and ``sleep_from_input`` (sleep INPUT0's first value, ms).
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.sleep = float(params.get("sleep_ms", {}).get("string_value", "0")) / 1000
        self.sleep_from_input = params.get("sleep_from_input", {}).get("string_value") == "true"
        self.batched = config.get("max_batch_size", 0) > 0
        self.args = json.dumps(args)

    def execute(self, requests):
        started = time.time_ns()
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        sleep = self.sleep
        if self.sleep_from_input:
            sleep = max(sleep, max(float(x.reshape(-1)[0]) for x in inputs) / 1000)
        time.sleep(sleep)
        ended = time.time_ns()
        responses = []
        for x in inputs:
            shape = (x.shape[0], 1) if self.batched else (1,)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", x),
                pb_utils.Tensor("BATCH", np.full(shape, len(requests), np.int32)),
                pb_utils.Tensor("STARTED", np.full(shape, started, np.int64)),
                pb_utils.Tensor("ENDED", np.full(shape, ended, np.int64)),
                pb_utils.Tensor("PID", np.full(shape, os.getpid(), np.int64)),
                pb_utils.Tensor("ADDR", np.full(shape, x.__array_interface__["data"][0], np.uint64)),
                pb_utils.Tensor("ARGS", np.full(shape, self.args.encode(), np.object_)),
            ]))
        return responses
