"""The in-process API (kernel.api.Server): every method, errors, threads, clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kernel.api import InferResult, Server, ServerError
from tests.support import ROOT

EXAMPLES = ROOT / "examples" / "models"


def own_shm() -> set[str]:
    """Shared-memory objects of this process and of its worker processes (the in-process server's).

    Servers that other fixtures start as subprocesses (``kernel start``) are not ours here.
    """
    pid = os.getpid()
    out = set()
    for entry in os.listdir("/dev/shm"):
        stem = entry[4:] if entry.startswith("sem.") else entry
        owner = stem.split(".")[1] if stem.startswith("ek.") else ""
        if owner == str(pid) or owner.isdigit() and _is_our_worker(int(owner), pid):
            out.add(entry)
    return out


def _is_our_worker(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return False
    return ppid == parent and b"workers" in cmdline


@pytest.fixture(scope="module")
def server():
    with Server(model_repository=EXAMPLES) as srv:
        yield srv
    assert not own_shm()


def test_sync_api(server):
    assert server.live() and server.ready()
    assert server.metadata()["name"] == "triton"
    names = {m["name"] for m in server.models()}
    assert {"add_sub", "upper", "identity"} <= names
    model = server.model("add_sub")
    assert model.ready()
    assert model.metadata()["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [16]}
    assert model.config()["backend"] == "python"
    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 3, np.int32)
    result = model.infer({"INPUT0": a, "INPUT1": b}, request_id="r1")
    assert isinstance(result, InferResult)
    assert result.id == "r1" and result.model_version == "1"
    np.testing.assert_array_equal(result["OUTPUT0"], a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = model.infer({"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    assert list(only) == ["OUTPUT1"]
    text = server.model("upper").infer({"TEXT": np.array([b"edge", b"kernel"], dtype=np.object_)})
    assert list(text["UPPER"]) == [b"EDGE", b"KERNEL"]
    batch = server.model("identity").infer({"INPUT0": np.ones((3, 16), np.float32)})
    assert batch["OUTPUT0"].shape == (3, 16)
    stats = model.statistics()["model_stats"][0]
    assert stats["inference_count"] >= 2
    assert server.statistics()["model_stats"]


def test_outputs_are_shared_memory_kept_alive_by_their_arrays(server):
    a = np.arange(16, dtype=np.int32)
    result = server.model("add_sub").infer({"INPUT0": a, "INPUT1": a})
    out = result["OUTPUT0"]
    assert not out.flags.owndata  # a view on the worker's shared memory, not a copy
    del result
    gc.collect()
    for _ in range(20):  # other requests reuse freed blocks; ours must still hold its values
        server.model("add_sub").infer({"INPUT0": a * 0, "INPUT1": a * 0})
    np.testing.assert_array_equal(out, 2 * a)
    owned = server.model("add_sub").infer({"INPUT0": a, "INPUT1": a}).copy()
    assert owned["OUTPUT0"].flags.owndata


def test_errors_are_exceptions_with_tritons_messages(server):
    a = np.arange(16, dtype=np.int32)
    with pytest.raises(ServerError) as e:
        server.model("nope").infer({"INPUT0": a})
    assert e.value.message == "Request for unknown model: 'nope' is not found"
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(ServerError) as e:
        server.model("add_sub").infer({"INPUT0": a[:8], "INPUT1": a[:8]})
    assert "unexpected shape for input 'INPUT0' for model 'add_sub'. Expected [16], got [8]." in e.value.message
    with pytest.raises(ServerError) as e:
        server.model("add_sub").infer({"INPUT0": a.astype(np.float32), "INPUT1": a.astype(np.float32)})
    assert "data-type is 'FP32', but model 'add_sub' expects 'INT32'" in e.value.message
    with pytest.raises(ServerError) as e:
        server.model("add_sub", version=3).metadata()
    assert e.value.message == "Request for unknown model: 'add_sub' version 3 is not found"
    with pytest.raises(ServerError) as e:
        server.load("add_sub")
    assert e.value.message == "explicit model load / unload is not allowed if polling is enabled"


def test_zero_copy_input_buffer(server):
    model = server.model("add_sub")
    a = model.input_buffer("INPUT0")
    b = model.input_buffer("INPUT1")
    assert a.shape == (16,) and a.dtype == np.int32 and not a.any()
    a[:] = np.arange(16)
    b[:] = 5
    np.testing.assert_array_equal(model.infer({"INPUT0": a, "INPUT1": b})["OUTPUT0"], np.arange(16) + 5)
    a[:] = 100  # filled in place again: nothing to re-send
    np.testing.assert_array_equal(model.infer({"INPUT0": a, "INPUT1": b})["OUTPUT1"], np.full(16, 95))
    with pytest.raises(ServerError):
        model.input_buffer("NOPE")


def test_input_buffer_views_go_by_reference_only_where_contiguous(server):
    """A contiguous view of an input buffer is passed where it lies (each view's place found once and kept);
    a strided one is copied, and every answer is right either way."""
    model = server.model("add_sub")
    core = server.core
    big = model.input_buffer("INPUT0", [48])
    big[:] = np.arange(48)
    b = np.full(16, 2, np.int32)
    window = big[16:32]  # contiguous: by reference
    strided = big[::3]  # 16 elements, every third: copied
    for _ in range(2):  # the second time, from what the first call found
        before = core.copied_bytes
        np.testing.assert_array_equal(model.infer({"INPUT0": window, "INPUT1": b})["OUTPUT0"], np.arange(16, 32) + 2)
        assert core.copied_bytes - before == b.nbytes  # INPUT1 only
        before = core.copied_bytes
        np.testing.assert_array_equal(model.infer({"INPUT0": strided, "INPUT1": b})["OUTPUT0"],
                                      np.arange(0, 48, 3) + 2)
        assert core.copied_bytes - before == 2 * b.nbytes  # both
        big[16:32] += 100  # written in place between calls: the next call sees it
        window_expected = np.arange(16, 32) + 100
        np.testing.assert_array_equal(model.infer({"INPUT0": window, "INPUT1": b})["OUTPUT0"], window_expected + 2)
        big[16:32] -= 100


def test_sync_call_from_a_thread_while_the_async_api_runs_on_the_loop():
    before = own_shm()  # the module's server may be running

    async def main() -> None:
        async with Server(model_repository=EXAMPLES) as srv:
            model = srv.model("add_sub")
            a = np.arange(16, dtype=np.int32)
            thread_results: list[np.ndarray] = []

            def from_thread() -> None:
                for i in range(20):
                    thread_results.append(model.infer({"INPUT0": a, "INPUT1": np.full(16, i, np.int32)})
                                          .copy()["OUTPUT0"])

            thread = threading.Thread(target=from_thread)
            thread.start()
            results = await asyncio.gather(*(model.async_infer({"INPUT0": a, "INPUT1": np.full(16, i, np.int32)})
                                             for i in range(20)))
            while thread.is_alive():
                await asyncio.sleep(0.01)
            for i, r in enumerate(results):
                np.testing.assert_array_equal(r["OUTPUT0"], a + i)
            for i, out in enumerate(thread_results):
                np.testing.assert_array_equal(out, a + i)
            with pytest.raises(RuntimeError):
                model.infer({"INPUT0": a, "INPUT1": a})  # blocking on the server's own loop
            assert await srv.model("upper").async_infer({"TEXT": np.array([b"x"], dtype=np.object_)})

    asyncio.run(main())
    assert own_shm() <= before


def test_model_control_and_clean_shutdown(tmp_path):
    before = own_shm()
    with Server(model_repository=EXAMPLES, model_control_mode="explicit", load_models=["add_sub"]) as srv:
        assert srv.model("add_sub").ready()
        assert not srv.model("upper").ready()
        srv.load("upper")
        assert srv.model("upper").ready()
        srv.unload("add_sub")
        assert not srv.model("add_sub").ready()
        with pytest.raises(ServerError) as e:
            srv.model("add_sub").infer({"INPUT0": np.zeros(16, np.int32), "INPUT1": np.zeros(16, np.int32)})
        assert e.value.message == "Request for unknown model: 'add_sub' has no available versions"
        config = srv.model("upper").config()
        config["instance_group"] = [{"kind": "KIND_CPU", "count": 2}]
        srv.load("upper", config=config)
        assert srv.model("upper").config()["instance_group"][0]["count"] == 2
        with pytest.raises(ServerError):
            srv.load("does_not_exist")
        # a new model from files, as the load extension's file: parameters (kernel.api._load_args)
        doubler = ("import triton_python_backend_utils as pb_utils\n\n\nclass TritonPythonModel:\n"
                   "    def execute(self, requests):\n        return [pb_utils.InferenceResponse([pb_utils.Tensor("
                   "'Y', pb_utils.get_input_tensor_by_name(r, 'X').as_numpy() * 2)]) for r in requests]\n")
        srv.load("sent", config={"backend": "python", "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [4]}],
                                 "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [4]}]},
                 files={"1/model.py": doubler.encode()})
        result = srv.model("sent").infer({"X": np.arange(4, dtype=np.float32)})
        np.testing.assert_array_equal(result["Y"], np.arange(4, dtype=np.float32) * 2)
        result.release()
        with pytest.raises(ServerError) as e:
            srv.load("sent2", config={"backend": "python"}, files={"../escape.py": b""})
        assert e.value.message == "failed to load 'sent2', failed to poll from model repository"  # Triton's words
    assert own_shm() <= before
    with pytest.raises(RuntimeError):
        srv.model("upper").metadata()  # stopped


def test_streaming_a_decoupled_model():
    repo = ROOT / "tests" / "models"
    with Server(model_repository=repo, model_control_mode="explicit", load_models=["repeat"]) as srv:
        model = srv.model("repeat")
        outs = [(int(r["IDX"][0]), int(r["OUT"][0])) for r in model.stream({"IN": np.array([5, 6, 7], np.int32)})]
        assert outs == [(0, 5), (1, 6), (2, 7)]
        assert list(model.stream({"IN": np.array([], np.int32)})) == []
        with pytest.raises(ServerError) as e:
            list(model.stream({"IN": np.array([1, -1], np.int32)}))
        assert e.value.message == "negative value at 1"
        with pytest.raises(ServerError) as e:
            model.infer({"IN": np.array([1], np.int32)})
        assert "decoupled" in e.value.message

        async def collect() -> list[int]:
            return [int(r["OUT"][0]) async for r in model.async_stream({"IN": np.array([9, 8], np.int32)})]

        assert srv._call(lambda core: None) is None
        future = asyncio.run_coroutine_threadsafe(collect(), srv._loop)
        assert future.result(30) == [9, 8]


def test_decoupled_batches_end_cleanly():
    """Inputs stay valid until the final response; raising or answering inside execute ends the batch."""
    repo = ROOT / "tests" / "models"
    with Server(model_repository=repo, model_control_mode="explicit", load_models=["repeat"]) as srv:
        model = srv.model("repeat")
        outs: list[int] = []
        thread = threading.Thread(target=lambda: outs.extend(
            int(r["OUT"][0]) for r in model.stream({"IN": np.full(4, 1234, np.int32)})))
        thread.start()  # answers 0.3 s after execute returned, reading its input array then
        for _ in range(5):  # meanwhile other requests take arena blocks
            list(model.stream({"IN": np.full(4, 5, np.int32)}))
        thread.join(10)
        assert outs == [1234] * 4
        for _ in range(3):  # the instance keeps serving after execute raised
            with pytest.raises(ServerError) as e:
                list(model.stream({"IN": np.array([-99], np.int32)}))
            assert "asked to fail" in e.value.message
        assert [int(r["OUT"][0]) for r in model.stream({"IN": np.array([-7], np.int32)})] == [-7]
        instance = srv.core.models["repeat"].versions[1].instances[0]
        # The last stream ends with its final response; execute's own answer may come a moment later.
        deadline = time.monotonic() + 2
        while (state := srv._call(lambda core: (instance.inflight, len(instance._batches), core.arena.in_use()))) != (
                0, 0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state == (0, 0, 0)


def test_oversized_and_duplicate_requests_are_refused_cleanly(server):
    a = np.arange(16, dtype=np.int32)
    model = server.model("add_sub")
    with pytest.raises(ServerError) as e:
        model.infer({"INPUT0": a, "INPUT1": a}, parameters={"blob": "x" * 600_000})
    assert e.value.code == "INVALID_ARG" and "too large" in e.value.message
    np.testing.assert_array_equal(model.infer({"INPUT0": a, "INPUT1": a})["OUTPUT0"], 2 * a)
    from kernel.types import InferRequest, InputTensor

    request = InferRequest("add_sub", inputs=[InputTensor("INPUT0", "INT32", [16], a),
                                              InputTensor("INPUT0", "INT32", [16], a)])
    with pytest.raises(ServerError) as e:
        server._wait(lambda core: core.submit(request))
    assert e.value.message == "[request id: <id_unknown>] input 'INPUT0' already exists in request"


@pytest.mark.parametrize("side", ["sync", "async"])
def test_streams_left_early_give_their_responses_back(side):
    """A consumer that stops after the first response: the others, queued or still to come, are released."""
    repo = ROOT / "tests" / "models"
    with Server(model_repository=repo, model_control_mode="explicit", load_models=["repeat"]) as srv:
        model = srv.model("repeat")
        instance = srv._call(lambda core: core.version("repeat", "").instances[0])
        released: list[int] = []
        plain = instance.release
        instance.release = lambda blocks: (released.append(len(blocks)), plain(blocks))
        values = np.array([1000, 1, 2, 3, 4], np.int32)  # all five answered together, after 0.3 s
        if side == "sync":
            for result in model.stream({"IN": values}):
                result.release()
                break
        else:
            async def first() -> None:
                async for result in model.async_stream({"IN": values}):
                    result.release()
                    break

            asyncio.run_coroutine_threadsafe(first(), srv._loop).result(30)
        deadline = time.monotonic() + 5
        while len(released) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(released) == 5  # one release per response: none kept


def test_zero_element_tensors(server):
    """A batch of 0 rows is refused with Triton's words, never left unanswered (an input_buffer of
    shape [0,16] used to reach the scheduler and wait forever); other zero-element tensors are served."""
    identity = server.model("identity")
    with pytest.raises(ServerError) as e:
        identity.infer({"INPUT0": np.zeros((0, 16), np.float32)})
    assert (e.value.message, e.value.code) == (
        "[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' for model 'identity'. "
        "Expected 64, got 0", "INVALID_ARG")
    with ThreadPoolExecutor(1) as pool:  # (a hang fails the test instead of stopping it)
        call = pool.submit(identity.infer, {"INPUT0": identity.input_buffer("INPUT0", [0, 16])})
        with pytest.raises(ServerError) as e:
            call.result(timeout=20)
    assert e.value.message.endswith("Expected 64, got 0")
    result = server.model("upper").infer({"TEXT": np.array([], dtype=np.object_)})
    assert result["UPPER"].shape == (0,) and result["LENGTH"].shape == (0,)
    result.release()
    assert identity.infer({"INPUT0": np.ones((1, 16), np.float32)})["OUTPUT0"].sum() == 16
