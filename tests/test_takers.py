"""A request future's taker (kernel.model.RequestFuture.then, set through protocol.futures.when_done): the
transports' way to hear an answer. It is called as soon as the worker's answer that settles the request
has been handled (within Batch.done, before the event loop polls for more requests), not on a later
turn as a done callback is; one taker that fails costs only its own request; a request cancelled before
its answer still reaches its taker; any other future gets a plain done callback."""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from kernel.api import Server
from protocol.futures import when_done
from tests.pipeline_models import arith

# Requests that arrive within 200 ms run as one batch: a batch's takers are called together.
BATCHED = "dynamic_batching { max_queue_delay_microseconds: 200000 }"


def _within_batch_done() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "done" and frame.f_code.co_filename.endswith("kernel/model.py"):
            return True
        frame = frame.f_back
    return False


def test_takers_run_as_the_batch_answer_is_handled(tmp_path):
    arith(tmp_path, "double", "y = (x * 2).astype(np.float32)", mbs=8, extra=BATCHED)

    async def main() -> None:
        async with Server(model_repository=tmp_path) as srv:
            core = srv._core
            loop = asyncio.get_running_loop()
            reported: list[dict] = []
            loop.set_exception_handler(lambda _loop, context: reported.append(context))
            model = srv.model("double")
            taken: dict[int, tuple] = {}

            def taker(i: int):
                def take(future: asyncio.Future) -> None:
                    taken[i] = (future, _within_batch_done())
                    if i == 1:
                        raise RuntimeError("this taker fails")
                return take

            futures = []
            for i in range(4):
                request = model._request({"IN": np.full((1, 3), i, np.float32)}, None, None, "", 0, 0)
                futures.append(core.submit(request))
                when_done(futures[-1], taker(i))
            futures[3].cancel()  # its caller gave up before the answer
            await asyncio.wait(futures)
            for _ in range(3):
                await asyncio.sleep(0)  # (the cancelled one's taker comes on a turn of the loop)
            assert sorted(taken) == [0, 1, 2, 3]
            for i in (0, 1, 2):  # called from within the batch's answer, with their outcome
                future, within = taken[i]
                assert within and future is futures[i]
                np.testing.assert_array_equal(future.result().outputs[0].as_numpy(), np.full((1, 3), 2 * i))
                future.result().release()
            assert taken[3][0].cancelled() and not taken[3][1]
            assert [c["exception"].args for c in reported] == [("this taker fails",)]

            plain = loop.create_future()  # not a request's: a done callback
            seen = []
            when_done(plain, seen.append)
            plain.set_result(5)
            assert seen == []
            await asyncio.sleep(0)
            assert seen == [plain]
            assert (await model.async_infer({"IN": np.ones((1, 3), np.float32)}))["OUT"].tolist() == [[2, 2, 2]]

    asyncio.run(main())
