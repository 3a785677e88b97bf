"""Worker process main loop, started as ``python -m workers '<json spec>'``.

One worker runs one model instance. It receives msgpack messages from the
front on an inbox ring (sleeping in ``sem_wait`` while idle) and answers on an
outbox ring, ringing the front's doorbell after each answer unless the front
polls for it anyway (shm.doorbell.Watch). What runs the model is a backend
(workers.backend); this module is the same for every backend.

Messages from the front (``t`` is the type):

* ``load``  -- find the backend and auto-complete the model's configuration;
* ``init``  -- create the backend's instance with the final configuration;
* ``x``     -- execute a batch of requests; tensors are ``loc`` lists
  ``[name, datatype, shape, key, offset, byte_size, region_id]`` that point into
  shared memory (the front's arena when ``region_id`` is 0, else a client's
  registered region);
* ``f``     -- free blocks of this worker's output arena;
* ``u``     -- forget mappings: of client regions whose registrations ended (ids) and of segments the
  front's arena gave back (names); ``k``: one id or a list;
* ``w``     -- wake hint: a batch should come within ``ns`` nanoseconds (kernel.pipelines.ensemble sends it to the
  next step's instance while a step runs), so poll the inbox until then instead of sleeping;
* ``stop``  -- finalise and exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from functools import partial
from typing import Any

import numpy as np
import posix_ipc

from shm import dtypes
from shm.arena import Arena, MiB
from shm.doorbell import Watch
from shm.doorbell import ring as ring_doorbell
from shm.link import FAILED, OK, LinkBoard
from shm.region import Region, ShmError
from shm.ring import Ring
from workers import bls, gpu, metrics
from workers.backend import Backend, BackendError, Model, Request, Response
from workers.sequence_state import END, States

#: How many ended registrations a worker remembers (see :meth:`Worker.region`).
_FORGOTTEN_KEPT = 4096


class TensorError(Exception):
    """A tensor could not be read from or written to shared memory."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


class BytesCountError(TensorError):
    """Serialised BYTES input data holds a different number of elements than its shape."""

    def __init__(self, name: str, expected: int, got: int) -> None:
        super().__init__(f"expected {expected} string elements for inference input '{name}', got {got}")
        self.name, self.expected, self.got = name, expected, got

    def for_request(self, model: str, request_id: str) -> str:
        """Triton's wording, which names the request and the model."""
        return (f"[request id: {request_id or '<id_unknown>'}] expected {self.expected} string elements for "
                f"inference input '{self.name}' for model '{model}', got {self.got}")


class Worker:
    """Shared-memory plumbing of one worker process, and the generic side of its backend."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.inbox = Ring(*spec["inbox"])
        self.outbox = Ring(*spec["outbox"])
        self.doorbell_fd: int = spec["doorbell_fd"]
        self._watch = Watch(spec["watch"]) if spec.get("watch") else None
        self.arena = Arena(f"w{os.getpid()}", spec.get("arena_size", 8 * MiB))
        self._regions: dict[str | int, Region] = {}
        self._forgotten: dict[int, None] = {}  # recently ended registrations, oldest first (bounded)
        self._send_lock = threading.Lock()
        self.backend_class: type[Backend] | None = None
        self.backend: Backend | None = None
        self.model: Model | None = None
        self.states: States | None = None  # a sequence model's implicit state
        self.iterative = False  # its requests may be rescheduled: set with the model
        self._load_msg: dict = {}
        self._artifact = ""  # the model file a third-party python-based backend imposes
        self._spin_until = 0  # a wake hint's deadline (perf_counter ns): poll the inbox until then
        # The front's cancel board: a byte per executing request, raised when its caller gives up.
        self._board_region = Region(spec["cancel"]) if spec.get("cancel") else None
        self.board = self._board_region.buf if self._board_region is not None else None
        # Chained pipeline steps (kernel.pipelines.ensemble): this worker posts or waits on links there.
        self.links = LinkBoard(spec["links"]) if spec.get("links") else None
        self._parent = os.getppid()
        if spec.get("replies"):  # the front answers BLS requests there (workers.bls)
            bls.attach(self, spec["replies"])
        # Custom metrics (pb_utils.MetricFamily): operations buffered here go ahead of the next message sent
        self.metrics = metrics.attach(self._post, partial(ring_doorbell, self.doorbell_fd),
                                      bls.client.query if bls.client is not None else None)
        self._metric_ops = self.metrics.ops

    # -- messages -------------------------------------------------------
    def send(self, msg: dict, *, polled: bool = False) -> None:
        """Answer the front (thread-safe: decoupled models send from their threads). ``polled``: a batch's
        answer, which the front polls for while the batch is in flight: no doorbell while it promises to
        (shm.doorbell.Watch). Custom metric operations the model made since the last message go first
        (workers.metrics): the front has applied them when it reads this one."""
        if self._metric_ops:
            self.metrics.flush(ring=False)
        with self._send_lock:
            self.outbox.send(msg)
        if not (polled and self._watch is not None and self._watch.watched()):
            ring_doorbell(self.doorbell_fd)

    def _post(self, msg: dict) -> None:
        """Write ``msg`` on the outbox without ringing the doorbell (a message that rings it follows, or the
        caller rings it)."""
        with self._send_lock:
            self.outbox.send(msg)

    def _next(self, spin_ns: int) -> Any:
        """The next message; polls for ``spin_ns`` (or until a wake hint's deadline) before sleeping in
        sem_wait (1 s at a time)."""
        if spin_ns or self._spin_until:
            inbox, clock = self.inbox, time.perf_counter_ns
            deadline = max(clock() + spin_ns, self._spin_until)
            self._spin_until = 0
            while clock() < deadline:
                msg = inbox.try_recv()
                if msg is not None:
                    return msg
        return self.inbox.recv(timeout=1.0)

    def serve(self) -> None:
        spin_ns = int(self.spec.get("spin_us", 0)) * 1000
        while True:
            try:
                msg = self._next(spin_ns)
            except posix_ipc.BusyError:  # a second without messages
                if not self._front_alive():
                    return  # the front is gone
                if bls.client is not None:
                    bls.client.release_answers()  # BLS answers the model let go of since its last execute
                if self._metric_ops:  # metric operations of the model's own threads while it idles
                    self.metrics.flush()
                continue
            except posix_ipc.SignalError:
                continue
            kind = msg.get("t")
            try:
                if kind == "x":
                    self._free(msg.get("f"))
                    self.execute(msg)
                elif kind == "f":
                    self._free(msg["b"])
                elif kind == "w":  # a batch is on its way (a pipeline's next step): be awake for it
                    self._spin_until = time.perf_counter_ns() + msg["ns"]
                elif kind == "u":
                    for key in msg["k"] if isinstance(msg["k"], list) else (msg["k"],):
                        if isinstance(key, str):  # a segment the front's arena gave back
                            region = self._regions.pop(key, None)
                            if region is not None:
                                self._drop_mapping(region)
                        else:
                            self.forget_region(key)
                elif kind == "env":  # the server's log settings changed (kernel.logs.worker_env)
                    os.environ.update(msg["env"])
                elif kind == "load":
                    self._load(msg)
                elif kind == "init":
                    self._init(msg)
                elif kind == "stop":
                    try:
                        if self.backend is not None:
                            self.backend.finalize()
                    except Exception:  # a failing finalize must not keep the process alive
                        sys.stderr.write(traceback.format_exc())
                    self.send({"t": "stopped"})
                    return
                else:
                    sys.stderr.write(f"worker: unknown message type {kind!r}\n")
            except Exception as e:  # never die on one message
                if isinstance(e, BackendError):
                    text, code = e.message, e.code
                else:
                    text, code = (str(e) if isinstance(e, TensorError) else describe(e)), "INTERNAL"
                self.send({"t": "error", "id": msg.get("id"), "error": text, "code": code})

    def _free(self, blocks: list | None) -> None:
        """Free output blocks the front is done with (unknown ones are logged, never answered)."""
        for name, offset in blocks or ():
            try:
                self.arena.free(name, offset)
            except KeyError:
                sys.stderr.write(f"worker: asked to free an unknown block {name}:{offset}\n")

    def _load(self, msg: dict) -> None:
        """Find the backend (and auto-complete the model's configuration if asked to)."""
        from workers.backends import resolve

        self.backend_class, artifact = resolve(msg.get("backend", ""), msg.get("backend_dirs") or [])
        self._artifact = artifact or ""
        self._load_msg = msg
        config = msg["config"]
        if msg.get("autocomplete"):
            completed = self.backend_class.auto_complete_config(self._model(msg))
            if completed is not None:
                config = completed
        self.send({"t": "loaded", "config": config})

    def _init(self, msg: dict) -> None:
        """Create the backend's instance with the model's final configuration (after applying its host
        policy, so that the threads the backend starts inherit it)."""
        if msg.get("place"):
            place(msg["place"])
        self.model = self._model(dict(self._load_msg, config=msg["config"], args=msg["args"]))
        self.backend = self.backend_class(self.model)
        self.states = States.of(self.model)
        #: ``sequence_batching { iterative_sequence: true }``: requests may be rescheduled (Request.reschedule)
        self.iterative = bool((self.model.config.get("sequence_batching") or {}).get("iterative_sequence"))
        self.send({"t": "ready", "status": self.backend.status})

    def _model(self, msg: dict) -> Model:
        if self._artifact:
            msg = dict(msg, model_file=self._artifact)
        elif not msg["config"].get("default_model_filename") and self.backend_class.default_model_filename:
            # a backend the front knows nothing of: its own default file in the version directory
            msg = dict(msg, model_file=os.path.join(msg["model_file"], self.backend_class.default_model_filename))
        return Model(msg)

    # -- execution ------------------------------------------------------
    def execute(self, msg: dict) -> None:
        """Run one batch through the backend and answer the front.

        Requests whose inputs cannot be read fail alone, and those whose caller gave up while they
        waited in the ring (the cancel board) are answered CANCELLED without reaching the model;
        the others run. The answer has one result per request: ``{"out": [loc, ...], "p": params}``
        or ``{"err": [message, code]}`` (``"fail"`` when it counts as a failed inference); None for
        a decoupled model, whose responses go out one by one as ``s`` messages.
        """
        t0 = time.perf_counter_ns()
        backend, model = self.backend, self.model
        decoupled = model.decoupled
        specs = msg["reqs"]
        results: list[dict | None] = [None] * len(specs)
        requests: list[Request] = []
        index: list[int] = []
        place = self._output_buffer
        board = self.board
        states = self.states
        waited = False
        for i, spec in enumerate(specs):
            link = spec.get("w")
            if link is not None:  # a chained step: its inputs are placed once the step before posts
                waited = True
                ready = self.links.wait(*link, alive=self._front_alive)
                t0 = time.perf_counter_ns()
                if not ready:
                    results[i] = {"skip": 1}
                    continue
            flag = spec.get("c", -1)
            if flag >= 0 and board is not None and board[flag]:  # its caller gave up while it waited
                results[i] = _error(f"[request id: {spec.get('rid') or '<id_unknown>'}] Request was cancelled",
                                    "CANCELLED")
                continue
            try:
                inputs, spans = self._inputs(spec["in"])
            except BytesCountError as e:
                results[i] = _error(e.for_request(model.name, spec.get("rid", "")), "INVALID_ARG")
                continue
            except (TensorError, ValueError) as e:
                results[i] = _error(str(e), getattr(e, "code", "INVALID_ARG"))
                continue
            if states is not None:  # a sequence model's implicit state (workers.sequence_state)
                inputs = states.add_inputs(spec.get("cid", 0), spec.get("fl", 0), inputs)
            request = Request(inputs, spec.get("out") or [], spec.get("rid", ""), spec.get("cid", 0),
                              spec.get("fl", 0), spec.get("p", ""))
            request._spans = spans
            request.trace_id = spec.get("tr", 0)
            request.trace_context = spec.get("tc")
            request._dests = spec.get("shm") or {}
            request._place = place
            request._board = board
            request._flag = flag
            if decoupled:
                request._send = partial(self._stream, msg["id"], i, request)
            requests.append(request)
            index.append(i)
        marks: list[int] = []
        backend._marks = marks
        t1 = time.perf_counter_ns()
        responses: Any = None
        if requests:
            try:
                responses = backend.execute(requests)
            except Exception as e:
                failed = _error(self._failure(e), e.code if isinstance(e, BackendError) else "INTERNAL")
                for i in index:
                    results[i] = failed
                for request in requests:
                    self._release_placed(request)
                requests = []
        t2 = time.perf_counter_ns()
        if requests and not decoupled:
            problem = _check_responses(responses, len(requests))
            if states is not None and not problem:
                for request, response in zip(requests, responses):
                    # (an iterative sequence ends with its request's last step)
                    end = self.iterative and not request.rescheduled
                    states.keep(request.correlation_id, request.flags | (END if end else 0), response)
            for k, i in enumerate(index):
                request = requests[k]
                results[i] = _error(problem) if problem else self._rescheduled(request) if request.rescheduled \
                    else self._result(responses[k], request)
        elif requests:  # decoupled: the requests' responses went out through send()
            for k, i in enumerate(index):
                if requests[k].rescheduled:
                    results[i] = self._rescheduled(requests[k])
        t3 = time.perf_counter_ns()  # CLOCK_MONOTONIC: the front reads it as its own clock
        if bls.client is not None:
            if bls.client.holding():  # (else nothing to drop: the batch's objects go after the answer is sent)
                responses = requests = None  # ours: the BLS answers they hold are not the model's any more
            bls.client.release_answers()  # the outputs are placed: BLS responses may go
        backend._marks = None
        if len(marks) == 2:  # the backend's own split of execute: gathering inputs, inference
            t1, t2 = marks
        if self.links is not None:
            for spec, result in zip(specs, results):
                if "k" in spec:  # the next step waits for these outputs
                    self.links.post(spec["k"], OK if _filled(spec, result) else FAILED)
        ts = [t1 - t0, t2 - t1, t3 - t2, t0] if waited else [t1 - t0, t2 - t1, t3 - t2]
        self.send({"t": "r", "id": msg["id"], "res": results, "d": decoupled, "ts": ts, "at": t3}, polled=True)

    def _rescheduled(self, request: Request) -> dict:
        """A request the model asked to run again (Request.reschedule): the front queues it anew."""
        self._release_placed(request)
        if not self.iterative:
            return _error("Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is "
                          "not configured to handle such a flag.", "INVALID_ARG")
        return {"re": 1}

    def _front_alive(self) -> bool:
        return os.getppid() == self._parent

    def _failure(self, e: BaseException) -> str:
        if isinstance(e, BackendError):
            return e.message
        return f"Failed to process the request(s) for model '{self.model.instance_name}', message: {describe(e)}"

    def _inputs(self, locs: list) -> tuple[dict[str, np.ndarray], dict[str, tuple[memoryview, int]]]:
        inputs = {}
        spans = {}
        for loc in locs:
            inputs[loc[0]], mapping = self._input(loc)
            if mapping is not None:
                spans[loc[0]] = (mapping, loc[4])
        return inputs, spans

    def _result(self, response: Any, request: Request) -> dict:
        """Place one response's outputs in shared memory (those not written in place already)."""
        if not isinstance(response, Response):
            self._release_placed(request)
            return _error(f"Expected a Response object, got {type(response).__name__}")
        if response.error is not None:
            self._release_placed(request)
            err = response.error
            return _error(err.message, err.code, failed=response.failed)
        dests = request._dests
        placed = request._placed
        outs: list[list] = []
        try:
            for name, value in response.outputs.items():
                if not request.wants(name):
                    continue
                done = placed.pop(name, None)
                if done is not None and _same_memory(done[0], value):
                    outs.append(done[1])
                    continue
                if done is not None:
                    self._free_locs([done[1]])
                outs.append(self.output_loc(name, value, dests.get(name)))
        except TensorError as e:
            self._free_locs(outs)
            self._release_placed(request)
            return _error(str(e), e.code)
        except Exception as e:  # e.g. /dev/shm full while growing the arena, a model's odd tensor
            self._free_locs(outs)
            self._release_placed(request)
            return _error(f"unable to return the outputs: {type(e).__name__}: {e}")
        self._release_placed(request)  # buffers asked for but not returned
        result: dict = {"out": outs}
        if response.parameters:
            result["p"] = response.parameters
        return result

    def _stream(self, batch_id: int, index: int, request: Request, response: Response | None,
                final: bool) -> None:
        result = None if response is None else self._result(response, request)
        self.send({"t": "s", "id": batch_id, "i": index, "res": result, "final": final})

    def _release_placed(self, request: Request) -> None:
        if request._placed:
            self._free_locs([loc for _, loc in request._placed.values()])
            request._placed.clear()

    def _free_locs(self, outs: list[list]) -> None:
        arena = self.arena
        for loc in outs:
            if loc[3] and not loc[6] and arena.owns(loc[3]):  # (not a chained output's block: the front's)
                arena.free(loc[3], loc[4])

    # -- tensors --------------------------------------------------------
    def region(self, key: str, region_id: int, need: int = 0) -> Region:
        """The mapping of ``key``: an arena segment (``region_id`` 0) or a client region.

        Mappings are cached: arena segments by key, client regions per
        registration (a re-registration of the same key is a new ``region_id``,
        so it is mapped afresh and never served from an older mapping). A
        registration that already ended is mapped for the request at hand only.
        A client region mapped while its owner had shrunk it is mapped again once
        a request needs ``need`` bytes of it: the shrink was not for good.
        """
        cache_key = region_id or key
        region = self._regions.get(cache_key)
        if region is not None:
            if region.size >= need or not region_id:
                return region
            del self._regions[cache_key]
            self._drop_mapping(region)
        try:
            region = Region(key, keep_fd=bool(region_id))
        except ShmError as e:
            raise TensorError(f"Unable to open shared memory region: '{key}'" if region_id else str(e),
                              "INTERNAL") from e
        if region_id not in self._forgotten:
            self._regions[cache_key] = region
        return region

    def forget_region(self, region_id: int) -> None:
        """A client region's registration ended: drop its mapping.

        Views that models still hold (decoupled responses) keep the pages
        mapped until they are gone; the front sends this only once no request
        it accepted with the registration is in flight.
        """
        self._forgotten[region_id] = None
        if len(self._forgotten) > _FORGOTTEN_KEPT:
            del self._forgotten[next(iter(self._forgotten))]
        region = self._regions.pop(region_id, None)
        if region is not None:
            self._drop_mapping(region)

    def _drop_mapping(self, region: Region) -> None:
        gpu.unpin(region.buf)  # page-locked for a GPU model: undone before the pages go
        if self.backend is not None:
            self.backend.forget_mapping(region.buf)
        region.close()

    def input_array(self, loc: list) -> np.ndarray:
        """A numpy view (copy for BYTES) of an input ``loc``."""
        return self._input(loc)[0]

    def _input(self, loc: list) -> tuple[np.ndarray, memoryview | None]:
        """An input's array and the whole mapping it lies in (None for BYTES, copied out)."""
        _name, datatype, shape, key, offset, nbytes, region_id = loc
        if not key:
            mapping = buf = memoryview(b"")
        else:
            region = self.region(key, region_id, offset + nbytes)
            # A client may have shrunk its object since: touching pages past its end would SIGBUS.
            if offset + nbytes > min(region.size, region.current_size() if region_id else region.size):
                raise TensorError(f"shared memory region '{key}' is smaller than the tensor it should hold")
            mapping = region.buf
            buf = mapping[offset : offset + nbytes]
        if datatype == "BYTES":
            count = dtypes.element_count(shape)
            try:
                return dtypes.deserialize_bytes(buf, count).reshape(shape), None
            except ValueError:
                raise BytesCountError(_name, count, dtypes.count_bytes_elements(buf)) from None
        array = np.frombuffer(buf, dtype=dtypes.NUMPY[datatype]).reshape(shape)
        if region_id:
            array.flags.writeable = False  # the client's bytes: never written by a model
        return array, mapping

    def _place(self, name: str, datatype: str, nbytes: int, dest: list | None) -> tuple[memoryview, list]:
        """Room for an output: in the client's region ``dest`` (``[key, offset, byte_size, region_id]``)
        when the request asked for one, else in this worker's arena. Returns the buffer and the
        output's ``loc`` (its shape still to be filled in)."""
        if dest is not None and len(dest) > 4 and dest[2] != nbytes:
            dest = None  # not what the chained next step expects: here, and the front runs it the usual way
        if dest is not None:
            key, offset, capacity, region_id = dest[:4]
            if nbytes > capacity:
                raise TensorError(
                    f"shared memory size specified with the request for output '{name}' ({capacity} bytes) "
                    f"should be at least {nbytes} bytes to hold the results", "INVALID_ARG")  # Triton: 500
            region = self.region(key, region_id, offset + nbytes)
            if offset + nbytes > min(region.size, region.current_size()):  # a client may have shrunk it since
                raise TensorError(f"shared memory region '{key}' is smaller than the output '{name}' it should "
                                  "hold", "INVALID_ARG")
            return region.buf, [name, datatype, None, key, offset, nbytes, region_id]
        if not nbytes:
            return memoryview(b""), [name, datatype, None, "", 0, 0, 0]
        key, offset = self.arena.alloc(nbytes)
        return self.arena.buffer(key), [name, datatype, None, key, offset, nbytes, 0]

    def _output_buffer(self, request: Request, name: str, datatype: str, shape: list[int]) -> np.ndarray:
        """Request.output_buffer: an output's final place, handed to the backend to write into."""
        dtype = dtypes.NUMPY.get(datatype)
        if dtype is None or datatype == "BYTES":
            raise BackendError(f"no output buffer for output '{name}' of datatype {datatype}", "INVALID_ARG")
        old = request._placed.pop(name, None)
        if old is not None:
            self._free_locs([old[1]])
        nbytes = dtypes.element_count(shape) * dtype.itemsize
        buf, loc = self._place(name, datatype, nbytes, request._dests.get(name))
        loc[2] = shape
        array = np.ndarray(shape, dtype, buffer=buf, offset=loc[4]) if nbytes else np.empty(shape, dtype)
        request._placed[name] = (array, loc)
        return array

    def output_loc(self, name: str, value: Any, dest: list | None) -> list:
        """Copy an output into shared memory (``dest``: a client region the request asked for); return its
        ``loc``. ``value`` is a numpy array or a device tensor (copied from the device in place)."""
        if not isinstance(value, np.ndarray):
            if gpu.on_device(value):
                dtype, shape = gpu.describe(value)
                datatype = dtypes.from_numpy(dtype)
                if datatype is None:
                    raise TensorError(f"output '{name}' has an unsupported datatype {dtype}", "INTERNAL")
                nbytes = dtypes.element_count(shape) * dtype.itemsize
                buf, loc = self._place(name, datatype, nbytes, dest)
                loc[2] = list(shape)
                if nbytes:
                    gpu.copy_to_host(value, np.ndarray(shape, dtype, buffer=buf, offset=loc[4]))
                return loc
            value = gpu.as_host_array(value)
        datatype = dtypes.from_numpy(value.dtype)
        if datatype is None:
            raise TensorError(f"output '{name}' has an unsupported datatype {value.dtype}", "INTERNAL")
        if datatype == "BYTES":
            data = dtypes.serialize_bytes(value)
            nbytes = len(data)
        else:
            data = None
            nbytes = value.nbytes
        buf, loc = self._place(name, datatype, nbytes, dest)
        loc[2] = list(value.shape)
        offset = loc[4]
        if data is not None:
            if nbytes:  # (an empty BYTES tensor's place is a read-only empty view: nothing to write)
                buf[offset : offset + nbytes] = data
        elif nbytes:
            _copy_into(buf, offset, value)
        return loc

    def close(self) -> None:
        gpu.unpin_all()
        self.arena.close()
        for region in self._regions.values():
            region.close()
        if self._board_region is not None:
            self.board = None
            self._board_region.close()
        self.inbox.close()
        self.outbox.close()


def place(policy: dict) -> None:
    """Apply a host policy (kernel.host_policy) to this process: the cores it runs on and the NUMA node its
    memory comes from. A kernel without NUMA support has no node to bind: the setting is then moot."""
    cores = policy.get("cpu_cores")
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except OSError as e:
            raise BackendError(f"Unable to set NUMA thread affinity: {e.strerror}", "INTERNAL") from None
    node = policy.get("numa_node")
    if node is not None:
        import ctypes
        import errno

        number = {"x86_64": 238, "aarch64": 237}.get(os.uname().machine)  # set_mempolicy(2)
        if number is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        mask = ctypes.c_ulong(1 << node)
        if libc.syscall(number, 2, ctypes.byref(mask), ctypes.c_ulong(node + 2)) != 0:  # MPOL_BIND
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise BackendError(f"Unable to set NUMA memory policy: {os.strerror(err)}", "INTERNAL")


def _copy_into(buf: memoryview, offset: int, value: np.ndarray) -> None:
    """``value``'s bytes into ``buf`` at ``offset``: a plain memcpy where the array is contiguous (numpy's
    copyto costs 2.6 µs for a small tensor against 0.8, and a third more for a 675 KiB image)."""
    if value.flags.c_contiguous:
        try:
            buf[offset : offset + value.nbytes] = memoryview(value).cast("B")
            return
        except (TypeError, ValueError, BufferError):  # a dtype the buffer protocol cannot describe (bfloat16)
            pass
    np.copyto(np.ndarray(value.shape, value.dtype, buffer=buf, offset=offset), value, casting="no")


def _filled(spec: dict, result: dict | None) -> bool:
    """Whether a chained step's outputs filled the blocks the next step reads, with the shapes and
    datatypes it was promised (``shm`` destinations of six fields: kernel.model.ModelVersion.dispatch)."""
    if not result or "out" not in result:
        return False
    placed = {loc[0]: loc for loc in result["out"]}
    for name, dest in spec.get("shm", {}).items():
        if len(dest) > 4:
            loc = placed.get(name)
            if loc is None or loc[3] != dest[0] or loc[4] != dest[1] or loc[5] != dest[2] or loc[2] != dest[4] \
                    or loc[1] != dest[5]:
                return False
    return True


def _error(message: str, code: str = "INTERNAL", failed: bool = True) -> dict:
    """A request's error; ``failed`` is False for an error response the model chose to send."""
    result: dict = {"err": [message, code]}
    if failed:
        result["fail"] = True
    return result


def _check_responses(responses: Any, count: int) -> str | None:
    if not isinstance(responses, (list, tuple)):
        return ("Failed to process the request(s): expected a list of InferenceResponse objects "
                f"from execute, got {type(responses).__name__}")
    if len(responses) != count:
        return ("Number of InferenceResponse objects do not match number of InferenceRequest objects. "
                f"InferenceRequest(s) size is:{count}, and InferenceResponse(s) size is:{len(responses)}\n")
    return None


def _same_memory(placed: np.ndarray, value: Any) -> bool:
    """Whether ``value`` is the output buffer handed out (the backend wrote the output in place)."""
    if value is placed:
        return True
    return (isinstance(value, np.ndarray) and value.shape == placed.shape and value.dtype == placed.dtype
            and value.__array_interface__["data"][0] == placed.__array_interface__["data"][0])


_OWN = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def describe(e: BaseException) -> str:
    """An exception as Triton's python backend reports it: type, message, model frames."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_OWN) and not f.filename.startswith("<frozen")]
    where = "".join(f"  {f.filename}({f.lineno}): {f.name}\n" for f in reversed(frames))
    return f"{type(e).__name__}: {e}\n\nAt:\n{where}"


def _on_term(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the front dies, so a killed front leaves no worker behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker still notices within a second (serve() polls getppid)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front owns Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _on_term)
    _die_with_parent()
    if spec.get("verbose"):
        os.environ["EDGE_KERNEL_LOG_VERBOSE"] = "1"
    worker = Worker(spec)
    profile_dir = os.environ.get("EDGE_KERNEL_WORKER_PROFILE")  # a folder: cProfile of each worker there
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        worker.serve()
    except SystemExit:
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"worker-{spec.get('instance', '')}-{os.getpid()}.prof"))
        worker.close()
    return 0


