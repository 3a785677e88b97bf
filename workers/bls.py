"""Business logic scripting (BLS), the worker's side: ``pb_utils.InferenceRequest.exec()``.

A request goes to the front as a ``b`` message on this worker's outbox (kernel.pipelines.bls has the
protocol); its inputs are placed in this worker's arena and passed by reference, so the target
model's worker reads them where they are. Answers come back on the third ring, ``replies``, read
by one thread that hands each to its waiter: a blocking ``exec()``, an awaiting ``async_exec()``
(any number in flight at once, e.g. ``asyncio.gather``), or the iterator of a decoupled call.
Response tensors are read-only numpy arrays over the answering worker's arena. As in Triton, they
stay valid for as long as the model keeps them (in ``self`` from one call to the next, say): each
array's base is a :class:`_Holder`, which numpy keeps alive with every view of it; when the last
holder of a call is gone and the call has ended, the worker tells the front (``bf``, after the next
``execute`` or within a second of idling), which then frees the bytes. The replies ring also carries the
answers to custom metrics' questions (:meth:`BlsClient.query`, workers.metrics).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import posix_ipc

from shm import dtypes
from shm.ring import Ring

if TYPE_CHECKING:
    from workers.runtime import Worker

#: The BLS client of this worker process (None until the runtime attaches one).
client: BlsClient | None = None

_CODES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS",
          "CANCELLED")


def attach(worker: Worker, spec: list) -> None:
    global client
    client = BlsClient(worker, Ring(*spec))


class _Call:
    """One BLS request in flight: where its answers go, and the input blocks to free at the end."""

    __slots__ = ("future", "stream", "blocks")

    def __init__(self, decoupled: bool, blocks: list) -> None:
        self.future: concurrent.futures.Future | None = None if decoupled else concurrent.futures.Future()
        self.stream: queue.SimpleQueue | None = queue.SimpleQueue() if decoupled else None
        self.blocks = blocks


class BlsClient:
    """Sends a worker's BLS requests and dispatches the front's answers."""

    def __init__(self, worker: Worker, replies: Ring) -> None:
        self.worker = worker
        self.replies = replies
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._next = 0
        self._live: dict[int, int] = {}  # call id -> output holders not yet gone (see _Holder)
        self._kept: set[int] = set()  # calls with answers the front keeps for us, not ended yet
        self._ended: set[int] = set()  # calls whose final answer came, with answers the front keeps
        self._gone: collections.deque[int] = collections.deque()  # call ids of holders gone (any thread)
        self._reader: threading.Thread | None = None
        self._queries: dict[int, concurrent.futures.Future] = {}  # questions of workers.metrics, by id
        #: tensor bytes copied into this worker's arena for BLS requests (tests check that tensors already in
        #: shared memory are passed where they are)
        self.copied_bytes = 0

    def _in_shared_memory(self, name: str, data: Any) -> list | None:
        """A ``loc`` for an array that already lies in a segment any process can map by name: the front's
        arena (an input of the calling request) or a worker's output arena (an earlier BLS answer). Those
        stay valid until the calling model's execute returns, so the callee reads them where they are."""
        if not isinstance(data, np.ndarray) or data.dtype == object or not data.nbytes \
                or not data.flags.c_contiguous:
            return None
        datatype = dtypes.from_numpy(data.dtype)
        if datatype is None:
            return None
        start = data.__array_interface__["data"][0]
        end = start + data.nbytes
        for key, region in list(self.worker._regions.items()):
            if not isinstance(key, str) or not region.size:
                continue  # client regions (keyed by registration) are not handed on
            base = np.frombuffer(region.buf, np.uint8, 1).__array_interface__["data"][0]
            if base <= start and end <= base + region.size:
                return [name, datatype, list(data.shape), key, start - base, data.nbytes, 0]
        return None

    # -- requests -------------------------------------------------------
    def start(self, request: Any, decoupled: bool) -> _Call:
        """Send ``request`` (a pb_utils.InferenceRequest); return its call."""
        worker = self.worker
        locs = []
        copied = []  # the blocks this worker allocated for them, freed when the call ends
        try:
            for tensor in request.inputs():
                loc = self._in_shared_memory(tensor.name(), tensor._data)
                if loc is None:
                    loc = worker.output_loc(tensor.name(), tensor._data, None)
                    copied.append(loc)
                    self.copied_bytes += loc[5]
                locs.append(loc)
        except Exception:
            worker._free_locs(copied)
            raise
        call = _Call(decoupled, copied)
        with self._lock:
            self._next += 1
            qid = self._next
            self._calls[qid] = call
            self._start_reader()
        msg = {"t": "b", "q": qid, "m": request.model_name(), "in": locs, "out": request.requested_output_names(),
               "rid": request.request_id(), "d": decoupled}
        if request._model_version > 0:
            msg["v"] = str(request._model_version)
        if request.parameters() not in ("", "{}"):
            msg["p"] = request.parameters()
        if request.correlation_id():  # a request of a sequence (its sequence batcher)
            msg["cid"], msg["fl"] = request.correlation_id(), request.flags()
        if request._timeout:
            msg["to"] = int(request._timeout)
        if request._trace._id:  # made with the calling request's trace(): a child of that trace
            msg["tr"] = request._trace._id
        worker.send(msg)
        return call

    def _start_reader(self) -> None:
        """The thread that reads the replies ring, started by the first call (under the lock)."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="bls-replies", daemon=True)
            self._reader.start()

    def query(self, msg: dict, timeout: float = 60.0) -> Any:
        """Ask the front ``msg`` (a custom metric's question: workers.metrics) and wait for its ``res``; the
        answer comes on the replies ring, like a BLS answer."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._next += 1
            qid = msg["q"] = self._next
            self._queries[qid] = future
            self._start_reader()
        try:
            self.worker.send(msg)
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the server did not answer '{msg.get('op')}' in {timeout:g} s") from None
        finally:
            with self._lock:
                self._queries.pop(qid, None)

    def exec(self, request: Any, decoupled: bool = False) -> Any:
        call = self.start(request, decoupled)
        if decoupled:
            return _Responses(self, call)
        return call.future.result()

    async def async_exec(self, request: Any, decoupled: bool = False) -> Any:
        call = self.start(request, decoupled)
        if decoupled:
            return _Responses(self, call)
        return await asyncio.wrap_future(call.future)

    def holding(self) -> bool:
        """Whether the model holds arrays of BLS answers (read without the lock: a holder made meanwhile
        belongs to a call still running, which a later release covers)."""
        return bool(self._live)

    def release_answers(self) -> None:
        """Tell the front which answers it may free: those of calls that have ended and whose output
        arrays the model holds no more. The worker calls it after each execute and once a second while
        idle (a model may drop an answer it kept at any time)."""
        gone = self._gone
        if not gone and not self._ended:  # nothing to tell (a model without BLS calls): no lock taken
            return
        with self._lock:
            live = self._live
            while gone:
                qid = gone.popleft()
                live[qid] = live.get(qid, 0) - 1
            done = [qid for qid in self._ended if not live.get(qid)]
            for qid in done:
                self._ended.discard(qid)
                live.pop(qid, None)
        if done:
            self.worker.send({"t": "bf", "q": done})

    # -- answers --------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self.replies.recv(timeout=1.0)
            except posix_ipc.BusyError:
                continue
            except (posix_ipc.SignalError, ValueError):
                continue
            except Exception:  # the ring is gone: the worker is stopping
                return
            self._dispatch(msg)

    def _dispatch(self, msg: dict) -> None:
        qid = msg["q"]
        if self._queries:  # (only while a question waits: its answer cannot come before it is asked)
            with self._lock:
                future = self._queries.pop(qid, None)
            if future is not None:
                future.set_result(msg["res"])
                return
        final = msg["final"]
        with self._lock:
            call = self._calls.pop(qid, None) if final else self._calls.get(qid)
            if msg["res"] is not None and "out" in msg["res"]:
                self._kept.add(qid)  # the front keeps this answer until we say so
        response = None
        if call is not None:
            try:
                response = self._response(msg["res"], qid)
            except Exception as e:  # an output that cannot be mapped: the caller gets an error response
                response = _error_response(f"unable to read the BLS response: {e}", "INTERNAL")
        with self._lock:  # only now: release_answers (another thread) must see this answer's holders first
            if final and qid in self._kept:
                self._kept.discard(qid)
                self._ended.add(qid)
        if call is None:
            return
        if final:
            self.worker._free_locs(call.blocks)  # the callee has finished reading the inputs
        if call.future is not None:
            call.future.set_result(response)
        else:
            call.stream.put((response, final))

    def _response(self, result: dict | None, qid: int) -> Any:
        """The pb_utils response for an answer (its arrays' holders counted for call ``qid``)."""
        from workers.backends.python import triton_python_backend_utils as pb

        if result is None:
            return pb.InferenceResponse([])
        if "err" in result:
            message, code = result["err"]
            return _error_response(message, code)
        tensors = []
        for loc in result["out"]:
            array = self.worker.input_array(loc)
            if array.dtype != object:  # BYTES are copied out: nothing of them stays in shared memory
                holder = _Holder(array, qid, self._gone)
                with self._lock:  # counted before anything could drop it: its end is always matched
                    self._live[qid] = self._live.get(qid, 0) + 1
                array = np.asarray(holder)
            tensors.append(pb.Tensor(loc[0], array))
        return pb.InferenceResponse(tensors, parameters=result.get("p") or None)


class _Holder:
    """The base of a BLS output array: numpy keeps it alive with every view of the array (views of
    views collapse to it, as it is not an array), so its end is the end of the model's use of those
    bytes. The array is read-only: another worker's output, read, never written."""

    def __init__(self, array: np.ndarray, qid: int, gone: collections.deque) -> None:
        interface = dict(array.__array_interface__)
        interface["data"] = (interface["data"][0], True)
        self.__array_interface__ = interface
        self._array = array  # keeps the mapping
        self._qid = qid
        self._gone = gone

    def __del__(self) -> None:
        # thread-safe, no lock: this may run inside any code of any thread
        self._gone.append(self._qid)


class _Responses:
    """The responses of a decoupled BLS call, as they arrive (the last one may be empty)."""

    def __init__(self, client: BlsClient, call: _Call) -> None:
        self._call = call
        self._done = False

    def __iter__(self) -> _Responses:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        response, final = self._call.stream.get()
        if final:
            self._done = True
        return response

    def __aiter__(self) -> _Responses:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        response, final = await asyncio.get_running_loop().run_in_executor(None, self._call.stream.get)
        if final:
            self._done = True
        return response


def _error_response(message: str, code: str) -> Any:
    from workers.backends.python import triton_python_backend_utils as pb

    number = _CODES.index(code) if code in _CODES else 0
    return pb.InferenceResponse(error=pb.TritonError(message, number))
