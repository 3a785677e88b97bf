"""camera_postprocess: GRID (800 cells x 7) -> DETECTIONS (n x 6: x1, y1, x2, y2, score, class) in
1080p frame pixels, after a score threshold and greedy non-maximum suppression over the 64 best
candidates (IoU 0.45, at most 20 boxes). Runs unchanged on NVIDIA Triton.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

ROWS, COLS = 20, 40
CELL_H, CELL_W = 1080 / ROWS, 1920 / COLS  # a cell in frame pixels
THRESHOLD, IOU, TOP, KEEP = 0.35, 0.45, 64, 20


def postprocess(grid):
    scores = grid[:, 0] * grid[:, 5:7].max(axis=1)
    chosen = np.nonzero(scores > THRESHOLD)[0]
    if chosen.size > TOP:  # the TOP best candidates go to NMS
        chosen = chosen[np.argpartition(-scores[chosen], TOP)[:TOP]]
    if chosen.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    chosen = chosen[np.argsort(-scores[chosen])]
    rows, cols = np.divmod(chosen, COLS)
    cells = grid[chosen]
    cx = (cols + cells[:, 1]) * CELL_W
    cy = (rows + cells[:, 2]) * CELL_H
    w = cells[:, 3] * CELL_W
    h = cells[:, 4] * CELL_H
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    # IoU of every pair at once, then greedy suppression in score order
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = w * h
    overlaps = inter / (area[:, None] + area[None, :] - inter) > IOU
    alive = np.ones(chosen.size, dtype=bool)
    keep = []
    for i in range(chosen.size):
        if alive[i]:
            keep.append(i)
            if len(keep) == KEEP:
                break
            alive &= ~overlaps[i]
    keep = np.array(keep)
    kind = cells[keep, 5:7].argmax(axis=1).astype(np.float32)
    return np.concatenate([boxes[keep], scores[chosen][keep, None], kind[:, None]], axis=1).astype(np.float32)


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "DETECTIONS", postprocess(pb_utils.get_input_tensor_by_name(r, "GRID").as_numpy()))])
            for r in requests]
