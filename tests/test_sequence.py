"""Triton's sequence batcher (``sequence_batching``, Direct and Oldest), through tritonclient over HTTP and
gRPC: a stateful python model keeps a running sum per correlation ID and logs what each execute received
(the request's correlation_id() and flags(), the control tensors, which instance ran it), so the tests can
check routing, order, controls and null requests against what the model saw."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import python_model, serving

STATEFUL = '''
import json
import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


def _value(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    v = t.as_numpy()
    return [x.decode() if isinstance(x, bytes) else x.item() for x in v.flatten()], list(v.shape)


class TritonPythonModel:
    def initialize(self, args):
        self.instance = args["model_instance_name"]
        self.log = os.path.join(os.path.dirname(__file__), "..", "seen")
        self.sums = {}

    def execute(self, requests):
        responses = []
        for row, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            cid = request.correlation_id()
            seen = {"batch": len(requests), "row": row, "cid": cid, "flags": request.flags(),
                    "instance": self.instance, "input": int(x.flatten()[0]),
                    "names": [t.name() for t in request.inputs()]}
            for name in ("START", "END", "READY", "CORRID"):
                seen[name] = _value(request, name)
            with open(self.log, "a") as f:
                f.write(json.dumps(seen) + "\\n")
            if x.flatten()[0] < 0:  # a slow request: lets the next ones queue
                time.sleep(-x.flatten()[0] / 1000)
            total = self.sums.get(cid, 0) if request.flags() & 1 == 0 else 0
            total += int(x.flatten()[0])
            self.sums[cid] = total
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", np.full(x.shape, total, np.int32))]))
        return responses
'''

CONTROLS = '''
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
'''


def _io(batched: bool) -> str:
    return ('input [ { name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
            'output [ { name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n')


def _config(max_batch: int, strategy: str, corrid: str = "TYPE_UINT64", idle_us: int = 0, count: int = 1) -> str:
    idle = f"  max_sequence_idle_microseconds: {idle_us}\n" if idle_us else ""
    return (f"max_batch_size: {max_batch}\n" + _io(max_batch > 0)
            + "sequence_batching {\n" + idle + CONTROLS % corrid + f"  {strategy}\n}}\n"
            + f"instance_group [ {{ count: {count}, kind: KIND_CPU }} ]\n")


ACCUMULATOR = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Keeps no state of its own: the server feeds it back through INPUT_STATE."""

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            state = pb_utils.get_input_tensor_by_name(request, "INPUT_STATE").as_numpy()
            new = (state + x).astype(np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", new),
                                                         pb_utils.Tensor("OUTPUT_STATE", new)]))
        return responses
'''

STATE = '''
  state [ { input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_INT32 dims: [ 1 ]
            initial_state { data_type: TYPE_INT32 dims: [ 1 ] %s name: "init" } } ]
'''

FORWARD = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Forwards each request to seq_state through BLS, as a request of the caller's sequence."""

    def execute(self, requests):
        responses = []
        for request in requests:
            called = pb_utils.InferenceRequest(
                model_name="seq_state", requested_output_names=["OUTPUT"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT")],
                correlation_id=request.correlation_id(), flags=request.flags()).exec()
            if called.has_error():
                responses.append(pb_utils.InferenceResponse(error=called.error()))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(called, "OUTPUT")]))
        return responses
'''

ENSEMBLE = ('platform: "ensemble"\nmax_batch_size: 2\n' + _io(True) + '''
ensemble_scheduling { step [ { model_name: "seq_state" model_version: -1
    input_map { key: "INPUT" value: "INPUT" } output_map { key: "OUTPUT" value: "OUTPUT" } } ] }
''')

MODELS = {
    "seq_direct": _config(2, "direct { }"),
    "seq_oldest": _config(4, "oldest { max_candidate_sequences: 4 }", count=2),
    "seq_one_slot": _config(1, "direct { }"),
    "seq_unbatched": _config(0, "direct { }", corrid="TYPE_STRING"),
    "seq_idle": _config(2, "direct { }", idle_us=300_000),
}


def _with_controls(controls: str) -> str:
    return _config(2, "direct { }").replace(CONTROLS % "TYPE_UINT64", f"control_input [ {controls} ]")


def _start(values: str, name: str = "START") -> str:
    return f'{{ name: "{name}" control [ {{ kind: CONTROL_SEQUENCE_START {values} }} ] }}'


_TWO_DIMS = (STATE % "zero_data: true").replace("initial_state { data_type: TYPE_INT32 dims: [ 1 ]",
                                                "initial_state { data_type: TYPE_INT32 dims: [ 2 ]")
#: Configurations Triton refuses, and its words (docs/triton-behaviour.md, section 19)
BAD = {
    "bad_no_values": _with_controls(_start("")),
    "bad_two_lists": _with_controls(_start("int32_false_true: [0, 1] fp32_false_true: [0, 1]")),
    "bad_one_value": _with_controls(_start("int32_false_true: [1]")),
    "bad_two_starts": _with_controls(_start("int32_false_true: [0, 1]") + ", "
                                     + _start("int32_false_true: [0, 1]", name="S2")),
    "bad_corrid_type": _config(2, "direct { }", corrid="TYPE_FP32"),
    "bad_utilization": _config(2, "direct { minimum_slot_utilization: 1.5 }"),
    "bad_preferred": _config(2, "oldest { max_candidate_sequences: 2 preferred_batch_size: [ 4 ] }"),
    "bad_initial_dims": _config(2, "direct { }").replace("sequence_batching {\n", "sequence_batching {\n" + _TWO_DIMS),
}
BAD_REASONS = {
    "bad_no_values": "sequence batching must specify either 'int32_false_true', 'fp32_false_true' or "
                     "'bool_false_true' for CONTROL_SEQUENCE_START for bad_no_values",
    "bad_two_lists": "sequence batching specifies more than one from 'int32_false_true', 'fp32_false_true' and "
                     "'bool_false_true' for CONTROL_SEQUENCE_START for bad_two_lists",
    "bad_one_value": "sequence batching control 'int32_false_true' must have exactly 2 entries for "
                     "CONTROL_SEQUENCE_START for bad_one_value",
    "bad_two_starts": "sequence batching specifies multiple CONTROL_SEQUENCE_START tensors for bad_two_starts",
    "bad_corrid_type": "unexpected data type for control CONTROL_SEQUENCE_CORRID for bad_corrid_type. Allowed data "
                       "types are TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 and TYPE_STRING",
    "bad_utilization": "sequence batching minimum slot utilization must be in range (0.0, 1.0] for bad_utilization",
    "bad_preferred": "sequence batching preferred batch size must be <= max batch size for bad_preferred",
    "bad_initial_dims": "'initial_state' dim for input name 'INPUT_STATE' doesn't match 'state' dim description. "
                        "2 != 1",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("seq_repo")
    for name, config in MODELS.items():
        python_model(repo, name, STATEFUL, config)
    for name, initial in (("seq_state", "zero_data: true"), ("seq_state_file", 'data_file: "seven"')):
        config = _config(2, "direct { }").replace("sequence_batching {\n", "sequence_batching {\n" + STATE % initial)
        python_model(repo, name, ACCUMULATOR, config)
    (repo / "seq_state_file" / "initial_state").mkdir()
    (repo / "seq_state_file" / "initial_state" / "seven").write_bytes(np.array([7], np.int32).tobytes())
    python_model(repo, "seq_bls", FORWARD, "max_batch_size: 2\n" + _io(True))
    (repo / "seq_ensemble" / "1").mkdir(parents=True)
    (repo / "seq_ensemble" / "config.pbtxt").write_text(ENSEMBLE)
    for name, config in BAD.items():
        python_model(repo, name, STATEFUL, config)
    python_model(repo, "plain", STATEFUL, _io(True).replace("dims: [ 1 ]", "dims: [ 1 ]") + "max_batch_size: 2\n")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(repo, tmp_path_factory.mktemp("seq_log"))


def _seen(repo: Path, model: str) -> list[dict]:
    path = repo / model / "seen"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("")
    return [json.loads(line) for line in lines]


def _http_infer(client, model: str, value: int, batched: bool = True, **sequence):
    x = np.array([[value]] if batched else [value], dtype=np.int32)
    inp = httpclient.InferInput("INPUT", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    return int(client.infer(model, [inp], **sequence).as_numpy("OUTPUT").flatten()[0])


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


def test_direct_sequences_keep_their_state_and_see_their_controls(http, repo):
    _seen(repo, "seq_direct")
    assert _http_infer(http, "seq_direct", 1, sequence_id=11, sequence_start=True) == 1
    assert _http_infer(http, "seq_direct", 100, sequence_id=22, sequence_start=True) == 100
    assert _http_infer(http, "seq_direct", 2, sequence_id=11) == 3
    assert _http_infer(http, "seq_direct", 200, sequence_id=22) == 300
    assert _http_infer(http, "seq_direct", 3, sequence_id=11, sequence_end=True) == 6
    assert _http_infer(http, "seq_direct", 300, sequence_id=22, sequence_end=True) == 600
    seen = [s for s in _seen(repo, "seq_direct") if s["READY"][0] == [True]]
    assert [(s["cid"], s["flags"], s["input"]) for s in seen] == [
        (11, 1, 1), (22, 1, 100), (11, 0, 2), (22, 0, 200), (11, 2, 3), (22, 2, 300)]
    first = seen[0]
    assert first["START"] == [[1], [1, 1]] and first["END"] == [[0.0], [1, 1]]
    assert first["CORRID"] == [[11], [1, 1]]
    assert seen[4]["START"] == [[0], [1, 1]] and seen[4]["END"] == [[1.0], [1, 1]]
    # Sequence 22 took slot 1: its requests are row 1 of their batches (row 0: a null request while 11 is idle)
    assert {s["row"] for s in seen if s["cid"] == 22} == {1}


def test_errors_are_tritons(http):
    with pytest.raises(InferenceServerException) as e:
        _http_infer(http, "seq_direct", 1)
    assert e.value.status() == "400"
    assert "inference request to model 'seq_direct' must specify a non-zero or non-empty correlation ID" \
        in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        _http_infer(http, "seq_direct", 1, sequence_id=77)
    assert e.value.status() == "400"
    assert ("inference request for sequence 77 to model 'seq_direct' must specify the START flag on the first "
            "request of the sequence") in e.value.message()
    _http_infer(http, "seq_direct", 1, sequence_id=78, sequence_start=True, sequence_end=True)
    with pytest.raises(InferenceServerException) as e:  # ended: a new request needs START again
        _http_infer(http, "seq_direct", 1, sequence_id=78)
    assert "must specify the START flag" in e.value.message()


def test_a_sequence_waits_for_a_slot(server, repo):
    """One slot: a second sequence's START waits in the backlog until the first ends."""
    _seen(repo, "seq_one_slot")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    def send(value: int, cid: int, **flags) -> None:
        x = np.array([[value]], dtype=np.int32)
        inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer("seq_one_slot", [inp], request_id=f"{cid}:{value}", sequence_id=cid, **flags)

    try:
        send(1, 1, sequence_start=True)
        send(10, 2, sequence_start=True)
        send(2, 1)
        send(-100, 1)  # slow: sequence 2 has waited all along
        send(3, 1, sequence_end=True)
        send(20, 2, sequence_end=True)
        got = {}
        for _ in range(6):
            result, error = results.get(timeout=30)
            assert error is None, error
            got[result.get_response().id] = int(result.as_numpy("OUTPUT").flatten()[0])
    finally:
        client.stop_stream()
        client.close()
    assert got == {"1:1": 1, "2:10": 10, "1:2": 3, "1:-100": -97, "1:3": -94, "2:20": 30}
    order = [(s["cid"], s["input"]) for s in _seen(repo, "seq_one_slot")]
    assert order == [(1, 1), (1, 2), (1, -100), (1, 3), (2, 10), (2, 20)]


def test_oldest_keeps_each_sequence_on_one_instance(server, repo):
    _seen(repo, "seq_oldest")
    errors: list = []

    def run(cid: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            total = 0
            for step in range(6):
                flags = {"sequence_start": step == 0, "sequence_end": step == 5}
                total += cid + step
                got = _http_infer(client, "seq_oldest", cid + step, sequence_id=cid, **flags)
                if got != total:
                    errors.append((cid, step, got, total))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(cid,)) for cid in (1000, 2000, 3000, 4000, 5000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seen = _seen(repo, "seq_oldest")
    by_cid: dict[int, set] = {}
    for s in seen:
        by_cid.setdefault(s["cid"], set()).add(s["instance"])
        assert s["READY"][0] == [True]  # Oldest sends no null requests
    assert sorted(by_cid) == [1000, 2000, 3000, 4000, 5000]
    assert all(len(instances) == 1 for instances in by_cid.values()), by_cid
    assert len(set().union(*by_cid.values())) == 2  # spread over both instances


def test_string_correlation_ids_over_grpc(server, repo):
    _seen(repo, "seq_unbatched")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        def infer(value: int, **sequence) -> int:
            inp = grpcclient.InferInput("INPUT", [1], "INT32")
            inp.set_data_from_numpy(np.array([value], dtype=np.int32))
            return int(client.infer("seq_unbatched", [inp], **sequence).as_numpy("OUTPUT")[0])

        assert infer(5, sequence_id="cam-a", sequence_start=True) == 5
        assert infer(6, sequence_id="cam-a", sequence_end=True) == 11
        with pytest.raises(InferenceServerException) as e:  # its CORRID control is a string
            infer(1, sequence_id=9, sequence_start=True)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
    seen = _seen(repo, "seq_unbatched")
    assert [(s["cid"], s["flags"], s["CORRID"]) for s in seen] == [
        ("cam-a", 1, [["cam-a"], [1]]), ("cam-a", 2, [["cam-a"], [1]])]


def test_an_idle_sequence_times_out(http):
    assert _http_infer(http, "seq_idle", 4, sequence_id=5, sequence_start=True) == 4
    assert _http_infer(http, "seq_idle", 4, sequence_id=5) == 8
    time.sleep(0.6)
    with pytest.raises(InferenceServerException) as e:
        _http_infer(http, "seq_idle", 4, sequence_id=5)
    assert "must specify the START flag" in e.value.message()
    assert _http_infer(http, "seq_idle", 4, sequence_id=5, sequence_start=True) == 4


def test_a_non_sequence_model_sees_the_correlation_id(http, repo):
    _seen(repo, "plain")
    assert _http_infer(http, "plain", 3, sequence_id=42, sequence_start=True) == 3
    seen = _seen(repo, "plain")
    assert [(s["cid"], s["flags"], s["READY"]) for s in seen] == [(42, 1, None)]


@pytest.mark.parametrize("model, initial", [("seq_state", 0), ("seq_state_file", 7)])
def test_implicit_state_is_fed_back(http, model, initial):
    """The model keeps nothing itself: each request of a sequence gets the state the one before returned,
    the first its initial state; sequences do not mix, and the state output is not the client's."""
    assert _http_infer(http, model, 1, sequence_id=1, sequence_start=True) == initial + 1
    assert _http_infer(http, model, 10, sequence_id=2, sequence_start=True) == initial + 10
    assert _http_infer(http, model, 2, sequence_id=1) == initial + 3
    assert _http_infer(http, model, 20, sequence_id=2, sequence_end=True) == initial + 30
    x = httpclient.InferInput("INPUT", [1, 1], "INT32")
    x.set_data_from_numpy(np.array([[3]], dtype=np.int32))
    result = http.infer(model, [x], sequence_id=1, sequence_end=True)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT"]
    assert int(result.as_numpy("OUTPUT")[0, 0]) == initial + 6
    assert _http_infer(http, model, 5, sequence_id=1, sequence_start=True) == initial + 5  # START: initial again
    assert _http_infer(http, model, 1, sequence_id=1) == initial + 6
    assert _http_infer(http, model, 2, sequence_id=1, sequence_start=True) == initial + 2  # restarted without END
    _http_infer(http, model, 0, sequence_id=1, sequence_end=True)


def test_in_process_api_takes_tritonclients_sequence_arguments(repo):
    from kernel.api import Server, ServerError

    with Server(model_repository=repo) as srv:
        model = srv.model("seq_state")
        one = {"INPUT": np.array([[4]], dtype=np.int32)}
        assert model.infer(one, sequence_id=3, sequence_start=True).as_numpy("OUTPUT")[0, 0] == 4
        assert model.infer(one, sequence_id=3).as_numpy("OUTPUT")[0, 0] == 8

        async def last() -> int:
            result = await model.async_infer(one, sequence_id=3, sequence_end=True)
            return int(result.as_numpy("OUTPUT")[0, 0])

        assert asyncio.run(last()) == 12
        with pytest.raises(ServerError, match="must specify the START flag"):
            model.infer(one, sequence_id=99)


def test_configurations_triton_refuses_are_unavailable_with_its_reason(http):
    index = {m["name"]: m for m in http.get_model_repository_index()}
    for name, reason in BAD_REASONS.items():
        assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert index[name]["reason"] == f"Invalid argument: {reason}"


def test_defaults_in_the_configuration(http):
    sequence = http.get_model_config("seq_oldest")["sequence_batching"]
    assert sequence["max_sequence_idle_microseconds"] == 1_000_000
    assert sequence["oldest"]["preferred_batch_size"] == [4]


def test_a_correlation_id_of_the_wrong_type_is_refused(http):
    with pytest.raises(InferenceServerException) as e:
        _http_infer(http, "seq_direct", 1, sequence_id="abc", sequence_start=True)
    assert e.value.status() == "400"
    assert "sequence batching control 'CORRID' data-type is 'BYTES', but model 'seq_direct' expects 'UINT64'" \
        in e.value.message()


@pytest.mark.parametrize("sequence, message", [
    ({"sequence_id": -1}, "Unable to parse 'sequence_id': attempt to access JSON non-string as string"),
    ({"sequence_id": 1.5}, "Unable to parse 'sequence_id': attempt to access JSON non-string as string"),
    ({"sequence_id": 1 << 64}, "Unable to parse 'sequence_id': attempt to access JSON non-string as string"),
])
def test_json_sequence_ids_of_the_wrong_type_are_400(http, sequence, message):
    with pytest.raises(InferenceServerException) as e:
        _http_infer(http, "plain", 1, **sequence)
    assert e.value.status() == "400" and message in e.value.message()


def test_controls_come_first_and_statistics_count_null_requests_as_rows(server, http, repo):
    """Triton's order of request.inputs() (READY, CORRID, END, START, then the client's) and its statistics: a
    null request pads the batch (batch_stats) but is no inference (inference_count)."""
    _seen(repo, "seq_direct")
    before = http.get_inference_statistics("seq_direct")["model_stats"][0]
    _http_infer(http, "seq_direct", 1, sequence_id=31, sequence_start=True)
    _http_infer(http, "seq_direct", 1, sequence_id=32, sequence_start=True)
    _http_infer(http, "seq_direct", 1, sequence_id=32, sequence_end=True)  # slot 1: [null, 32]
    _http_infer(http, "seq_direct", 1, sequence_id=31, sequence_end=True)
    after = http.get_inference_statistics("seq_direct")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] == 4

    def rows(stats: dict, size: int) -> int:
        return next((b["compute_infer"]["count"] for b in stats["batch_stats"] if b["batch_size"] == size), 0)

    assert rows(after, 1) - rows(before, 1) == 2 and rows(after, 2) - rows(before, 2) == 2
    seen = _seen(repo, "seq_direct")
    assert {tuple(s["names"]) for s in seen} == {("READY", "CORRID", "END", "START", "INPUT")}
    nulls = [s for s in seen if s["READY"][0] == [False]]
    assert [(n["cid"], n["flags"], n["input"], n["START"][0], n["CORRID"][0]) for n in nulls] == \
        [(0, 0, 0, [0], [0])] * 2


@pytest.mark.parametrize("caller", ["seq_ensemble", "seq_bls"])
def test_ensembles_and_bls_reach_a_sequence_model_as_the_callers_sequence(http, caller):
    """An ensemble's step carries the request's sequence; a BLS request carries the correlation_id and flags the
    model gives it (pb_utils.InferenceRequest(correlation_id=..., flags=...))."""
    cid = 700 if caller == "seq_ensemble" else 800
    assert _http_infer(http, caller, 2, sequence_id=cid, sequence_start=True) == 2
    assert _http_infer(http, caller, 3, sequence_id=cid + 1, sequence_start=True) == 3
    assert _http_infer(http, caller, 4, sequence_id=cid) == 6
    assert _http_infer(http, caller, 5, sequence_id=cid, sequence_end=True) == 11
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        _http_infer(http, caller, 1, sequence_id=cid)
    _http_infer(http, caller, 0, sequence_id=cid + 1, sequence_end=True)
