"""Business logic scripting: python models calling other models, through the real tritonclient."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from kernel.api import Server
from tests.pipeline_models import build, build_bls
from tests.support import serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build(tmp_path_factory.mktemp("bls") / "models")
    build_bls(repo)
    yield from serving(repo, tmp_path_factory.mktemp("log"))


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    yield client
    client.close()


def _infer(http, model: str, x: np.ndarray, datatype: str = "FP32"):
    t = httpclient.InferInput("IN", list(x.shape), datatype)
    t.set_data_from_numpy(x)
    return http.infer(model, [t])


def test_sync_exec_chains_two_models(http):
    x = np.arange(8, dtype=np.float32)
    result = _infer(http, "bls_sync", x)
    np.testing.assert_array_equal(result.as_numpy("OUT"), x * 2 * 10)
    # the request's own input and the first answer went on by reference; a new array was copied once
    assert result.as_numpy("COPIES").tolist() == [0, x.nbytes]
    stats = {s["name"]: s for s in http.get_inference_statistics()["model_stats"]}
    assert stats["pre"]["inference_stats"]["success"]["count"] >= 1  # the called models count their requests
    assert stats["scale"]["inference_stats"]["success"]["count"] >= 1


def test_an_answer_kept_between_calls_stays_valid_and_is_freed_once_dropped(http):
    """As in Triton (docs/triton-behaviour.md): a model may keep a BLS output in self; its bytes are not
    reused while it does, and go back once it lets go of them."""
    outs, kept = [], []
    for i in range(8):
        result = _infer(http, "bls_keeps", np.full(4, i, dtype=np.float32))
        outs.append(result.as_numpy("OUT").tolist())
        kept.append(int(result.as_numpy("KEPT")[0]))
    assert outs == [[0.0] * 4] + [[10.0 * i] * 4 for i in range(7)]  # each call answers the previous one's
    assert kept == [0] + [1] * 7  # only the answer in self is held: the others were freed


def test_an_answer_dropped_while_the_model_idles_is_freed_within_a_second(tmp_path):
    repo = build(tmp_path / "models")
    build_bls(repo)
    with Server(model_repository=repo, model_control_mode="explicit", load_models=["bls_keeps", "scale"]) as srv:
        model = srv.model("bls_keeps")
        for i in range(3):
            model.infer({"IN": np.full(2, i, dtype=np.float32)}).release()
        held = srv._call(lambda core: sum(len(r) for r in core.bls._held.values()))
        assert held == 1  # the answer in self
        model.infer({"IN": np.full(2, -1, dtype=np.float32)}).release()  # drops it 0.2 s later, while idle
        deadline = time.monotonic() + 5
        while held and time.monotonic() < deadline:
            time.sleep(0.1)
            held = srv._call(lambda core: sum(len(r) for r in core.bls._held.values()))
        assert held == 0


def test_async_execute_fans_out_to_two_models_at_once(http):
    x = np.arange(4, dtype=np.float32)
    result = _infer(http, "bls_async", x)
    np.testing.assert_array_equal(result.as_numpy("OUT"), x * 2 + x + 5)
    took = float(result.as_numpy("TOOK")[0])
    assert took < 0.7, f"the two 0.4 s calls ran one after the other ({took:.2f} s)"


def test_decoupled_exec_iterates_the_responses(http):
    result = _infer(http, "bls_decoupled", np.array([3, 1, 4, -1, 5], dtype=np.int32), "INT32")
    np.testing.assert_array_equal(result.as_numpy("OUT"), [3, 1, 4, 5])
    assert [e.decode() for e in result.as_numpy("ERRORS")] == ["negative value at 3"]
    empty = _infer(http, "bls_decoupled", np.zeros(0, dtype=np.int32), "INT32")
    assert empty.as_numpy("OUT").size == 0


def test_errors_come_back_as_error_responses(http):
    errors = [e.decode() for e in _infer(http, "bls_errors", np.ones(2, np.float32)).as_numpy("ERRORS")]
    # Triton 2.51's texts (the reference answers these very words)
    assert errors[0] == "Model no_such_model - Error when running inference: Failed for execute the inference " \
                        "request. Model 'no_such_model' is not ready."
    assert errors[1].startswith("Failed to process the request(s) for model ")
    assert "ValueError: step failed on purpose" in errors[1]
    assert "is not healthy" in errors[2]  # the called model's worker died: an error response, not a hang
    assert errors[3] == "Model pre - Error when running inference: [request id: <id_unknown>] inference input 'IN' " \
                        "data-type is 'INT32', but model 'pre' expects 'FP32'"
    # the calling model and the server carry on
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(_infer(http, "bls_sync", x).as_numpy("OUT"), x * 20)


def test_many_concurrent_bls_requests(server):
    import concurrent.futures

    def one(i: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            x = np.full(16, i, dtype=np.float32)
            np.testing.assert_array_equal(_infer(client, "bls_sync", x).as_numpy("OUT"), x * 20)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))
