"""Iterative sequences (``sequence_batching { iterative_sequence: true }``) and request rescheduling
(``request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)``), through tritonclient:
one request runs over several executions, its sequence (an ID the server assigns, its slot) held from
the first to the last, and new requests join the batches of those already iterating (continuous
batching). The models are Triton's QA models (qa/python_models/iterative_sequence, wrong_return_type)
and ones that log what each execute saw."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import python_model, serving

#: Triton's qa/python_models/iterative_sequence, with its state per correlation ID rather than per
#: instance, so that sequences may interleave: IN responses counting down from IN - 1 to 0.
COUNTDOWN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.remaining = {}

    def execute(self, requests):
        for request in requests:
            cid = request.correlation_id()
            if request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                self.remaining[cid] = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            self.remaining[cid] -= 1
            sender = request.get_response_sender()
            response = pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([self.remaining[cid]], np.int32))])
            if self.remaining[cid] <= 0:
                del self.remaining[cid]
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                sender.send(response)
        return None
'''

#: STEPS steps per request, one per execution; logs each execute's batch; answers the steps it counted.
STEPPER = '''
import json
import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.log = os.path.join(os.path.dirname(__file__), "..", "seen")
        self.done = {}

    def execute(self, requests):
        batch = []
        responses = []
        for request in requests:
            cid = request.correlation_id()
            steps = int(pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy().flatten()[0])
            if request.flags() & 1:
                self.done[cid] = 0
            self.done[cid] += 1
            batch.append({"cid": cid, "flags": request.flags(), "step": self.done[cid]})
            if self.done[cid] < steps:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("DONE", np.array([self.done.pop(cid)], np.int32).reshape(1, 1))]))
        with open(self.log, "a") as f:
            f.write(json.dumps(batch) + "\\n")
        time.sleep(0.02)  # a step takes a while: requests that arrive meanwhile join the next batch
        return responses
'''

#: Triton's qa/python_models/wrong_return_type: a response where None is due.
WRONG_RETURN = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
'''

#: Triton's qa/python_models/bls_request_rescheduling, in short: BLS calls to both iterative models.
BLS = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            steps = pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy()
            done = pb_utils.InferenceRequest(model_name="stepper", inputs=[pb_utils.Tensor("STEPS", steps)],
                                             requested_output_names=["DONE"]).exec()
            if done.has_error():
                raise pb_utils.TritonModelException(done.error().message())
            countdown = pb_utils.InferenceRequest(
                model_name="countdown", inputs=[pb_utils.Tensor("IN", steps.reshape(1))],
                requested_output_names=["OUT"]).exec(decoupled=True)
            values = [int(pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()[0]) for r in countdown
                      if r.output_tensors()]
            out = np.array([[pb_utils.get_output_tensor_by_name(done, "DONE").as_numpy()[0, 0]] + values], np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
        return responses
'''

IO4 = ('input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
       'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]\n')
#: (idle sequences time out only after a minute: a slot comes free when its request ends, or not at all)
ITERATIVE = "sequence_batching { iterative_sequence: true max_sequence_idle_microseconds: 60000000 }\n"
STEPS_IO = ('input [ { name: "STEPS", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
            'output [ { name: "DONE", data_type: TYPE_INT32, dims: [ 1 ] } ]\n')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("iter_repo")
    python_model(repo, "countdown", COUNTDOWN,
                 'max_batch_size: 0\nmodel_transaction_policy { decoupled: true }\n'
                 'input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
                 'output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
                 'sequence_batching { iterative_sequence: true oldest { max_candidate_sequences: 4 } }\n')
    python_model(repo, "stepper", STEPPER, "max_batch_size: 4\n" + STEPS_IO
                 + "sequence_batching { iterative_sequence: true oldest { max_candidate_sequences: 4 } }\n")
    python_model(repo, "stepper_one_slot", STEPPER, "max_batch_size: 1\n" + STEPS_IO + ITERATIVE)
    python_model(repo, "wrong_return_type", WRONG_RETURN, IO4 + ITERATIVE)
    python_model(repo, "bls_caller", BLS, 'max_batch_size: 1\ninput [ { name: "STEPS", data_type: TYPE_INT32, '
                 'dims: [ 1 ] } ]\noutput [ { name: "OUT", data_type: TYPE_INT32, dims: [ -1 ] } ]\n')
    python_model(repo, "not_iterative", WRONG_RETURN.replace("responses.append(pb_utils", "responses.append(None)\n"
                                                               "            (pb_utils"), IO4)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(repo, tmp_path_factory.mktemp("iter_log"))


def _seen(repo: Path, model: str) -> list[list[dict]]:
    path = repo / model / "seen"
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("")
    return [json.loads(line) for line in lines]


def test_a_decoupled_request_iterates_over_a_stream(server, repo):
    """Triton's L0_backend_python/request_rescheduling grpc_endpoint_test.test_grpc_decoupled, with two
    requests on one stream: each gets IN responses, counting down, from one request."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for value, rid in ((3, "a"), (4, "b")):
            inp = grpcclient.InferInput("IN", [1], "INT32")
            inp.set_data_from_numpy(np.array([value], np.int32))
            client.async_stream_infer("countdown", [inp], request_id=rid)
        got: dict[str, list[int]] = {"a": [], "b": []}
        for _ in range(7):
            result, error = results.get(timeout=20)
            assert error is None, error
            got[result.get_response().id].append(int(result.as_numpy("OUT")[0]))
    finally:
        client.stop_stream()
        client.close()
    assert got == {"a": [2, 1, 0], "b": [3, 2, 1, 0]}


def test_continuous_batching_mixes_new_and_rescheduled_requests(server, repo):
    """Requests of 1 to 5 steps at once: each is answered after exactly its steps; the server gives each
    a sequence of its own (IDs from 1, START on the first step only), and batches mix requests at
    different steps, new ones joining those under way."""
    _seen(repo, "stepper")
    client = httpclient.InferenceServerClient(server.http_url, concurrency=6)
    try:
        before = client.get_inference_statistics("stepper")["model_stats"][0]
        counts = [5, 1, 3, 2, 4, 1]
        futures = [client.async_infer("stepper", [_input(n)]) for n in counts]
        answers = [int(f.get_result(timeout=30).as_numpy("DONE")[0, 0]) for f in futures]
        after = client.get_inference_statistics("stepper")["model_stats"][0]
    finally:
        client.close()
    assert answers == counts
    # Triton 2.51 counts every step a successful inference (observed: requests of 3, 2 and 4 steps give 9)
    assert int(after["inference_count"]) - int(before["inference_count"]) == sum(counts)
    assert int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"]) \
        == sum(counts)
    batches = _seen(repo, "stepper")
    rows = [row for batch in batches for row in batch]
    by_cid: dict[int, list[dict]] = {}
    for row in rows:
        by_cid.setdefault(row["cid"], []).append(row)
    assert sorted(len(v) for v in by_cid.values()) == sorted(counts)
    assert all(cid > 0 for cid in by_cid)
    for steps in by_cid.values():
        assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
        assert [s["flags"] for s in steps] == [1] + [0] * (len(steps) - 1)
    assert max(len(b) for b in batches) > 1
    assert any({r["flags"] for r in b} == {0, 1} for b in batches), batches  # a new request beside older ones


def _input(steps: int) -> httpclient.InferInput:
    inp = httpclient.InferInput("STEPS", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[steps]], np.int32))
    return inp


def test_a_finished_request_frees_its_slot(server, repo):
    """One slot: the second request waits in the backlog until the first one's last step."""
    _seen(repo, "stepper_one_slot")
    client = httpclient.InferenceServerClient(server.http_url, concurrency=2)
    try:
        futures = [client.async_infer("stepper_one_slot", [_input(n)]) for n in (3, 2)]
        assert [int(f.get_result(timeout=30).as_numpy("DONE")[0, 0]) for f in futures] == [3, 2]
    finally:
        client.close()
    order = [row["cid"] for batch in _seen(repo, "stepper_one_slot") for row in batch]
    assert len(order) == 5 and len(set(order[:3])) == 1 and len(set(order[3:])) == 1 and order[0] != order[3]


def test_bls_requests_iterate_too(server):
    """A python model's BLS requests to both iterative models (Triton's bls_request_rescheduling)."""
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        out = client.infer("bls_caller", [_input(3)]).as_numpy("OUT")
    finally:
        client.close()
    assert out.tolist() == [[3, 2, 1, 0]]


def test_a_response_for_a_rescheduled_request_is_an_error(server):
    """Triton's words (with its typo) when execute returns a response for a rescheduled request."""
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(np.ones(4, np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("wrong_return_type", [inp])
    assert "Expected a None object in the execute function return list for reschduled request" in str(e.value)
    assert e.value.status() == "500"


def test_rescheduling_needs_an_iterative_sequence(server):
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(np.ones(4, np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("not_iterative", [inp])
    assert "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is not configured " \
           "to handle such a flag." in str(e.value)


def test_a_caller_giving_up_ends_its_sequence(server, repo):
    """A request of a million steps ends when its caller gives up (a gRPC deadline): counted a failure,
    nothing executes for it any more, and its slot is free again for the next request (one slot: that
    one would wait for a minute otherwise)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url, network_timeout=20)
    model = "stepper_one_slot"
    try:
        failed = int(http.get_inference_statistics(model)["model_stats"][0]["inference_stats"]["fail"]["count"])
        inp = grpcclient.InferInput("STEPS", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[1_000_000]], np.int32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, [inp], client_timeout=0.3)
        assert "Deadline Exceeded" in str(e.value)
        time.sleep(0.2)
        before = http.get_inference_statistics(model)["model_stats"][0]
        time.sleep(0.3)
        after = http.get_inference_statistics(model)["model_stats"][0]
        assert int(after["inference_stats"]["fail"]["count"]) == failed + 1
        assert int(after["execution_count"]) == int(before["execution_count"])
        assert int(http.infer(model, [_input(2)]).as_numpy("DONE")[0, 0]) == 2
    finally:
        client.close()
        http.close()
    _seen(repo, model)
