"""Worker process main loop, started as ``python -m workers '<json spec>'``.

One worker runs one model instance. It receives msgpack messages from the
front on an inbox ring (sleeping in ``sem_wait`` while idle) and answers on an
outbox ring, ringing the front's doorbell after each answer.

Messages from the front (``t`` is the type):

* ``load``  -- import the backend's model and auto-complete its configuration;
* ``init``  -- initialise the instance with the final configuration;
* ``x``     -- execute a batch of requests; tensors are ``loc`` lists
  ``[name, datatype, shape, key, offset, byte_size, region_id]`` that point into
  shared memory (the front's arena when ``region_id`` is 0, else a client's
  registered region);
* ``f``     -- free blocks of this worker's output arena;
* ``u``     -- forget the mapping of a client region (its registration ended);
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
from typing import Any

import numpy as np
import posix_ipc

from protocol import dtypes
from shm.arena import Arena, MiB
from shm.doorbell import ring as ring_doorbell
from shm.region import Region, ShmError
from shm.ring import Ring

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
    """Shared-memory plumbing of one worker process, used by its backend."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.inbox = Ring(*spec["inbox"])
        self.outbox = Ring(*spec["outbox"])
        self.doorbell_fd: int = spec["doorbell_fd"]
        self.arena = Arena(f"w{os.getpid()}", spec.get("arena_size", 8 * MiB))
        self._regions: dict[str | int, Region] = {}
        self._forgotten: dict[int, None] = {}  # recently ended registrations, oldest first (bounded)
        self._send_lock = threading.Lock()
        self.backend: Any = None

    # -- messages -------------------------------------------------------
    def send(self, msg: dict) -> None:
        """Answer the front (thread-safe: decoupled models send from their threads)."""
        with self._send_lock:
            self.outbox.send(msg)
        ring_doorbell(self.doorbell_fd)

    def _next(self, spin_ns: int) -> Any:
        """The next message; polls for ``spin_ns`` before sleeping in sem_wait (1 s at a time)."""
        if spin_ns:
            inbox, clock = self.inbox, time.perf_counter_ns
            deadline = clock() + spin_ns
            while clock() < deadline:
                msg = inbox.try_recv()
                if msg is not None:
                    return msg
        return self.inbox.recv(timeout=1.0)

    def serve(self) -> None:
        parent = os.getppid()
        spin_ns = int(self.spec.get("spin_us", 0)) * 1000
        while True:
            try:
                msg = self._next(spin_ns)
            except posix_ipc.BusyError:
                if os.getppid() != parent:
                    return  # the front is gone
                continue
            except posix_ipc.SignalError:
                continue
            kind = msg.get("t")
            try:
                if kind == "x":
                    self._free(msg.get("f"))
                    self.backend.execute(msg)
                elif kind == "f":
                    self._free(msg["b"])
                elif kind == "u":
                    self.forget_region(msg["k"])
                elif kind == "load":
                    self._load(msg)
                elif kind == "init":
                    self.backend.initialize(msg)
                    self.send({"t": "ready"})
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
                text = str(e) if isinstance(e, TensorError) else describe(e)
                self.send({"t": "error", "id": msg.get("id"), "error": text})

    def _free(self, blocks: list | None) -> None:
        """Free output blocks the front is done with (unknown ones are logged, never answered)."""
        for name, offset in blocks or ():
            try:
                self.arena.free(name, offset)
            except KeyError:
                sys.stderr.write(f"worker: asked to free an unknown block {name}:{offset}\n")

    def _load(self, msg: dict) -> None:
        backend = msg.get("backend", "python")
        if backend != "python":
            raise ValueError(f"unable to find backend '{backend}'")
        from workers.python_backend import PythonBackend

        self.backend = PythonBackend(self)
        config = self.backend.load(msg)
        self.send({"t": "loaded", "config": config})

    # -- tensors --------------------------------------------------------
    def region(self, key: str, region_id: int) -> Region:
        """The mapping of ``key``: an arena segment (``region_id`` 0) or a client region.

        Mappings are cached: arena segments by key, client regions per
        registration (a re-registration of the same key is a new ``region_id``,
        so it is mapped afresh and never served from an older mapping). A
        registration that already ended is mapped for the request at hand only.
        """
        cache_key = region_id or key
        region = self._regions.get(cache_key)
        if region is not None:
            return region
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
            region.close()

    def input_array(self, loc: list) -> np.ndarray:
        """A numpy view (copy for BYTES) of an input ``loc``."""
        _name, datatype, shape, key, offset, nbytes, region_id = loc
        if not key:
            buf = memoryview(b"")
        else:
            region = self.region(key, region_id)
            # A client may have shrunk its object since: touching pages past its end would SIGBUS.
            if offset + nbytes > (region.current_size() if region_id else region.size):
                raise TensorError(f"shared memory region '{key}' is smaller than the tensor it should hold")
            buf = region.buf[offset : offset + nbytes]
        if datatype == "BYTES":
            count = dtypes.element_count(shape)
            try:
                return dtypes.deserialize_bytes(buf, count).reshape(shape)
            except ValueError:
                raise BytesCountError(_name, count, dtypes.count_bytes_elements(buf)) from None
        array = np.frombuffer(buf, dtype=dtypes.NUMPY[datatype]).reshape(shape)
        if region_id:
            array.flags.writeable = False  # the client's bytes: never written by a model
        return array

    def output_loc(self, name: str, array: np.ndarray, datatype: str, dest: list | None) -> list:
        """Place an output in shared memory; return its ``loc``.

        ``dest`` is ``[key, offset, byte_size, region_id]`` of a client region
        the request asked for, else the output goes to this worker's arena.
        """
        shape = list(array.shape)
        if datatype == "BYTES":
            data = dtypes.serialize_bytes(array)
            nbytes = len(data)
        else:
            data = None
            nbytes = array.nbytes
        if dest is not None:
            key, offset, capacity, region_id = dest
            if nbytes > capacity:
                raise TensorError(
                    f"shared memory size specified with the request for output '{name}' ({capacity} bytes) "
                    f"should be at least {nbytes} bytes to hold the results", "INTERNAL")
            region = self.region(key, region_id)
            if offset + nbytes > region.current_size():  # a client may have shrunk its object since
                raise TensorError(f"shared memory region '{key}' is smaller than the output '{name}' it should "
                                  "hold", "INTERNAL")
            target = region.buf
        elif nbytes:
            key, offset = self.arena.alloc(nbytes)
            region_id = 0
            target = self.arena.buffer(key)
        else:
            return [name, datatype, shape, "", 0, 0, 0]
        if data is not None:
            target[offset : offset + nbytes] = data
        elif nbytes:
            np.copyto(np.ndarray(array.shape, array.dtype, buffer=target, offset=offset), array, casting="no")
        return [name, datatype, shape, key, offset, nbytes, region_id]

    def close(self) -> None:
        self.arena.close()
        for region in self._regions.values():
            region.close()
        self.inbox.close()
        self.outbox.close()


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
    try:
        worker.serve()
    except SystemExit:
        pass
    finally:
        worker.close()
    return 0


