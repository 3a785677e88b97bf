"""Schedulers: feed a model version's queued requests to its instances.

Everything here runs on the front's event loop; nothing blocks. The default
scheduler sends each request to the least busy instance as soon as one can
take it; the dynamic batcher (:class:`DynamicBatcher`) forms batches first.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel.instance import Instance
    from kernel.model import ModelVersion, Pending

#: Batches one instance may hold at once: one executing, one waiting in its ring
#: so that the worker never idles for a round trip through the front.
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

    def drain(self) -> list[Pending]:
        """Take every queued request out (for unloading)."""
        pending = list(self.queue)
        self.queue.clear()
        return pending
