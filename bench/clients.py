"""Request senders: KServe v2 HTTP and gRPC through the official ``tritonclient`` asyncio clients, and
our in-process API (``kernel.api.Server``). Each one prepares a request once and sends it again and again."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.inputs import BenchError, TensorSpec, make_data, nbytes, output_names, resolve_inputs

PROTOCOLS = ("http", "grpc", "inprocess")


@dataclass
class ClientOptions:
    """What a client needs to build its request."""

    protocol: str
    url: str
    model: str
    model_version: str = ""
    batch_size: int = 1
    shapes: dict[str, list[int]] = field(default_factory=dict)
    input_data: str = "random"
    string_length: int = 128
    shared_memory: str = "none"  # none | system
    output_shm_size: int = 102400  # perf_analyzer's default for --output-shared-memory-size
    model_repository: str = ""  # inprocess only
    max_connections: int = 100


class Client:
    """Base: ``setup()`` once, ``infer()`` per request, ``statistics()`` between windows, ``close()`` always."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.inputs: list[TensorSpec] = []
        self.outputs: list[str] = []
        self.data: dict[str, np.ndarray] = {}
        self.max_batch_size = 0

    def _prepare(self, metadata: dict[str, Any], max_batch_size: int) -> None:
        o = self.options
        self.max_batch_size = max_batch_size
        self.inputs = resolve_inputs(metadata, max_batch_size, o.shapes, o.batch_size)
        self.outputs = output_names(metadata)
        self.data = make_data(self.inputs, o.input_data, o.string_length)

    async def setup(self) -> None:
        raise NotImplementedError

    async def infer(self) -> None:
        raise NotImplementedError

    async def statistics(self) -> dict[str, Any] | None:
        """The statistics extension's response for the model, or None if not available."""
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"inputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in self.inputs],
                "outputs": self.outputs, "max_batch_size": self.max_batch_size}


class RemoteClient(Client):
    """KServe v2 over HTTP/REST (binary tensor data) or gRPC, via ``tritonclient``'s asyncio clients.

    With ``shared_memory="system"`` each input gets a POSIX region filled once and each output a
    region of ``output_shm_size`` bytes; all are registered on the server and removed at ``close()``.
    """

    def __init__(self, options: ClientOptions) -> None:
        super().__init__(options)
        self.grpc = options.protocol == "grpc"
        self.client: Any = None
        self.regions: list[tuple[str, Any, int]] = []  # (name, handle, byte size)
        self.registered: list[str] = []
        self.request_inputs: list[Any] = []
        self.request_outputs: list[Any] = []

    def _module(self) -> Any:
        if self.grpc:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    async def setup(self) -> None:
        from tritonclient.utils import InferenceServerException

        o = self.options
        module = self._module()
        json_kw = {"as_json": True} if self.grpc else {}
        if self.grpc:
            self.client = module.InferenceServerClient(o.url)
        else:
            self.client = module.InferenceServerClient(o.url, conn_limit=max(o.max_connections, 1))
        try:
            live = await self.client.is_server_live()
        except (InferenceServerException, OSError) as e:
            text = e.message() if isinstance(e, InferenceServerException) else str(e)
            raise BenchError(f"cannot reach the server at {o.url} over {o.protocol}: {text}") from e
        except Exception as e:  # aiohttp.ClientError and friends
            raise BenchError(f"cannot reach the server at {o.url} over {o.protocol}: {e}") from e
        if not live:
            raise BenchError(f"the server at {o.url} is not live")
        try:
            metadata = await self.client.get_model_metadata(o.model, o.model_version, **json_kw)
            config = await self.client.get_model_config(o.model, o.model_version, **json_kw)
        except InferenceServerException as e:
            raise BenchError(f"model '{o.model}' on {o.url}: {e.message()}") from e
        if self.grpc:
            config = config.get("config", {})
        self._prepare(metadata, int(config.get("max_batch_size", 0) or 0))
        binary = {} if self.grpc else {"binary_data": True}
        if o.shared_memory == "system":
            await self._setup_shared_memory(module)
            return
        for spec in self.inputs:
            inp = module.InferInput(spec.name, spec.shape, spec.datatype)
            inp.set_data_from_numpy(self.data[spec.name], **binary)
            self.request_inputs.append(inp)
        self.request_outputs = [module.InferRequestedOutput(n, **binary) for n in self.outputs]

    async def _setup_shared_memory(self, module: Any) -> None:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException, serialize_byte_tensor

        o = self.options
        binary = {} if self.grpc else {"binary_data": True}
        tag = f"bench_{os.getpid()}_{id(self) & 0xFFFFFF:x}"
        try:
            for i, spec in enumerate(self.inputs):
                array = self.data[spec.name]
                size = nbytes(array)
                name = f"{tag}_in{i}"
                handle = shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
                self.regions.append((name, handle, size))
                shm.set_shared_memory_region(handle, [serialize_byte_tensor(array) if spec.datatype == "BYTES"
                                                      else array])
                inp = module.InferInput(spec.name, spec.shape, spec.datatype)
                inp.set_shared_memory(name, size)
                self.request_inputs.append(inp)
            for i, out_name in enumerate(self.outputs):
                name = f"{tag}_out{i}"
                handle = shm.create_shared_memory_region(name, "/" + name, o.output_shm_size, create_only=True)
                self.regions.append((name, handle, o.output_shm_size))
                out = module.InferRequestedOutput(out_name, **binary)
                out.set_shared_memory(name, o.output_shm_size)
                self.request_outputs.append(out)
        except shm.SharedMemoryException as e:
            raise BenchError(f"creating system shared memory: {e}") from e
        try:
            for name, _, size in self.regions:
                await self.client.register_system_shared_memory(name, "/" + name, size)
                self.registered.append(name)
        except InferenceServerException as e:
            raise BenchError(f"registering system shared memory on {o.url}: {e.message()}") from e

    async def infer(self) -> None:
        await self.client.infer(self.options.model, self.request_inputs, model_version=self.options.model_version,
                                outputs=self.request_outputs)

    async def statistics(self) -> dict[str, Any] | None:
        json_kw = {"as_json": True} if self.grpc else {}
        return await self.client.get_inference_statistics(self.options.model, self.options.model_version, **json_kw)

    async def close(self) -> None:
        """Unregister and destroy our regions (also after errors), then close the connection."""
        import tritonclient.utils.shared_memory as shm

        try:
            if self.client is not None:
                for name in self.registered:
                    try:
                        await self.client.unregister_system_shared_memory(name)
                    except Exception:  # noqa: BLE001 - the server may be gone; still remove our regions
                        pass
            self.registered.clear()
        finally:
            while self.regions:
                _, handle, _ = self.regions.pop()
                try:
                    shm.destroy_shared_memory_region(handle)
                except Exception:  # noqa: BLE001 - keep removing the others
                    pass
            if self.client is not None:
                client, self.client = self.client, None
                await client.close()


class InprocessClient(Client):
    """Our in-process API on this event loop: ``async with kernel.api.Server(model_repository=...)``,
    then ``await model.async_infer({...})``. With ``shared_memory="system"`` the inputs live in the
    server's shared-memory arena (``Model.input_buffer``), filled once, so requests copy nothing."""

    def __init__(self, options: ClientOptions) -> None:
        super().__init__(options)
        self.server: Any = None
        self.model: Any = None

    async def setup(self) -> None:
        o = self.options
        try:
            from kernel.api import Server
        except ImportError as e:
            raise BenchError(f"-i inprocess needs the in-process API kernel.api.Server: {e}") from e
        repo = o.model_repository
        if not repo or not os.path.isdir(repo):
            raise BenchError(f"-i inprocess needs --model-repository DIR (got '{repo}')")
        server = Server(model_repository=repo)
        try:
            await server.start_async()
        except Exception as e:
            raise BenchError(f"starting the in-process server on {repo}: {e}") from e
        self.server = server
        self.model = server.model(o.model, o.model_version or None)
        try:
            metadata = self.model.metadata()
            config = self.model.config()
        except Exception as e:
            raise BenchError(f"model '{o.model}' in {repo}: {e}") from e
        self._prepare(metadata, int(config.get("max_batch_size", 0) or 0))
        if o.shared_memory == "system":
            for spec in self.inputs:
                if spec.datatype == "BYTES":
                    raise BenchError("-i inprocess --shared-memory system needs fixed-size inputs (no BYTES)")
                buffer = self.model.input_buffer(spec.name, spec.shape)
                buffer[...] = self.data[spec.name]
                self.data[spec.name] = buffer

    async def infer(self) -> None:
        result = await self.model.async_infer(self.data)
        release = getattr(result, "release", None)
        if release is not None:
            release()

    async def statistics(self) -> dict[str, Any] | None:
        return self.model.statistics()

    async def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self.data.clear()  # input buffers go back to the arena before it is removed
            await server.stop_async()


def make_client(options: ClientOptions) -> Client:
    if options.protocol in ("http", "grpc"):
        return RemoteClient(options)
    if options.protocol == "inprocess":
        return InprocessClient(options)
    raise BenchError(f"unknown protocol '{options.protocol}' (expected one of {', '.join(PROTOCOLS)})")
