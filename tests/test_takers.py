"""A request future's taker (kernel.model.RequestFuture.then, set through protocol.futures.when_done): the
transports' way to hear an answer. It is called as soon as the worker's answer that settles the request
has been handled (within Batch.done, before the event loop polls for more requests), not on a later
turn as a done callback is; one taker that fails costs only its own request; a request cancelled before
its answer still reaches its taker; any other future gets a plain done callback. What a taker asks to
run after them (RequestFuture.after_takers) runs once the batch's takers all have: the gRPC connection
writes a batch's answers at once that way."""

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

            order: list = []

            def taker(i: int):
                def take(future: asyncio.Future) -> None:
                    taken[i] = (future, _within_batch_done())
                    order.append(i)
                    if i == 0:  # what runs once every taker of the batch has
                        assert future.after_takers(lambda: order.append("after"))
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
            assert order == [3, 0, 1, 2, "after"]  # (the cancelled one at once; then one batch: 0, 1 and 2)
            assert not futures[0].after_takers(lambda: None)  # no batch's takers running now
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


class _Transport:
    """A transport that records each write (one entry per system call it would make)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, frames: list) -> None:
        self.writes.append(b"".join(bytes(f) for f in frames))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_batch_of_unary_grpc_answers_leaves_in_one_write():
    """The gRPC connection holds the answers of one batch's takers and writes them at once when they have
    all run (RequestFuture.after_takers); an answer that comes alone is written at once."""
    from protocol.grpc.server import Call, Connection, GrpcServer

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        conn = Connection(GrpcServer({}))
        conn.transport = transport = _Transport()
        after: list = []

        class BatchFuture:  # a core request's future, as its taker sees it while a batch's takers run
            @staticmethod
            def after_takers(fn) -> bool:
                after.append(fn)
                return True

            def cancelled(self) -> bool:
                return False

        def answer(sid: int) -> None:
            call = Call(conn, sid, None, [], "identity")
            call.closed_remote = True  # (the request's END_STREAM came)
            conn.calls[sid] = call
            conn._deferred_done(call, lambda _: b"answer-%d" % sid, future)

        future = BatchFuture()
        for sid in (1, 3, 5):
            answer(sid)
        assert transport.writes == [] and len(after) == 1  # held; one follow-up for the connection
        after[0]()
        assert len(transport.writes) == 1
        assert all(b"answer-%d" % sid in transport.writes[0] for sid in (1, 3, 5))
        assert transport.writes[0].index(b"answer-1") < transport.writes[0].index(b"answer-3")

        future = loop.create_future()  # an answer outside a batch's takers
        future.set_result(None)
        answer(7)
        assert len(transport.writes) == 2 and b"answer-7" in transport.writes[1] and len(after) == 1
    finally:
        asyncio.set_event_loop(None)
        loop.close()
