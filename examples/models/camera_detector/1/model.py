"""camera_detector: IMAGE (3x180x320) -> GRID, 800 cells x (objectness, dx, dy, w, h, class0, class1).

A deliberately small detector: every 9x8 cell is pooled to colour moments (mean and mean square
per channel, 6 features), and one fixed linear layer (seeded weights) maps them to the head's 7
outputs, squashed as YOLO-style heads are. It costs well under a millisecond on one core, a
stand-in for a detector on a GPU or DLA: the pipeline's overhead, not the model, is what bench
compare measures. Runs unchanged on NVIDIA Triton.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

CELL_H, CELL_W = 9, 8
ROWS, COLS = 180 // CELL_H, 320 // CELL_W


def _weights():
    rng = np.random.default_rng(7)
    return rng.normal(0, 1.5, (6, 7)).astype(np.float32), rng.normal(0, 0.5, 7).astype(np.float32)


WEIGHTS, BIAS = _weights()


def _pool(planes):
    """Average over each cell: along rows of cells first, then down them (short reductions are slow in numpy)."""
    across = planes.reshape(3 * ROWS * CELL_H, COLS, CELL_W).sum(axis=2)
    return across.reshape(3, ROWS, CELL_H, COLS).sum(axis=2) * np.float32(1 / (CELL_H * CELL_W))


def detect(image):
    mean = _pool(image)  # 3 x ROWS x COLS
    square = _pool(np.square(image))
    features = np.concatenate([mean, square]).reshape(6, ROWS * COLS).T  # cells x 6
    head = features @ WEIGHTS + BIAS
    out = np.empty_like(head)
    out[:, 0] = 1 / (1 + np.exp(-head[:, 0]))  # objectness
    out[:, 1:3] = 1 / (1 + np.exp(-head[:, 1:3]))  # centre offset within the cell
    out[:, 3:5] = np.exp(np.clip(head[:, 3:5], -4, 2))  # size, in cells
    exp = np.exp(head[:, 5:7] - head[:, 5:7].max(axis=1, keepdims=True))
    out[:, 5:7] = exp / exp.sum(axis=1, keepdims=True)  # class probabilities
    return out


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "GRID", detect(pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy()))]) for r in requests]
