"""Python models exchanging torch tensors through DLPack (on the CPU here; tests/device runs the GPU case)."""

from __future__ import annotations

import numpy as np
import tritonclient.http as httpclient

from tests.support import ROOT, KernelServer

DLPACK_CONFIG = """backend: "python"
max_batch_size: 4
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 3 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 3 ] }, { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 3 ] },
         { name: "WHERE", data_type: TYPE_STRING, dims: [ 1 ] } ]
"""


def dlpack_repository(root, name: str = "dlpack", extra: str = ""):
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.py").write_text((ROOT / "tests" / "templates" / "dlpack_model.py").read_text())
    (root / name / "config.pbtxt").write_text(DLPACK_CONFIG + extra)
    return root


def run_dlpack(url: str, model: str = "dlpack"):
    client = httpclient.InferenceServerClient(url)
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    client.close()
    return x, result


def test_cpu_tensors_through_dlpack(tmp_path):
    repo = dlpack_repository(tmp_path / "models")
    server = KernelServer(repo).start(tmp_path / "log")
    try:
        x, result = run_dlpack(server.http_url)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x + 1)
        assert result.as_numpy("WHERE")[0] == b"True:cpu:True:numpy"
    finally:
        assert server.stop() == 0
