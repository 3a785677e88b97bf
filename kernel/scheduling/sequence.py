"""Triton's sequence batcher: a stateful model sees each sequence's requests in order, on one instance.

A sequence is the requests that share a correlation ID (the ``sequence_id`` request parameter, an
integer or a string), from the one flagged ``sequence_start`` to the one flagged ``sequence_end``. The
model keeps state between them in its own memory (a python model's dict, a recurrent net's hidden
state), so every request of a sequence goes to the same instance, one after the other.

Each instance has *slots*, one per sequence it serves at a time: ``max_batch_size`` of them with the
Direct strategy, where slot i is row i of every batch (a model may keep its state per row), and
``max_candidate_sequences`` with the Oldest strategy, where each batch takes the oldest waiting
requests of the instance's sequences, at most one per sequence. A START takes a free slot (the lowest
slot index over all instances first, as Triton spreads sequences) or waits in the backlog, in arrival
order, until a sequence ends or idles out (``max_sequence_idle_microseconds``, 1 s by default). A
request of a sequence that is neither active nor waiting, without START, is refused with Triton's
error; a START for a sequence already active ends the old one early and goes on in its slot.

The configuration's control inputs (START, END, READY, CORRID) are added to each request as small
tensors, placed in shared memory with the rest of the batch. A Direct batch keeps row i for slot i: an
empty slot below the highest one with a request gets a *null request* (READY false, START and END
false, inputs of zeros shaped like a real request's), as Triton sends it. Its answer is dropped and it
counts in no statistic.

An *iterative* sequence (``iterative_sequence: true``, Triton's continuous batching) is one request
run over several executions: a request without a correlation ID gets one here, and each time the model
reschedules it (workers.backend.Request.reschedule) it goes back to the head of its sequence's queue,
so the next batch mixes it with newer requests. Its sequence, slot and implicit state included, ends
when the request is answered for good (``ended``), not at an END flag.

Everything here runs on the front's event loop, like the other schedulers (kernel.scheduling.scheduler).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel import config as cfg
from kernel.errors import invalid
from kernel.model import Pending, _settle
from kernel.model_config_pb2 import DataType, ModelSequenceBatching
from kernel.scheduling.scheduler import Batching, _shape_key
from kernel.types import InferRequest, InputTensor
from shm import dtypes

if TYPE_CHECKING:
    from kernel.instance import Instance
    from kernel.model import ModelVersion

log = logging.getLogger("kernel")

Control = ModelSequenceBatching.Control
#: Triton's default ``max_sequence_idle_microseconds``.
DEFAULT_IDLE_US = 1_000_000
#: A CORRID control of one of these types takes integer correlation IDs; TYPE_STRING takes strings.
_INTEGER_IDS = ("UINT64", "INT64", "UINT32", "INT32")


class _Sequence:
    """One active (or backlogged) sequence: where it runs and its requests not yet dispatched."""

    __slots__ = ("cid", "slots", "slot", "queue", "last", "busy")

    def __init__(self, cid: int | str) -> None:
        self.cid = cid
        self.slots: list | None = None  # its instance's slot list, once it has a slot
        self.slot = -1
        self.queue: collections.deque[Pending] = collections.deque()
        self.last = 0  # ns (perf_counter) of its last request's arrival or dispatch
        self.busy = 0  # an iterative sequence's requests executing (it is not idle meanwhile)


#: The order Triton gives the control tensors, before the request's own inputs (observed on 2.51).
_ORDER = (Control.CONTROL_SEQUENCE_READY, Control.CONTROL_SEQUENCE_CORRID, Control.CONTROL_SEQUENCE_END,
          Control.CONTROL_SEQUENCE_START)


class _Controls:
    """The control tensors the configuration asks for, per request."""

    def __init__(self, config: ModelSequenceBatching, batched: bool) -> None:
        self.shape = [1, 1] if batched else [1]
        by_name: dict[str, tuple] = {}  # one tensor with two kinds (Triton loads it): the later kind's
        self.corrid: tuple[str, str] | None = None  # (input, datatype)
        for control_input in config.control_input:
            for control in control_input.control:
                if control.kind == Control.CONTROL_SEQUENCE_CORRID:
                    self.corrid = (control_input.name, "BYTES" if control.data_type == DataType.TYPE_STRING
                                   else cfg.datatype(control.data_type))
                    by_name[control_input.name] = (control_input.name, control.kind, self.corrid[1], None, None)
                    continue
                if control.int32_false_true:
                    datatype, values = "INT32", control.int32_false_true
                elif control.fp32_false_true:
                    datatype, values = "FP32", control.fp32_false_true
                else:
                    datatype, values = "BOOL", control.bool_false_true
                false, true = (np.array(v, dtype=dtypes.NUMPY[datatype]).reshape(self.shape) for v in values)
                by_name[control_input.name] = (control_input.name, control.kind, datatype, false, true)
        found = {entry[1]: entry for entry in by_name.values()}
        if self.corrid is not None and found.get(Control.CONTROL_SEQUENCE_CORRID) is None:
            self.corrid = None
        #: (input, kind, datatype, false value, true value), in Triton's order
        self.order = [found[kind] for kind in _ORDER if kind in found]
        self.names = {name for name, *_ in self.order}

    def tensors(self, cid: int | str, start: bool, end: bool, ready: bool) -> list[InputTensor]:
        """The control tensors of one request."""
        shape = self.shape
        out = []
        for name, kind, datatype, false, true in self.order:
            if kind == Control.CONTROL_SEQUENCE_CORRID:
                if datatype == "BYTES":
                    value = np.array([str(cid).encode()], dtype=np.object_).reshape(shape)
                else:  # an unsigned 64-bit ID (or a negative one over gRPC) wraps into the control's type, as in C
                    value = np.array([cid % (1 << 64) if type(cid) is int else 0], dtype=np.uint64) \
                        .astype(dtypes.NUMPY[datatype]).reshape(shape)
            else:
                on = start if kind == Control.CONTROL_SEQUENCE_START else end if kind == Control.CONTROL_SEQUENCE_END \
                    else ready
                value = true if on else false
            out.append(InputTensor(name, datatype, list(shape), value))
        return out


def _flags(request: InferRequest) -> tuple[bool, bool]:
    params = request.parameters
    return params.get("sequence_start") is True, params.get("sequence_end") is True


class SequenceBatcher(Batching):
    """Triton's sequence batcher (Direct or Oldest) over the instances of one model version."""

    def __init__(self, version: ModelVersion, config: ModelSequenceBatching) -> None:
        super().__init__(version, depth=1)
        self.direct = config.WhichOneof("strategy_choice") != "oldest"
        self.max_batch = max(version.max_batch_size, 1)
        if self.direct:
            strategy: Any = config.direct
            self.nslots = self.max_batch
            self.delay_ns = strategy.max_queue_delay_microseconds * 1000
            utilization = strategy.minimum_slot_utilization
            self.min_ready = max(1, -int(-utilization * self.nslots // 1)) if 0 < utilization <= 1 else 1
            self.preferred: frozenset[int] = frozenset()
        else:
            strategy = config.oldest
            self.nslots = max(strategy.max_candidate_sequences, 1)
            self.delay_ns = strategy.max_queue_delay_microseconds * 1000
            self.preferred = frozenset(strategy.preferred_batch_size)
            self.min_ready = max(self.preferred) if self.preferred else self.max_batch
        self.idle_ns = (config.max_sequence_idle_microseconds or DEFAULT_IDLE_US) * 1000
        self.iterative = config.iterative_sequence
        self._next_id = 1  # an iterative model's requests without a sequence get IDs from 1 on, as in Triton
        self.controls = _Controls(config, version.max_batch_size > 0)
        corrid = self.controls.corrid
        self.string_ids: bool | None = None if corrid is None else corrid[1] == "BYTES"
        self.slots: dict[int, list[_Sequence | None]] = {}  # id(instance) -> its slots
        self.active: dict[int | str, _Sequence] = {}
        self.backlog: dict[int | str, _Sequence] = {}  # in arrival order (dicts keep it)
        self.count = 0
        self._reaper: asyncio.TimerHandle | None = None

    def _instance_slots(self, instance: Instance) -> list[_Sequence | None]:
        slots = self.slots.get(id(instance))
        if slots is None:
            slots = self.slots[id(instance)] = [None] * self.nslots
        return slots

    # -- admission ------------------------------------------------------
    def submit(self, pending: Pending) -> None:
        request = pending.request
        model = self.version.name
        cid = request.parameters.get("sequence_id", 0)
        if self.iterative and (cid == 0 or cid == ""):  # a sequence of its own, started here
            cid = self._next_id
            self._next_id += 1
            request.parameters = {**request.parameters, "sequence_id": cid, "sequence_start": True}
        elif cid == 0 or cid == "" or type(cid) not in (int, str):
            raise invalid(f"inference request to model '{model}' must specify a non-zero or non-empty correlation ID")
        if pending.batch_size > 1:
            raise invalid(f"inference request to model '{model}' must specify batch-size 1 due to requirements of "
                          "sequence batcher")
        elif self.string_ids is not None and self.string_ids != (type(cid) is str):  # (Triton after 2.51)
            name, datatype = self.controls.corrid
            given = "BYTES" if type(cid) is str else "UINT64"
            raise invalid(f"sequence batching control '{name}' data-type is '{given}', but model '{model}' expects "
                          f"'{datatype}'")
        start, _ = _flags(request)
        seq = self.active.get(cid) or self.backlog.get(cid)
        if seq is None:
            if not start:
                raise invalid(f"inference request for sequence {cid} to model '{model}' must specify the START flag "
                              "on the first request of the sequence")
            seq = _Sequence(cid)
            if not self._assign(seq):
                self.backlog[cid] = seq
        elif start and seq.slots is not None:
            log.warning("sequence %s for model '%s' has a conflict. The previous sequence did not end before this "
                        "sequence start. Previous sequence will be terminated early.", cid, model)
        seq.queue.append(pending)
        seq.last = pending.enqueued
        self.count += 1
        self._pump()

    def _assign(self, seq: _Sequence) -> bool:
        """Give ``seq`` the lowest free slot over the instances (False: none is free)."""
        best: tuple[int, int] | None = None
        for index, instance in enumerate(self.version.instances):
            slots = self._instance_slots(instance)
            for slot, held in enumerate(slots):
                if held is None:
                    if best is None or slot < best[0]:
                        best = (slot, index)
                    break
        if best is None:
            return False
        slot, index = best
        seq.slots = self._instance_slots(self.version.instances[index])
        seq.slot = slot
        seq.slots[slot] = seq
        self.active[seq.cid] = seq
        return True

    def _release(self, seq: _Sequence) -> None:
        """``seq`` ended (or idled out): its slot goes to the first sequence of the backlog."""
        if seq.slots is not None and seq.slots[seq.slot] is seq:
            seq.slots[seq.slot] = None
        if self.active.get(seq.cid) is seq:
            del self.active[seq.cid]
        seq.slots = None
        while self.backlog:
            waiting = next(iter(self.backlog.values()))
            if not self._assign(waiting):
                return
            del self.backlog[waiting.cid]

    def queued(self) -> int:
        return self.count

    def remove(self, pending: Pending) -> bool:
        cid = pending.request.parameters.get("sequence_id", 0)
        seq = self.active.get(cid) or self.backlog.get(cid)
        if seq is None:
            return False
        try:
            seq.queue.remove(pending)
        except ValueError:
            return False
        self.count -= 1
        if not seq.queue and seq.slots is None:  # a backlogged sequence left with nothing to run
            del self.backlog[cid]
        elif self.iterative and not seq.queue and not seq.busy:  # its request was all it had
            self._release(seq)
        return True

    def drain(self) -> list[Pending]:
        out = [p for table in (self.active, self.backlog) for seq in table.values() for p in seq.queue]
        for table in (self.active, self.backlog):
            for seq in table.values():
                seq.queue.clear()
                if seq.slots is not None:
                    seq.slots[seq.slot] = None
            table.clear()
        self.count = 0
        for timer in (self._timer, self._reaper):
            if timer is not None:
                timer.cancel()
        self._timer = self._reaper = None
        return out

    # -- batching -------------------------------------------------------
    def _pump(self) -> None:
        now = time.perf_counter_ns()
        wait = 0
        if self.count:
            for instance in self.version.instances:
                if not instance.alive or instance.inflight >= self.depth:
                    continue
                batch, wait_ns = self._form(self._instance_slots(instance), now)
                if batch:
                    self.version.dispatch(instance, batch)
                elif wait_ns:
                    wait = min(wait, wait_ns) if wait else wait_ns
        if wait:
            self._arm(wait)
        if self.active and self._reaper is None:
            self._arm_reaper(now)

    def _form(self, slots: list[_Sequence | None], now: int) -> tuple[list[Pending], int]:
        """The batch for an idle instance with these slots, or how long to wait for a fuller one (ns)."""
        ready = [seq for seq in slots if seq is not None and seq.queue]
        if not ready:
            return [], 0
        if not self.direct:
            ready.sort(key=lambda s: s.queue[0].enqueued)
        oldest = min(seq.queue[0].enqueued for seq in ready)
        if self.delay_ns and len(ready) < self.min_ready and now - oldest < self.delay_ns:
            return [], self.delay_ns - (now - oldest)
        key = _shape_key(ready[0].queue[0]) if len(ready) > 1 else None
        taken = [seq for seq in ready if key is None or _shape_key(seq.queue[0]) == key][: self.max_batch]
        if not self.direct and self.preferred and len(taken) not in self.preferred:
            fits = [size for size in self.preferred if size <= len(taken)]
            if fits:
                taken = taken[: max(fits)]
        batch: list[Pending] = []
        if self.direct:  # row i is slot i: empty slots below the highest taken get null requests
            by_slot = {seq.slot: seq for seq in taken}
            template = taken[0].queue[0].request
            for slot in range(max(by_slot) + 1):
                seq = by_slot.get(slot)
                batch.append(self._take(seq, now) if seq is not None else self._null(template))
        else:
            batch = [self._take(seq, now) for seq in taken]
        return batch, 0

    def _take(self, seq: _Sequence, now: int) -> Pending:
        """The next request of ``seq``, with its control tensors; its END releases the slot."""
        pending = seq.queue.popleft()
        self.count -= 1
        seq.last = now
        request = pending.request
        start, end = _flags(request)
        request.inputs[:0] = self.controls.tensors(seq.cid, start, end, True)
        if self.iterative:
            seq.busy += 1
        if end and not seq.queue:
            self._release(seq)
        return pending

    # -- iterative sequences (Triton's IterativeSequencer) ---------------
    def reschedule(self, pending: Pending) -> None:
        """The model asked for ``pending`` to run again (Request.reschedule): it goes back to the head
        of its sequence's queue, neither START nor END now, and keeps its slot."""
        request = pending.request
        seq = self.active.get(request.parameters.get("sequence_id", 0))
        if seq is None or seq.busy <= 0:  # its sequence ended meanwhile (an END it carried)
            _settle(pending, invalid(f"inference request for sequence {request.parameters.get('sequence_id')} to "
                                     f"model '{self.version.name}' must specify the START flag on the first "
                                     "request of the sequence"))
            return
        seq.busy -= 1
        del request.inputs[: len(self.controls.order)]  # (added again by _take)
        request.parameters = {**request.parameters, "sequence_start": False, "sequence_end": False}
        seq.queue.appendleft(pending)
        seq.last = pending.enqueued = time.perf_counter_ns()  # (its next step's queue time counts from now)
        self.count += 1
        self._pump()

    def ended(self, pending: Pending) -> None:
        """An iterative sequence's request was answered for good (or failed): its sequence ends, as
        Triton ends it with a cancelled END request, and its slot goes to the backlog."""
        seq = self.active.get(pending.request.parameters.get("sequence_id", 0))
        if seq is None:
            return
        seq.busy = max(seq.busy - 1, 0)
        if not seq.queue and not seq.busy:
            self._release(seq)
            self._pump()

    def _null(self, template: InferRequest) -> Pending:
        """A request for an empty slot: zeros shaped like ``template``'s inputs, READY false."""
        inputs = []
        names = self.controls.names
        for t in template.inputs:
            if t.name in names:
                continue
            count = dtypes.element_count(t.shape)
            data = np.full(count, b"", dtype=np.object_) if t.datatype == "BYTES" else \
                np.zeros(count, dtype=dtypes.NUMPY[t.datatype])
            inputs.append(InputTensor(t.name, t.datatype, list(t.shape), data.reshape(t.shape)))
        inputs[:0] = self.controls.tensors(0 if not self.string_ids else "", False, False, False)
        future = (self._loop or asyncio.get_running_loop()).create_future()
        future.cancel()  # nobody waits: its answer is released as it comes
        return Pending(InferRequest(self.version.name, self.version.version_str, inputs=inputs), future, 0)

    # -- timers ---------------------------------------------------------
    def _arm_reaper(self, now: int) -> None:
        """Wake when the sequence idle longest would time out."""
        idle = [seq.last for seq in self.active.values() if not seq.queue and not seq.busy]
        if not idle:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._reaper = loop.call_later(max(min(idle) + self.idle_ns - now, 0) / 1e9 + 1e-4, self._reap)

    def _reap(self) -> None:
        """Release the sequences idle longer than ``max_sequence_idle_microseconds``: a later request of
        theirs without START is refused, as in Triton."""
        self._reaper = None
        now = time.perf_counter_ns()
        for seq in [s for s in self.active.values() if not s.queue and not s.busy and now - s.last >= self.idle_ns]:
            log.info("sequence %s of model '%s' timed out after %d µs idle", seq.cid, self.version.name,
                     self.idle_ns // 1000)
            self._release(seq)
        self._pump()

    def on_free(self, instance: Instance) -> None:
        self._pump()
