"""Chained pipeline steps (kernel.pipelines.ensemble._Run._chain, shm.link): a step whose only follower reads its
fixed-shape outputs alone is sent with that follower, whose worker starts when the step's worker posts
their link. Every answer must be the one the unchained path gives (``ensemble,chain=0``), errors
included, and nothing may stay held: link slots and arena blocks all come back."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np
import pytest

from kernel.api import Server
from kernel.errors import ServerError
from tests.pipeline_models import _ensemble, _io, _python, arith

#: what the first step does, by the value of its first element
_PRE = '''import os
            import time
            if x.flat[0] == -1:
                raise ValueError("pre failed on purpose")
            if x.flat[0] == -3:
                os._exit(3)
            if x.flat[0] == -4:
                time.sleep(1.0)
            if x.flat[0] == 7:
                time.sleep(0.001)
            y = (x * 2).astype(np.float32)
            if x.flat[0] == -2:
                y = y.reshape(2, 2)  # not the shape its configuration promises
            if x.flat[0] == -5:
                y = y.astype(np.int32)  # nor the datatype (the same byte size)'''


def _line(dest: Path, name: str, models: list[str], dims: str = "4", mbs: int = 0) -> None:
    """An ensemble running ``models`` one after the other, INPUT -> OUTPUT."""
    steps = []
    for i, model in enumerate(models):
        steps.append((model, {"IN": "INPUT" if i == 0 else f"t{i}"},
                      {"OUT": "OUTPUT" if i == len(models) - 1 else f"t{i + 1}"}))
    _ensemble(dest, name, _io([("INPUT", "FP32", dims)], [("OUTPUT", "FP32", dims)], mbs), steps)


_PAIR = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            second = (x + 1).astype(np.complex64 if x.flat[0] == -6 else np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", (x * 2).astype(np.float32)),
                                                         pb_utils.Tensor("OUT2", second)]))
        return responses
"""

_JOIN = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "A").as_numpy()
                                                             + pb_utils.get_input_tensor_by_name(r, "B").as_numpy())])
                for r in requests]
"""

#: a step that, given 9, asks the model after it in its own ensemble (through BLS) first
_CALLS_NEXT = """if x.flat[0] == 9:
                answer = pb_utils.InferenceRequest(model_name="c_mid", inputs=[pb_utils.Tensor("IN", x)],
                                                   requested_output_names=["OUT"]).exec()
                assert not answer.has_error(), answer.error().message()
            y = (x * 2).astype(np.float32)"""


def build(dest: Path) -> Path:
    arith(dest, "c_pre", _PRE, dims="4")
    arith(dest, "c_mid", "y = (x + 1).astype(np.float32)", dims="4")
    arith(dest, "c_post", "y = (x * 10).astype(np.float32)", dims="4")
    arith(dest, "c_two", "y = (x + 1).astype(np.float32)", dims="4",
          extra="instance_group [ { count: 2, kind: KIND_CPU } ]\n")
    arith(dest, "c_free", "y = (x + 1).astype(np.float32)")
    arith(dest, "b_pre", "y = (x * 2).astype(np.float32)", mbs=8, dims="4")
    arith(dest, "b_post", "y = (x + 1).astype(np.float32)", mbs=8, dims="4")
    _line(dest, "chain3", ["c_pre", "c_mid", "c_post"])
    _line(dest, "twice", ["c_mid", "c_mid"])
    _line(dest, "twice_two", ["c_two", "c_two"])
    _line(dest, "unfixed", ["c_free", "c_post"])
    _line(dest, "batched", ["b_pre", "b_post"], mbs=8)
    _python(dest, "c_pair", _io([("IN", "FP32", "4")], [("OUT", "FP32", "4"), ("OUT2", "FP32", "4")]), _PAIR)
    _python(dest, "c_join", _io([("A", "FP32", "4"), ("B", "FP32", "4")], [("OUT", "FP32", "4")]), _JOIN)
    _ensemble(dest, "pair", _io([("INPUT", "FP32", "4")], [("OUTPUT", "FP32", "4")]),
              [("c_pair", {"IN": "INPUT"}, {"OUT": "a", "OUT2": "b"}),
               ("c_join", {"A": "a", "B": "b"}, {"OUT": "OUTPUT"})])
    arith(dest, "c_calls", _CALLS_NEXT, dims="4")
    _line(dest, "calls_next", ["c_calls", "c_mid"])
    return dest


def _serve(repo: Path, chain: str) -> Server:
    return Server(model_repository=str(repo), backend_config={"ensemble": {"chain": chain}})


#: Steps answering within this are chained in these tests (the server's bound, 3 ms, is a moving average
#: that a loaded 2-core CI machine pushes past with one slow answer: chaining would then pause for a few
#: requests and the counts below would not hold). Still far below a wait of 1 s, which must stop chaining.
_BOUND_NS = 50_000_000


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from kernel.pipelines import ensemble

    repo = build(tmp_path_factory.mktemp("chained") / "models")
    bound, ensemble.PREWAKE_MAX_NS = ensemble.PREWAKE_MAX_NS, _BOUND_NS  # read by _Run._chain at each request
    try:
        with _serve(repo, "1") as chained, _serve(repo, "0") as plain:
            yield chained, plain
    finally:
        ensemble.PREWAKE_MAX_NS = bound


def _infer(server: Server, model: str, x: np.ndarray) -> np.ndarray:
    with server.model(model).infer({"INPUT": x}) as result:
        return np.array(result["OUTPUT"])


def _error(server: Server, model: str, x: np.ndarray) -> ServerError:
    with pytest.raises(ServerError) as failure:
        server.model(model).infer({"INPUT": x})
    return failure.value


def _settled(server: Server) -> None:
    """Every link slot and arena block back (releases reach the loop a moment after the caller's)."""
    core = server.core
    for _ in range(200):
        if len(core.free_links) == core.links.slots and core.arena.in_use() == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"held: {core.links.slots - len(core.free_links)} links, {core.arena.in_use()} bytes")


def _success(server: Server, model: str) -> tuple[int, int]:
    stats = server.model(model).statistics()["model_stats"][0]["inference_stats"]
    return stats["success"]["count"], stats["fail"]["count"]


def test_steps_run_chained_with_the_same_answers(servers):
    chained, plain = servers
    x = np.arange(4, dtype=np.float32)
    expected = (x * 2 + 1) * 10
    np.testing.assert_array_equal(_infer(plain, "chain3", x), expected)
    core = chained.core
    before, skips, mid = core.chained_steps, core.chain_skips, _success(chained, "c_mid")
    for i in range(20):
        np.testing.assert_array_equal(_infer(chained, "chain3", x + i), ((x + i) * 2 + 1) * 10)
    assert core.chained_steps - before == 40  # both hops of every request
    assert core.chain_skips == skips  # and each ran on its link, none the usual way after all
    assert plain.core.chained_steps == 0
    assert _success(chained, "c_mid") == (mid[0] + 20, mid[1])
    _settled(chained)


def _stats(server: Server, model: str) -> dict:
    return server.model(model).statistics()["model_stats"][0]["inference_stats"]


def test_a_chained_step_counts_its_time_from_the_end_of_its_wait(servers):
    """As unchained: its queue time is not the time the steps before it took."""
    chained, _ = servers
    before = {m: _stats(chained, m) for m in ("c_pre", "c_mid", "c_post")}
    steps = chained.core.chained_steps
    for _ in range(10):
        _infer(chained, "chain3", np.array([7, 0, 0, 0], dtype=np.float32))  # the first step takes 1 ms
    assert chained.core.chained_steps - steps == 20
    spent = {m: {k: (_stats(chained, m)[k]["ns"] - before[m][k]["ns"]) / 10_000 for k in ("queue", "compute_infer")}
             for m in before}  # µs per request
    assert spent["c_pre"]["compute_infer"] >= 1000
    assert spent["c_mid"]["queue"] < 500 and spent["c_post"]["queue"] < 500, spent


def test_a_failing_step_fails_the_request_as_unchained_and_its_follower_does_not_count(servers):
    chained, plain = servers
    x = np.array([-1, 0, 0, 0], dtype=np.float32)
    expected = _error(plain, "chain3", x)
    mid, skips = _success(chained, "c_mid"), chained.core.chain_skips
    got = _error(chained, "chain3", x)
    assert (got.message, got.code) == (expected.message, expected.code)
    assert "ValueError: pre failed on purpose" in got.message
    assert chained.core.chain_skips == skips + 2  # both chained steps gave up without running
    assert _success(chained, "c_mid") == mid  # the chained follower was skipped, not failed
    _settled(chained)
    np.testing.assert_array_equal(_infer(chained, "chain3", np.ones(4, np.float32)), np.full(4, 30, np.float32))


@pytest.mark.parametrize("case, error", [(-2, "unexpected shape for input 'IN' for model 'c_mid'"),
                                         (-5, "data-type is 'INT32', but model 'c_mid' expects 'FP32'")])
def test_an_output_unlike_its_configuration_takes_the_usual_path(servers, case, error):
    """The follower was promised an FP32 [4] tensor; the step returns [2, 2], or INT32: the chained
    follower is skipped and the request goes on as it would unchained (here: the follower's error)."""
    chained, plain = servers
    x = np.array([case, 1, 2, 3], dtype=np.float32)
    expected = _error(plain, "chain3", x)
    assert error in expected.message
    got = _error(chained, "chain3", x)
    assert (got.message, got.code) == (expected.message, expected.code)
    _settled(chained)


def test_a_skipped_step_leaves_no_trace_of_its_own(servers, tmp_path):
    """Traced requests (level TIMESTAMPS, which chains): a chained step that was skipped has no child trace of its
    own; the steps that ran have one each."""
    repo = build(tmp_path / "models")
    path = tmp_path / "trace.json"
    with Server(model_repository=str(repo), backend_config={"ensemble": {"chain": "1"}},
                trace_config={"level": ["TIMESTAMPS"], "rate": "1", "file": str(path)}) as server:
        skips = server.core.chain_skips
        _error(server, "chain3", np.array([-1, 1, 2, 3], dtype=np.float32))
        assert server.core.chain_skips == skips + 2  # both followers were chained, and skipped
        np.testing.assert_array_equal(_infer(server, "chain3", np.ones(4, np.float32)), np.full(4, 30, np.float32))
        # The first step's output is unlike its configuration: its chained follower is skipped, then submitted the
        # usual way, where it is refused before it is queued (unexpected shape): no record, as any refused request.
        _error(server, "chain3", np.array([-2, 1, 2, 3], dtype=np.float32))
    records = json.loads(path.read_text())
    headers = [r for r in records if "model_name" in r]
    roots = sorted(r["id"] for r in headers if r["model_name"] == "chain3")
    children = {root: sorted(r["model_name"] for r in headers if r.get("parent_id") == root) for root in roots}
    assert children == {roots[0]: ["c_pre"], roots[1]: ["c_mid", "c_post", "c_pre"], roots[2]: ["c_pre"]}, children


def test_a_dying_step_releases_its_chained_follower(servers):
    chained, _ = servers
    got = _error(chained, "chain3", np.array([-3, 0, 0, 0], dtype=np.float32))
    assert "c_pre_0" in got.message and "Stub process" in got.message
    _settled(chained)
    for _ in range(100):  # the worker is restarted
        if chained.model("c_pre").ready():
            break
        time.sleep(0.1)
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "chain3", np.ones(4, np.float32)), np.full(4, 30, np.float32))
    assert chained.core.chained_steps - before == 2


def test_a_cancelled_request_releases_its_chained_steps(servers):
    chained, _ = servers
    model = chained.model("chain3")
    request = model._request({"INPUT": np.array([-4, 0, 0, 0], dtype=np.float32)}, None, None, "", 0, 0)
    future = chained._call(lambda core: core.submit(request))
    time.sleep(0.2)  # the first step sleeps for a second, its followers wait on their links
    assert chained._call(lambda core: future.cancel())
    _settled(chained)  # once the first step's worker has answered
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "chain3", np.ones(4, np.float32)), np.full(4, 30, np.float32))
    # c_pre's answer time now holds its 1 s call (too slow to chain from for a while); c_mid's skipped wait
    # did not count in c_mid's, so it still chains c_post
    assert chained.core.chained_steps == before + 1


def test_a_model_after_itself_chains_only_with_a_second_instance(servers):
    chained, _ = servers
    x = np.arange(4, dtype=np.float32)
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "twice", x), x + 2)  # one instance: never waits on itself
    assert chained.core.chained_steps == before
    np.testing.assert_array_equal(_infer(chained, "twice_two", x), x + 2)
    assert chained.core.chained_steps == before + 1
    _settled(chained)


def test_only_fixed_shapes_chain_and_batched_models_chain_per_request_batch(servers):
    chained, _ = servers
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "unfixed", np.ones(4, np.float32)), np.full(4, 20, np.float32))
    assert chained.core.chained_steps == before  # its first step's output has no fixed shape
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_infer(chained, "batched", x), x * 2 + 1)
    assert chained.core.chained_steps == before + 1
    _settled(chained)


def test_concurrent_requests_all_get_their_own_answers(servers):
    chained, _ = servers

    def one(i: int) -> None:
        for k in range(10):
            x = np.full(4, i * 100 + k, dtype=np.float32)
            np.testing.assert_array_equal(_infer(chained, "chain3", x), (x * 2 + 1) * 10)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    _settled(chained)


def test_a_step_with_two_outputs_and_one_it_cannot_return(servers):
    """The first output is placed in the follower's block, the second cannot be returned at all: the
    request fails as it does unchained, and the worker gives back only blocks of its own arena."""
    chained, plain = servers
    x = np.arange(4, dtype=np.float32)
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "pair", x), x * 2 + x + 1)
    assert chained.core.chained_steps == before + 1
    bad = np.array([-6, 1, 2, 3], dtype=np.float32)
    expected = _error(plain, "pair", bad)
    got = _error(chained, "pair", bad)
    assert (got.message, got.code) == (expected.message, expected.code)
    assert "complex64" in got.message
    _settled(chained)
    np.testing.assert_array_equal(_infer(chained, "pair", x), x * 2 + x + 1)


def test_a_step_calling_the_model_that_waits_for_it_does_not_deadlock(servers):
    """c_calls asks c_mid (through BLS) while c_mid's only instance waits, chained, for c_calls' outputs:
    the call fails the link, c_mid takes the BLS request, then the follower runs the usual way; c_calls
    is not chained from again."""
    chained, _ = servers
    x = np.array([9, 1, 2, 3], dtype=np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        answer = pool.submit(_infer, chained, "calls_next", x).result(timeout=30)  # (deadlocked: TimeoutError)
    finally:
        pool.shutdown(wait=False)
    np.testing.assert_array_equal(answer, x * 2 + 1)
    assert "c_calls" in chained.core.bls_models
    before = chained.core.chained_steps
    np.testing.assert_array_equal(_infer(chained, "calls_next", np.ones(4, np.float32)), np.full(4, 3, np.float32))
    assert chained.core.chained_steps == before
    _settled(chained)
