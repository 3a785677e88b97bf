"""Triton's ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on :mod:`protocol.grpc.server`.

A thin layer over :class:`kernel.server.Core`, like the HTTP endpoint, on the
same event loop. Errors carry Triton's message text and status code; a bug in
a handler costs one call (INTERNAL), never the server. Each RPC belongs to one
of Triton's restricted-protocol categories (``--grpc-restricted-protocol``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from kernel import logs, tracing
from kernel.errors import CUDA_SHM_UNSUPPORTED, ServerError, invalid
from kernel.restricted import forward_headers, grpc_message
from kernel.server import Core
from kernel.types import InferRequest, InferResponse
from protocol import grpc_service_pb2 as pb
from protocol import health_pb2
from protocol.grpc import v2grpc
from protocol.grpc.server import UNIMPLEMENTED, Call, Deferred, GrpcError, GrpcServer, Method

log = logging.getLogger("kernel.grpc")

_SERVICE = "/inference.GRPCInferenceService/"
#: RPC -> (request type, Triton's restricted category), as Triton's gRPC server registers them.
RPCS: dict[str, tuple[Any, str]] = {
    "ServerLive": (pb.ServerLiveRequest, "health"),
    "ServerReady": (pb.ServerReadyRequest, "health"),
    "ModelReady": (pb.ModelReadyRequest, "health"),
    "ServerMetadata": (pb.ServerMetadataRequest, "metadata"),
    "ModelMetadata": (pb.ModelMetadataRequest, "metadata"),
    "ModelInfer": (pb.ModelInferRequest, "inference"),
    "ModelStreamInfer": (pb.ModelInferRequest, "inference"),
    "ModelConfig": (pb.ModelConfigRequest, "model-config"),
    "ModelStatistics": (pb.ModelStatisticsRequest, "statistics"),
    "RepositoryIndex": (pb.RepositoryIndexRequest, "model-repository"),
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, "model-repository"),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, "model-repository"),
    "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, "shared-memory"),
    "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest, "shared-memory"),
    "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest, "shared-memory"),
    "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, "shared-memory"),
    "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest, "shared-memory"),
    "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest, "shared-memory"),
    "TraceSetting": (pb.TraceSettingRequest, "trace"),
    "LogSettings": (pb.LogSettingsRequest, "logging"),
}


def _no_repository_name() -> ServerError:
    return ServerError("'repository_name' specification is not supported", "UNSUPPORTED")


def _grpc_error(error: ServerError) -> GrpcError:
    return GrpcError(error.grpc_status, error.message)


def _internal(e: Exception, what: str) -> ServerError:
    log.exception("unhandled error in %s", what)
    return ServerError(f"internal error: {type(e).__name__}: {e}", "INTERNAL")


Unary = Callable[[Any, Any], Awaitable[Any]]


def _unary(fn: Unary) -> Callable[[Any, Any, Call], Awaitable[Any]]:
    """Wrap ``fn(self, request) -> reply`` as a unary handler with Triton's error mapping."""

    @functools.wraps(fn)
    async def handler(self: Any, request: Any, call: Call) -> Any:
        try:
            return await fn(self, request)
        except ServerError as e:
            raise _grpc_error(e) from None
        except (GrpcError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug must cost one call, not the server
            raise _grpc_error(_internal(e, fn.__name__)) from None

    return handler


def _infer_reply(future: asyncio.Future) -> bytes:
    """A ModelInferResponse's bytes from a finished request (its response released), or its GrpcError."""
    try:
        response = future.result()
        try:
            return v2grpc.encode_infer_response(response)
        finally:
            response.release()
    except ServerError as e:
        raise _grpc_error(e) from None
    except Exception as e:
        raise _grpc_error(_internal(e, "ModelInfer")) from None


def _traced_reply(trace: Any, future: asyncio.Future) -> bytes:
    """``_infer_reply`` of a traced request: GRPC_SEND_START now, GRPC_SEND_END once the reply is written
    (the connection writes it as soon as this returns)."""
    trace.stamp("GRPC_SEND_START")
    try:
        return _infer_reply(future)
    finally:
        asyncio.get_running_loop().call_soon(_traced_sent, trace)


def _traced_sent(trace: Any) -> None:
    trace.stamp("GRPC_SEND_END")
    trace.finish()


class InferenceService:
    """The RPCs of Triton's ``grpc_service.proto``."""

    def __init__(self, core: Core) -> None:
        self.core = core

    # -- health and metadata --------------------------------------------
    @_unary
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live())

    @_unary
    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready())

    @_unary
    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    @_unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        meta = self.core.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @_unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        meta = self.core.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    @_unary
    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        reply = pb.ModelConfigResponse()
        reply.config.CopyFrom(self.core.version(request.name, request.version).config)
        return reply

    @_unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        return json_format.ParseDict(self.core.statistics(request.name, request.version),
                                     pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    # -- inference ------------------------------------------------------
    def ModelInfer(self, decoded: v2grpc.InferMessage, call: Call) -> Deferred:
        """Queue the request now; the reply is encoded when its future is done (no task per call)."""
        try:
            mv = self._wake(decoded)
            request = v2grpc.parse_request(decoded, self.core.shm)
            if self.core.grpc_forward is not None:
                forward_headers(self.core.grpc_forward, call.headers, request)
            if self.core.tracer.on:
                return self._traced(request, call, mv)
            return Deferred(self.core.submit(request, mv), _infer_reply)
        except ServerError as e:
            raise _grpc_error(e) from None
        except Exception as e:
            raise _grpc_error(_internal(e, "ModelInfer")) from None

    def _wake(self, decoded: v2grpc.InferMessage) -> Any:
        """The model's version, its worker woken while the request is parsed (ModelVersion.wake); None
        for a model that cannot serve (submit then fails the request with the reason)."""
        try:
            mv = self.core.version(decoded.model_name, decoded.model_version)
        except ServerError:
            return None
        mv.wake()
        return mv

    def _traced(self, request: InferRequest, call: Call, mv: Any) -> Deferred:
        """ModelInfer while tracing is on: the request may be sampled (kernel.tracing)."""
        trace = self.core.tracer.sample(request.model_name, header=call.metadata)  # (a traceparent)
        if trace is None:
            return Deferred(self.core.submit(request, mv), _infer_reply)
        trace.stamp("GRPC_WAITREAD_START", call.born)
        trace.stamp("GRPC_WAITREAD_END")
        request.trace = trace
        return Deferred(self.core.submit(request, mv), functools.partial(_traced_reply, trace))

    async def ModelStreamInfer(self, stream: Call) -> None:
        """Requests in, responses out (_StreamOut): an ordinary model's in request order (Triton's order), a
        decoupled model's as they come, so that they never wait behind an ordinary request still running. A
        bad request gets an error response and the stream stays open."""
        out = _StreamOut(stream)
        inflight: set[asyncio.Future] = set()
        writer = asyncio.ensure_future(out.write())
        # Requests are started as their messages are read (Connection._deliver); recv() below takes those
        # that came before this line, and the end of the stream.
        stream.on_message = lambda decoded: self._stream_request(decoded, out, inflight)
        try:
            while (decoded := await stream.recv()) is not None:
                self._stream_request(decoded, out, inflight)
            if inflight:
                await asyncio.wait(list(inflight))
            out.queue.put_nowait(None)
            await writer
        finally:
            for done in list(inflight):  # the client cancelled the stream: so are its requests
                done.cancel()
            if not writer.done():
                writer.cancel()
            elif not writer.cancelled():
                writer.exception()  # retrieved: the stream's own end is what gets reported
            out.close()

    def _stream_request(self, decoded: v2grpc.InferMessage, out: _StreamOut, inflight: set) -> None:
        """Start one streamed request; its responses go to ``out`` (never raises)."""
        rid = decoded.id
        cell = None
        try:
            request = v2grpc.parse_request(decoded, self.core.shm)
            if self.core.grpc_forward is not None:
                forward_headers(self.core.grpc_forward, out.stream.headers, request)
            mv = self.core.version(request.model_name, request.model_version)
            if self.core.tracer.on:  # an ordinary model's trace ends once its response is written (_StreamOut);
                # a decoupled model's, whose responses come one by one, with the request
                request.trace = self.core.tracer.sample(request.model_name, front=not mv.decoupled,
                                                        header=out.stream.metadata)  # (the stream's traceparent)
                if request.trace is not None:
                    request.trace.stamp("GRPC_WAITREAD_START")  # (its message is read: no wait to time)
                    request.trace.stamp("GRPC_WAITREAD_END")
            if mv.decoupled:
                empty_final = request.parameters.get("triton_enable_empty_final_response") is True

                def on_response(response: Any, final: bool) -> None:
                    item = self._stream_item(request, response, final, empty_final)
                    if item is not None:
                        out.put(item)

                done = self.core.stream(request, on_response)
            else:
                cell = out.slot(request.trace)
                done = self.core.stream(request, lambda response, final: out.fill(
                    cell, self._stream_item(request, response, True, False)))
                # Never leave the order waiting: a request that ends without a result is reported.
                done.add_done_callback(lambda _: out.fill(cell, v2grpc.encode_stream_error(
                    ServerError("the request was cancelled", "CANCELLED"), rid)))
        except Exception as e:  # (a trace of a refused request has ended: Core.stream)
            error = e if isinstance(e, ServerError) else _internal(e, "ModelStreamInfer")
            out.fill(cell if cell is not None else out.slot(), v2grpc.encode_stream_error(error, rid))
            return
        inflight.add(done)
        done.add_done_callback(inflight.discard)

    @staticmethod
    def _stream_item(request: InferRequest, response: Any, final: bool, empty_final: bool) -> bytes | None:
        """The ModelStreamInferResponse for one core callback (None: nothing to send)."""
        try:
            if response is None:
                return v2grpc.encode_stream_empty_final(request) if final and empty_final else None
            if isinstance(response, InferResponse) and response.error is None:
                return v2grpc.encode_stream_response(response, final)
            error = response.error if isinstance(response, InferResponse) else response
            if not isinstance(error, ServerError):
                error = ServerError(str(error), "INTERNAL")
            return v2grpc.encode_stream_error(error, request.id, request.model_name, request.model_version, final)
        except Exception as e:
            return v2grpc.encode_stream_error(_internal(e, "ModelStreamInfer"), request.id)
        finally:
            if isinstance(response, InferResponse):
                response.release()

    # -- model repository -----------------------------------------------
    @_unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise _no_repository_name()
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=m["name"], version=m.get("version", ""), state=m.get("state", ""), reason=m.get("reason", ""))
            for m in self.core.repository_index(request.ready)])

    @_unary
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        if request.repository_name:
            raise _no_repository_name()
        config = None
        files = {}
        for key, value in request.parameters.items():
            which = value.WhichOneof("parameter_choice")
            if key == "config":
                if which != "string_param":
                    raise invalid(f"invalid value type for load parameter '{key}', expected string_param.")
                config = value.string_param
            elif key.startswith("file:"):
                if which != "bytes_param":
                    raise invalid(f"invalid value type for load parameter '{key}', expected bytes_param.")
                files[key] = value.bytes_param
            else:
                raise invalid(f"unrecognized load parameter '{key}'.")
        await self.core.load_model(request.model_name, config, files or None)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(
            self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        if request.repository_name:
            raise _no_repository_name()
        value = request.parameters.get("unload_dependents")
        if value is not None and value.WhichOneof("parameter_choice") != "bool_param":
            raise invalid("invalid value type for 'unload_dependents' parameter, expected bool_param.")
        await self.core.unload_model(request.model_name, value is not None and value.bool_param)
        return pb.RepositoryModelUnloadResponse()

    # -- shared memory --------------------------------------------------
    @_unary
    async def SystemSharedMemoryStatus(
            self, request: pb.SystemSharedMemoryStatusRequest) -> pb.SystemSharedMemoryStatusResponse:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.core.shm.status(request.name or None):
            status = reply.regions[region["name"]]
            status.name, status.key = region["name"], region["key"]
            status.offset, status.byte_size = region["offset"], region["byte_size"]
        return reply

    @_unary
    async def SystemSharedMemoryRegister(
            self, request: pb.SystemSharedMemoryRegisterRequest) -> pb.SystemSharedMemoryRegisterResponse:
        self.core.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(
            self, request: pb.SystemSharedMemoryUnregisterRequest) -> pb.SystemSharedMemoryUnregisterResponse:
        self.core.shm.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    # CUDA IPC is unavailable here: no region can exist, as on a CPU-only Triton, and registering fails.
    @_unary
    async def CudaSharedMemoryStatus(
            self, request: pb.CudaSharedMemoryStatusRequest) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise ServerError(f"Unable to find cuda shared memory region: '{request.name}'", "NOT_FOUND")
        return pb.CudaSharedMemoryStatusResponse()

    @_unary
    async def CudaSharedMemoryRegister(
            self, request: pb.CudaSharedMemoryRegisterRequest) -> pb.CudaSharedMemoryRegisterResponse:
        raise ServerError(CUDA_SHM_UNSUPPORTED, "UNSUPPORTED")

    @_unary
    async def CudaSharedMemoryUnregister(
            self, request: pb.CudaSharedMemoryUnregisterRequest) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- trace and logging ----------------------------------------------
    @_unary
    async def TraceSetting(self, request: pb.TraceSettingRequest) -> pb.TraceSettingResponse:
        """Triton's trace extension: the global setting, or a model's (kernel.tracing)."""
        model = request.model_name
        if model and not self.core.model_ready(model):
            raise invalid(f"Request for unknown model : {model}")
        if request.settings:
            self.core.tracer.update(model, tracing.changes_from_grpc(request.settings))
        reply = pb.TraceSettingResponse()
        for key, value in self.core.tracer.settings(model).items():
            reply.settings[key].value.extend(value if isinstance(value, list) else [value])
        return reply

    @_unary
    async def LogSettings(self, request: pb.LogSettingsRequest) -> pb.LogSettingsResponse:
        """Triton's logging extension: each setting checked and applied in Triton's order (a refusal keeps
        those before it, and they reach the workers too)."""
        try:
            self._apply_log_settings(request.settings)
        finally:
            self.core.log_settings_changed()
        reply = pb.LogSettingsResponse()
        s = reply.settings
        for key, current in logs.settings(self.core.verbose).items():
            if isinstance(current, bool):
                s[key].bool_param = current
            elif isinstance(current, int):
                s[key].uint32_param = current
            else:
                s[key].string_param = current
        return reply

    def _apply_log_settings(self, settings: Any) -> None:
        """The settings of a request, each checked and applied in Triton's order."""
        words = {"string_param": "string", "bool_param": "boolean", "uint32_param": "int32"}
        for key in logs.SETTINGS:
            if key not in settings:
                continue
            if key == "log_file":
                raise ServerError(logs.LOG_FILE_FIXED, "UNSUPPORTED")
            value = settings[key]
            want = "uint32_param" if key == "log_verbose_level" else "string_param" if key == "log_format" \
                else "bool_param"
            if value.WhichOneof("parameter_choice") != want:
                raise invalid(f"expect {words[want]} for '{key}'")
            if key == "log_verbose_level":
                self.core.verbose = value.uint32_param
                logs.set_verbose(self.core.verbose)
            elif key == "log_format":
                if value.string_param not in logs.FORMATS:
                    raise invalid(f"invalid argument for log_format, got: {value.string_param}")
                logs.set_format(value.string_param)
            else:
                logs.set_level(key, value.bool_param)


_PENDING: Any = object()


class _StreamOut:
    """The responses of one ModelStreamInfer stream on their way out.

    An ordinary model's responses keep request order through ``slot`` cells, filled as answers come
    and taken from the front of the line; a decoupled model's go as they come (``put``). A response
    that can go at once (nothing handed to the writer before it, no compression, flow control open)
    is written from the callback that produced it, the way a unary answer is (GrpcServer._reply):
    no task wake-up per response. The others go, in order, to one writer task, which compresses and
    waits for flow-control credit. A traced request's trace gets GRPC_SEND_START/END around the
    writing of its response and ends there.
    """

    __slots__ = ("stream", "line", "queue", "queued")

    def __init__(self, stream: Call) -> None:
        self.stream = stream
        self.line: collections.deque[list] = collections.deque()  # [response, trace] cells, in request order
        self.queue: asyncio.Queue[tuple | None] = asyncio.Queue()  # the writer's (None: the stream is over)
        self.queued = 0  # responses handed to the writer and not sent yet

    def slot(self, trace: Any = None) -> list:
        """A place in the line for an ordinary request's response."""
        cell = [_PENDING, trace]
        self.line.append(cell)
        return cell

    def fill(self, cell: list, item: bytes | None) -> None:
        """``cell``'s response has come (None: nothing to send); send what heads the line (a second fill of a
        cell is ignored)."""
        if cell[0] is not _PENDING:
            return
        cell[0] = item
        line = self.line
        while line and line[0][0] is not _PENDING:
            ready, trace = line.popleft()
            if ready is not None:
                self.put(ready, trace)
            elif trace is not None:
                trace.finish()

    def put(self, item: bytes, trace: Any = None) -> None:
        """Send ``item`` now if nothing waits before it and the stream can take it, else through the writer."""
        stream = self.stream
        conn = stream.conn
        if (not self.queued and not stream.closed and not stream.out and stream.encoding == "identity"
                and not conn.paused and len(item) <= conn.max_message):
            if trace is not None:
                trace.stamp("GRPC_SEND_START")
            conn.send_data(stream, item, 0, False)
            if trace is not None:
                trace.stamp("GRPC_SEND_END")
                trace.finish()
        else:
            self.queued += 1
            self.queue.put_nowait((item, trace))

    async def write(self) -> None:
        while (entry := await self.queue.get()) is not None:
            item, trace = entry
            if trace is not None:
                trace.stamp("GRPC_SEND_START")
            try:
                await self.stream.send(item)
            except BaseException:  # the stream went away: the trace ends with what it has
                if trace is not None:
                    trace.finish()
                raise
            self.queued -= 1
            if trace is not None:
                trace.stamp("GRPC_SEND_END")
                trace.finish()

    def close(self) -> None:
        """The stream is over: the traces of responses never sent end with what they have."""
        for _, trace in self.line:
            if trace is not None:
                trace.finish()
        self.line.clear()
        while not self.queue.empty():
            entry = self.queue.get_nowait()
            if entry is not None and entry[1] is not None:
                entry[1].finish()


class HealthService:
    """grpc.health.v1: SERVING when the server is ready, as Triton answers (Check only, like Triton)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def Check(self, request: health_pb2.HealthCheckRequest, call: Call) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse.SERVING if self.core.ready() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def methods(core: Core) -> dict[str, Method]:
    """Every RPC this server answers, by HTTP/2 path."""
    service = InferenceService(core)
    table: dict[str, Method] = {}
    for name, (request_type, category) in RPCS.items():
        decode = v2grpc.decode_infer_request if request_type is pb.ModelInferRequest else request_type.FromString
        table[_SERVICE + name] = Method(decode, getattr(service, name), stream=name == "ModelStreamInfer",
                                        category=category, deferred=name == "ModelInfer")
    health = HealthService(core)
    table["/grpc.health.v1.Health/Check"] = Method(health_pb2.HealthCheckRequest.FromString, health.Check,
                                                   category="health")

    async def watch(call: Call) -> None:
        raise GrpcError(UNIMPLEMENTED, "Method not found")  # Triton serves Check only

    table["/grpc.health.v1.Health/Watch"] = Method(health_pb2.HealthCheckRequest.FromString, watch, stream=True)
    return table


class GrpcFront:
    """The gRPC endpoint over a :class:`Core`."""

    def __init__(self, core: Core, max_message_size: int = 64 << 20, **options: Any) -> None:
        self.core = core
        self.max_message_size = max_message_size
        self.options = options

    def server(self) -> GrpcServer:
        """A server to ``await start(host, port)`` on the running loop; ``close()`` then ``wait_closed()``."""
        return GrpcServer(methods(self.core), self.max_message_size,
                          restrictions=getattr(self.core, "grpc_restricted", None),
                          restricted_message=grpc_message, **self.options)
