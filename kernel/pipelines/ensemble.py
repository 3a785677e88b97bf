"""Ensembles: models whose ``ensemble_scheduling`` chains other models (Triton's ``platform: "ensemble"``).

An ensemble has no worker of its own. Each request runs its steps as a DAG on the front's event
loop: a step is submitted, through its composing model's own scheduler (so dynamic batching and
instances apply), as soon as every ensemble tensor it reads exists. Tensors never pass through the
front's heap: a step's outputs stay in the producing worker's arena and the next step's worker maps
them by segment name and offset (:class:`~kernel.types.ArenaRef`); an ensemble output the client
asked for in its shared-memory region is written there directly by the worker of the step that
produces it. The step responses are released (their arena blocks freed) with the ensemble's response.

Load-time validation follows Triton's model_config_utils (ValidateEnsembleSchedulingConfig) and
ensemble_utils (ValidateEnsembleConfig); the messages are Triton's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from kernel import config as cfg
from kernel.cache import CachingScheduler, ModelCache
from kernel.errors import ServerError, invalid
from kernel.model import ModelVersion, Pending, Skipped, _classified, _settle
from kernel.scheduling.scheduler import Scheduler
from kernel.tracing import TENSORS
from kernel.types import ArenaRef, InferRequest, InferResponse, InputTensor, OutputTensor, RequestedOutput, ShmRef
from shm import dtypes
from shm.link import FAILED, OK

if TYPE_CHECKING:
    from kernel.model_config_pb2 import ModelConfig

log = logging.getLogger("kernel.pipelines.ensemble")

ENSEMBLE = "ensemble"
#: Wake hints (see _Run._prewake): sent for steps answering within PREWAKE_MAX_NS; the worker polls for
#: their usual answer time plus a quarter plus PREWAKE_MARGIN_NS (PREWAKE_DEFAULT_NS when still unknown).
PREWAKE_MAX_NS = 3_000_000
PREWAKE_MARGIN_NS = 200_000
PREWAKE_DEFAULT_NS = 1_000_000
#: A chained step's worker sleeps until this long before its input should be placed, then polls for it.
CHAIN_LEAD_NS = 300_000


def _step_error(error: Exception, ensemble: str, step: Step) -> ServerError:
    """What a step that could not even be submitted fails its ensemble request with."""
    if isinstance(error, ServerError):
        return error
    log.error("submitting a step of ensemble '%s' failed", ensemble, exc_info=error)
    return ServerError(f"failed to run the step of model '{step.model}': {error}", "INTERNAL")


def is_ensemble(config: ModelConfig) -> bool:
    return config.platform == ENSEMBLE or config.HasField("ensemble_scheduling")


def composing_models(config: ModelConfig) -> list[str]:
    """The models an ensemble's steps name, each once, in step order."""
    return list(dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step if s.model_name))


def check_scheduling(config: ModelConfig) -> None:
    """What Triton checks of an ensemble's own configuration (before looking at its composing models)."""
    name = config.name
    if config.platform != ENSEMBLE:
        raise invalid(f"ensemble scheduling cannot be set for model '{name}' whose platform is not ensemble")
    if len(config.instance_group):
        raise invalid(f"instance group should not be specified for ensemble '{name}'")
    if len(config.model_warmup):
        raise invalid(f"model_warmup can not be specified for ensemble '{name}'")
    steps = config.ensemble_scheduling.step
    if not steps:
        raise invalid(f"must specify 'step' for ensemble '{name}'")
    produced: dict[str, bool] = {}  # ensemble tensor -> produced by a step
    consumers: dict[str, list[int]] = {}
    producers: dict[str, int] = {}
    for index, step in enumerate(steps):
        if not step.model_name:
            raise invalid(f"must specify 'model_name' in step {index} of ensemble '{name}'")
        if not step.input_map:
            raise invalid(f"must specify 'input_map' in step {index} of ensemble '{name}'")
        if not step.output_map:
            raise invalid(f"must specify 'output_map' in step {index} of ensemble '{name}'")
        for tensor in step.output_map.values():
            if produced.get(tensor):
                raise invalid(f"ensemble tensor '{tensor}' can appear in an output map only once for ensemble "
                              f"'{name}' step {index}")
            produced[tensor] = True
            producers[tensor] = index
        for tensor in step.input_map.values():
            produced.setdefault(tensor, False)
            consumers.setdefault(tensor, []).append(index)
    # Data flow: which tensors become available from the ensemble's inputs.
    ready: set[str] = set()
    queue = []
    for t in config.input:
        if t.name not in produced:
            raise invalid(f"ensemble input '{t.name}' for ensemble {name}' is not used")
        ready.add(t.name)
        queue.append(t.name)
    done_steps: set[int] = set()
    while queue:
        tensor = queue.pop(0)
        for index in consumers.get(tensor, ()):
            if index in done_steps or not all(v in ready for v in steps[index].input_map.values()):
                continue
            done_steps.add(index)
            for out in steps[index].output_map.values():
                if out not in ready:
                    ready.add(out)
                    queue.append(out)
    outputs = set()
    for t in config.output:
        if t.name not in produced:
            raise invalid(f"ensemble output '{t.name}' for ensemble {name}' is not used")
        if t.name not in ready:
            raise invalid(f"output '{t.name}' for ensemble '{name}' is not written")
        outputs.add(t.name)
    for tensor in produced:
        if tensor in outputs:
            continue
        if tensor not in ready or not consumers.get(tensor):
            raise invalid(f"ensemble tensor '{tensor}' is unused in ensemble '{name}'")


def find_cycle(name: str, configs: Any) -> str | None:
    """Triton's message for an ensemble that depends on itself through its steps, if it does.

    ``configs(model)`` is the configuration of a model of the repository (None if unknown).
    """
    def walk(current: str, seen: set[str]) -> str | None:
        config = configs(current)
        if config is None or not is_ensemble(config):
            return None
        for upstream in composing_models(config):
            if upstream == name:
                return f"circular dependency between ensembles: {name} -> ... -> {current} -> {name}"
            if upstream not in seen:
                seen.add(upstream)
                found = walk(upstream, seen)
                if found:
                    return found
        return None

    return walk(name, set())


class _Tensor:
    """An ensemble tensor of one request."""

    __slots__ = ("datatype", "shape", "data", "output")

    def __init__(self, datatype: str, shape: list[int], data: Any, output: OutputTensor | None = None) -> None:
        self.datatype = datatype
        self.shape = shape
        self.data = data
        self.output = output  # the step output it is (None for an ensemble input)


class Step:
    """One step, resolved at load: its model and its mappings as (model tensor, ensemble tensor) pairs."""

    __slots__ = ("index", "model", "version", "inputs", "outputs")

    def __init__(self, index: int, step: Any) -> None:
        self.index = index
        self.model = step.model_name
        self.version = str(step.model_version) if step.model_version > 0 else ""
        self.inputs = sorted(step.input_map.items())
        self.outputs = sorted(step.output_map.items())


class EnsembleVersion(ModelVersion):
    """A loaded ensemble: validated against its composing models, scheduled by :class:`EnsembleScheduler`."""

    steps: list[Step]
    problem = ""  # why it cannot load, as Triton words an ensemble's failure (no version prefix)

    async def _load(self, autocomplete: bool, gpu_count: int, regions: Any, options: dict) -> None:
        try:
            await self._resolve()
        except ServerError as e:
            self.problem = e.message
            raise

    async def _resolve(self) -> None:
        config = self.config
        check_scheduling(config)
        core = self.server
        steps = [Step(i, s) for i, s in enumerate(config.ensemble_scheduling.step)]
        self.decoupled_steps: set[int] = set()
        ensemble_tensors: dict[str, tuple[str, list[int], list[int], str]] = {}
        batching = config.max_batch_size > 0
        for t in config.input:
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            ensemble_tensors[t.name] = _node(self.name, batching, cfg.datatype(t.data_type), dims)
        for t in config.output:
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            ensemble_tensors[t.name] = _node(self.name, batching, cfg.datatype(t.data_type), dims)
        for step in steps:
            mv = core.composing_version(self.name, step.model, step.version)
            mbs = mv.max_batch_size
            if mbs != 0 and mbs < config.max_batch_size:
                raise invalid(f"ensemble {self.name} allows maximum batch size {config.max_batch_size}, but it "
                              f"contains model {step.model} which only allows maximum batch size to be {mbs}")
            if mv.decoupled:
                self.decoupled_steps.add(step.index)
            _check_mapping(self.name, step, mv, ensemble_tensors)
        self.steps = steps
        # Which steps read each ensemble tensor; how many tensors each step waits for.
        self.readers: dict[str, list[Step]] = {}
        for step in steps:
            for _, tensor in step.inputs:
                self.readers.setdefault(tensor, []).append(step)
        # The steps that read a step's outputs, with how many of their inputs come from it (see _prewake).
        self.followers: dict[int, list[tuple[Step, int]]] = {}
        for step in steps:
            produced = {tensor for _, tensor in step.outputs}
            self.followers[step.index] = [(other, n) for other in steps
                                          if (n := sum(t in produced for _, t in other.inputs))]
        # Steps that may be chained to the one before them (see _Run._chain): the only follower of a step
        # that reads nothing else, when every tensor that step produces goes to it alone.
        produced_outputs = {t.name for t in config.output}
        self.chains: dict[int, Step] = {}
        for step in steps if not self.decoupled_steps else ():
            if len(self.followers[step.index]) != 1:
                continue
            follower, count = self.followers[step.index][0]
            if count == len(follower.inputs) and all(
                    t not in produced_outputs and len(self.readers.get(t, ())) == 1 for _, t in step.outputs):
                self.chains[step.index] = follower
        if self.decoupled_steps:  # as Triton: an ensemble with a decoupled step is decoupled
            config.model_transaction_policy.decoupled = True
            self.set_config(config)
        #: ``--backend-config ensemble,prewake=0`` turns the wake hints off (a machine with no core to spare)
        settings = core.backend_settings("ensemble")
        self.prewake = _on(settings, "prewake")
        #: step index -> (producer version, its outputs' (datatype, dims) or None): see _Run._block_specs
        self.block_specs: dict[int, tuple[ModelVersion, list | None]] = {}
        inputs = {t.name for t in config.input}
        self.first_steps = [step for step in steps if all(t in inputs for _, t in step.inputs)]
        #: ``--backend-config ensemble,chain=0`` sends every step through the front (see _Run._chain)
        self.chain = _on(settings, "chain") and bool(self.chains)
        self.scheduler = EnsembleScheduler(self)  # type: ignore[assignment]
        if config.response_cache.enable and core.response_cache is not None:  # Triton caches the ensemble's answer
            self.cache = ModelCache(self, core.response_cache)
            self.scheduler = CachingScheduler(self.scheduler, self.cache)  # type: ignore[assignment]

    def wake(self) -> None:
        """A request has arrived: wake the workers of the steps that run on the ensemble's inputs alone
        (ModelVersion.wake); the later steps' workers are woken while the steps before them run."""
        if not self.prewake:
            return
        core = self.server
        for step in self.first_steps:
            try:
                core.version(step.model, step.version).wake()
            except ServerError:
                pass  # its request fails with that reason

    async def unload(self, timeout: float = 30.0) -> None:
        if self.state == "READY":
            self.state = "UNLOADING"
            scheduler = self.scheduler
            for _ in range(int(timeout * 20)):
                if not (scheduler and scheduler.queued()):
                    break
                await _sleep(0.05)
        self.state = "UNAVAILABLE"
        self.reason = "unloaded"


def _on(settings: dict[str, str], key: str) -> bool:
    """An ``--backend-config ensemble,<key>=`` switch, on unless 0, false or no."""
    return settings.get(key, "1").lower() not in ("0", "false", "no")


def _idle(version: ModelVersion) -> int:
    """How many instances of ``version`` have nothing in flight."""
    return sum(1 for i in version.instances if i.alive and not i.inflight)


def _answer_ns(version: ModelVersion) -> int:
    """How long ``version``'s batches usually take to come back (its slowest instance's; 0: unknown)."""
    return max((i.answer_ns for i in version.instances), default=0)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _node(model: str, batching: bool, datatype: str, dims: list[int]) -> tuple:
    return (model, datatype, dims, ([-1] if batching else []) + dims)


def _dims(dims: list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _consistent(known: tuple, new: tuple, prefix: str) -> None:
    model_a, type_a, dims_a, full_a = known
    model_b, type_b, dims_b, full_b = new
    if type_a != type_b:
        raise invalid(f"{prefix}inconsistent data type: TYPE_{_pbtype(type_a)} is inferred from model {model_a} "
                      f"while TYPE_{_pbtype(type_b)} is inferred from model {model_b}")
    if not _compatible(dims_a, dims_b) and not _compatible(full_a, full_b):
        raise invalid(f"{prefix}inconsistent shape: {_dims(full_a)} is inferred from model {model_a} while "
                      f"{_dims(full_b)} is inferred from model {model_b}")


def _pbtype(datatype: str) -> str:
    return {"BYTES": "STRING", "BOOL": "BOOL"}.get(datatype, datatype)


def _check_mapping(ensemble: str, step: Step, mv: ModelVersion, tensors: dict) -> None:
    """Triton's ValidateTensorMapping for one step."""
    model = step.model
    batching = mv.max_batch_size > 0
    for model_input, tensor in step.inputs:
        if model_input not in mv.inputs:
            raise invalid(f"in ensemble {ensemble}, ensemble tensor {tensor} is mapping to non-existing input "
                          f"{model_input} in model {model}")
    mapped = dict(step.inputs)
    for name, spec in mv.inputs.items():
        tensor = mapped.get(name)
        if tensor is None:
            if spec.optional:
                continue
            raise invalid(f"in ensemble {ensemble}, input {name} in model {model} is not mapped to any ensemble "
                          "tensors")
        node = _node(model, batching and not spec.shape_tensor, spec.datatype, spec.dims)
        if tensor in tensors:
            _consistent(tensors[tensor], node, f"in ensemble {ensemble}, ensemble tensor {tensor}: ")
        else:
            tensors[tensor] = node
    for model_output, tensor in step.outputs:
        spec = mv.outputs.get(model_output)
        if spec is None:
            raise invalid(f"in ensemble {ensemble}, ensemble tensor {tensor} is mapped from non-existing output "
                          f"{model_output} in model {model}")
        node = _node(model, batching and not spec.shape_tensor, spec.datatype, spec.dims)
        if tensor in tensors:
            _consistent(tensors[tensor], node, f"in ensemble {ensemble}, ensemble tensor {tensor}: ")
        else:
            tensors[tensor] = node


class EnsembleScheduler:
    """Runs each request's steps as their inputs become available (no worker, no queue of its own)."""

    def __init__(self, version: EnsembleVersion) -> None:
        self.version = version
        self.running = 0
        self.runs: dict[Pending, _Run] = {}  # in flight, for cancellation

    def submit(self, pending: Pending) -> None:
        run = self.runs[pending] = _Run(self, pending)
        run.start()

    def remove(self, pending: Pending) -> bool:
        """An ensemble request was cancelled: no queue to leave, but its running steps are cancelled
        (they leave their models' queues or see ``is_cancelled()``); it ends CANCELLED once they end."""
        run = self.runs.get(pending)
        if run is not None:
            run.cancel()
        return False

    def on_free(self, instance: Any) -> None:
        pass

    def queued(self) -> int:
        return self.running

    def drain(self) -> list[Pending]:
        return []


class _Branch:
    """The ensemble tensors of one line of a request's execution, and what each step still waits for.

    A request has one; each response of a decoupled step starts another (a copy), in which the steps
    after it run once more, as in Triton."""

    __slots__ = ("tensors", "waiting")

    def __init__(self, tensors: dict[str, _Tensor], waiting: dict[int, int]) -> None:
        self.tensors = tensors
        self.waiting = waiting

    def fork(self) -> _Branch:
        return _Branch(dict(self.tensors), dict(self.waiting))


class _Run:
    """One ensemble request in flight."""

    __slots__ = ("scheduler", "version", "pending", "root", "responses", "outstanding", "failed", "error", "dests",
                 "wanted", "holds", "emitted", "steps", "links", "held")

    def __init__(self, scheduler: EnsembleScheduler, pending: Pending) -> None:
        self.scheduler = scheduler
        self.version = scheduler.version
        self.pending = pending
        self.root = _Branch({}, {step.index: len(step.inputs) for step in self.version.steps})
        self.responses: list[InferResponse] = []
        self.outstanding = 0
        self.failed = False
        self.error: ServerError | None = None  # the first step's error
        request = pending.request
        self.wanted = [o.name for o in request.outputs] if request.outputs else list(self.version.outputs)
        #: ensemble outputs the client wants written into its shared-memory region
        self.dests = {o.name: o.shm for o in request.outputs or () if o.shm is not None}
        self.holds = 1  # decoupled: the run itself, and each response sent and not yet released
        self.emitted = 0
        self.steps: set[asyncio.Future] = set()  # the futures of the steps in flight (to cancel them)
        self.links: dict[int, _Link] = {}  # chained steps: a step's index -> the link its follower waits on
        self.held: list[_Link] = []  # every link the run made (a step run again the usual way makes another)

    def start(self) -> None:
        self.scheduler.running += 1
        ready = []
        for t in self.pending.request.inputs:
            ready.append(t.name)
            self.root.tensors[t.name] = _Tensor(t.datatype, t.shape, t.data)
        self._arrived(self.root, ready)
        self._maybe_finish()

    def _arrived(self, branch: _Branch, names: list[str]) -> None:
        readers = self.version.readers
        waiting = branch.waiting
        for name in names:
            for step in readers.get(name, ()):
                waiting[step.index] -= 1
                if waiting[step.index] == 0 and not self.failed:
                    self._launch(branch, step)
        if self.version.decoupled and not self.failed and any(n in self.wanted for n in names) \
                and all(n in branch.tensors for n in self.wanted):
            self._emit(branch)

    def _launch(self, branch: _Branch, step: Step, link: _Link | None = None) -> None:
        """Submit ``step`` on its inputs: the branch's tensors, or, for a chained step (``link``), the
        blocks its producer is still filling."""
        request = self.pending.request
        if link is None:
            tensors = branch.tensors
            inputs = []
            for model_input, name in step.inputs:
                t = tensors[name]
                inputs.append(InputTensor(model_input, t.datatype, t.shape, t.data))
        else:
            inputs = link.inputs
        outputs = [RequestedOutput(model_output, shm=self.dests.get(name)) for model_output, name in step.outputs]
        sub = InferRequest(step.model, step.version, request.id, inputs, outputs, request.parameters)
        core = self.version.server
        if request.trace is not None:  # each step's request is a child of the ensemble request's trace
            sub.trace = request.trace.child(core.tracer)
        if step.index in self.version.decoupled_steps:
            self.outstanding += 1
            try:
                ends = core.stream(sub, lambda r, final, step=step: self._streamed(branch, step, r, final))
            except Exception as e:  # noqa: BLE001 - a bug must fail the request, never leave it hanging
                self.outstanding -= 1
                self._fail(_step_error(e, self.version.name, step))
                return
            self.steps.add(ends)
            ends.add_done_callback(self.steps.discard)
            return
        # (a trace of tensor values reads a step's inputs as it is queued: a chained step's are not there yet)
        traced = sub.trace is not None and sub.trace.level & TENSORS
        out = self._chain(step, sub, link) if self.version.chain and not traced else None
        ends = sub.chain = _Ends(link, out) if link is not None or out is not None else None
        try:
            future = core.submit(sub)
        except Exception as e:  # noqa: BLE001 - a bug must fail the request, never leave it hanging
            e = _step_error(e, self.version.name, step)
            if ends is not None:
                ends.ended()
            if out is not None:
                self._unlink(step, out)
            if link is None:
                self._fail(e)
            # else: a chained step refused at once; the step it follows runs it the usual way once done
            return
        if future.done():  # failed before or as it reached a worker (inputs not placed, instance gone)
            if ends is not None:
                ends.ended()  # (nothing if its batch was sent and has ended already)
            if out is not None:
                self._unlink(step, out)
        elif link is not None:
            link.running = True
            core.chained_steps += 1
        self.outstanding += 1
        self.steps.add(future)
        future.add_done_callback(lambda f, step=step: self._step_done(branch, step, f))
        if out is None:
            self._prewake(branch, step, link.expect_ns if link is not None else 0)
        elif not future.done():
            # (if the follower is refused now, it runs the usual way once this step is done)
            self._launch(branch, self.version.chains[step.index], out)

    def _unlink(self, step: Step, link: _Link) -> None:
        """``step`` never reached a worker: nothing will use ``link`` (the run's hold goes now)."""
        self.links.pop(step.index, None)
        self.held.remove(link)
        link.end()

    def _chain(self, step: Step, sub: InferRequest, link: _Link | None) -> _Link | None:
        """Chain the next step to ``step``: both are sent at once, ``step``'s outputs go to blocks of
        the front's arena that the next step's batch names as its inputs, and the next step's worker
        starts when ``step``'s worker posts the link (shm.link), without waiting for the front.

        A hop through the front costs ~100 µs (the answer to the front, its work, the next batch to
        the next worker); a link costs a few. Only when it cannot block anything: both models have
        an idle instance and nothing queued (so each chained batch heads its worker's line and waits
        only for a batch sent before it: no cycle of waits), no dynamic or sequence batching, and
        ``step``'s outputs have fixed shapes (so the blocks can be sized now). The follower's worker
        sleeps while ``step`` is far from done and polls for its post near the end.
        """
        follower = self.version.chains.get(step.index)
        core = self.version.server
        if follower is None or core.links is None or not core.free_links or step.model in core.bls_models:
            return None
        try:
            producer = core.version(step.model, step.version)
            consumer = core.version(follower.model, follower.version)
        except ServerError:
            return None
        if type(producer.scheduler) is not Scheduler or type(consumer.scheduler) is not Scheduler \
                or producer.scheduler.queue or consumer.scheduler.queue:
            return None
        # ``step`` is about to take an idle instance (a chained step's was counted when it was chained),
        # the follower needs another.
        if producer is consumer:
            if _idle(consumer) < 2:
                return None
        elif (link is None and not _idle(producer)) or not _idle(consumer):
            return None
        expect = _answer_ns(producer) or PREWAKE_DEFAULT_NS
        if expect > PREWAKE_MAX_NS:
            return None
        # The blocks: one per output, sized from the producer's configuration.
        specs = self._block_specs(step, producer)
        if specs is None:
            return None
        batch = [sub.inputs[0].shape[0]] if producer.max_batch_size > 0 and sub.inputs and sub.inputs[0].shape \
            else []
        tensors = []  # (datatype, shape, byte size) of each output, in step.outputs' (and sub.outputs') order
        for datatype, dims in specs:
            shape = batch + dims
            tensors.append((datatype, shape, dtypes.byte_size(datatype, shape)))
        arena = core.arena
        blocks = []
        for _, _, nbytes in tensors:
            try:
                key, offset = arena.alloc(nbytes)
            except Exception:  # noqa: BLE001 - /dev/shm full: no chain, the usual way may still work
                for block in blocks:
                    arena.free(*block)
                return None
            blocks.append((key, offset))
        out = _Link(core, step.model, core.free_links.pop(), blocks,
                    (link.expect_ns if link is not None else 0) + expect)
        by_tensor = {}
        for (_, name), requested, (key, offset), (datatype, shape, nbytes) in zip(step.outputs, sub.outputs,
                                                                                 blocks, tensors):
            by_tensor[name] = (datatype, shape, ArenaRef(key, offset, nbytes))
            requested.arena = [key, offset, nbytes, shape, datatype]
        out.inputs = [InputTensor(model_input, *by_tensor[name]) for model_input, name in follower.inputs]
        self.links[step.index] = out
        self.held.append(out)
        return out

    def _block_specs(self, step: Step, producer: ModelVersion) -> list[tuple[str, list[int]]] | None:
        """(datatype, dims) of ``step``'s outputs as ``producer`` configures them, in ``step.outputs``' order;
        None when one cannot be chained (BYTES, variable or reshaped dims). Read from the configuration once
        per producer version: protobuf's accessors cost tens of microseconds a request here."""
        cached = self.version.block_specs.get(step.index)
        if cached is not None and cached[0] is producer:
            return cached[1]
        configured = {o.name: o for o in producer.config.output}
        specs: list[tuple[str, list[int]]] | None = []
        for model_output, _ in step.outputs:
            o = configured.get(model_output)
            datatype = cfg.datatype(o.data_type) if o is not None else "BYTES"
            if o is None or o.HasField("reshape") or any(d < 0 for d in o.dims) or datatype == "BYTES":
                specs = None
                break
            specs.append((datatype, list(o.dims)))
        self.version.block_specs[step.index] = (producer, specs)
        return specs

    def _prewake(self, branch: _Branch, step: Step, after: int = 0) -> None:
        """While ``step`` runs, wake the worker of each step it alone still holds back, so that worker
        polls for its batch instead of sleeping when the batch comes (a wake-up costs hundreds of
        microseconds per step on a busy machine). Only for steps that answer within PREWAKE_MAX_NS;
        ``after``: how long a chained ``step`` should wait for its own inputs first."""
        followers = self.version.followers[step.index]
        if not followers or not self.version.prewake:
            return
        core = self.version.server
        expect = self._usual_answer_ns(step)
        if expect is None:
            return
        expect = expect or PREWAKE_DEFAULT_NS
        if expect > PREWAKE_MAX_NS:
            return
        for follower, count in followers:
            if branch.waiting[follower.index] != count:
                continue  # it waits for other steps too
            try:
                target = core.version(follower.model, follower.version)
            except ServerError:
                continue
            for instance in target.instances:
                if instance.alive and not instance.inflight:
                    instance.prewake(after + expect + (expect >> 2) + PREWAKE_MARGIN_NS)
                    break

    def _expect(self, step: Step) -> None:
        """A chained ``step`` runs now (its producer answered): poll for its answer until it usually comes.
        Sent long before, its batch's own polling (Spinner.kick at the send) ended while it waited; a
        sleeping loop would notice the answer only after a wake-up."""
        expect = self._usual_answer_ns(step)
        if expect is not None:
            self.version.server.spinner.kick(expect)

    def _usual_answer_ns(self, step: Step) -> int | None:
        """How long the model of ``step`` usually takes to answer (0: not known yet); None when it is not
        serving."""
        try:
            return _answer_ns(self.version.server.version(step.model, step.version))
        except ServerError:
            return None

    def _step_done(self, branch: _Branch, step: Step, future: Any) -> None:
        self.outstanding -= 1
        self.steps.discard(future)
        if future.cancelled():
            self._fail(ServerError(f"the step of model '{step.model}' was cancelled", "INTERNAL"))
        else:
            error = future.exception()
            if isinstance(error, Skipped):
                pass  # a chained step whose producer posted no outputs: the producer's own end decides
            elif error is not None:
                self._fail(error if isinstance(error, ServerError) else ServerError(str(error), "INTERNAL"))
            else:
                response = future.result()
                link = self.links.get(step.index)
                if link is not None and link.running and link.core.links is not None \
                        and link.core.links.status(link.slot) == OK and not self.failed:
                    # its follower already runs on these outputs
                    self.responses.append(response)
                    follower = self.version.chains[step.index]
                    branch.waiting[follower.index] = 0
                    self._expect(follower)
                else:
                    self._outputs(branch, step, response)
        self._maybe_finish()

    def _streamed(self, branch: _Branch, step: Step, response: Any, final: bool) -> None:
        """A response (or the end) of a decoupled step: the steps after it run on its outputs, in a branch
        of their own."""
        if isinstance(response, InferResponse):
            if response.error is not None:
                response.release()
                self._fail(response.error)
            else:
                self._outputs(branch.fork(), step, response)
        elif isinstance(response, BaseException):
            self._fail(response if isinstance(response, ServerError) else ServerError(str(response), "INTERNAL"))
        if final:
            self.outstanding -= 1
            self._maybe_finish()

    def _outputs(self, branch: _Branch, step: Step, response: InferResponse) -> None:
        if self.failed:
            response.release()
            return
        self.responses.append(response)
        by_name = {o.name: o for o in response.outputs}
        arrived = []
        for model_output, name in step.outputs:
            out = by_name.get(model_output)
            if out is None:
                continue
            branch.tensors[name] = _Tensor(out.datatype, out.shape, _reference(out), out)
            arrived.append(name)
        self._arrived(branch, arrived)

    def cancel(self) -> None:
        """The client gave up: no further step starts, those running are cancelled."""
        self._fail(ServerError("Request was cancelled", "CANCELLED"))
        for future in list(self.steps):
            future.cancel()

    def _fail(self, error: ServerError) -> None:
        if not self.failed:
            self.failed = True
            for link in self.held:
                link.fail()  # chained steps still waiting give up
            # Triton names the ensemble in front of the step's message
            self.error = ServerError(f"in ensemble '{self.version.name}', {error.message}", error.code)

    def _response(self, branch: _Branch, release: Any) -> InferResponse:
        outputs = []
        for name in self.wanted:
            t = branch.tensors[name]
            out = t.output
            outputs.append(OutputTensor(name, t.datatype, t.shape, out.byte_size, out.data, out.shm, out.ref))
        version = self.version
        return InferResponse(version.name, version.version_str, self.pending.request.id, outputs, _release=release)

    def _emit(self, branch: _Branch) -> None:
        """A decoupled ensemble's response: sent as soon as a branch has every output."""
        callback = self.pending.stream
        if callback is None:
            return
        self.holds += 1
        self.emitted += 1
        response = self._response(branch, _Once(self._drop))
        if self.pending.request.classification is not None:
            response = _classified(self.pending, response, self.version)
        callback(response, False)

    def _drop(self) -> None:
        self.holds -= 1
        if not self.holds:
            self._release()

    def _maybe_finish(self) -> None:
        if self.outstanding:
            return
        held, self.held = self.held, []  # every step has ended: the run needs its links no more
        for link in held:
            link.end()
        version = self.version
        pending = self.pending
        self.scheduler.running -= 1
        self.scheduler.runs.pop(pending, None)
        total = time.perf_counter_ns() - pending.enqueued
        if not self.failed and not version.decoupled and any(self.root.waiting.values()):
            self._fail(ServerError("ensemble request ended with steps not run", "INTERNAL"))  # not reachable
        if self.failed:
            self._drop()
            version.stats.failure(total, "CANCELED" if self.error.code == "CANCELLED" else "BACKEND")
            _settle(pending, self.error)
            return
        # As Triton reports an ensemble: one execution per request, its compute times the sums of its steps'.
        ci = cinf = co = 0
        for step_response in self.responses:
            if step_response.timings is not None:
                ci += step_response.timings[0]
                cinf += step_response.timings[1]
                co += step_response.timings[2]
        stats = version.stats
        stats.execution(pending.batch_size, ci, cinf, co)
        stats.success(total, 0, ci, cinf, co, pending.batch_size)
        if version.decoupled:
            if pending.request.trace is not None:  # (settled here, not through kernel.model._deliver)
                pending.request.trace.end()
            callback, pending.stream = pending.stream, None
            self._drop()
            if callback is not None:
                callback(None, True)
            if not pending.future.done():
                pending.future.set_result(None)
            return
        response = self._response(self.root, self._release)
        if version.cache is not None:
            version.cache.store(pending, response)
        _settle(pending, response)

    def _release(self) -> None:
        responses, self.responses = self.responses, []
        for response in responses:
            response.release()


class _Link:
    """A chained step's link to the step it follows: a slot of the front's link board (shm.link) and the
    blocks of the front's arena that carry the tensors between them.

    Both go back once nothing can touch them: when the run has ended and each batch that names
    them has been answered by its worker (or its worker died), ``holds`` counting those.
    """

    __slots__ = ("core", "producer", "slot", "blocks", "expect_ns", "inputs", "holds", "running")

    def __init__(self, core: Any, producer: str, slot: int, blocks: list, expect_ns: int) -> None:
        self.core = core
        self.producer = producer  # the model posting it (Core.bls_called fails its links)
        self.slot = slot
        self.blocks = blocks
        self.expect_ns = expect_ns  # from now until the producer should post
        self.inputs: list[InputTensor] = []  # the follower's, in the blocks
        self.holds = 1  # the run's
        self.running = False  # the follower's batch was sent, waiting on this link
        core.links.reset(slot)
        core.producing.setdefault(producer, set()).add(self)

    def wait_args(self) -> list[int]:
        """The follower worker's wait (shm.link.LinkBoard.wait): sleep until a little before the producer
        should post (CHAIN_LEAD_NS or a quarter of the wait, whichever is longer: the wake-up from that
        sleep may be late), then poll until well after it should have (half the wait again, and a margin)."""
        expect = self.expect_ns
        now = time.perf_counter_ns()  # CLOCK_MONOTONIC, the worker's clock too: deadlines, not durations,
        # so that the worker's own wake-up before it reads its batch does not push them back
        return [self.slot, now + expect - max(CHAIN_LEAD_NS, expect >> 2), now + expect + (expect >> 1)
                + PREWAKE_MARGIN_NS]

    def fail(self) -> None:
        """The producer will not post (failed, cancelled, its worker gone, it called another model): release
        the waiter. Posts even when a status is written: a producer killed between its status and its post
        would leave the waiter asleep (an extra post is harmless, the slot is reset before its next use)."""
        links = self.core.links
        if links is not None and self.holds:
            links.post(self.slot, FAILED)

    def end(self) -> None:
        self.holds -= 1
        if self.holds:
            return
        core = self.core
        core.producing.get(self.producer, set()).discard(self)
        if core.arena is not None:
            for block in self.blocks:
                core.arena.free(*block)
        if core.links is not None:
            core.free_links.append(self.slot)
        self.blocks = []


class _Ends:
    """A chained step's request: the link its batch waits on and the link it posts (either may be None)."""

    __slots__ = ("wait", "post", "over")

    def __init__(self, wait: _Link | None, post: _Link | None) -> None:
        self.wait = wait
        self.post = post
        self.over = False
        for link in (wait, post):
            if link is not None:
                link.holds += 1  # until the batch's worker answers or is gone (kernel.model.Batch)

    def describe(self, spec: dict) -> None:
        """What the worker needs in the batch message (kernel.model.ModelVersion.dispatch)."""
        if self.wait is not None:
            spec["w"] = self.wait.wait_args()
        if self.post is not None:
            spec["k"] = self.post.slot

    def ended(self) -> None:
        """The batch is over (its worker answered or is gone), or it never reached a worker."""
        if self.over:
            return
        self.over = True
        if self.post is not None:
            self.post.fail()  # (no effect if the worker posted)
            self.post.end()
        if self.wait is not None:
            self.wait.end()


class _Once:
    """Calls ``fn`` the first time it is called (a response's release may be called more than once)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def _reference(out: OutputTensor) -> Any:
    """A step output as the next step's input data, without copying its bytes."""
    if out.shm is not None:
        return ShmRef(out.shm.region, out.shm.offset, out.byte_size)
    if out.ref is not None:
        # ``owner``: the bytes themselves, which validation reads for BYTES element counts
        return ArenaRef(out.ref[0], out.ref[1], out.byte_size, out.data)
    return out.data if out.data is not None else memoryview(b"")
