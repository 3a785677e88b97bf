"""Worker process main loop: ``python -m workers.runtime '<json spec>'``.

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


class TensorError(Exception):
    """A tensor could not be read from or written to shared memory."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


class Worker:
    """Shared-memory plumbing of one worker process, used by its backend."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.inbox = Ring(*spec["inbox"])
        self.outbox = Ring(*spec["outbox"])
        self.doorbell_fd: int = spec["doorbell_fd"]
        self.arena = Arena(f"w{os.getpid()}", spec.get("arena_size", 8 * MiB))
        self._regions: dict[str | int, Region] = {}
        self._forgotten: set[int] = set()
        self._send_lock = threading.Lock()
        self.backend: Any = None

    # -- messages -------------------------------------------------------
    def send(self, msg: dict) -> None:
        """Answer the front (thread-safe: decoupled models send from their threads)."""
        with self._send_lock:
            self.outbox.send(msg)
        ring_doorbell(self.doorbell_fd)

    def serve(self) -> None:
        parent = os.getppid()
        while True:
            try:
                msg = self.inbox.recv(timeout=1.0)
            except posix_ipc.BusyError:
                if os.getppid() != parent:
                    return  # the front is gone
                continue
            except posix_ipc.SignalError:
                continue
            kind = msg.get("t")
            try:
                if kind == "x":
                    self.backend.execute(msg)
                elif kind == "f":
                    for name, offset in msg["b"]:
                        self.arena.free(name, offset)
                elif kind == "u":
                    self.forget_region(msg["k"])
                elif kind == "load":
                    self._load(msg)
                elif kind == "init":
                    self.backend.initialize(msg)
                    self.send({"t": "ready"})
                elif kind == "stop":
                    if self.backend is not None:
                        self.backend.finalize()
                    self.send({"t": "stopped"})
                    return
                else:
                    self.send({"t": "error", "error": f"unknown message type {kind!r}"})
            except Exception as e:  # never die on one message
                text = str(e) if isinstance(e, TensorError) else describe(e)
                self.send({"t": "error", "id": msg.get("id"), "error": text})

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

        Mappings are cached; a client region is cached per registration, and one
        whose registration has ended is mapped afresh for the request at hand.
        """
        cache_key = region_id or key
        region = self._regions.get(cache_key)
        if region is not None:
            return region
        try:
            region = Region(key)
        except ShmError as e:
            raise TensorError(str(e), "INTERNAL") from e
        if region_id not in self._forgotten:
            self._regions[cache_key] = region
        return region

    def forget_region(self, region_id: int) -> None:
        """A client region was unregistered: drop its mapping."""
        self._forgotten.add(region_id)
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
            if offset + nbytes > region.size:
                raise TensorError(f"shared memory region '{key}' is smaller than the tensor it should hold")
            buf = region.buf[offset : offset + nbytes]
        if datatype == "BYTES":
            return dtypes.deserialize_bytes(buf, dtypes.element_count(shape)).reshape(shape)
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
                    f"should be at least {nbytes} bytes to hold the results")
            target = self.region(key, region_id).buf
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


def now_ns() -> int:
    return time.perf_counter_ns()


if __name__ == "__main__":
    sys.exit(main())
