"""The in-process API: the whole server inside an application, without sockets.

A camera loop or a robot controller embeds the repository, the scheduler, the
worker processes and the shared memory, and calls models directly::

    from kernel.api import Server

    with Server(model_repository="models") as server:
        add_sub = server.model("add_sub")
        result = add_sub.infer({"INPUT0": a, "INPUT1": b})
        print(result["OUTPUT0"])

    async with Server(model_repository="models") as server:   # on the caller's event loop
        result = await server.model("add_sub").async_infer({"INPUT0": a, "INPUT1": b})

Used as a plain context manager the server runs its event loop in a background
thread and every method may be called from any thread; used as an async
context manager it runs on the caller's loop, where the ``async_`` methods are
the ones to call (the blocking ones still work from other threads). The HTTP
and gRPC endpoints of ``kernel start`` are served from this same object.

Outputs are numpy views on the worker's shared memory, not copies: they stay
valid while the result or any array taken from it is alive, or until
``result.release()``. :meth:`Model.input_buffer` gives an input array in shared
memory that the caller fills in place, so the bytes are never copied either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np

from kernel.errors import ServerError
from kernel.server import Core, default_repository
from kernel.types import ArenaRef, InferRequest, InferResponse, InputTensor, RequestedOutput
from shm import dtypes

__all__ = ["InferResult", "Model", "Server", "ServerError"]


class _Lease:
    """Keeps a response's shared memory until the last array taken from it is gone."""

    __slots__ = ("_release", "__weakref__")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self.release()


class LeasedArray(np.ndarray):
    """An output array on shared memory; it (and its views) keep the memory leased."""

    _lease: _Lease | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._lease = getattr(obj, "_lease", None)


class InferResult(Mapping):
    """The outputs of one inference, by name, as numpy arrays on shared memory."""

    def __init__(self, response: InferResponse, release: Callable[[], None]) -> None:
        self.model_name = response.model_name
        self.model_version = response.model_version
        self.id = response.id
        self.parameters = dict(response.parameters)
        self._lease = _Lease(release)
        self._arrays: dict[str, np.ndarray] = {}
        for out in response.outputs:
            if out.data is not None and out.shm is None and out.datatype != "BYTES":  # on the arena: leased
                array = LeasedArray(out.shape, dtypes.NUMPY[out.datatype], buffer=out.data)
                array._lease = self._lease
            else:
                array = out.as_numpy()
            self._arrays[out.name] = array

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def as_numpy(self, name: str) -> np.ndarray | None:
        """tritonclient's accessor: the output, or None if it was not returned."""
        return self._arrays.get(name)

    def copy(self) -> dict[str, np.ndarray]:
        """The outputs as arrays the caller owns (then :meth:`release` frees the shared memory)."""
        return {k: np.array(v) for k, v in self._arrays.items()}

    def release(self) -> None:
        """Give the shared memory back now; arrays taken from this result become invalid."""
        self._lease.release()

    def __enter__(self) -> InferResult:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"InferResult({self.model_name!r}, {list(self._arrays)})"


class _Responses:
    """The responses of one decoupled request, handed from the server's loop to one consumer.

    ``deliver`` and ``close`` run on the server's loop. Once the consumer stops (done or early),
    ``close`` releases the responses still queued, and ``deliver`` every one that arrives later.
    """

    def __init__(self, queue: SimpleQueue | asyncio.Queue) -> None:
        self.queue = queue
        self.closed = False

    def deliver(self, response: Any, final: bool) -> None:
        if self.closed:
            if isinstance(response, InferResponse):
                response.release()
        else:
            self.queue.put_nowait((response, final))

    def close(self) -> None:
        self.closed = True
        while not self.queue.empty():
            response, _ = self.queue.get_nowait()
            if isinstance(response, InferResponse):
                response.release()

    @staticmethod
    def take(server: Server, item: tuple[Any, bool]) -> tuple[InferResult | None, bool]:
        """A queued ``(response, final)`` as ``(result, final)``; an error raises."""
        response, final = item
        if isinstance(response, ServerError):
            raise response
        return (server._result(response) if response is not None else None), final


class Model:
    """A handle on one model (a given version, or the latest ready one)."""

    def __init__(self, server: Server, name: str, version: str = "") -> None:
        self._server = server
        self.name = name
        self.version = version

    def __repr__(self) -> str:
        return f"Model({self.name!r}, version={self.version or 'latest'!r})"

    def metadata(self) -> dict:
        """Triton's model metadata (name, versions, platform, inputs, outputs)."""
        return self._server._call(lambda core: core.model_metadata(self.name, self.version))

    def config(self) -> dict:
        """The model configuration, as Triton's JSON."""
        return self._server._call(lambda core: core.model_config(self.name, self.version))

    def ready(self) -> bool:
        return self._server._call(lambda core: core.model_ready(self.name, self.version))

    def statistics(self) -> dict:
        return self._server._call(lambda core: core.statistics(self.name, self.version))

    # -- inference ------------------------------------------------------
    def infer(self, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
              parameters: dict | None = None, *, request_id: str = "", priority: int = 0,
              timeout_us: int = 0, sequence_id: int | str = 0, sequence_start: bool = False,
              sequence_end: bool = False, classification: Mapping[str, int] | None = None) -> InferResult:
        """Run one inference and wait for it (from any thread but the server's loop). ``sequence_*``: a
        request of a sequence (a stateful model's: kernel.scheduling.sequence), as tritonclient's arguments."""
        request = self._request(inputs, outputs, parameters, request_id, priority, timeout_us,
                                (sequence_id, sequence_start, sequence_end), classification)
        response = self._server._wait(lambda core: core.accept(request))
        return self._server._result(response)

    async def async_infer(self, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
                          parameters: dict | None = None, *, request_id: str = "", priority: int = 0,
                          timeout_us: int = 0, sequence_id: int | str = 0, sequence_start: bool = False,
                          sequence_end: bool = False, classification: Mapping[str, int] | None = None) -> InferResult:
        """Run one inference from a coroutine (on the server's loop or any other)."""
        request = self._request(inputs, outputs, parameters, request_id, priority, timeout_us,
                                (sequence_id, sequence_start, sequence_end), classification)
        server = self._server
        if server._on_loop():
            response = await server._core.accept(request)
        else:
            response = await asyncio.wrap_future(server._submit_threadsafe(lambda core: core.accept(request)))
        return server._result(response)

    def stream(self, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
               parameters: dict | None = None, *, request_id: str = "",
               classification: Mapping[str, int] | None = None) -> Iterator[InferResult]:
        """The responses of a decoupled model (zero or more), as they come; errors raise."""
        request = self._request(inputs, outputs, parameters, request_id, 0, 0, classification=classification)
        server = self._server
        responses = _Responses(SimpleQueue())
        server._call(lambda core: core.stream(request, responses.deliver))
        try:
            while True:
                result, final = responses.take(server, responses.queue.get())
                if result is not None:
                    yield result
                if final:
                    return
        finally:
            server._soon(responses.close)  # responses still queued or to come go back as they arrive

    async def async_stream(self, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
                           parameters: dict | None = None, *, request_id: str = "",
                           classification: Mapping[str, int] | None = None) -> AsyncIterator[InferResult]:
        """``stream`` for coroutines on the server's loop."""
        request = self._request(inputs, outputs, parameters, request_id, 0, 0, classification=classification)
        server = self._server
        responses = _Responses(asyncio.Queue())
        server._core.stream(request, responses.deliver)
        try:
            while True:
                result, final = responses.take(server, await responses.queue.get())
                if result is not None:
                    yield result
                if final:
                    return
        finally:
            responses.close()

    def input_buffer(self, name: str, shape: list[int] | tuple[int, ...] | None = None) -> np.ndarray:
        """A zeroed array for input ``name`` in shared memory, to fill in place and pass to infer().

        Passing it (or a contiguous view of it) as the input costs no copy: the worker reads
        it where it lies. ``shape`` is needed where the input has variable dimensions.
        """
        meta = self.metadata()
        spec = next((t for t in meta["inputs"] if t["name"] == name), None)
        if spec is None:
            raise ServerError(f"unexpected inference input '{name}' for model '{self.name}'", "INVALID_ARG")
        shape = list(shape) if shape is not None else list(spec["shape"])
        if any(d < 0 for d in shape):
            raise ServerError(f"input '{name}' of model '{self.name}' has variable dimensions "
                              f"{spec['shape']}: give input_buffer a shape", "INVALID_ARG")
        size = dtypes.SIZE.get(spec["datatype"])
        if size is None:
            raise ServerError("BYTES inputs have no fixed-size buffer", "INVALID_ARG")
        return self._server._arena_array(dtypes.NUMPY[spec["datatype"]], shape)

    def _request(self, inputs: Mapping[str, np.ndarray], outputs: list[str] | None, parameters: dict | None,
                 request_id: str, priority: int, timeout_us: int, sequence: tuple = (0, False, False),
                 classification: Mapping[str, int] | None = None) -> InferRequest:
        """The core's request. ``classification`` ({output: k}, Triton's extension: kernel.classification)
        answers those outputs as their top k labels; they are requested in addition to ``outputs``."""
        params = dict(parameters or {})
        sequence_id, start, end = sequence
        if sequence_id:
            params["sequence_id"] = sequence_id
            if start:
                params["sequence_start"] = True
            if end:
                params["sequence_end"] = True
        if priority:
            params["priority"] = priority
        if timeout_us:
            params["timeout"] = timeout_us
        tensors = []
        for name, value in inputs.items():
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            datatype = dtypes.from_numpy(array.dtype)
            if datatype is None:
                raise ServerError(f"input '{name}' has an unsupported numpy dtype {array.dtype}", "INVALID_ARG")
            data: Any = _arena_ref(array) or (array if array.dtype.kind in "OSU" else np.ascontiguousarray(array))
            tensors.append(InputTensor(name, datatype, list(array.shape), data))
        requested = [RequestedOutput(n) for n in outputs] if outputs else None
        request = InferRequest(self.name, self.version, request_id, tensors, requested, params)
        if classification:
            request.classification = {}
            for name, k in classification.items():
                if type(k) is not int or k < 1:
                    raise ServerError("invalid value for 'classification' parameter, expected >= 0", "INVALID_ARG")
                request.classification[name] = k & 0xFFFFFFFF
                if requested is not None and all(o.name != name for o in requested):
                    requested.append(RequestedOutput(name, parameters={"classification": k}))
        return request


class _ArenaBlock:
    """An arena allocation handed to the caller; freed when its array is garbage."""

    __slots__ = ("key", "offset", "nbytes", "address", "__weakref__")

    def __init__(self, key: str, offset: int, nbytes: int, address: int) -> None:
        self.key, self.offset, self.nbytes, self.address = key, offset, nbytes, address


class ArenaArray(np.ndarray):
    """An input array living in the server's shared-memory arena (see Model.input_buffer)."""

    _block: _ArenaBlock | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._block = getattr(obj, "_block", None)


def _arena_ref(array: np.ndarray) -> ArenaRef | None:
    """Where an arena-backed array (or a contiguous view of one) lies in shared memory."""
    block = getattr(array, "_block", None)
    if block is None:
        return None
    start = array.__dict__.get("_arena_start")  # an array's memory never moves: found once, not per request
    if start is None:
        start = -1
        if array.flags.c_contiguous:
            start = array.__array_interface__["data"][0] - block.address
            if start < 0 or start + array.nbytes > block.nbytes:
                start = -1
        array.__dict__["_arena_start"] = start
    if start < 0:
        return None
    return ArenaRef(block.key, block.offset + start, array.nbytes, array)


def _load_args(config: dict | None, files: dict[str, bytes] | None) -> tuple[str | None, dict[str, bytes] | None]:
    """A load's config as the load extension's JSON text, and its files under the extension's ``file:`` keys."""
    text = json.dumps(config) if config is not None else None
    if not files:
        return text, None
    return text, {key if key.startswith("file:") else f"file:{key}": bytes(data) for key, data in files.items()}


class Server:
    """The server in this process: use it as a context manager (sync or async)."""

    def __init__(self, model_repository: str | Path | list[str | Path] | None = None, *,
                 strict_model_config: bool = False, model_control_mode: str = "none",
                 load_models: list[str] | None = None, log_verbose: int = 0,
                 backend_config: dict[str, dict[str, str]] | None = None, strict_readiness: bool = True,
                 exit_timeout: float = 30.0, backend_directory: str | list[str] | None = None,
                 host_policy: dict[str, dict[str, str]] | None = None,
                 trace_config: dict[str, Any] | None = None, response_cache_size: int = 0,
                 repository_poll_secs: float = 15, model_config_name: str = "", model_load_thread_count: int = 0,
                 model_load_retry_count: int = 0, server_id: str = "triton") -> None:
        repos = model_repository if isinstance(model_repository, list) else \
            [model_repository] if model_repository is not None else [default_repository()]
        self._core = Core([str(r) for r in repos], strict_model_config=strict_model_config,
                          model_control_mode=model_control_mode, load_models=load_models,
                          log_verbose=log_verbose, backend_config=backend_config,
                          backend_directories=[backend_directory] if isinstance(backend_directory, str)
                          else backend_directory, strict_readiness=strict_readiness, exit_timeout=exit_timeout,
                          host_policies=host_policy, trace_config=trace_config,
                          response_cache_size=response_cache_size, repository_poll_secs=repository_poll_secs,
                          model_config_name=model_config_name, model_load_thread_count=model_load_thread_count,
                          model_load_retry_count=model_load_retry_count, server_id=server_id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the thread running _loop
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def core(self) -> Core:
        """The core every front end uses (HTTP, gRPC and this API)."""
        return self._core

    # -- lifetime -------------------------------------------------------
    def start(self) -> Server:
        """Start on a background event-loop thread; return once the models are loaded."""
        if self._loop is not None:
            raise RuntimeError("server already started")
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="edge-kernel", daemon=True)
        self._thread.start()
        started.result()
        return self

    def _run(self, started: concurrent.futures.Future) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop, self._loop_thread = loop, threading.get_ident()

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                await self._core.start()
            except BaseException as e:
                await self._core.stop()
                started.set_exception(e)
                return
            started.set_result(None)
            await self._stopped.wait()
            await self._core.stop()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def stop(self) -> None:
        """Unload every model, end the workers and remove all shared memory."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        self._thread = None
        self._loop = None

    async def start_async(self) -> Server:
        """Start on the running event loop (the caller's)."""
        if self._loop is not None:
            raise RuntimeError("server already started")
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        try:
            await self._core.start()
        except BaseException:
            await self._core.stop()
            self._loop = None
            raise
        return self

    async def stop_async(self, timeout: float | None = None) -> None:
        """Stop a server started with :meth:`start_async`; ``timeout`` bounds the wait for requests in
        flight (default: the server's ``exit_timeout``)."""
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.stop)
            return
        await self._core.stop(timeout)
        self._loop = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def __aenter__(self) -> Server:
        return await self.start_async()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop_async()

    # -- server-wide ----------------------------------------------------
    def live(self) -> bool:
        return self._loop is not None

    def ready(self) -> bool:
        return self._call(lambda core: core.ready())

    def metadata(self) -> dict:
        return self._call(lambda core: core.metadata())

    def models(self) -> list[dict]:
        """The repository index: every model with the state of its versions."""
        return self._call(lambda core: core.repository_index())

    def model(self, name: str, version: str | int | None = None) -> Model:
        """A handle on a model; errors (unknown model...) are raised when it is used."""
        return Model(self, name, "" if version is None else str(version))

    def load(self, name: str, config: dict | None = None, files: dict[str, bytes] | None = None) -> None:
        """Load or reload a model (explicit model control mode); ``config`` overrides config.pbtxt.

        ``files`` (``{"1/model.py": content}``: paths in the model's directory, with ``config``) are the model's
        whole directory, as the load extension's ``file:`` parameters are: the model loads from them instead
        of its repository (or is new), from a private temporary directory removed when it unloads."""
        text, sent = _load_args(config, files)
        self._wait(lambda core: asyncio.ensure_future(core.load_model(name, text, sent)))

    def unload(self, name: str) -> None:
        self._wait(lambda core: asyncio.ensure_future(core.unload_model(name)))

    async def async_load(self, name: str, config: dict | None = None, files: dict[str, bytes] | None = None) -> None:
        await self._core.load_model(name, *_load_args(config, files))

    async def async_unload(self, name: str) -> None:
        await self._core.unload_model(name)

    def statistics(self) -> dict:
        return self._call(lambda core: core.statistics())

    # -- plumbing -------------------------------------------------------
    def _on_loop(self) -> bool:
        """Whether the caller runs on the server's loop thread (a thread runs one loop at a time): compared by
        thread, as asyncio.get_running_loop() costs a getpid() system call on CPython < 3.12, twice a request."""
        return self._loop_thread == threading.get_ident() and self._loop is not None

    def _check(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not running: use it as a context manager or call start()")
        return self._loop

    def _call(self, fn: Callable[[Core], Any]) -> Any:
        """Run ``fn(core)`` on the server's loop and return its result."""
        loop = self._check()
        if self._on_loop():
            return fn(self._core)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(self._core))
            except BaseException as e:
                future.set_exception(e)

        loop.call_soon_threadsafe(run)
        return future.result()

    def _submit_threadsafe(self, fn: Callable[[Core], asyncio.Future]) -> concurrent.futures.Future:
        """Start ``fn(core)`` (which returns an asyncio future) on the loop; a thread-safe future."""
        loop = self._check()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def settle(inner: asyncio.Future) -> None:
            if future.cancelled():  # the caller gave up: give the response's shared memory back
                if not inner.cancelled() and inner.exception() is None and isinstance(inner.result(), InferResponse):
                    inner.result().release()
            elif inner.cancelled():
                future.cancel()
            elif inner.exception() is not None:
                future.set_exception(inner.exception())
            else:
                future.set_result(inner.result())

        def run() -> None:
            try:
                inner = fn(self._core)
            except BaseException as e:
                future.set_exception(e)
                return
            inner.add_done_callback(settle)
            future.add_done_callback(lambda f: f.cancelled() and _soon_threadsafe(loop, inner.cancel))

        loop.call_soon_threadsafe(run)
        return future

    def _wait(self, fn: Callable[[Core], asyncio.Future]) -> Any:
        if self._on_loop():
            raise RuntimeError("blocking call on the server's own event loop: use the async_ methods there")
        return self._submit_threadsafe(fn).result()

    def _soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the server's loop: at once when called there, else when the loop gets to it
        (dropped once the loop is closed: the shared memory went with it)."""
        loop = self._loop
        if self._on_loop():
            fn()
        elif loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    def _result(self, response: InferResponse) -> InferResult:
        return InferResult(response, partial(self._soon, response.release))

    def _arena_array(self, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

        def alloc(core: Core) -> tuple[str, int, memoryview]:
            key, offset = core.arena.alloc(nbytes)
            return key, offset, core.arena.view(key, offset, max(nbytes, 1))

        key, offset, view = self._call(alloc)
        array = np.frombuffer(view, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape).view(ArenaArray)
        array[...] = 0
        block = _ArenaBlock(key, offset, nbytes, array.__array_interface__["data"][0])
        array._block = block
        loop = self._loop
        core = self._core

        def free() -> None:
            if loop is not None and not loop.is_closed() and core.arena is not None:
                loop.call_soon_threadsafe(lambda: core.arena is not None and core.arena.free(key, offset))

        weakref.finalize(block, free)
        return array


def _soon_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> None:
    """``fn`` on ``loop`` from any thread (dropped once the loop is closed)."""
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:
        pass
