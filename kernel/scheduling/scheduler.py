"""Schedulers: feed a model version's queued requests to its instances.

Everything here runs on the front's event loop and never blocks. Triton's two
schedulers for stateless models:

* :class:`Scheduler` (no ``dynamic_batching``): first come, first served, each
  request executed on its own by the least busy instance;
* :class:`DynamicBatcher`: priority levels with queue policies (timeouts that
  reject or delay, queue size limits), batches formed like Triton's dynamic
  batcher (preferred sizes first, ``max_queue_delay_microseconds`` bounds the
  wait, requests whose shapes differ are not batched together), optionally
  answered in arrival order (``preserve_ordering``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any

from kernel.errors import ServerError

if TYPE_CHECKING:
    from kernel.instance import Instance
    from kernel.model import ModelVersion, Pending
    from kernel.model_config_pb2 import ModelDynamicBatching, ModelQueuePolicy

#: Batches the default scheduler lets one instance hold: one executing, one
#: waiting in its ring, so the worker never idles for a round trip through the front.
PIPELINE_DEPTH = 2


class Scheduler:
    """The default scheduler: first come, first served, one request per execution."""

    def __init__(self, version: ModelVersion, depth: int = PIPELINE_DEPTH) -> None:
        self.version = version
        self.depth = depth
        self.queue: collections.deque[Pending] = collections.deque()

    def submit(self, pending: Pending) -> None:
        self.queue.append(pending)
        self._pump()

    def on_free(self, instance: Instance) -> None:
        self._pump()

    def _pump(self) -> None:
        queue = self.queue
        while queue:
            instance = self._pick()
            if instance is None:
                return
            self.version.dispatch(instance, [queue.popleft()])

    def _pick(self) -> Instance | None:
        best = None
        for instance in self.version.instances:
            if not instance.alive or instance.inflight >= self.depth:
                continue
            if best is None or instance.inflight < best.inflight:
                best = instance
        return best

    def queued(self) -> int:
        return len(self.queue)

    def remove(self, pending: Pending) -> bool:
        """Take a cancelled request out of the queue (False: not queued, already dispatched)."""
        try:
            self.queue.remove(pending)
        except ValueError:
            return False
        return True

    def drain(self) -> list[Pending]:
        """Take every queued request out (for unloading)."""
        pending = list(self.queue)
        self.queue.clear()
        return pending


class _Level:
    """The queue of one priority level, with its queue policy."""

    __slots__ = ("queue", "delayed", "reject", "timeout_us", "override", "max_size")

    def __init__(self, policy: ModelQueuePolicy) -> None:
        self.queue: collections.deque[Pending] = collections.deque()
        self.delayed: collections.deque[Pending] = collections.deque()  # timed out, DELAY action
        self.reject = policy.timeout_action == 0  # REJECT
        self.timeout_us = policy.default_timeout_microseconds
        self.override = policy.allow_timeout_override
        self.max_size = policy.max_queue_size

    def __len__(self) -> int:
        return len(self.queue) + len(self.delayed)


class Orderer:
    """Delivers outcomes in the order requests arrived (``preserve_ordering``)."""

    def __init__(self) -> None:
        self.waiting: collections.deque[Pending] = collections.deque()

    def complete(self, pending: Pending, outcome: Any, deliver: Any) -> None:
        pending.outcome = outcome
        waiting = self.waiting
        while waiting and waiting[0].outcome is not None:
            head = waiting.popleft()
            deliver(head, head.outcome)


class Batching(Scheduler):
    """A scheduler whose batches may wait (a queue delay): one wake-up on the front's loop, the earliest
    asked for, runs ``_pump`` again."""

    def __init__(self, version: ModelVersion, depth: int = PIPELINE_DEPTH) -> None:
        super().__init__(version, depth)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _arm(self, wait_ns: int) -> None:
        loop = self._loop
        if loop is None:  # kept: asyncio.get_running_loop() makes a getpid() system call on CPython < 3.12
            loop = self._loop = asyncio.get_running_loop()
        at = loop.time() + wait_ns / 1e9
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._pump()


class DynamicBatcher(Batching):
    """Triton's dynamic batcher over the instances of one model version."""

    def __init__(self, version: ModelVersion, config: ModelDynamicBatching) -> None:
        super().__init__(version, depth=1)
        self.max_batch = max(version.max_batch_size, 1)
        self.preferred = frozenset(config.preferred_batch_size)
        self.max_preferred = max(self.preferred) if self.preferred else self.max_batch
        self.delay_ns = config.max_queue_delay_microseconds * 1000
        levels = config.priority_levels
        self.default_level = config.default_priority_level if levels else 0
        self.levels: dict[int, _Level] = {}
        for level in range(1, levels + 1) if levels else (0,):
            policies = config.priority_queue_policy
            self.levels[level] = _Level(policies[level] if level in policies else config.default_queue_policy)
        self.order = [self.levels[k] for k in sorted(self.levels)]
        self.timeouts = any(lv.timeout_us or lv.override for lv in self.order)
        self.orderer = Orderer() if config.preserve_ordering else None
        self.count = 0

    # -- admission ------------------------------------------------------
    def submit(self, pending: Pending) -> None:
        request = pending.request
        params = request.parameters
        priority = params.get("priority", 0)
        if not isinstance(priority, int) or priority <= 0 or priority not in self.levels:
            priority = self.default_level
        level = self.levels[priority]
        if level.max_size and len(level) >= level.max_size:
            self.version.stats.failure(0, "REJECTED")
            raise ServerError(f"[request id: {request.id or '<id_unknown>'}] Exceeds maximum queue size",
                              "UNAVAILABLE")
        timeout_us = level.timeout_us
        requested = params.get("timeout", 0) if level.override else 0
        if isinstance(requested, int) and requested > 0 and (timeout_us == 0 or requested < timeout_us):
            timeout_us = requested  # a default of 0 means no timeout, so any request timeout is shorter
        pending.deadline = pending.enqueued + timeout_us * 1000 if timeout_us else 0
        if self.orderer is not None:
            pending.orderer = self.orderer
            self.orderer.waiting.append(pending)
        if not self.count and not self.delay_ns and not self.timeouts:
            instance = self._pick()
            if instance is not None:  # alone, and nothing to wait for: the batch _form would make, made at once
                self.version.dispatch(instance, [pending])
                return
        level.queue.append(pending)
        self.count += 1
        self._pump()

    def queued(self) -> int:
        return self.count

    def remove(self, pending: Pending) -> bool:
        for level in self.order:
            for queue in (level.queue, level.delayed):
                try:
                    queue.remove(pending)
                except ValueError:
                    continue
                self.count -= 1
                return True
        return False

    # -- batching -------------------------------------------------------
    def _pump(self) -> None:
        now = time.perf_counter_ns()
        if self.timeouts:
            self._expire(now)
        while self.count:
            instance = self._pick()
            if instance is None:
                break
            batch, wait_ns = self._form(now)
            if batch:
                self.version.dispatch(instance, batch)
                now = time.perf_counter_ns()
                continue
            if wait_ns:
                self._arm(wait_ns)
            break
        if self.timeouts and self.count:
            closest = min((p.deadline for lv in self.order for p in lv.queue if p.deadline), default=0)
            if closest:
                self._arm(max(closest - now, 1000))

    def _form(self, now: int) -> tuple[list[Pending], int]:
        """The batch to execute now, or how long to wait for a better one (ns)."""
        taken: list[Pending] = []
        size = best = best_count = 0
        send_now = False
        key = None  # the shape key of the batch's first request, made once a second one is in view
        oldest = now
        preferred, max_pref, max_batch = self.preferred, self.max_preferred, self.max_batch
        for level in self.order:
            for queue in (level.queue, level.delayed):
                for pending in queue:
                    bs = max(pending.batch_size, 1)
                    if taken:
                        if size + bs > max_pref and not best:
                            best, best_count = size, len(taken)
                        if key is None:
                            key = _shape_key(taken[0])
                        if size + bs > max_batch or _shape_key(pending) != key:
                            send_now = True
                            break
                    taken.append(pending)
                    oldest = min(oldest, pending.enqueued)
                    size += bs
                    if size in preferred:
                        best, best_count = size, len(taken)
                if send_now:
                    break
            if send_now:
                break
        if not taken:
            return [], 0
        age = now - oldest
        delay_exceeded = self.delay_ns and age >= self.delay_ns
        if best and not delay_exceeded:
            taken = taken[:best_count]
        elif not (send_now or size >= max_pref or delay_exceeded or not self.delay_ns):
            return [], self.delay_ns - age
        self._remove(len(taken))
        return taken, 0

    def _remove(self, n: int) -> None:
        """Pop the first ``n`` requests in scheduling order."""
        self.count -= n
        for level in self.order:
            for queue in (level.queue, level.delayed):
                while n and queue:
                    queue.popleft()
                    n -= 1
            if not n:
                return

    def _expire(self, now: int) -> None:
        """Apply the queue policies to requests whose timeout has passed."""
        for level in self.order:
            queue = level.queue
            if not any(p.deadline and p.deadline < now for p in queue):
                continue
            keep: collections.deque[Pending] = collections.deque()
            for pending in queue:
                if pending.deadline and pending.deadline < now:
                    if level.reject:
                        self.count -= 1
                        self.version.reject(pending, ServerError("Request timeout expired", "UNAVAILABLE"))
                    else:
                        pending.deadline = 0
                        level.delayed.append(pending)
                else:
                    keep.append(pending)
            level.queue = keep

    def drain(self) -> list[Pending]:
        out = [p for lv in self.order for q in (lv.queue, lv.delayed) for p in q]
        for lv in self.order:
            lv.queue.clear()
            lv.delayed.clear()
        self.count = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return out


def _shape_key(pending: Pending) -> tuple:
    """Requests with equal keys (their inputs' shapes past the batch dimension) may share a batch; made
    when first compared (a request alone in the queue never is)."""
    key = pending.shape_key
    if key is None:
        key = pending.shape_key = tuple((t.name, tuple(t.shape[1:])) for t in pending.request.inputs)
    return key


def make_scheduler(version: ModelVersion) -> Scheduler:
    """The scheduler a model version's configuration asks for."""
    config = version.config
    if config.HasField("sequence_batching"):
        from kernel.scheduling.sequence import SequenceBatcher  # (it builds on this module)

        return SequenceBatcher(version, config.sequence_batching)
    if config.HasField("dynamic_batching"):
        return DynamicBatcher(version, config.dynamic_batching)
    return Scheduler(version)
