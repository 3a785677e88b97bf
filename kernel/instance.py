"""The front's side of a model instance: a worker process, its rings and doorbell."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Protocol

from kernel.errors import ServerError
from shm.doorbell import Doorbell, Watch
from shm.region import Region, ShmError, new_name, owned_objects, unlink
from shm.ring import Ring, RingFull

log = logging.getLogger("kernel")
#: Requests one instance can have in flight with a cancellation flag (one byte each on its cancel board);
#: beyond that a request still runs, its model just never sees it cancelled.
BOARD_SLOTS = 4096
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BatchHandler(Protocol):
    """Receives what a worker answers for one batch."""

    batch_id: int
    sent: int  # time.perf_counter_ns() when it was sent
    pendings: list  # its requests
    returned: bool  # a decoupled batch whose execute() has returned (its responses may still stream)

    def done(self, instance: Instance, results: list, timings: list, decoupled: bool, end_ns: int) -> None: ...

    def stream(self, instance: Instance, index: int, result: dict | None, final: bool) -> None: ...

    def fail(self, instance: Instance, error: ServerError) -> None: ...


class Spinner:
    """Keeps the front's event loop turning for a while after traffic.

    After each request, send and answer the loop polls, for ``window_ns``, the outboxes of
    the instances with batches in flight instead of sleeping in epoll: a worker's answer,
    or the client's next request, is then handled microseconds after it arrives rather
    than after the wake-up of a sleeping process (tens of microseconds, more in a VM).
    A batch sent to an instance whose recent batches came back within ``hold_ns`` is
    waited for that long (a quarter more than its usual time) even when that exceeds
    the window; slower models are left to wake the loop. Other sockets are served
    meanwhile; an idle server does not spin.

    Each extension of the polling is published in ``watch`` (shm.doorbell.Watch):
    a worker whose answer lands well before the end does not ring the doorbell.
    That is why a turn decides to go on from the clock read before its pass.
    """

    def __init__(self, window_us: int, hold_us: int = 0) -> None:
        self.window_ns = window_us * 1000
        self.hold_ns = hold_us * 1000 if window_us else 0
        self.busy: set[Instance] = set()
        self.watch: Watch | None = None
        self._until = 0
        self._active = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def kick(self, expect_ns: int = 0) -> None:
        """Poll for the window from now, or for ``expect_ns`` (an answer's usual wait) if longer."""
        if not self.window_ns:
            return
        span = self.window_ns
        if span < expect_ns <= self.hold_ns:
            span = expect_ns + (expect_ns >> 2)
        until = time.perf_counter_ns() + span
        if until > self._until:
            self._until = until
            if self.watch is not None:
                self.watch.promise(until)
        if not self._active:
            self._active = True
            loop = self._loop
            if loop is None:  # kept (Core.start sets it): get_running_loop() makes a getpid() call on CPython < 3.12
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._turn)

    def _turn(self) -> None:
        now = time.perf_counter_ns()  # before the pass: the last pass begins after the promise (see watch)
        try:
            for instance in tuple(self.busy):
                instance._receive()
        except Exception:  # never stop spinning for good; the doorbell path reports errors
            log.exception("polling an instance failed")
        if now < self._until:
            self._loop.call_soon(self._turn)
        else:
            self._active = False


class Regions:
    """The front's cache of mapped worker-arena segments, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, Region] = {}

    def buffer(self, name: str) -> memoryview:
        region = self._maps.get(name)
        if region is None:
            region = self._maps[name] = Region(name)
        return region.buf

    def drop(self, prefix: str) -> None:
        for name in [n for n in self._maps if n.startswith(prefix)]:
            self._maps.pop(name).close()

    def close(self) -> None:
        for region in self._maps.values():
            region.close()
        self._maps.clear()


class Instance:
    """A model instance served by one worker process."""

    def __init__(self, name: str, kind: str, device_id: int, regions: Regions, *,
                 options: dict | None = None, secondary: list | None = None) -> None:
        self.name = name
        self.kind = kind  # "CPU" | "GPU" | "MODEL"
        self.device_id = device_id
        self.secondary = secondary or []
        self.placement: dict = {}  # the host policy its worker applies (kernel.host_policy.placement)
        self.regions = regions
        self.options = dict(options or {})  # merged into the worker's spec (verbose, arena_size, spin_us)
        self.env: dict[str, str] = self.options.pop("env", None) or {}  # set in the worker's environment
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.inflight = 0
        self.alive = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: Ring | None = None
        self._outbox: Ring | None = None
        self._replies: Ring | None = None  # answers to the worker's BLS requests (kernel.pipelines.bls)
        self._reply_backlog: collections.deque[dict] = collections.deque()
        self.on_bls: Any = None  # callback(instance, msg) for a worker's BLS messages
        #: the server's kernel.custom_metrics.CustomMetrics: its worker's metric operations and questions go there
        self.custom_metrics: Any = None
        self.model_name = ""  # the model it is an instance of
        self._bell: Doorbell | None = None
        self._control: collections.deque[asyncio.Future] = collections.deque()
        self._batches: dict[int, BatchHandler] = {}
        self._backlog: collections.deque[dict] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None  # flushes the backlog when no answer comes to do it
        self._frees: list[list] = []
        self._frees_timer = False  # a _flush_frees is due
        self._forgets: list[int | str] = []  # registrations ended in this turn of the event loop
        self._next_id = 0
        self.on_exit: Any = None  # callback(instance) when the worker dies unexpectedly
        self.load_msg: dict = {}
        self.init_msg: dict = {}
        self.spinner: Spinner | None = None
        self.answer_ns = 0
        #: until when its worker polls its ring anyway (its last answer plus its spin, or a wake hint's end)
        self.awake_until = 0
        self._spin_ns = int(self.options.get("spin_us", 0)) * 1000
        self._arena_prefix = "/"
        # The cancel board: one byte per executing request, raised by the front when its caller gives up;
        # the worker, busy in execute() and not reading its ring, reads it without a message.
        self._board: Region | None = None
        self._flags: list[int] = []

    # -- lifetime -------------------------------------------------------
    async def start(self, load_msg: dict, timeout: float = 120.0) -> dict:
        """Spawn the worker and send it ``load_msg``; return its reply."""
        self.load_msg = load_msg
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._inbox = Ring.create("in")
        self._outbox = Ring.create("out")
        self._replies = Ring.create("rep", 128, 4096)
        self._bell = Doorbell()
        if self._board is None:
            self._board = Region(new_name("cx"), BOARD_SLOTS, create=True)
            self._flags = list(range(BOARD_SLOTS - 1, -1, -1))
        spec = {"instance": self.name, "inbox": self._inbox.spec(), "outbox": self._outbox.spec(),
                "cancel": self._board.name, "replies": self._replies.spec(),
                "doorbell_fd": self._bell.write_fd, **self.options}
        env = {k: v for k, v in dict(os.environ, **self.env).items() if v is not None}  # (None: unset it)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # (a python model's own environment brings its interpreter: kernel/execution_env.py)
        self.proc = subprocess.Popen([self.options.get("python") or sys.executable, "-m", "workers", json.dumps(spec)],
                                     pass_fds=(self._bell.write_fd,), env=env, cwd=_ROOT)
        self.pid = self.proc.pid
        self._arena_prefix = f"/ek.{self.pid}."
        self._bell.close_writer()
        self.alive = True
        self.awake_until = 0  # a new process: whatever the last one promised is void
        self._loop.add_reader(self._bell.read_fd, self._drain)
        return await self.control(load_msg, timeout)

    async def initialize(self, init_msg: dict, timeout: float = 120.0) -> str:
        """Initialise the model instance in the worker; return what its backend says of it (may be "")."""
        self.init_msg = init_msg
        return (await self.control(init_msg, timeout)).get("status") or ""

    async def restart(self) -> None:
        """Start a fresh worker after a crash: load and initialise it again."""
        await self.start(dict(self.load_msg, autocomplete=False))
        await self.initialize(self.init_msg)

    async def control(self, msg: dict, timeout: float = 120.0) -> dict:
        """Send a control message and wait for the worker's answer."""
        if not self.alive:
            raise ServerError(f"instance '{self.name}' is not running", "UNAVAILABLE")
        future = self._loop.create_future()
        self._control.append(future)
        self._post(msg)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise ServerError(f"instance '{self.name}' did not answer '{msg['t']}' in {timeout:g} s",
                              "INTERNAL") from None
        if reply.get("t") == "error":
            raise ServerError(reply["error"], reply.get("code") or "INTERNAL")
        return reply

    async def stop(self, timeout: float = 30.0) -> None:
        """Finalize the model, end the worker, remove its shared memory."""
        if self.alive:
            self._stopping = True
            try:
                await self.control({"t": "stop"}, timeout)
            except ServerError as e:
                log.warning("instance %s: %s", self.name, e)
        proc = self.proc
        if proc is not None:
            for _ in range(int(timeout * 20)):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._teardown()
        if self._board is not None:
            self._board.close()
            self._board.unlink()
            self._board = None
            self._flags = []

    def _teardown(self) -> None:
        self.alive = False
        self._frees = []
        self._forgets = []
        self._backlog.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._batches:  # still in flight when the worker went away: they fail, nothing hangs
            error = ServerError(f"Failed to process the request(s) for model instance '{self.name}', "
                                "message: the instance stopped", "INTERNAL")
            batches, self._batches = self._batches, {}
            self.inflight = 0
            for handler in batches.values():
                handler.fail(self, error)
        if self._bell is not None and self._loop is not None:
            self._loop.remove_reader(self._bell.read_fd)
            self._bell.close()
            self._bell = None
        for ring in (self._inbox, self._outbox, self._replies):
            if ring is not None:
                ring.close()
                ring.unlink()
        self._inbox = self._outbox = self._replies = None
        self._reply_backlog.clear()
        if self.on_bls is not None:
            self.on_bls(self, {"t": "gone"})
        if self.custom_metrics is not None:  # its metric handles (their series stay, as a Triton stub's)
            self.custom_metrics.forget(self)
        if self.pid:
            # The worker unlinks its arena on a clean exit; after a crash we do.
            prefix = f"/ek.{self.pid}."
            self.regions.drop(prefix)
            for entry in owned_objects(self.pid):
                unlink("/" + entry)

    # -- execution ------------------------------------------------------
    def execute(self, msg: dict, handler: BatchHandler) -> None:
        """Send a batch (``msg`` gets its ``id``); the handler hears the result."""
        if not self.alive:
            handler.fail(self, ServerError(f"instance '{self.name}' is not running", "UNAVAILABLE"))
            return
        self._next_id += 1
        batch_id = msg["id"] = handler.batch_id = self._next_id
        if self._frees:  # freed outputs ride along: no message (and no wake-up) of their own
            msg["f"] = self._frees
            self._frees = []
        try:
            self._post(msg)
        except ValueError as e:  # larger than the whole ring
            handler.fail(self, ServerError(f"request too large for model instance '{self.name}': {e}",
                                           "INVALID_ARG"))
            return
        self._batches[batch_id] = handler
        self.inflight += 1
        spinner = self.spinner
        if spinner is not None:
            spinner.busy.add(self)
            spinner.kick(self.answer_ns)

    def take_flag(self) -> int:
        """A lowered cancellation flag for a request about to be sent (-1: none left)."""
        flags = self._flags
        if not flags:
            return -1
        flag = flags.pop()
        self._board.buf[flag] = 0
        return flag

    def put_flag(self, flag: int) -> None:
        """A request is over: its flag can serve another."""
        if self._board is not None:
            self._flags.append(flag)

    def waiting(self) -> int:
        """Requests sent to this instance that its worker has not started: those of the batches behind the one
        it executes (Triton's pending request count ends when the backend starts a request)."""
        count = 0
        started = False
        for handler in self._batches.values():
            if handler.returned:  # (decoupled, streaming its responses)
                continue
            if started:
                count += len(handler.pendings)
            started = True
        return count

    def flag_raised(self, flag: int) -> bool:
        """Whether the request with this flag was cancelled."""
        return self._board is not None and self._board.buf[flag] != 0

    def raise_flag(self, flag: int) -> None:
        """The request with this flag was cancelled: the model sees it at its next ``is_cancelled()``."""
        if self._board is not None:
            self._board.buf[flag] = 1

    def prewake(self, within_ns: int) -> bool:
        """Tell an idle worker that a batch should come within ``within_ns``: it polls its inbox until
        then rather than sleeping, so the batch does not wait for its wake-up (a pipeline's next step, a
        request arriving). Nothing is sent to a worker that polls until then anyway; True if sent."""
        if not self.alive or self.inflight or self._backlog:
            return False
        now = time.perf_counter_ns()
        if self.awake_until > now + within_ns:
            return False
        self._post({"t": "w", "ns": within_ns})
        self.awake_until = now + max(within_ns, self._spin_ns)
        return True

    def release(self, blocks: list[list]) -> None:
        """Free output blocks ``[segment, offset]`` of this worker's arena.

        The frees travel with the next batch sent to this worker; when none
        follows within 20 ms they go on their own. Blocks of an earlier worker
        process (restarted since) are gone with it.
        """
        if not self.alive or not blocks or not blocks[0][0].startswith(self._arena_prefix):
            return
        if not self._frees_timer:  # one timer at a time, not one per response
            self._frees_timer = True
            self._loop.call_later(0.02, self._flush_frees)
        self._frees.extend(blocks)

    def _flush_frees(self) -> None:
        self._frees_timer = False
        if self._frees and self.alive:
            self._post_aside({"t": "f", "b": self._frees})
        self._frees = []

    def forget_region(self, region_id: int | str) -> None:
        """Tell the worker that a client region's registration has ended (its id), or that a segment of
        the front's arena is gone (its name): it drops its mapping.

        Registrations ended together (an "unregister all" of thousands) go in one message: one each
        would fill the ring and the backlog with messages that get no answer.
        """
        if not self.alive:
            return
        if not self._forgets:
            self._loop.call_soon(self._flush_forgets)
        self._forgets.append(region_id)

    def _flush_forgets(self) -> None:
        forgets, self._forgets = self._forgets, []
        for i in range(0, len(forgets), 1024):  # each message well inside a ring slot
            if self.alive:
                self._post_aside({"t": "u", "k": forgets[i : i + 1024]})

    def buffer(self, name: str) -> memoryview:
        """A mapped worker-arena segment (or a registered client region)."""
        try:
            return self.regions.buffer(name)
        except ShmError as e:
            raise ServerError(str(e), "INTERNAL") from e

    def tell(self, msg: dict) -> None:
        """A control message that asks for no answer (new log settings): queued behind the worker's work."""
        if self.alive:
            self._post_aside(msg)

    def _post_aside(self, msg: dict) -> None:
        """A message that asks for no answer (frees, forgets): the worker's polling, ended by it, starts
        again for its spin time only."""
        self.awake_until = min(self.awake_until, time.perf_counter_ns() + self._spin_ns)
        self._post(msg)

    def _post(self, msg: dict) -> None:
        if self._backlog:
            self._backlog.append(msg)
            return
        try:
            self._inbox.send(msg, block=False)
        except RingFull:
            self._backlog.append(msg)
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        """Flush the backlogs again soon: answers flush them too, but some messages (frees, forgets, BLS
        replies) get none, and a backlog that waited for an answer would hold a later "stop", batch or
        reply for ever."""
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(0.002, self._retry_flush)

    def _retry_flush(self) -> None:
        self._retry = None
        if self.alive:
            self._flush_backlog()
            if self._reply_backlog:
                self.reply(None)

    def reply(self, msg: dict | None) -> None:
        """Answer a BLS request of the worker (on its replies ring; queued while the ring is full)."""
        replies = self._replies
        if replies is None:
            return
        if msg is not None:
            self._reply_backlog.append(msg)
        backlog = self._reply_backlog
        while backlog:
            try:
                replies.send(backlog[0], block=False)
            except RingFull:
                self._schedule_retry()
                return
            except ValueError as e:  # larger than the ring: the caller gets an error instead
                first = backlog.popleft()
                backlog.appendleft({"q": first["q"], "res": {"err": [str(e), "INTERNAL"]}, "final": True})
                continue
            backlog.popleft()

    def _flush_backlog(self) -> None:
        while self._backlog:
            try:
                self._inbox.send(self._backlog[0], block=False)
            except RingFull:
                self._schedule_retry()
                return
            self._backlog.popleft()

    def _drain(self) -> None:
        alive = self._bell.drain()
        try:
            self._receive()
        finally:
            if not alive:
                self._died()

    def _receive(self) -> None:
        """Handle every answer the worker has written so far."""
        outbox = self._outbox
        if outbox is None:
            return
        msg = outbox.try_recv()
        if msg is None:
            return
        if self.spinner is not None:
            self.spinner.kick()  # the client's next request is likely close behind this answer
        while msg is not None:
            kind = msg["t"]
            if kind == "r":
                self.awake_until = msg["at"] + self._spin_ns  # it polls that long after answering
                handler = self._batches.pop(msg["id"], None)
                if handler is not None and not msg["d"]:
                    self.inflight -= 1
                    ts = msg["ts"]  # a chained step's batch counts from the end of its wait (ts[3])
                    if len(ts) < 4 or not all(r is not None and "skip" in r for r in msg["res"]):
                        # How long after a send the worker answers (a moving average; its clock is ours,
                        # CLOCK_MONOTONIC, and our own lateness in noticing is left out): see Spinner.
                        # A chained batch that was skipped ran nothing and says nothing of that.
                        wait = max(msg["at"] - (max(handler.sent, ts[3]) if len(ts) > 3 else handler.sent), 0)
                        self.answer_ns = self.answer_ns + ((wait - self.answer_ns) >> 3) if self.answer_ns \
                            else wait
                elif handler is not None:
                    self._batches[msg["id"]] = handler  # decoupled: stays until every final flag
                if handler is not None:
                    handler.done(self, msg["res"], msg["ts"], msg["d"], msg["at"])
            elif kind == "s":
                handler = self._batches.get(msg["id"])
                if handler is not None:
                    handler.stream(self, msg["i"], msg["res"], msg["final"])
            elif kind == "b" or kind == "bf":
                if self.on_bls is not None:
                    self.on_bls(self, msg)
            elif kind == "m" or kind == "mq":  # custom metrics: operations, a question (workers/metrics.py)
                if self.custom_metrics is not None:
                    self.custom_metrics.handle(self, msg)
                elif kind == "mq":
                    self.reply({"q": msg["q"], "res": {"err": "custom metrics are not available"}, "final": True})
            elif kind == "error" and msg.get("id") in self._batches:
                self.inflight -= 1
                self._batches.pop(msg["id"]).fail(self, ServerError(msg["error"], "INTERNAL"))
            elif self._control:
                future = self._control.popleft()
                if not future.done():
                    future.set_result(msg)
            msg = outbox.try_recv()
        if self._backlog:
            self._flush_backlog()
        if self._reply_backlog:
            self.reply(None)
        if self.spinner is not None and not self.inflight:
            self.spinner.busy.discard(self)

    def batch_finished(self, batch_id: int) -> None:
        """A decoupled batch has returned from execute and sent every final response."""
        if self._batches.pop(batch_id, None) is not None:
            self.inflight -= 1

    def _died(self) -> None:
        if not self.alive:
            return
        if self._stopping:  # the worker exits after answering "stop"
            self._loop.remove_reader(self._bell.read_fd)
            while self._control:  # a crash while stopping: nothing will answer
                future = self._control.popleft()
                if not future.done():
                    future.set_result({"t": "stopped"})
            return
        code = self.proc.poll() if self.proc else None
        if code is None and self.proc is not None:
            try:
                code = self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
        log.error("instance %s: worker process %s exited unexpectedly (status %s)", self.name, self.pid, code)
        self.alive = False
        error = ServerError(f"Failed to process the request(s) for model instance '{self.name}', "
                            f"message: Stub process '{self.name}' is not healthy.", "INTERNAL")
        batches, self._batches = self._batches, {}
        self.inflight = 0
        for handler in batches.values():
            handler.fail(self, error)
        self._teardown()
        while self._control:
            future = self._control.popleft()
            if not future.done():
                future.set_result({"t": "error", "error": f"worker of instance '{self.name}' exited (status {code})"})
        if self.on_exit is not None:
            self.on_exit(self)
