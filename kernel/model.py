"""Model versions: configuration, instances, request validation and dispatch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel import classification, execution_env, host_policy
from kernel import config as cfg
from kernel.cache import CachingScheduler, ModelCache
from kernel.errors import ServerError, invalid
from kernel.instance import Instance, Regions
from kernel.model_config_pb2 import ModelConfig, ModelInstanceGroup
from kernel.scheduling.scheduler import Scheduler, make_scheduler
from kernel.stats import ModelStats
from kernel.types import ArenaRef, InferRequest, InferResponse, InputTensor, OutputTensor, ShmRef
from shm import dtypes
from shm.arena import round_up

if TYPE_CHECKING:
    from shm.arena import Arena

log = logging.getLogger("kernel")

#: Request parameters the server consumes; the rest reach the model.
#: A crash within this many seconds of the previous one counts as "in a row" for the restart back-off.
CRASH_WINDOW = 10.0
MAX_BACKOFF = 5.0
#: Seconds a model's finalize gets at the least when it is stopped after its unload's time ran out
FINALIZE_FLOOR = 1.0

RESERVED_PARAMETERS = frozenset({
    "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output",
    "headers", "triton_enable_empty_final_response",
})

_KIND = {ModelInstanceGroup.KIND_CPU: "CPU", ModelInstanceGroup.KIND_GPU: "GPU", ModelInstanceGroup.KIND_MODEL: "MODEL"}


class TensorSpec:
    """What the configuration says of one input or output."""

    __slots__ = ("name", "datatype", "dims", "optional", "shape_tensor")

    def __init__(self, t: Any) -> None:
        self.name = t.name
        self.datatype = cfg.datatype(t.data_type)
        self.dims = list(t.dims)
        self.optional = bool(getattr(t, "optional", False))
        self.shape_tensor = bool(t.is_shape_tensor)


class Skipped(ServerError):
    """A chained pipeline step's batch that did not run: the step it waited for placed no outputs
    (kernel.pipelines.ensemble runs it the ordinary way then, or fails with that step's error)."""

    def __init__(self) -> None:
        super().__init__("the step before this chained step placed no outputs", "INTERNAL")


class RequestFuture(asyncio.Future):
    """A request's future: cancelling it (the client reset its stream, a deadline passed, the caller's
    task was cancelled) cancels the request too.

    An override of ``cancel`` rather than a done callback: ordinary requests pay nothing (a callback
    costs an event-loop turn per request), and every path that gives up on a request (a task awaiting
    it, ``asyncio.wait_for``, a transport abandoning its call) already ends in ``cancel()``.
    """

    __slots__ = ("pending", "then")  # no per-future dict: as cheap to make as loop.create_future()'s

    pending: Pending | None  # set once queued; cleared once the request has its outcome (no cycle left)
    #: One taker of the outcome, called without a turn of the event loop (protocol.futures.when_done): when
    #: a worker's answer settles the request, right after that answer is handled (Batch.done), so the reply
    #: is written before the loop polls for more requests; otherwise (and when cancelled) as a done callback
    #: would be.
    then: Callable[[asyncio.Future], None] | None

    @classmethod
    def new(cls, loop: asyncio.AbstractEventLoop) -> RequestFuture:
        future = cls(loop=loop)
        future.then = None  # (set: reading it never raises)
        return future

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._hand_over(_takers.batch)

    def set_exception(self, exception: Any) -> None:
        super().set_exception(exception)
        self._hand_over(_takers.batch)

    def _hand_over(self, taking: list | None) -> None:
        """The taker, if any, gets the outcome: with the batch's takers being gathered (``taking``), else on
        the loop's next turn."""
        then = self.then  # (set by new(), the only way the core makes one)
        if then is not None:
            self.then = None
            if taking is not None:
                taking.append((then, self))
            else:
                self.get_loop().call_soon(then, self)

    @staticmethod
    def after_takers(fn: Callable[[], None]) -> bool:
        """Have ``fn()`` called once the takers now being called (this future's among them) have all run,
        and say so; False when no batch of takers is running (then nothing is kept). A transport writes
        a batch's answers on one connection at once this way (protocol.grpc.server.Connection)."""
        after = _takers.after
        if after is None:
            return False
        after.append(fn)
        return True

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._hand_over(None)
        pending = getattr(self, "pending", None)
        self.pending = None
        if pending is not None and pending.version is not None:
            pending.version.cancel(pending)
        return True


class Pending:
    """A request waiting for (or in) execution."""

    __slots__ = ("request", "future", "batch_size", "enqueued", "deadline", "stream", "shape_key", "orderer",
                 "outcome", "version", "instance", "flag", "cache")

    def __init__(self, request: InferRequest, future: asyncio.Future, batch_size: int) -> None:
        self.request = request
        self.future = future
        self.batch_size = batch_size
        self.enqueued = time.perf_counter_ns()
        self.deadline = 0  # ns (perf_counter) after which the queue policy applies; 0: none
        self.stream: Any = None  # a callback for decoupled responses
        self.shape_key: Any = None  # requests with equal keys may share a batch
        self.orderer: Any = None  # set with preserve_ordering
        self.outcome: Any = None  # held by the orderer until earlier requests are answered
        self.version: ModelVersion | None = None  # set once queued: cancelling the future reaches it
        self.instance: Instance | None = None  # executing there, with its cancellation flag:
        self.flag = -1  # its byte on the instance's cancel board (-1: none)
        # ``cache`` (unset unless its model caches responses): (key, signature, lookup ns) of a cache miss


class ModelVersion:
    """One loaded (or failed) version of a model."""

    def __init__(self, name: str, version: int, model_dir: str, config: ModelConfig, server: Any) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.model_dir = model_dir
        self.server = server
        self.state = "LOADING"
        self.reason = ""
        self.instances: list[Instance] = []
        self.stats = ModelStats()
        self.scheduler: Scheduler | None = None
        self.cache: ModelCache | None = None  # set once loaded when the model and the server enable the cache
        #: the sequence batcher of an ``iterative_sequence`` model (its requests may be rescheduled), else None
        self.sequencer: Any = None
        self.status = ""  # what the backend says of its loaded instances (a DLA core, a GPU fallback...)
        self._restarts: set[asyncio.Future] = set()
        self.restarting = False  # every instance crashed and is being restarted: UNAVAILABLE, not gone
        self._crashes: dict[str, tuple[int, float]] = {}  # instance name -> (crashes in a row, last one)
        self.set_config(config)

    def set_config(self, config: ModelConfig) -> None:
        self.config = config
        self.config_dict = cfg.to_dict(config)
        self.max_batch_size = config.max_batch_size
        self.inputs = {t.name: TensorSpec(t) for t in config.input}
        self.outputs = {t.name: TensorSpec(t) for t in config.output}
        self.labels: dict[str, list[str]] = {}  # output name -> its label_filename's lines (kernel.classification)
        self.required = [n for n, t in self.inputs.items() if not t.optional]
        self.decoupled = config.model_transaction_policy.decoupled
        batching = self.max_batch_size > 0
        # What the fast path of validate() needs per input: datatype, dims, element size, batched.
        self._checks = {t.name: (t.datatype, t.dims, dtypes.SIZE.get(t.datatype), batching and not t.shape_tensor)
                        for t in self.inputs.values()}
        self._all_required = len(self.required) == len(self.inputs)

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    # -- lifetime -------------------------------------------------------
    async def load(self, autocomplete: bool, gpu_count: int, regions: Regions, options: dict) -> None:
        """Start the instances; on failure the version is UNAVAILABLE with a reason."""
        try:
            await self._load(autocomplete, gpu_count, regions, options)
        except ServerError as e:
            self.reason = e.reason()
        except Exception as e:  # a model must never take the server down
            self.reason = f"Internal: {type(e).__name__}: {e}"
        else:
            self.state = "READY"
            return
        self.state = "UNAVAILABLE"
        await self._stop_instances()

    async def _load(self, autocomplete: bool, gpu_count: int, regions: Regions, options: dict) -> None:
        config = self.config
        version_dir = os.path.join(self.model_dir, self.version_str)
        model_file = os.path.join(version_dir, config.default_model_filename) if config.default_model_filename \
            else version_dir
        server = self.server
        load_msg = {"t": "load", "backend": config.backend, "name": self.name, "version": self.version_str,
                    "repository": self.model_dir, "config": self.config_dict, "autocomplete": autocomplete,
                    "model_file": model_file, "backend_dirs": server.backend_directories,
                    "backend_config": server.backend_settings(config.backend)}
        options = dict(options, env=server.worker_env(config.backend))
        own = config.parameters.get(execution_env.PARAMETER) if config.backend == "python" else None
        if own is not None and own.string_value:  # Triton's EXECUTION_ENV_PATH: the model's own Python environment
            python, env = await asyncio.to_thread(execution_env.environment, own.string_value, self.model_dir,
                                                  options["env"])
            options = dict(options, python=python, env={**options["env"], **env})
        groups = _groups(config)
        first = Instance(f"{groups[0][0]}_0", groups[0][1], 0, regions, options=options)
        first.custom_metrics = server.custom_metrics  # (a model's initialize may create metrics)
        self.instances = [first]
        reply = await first.start(load_msg)
        if reply["config"] != self.config_dict:
            completed = cfg.from_dict(reply["config"])
            cfg.complete(completed, self.model_dir, gpu_count)
            cfg.validate(completed)
            self.set_config(completed)
            groups = _groups(self.config)
        placements = []
        for group_name, kind, gpus, count, secondary, policy in groups:
            if kind == "GPU":
                bad = [g for g in gpus if not 0 <= g < gpu_count]
                if bad or not gpus:
                    raise ServerError(
                        f"instance group {group_name} of model {self.name} specifies invalid or unsupported gpu "
                        f"id {bad[0] if bad else 0}. GPUs with at least the minimum required CUDA compute "
                        f"compatibility of 6.0 are: {' '.join(str(i) for i in range(gpu_count))}", "INVALID_ARG")
            devices = gpus if kind == "GPU" else [0]
            index = 0
            for device in devices:
                for _ in range(count):
                    placements.append((f"{group_name}_{index}", kind, device, secondary,
                                       host_policy.placement(server.host_policies,
                                                             host_policy.policy_name(policy, kind, device))))
                    index += 1
        first.name, first.kind, first.device_id, first.secondary, first.placement = placements[0]
        for name, kind, device, secondary, place in placements[1:]:
            self.instances.append(Instance(name, kind, device, regions, options=options, secondary=secondary))
            self.instances[-1].placement = place
            self.instances[-1].custom_metrics = server.custom_metrics
        for inst in self.instances:  # before any batch: a worker skips the doorbell only for a front that polls
            inst.spinner = server.spinner
        load_msg = dict(load_msg, config=self.config_dict, autocomplete=False)
        await asyncio.gather(*(inst.start(load_msg) for inst in self.instances[1:]))
        model_config_json = json.dumps(self.config_dict)
        statuses = await asyncio.gather(*(inst.initialize({"t": "init", "config": self.config_dict, "args": {
            "model_config": model_config_json,
            "model_instance_kind": inst.kind,
            "model_instance_name": inst.name,
            "model_instance_device_id": str(inst.device_id),
            "model_repository": self.model_dir,
            "model_version": self.version_str,
            "model_name": self.name,
            # Not in Triton's args: the group's secondary devices (an NVDLA core for a TensorRT engine).
            "model_instance_secondary_devices": json.dumps(
                [{"kind": "KIND_NVDLA", "device_id": d.device_id} for d in inst.secondary]),
        }, **({"place": inst.placement} if inst.placement else {})}) for inst in self.instances))
        self.status = "; ".join(dict.fromkeys(s for s in statuses if s))
        for inst in self.instances:
            inst.on_exit = self._instance_died
            inst.on_bls = self.server.bls.handle
            inst.model_name = self.name
        self.scheduler = make_scheduler(self)
        if self.config.sequence_batching.iterative_sequence:
            self.sequencer = self.scheduler
        if self.config.response_cache.enable:
            if self.server.response_cache is not None:
                self.cache = ModelCache(self, self.server.response_cache)
                self.scheduler = CachingScheduler(self.scheduler, self.cache)  # type: ignore[assignment]
            else:  # Triton loads it and silently does not cache
                log.info("model '%s' enables the response cache but the server has none (--cache-config)",
                         self.name)
        if self.config.model_warmup:  # Triton warms each instance before the model is READY
            for outcome in await asyncio.gather(*(self._warm_up(inst) for inst in self.instances),
                                                return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

    async def _warm_up(self, instance: Instance) -> None:
        """Run the ``model_warmup`` samples on ``instance``, as Triton 2.51 does on each instance before the
        model is READY (docs/triton-behaviour.md, section 16): a sample is ``batch_size`` requests of batch 1
        executed together, ``max(count, 1)`` times; batch_size 0 is skipped. They take dispatch(), the path
        a scheduler's batch takes (inputs in shared memory, ordinary requests for the backend), to this
        instance only, and count in the statistics as Triton's do. Any error fails the load."""
        loop = asyncio.get_running_loop()
        # Every sample's data first, as Triton makes it when it creates the instance: a bad file fails the
        # load before any sample runs.
        samples = [(s, self._warmup_requests(s)) for s in self.config.model_warmup if s.batch_size]
        for sample, requests in samples:
            # Triton checks nothing of the batch; the python backend then fails each request of a batch over
            # max_batch_size (1 always passes). Said here: a worker never sees such a batch otherwise.
            size, limit = sample.batch_size, self.max_batch_size
            errors = [f"batch size {size} for '{instance.name}', max allowed is {limit}"] * size \
                if size > max(limit, 1) else []
            for _ in range(max(sample.count, 1)):
                if errors:
                    break
                batch = []
                for request in requests:
                    pending = Pending(request, loop.create_future(), 1)
                    if self.decoupled:  # its responses come through stream(); the final one ends it
                        pending.stream = partial(_warmup_stream, pending.future, errors)
                    batch.append(pending)
                self.dispatch(instance, batch)
                for outcome in await asyncio.gather(*(p.future for p in batch), return_exceptions=True):
                    if isinstance(outcome, InferResponse):
                        outcome.release()
                    elif isinstance(outcome, BaseException):
                        errors.append(outcome.message if isinstance(outcome, ServerError) else str(outcome))
            if errors:
                raise invalid(f"failed to run warmup sample '{sample.name}': " + "".join(f"{e}; " for e in errors))

    def _warmup_requests(self, sample: Any) -> list[InferRequest]:
        """One sample's requests, data and checks as Triton's GenerateWarmupData: zero data, random bytes
        (zeros for BYTES: 4-byte zero lengths, i.e. empty strings), or ``<model dir>/warmup/<file>`` (its
        first bytes; BYTES: the whole file, serialised). One zero and one random buffer serve every input
        and request of the sample. Requests are validated like a client's, with the same messages."""
        prefix = "[request id: <id_unknown>] "
        specs = []
        zero_size = random_size = 0
        for name, spec in sample.inputs.items():
            dims = list(spec.dims)
            if any(d < 0 for d in dims):
                raise invalid(f"warmup setting expects all variable-size dimensions are specified for input '{name}'")
            datatype = cfg.datatype(spec.data_type)
            size = 4 * dtypes.element_count(dims) if datatype == "BYTES" else dtypes.byte_size(datatype, dims)
            kind = spec.WhichOneof("input_data_type")
            if kind == "zero_data" or (kind == "random_data" and datatype == "BYTES"):
                zero_size = max(zero_size, size)
            elif kind == "random_data":
                random_size = max(random_size, size)
            specs.append((name, spec, dims, datatype, size, kind))
        zeros, noise = bytes(zero_size), os.urandom(random_size)
        requests = []
        for _ in range(sample.batch_size):
            inputs = []
            for name, spec, dims, datatype, size, kind in specs:
                if kind == "input_data_file":
                    path = os.path.join(self.model_dir, "warmup", spec.input_data_file)
                    try:
                        with open(path, "rb") as f:
                            data = f.read()
                    except OSError as e:
                        raise ServerError(f"failed to open text file for read {path}: {os.strerror(e.errno or 0)}",
                                          "INTERNAL") from None
                    if datatype != "BYTES":
                        if size > len(data):  # (Triton's message lacks the space before "only")
                            raise invalid(f"{prefix}warmup setting expects {size} bytes, but the data provided from "
                                          f"{spec.input_data_file}only has {len(data)} bytes")
                        data = data[:size]
                elif kind is None:
                    raise invalid(f"{prefix}warmup setting expects input '{name}' to have input_data_type set")
                else:
                    data = (noise if kind == "random_data" and datatype != "BYTES" else zeros)[:size]
                original = name in self.inputs  # others (sequence controls) go unchecked, without batch dim
                inputs.append(InputTensor(name, datatype, ([1] if self.max_batch_size and original else []) + dims,
                                          data))
            self._validate(InferRequest(self.name, self.version_str,
                                        inputs=[t for t in inputs if t.name in self.inputs]))
            requests.append(InferRequest(self.name, self.version_str, inputs=inputs))
        return requests

    def _instance_died(self, instance: Instance) -> None:
        """A worker crashed (its requests already failed): start a fresh one, like Triton restarts a stub."""
        if self.state != "READY":
            return
        if not any(i.alive for i in self.instances):
            self.state = "UNAVAILABLE"
            self.restarting = True
            self.reason = f"Internal: every instance of model '{self.name}' stopped; restarting"
        self._restarts.add(asyncio.ensure_future(self._restart(instance)))

    def _backoff(self, instance: Instance) -> float:
        """Seconds to wait before restarting ``instance``: none after a first crash (back within 2 s, the
        usual case), then doubling from 0.1 s up to 5 s while it keeps crashing soon after each start, so a
        model that dies on every request does not keep a core busy with restarts."""
        now = time.monotonic()
        count, last = self._crashes.get(instance.name, (0, 0.0))
        count = count + 1 if now - last < CRASH_WINDOW else 1
        self._crashes[instance.name] = (count, now)
        return 0.0 if count == 1 else min(0.1 * 2 ** (count - 2), MAX_BACKOFF)

    async def _restart(self, instance: Instance) -> None:
        task = asyncio.current_task()
        try:
            delay = self._backoff(instance)
            log.warning("restarting instance %s of model '%s'%s", instance.name, self.name,
                        f" in {delay:g} s" if delay else "")
            if delay:
                await asyncio.sleep(delay)
            await instance.restart()
        except ServerError as e:
            log.error("instance %s of model '%s' could not restart: %s", instance.name, self.name, e.message)
            await instance.stop()
            if not any(i.alive for i in self.instances):
                self.restarting = False
                self._fail_queued(ServerError(f"Request for unknown model: '{self.name}' has no available versions",
                                              "NOT_FOUND"))
            return
        finally:
            self._restarts.discard(task)
        if self.state == "UNAVAILABLE" and any(i.alive for i in self.instances):
            self.state, self.reason, self.restarting = "READY", "", False
        if self.scheduler is not None:
            self.scheduler.on_free(instance)

    async def unload(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout`` s) for queued and in-flight requests, then stop the instances (their
        finalize gets what is left of it, FINALIZE_FLOOR s at least); what is still in flight then fails."""
        for task in list(self._restarts):
            task.cancel()
        self.restarting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.state == "READY":
            self.state = "UNLOADING"
            while loop.time() < deadline:
                if not (self.scheduler and self.scheduler.queued()) and not any(i.inflight for i in self.instances):
                    break
                await asyncio.sleep(0.05)
        self._fail_queued(ServerError(f"Request for unknown model: '{self.name}' is not found", "NOT_FOUND"))
        await self._stop_instances(max(deadline - loop.time(), FINALIZE_FLOOR))
        self.state = "UNAVAILABLE"
        self.reason = "unloaded"

    def _fail_queued(self, error: ServerError) -> None:
        if self.scheduler is not None:
            for pending in self.scheduler.drain():
                _settle(pending, error)

    def cancel(self, pending: Pending) -> None:
        """The request's caller gave up. Still queued: it leaves the queue and is never executed
        (answered CANCELLED, counted as Triton's "CANCELED" failure). Executing: its flag on the
        instance's cancel board is raised for the model to see (``request.is_cancelled()``)."""
        if pending.flag >= 0:
            pending.instance.raise_flag(pending.flag)
            return
        if self.scheduler is not None and self.scheduler.remove(pending):
            self.stats.failure(time.perf_counter_ns() - pending.enqueued, "CANCELED")
            _settle(pending, ServerError(f"[request id: {pending.request.id or '<id_unknown>'}] "
                                         "Request was cancelled", "CANCELLED"))

    def reject(self, pending: Pending, error: ServerError) -> None:
        """A queued request the queue policy rejects (its timeout expired)."""
        self.stats.failure(time.perf_counter_ns() - pending.enqueued, "REJECTED")
        _settle(pending, error)

    async def _stop_instances(self, timeout: float = 30.0) -> None:
        await asyncio.gather(*(inst.stop(timeout) for inst in self.instances), return_exceptions=True)

    # -- requests -------------------------------------------------------
    def validate(self, request: InferRequest) -> int:
        """Check a request against the configuration; return its batch size.

        The common case (every input given once, fixed-size data that matches) is checked
        here in one pass; anything else goes through :meth:`_validate`, which finds the
        problem and words it as Triton does.
        """
        checks = self._checks
        inputs = request.inputs
        if not self._all_required or len(inputs) != len(checks) or (
                len(inputs) > 1 and len({t.name for t in inputs}) != len(inputs)):
            return self._validate(request)
        batch = 1
        seen = 0
        for t in inputs:
            check = checks.get(t.name)
            if check is None or check[0] != t.datatype or check[2] is None:
                return self._validate(request)
            _, dims, size, batched = check
            shape = t.shape
            if batched:
                if not shape:
                    return self._validate(request)
                if seen == 0:
                    batch = shape[0]
                elif shape[0] != batch:
                    return self._validate(request)
                count, tail = batch, shape[1:]
            else:
                count, tail = 1, shape
            if len(tail) != len(dims):
                return self._validate(request)
            for d, s in zip(dims, tail):
                if s != d and (d != -1 or s < 0):
                    return self._validate(request)
                count *= s
            data = t.data
            if type(data) is memoryview:
                if data.nbytes != count * size:
                    return self._validate(request)
            elif isinstance(data, (ShmRef, ArenaRef)):
                if data.byte_size != count * size:
                    return self._validate(request)
            elif not isinstance(data, np.ndarray) or data.size != count:
                return self._validate(request)
            seen += 1
        if not batch or batch > self.max_batch_size > 0:  # (a batch of 0 rows: see _validate)
            return self._validate(request)
        if request.outputs:
            outputs = self.outputs
            for out in request.outputs:
                if out.name not in outputs:
                    return self._validate(request)
            if request.classification is not None:
                classification.check(request.classification, outputs)
        return batch

    def _validate(self, request: InferRequest) -> int:
        """The thorough check, with Triton's messages.

        A batching model's request of batch size 0 (shape ``[0, ...]``) never passes. Triton 2.51 reads a
        batch of 0 as "no batch dimension": it expects the bytes of the shape without its first dimension
        (``[0,16]`` with no data: "Expected 64, got 0", said here with its words), serves one row's bytes
        as a tensor without the batch dimension, and never answers when that row holds no element either
        (``[0,0]`` for dims ``[-1]``: the dynamic batcher never runs it). Here both are refused with
        "batch-size must be >= 1": a request of 0 rows would reach the scheduler, which takes a batch of
        size 0 for a sequence batcher's null request and answers nobody (docs/triton-behaviour.md, §6).
        """
        model = self.name
        inputs = self.inputs
        prefix = f"[request id: {request.id or '<id_unknown>'}] "
        names = [t.name for t in request.inputs]
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise invalid(f"{prefix}input '{dup}' already exists in request")
        missing = [n for n in self.required if n not in names]
        count_error = invalid(
            f"{prefix}expected {len(self.required)} inputs but got {len(names)} inputs for model '{model}'. "
            f"Got input(s) {_names(names[::-1])}, but missing required input(s) {_names(missing) if missing else ']'}. "
            "Please provide all required input(s).")
        if len(names) > len(inputs) or len(names) < len(self.required):
            raise count_error
        for t in request.inputs:
            if t.name not in inputs:
                raise invalid(f"unexpected inference input '{t.name}' for model '{model}'")
        if missing:
            raise count_error
        batch = 1
        mbs = self.max_batch_size
        if mbs > 0:
            for t in request.inputs:
                if inputs[t.name].shape_tensor:
                    continue
                if not t.shape:
                    raise invalid(f"{prefix}input '{t.name}' has no shape but model requires batch dimension "
                                  f"for '{model}'")
                batch = t.shape[0]
                break
            if batch > mbs:
                raise invalid(f"{prefix}inference request batch-size must be <= {mbs} for '{model}'")
        for t in request.inputs:
            spec = inputs[t.name]
            if t.datatype != spec.datatype:
                given = t.datatype if t.datatype in dtypes.NUMPY else "<invalid>"  # Triton's name for no type
                raise invalid(f"{prefix}inference input '{t.name}' data-type is '{given}', "
                              f"but model '{model}' expects '{spec.datatype}'")
            shape = t.shape
            batched = mbs > 0 and not spec.shape_tensor
            if batched and shape and shape[0] != batch:
                raise invalid(f"{prefix}input '{t.name}' batch size does not match other inputs for '{model}'")
            # Triton compares the shape first, a -1 on either side matching any size; [-5] is a wrong shape
            if not _matches(shape[1:] if batched else shape, spec.dims) or (batched and not shape):
                expected = ([-1] if batched else []) + spec.dims
                note = _BATCH_NOTE if batched else ""
                raise invalid(f"{prefix}unexpected shape for input '{t.name}' for model '{model}'. "
                              f"Expected {_shape(expected)}, got {_shape(shape)}. {note}")
            if any(d < 0 for d in shape):
                raise invalid(f"{prefix}All input dimensions should be specified for input '{t.name}' for model "
                              f"'{model}', got {_shape(shape)}")
            # Triton's expected size: a batch of 0 counts as no batch dimension
            self._check_size(t, prefix, shape[1:] if batched and not batch else shape, batched and not batch)
        if request.outputs:
            for out in request.outputs:
                if out.name not in self.outputs:
                    raise invalid(f"unexpected inference output '{out.name}' for model '{model}'")
            if request.classification is not None:
                classification.check(request.classification, self.outputs)
        if not batch:
            raise invalid(f"{prefix}inference request batch-size must be >= 1 for '{model}'")
        return batch

    def _check_size(self, t: Any, prefix: str, shape: list[int], no_rows: bool = False) -> None:
        """The data of ``t`` must hold ``shape``: its own, but the one without the batch dimension for a
        batch of 0 (``no_rows``; see _validate)."""
        data = t.data
        count = dtypes.element_count(shape)
        if isinstance(data, np.ndarray):
            size = data.size
            if size != count and no_rows and t.datatype != "BYTES":  # Triton's words for a batch of 0
                raise invalid(f"{prefix}input byte size mismatch for input '{t.name}' for model '{self.name}'. "
                              f"Expected {dtypes.byte_size(t.datatype, shape)}, got {data.nbytes}")
            if size != count and t.datatype == "BYTES":  # (JSON strings) Triton's core counts them as serialised
                raise invalid(f"{prefix}unexpected number of string elements {count + 1} for inference input "
                              f"'{t.name}' for model '{self.name}', expecting {count}" if size > count else
                              f"{prefix}expected {count} string elements for inference input '{t.name}' for model "
                              f"'{self.name}', got {size}")
            if size != count:
                raise invalid(f"{prefix}unexpected number of elements for input '{t.name}' for model "
                              f"'{self.name}'. Expected {count}, got {size}")
            return
        expected = dtypes.byte_size(t.datatype, shape)
        if expected is None:  # BYTES: the serialised elements must cover the shape
            if isinstance(data, ShmRef):
                return  # never read a client's region here: the worker checks the count
            if isinstance(data, ArenaRef):
                data = data.owner  # our own arena (a request body): the bytes are at hand
            problem = _bytes_problem(data if data is not None else b"", count, t.name, prefix, self.name)
            if problem:
                raise invalid(problem)
            return
        size = data.byte_size if isinstance(data, (ShmRef, ArenaRef)) else (0 if data is None else len(data))
        if size != expected:
            raise invalid(f"{prefix}input byte size mismatch for input '{t.name}' for model '{self.name}'. "
                          f"Expected {expected}, got {size}")

    def dispatch(self, instance: Instance, batch: list[Pending]) -> None:
        """Write a batch's inputs to shared memory and send it to ``instance``."""
        arena: Arena = self.server.arena
        blocks: list[tuple[str, int, int]] = []
        reqs = []
        try:
            placed = _place_inputs([pending.request.inputs for pending in batch], arena, blocks)
            if blocks:  # bytes the front copied (a pipeline's test checks no intermediate tensor is among them)
                self.server.copied_bytes += blocks[0][2]
            for pending, locs in zip(batch, placed):
                request = pending.request
                spec: dict[str, Any] = {"in": locs}
                if request.outputs:
                    spec["out"] = [o.name for o in request.outputs]
                    dests = {o.name: [o.shm.region.posix_name, o.shm.region.offset + o.shm.offset, o.shm.byte_size,
                                      o.shm.region.id] for o in request.outputs if o.shm is not None}
                    if request.chain is not None:  # a chained step's outputs: blocks of the front's arena
                        dests.update((o.name, [*o.arena[:3], 0, *o.arena[3:]]) for o in request.outputs if o.arena)
                    if dests:
                        spec["shm"] = dests
                if request.chain is not None:  # the links it waits on or posts (kernel.pipelines.ensemble)
                    request.chain.describe(spec)
                if request.id:
                    spec["rid"] = request.id
                if request.trace is not None:  # a BLS request the model makes with it is traced as its child
                    spec["tr"] = request.trace.id
                    if request.trace.traceparent is not None:  # mode opentelemetry: get_context()'s answer
                        spec["tc"] = request.trace.traceparent
                if request.parameters:
                    parameters = request.parameters
                    params = {k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS}
                    if params:
                        spec["p"] = json.dumps(params)
                    cid = parameters.get("sequence_id")
                    if cid:  # the model's correlation_id() and flags() (START 1, END 2), as Triton gives them
                        spec["cid"] = cid
                        spec["fl"] = (parameters.get("sequence_start") is True) | \
                            (parameters.get("sequence_end") is True) << 1
                reqs.append(spec)
        except Exception as e:  # e.g. /dev/shm full: fail these requests, keep serving
            for block in blocks:
                arena.free(*block[:2])
            error = e if isinstance(e, ServerError) else ServerError(
                f"unable to place the inputs of model '{self.name}' in shared memory: {e}", "INTERNAL")
            now = time.perf_counter_ns()
            for pending in batch:
                self.stats.failure(now - pending.enqueued, "OTHER")
                _settle(pending, error)
                if self.sequencer is not None:
                    self.sequencer.ended(pending)
            return
        for pending, spec in zip(batch, reqs):  # where the model reads whether its caller gave up
            flag = spec["c"] = pending.flag = instance.take_flag()
            if flag >= 0:
                pending.instance = instance
        instance.execute({"t": "x", "reqs": reqs}, Batch(self, batch, blocks))

    def wake(self) -> None:
        """A request for this model has arrived and is about to be parsed: the worker that will take it (the
        scheduler's pick: the first idle instance) is told to poll for it from now, so that its wake-up,
        tens of microseconds (hundreds on a busy machine), overlaps the parsing instead of following the
        send. A worker that answered within its spin time is polling anyway and gets nothing; a model whose
        batches may wait longer than the poll (a dynamic batcher's queue delay) is left alone."""
        within = self.server.arrival_wake_ns
        if not within or getattr(self.scheduler, "delay_ns", 0) >= within:
            return
        for instance in self.instances:
            if instance.alive and not instance.inflight:
                if instance.prewake(within):
                    self.server.arrival_wakes += 1
                return

    def _finished(self, instance: Instance) -> None:
        if self.scheduler is not None:
            self.scheduler.on_free(instance)


class Batch:
    """Hears a worker's answer for one dispatched batch and completes its requests.

    An ordinary batch ends with the worker's answer. A decoupled one ends when that answer
    (execute has returned) and every request's final response have both arrived, in any
    order; only then are its inputs freed, since the model's threads may still read them.
    """

    __slots__ = ("version", "pendings", "blocks", "sent", "batch_id", "returned", "streamed", "moved")

    def __init__(self, version: ModelVersion, pendings: list[Pending], blocks: list) -> None:
        self.version = version
        self.pendings = pendings
        self.blocks = blocks
        self.sent = time.perf_counter_ns()
        self.batch_id = 0  # set by Instance.execute
        self.returned = False
        #: a decoupled batch's requests answered through stream(), with the batch's timings: counted as
        #: successes once the batch is over, as Triton counts them (docs/triton-behaviour.md §18)
        self.streamed: tuple | None = None
        #: a decoupled batch's requests rescheduled to a later batch (an iterative sequence's): not waited for
        self.moved: list[Pending] | None = None

    def _free_inputs(self, instance: Instance) -> None:
        """The batch is over: its input blocks and its requests' cancellation flags go back."""
        arena = self.version.server.arena
        if arena is not None:
            for block in self.blocks:
                arena.free(*block[:2])
        self.blocks = []
        moved = self.moved
        for pending in self.pendings:
            if moved and pending in moved:  # rescheduled: its flag went back then; a new batch holds it now
                continue
            if pending.flag >= 0:
                instance.put_flag(pending.flag)
                pending.flag = -1
            if pending.request.chain is not None:  # its worker is done with the links and blocks
                pending.request.chain.ended()

    def done(self, instance: Instance, results: list, timings: list, decoupled: bool, end_ns: int) -> None:
        """The worker answered (``end_ns``: when it finished, on our clock): settle each request; then their
        takers (RequestFuture.then) have their outcomes, before the event loop polls again."""
        takers = _takers
        if takers.batch is not None:  # (settled within another batch's: that one calls the takers)
            self._done(instance, results, timings, decoupled, end_ns)
            return
        taking = takers.batch = []
        try:
            self._done(instance, results, timings, decoupled, end_ns)
        finally:
            takers.batch = None
            if taking:
                _take(taking, takers)

    def _done(self, instance: Instance, results: list, timings: list, decoupled: bool, end_ns: int) -> None:
        version = self.version
        stats = version.stats
        cache = version.cache
        now = time.perf_counter_ns()
        ci, cinf, co = timings[:3]
        # A chained step's batch waited for the step before it (kernel.pipelines.ensemble): it counts as if it had
        # come and been sent when that wait ended (timings[3]), as it would have unchained.
        chained = timings[3] if len(timings) > 3 else 0
        sent = max(self.sent, chained)
        pendings = self.pendings
        if chained:  # (only a chained batch is ever skipped)
            ran = sum(p.batch_size for p, r in zip(pendings, results) if r is None or "skip" not in r)
        else:
            # (a sequence batcher's null request is a row of the batch: Triton counts the padded size)
            ran = pendings[0].batch_size if len(pendings) == 1 else sum(p.batch_size or 1 for p in pendings)
        if ran:
            stats.execution(ran, ci, cinf, co)
        sequencer = version.sequencer
        again = self._rescheduled(instance, results) if sequencer is not None else None
        if not decoupled:
            self._free_inputs(instance)
        for pending, result in zip(self.pendings, results):
            if not pending.batch_size:  # a sequence batcher's null request: nobody's answer (validate() lets no
                # client's request of batch size 0 through: it would never be answered)
                if result is not None and "out" in result:
                    _response(version, instance, pending, result).release()
                continue
            if sequencer is not None:
                if result is not None and "re" in result:  # runs again (sequencer.reschedule, below)
                    # Triton counts each step a successful inference of the request (2.51, observed)
                    stats.success(now - pending.enqueued, max(sent - pending.enqueued, 0), ci, cinf, co,
                                  pending.batch_size)
                    continue
                if result is not None:  # its last step (a decoupled request's ends with its final response)
                    sequencer.ended(pending)
            enqueued = max(pending.enqueued, chained)
            total = now - enqueued
            if result is not None and "skip" in result:  # a chained step whose input never came: no inference
                version.server.chain_skips += 1
                _settle(pending, Skipped())
                continue
            trace = pending.request.trace
            if trace is not None and (result is None or "err" in result):
                trace.computed(end_ns, ci, cinf, co, None, decoupled)
            if result is None:  # decoupled: answered through stream(), counted when the batch ends
                if self.streamed is None:
                    self.streamed = ([], max(sent, 0), ci, cinf, co)
                self.streamed[0].append(pending)
                continue
            if "err" in result:
                message, code = result["err"]
                if result.get("fail"):
                    stats.failure(total, "CANCELED" if code == "CANCELLED" else "BACKEND")
                else:  # an error response the model chose to send: Triton counts it a success
                    stats.success(total, max(sent - enqueued, 0), ci, cinf, co, pending.batch_size)
                    if cache is not None:  # a miss, but not cached (docs/triton-behaviour.md)
                        cache.store(pending, None)
                _settle(pending, ServerError(message, code))  # a decoupled stream ends with it too
                continue
            response = _response(version, instance, pending, result)
            response.timings = (ci, cinf, co)
            if trace is not None:
                trace.computed(end_ns, ci, cinf, co, response.outputs)
            stats.success(total, max(sent - enqueued, 0), ci, cinf, co, pending.batch_size)
            if cache is not None:
                cache.store(pending, response)
            _settle(pending, response)
        if again and decoupled:  # the batch ends without their final responses
            self.moved = again
        if decoupled:
            self.returned = True
            self._finish_decoupled(instance)
        else:
            version._finished(instance)
        if again:
            for pending in again:
                sequencer.reschedule(pending)

    def _rescheduled(self, instance: Instance, results: list) -> list[Pending]:
        """The requests of an iterative sequence the model asked to run again. They leave this batch
        (their cancellation flags go back; a decoupled one's stream stays open) for the sequencer to
        queue them anew; one whose caller gave up meanwhile is answered CANCELLED instead."""
        again = []
        for pending, result in zip(self.pendings, results):
            if result is None or "re" not in result:
                continue
            cancelled = pending.future.cancelled()
            if pending.flag >= 0:
                cancelled = cancelled or instance.flag_raised(pending.flag)
                instance.put_flag(pending.flag)
                pending.flag = -1
            if cancelled:
                result["err"], result["fail"] = [f"[request id: {pending.request.id or '<id_unknown>'}] Request was "
                                                 "cancelled", "CANCELLED"], True
                del result["re"]
            else:
                again.append(pending)
        return again

    def stream(self, instance: Instance, index: int, result: dict | None, final: bool) -> None:
        pending = self.pendings[index]
        callback = pending.stream
        if result is not None and "err" in result:
            message, code = result["err"]
            response: Any = ServerError(message, code)
        elif result is not None:
            response = _response(self.version, instance, pending, result)
            if pending.request.classification is not None:
                response = _classified(pending, response, self.version)
        else:
            response = None
        if callback is not None:
            callback(response, final)
        elif isinstance(response, InferResponse):
            response.release()
        if final:
            pending.stream = None
            if self.version.sequencer is not None:
                self.version.sequencer.ended(pending)
            self._finish_decoupled(instance)

    def _finish_decoupled(self, instance: Instance) -> None:
        moved = self.moved
        if self.returned and all(p.stream is None or (moved and p in moved) for p in self.pendings):
            for pending in self.pendings:  # (a decoupled trace ends once execute returned and every final came)
                if pending.request.trace is not None and not (moved and pending in moved):
                    pending.request.trace.end()
            if self.streamed is not None:
                streamed, sent, ci, cinf, co = self.streamed
                self.streamed = None
                stats = self.version.stats
                now = time.perf_counter_ns()
                for pending in streamed:
                    stats.success(now - pending.enqueued, max(sent - pending.enqueued, 0), ci, cinf, co,
                                  pending.batch_size)
            self._free_inputs(instance)
            instance.batch_finished(self.batch_id)
            self.version._finished(instance)

    def fail(self, instance: Instance, error: ServerError) -> None:
        self._free_inputs(instance)
        now = time.perf_counter_ns()
        moved = self.moved
        for pending in self.pendings:
            if moved and pending in moved:  # (answered by the batch it moved to)
                continue
            if pending.batch_size:  # (not a null request)
                self.version.stats.failure(now - pending.enqueued)
            _settle(pending, error)  # ends a decoupled stream too
            if self.version.sequencer is not None:
                self.version.sequencer.ended(pending)
        self.version._finished(instance)


def _settle(pending: Pending, outcome: Any) -> None:
    """Complete a request (through its orderer when responses must keep arrival order)."""
    orderer = pending.orderer
    if orderer is not None:
        pending.orderer = None
        orderer.complete(pending, outcome, _deliver)
    else:
        _deliver(pending, outcome)


def _deliver(pending: Pending, outcome: Any) -> None:
    trace = pending.request.trace
    if trace is not None:
        if isinstance(outcome, Skipped):
            trace.discard()
        else:
            trace.end(outcome.outputs if isinstance(outcome, InferResponse) else None)
    if pending.stream is not None and isinstance(outcome, BaseException):
        callback, pending.stream = pending.stream, None  # a decoupled request ends with the error
        callback(outcome, True)
    future = pending.future
    if type(future) is RequestFuture:
        future.pending = None
    if future.done():
        if isinstance(outcome, InferResponse):
            outcome.release()  # nobody is waiting any more (client went away)
        return
    if pending.request.classification is not None and isinstance(outcome, InferResponse):
        outcome = _classified(pending, outcome, pending.version)
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _Takers(threading.local):
    """The takers (RequestFuture.then) of the requests settled while a batch's answer is handled on this
    thread (each in-process server runs its loop on a thread of its own), called once it is."""

    batch: list | None = None
    after: list | None = None  # what the takers being called asked to run after them (RequestFuture.after_takers)


_takers = _Takers()


def _take(batch: list, takers: _Takers) -> None:
    outer, after = takers.after, []
    takers.after = after
    try:
        for then, future in batch:
            try:
                then(future)
            except Exception as e:  # noqa: BLE001 - as the loop reports a failing callback, and goes on
                future.get_loop().call_exception_handler({"message": "a request's taker failed", "exception": e,
                                                          "future": future})
    finally:
        takers.after = outer
        for fn in after:
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                asyncio.get_running_loop().call_exception_handler({"message": "a takers' follow-up failed",
                                                                   "exception": e})


def _classified(pending: Pending, response: InferResponse, version: Any) -> InferResponse | ServerError:
    """``response`` with the outputs the request asked to classify as their labels; the error (the
    response released) if an output cannot be classified."""
    try:
        return classification.apply(response, pending.request.classification, version)
    except ServerError as e:
        response.release()
        return e


def _warmup_stream(future: asyncio.Future, errors: list, response: Any, final: bool) -> None:
    """A decoupled warmup request's response: its errors are the sample's; the final one ends it."""
    if isinstance(response, ServerError):
        errors.append(response.message)
    elif isinstance(response, InferResponse):
        response.release()
    if final and not future.done():
        future.set_result(None)


def _response(version: ModelVersion, instance: Instance, pending: Pending, result: dict) -> InferResponse:
    request = pending.request
    outputs = []
    frees = []
    refs = {o.name: o.shm for o in request.outputs or () if o.shm is not None}
    for name, datatype, shape, key, offset, nbytes, region_id in result["out"]:
        if region_id:
            outputs.append(OutputTensor(name, datatype, shape, nbytes, shm=refs.get(name)))
        elif request.chain is not None and version.server.arena.owns(key):  # a chained output's front block
            outputs.append(OutputTensor(name, datatype, shape, nbytes, version.server.arena.view(key, offset, nbytes),
                                        ref=(key, offset)))
        elif nbytes:
            outputs.append(OutputTensor(name, datatype, shape, nbytes, instance.buffer(key)[offset : offset + nbytes],
                                        ref=(key, offset)))
            frees.append([key, offset])
        else:
            outputs.append(OutputTensor(name, datatype, shape, 0, memoryview(b"")))
    return InferResponse(version.name, version.version_str, request.id, outputs, result.get("p") or {},
                         _release=partial(instance.release, frees) if frees else None)


def _place_inputs(batch: list[list], arena: Arena, blocks: list) -> list[list[list]]:
    """Put a batch's inputs where the worker can map them; return each request's ``loc`` lists.

    Inputs already in shared memory (a client's region, an in-process caller's arena buffer, a
    large HTTP body received into the arena) are passed by reference. The others are copied once
    into one arena block for the whole batch, stacked: the rows of the batch's requests for one
    input lie back to back, so the input of the whole batch is one contiguous tensor and each
    request's is a slice of it.
    """
    placed = []
    stacks: dict[str, list] = {}  # input name -> [(loc, data, nbytes)] in batch order
    for inputs in batch:
        locs = []
        for t in inputs:
            data = t.data
            if isinstance(data, ShmRef):
                reg = data.region
                locs.append([t.name, t.datatype, t.shape, reg.posix_name, reg.offset + data.offset,
                             data.byte_size, reg.id])
                continue
            if isinstance(data, ArenaRef):  # already in our arena: the caller owns the block
                locs.append([t.name, t.datatype, t.shape, data.key, data.offset, data.byte_size, 0])
                continue
            if isinstance(data, np.ndarray):
                if t.datatype == "BYTES":
                    data = dtypes.serialize_bytes(data)
                elif data.size:
                    data = memoryview(np.ascontiguousarray(data)).cast("B")
                else:  # no element (a shape with a 0, served as Triton does): nothing to place, and
                    data = None  # memoryview.cast refuses a view with zeros in its shape
            nbytes = 0 if data is None else len(data) if type(data) is bytes else data.nbytes
            loc = [t.name, t.datatype, t.shape, "", 0, nbytes, 0]
            locs.append(loc)
            if nbytes:
                stacks.setdefault(t.name, []).append((loc, data, nbytes))
        placed.append(locs)
    if stacks:
        total = copied = 0
        for rows in stacks.values():
            total = round_up(total)  # each stacked input starts aligned, as arena blocks do
            size = sum(nbytes for _, _, nbytes in rows)
            total += size
            copied += size
        key, start = arena.alloc(total)
        blocks.append((key, start, copied))
        buf = arena.buffer(key)
        for rows in stacks.values():
            start = round_up(start)
            for loc, data, nbytes in rows:
                buf[start : start + nbytes] = data
                loc[3] = key
                loc[4] = start
                start += nbytes
    return placed


def _groups(config: ModelConfig) -> list[tuple]:
    """(name, kind, gpus, count, secondary devices) of each instance group."""
    return [(g.name, _KIND.get(g.kind, "CPU"), list(g.gpus), g.count, list(g.secondary_devices), g.host_policy)
            for g in config.instance_group]


def _bytes_problem(buf: Any, count: int, name: str, prefix: str, model: str) -> str:
    """Triton's words for serialised BYTES data that does not hold ``count`` elements ("" if it does): its core
    walks the length indicators (an element cut short counts, the walk ending there), and its python backend
    refuses the data of a last element cut short."""
    mv = memoryview(buf).cast("B")
    pos, end, n = 0, len(mv), 0
    while pos < end:
        if end - pos < 4:
            return (f"{prefix}incomplete string length indicator for inference input '{name}' for model '{model}', "
                    f"expecting 4 bytes but only {end - pos} bytes available. Please make sure the string length "
                    "indicator is in one buffer.")
        length = int.from_bytes(mv[pos : pos + 4], "little")
        pos += 4
        n += 1
        if n > count:
            return (f"{prefix}unexpected number of string elements {n} for inference input '{name}' for model "
                    f"'{model}', expecting {count}")
        if length > end - pos:
            if n == count:
                return (f"incomplete string data for inference input '{name}', expecting string of length {length} "
                        f"but only {end - pos} bytes available")
            break
        pos += length
    if n != count:
        return f"{prefix}expected {count} string elements for inference input '{name}' for model '{model}', got {n}"
    return ""


def _matches(shape: list[int], dims: list[int]) -> bool:
    if len(shape) != len(dims):
        return False
    return all(d == -1 or s == d or s == -1 for s, d in zip(shape, dims))


def _shape(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _names(names: list[str]) -> str:
    return "[" + ",".join(f"'{n}'" for n in names) + "]"


_BATCH_NOTE = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be "
               "prepended to each input shape. If you want to specify the full shape including the batch dim in "
               "your input dims config, try setting max_batch_size to zero. See the model configuration docs for "
               "more info on max_batch_size.")
