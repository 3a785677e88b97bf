"""camera_postprocess: GRID (800 cells x 7) -> DETECTIONS (n x 6: x1, y1, x2, y2, score, class) in
1080p frame pixels, after a score threshold and greedy non-maximum suppression (IoU 0.45, at most
100 boxes). Runs unchanged on NVIDIA Triton.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

ROWS, COLS = 20, 40
CELL_H, CELL_W = 1080 / ROWS, 1920 / COLS  # a cell in frame pixels
THRESHOLD, IOU, KEEP = 0.35, 0.45, 100


def postprocess(grid):
    scores = grid[:, 0] * grid[:, 5:7].max(axis=1)
    chosen = np.nonzero(scores > THRESHOLD)[0]
    if chosen.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    rows, cols = np.divmod(chosen, COLS)
    cells = grid[chosen]
    cx = (cols + cells[:, 1]) * CELL_W
    cy = (rows + cells[:, 2]) * CELL_H
    w = cells[:, 3] * CELL_W
    h = cells[:, 4] * CELL_H
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    score = scores[chosen]
    kind = cells[:, 5:7].argmax(axis=1).astype(np.float32)
    order = np.argsort(-score)
    keep = []
    areas = w * h
    while order.size and len(keep) < KEEP:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= IOU]
    keep = np.array(keep)
    return np.concatenate([boxes[keep], score[keep, None], kind[keep, None]], axis=1).astype(np.float32)


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "DETECTIONS", postprocess(pb_utils.get_input_tensor_by_name(r, "GRID").as_numpy()))])
            for r in requests]
