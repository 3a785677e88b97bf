"""repeat (decoupled): one response per element of IN, then the final flag.

Responses come from a thread that reads the input array itself (no copy), as Triton's
decoupled examples do, after a short delay when IN[0] is 1000 or more. Negative
elements make their response an error; an empty IN sends only the final flag;
IN[0] == -99 makes execute raise; IN[0] == -7 answers inside execute.
"""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            if len(values) and values[0] == -99:
                raise RuntimeError("asked to fail")
            if len(values) and values[0] == -7:
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([-7], np.int32)),
                                                        pb_utils.Tensor("IDX", np.array([0], np.uint32))]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            threading.Thread(target=self._respond, args=(values, sender)).start()
        return None

    @staticmethod
    def _respond(values, sender):
        if len(values) and values[0] >= 1000:
            time.sleep(0.3)
        for i, value in enumerate(values):
            if value < 0:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"negative value at {i}")))
                continue
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array([value], np.int32)),
                pb_utils.Tensor("IDX", np.array([i], np.uint32)),
            ]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
