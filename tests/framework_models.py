"""Tiny ONNX and TorchScript models, built in a temporary repository by the framework-backend tests.

ONNX models come from onnx's helper API; TorchScript models from torch.jit.script. Each
builder writes ``<repo>/<name>/1/<file>`` and, when given, ``config.pbtxt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_model(repo: Path, name: str, filename: str, data: bytes | None, config: str | None) -> Path:
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (version / filename).write_bytes(data)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return version / filename


def onnx_bytes(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_sub_graph(dtype: int = TensorProto.FLOAT, batch: str | int | None = "N", width: int = 4) -> onnx.GraphProto:
    """SUM = A + B, DIFF = A - B on [batch, width] tensors (no batch dimension when ``batch`` is None)."""
    shape = [width] if batch is None else [batch, width]
    a, b = (helper.make_tensor_value_info(n, dtype, shape) for n in ("A", "B"))
    out = [helper.make_tensor_value_info(n, dtype, shape) for n in ("SUM", "DIFF")]
    nodes = [helper.make_node("Add", ["A", "B"], ["SUM"]), helper.make_node("Sub", ["A", "B"], ["DIFF"])]
    return helper.make_graph(nodes, "add_sub", [a, b], out)


def string_graph() -> onnx.GraphProto:
    """OUT = IN (strings), LEN = a copy of the batch's int64 row ids: a BYTES model with batching."""
    inp = helper.make_tensor_value_info("IN", TensorProto.STRING, ["N", 2])
    out = helper.make_tensor_value_info("OUT", TensorProto.STRING, ["N", 2])
    return helper.make_graph([helper.make_node("Identity", ["IN"], ["OUT"])], "strings", [inp], [out])


def conv_graph(channels: int = 3, size: int = 32, features: int = 8, classes: int = 10,
               seed: int = 0) -> onnx.GraphProto:
    """A small conv net: conv 3x3 -> relu -> global average pool -> flatten -> dense: [N,3,H,W] -> [N,classes]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((features, channels, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(features).astype(np.float32), "bias")
    dense = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "dense")
    nodes = [
        helper.make_node("Conv", ["INPUT", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "dense"], ["OUTPUT"]),
    ]
    inp = helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", channels, size, size])
    out = helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", classes])
    return helper.make_graph(nodes, "conv", [inp], [out], initializer=[w, bias, dense])


def external_data_model(directory: Path) -> None:
    """``directory/model.onnx`` whose weight lives in an external data file beside it: Y = X @ W."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "ext", [x], [y], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(directory / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)


def torchscript(module_class: type, path: Path) -> None:
    """Script ``module_class()`` with torch.jit and save it at ``path``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module_class().eval()), str(path))
