"""A python model that works on torch tensors through DLPack, as Triton's GPU python models do.

OUTPUT0 = INPUT0 * 2 (handed back as a DLPack capsule), OUTPUT1 = INPUT0 + 1 (handed back as the
torch tensor itself), WHERE = "<input on cpu>:<torch device>:<outputs on cpu>:<as_numpy of the input>".
"""

import numpy as np
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            out0 = pb_utils.Tensor.from_dlpack("OUTPUT0", torch.utils.dlpack.to_dlpack(x * 2))
            out1 = pb_utils.Tensor.from_dlpack("OUTPUT1", x + 1)
            try:
                tensor.as_numpy()
                numpy = "numpy"
            except pb_utils.TritonModelException as e:
                numpy = str(e)
            where = f"{tensor.is_cpu()}:{x.device}:{out0.is_cpu() and out1.is_cpu()}:{numpy}"
            responses.append(pb_utils.InferenceResponse(
                [out0, out1, pb_utils.Tensor("WHERE", np.array([where.encode()], dtype=object))]))
        return responses
