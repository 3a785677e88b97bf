"""Custom metrics (``pb_utils.MetricFamily``), the worker's side: operations recorded without a round trip.

Why this design. A series must be one value for the whole server: two instances (or two models) that create
a family of the same name share it, and ``Metric`` objects with the same labels share one series, as in
Triton. So the series live in the front (kernel.custom_metrics), the one process that sees every worker and
serves /metrics. Triton's stub sends every ``increment`` to its parent and waits; here a worker never waits
to count: ``increment``/``set``/``observe`` append an operation to this buffer, and the buffer goes to the
front as one ``m`` message on the outbox *ahead of the next message the worker sends* (a batch's answer above
all). The outbox is FIFO, so the front applies a batch's operations before it sees the batch's answer: a client
that has its response and then scrapes /metrics sees them. Operations made outside that rhythm (a model's own
thread, a decoupled model after execute returned) go out with the next message, when an operation finds the
buffer older than :data:`FLUSH_AGE_S` or fuller than :data:`FLUSH_OPS`, or when the worker has idled a second.
A model that uses no metrics pays one truthiness test of an empty deque per message the worker sends.

Two things need the front's answer, asked on the outbox (``mq``) and answered on the replies ring BLS uses
(workers.bls.BlsClient.query): creating a family (its name may exist with another kind, in any model) and
``value()`` (a series shared with other instances has the value all of them made). The question goes out after
the buffer, so the answer counts this worker's own operations. Errors that depend on the metric alone (set() on
a counter, a negative increment, buckets) are raised at once, in the worker, with Triton's messages
(workers/backends/python/triton_python_backend_utils.py).

Messages, worker -> front on the outbox: ``{"t": "m", "o": [op, ...]}`` with the ops ``[0, metric, family,
labels, buckets]`` (a new metric handle: labels as ``[[name, value], ...]``, buckets a list or None), ``[1,
metric, value]`` increment, ``[2, metric, value]`` set, ``[3, metric, value]`` observe and ``[4, family]`` (the
MetricFamily object is gone, and its metrics with it); ``{"t": "mq", "q": id, "op": "f", "h": family, "n": name,
"d": description, "k": kind}`` (kind 0 counter, 1 gauge, 2 histogram) and ``{"t": "mq", "q": id, "op": "v", "h":
metric}``. Front -> worker on the replies ring: ``{"q": id, "res": {} | {"v": value} | {"err": message}, "final":
true}``. Handles are this worker's own numbers; the front forgets them when the worker stops or dies, and keeps
their series, as Triton keeps those of a stub's objects that were never deleted. So the operations of ``finalize``
(a family deleted there) go out with the worker's last message, ``stopped``.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: Operations buffered before an operation sends them (also the most one ``m`` message carries).
FLUSH_OPS = 256
#: Age of the oldest buffered operation past which the next operation sends the buffer.
FLUSH_AGE_S = 0.1

#: The reporter of this worker process (None outside a worker: pb_utils.MetricFamily then refuses).
reporter: Reporter | None = None


class Reporter:
    """Buffers a worker's metric operations and sends them to the front."""

    def __init__(self, post: Callable[[dict], None], ring: Callable[[], None],
                 ask: Callable[[dict], Any] | None) -> None:
        self.ops: collections.deque[list] = collections.deque()  # append/popleft: safe from any thread
        self._post = post  # writes a message on the outbox (no doorbell)
        self._ring = ring  # rings the front's doorbell
        self._ask = ask  # a round trip to the front (workers.bls.BlsClient.query)
        self._lock = threading.Lock()  # one flush at a time: operations leave in the order they were made
        self._since = 0.0  # when the buffer last went from empty to not
        self._handles = itertools.count(1)

    def handle(self) -> int:
        """A new family or metric handle (unique in this worker)."""
        return next(self._handles)

    def record(self, op: list, flush: bool = True) -> None:
        """Buffer ``op``; send the buffer if it is full or old. ``flush`` False: never send from here (a
        ``__del__``, which may run inside a flush)."""
        ops = self.ops
        if not ops:
            self._since = time.monotonic()
        ops.append(op)
        if flush and (len(ops) >= FLUSH_OPS or time.monotonic() - self._since >= FLUSH_AGE_S):
            self.flush()

    def flush(self, ring: bool = True) -> None:
        """Send the buffered operations; ``ring`` False when a message follows that rings the doorbell."""
        with self._lock:
            ops = self.ops
            if not ops:
                return
            while ops:
                chunk = [ops.popleft() for _ in range(min(len(ops), FLUSH_OPS))]
                try:
                    self._post({"t": "m", "o": chunk})
                except ValueError as e:  # larger than the whole ring (labels of hundreds of KiB): dropped
                    sys.stderr.write(f"worker: custom metric operations dropped: {e}\n")
        if ring:
            self._ring()

    def ask(self, msg: dict) -> dict:
        """The front's answer to ``msg`` (an ``mq`` question), sent after the buffered operations."""
        if self._ask is None:
            return {"err": "custom metrics need the front's replies ring"}
        return self._ask(msg) or {}

    def create_family(self, name: str, description: str, kind: int) -> tuple[int, str | None]:
        """Register a family with the front: its handle, and the front's error (None: created or joined)."""
        handle = self.handle()
        answer = self.ask({"t": "mq", "op": "f", "h": handle, "n": name, "d": description, "k": kind})
        return handle, answer.get("err")

    def new_metric(self, family: int, labels: list[list[str]], buckets: list[float] | None) -> int:
        handle = self.handle()
        self.record([0, handle, family, labels, buckets])
        return handle

    def value(self, metric: int) -> float:
        answer = self.ask({"t": "mq", "op": "v", "h": metric})
        if "err" in answer:
            raise RuntimeError(answer["err"])
        return float(answer["v"])


def attach(post: Callable[[dict], None], ring: Callable[[], None], ask: Callable[[dict], Any] | None) -> Reporter:
    global reporter
    reporter = Reporter(post, ring, ask)
    return reporter
