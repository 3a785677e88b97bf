"""Triton's HTTP/REST endpoint (KServe v2 plus Triton's extensions) on aiohttp."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from kernel.errors import CUDA_SHM_UNSUPPORTED, ServerError, invalid
from kernel.server import Core
from protocol import v2json

log = logging.getLogger("kernel.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = "application/json"
_TEXT = "text/plain"


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=_JSON)


def _error(error: ServerError, content_type: str = _JSON) -> web.Response:
    return web.Response(body=v2json.error_body(error), status=error.http_status, content_type=content_type)


def _ok(content_type: str = _TEXT) -> web.Response:
    return web.Response(status=200, content_type=content_type)


def _not_ready(body: bytes = b"") -> web.Response:
    return web.Response(body=body, status=400, content_type=_TEXT)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into Triton's ``{"error": ...}`` body; never let one escape."""
    try:
        return await handler(request)
    except ServerError as e:
        return _error(e)
    except web.HTTPException as e:
        if e.status >= 400:
            return web.Response(body=orjson.dumps({"error": e.reason}), status=e.status, content_type=_TEXT)
        raise
    except Exception as e:  # a bug must cost one request, not the server
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(ServerError(f"internal error: {type(e).__name__}: {e}", "INTERNAL"))


def _check_uint(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ServerError("attempt to access JSON non-unsigned-integer as unsigned-integer", "INTERNAL")


async def _read_json(request: web.Request) -> dict:
    body = await request.read()
    if not body:
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ServerError(f"failed to parse the request JSON buffer: {e}", "INTERNAL") from None
    if not isinstance(doc, dict):
        raise ServerError("failed to parse the request JSON buffer: The document root must be an object.",
                          "INTERNAL")
    return doc


class HttpFront:
    """Routes of the HTTP endpoint over a :class:`Core`."""

    def __init__(self, core: Core, max_body: int = 1 << 30) -> None:
        self.core = core
        self.app = web.Application(middlewares=[_errors], client_max_size=max_body)
        r = self.app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.stats)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_get(base + "/stats", self.stats)
            r.add_post(base + "/infer", self.infer)
            r.add_post(base + "/generate", self.unsupported)
            r.add_post(base + "/generate_stream", self.unsupported)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        r.add_get("/v2/systemsharedmemory/status", self.shm_status)
        r.add_get("/v2/systemsharedmemory/region/{name}/status", self.shm_status)
        r.add_post("/v2/systemsharedmemory/region/{name}/register", self.shm_register)
        r.add_post("/v2/systemsharedmemory/unregister", self.shm_unregister)
        r.add_post("/v2/systemsharedmemory/region/{name}/unregister", self.shm_unregister)
        r.add_get("/v2/cudasharedmemory/status", self.cuda_shm_status)
        r.add_get("/v2/cudasharedmemory/region/{name}/status", self.cuda_shm_status)
        r.add_post("/v2/cudasharedmemory/region/{name}/register", self.cuda_shm_register)
        r.add_post("/v2/cudasharedmemory/unregister", self.cuda_shm_unregister)
        r.add_post("/v2/cudasharedmemory/region/{name}/unregister", self.cuda_shm_unregister)
        r.add_route("*", "/v2/trace/setting", self.trace)
        r.add_route("*", "/v2/models/{model}/trace/setting", self.trace)
        r.add_route("*", "/v2/logging", self.logging)

    # -- health and metadata --------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return _ok() if self.core.live() else _not_ready()

    async def ready(self, request: web.Request) -> web.Response:
        return _ok() if self.core.ready() else _not_ready()

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = self.core.metadata()
        return _json({"name": meta["name"], "version": meta["version"], "extensions": meta["extensions"]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(self.core.model_metadata(m["model"], m.get("version", "")))

    async def model_ready(self, request: web.Request) -> web.Response:
        m = request.match_info
        if self.core.model_ready(m["model"], m.get("version", "")):
            return _ok()
        return _not_ready(b'{"error":"Model version not ready"}')

    async def model_config(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(self.core.model_config(m["model"], m.get("version", "")))

    async def stats(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(self.core.statistics(m.get("model", ""), m.get("version", "")))

    # -- inference ------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        m = request.match_info
        model, version = m["model"], m.get("version", "")
        try:
            mv = self.core.version(model, version)
        except ServerError as e:
            return _error(e, _TEXT)  # Triton answers an unknown model on this route in text/plain
        body = await request.read()
        header = request.headers.get("Inference-Header-Content-Length")
        if header is not None and (not header.isdigit() or int(header) == 0):
            specs = [(s.name, s.datatype, s.dims, mv.max_batch_size > 0) for s in mv.inputs.values()]
            infer_request = v2json.raw_request(model, version, memoryview(body), specs)
        else:
            infer_request = v2json.parse_request(model, version, body, int(header) if header else None,
                                                 self.core.shm)
        future = self.core.submit(infer_request, mv)
        try:
            response = await future
        except ServerError as e:
            return _error(e, _TEXT)  # failures of the model itself: text/plain, like Triton
        try:
            parts, json_length = v2json.encode_response(response, infer_request)
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            response.release()
        if json_length is None:
            return web.Response(body=payload, content_type=_JSON)
        return web.Response(body=payload, headers={"Inference-Header-Content-Length": str(json_length),
                                                   "Content-Type": "application/octet-stream"})

    async def unsupported(self, request: web.Request) -> web.Response:
        raise ServerError("the generate extension is not supported by this server", "UNSUPPORTED")

    # -- model repository -----------------------------------------------
    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await _read_json(request)
        return _json(self.core.repository_index(bool(doc.get("ready", False))))

    async def load(self, request: web.Request) -> web.Response:
        doc = await _read_json(request)
        params = doc.get("parameters") or {}
        config = params.get("config")
        if any(k.startswith("file:") for k in params):
            raise ServerError("loading a model from files sent with the request is not supported", "UNSUPPORTED")
        await self.core.load_model(request.match_info["model"], config)
        return _ok(_JSON)

    async def unload(self, request: web.Request) -> web.Response:
        await _read_json(request)
        await self.core.unload_model(request.match_info["model"])
        return _ok(_JSON)

    # -- shared memory --------------------------------------------------
    async def shm_status(self, request: web.Request) -> web.Response:
        return _json(self.core.shm.status(request.match_info.get("name")))

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = await _read_json(request)
        # Triton's order: key (present, a string), offset (optional), byte_size (present); then the region.
        if "key" not in doc:
            raise invalid("Shared memory register request has no 'key' field")
        key = doc["key"]
        if not isinstance(key, str):
            raise ServerError("attempt to access JSON non-string as string", "INTERNAL")
        offset = doc.get("offset", 0)
        _check_uint(offset)
        if "byte_size" not in doc:
            raise invalid("Shared memory register request has no 'byte_size' field")
        byte_size = doc["byte_size"]
        _check_uint(byte_size)
        self.core.shm.register(request.match_info["name"], key, offset, byte_size)
        return _ok(_JSON)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.core.shm.unregister(request.match_info.get("name"))
        return _ok(_JSON)

    # CUDA IPC does not exist on Jetson: like Triton without CUDA, no region can ever be registered.
    async def cuda_shm_status(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name")
        if name:
            raise ServerError(f"Unable to find cuda shared memory region: '{name}'", "NOT_FOUND")
        return _json([])

    async def cuda_shm_register(self, request: web.Request) -> web.Response:
        raise ServerError(CUDA_SHM_UNSUPPORTED, "UNSUPPORTED")

    async def cuda_shm_unregister(self, request: web.Request) -> web.Response:
        return _ok(_JSON)

    # -- trace and logging ----------------------------------------------
    async def trace(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            await _read_json(request)
        return _json({"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0",
                      "trace_file": "", "trace_mode": "triton"})

    async def logging(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            doc = await _read_json(request)
            if "log_verbose_level" in doc:
                level = doc["log_verbose_level"]
                if not isinstance(level, int):
                    raise invalid("log_verbose_level must be an unsigned integer")
                self.core.verbose = level
        return _json({"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                      "log_verbose_level": self.core.verbose, "log_format": "default"})
