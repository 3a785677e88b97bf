"""The server core: repository, models, scheduling, shared memory, statistics.

Every front end (HTTP, gRPC, the in-process API) is a thin layer over
:class:`Core`; it runs on one asyncio event loop and never blocks it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from kernel import __version__, logs
from kernel import config as cfg
from kernel.cache import ResponseCache
from kernel.cache import check_config as check_cache_config
from kernel.custom_metrics import CustomMetrics
from kernel.devices import gpu_count
from kernel.errors import ServerError
from kernel.instance import Instance, Regions, Spinner
from kernel.model import ModelVersion, Pending, RequestFuture
from kernel.pipelines.bls import BlsHandler
from kernel.pipelines.ensemble import EnsembleVersion, check_scheduling, composing_models, find_cycle, is_ensemble
from kernel.poll import Poller
from kernel.repository import Repository, remove_stale_overrides, select_versions, write_override
from kernel.restricted import Restrictions
from kernel.shm_registry import Registration, SharedMemoryRegistry
from kernel.tracing import Tracer, finish_if_cancelled, tensor_array
from kernel.types import ArenaRef, InferRequest, InferResponse, ShmRef
from shm.arena import Arena, MiB
from shm.doorbell import Watch
from shm.link import LinkBoard
from shm.region import remove_stale, space

log = logging.getLogger("kernel")

EXTENSIONS = [
    "classification", "sequence", "model_repository", "model_repository(unload_dependents)", "schedule_policy",
    "model_configuration", "system_shared_memory", "cuda_shared_memory", "binary_tensor_data", "parameters",
    "statistics", "trace", "logging",
]


#: Defaults of ``--backend-config python,worker-spin-us=``, ``python,front-poll-us=``,
#: ``python,front-hold-us=`` (see worker_options and kernel.instance.Spinner) and ``python,arrival-wake-us=``
#: (kernel.model.ModelVersion.wake).
DEFAULT_WORKER_SPIN_US = 500
DEFAULT_ARRIVAL_WAKE_US = 1000
#: Seconds between looks for idle segments of the front's arena: one empty for a whole period goes back.
ARENA_TRIM_PERIOD = float(os.environ.get("EDGE_KERNEL_ARENA_TRIM_S", "10"))
DEFAULT_FRONT_POLL_US = 300
DEFAULT_FRONT_HOLD_US = 5000
#: A /dev/shm smaller than this gets a warning at start (the front arena alone asks for 64 MiB)
SMALL_SHM = 256 * MiB


class Model:
    """A model directory known to the server, with its loaded versions."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.versions: dict[int, ModelVersion] = {}
        self.error = ""  # why the model as a whole could not load
        self.state = "UNAVAILABLE"
        self.unloaded = False  # explicitly unloaded: not counted against readiness
        self.removed = False  # its directory went away (poll mode): unloaded, and no longer in the index
        #: loaded from files sent with the load request: Triton's index lists such a model only where a
        #: repository has one of that name
        self.from_request = False
        #: the temporary directory holding those files, removed once no version runs from it
        self.owned = ""

    def discard_files(self) -> None:
        """Remove the directory of the files the load request sent (nothing for a repository's model)."""
        if self.owned:
            shutil.rmtree(self.owned, ignore_errors=True)
            self.owned = ""


def parse_version(version: str) -> int:
    """A request's model version string as Triton reads it (``std::stol``: leading blanks, a sign, digits, the
    rest ignored: ``" +1x"`` is 1), or its INVALID_ARG error for no number, one out of int64's range, or one < 0."""
    if version.isdigit() and version.isascii() and len(version) < 19:
        return int(version)  # the usual case
    m = _STOL.match(version)
    if m is None or not -(1 << 63) <= int(m[1]) < 1 << 63:
        raise ServerError(f"failed to get model version from specified version string '{version}' "
                          "(details: stol), version should be an integral value > 0", "INVALID_ARG")
    number = int(m[1])
    if number < 0:
        raise ServerError(f"invalid model version specified '{version}' , version should be an integral value > 0",
                          "INVALID_ARG")
    return number


_STOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


class Core:
    """Everything behind the protocols."""

    def __init__(self, model_repositories: list[str], *, strict_model_config: bool = False,
                 model_control_mode: str = "none", load_models: list[str] | None = None,
                 log_verbose: int = 0, backend_config: dict[str, dict[str, str]] | None = None,
                 backend_directories: list[str] | None = None, exit_timeout: float = 30.0,
                 arena_size: int = 64 * MiB, strict_readiness: bool = True,
                 host_policies: dict[str, dict[str, str]] | None = None,
                 trace_config: dict[str, Any] | None = None, response_cache_size: int = 0,
                 repository_poll_secs: float = 0, model_config_name: str = "", model_load_thread_count: int = 0,
                 model_load_retry_count: int = 0, server_id: str = "triton") -> None:
        self.repository = Repository(model_repositories)
        #: ``--id``: the name GET /v2 and gRPC ServerMetadata report
        self.server_id = server_id
        #: ``--model-config-name``: models with ``configs/<name>.pbtxt`` load from it (kernel.config.config_path)
        self.config_name = model_config_name
        #: ``--model-load-thread-count``: how many model versions load at once (0: no limit)
        self._load_slots = asyncio.Semaphore(model_load_thread_count) if model_load_thread_count > 0 else None
        #: ``--model-load-retry-count``: how many more times a version that failed to load is tried
        self.load_retries = max(0, model_load_retry_count)
        #: ``--model-control-mode=poll``: rescans the repositories every ``--repository-poll-secs`` (kernel.poll)
        self.poller = Poller(self, repository_poll_secs) if model_control_mode == "poll" else None
        #: ``--cache-config local,size=N``: the responses of models that enable the cache (kernel.cache)
        self.response_cache = ResponseCache(response_cache_size) if response_cache_size > 0 else None
        self.strict = strict_model_config
        self.control_mode = model_control_mode
        self.startup_models = list(load_models or [])
        self.verbose = log_verbose
        self.backend_config = backend_config or {}
        #: ``--host-policy`` settings by policy name (kernel.host_policy)
        self.host_policies = host_policies or {}
        self.backend_directories = [os.path.abspath(d) for d in backend_directories or []]
        self.exit_timeout = exit_timeout
        self.strict_readiness = strict_readiness
        self.models: dict[str, Model] = {}
        self.regions = Regions()
        self.shm = SharedMemoryRegistry(self._forget_region)
        self.arena: Arena | None = None
        self.links: LinkBoard | None = None  # with its free slots: see kernel.pipelines.ensemble's chained steps
        self.free_links: list[int] = []
        self.arrival_wakes = 0  # workers woken for an arriving request (ModelVersion.wake; tests)
        self.chained_steps = 0  # pipeline steps sent chained, and those of them skipped (tests, probes)
        self.chain_skips = 0
        #: links each model posts, and the models that made BLS calls (never chained from: see bls_called)
        self.producing: dict[str, set] = {}
        self.bls_models: set[str] = set()
        self._trimmer: asyncio.TimerHandle | None = None
        self._arena_size = arena_size
        self.gpus = gpu_count()
        python = self.backend_config.get("python", {})
        #: how long a worker woken for an arriving request polls for it (``python,arrival-wake-us``; 0: off)
        self.arrival_wake_ns = int(python.get("arrival-wake-us", DEFAULT_ARRIVAL_WAKE_US)) * 1000
        self.spinner = Spinner(int(python.get("front-poll-us", DEFAULT_FRONT_POLL_US)),
                               int(python.get("front-hold-us", DEFAULT_FRONT_HOLD_US)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.started = False
        # Set by the CLI (or an embedding application) before the fronts start; the fronts enforce them.
        self.http_restricted = Restrictions()
        self.grpc_restricted = Restrictions()
        #: ``--http-header-forward-pattern``, ``--grpc-header-forward-pattern``: headers whose name matches reach
        #: the model as request parameters (compiled, case-insensitive; None: none)
        self.http_forward: re.Pattern | None = None
        self.grpc_forward: re.Pattern | None = None
        #: Tensor bytes the front has copied into its arena for workers (kernel.model.dispatch): a pipeline's
        #: intermediate tensors pass by reference and never add to it (tests/test_pipelines.py checks).
        self.copied_bytes = 0
        self.bls = BlsHandler(self)  # answers python models' InferenceRequest.exec()
        #: python models' pb_utils.MetricFamily series, shown on /metrics after the server's own
        self.custom_metrics = CustomMetrics(cache=self.response_cache is not None)
        #: Triton's trace extension (``--trace-config``); the fronts sample requests when ``tracer.on``
        self.tracer = Tracer(trace_config)

    # -- lifetime -------------------------------------------------------
    async def start(self) -> None:
        """Load the models the control mode asks for (failures leave the model UNAVAILABLE)."""
        self._loop = self.spinner._loop = asyncio.get_running_loop()
        for entry in remove_stale():
            log.info("removed stale shared memory object %s", entry)
        for path in await asyncio.to_thread(remove_stale_overrides):
            log.info("removed the model files of a server that is gone: %s", path)
        free, total = space()
        if total and total < SMALL_SHM:  # (a container's default /dev/shm: 64 MiB)
            log.warning("/dev/shm holds only %d MiB (%d MiB free): tensors pass between the server's processes "
                        "there, and large ones will not fit; in a container, give it more (docker run "
                        "--shm-size=1g, or a memory-backed emptyDir mounted on /dev/shm)", total >> 20, free >> 20)
        self.repository.check()
        self.arena = Arena("front", self._arena_size)
        if self.spinner.window_ns:
            self.spinner.watch = Watch()
        self.links = LinkBoard()  # chained pipeline steps (kernel.pipelines.ensemble)
        self.free_links = list(range(self.links.slots - 1, -1, -1))
        self._trimmer = self._loop.call_later(ARENA_TRIM_PERIOD, self._trim_arena)
        if self.poller is not None:  # the files each model loads from, taken before it loads
            found, errors, prints = await self.poller.scan()
        else:
            found, errors = self.repository.scan()
        for name, error in errors.items():
            model = self.models[name] = Model(name, "")
            model.error = error
        if self.control_mode == "explicit":
            names = list(found) if "*" in self.startup_models else self.startup_models
        else:
            names = list(found)
        # Ensembles after the models they compose (Triton's dependency order); an ensemble's own load
        # loads composing models nobody asked for (explicit mode).
        ensembles = {name for name in names if name in found and self._is_ensemble(name)}
        loaded = []
        for group in ([n for n in names if n not in ensembles], [n for n in names if n in ensembles]):
            group = [name for name in group if name in found]
            outcomes = await asyncio.gather(*(self._load_locked(name) for name in group), return_exceptions=True)
            loaded += [name for name, outcome in zip(group, outcomes) if outcome is None]
        for name in names:
            if name not in found and name != "*" and name not in self.models:
                model = self.models[name] = Model(name, "")
                model.error = f"failed to load '{name}', failed to poll from model repository"
        if self.poller is not None:
            self.poller.start({name: prints[name] for name in loaded})
        self.started = True

    def _trim_arena(self) -> None:
        """Give back arena segments that stayed empty for a whole period; workers drop their mappings."""
        if self.arena is None:
            return
        removed = self.arena.trim()
        if removed:
            log.info("gave back %d idle shared memory segment(s) of the front's arena", len(removed))
            for name in removed:
                self._forget_mapping(name)
        self._trimmer = self._loop.call_later(ARENA_TRIM_PERIOD, self._trim_arena)

    async def stop(self, timeout: float | None = None) -> None:
        """Unload every model, then remove the shared memory this process made. ``timeout`` (default
        ``exit_timeout``, Triton's ``--exit-timeout-secs``) bounds the wait for requests in flight; the
        models' finalize gets what is left of it (FINALIZE_FLOOR s at least), then their workers are killed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.exit_timeout if timeout is None else timeout)
        if self.poller is not None:
            await self.poller.stop(self.exit_timeout)
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None
        await asyncio.gather(*(self._unload_versions(m, max(deadline - loop.time(), 0.0))
                               for m in self.models.values()), return_exceptions=True)
        for model in self.models.values():
            model.discard_files()
        try:
            self.tracer.close()  # every request has ended: the traces still held go to their files
        except Exception:  # noqa: BLE001
            log.exception("writing the last traces failed")
        self.shm.close()
        self.regions.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self.spinner.watch is not None:
            self.spinner.watch.close(unlink=True)
            self.spinner.watch = None
        if self.links is not None:
            self.links.close(unlink=True)
            self.links = None
            self.free_links = []

    def bls_called(self, model: str) -> None:
        """An instance of ``model`` made a BLS call. If a chained step waits for that model's batch on an
        instance the call needs (directly, or behind a batch queued there), neither could go on: its
        links fail now (the steps after it run the usual way), and it is never chained from again."""
        self.bls_models.add(model)
        for link in list(self.producing.pop(model, ())):
            link.fail()

    def backend_settings(self, backend: str) -> dict[str, str]:
        """``--backend-config`` settings a backend sees: the global ones (``<key>=<value>``), then its own
        (``<backend>,<key>=<value>``), which win."""
        return {**self.backend_config.get("", {}), **self.backend_config.get(backend, {})}

    def worker_env(self, backend: str) -> dict[str, str]:
        """Environment variables a worker of ``backend`` must start with: they act before its
        interpreter loads anything, which no setting inside the worker can do.

        ``libomp-path``: an OpenMP runtime to preload (LD_PRELOAD), e.g. the libgomp that PyTorch on
        Jetson needs loaded first ("cannot allocate memory in static TLS block");
        ``ld-library-path``: directories put in front of LD_LIBRARY_PATH.
        """
        settings = self.backend_settings(backend)
        env = {}
        preload = settings.get("libomp-path")
        if preload:
            env["LD_PRELOAD"] = ":".join(p for p in (preload, os.environ.get("LD_PRELOAD", "")) if p)
        libraries = settings.get("ld-library-path")
        if libraries:
            env["LD_LIBRARY_PATH"] = ":".join(p for p in (libraries, os.environ.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def worker_options(self) -> dict:
        """What each worker is started with (``--backend-config python,<key>=<value>``: the worker
        runtime's settings, the same for every backend).

        ``shm-default-byte-size``: the first segment of a worker's output arena (Triton's
        python backend option of that name sizes its shared-memory region); ``worker-spin-us``:
        how long an idle worker polls its ring before sleeping (0: sleep at once).
        """
        python = self.backend_config.get("python", {})
        return {"verbose": self.verbose > 0,
                "arena_size": int(python.get("shm-default-byte-size", 8 << 20)),
                "spin_us": int(python.get("worker-spin-us", DEFAULT_WORKER_SPIN_US)),
                "watch": self.spinner.watch.name if self.spinner.watch is not None else "",
                "links": self.links.name if self.links is not None else ""}

    # -- health and metadata --------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Triton's strict readiness: started, and every model it tried to load is ready. A model that never
        got as far as its versions (its configuration unreadable, its name in two repositories) does not
        count, as in Triton, where such a model never reaches the model lifecycle."""
        if not self.started:
            return False
        if not self.strict_readiness:
            return True
        return all(m.state == "READY" for m in self.models.values() if not m.unloaded and m.versions)

    def all_loaded(self) -> bool:
        """Whether every model tried at start loaded (``--exit-on-error``: Triton's "failed to load all models")."""
        return all(m.state == "READY" for m in self.models.values() if not m.unloaded)

    def metadata(self) -> dict:
        return {"name": self.server_id, "version": "2.51.0", "extensions": list(EXTENSIONS),
                "edge_kernel_version": __version__}

    def version(self, name: str, version: str = "") -> ModelVersion:
        """The ready model version a request names, or Triton's NOT_FOUND error."""
        number = parse_version(version) if version else 0  # checked first, as Triton's
        model = self.models.get(name)
        if model is None or not model.versions:
            raise ServerError(f"Request for unknown model: '{name}' is not found", "NOT_FOUND")
        if version:
            mv = model.versions.get(number)
            if mv is None:
                raise ServerError(f"Request for unknown model: '{name}' version {version} is not found", "NOT_FOUND")
            if not mv.ready:
                raise ServerError(f"Request for unknown model: '{name}' version {version} is not at ready state",
                                  "UNAVAILABLE" if mv.restarting else "NOT_FOUND")
            return mv
        best = None
        for mv in model.versions.values():
            if mv.ready and (best is None or mv.version > best.version):
                best = mv
        if best is None:
            if any(mv.restarting for mv in model.versions.values()):
                # Not gone: its workers crashed and are starting again. 404 would read as permanent.
                raise ServerError(f"Request for model '{name}': its instances are restarting after a crash, "
                                  "retry shortly", "UNAVAILABLE")
            raise ServerError(f"Request for unknown model: '{name}' has no available versions", "NOT_FOUND")
        return best

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether the version is ready; a version string Triton cannot read is its INVALID_ARG error."""
        if version:
            parse_version(version)
        try:
            return self.version(name, version).ready
        except ServerError:
            return False

    def model_metadata(self, name: str, version: str = "") -> dict:
        mv = self.version(name, version)
        model = self.models[name]
        prefix = [-1] if mv.max_batch_size > 0 else []

        def tensors(specs: dict) -> list[dict]:
            return [{"name": s.name, "datatype": s.datatype, "shape": (prefix if not s.shape_tensor else []) + s.dims}
                    for s in specs.values()]

        return {"name": name,
                "versions": [str(v) for v, m in sorted(model.versions.items()) if m.ready],
                "platform": mv.config.platform or mv.config.backend,
                "inputs": tensors(mv.inputs), "outputs": tensors(mv.outputs)}

    def model_config(self, name: str, version: str = "") -> dict:
        return self.version(name, version).config_dict

    # -- inference ------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request; the caller must ``release()`` the response."""
        return await self.submit(request)

    def accept(self, request: InferRequest) -> asyncio.Future:
        """:meth:`submit` for a request entering the server here (the in-process API): it may be traced."""
        request.trace = self.tracer.sample(request.model_name, front=False) if self.tracer.on else None
        return self.submit(request)

    def submit(self, request: InferRequest, mv: ModelVersion | None = None) -> asyncio.Future:
        """Validate and queue one request (errors raise now); the future ends with its response.

        ``mv`` is the version the caller already looked up for this request, if any (looked
        up again if it stopped serving meanwhile, e.g. replaced by a reload). A traced request's
        trace ends even when the request is refused here or its caller gives up.
        """
        trace = request.trace
        try:
            if mv is None or mv.state != "READY":
                mv = self.version(request.model_name, request.model_version)
            if mv.decoupled:
                raise ServerError("ModelInfer RPC doesn't support models with decoupled transaction policy",
                                  "UNSUPPORTED")
            pending = Pending(request, RequestFuture.new(self._loop), mv.validate(request))
            if trace is not None:
                self._begin_trace(request, mv, pending)
            self.shm.hold(request, pending.future)  # client regions stay mapped until it ends
            pending.future.pending = pending  # cancelling the future cancels the request
            pending.version = mv
            try:
                mv.scheduler.submit(pending)
            except BaseException:
                pending.future.cancel()  # rejected (queue full): let go of the regions it held
                raise
        except BaseException:
            if trace is not None:
                trace.finish()  # refused: the trace ends with what it has
            raise
        if trace is not None:
            pending.future.add_done_callback(finish_if_cancelled(trace))
        self.spinner.kick()
        return pending.future

    def stream(self, request: InferRequest, callback: Callable[[Any, bool], None]) -> asyncio.Future:
        """Run one request whose responses (decoupled: zero or more) go to ``callback``.

        ``callback(response_or_error_or_None, final)``; the returned future ends
        with the request. A traced request's trace ends as in :meth:`submit`.
        """
        trace = request.trace
        try:
            mv = self.version(request.model_name, request.model_version)
            batch = mv.validate(request)
            pending = Pending(request, RequestFuture.new(self._loop), batch)
            if trace is not None:
                self._begin_trace(request, mv, pending)
            if mv.decoupled:
                done = RequestFuture.new(self._loop)

                def wrapped(response: Any, final: bool) -> None:
                    callback(response, final)
                    if final:
                        done.pending = None
                        if not done.done():
                            done.set_result(None)

                pending.stream = wrapped
                pending.future.add_done_callback(lambda f: f.cancelled() or f.exception())
                ends = done
            else:
                def finish(future: asyncio.Future) -> None:
                    if future.cancelled():
                        return
                    error = future.exception()
                    callback(error if error is not None else future.result(), True)

                pending.future.then = finish  # (kernel.model.RequestFuture: called as soon as it is settled)
                ends = pending.future
            self.shm.hold(request, ends)
            ends.pending = pending  # cancelling what the caller holds cancels the request
            pending.version = mv
            try:
                mv.scheduler.submit(pending)
            except BaseException:
                ends.cancel()  # rejected (queue full): let go of the regions it held
                pending.future.cancel()
                raise
        except BaseException:
            if trace is not None:
                trace.finish()  # refused: the trace ends with what it has
            raise
        if trace is not None:
            ends.add_done_callback(finish_if_cancelled(trace))
        self.spinner.kick()
        return ends

    def _begin_trace(self, request: InferRequest, mv: Any, pending: Pending) -> None:
        """A traced request is queued: its header, REQUEST_START, QUEUE_START (its inputs at level TENSORS).
        Tracing never fails a request: a trace that cannot be made is dropped with a log line."""
        trace = request.trace
        try:
            trace.begin(mv.name, mv.version, request.id, request.inputs, self._input_array, pending.enqueued)
        except Exception:  # noqa: BLE001
            log.exception("tracing a request to '%s' failed; it is not traced", mv.name)
            request.trace = None
            trace.finish()

    def _input_array(self, t: Any) -> Any:
        """An input's values, wherever its bytes are (for a trace's tensor records)."""
        data = t.data
        if isinstance(data, ShmRef):
            data = data.region.buffer()[data.offset : data.offset + data.byte_size]
        elif isinstance(data, ArenaRef):  # the front's arena, or a worker's (a pipeline's intermediate tensor)
            segment = self.arena.buffer(data.key) if self.arena is not None and self.arena.owns(data.key) \
                else self.regions.buffer(data.key)
            data = segment[data.offset : data.offset + data.byte_size]
        return tensor_array(t.datatype, t.shape, data) if data is not None else None

    # -- statistics -----------------------------------------------------
    def statistics(self, name: str = "", version: str = "") -> dict:
        """Triton's statistics extension: every ready version, or those of one model."""
        number = parse_version(version) if version else 0  # checked first, as Triton's
        if not name:
            versions = [mv for m in sorted(self.models.values(), key=lambda m: m.name)
                        for _, mv in sorted(m.versions.items()) if mv.ready]
        else:
            model = self.models.get(name)
            ready = [mv for _, mv in sorted(model.versions.items()) if mv.ready] if model else []
            if not ready:
                raise ServerError(f"requested model '{name}' is not available", "INVALID_ARG")
            if version:
                ready = [mv for mv in ready if mv.version == number]
                if not ready:
                    raise ServerError(f"requested model version is not available for model '{name}'", "INVALID_ARG")
            versions = ready
        return {"model_stats": [mv.stats.to_dict(mv.name, mv.version_str) for mv in versions]}

    # -- model repository -----------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict]:
        """Every model in the repositories, with the state of each known version."""
        found, errors = self.repository.scan()
        index = []
        for name in sorted(set(found) | set(errors) | set(self.models)):
            model = self.models.get(name)
            if model is not None and (model.removed or model.from_request) and name not in found \
                    and name not in errors:
                continue  # as Triton: a model whose directory went away (or never was) is not listed
            versions = sorted(model.versions.items()) if model is not None else []
            if not versions:
                if not ready_only:
                    index.append({"name": name})
                continue
            for _, mv in versions:
                if ready_only and not mv.ready:
                    continue
                entry = {"name": name, "version": mv.version_str, "state": mv.state}
                if mv.reason and not mv.ready:
                    entry["reason"] = mv.reason
                index.append(entry)
        return index

    def table(self) -> list[tuple[str, str, str]]:
        """(model, version, status) rows for the start-up table."""
        rows = []
        for name in sorted(self.models):
            model = self.models[name]
            if not model.versions:
                rows.append((name, "-", f"UNAVAILABLE: {model.error}"))
            for _, mv in sorted(model.versions.items()):
                status = (f"{mv.state} ({mv.status})" if mv.status else mv.state) if mv.ready \
                    else f"{mv.state}: {mv.reason}"
                rows.append((name, mv.version_str, status))
        return rows

    async def load_model(self, name: str, config_override: str | None = None,
                         files: dict[str, bytes] | None = None) -> None:
        """The model repository extension's load: (re)load a model (explicit control mode).

        ``files`` (``{"file:<path>": content}``, with ``config_override``) are the model's whole directory,
        as Triton's: the model loads from them instead of its repository (or is new); they are written to a
        private temporary directory removed when the model unloads, is replaced or the server stops.
        """
        self._check_control()
        await self._load_locked(name, config_override, files)

    async def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        """The model repository extension's unload (explicit control mode).

        As in Triton, ensembles that use the model are unloaded with it; ``unload_dependents``
        also unloads an ensemble's composing models that no other loaded ensemble uses.
        """
        self._check_control()
        await self._unload(name, unload_dependents)

    async def _unload(self, name: str, unload_dependents: bool = False, removed: bool = False) -> list[str]:
        """Unload ``name`` and the ensembles that use it (and, with ``unload_dependents``, its unused
        composing models); return the other models unloaded. ``removed``: its directory went away."""
        others: list[str] = []
        async with self._lock(name):
            model = self.models.get(name)
            if model is None:
                return others
            composing = [composing_models(mv.config) for mv in model.versions.values() if mv.ready
                         and isinstance(mv, EnsembleVersion)]
            unloading = [mv for mv in model.versions.values() if mv.state == "READY"]
            if removed:  # gone at once: from the index, and from readiness while its versions drain
                model.removed = model.unloaded = True
            await self._unload_versions(model)
            model.discard_files()
            model.state = "UNAVAILABLE"
            model.unloaded = True
            if removed:
                for mv in unloading:
                    log.info("successfully unloaded '%s' version %s", name, mv.version_str)
        for other in [m.name for m in self.models.values() if m.name != name and any(
                mv.ready and isinstance(mv, EnsembleVersion) and name in composing_models(mv.config)
                for mv in m.versions.values())]:
            others += [other, *await self._unload(other)]
        if unload_dependents:
            used = {dep for m in self.models.values() for mv in m.versions.values()
                    if mv.ready and isinstance(mv, EnsembleVersion) for dep in composing_models(mv.config)}
            for dep in dict.fromkeys(d for deps in composing for d in deps):
                if dep not in used and self.model_ready(dep):
                    others += [dep, *await self._unload(dep, True)]
        return others

    def present(self, name: str) -> bool:
        """Whether ``name`` is known and its directory has not gone away (poll mode)."""
        model = self.models.get(name)
        return model is not None and not model.removed

    async def remove_model(self, name: str) -> list[str]:
        """Poll mode: ``name``'s directory went away; unload it (and the ensembles that use it, returned)."""
        return await self._unload(name, removed=True)

    def _poll_failed(self, name: str, error: ServerError, old: Model | None) -> None:
        """A load whose model no repository holds (or several do): log Triton's words and remember the
        model only in the second case (Triton's index lists it; a name no repository has is not listed)."""
        if error.code != "INTERNAL":
            log.error("Poll failed for model directory '%s': %s", name, error.message)
            if old is None or not old.versions:
                self.models[name] = Model(name, "")
                self.models[name].error = error.message
        else:
            log.error("failed to poll model '%s': model not found in any model repository.", name)

    def _check_control(self) -> None:
        if self.control_mode != "explicit":
            raise ServerError("explicit model load / unload is not allowed if polling is enabled", "UNAVAILABLE")

    async def _load_locked(self, name: str, config_override: str | None = None,
                           files: dict[str, bytes] | None = None) -> None:
        async with self._lock(name):
            await self._load(name, config_override, files)

    async def _load(self, name: str, config_override: str | None, files: dict[str, bytes] | None = None) -> None:
        """Load ``name`` from the repository (or the request's ``files``); a failed reload keeps the loaded
        version serving."""
        poll_error = ServerError(f"failed to load '{name}', failed to poll from model repository", "INTERNAL")
        old = self.models.get(name)
        owned = ""
        if files:
            try:  # Triton's poll refuses these (its words go to the log); the client's mistake here: 400
                if not config_override:
                    raise ServerError("Load parameter 'config' must be specified for model file override")
                path = await asyncio.to_thread(write_override, name, files)
            except ServerError as e:
                log.error("Poll failed for model directory '%s': %s", name, e.message)
                raise ServerError(poll_error.message, "INVALID_ARG") from None
            owned = os.path.dirname(path)
        else:
            try:
                path = self.repository.locate(name)
            except ServerError as e:
                self._poll_failed(name, e, old)
                raise poll_error from None
        try:
            config = cfg.from_json(config_override) if config_override else cfg.load(path, self.config_name)
            cfg.complete(config, path, self.gpus)
            if is_ensemble(config):
                check_scheduling(config)  # Triton refuses these when it polls the repository
            check_cache_config(config)  # and these
            numbers = select_versions(config, path)
        except ServerError as e:
            if owned:
                shutil.rmtree(owned, ignore_errors=True)
            log.error("Poll failed for model directory '%s': %s", name, e.message)
            if old is None or not old.versions:
                self.models[name] = Model(name, "")
                self.models[name].error = e.message
                self.models[name].from_request = bool(files)
            raise (ServerError(poll_error.message, "INVALID_ARG") if files else poll_error) from None
        model = Model(name, path)
        model.owned, model.from_request = owned, bool(files)
        ensemble = is_ensemble(config)
        for number in numbers:
            copy = type(config)()
            copy.CopyFrom(config)
            model.versions[number] = (EnsembleVersion if ensemble else ModelVersion)(name, number, path, copy, self)
        try:
            cfg.validate(config)
            if ensemble:
                await self._load_composing(name, config)
        except ServerError as e:  # a readable but invalid config: each version says why
            for mv in model.versions.values():
                mv.state, mv.reason = "UNAVAILABLE", e.reason()
                if isinstance(mv, EnsembleVersion):
                    mv.problem = e.message
        loading = [number for number, mv in model.versions.items() if mv.state == "LOADING"]
        for attempt in range(self.load_retries + 1):
            if attempt:  # --model-load-retry-count: a fresh start for each version that failed
                log.info("retrying to load '%s' version(s) %s (retry %d of %d)", name,
                         ", ".join(map(str, loading)), attempt, self.load_retries)
                for number in loading:
                    copy = type(config)()
                    copy.CopyFrom(config)
                    model.versions[number] = ModelVersion(name, number, path, copy, self)
            await asyncio.gather(*(self._limited(model.versions[number].load(
                not self.strict, self.gpus, self.regions, self.worker_options())) for number in loading))
            loading = [] if ensemble else [number for number in loading if not model.versions[number].ready]
            if not loading:
                break
        failed = [mv for mv in model.versions.values() if not mv.ready]
        for mv in failed:
            log.error("failed to load '%s' version %s: %s", name, mv.version, mv.reason)
        # The answer is worded before anything is unloaded: unloading sets each version's reason to "unloaded".
        error = _load_failed(name, failed) if failed else None
        if error is not None and old is not None and any(mv.ready for mv in old.versions.values()):
            await self._unload_versions(model)  # keep the version that serves
            model.discard_files()
            raise error
        self.models[name] = model  # serve the new version while the old one drains
        model.state = "READY" if not failed else "UNAVAILABLE"
        if not any(mv.ready for mv in model.versions.values()):
            model.discard_files()
        if old is not None:
            await self._unload_versions(old)
            old.discard_files()
        if error is not None:
            raise error

    async def _limited(self, load: Any) -> Any:
        """A version's load, waiting for one of the ``--model-load-thread-count`` slots if there is a limit."""
        if self._load_slots is None:
            return await load
        async with self._load_slots:
            return await load

    def _is_ensemble(self, name: str) -> bool:
        config = self._repository_config(name)
        return config is not None and is_ensemble(config)

    def _repository_config(self, name: str) -> Any:
        """A model's configuration as its repository has it (None when it cannot be read)."""
        try:
            return cfg.load(self.repository.locate(name), self.config_name)
        except ServerError:
            return None

    async def _load_composing(self, name: str, config: Any) -> None:
        """Before an ensemble loads: refuse a circular dependency, then load the composing models
        never loaded (or unloaded) so far, as Triton does when an ensemble is loaded."""
        cycle = find_cycle(name, self._repository_config)
        if cycle:
            raise ServerError(cycle, "INVALID_ARG")
        found, _ = self.repository.scan()
        for dep in composing_models(config):
            if dep not in found:
                continue  # the ensemble's check says it is not available
            known = self.models.get(dep)
            if known is not None and not known.unloaded:
                continue
            async with self._lock(dep):
                known = self.models.get(dep)
                if known is None or known.unloaded:
                    try:
                        await self._load(dep, None)
                    except ServerError:
                        pass  # the ensemble's own check words it

    def composing_version(self, ensemble: str, name: str, version: str = "") -> ModelVersion:
        """The ready version an ensemble's step uses, or Triton's reason why the ensemble cannot load."""
        model = self.models.get(name)
        if model is None or name not in self.repository.scan()[0]:
            raise ServerError(f"ensemble {ensemble} contains models that are not available or ambiguous: {name}",
                              "INVALID_ARG")
        if not any(mv.ready for mv in model.versions.values()):
            failed = [mv.reason for mv in model.versions.values() if mv.reason] or [model.error]
            raise ServerError(f"ensemble '{ensemble}' depends on '{name}' which has no loaded version. Model "
                              f"'{name}' loading failed with error: {failed[0]}", "INVALID_ARG")
        try:
            return self.version(name, version)
        except ServerError:
            raise ServerError(f"ensemble '{ensemble}' depends on '{name}' whose required version {version} is not "
                              "loaded.", "INVALID_ARG") from None

    async def _unload_versions(self, model: Model, timeout: float = 30.0) -> None:
        await asyncio.gather(*(mv.unload(timeout) for mv in model.versions.values()), return_exceptions=True)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    # -- shared memory --------------------------------------------------
    def _forget_region(self, reg: Registration) -> None:
        self._forget_mapping(reg.id)

    def log_settings_changed(self) -> None:
        """Running workers take the new log settings (those started later inherit them)."""
        msg = {"t": "env", "env": logs.worker_env()}
        for instance in self._instances():
            instance.tell(msg)

    def _instances(self) -> Iterator[Instance]:
        """Every instance of every loaded model version."""
        for model in self.models.values():
            for mv in model.versions.values():
                yield from mv.instances

    def _forget_mapping(self, key: int | str) -> None:
        """Every worker drops its mapping of a client region (its registration id) or of an arena segment
        the front gave back (its name)."""
        for instance in self._instances():
            instance.forget_region(key)


def _load_failed(name: str, failed: list[ModelVersion]) -> ServerError:
    """Triton's answer to a load that failed: per version, or (an ensemble's dependencies or data flow)
    the ensemble's own reason."""
    problem = next((mv.problem for mv in failed if isinstance(mv, EnsembleVersion) and mv.problem), "")
    if problem:
        return ServerError(f"load failed for model '{name}': {problem}\n", "INVALID_ARG")
    return ServerError(f"load failed for model '{name}': " + "".join(
        f"version {mv.version} is at UNAVAILABLE state: {mv.reason};\n" for mv in failed), "INVALID_ARG")


def default_repository() -> str:
    """The example repository shipped with the project."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "models")
