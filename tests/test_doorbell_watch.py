"""Answers without the doorbell while the front polls (shm.doorbell.Watch): none is lost, and the bell is
really skipped."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from kernel.api import Server
from kernel.instance import Instance
from shm.doorbell import MARGIN_NS, Watch
from tests.support import ROOT, python_model

JITTER = '''
import random, time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        # answers land before, around and after the end of the front's 0.3 ms polling window
        time.sleep(random.choice([0, 0, random.uniform(0, 0.0006), random.uniform(0.0002, 0.0004), 0.002]))
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                                                            .as_numpy())]) for r in requests]
'''
CONFIG = '''max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
'''


def test_a_promise_is_seen_by_the_ringer_until_a_margin_before_it_ends():
    loop_side = Watch()
    try:
        ringer = Watch(loop_side.name)
        assert not ringer.watched()  # no promise yet
        loop_side.promise(time.perf_counter_ns() + 10 * MARGIN_NS)
        assert ringer.watched()
        loop_side.promise(time.perf_counter_ns() + MARGIN_NS // 2)  # too close to its end: ring
        assert not ringer.watched()
        ringer.close()
    finally:
        loop_side.close(unlink=True)


@pytest.fixture
def drains(monkeypatch):
    """How often the front woke up for a worker's doorbell."""
    count = [0]
    drain = Instance._drain

    def counted(self) -> None:
        count[0] += 1
        drain(self)

    monkeypatch.setattr(Instance, "_drain", counted)
    return count


def test_answers_near_the_end_of_the_polling_window_are_never_lost(tmp_path, drains):
    """Each answer either lands inside the promise (polled) or rings: a lost one would hang its request."""
    python_model(tmp_path, "jitter", JITTER, CONFIG)
    with Server(model_repository=tmp_path) as srv:
        model = srv.model("jitter")

        async def run() -> list[int]:
            outs = []
            for i in range(400):
                result = await asyncio.wait_for(model.async_infer({"IN": np.array([i], np.int32)}), 5)
                outs.append(int(result["OUT"][0]))
                result.release()
            return outs

        assert asyncio.run_coroutine_threadsafe(run(), srv._loop).result(120) == list(range(400))
        woken = drains[0]
    assert 0 < woken < 400  # the 2 ms answers (a fifth) come after the window and must ring


def test_a_fast_model_answers_without_the_doorbell(drains):
    """add_sub at one request at a time: its answers come while the front polls, so few of them ring."""
    with Server(model_repository=ROOT / "examples" / "models", model_control_mode="explicit",
                load_models=["add_sub"]) as srv:
        model = srv.model("add_sub")
        a = np.arange(16, dtype=np.int32)

        async def run() -> None:
            for _ in range(300):
                result = await model.async_infer({"INPUT0": a, "INPUT1": a})
                assert (result["OUTPUT0"] == 2 * a).all()
                result.release()

        before = drains[0]
        asyncio.run_coroutine_threadsafe(run(), srv._loop).result(120)
        assert drains[0] - before < 100
