"""A camera frame's mean colour on the GPU, through DLPack: FRAME (UINT8 [1080, 1920, 3]) -> MEAN (FP32 [3]).

WHERE names the file mapping that holds the GPU tensor's data (from /proc/self/maps): the client's
shared-memory region when the frame reached the GPU in place (mapped), nothing when it is a device
copy. Where inputs arrive on the CPU (Triton, or FORCE_CPU_ONLY_INPUT_TENSORS), the model moves the
frame to the GPU itself, as a python model on Triton must.
"""

import os
import sys

import numpy as np

# The reference Triton's python stub runs an isolated interpreter whose site-packages lack torch (and must
# keep numpy < 2 first); bench.backends points it at the machine's torch after them.
if os.environ.get("EDGE_KERNEL_EXTRA_SITE") and os.environ["EDGE_KERNEL_EXTRA_SITE"] not in sys.path:
    sys.path.append(os.environ["EDGE_KERNEL_EXTRA_SITE"])

import torch  # noqa: E402
import torch.utils.dlpack  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _mapping(address: int) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return ""


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            frame = pb_utils.get_input_tensor_by_name(request, "FRAME")
            if frame.is_cpu():
                x = torch.from_numpy(frame.as_numpy()).cuda()
            else:
                x = torch.utils.dlpack.from_dlpack(frame.to_dlpack())
            mean = x.float().mean(dim=(0, 1))
            where = np.array([_mapping(x.data_ptr()).encode()], dtype=object)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor.from_dlpack("MEAN", torch.utils.dlpack.to_dlpack(mean)),
                pb_utils.Tensor("WHERE", where)]))
        return responses
