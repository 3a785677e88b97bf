"""frame_stats: MEAN = an RGB camera FRAME's per-channel mean, metered on a 4x4 grid.

Auto-exposure metering as a camera pipeline does it: the mean of every 4th pixel of
every 4th row (a 270x480 grid on a 1080p frame), spread over the whole image. A Triton
python-backend model: it runs unchanged on NVIDIA Triton and here. With the frame in
system shared memory the model reads the client's pages in place.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

STEP = 4  # metering grid: every STEP-th row and column


def channel_means(frame):
    """Per-channel mean over the STEP x STEP grid of an [h, w, c] uint8 frame, exact (integer sums).

    Whole rows are summed first (w * c values wide), which keeps numpy's inner loop long;
    uint32 column sums cannot overflow below 16 million rows.
    """
    h, w, c = frame.shape
    rows = frame[::STEP]
    columns = rows.reshape(rows.shape[0], w * c).sum(axis=0, dtype=np.uint32).reshape(w, c)[::STEP]
    totals = columns.sum(axis=0, dtype=np.uint64)
    return (totals / (rows.shape[0] * columns.shape[0])).astype(np.float32)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            frame = pb_utils.get_input_tensor_by_name(request, "FRAME").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("MEAN", channel_means(frame))]))
        return responses
