"""Model warmup (``model_warmup`` in config.pbtxt), as Triton 2.51 runs it (docs/triton-behaviour.md, section 16):
on each instance before the model is READY, counted in the statistics, a failure leaving it UNAVAILABLE."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.pipeline_models import _io, _python
from tests.support import ROOT, serving

# Records each execute() (instance, and per request: shape, dtype, values) as a line of <repository>/../<model>.jsonl.
_RECORDER = '''
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.instance = args["model_instance_name"]
        self.log = os.path.join(args["model_repository"], "..", "..", args["model_name"] + ".jsonl")

    def execute(self, requests):
        record = {"instance": self.instance, "requests": []}
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            values = [v.decode() for v in x.ravel()] if x.dtype == object else x.ravel().tolist()
            record["requests"].append({"shape": list(x.shape), "dtype": str(x.dtype), "values": values})
            RAISE
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x)]))
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\\n")
        return responses
'''


def _sample(name: str, data: str, batch_size: int = 1, count: int = 0, dt: str = "FP32", dims: str = "4") -> str:
    return (f'{{ name: "{name}" batch_size: {batch_size} count: {count} inputs {{ key: "IN" value: '
            f'{{ data_type: TYPE_{dt} dims: [ {dims} ] {data} }} }} }}')


def _model(dest: Path, name: str, samples: list[str], mbs: int = 8, dt: str = "FP32", extra: str = "",
           raises: bool = False, files: dict[str, bytes] | None = None) -> None:
    code = _RECORDER.replace("RAISE", 'raise ValueError("execute exploded")' if raises else "pass")
    _python(dest, name, _io([("IN", dt, "4")], [("OUT", dt, "4")], mbs) + extra
            + f"model_warmup [ {', '.join(samples)} ]\n", code)
    for file, content in (files or {}).items():
        (dest / name / "warmup").mkdir(exist_ok=True)
        (dest / name / "warmup" / file).write_bytes(content)


def _repository(dest: Path) -> Path:
    dest.mkdir(parents=True)
    _model(dest, "warm", [_sample("zero", "zero_data: true", batch_size=3, count=2),
                          _sample("random", "random_data: true"),
                          _sample("file", 'input_data_file: "in.raw"', batch_size=2),
                          _sample("skipped", "zero_data: true", batch_size=0)],
           extra="instance_group [ { kind: KIND_CPU count: 2 } ]\ndynamic_batching { }\n",
           files={"in.raw": np.arange(1, 7, dtype=np.float32).tobytes()})  # longer than needed: the first 16 bytes
    strings = b"".join(struct.pack("<I", len(v)) + v for v in (b"abc", b"", b"x", b"yz"))  # serialised BYTES
    _model(dest, "strings", [_sample("zero", "zero_data: true", dt="STRING"),
                             _sample("random", "random_data: true", dt="STRING"),
                             _sample("file", 'input_data_file: "s"', dt="STRING")],
           dt="STRING", files={"s": strings})
    _model(dest, "fixed", [_sample("whole", "zero_data: true", dims="4")], mbs=0)
    _model(dest, "missing_file", [_sample("mf", 'input_data_file: "nope"')])
    _model(dest, "short_file", [_sample("sf", 'input_data_file: "s"')], files={"s": b"abc"})
    _model(dest, "wrong_dims", [_sample("wd", "zero_data: true", dims="5")])
    _model(dest, "variable_dims", [_sample("vd", "zero_data: true", dims="-1")])
    _model(dest, "too_big", [_sample("bb", "zero_data: true", batch_size=6)], mbs=4)
    _model(dest, "raiser", [_sample("zero sample", "zero_data: true")], raises=True)
    for name, values in (("repeat_warm", [1, 2, 3]), ("repeat_fail", [5, -1, 6])):  # decoupled: errors in responses
        shutil.copytree(ROOT / "tests" / "models" / "repeat", dest / name)
        with open(dest / name / "config.pbtxt", "a") as f:
            f.write("model_warmup [ " + _sample("seq", 'input_data_file: "v"', dt="INT32", dims="3") + " ]\n")
        (dest / name / "warmup").mkdir()
        (dest / name / "warmup" / "v").write_bytes(np.array(values, np.int32).tobytes())
    return dest


def _records(repo: Path, model: str) -> list[dict]:
    path = repo.parent / f"{model}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("warmup")
    repo = _repository(base / "models")
    for srv in serving(repo, base):
        yield srv, repo


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server[0].http_url)
    yield client
    client.close()


def _reasons(client) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["state"], m.get("reason", "")) for m in client.get_model_repository_index()}


def test_each_instance_runs_every_sample_before_ready(server, http):
    _, repo = server
    assert http.is_model_ready("warm")
    records = _records(repo, "warm")
    for instance in ("warm_0_0", "warm_0_1"):
        mine = [r for r in records if r["instance"] == instance]
        # zero: 3 requests of batch 1 in one execute, twice (count 2); random once; file once (count 0); batch 0 never
        assert [len(r["requests"]) for r in mine] == [3, 3, 1, 2]
        assert all(q["shape"] == [1, 4] and q["dtype"] == "float32" for r in mine for q in r["requests"])
        assert all(q["values"] == [0.0] * 4 for r in mine[:2] for q in r["requests"])
        assert mine[2]["requests"][0]["values"] != [0.0] * 4  # random bytes (16 zero bytes: 2**-128)
        assert [q["values"] for q in mine[3]["requests"]] == [[1.0, 2.0, 3.0, 4.0]] * 2


def test_bytes_and_unbatched_samples(server, http):
    _, repo = server
    assert http.is_model_ready("strings") and http.is_model_ready("fixed")
    strings = _records(repo, "strings")
    assert [[q["values"] for q in r["requests"]] for r in strings] == [[["", "", "", ""]], [["", "", "", ""]],
                                                                      [["abc", "", "x", "yz"]]]
    assert strings[0]["requests"][0]["shape"] == [1, 4]
    assert [r["requests"][0]["shape"] for r in _records(repo, "fixed")] == [[4]]  # max_batch_size 0: no batch dim


def test_warmup_counts_in_statistics(server, http):
    stats = http.get_inference_statistics("warm")["model_stats"][0]
    # per instance 3 * 2 + 1 + 2 requests in 4 executions, as Triton counts them
    assert (stats["inference_count"], stats["execution_count"]) == (18, 8)
    assert stats["inference_stats"]["success"]["count"] == 18
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == {1: 2, 2: 2, 3: 4}
    assert stats["last_inference"] > 0


def test_ready_model_serves_after_warmup(server, http):
    inp = httpclient.InferInput("IN", [1, 4], "FP32")
    inp.set_data_from_numpy(np.full((1, 4), 7, np.float32))
    assert http.infer("warm", [inp]).as_numpy("OUT").tolist() == [[7.0] * 4]


def test_failed_warmup_leaves_model_unavailable_with_tritons_reason(server, http):
    reasons = _reasons(http)
    repo = server[1]
    assert reasons["missing_file"] == (
        "UNAVAILABLE", f"Internal: failed to open text file for read {repo}/missing_file/warmup/nope: "
        "No such file or directory")
    assert reasons["short_file"] == (
        "UNAVAILABLE", "Invalid argument: [request id: <id_unknown>] warmup setting expects 16 bytes, but the data "
        "provided from sonly has 3 bytes")
    assert reasons["wrong_dims"] == (
        "UNAVAILABLE", "Invalid argument: [request id: <id_unknown>] unexpected shape for input 'IN' for model "
        "'wrong_dims'. Expected [-1,4], got [1,5]. NOTE: Setting a non-zero max_batch_size in the model config "
        "requires a batch dimension to be prepended to each input shape. If you want to specify the full shape "
        "including the batch dim in your input dims config, try setting max_batch_size to zero. See the model "
        "configuration docs for more info on max_batch_size.")
    assert reasons["variable_dims"] == (
        "UNAVAILABLE", "Invalid argument: warmup setting expects all variable-size dimensions are specified for "
        "input 'IN'")
    # (no instance_group: Triton's one group is named after the model, its instance <model>_0)
    assert reasons["too_big"] == (
        "UNAVAILABLE", "Invalid argument: failed to run warmup sample 'bb': "
        + "batch size 6 for 'too_big_0', max allowed is 4; " * 6)
    state, reason = reasons["raiser"]
    assert state == "UNAVAILABLE"
    assert reason.startswith("Invalid argument: failed to run warmup sample 'zero sample': Failed to process the "
                             "request(s) for model 'raiser_0', message: ValueError: execute exploded"), reason
    assert reason.endswith("; ")
    assert len(_records(repo, "raiser")) == 0  # (it raised before recording)
    assert reasons["repeat_warm"] == ("READY", "")
    assert reasons["repeat_fail"] == ("UNAVAILABLE", "Invalid argument: failed to run warmup sample 'seq': "
                                      "negative value at 1; ")
    for model in ("missing_file", "short_file", "wrong_dims", "variable_dims", "too_big", "raiser", "repeat_fail"):
        assert not http.is_model_ready(model)


def test_explicit_load_warms_up(tmp_path):
    repo = _repository(tmp_path / "models")
    for srv in serving(repo, tmp_path, "--model-control-mode", "explicit"):
        with grpcclient.InferenceServerClient(srv.grpc_url) as client:
            assert _records(repo, "warm") == []
            client.load_model("warm")
            assert client.is_model_ready("warm")
            assert len(_records(repo, "warm")) == 8
            with pytest.raises(InferenceServerException, match="failed to run warmup sample 'zero sample': Failed "
                               "to process the request"):
                client.load_model("raiser")
            assert not client.is_model_ready("raiser")
