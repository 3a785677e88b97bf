"""Doorbells: wake an event loop when a ring has new messages.

The ringing side writes one byte to a non-blocking pipe after each message; the
event loop watches the read end with ``add_reader`` and drains the ring when it
is readable. A full pipe means a wake-up is already pending, so the byte is
dropped. The pipe's EOF also tells the loop that the other process has died.

A ring the loop is polling anyway needs no bell: the write (a system call), the
loop's wake-up for it and its ``read`` are all wasted then. :class:`Watch` is how
the ringing side knows: the loop publishes in shared memory the CLOCK_MONOTONIC
time until which it promises to keep polling, and the ringer skips the bell when,
*after* publishing its message, its clock is still more than :data:`MARGIN_NS`
before that promise. That is safe without memory fences, on x86 and ARM64 alike,
because it rests on time rather than on the order in which two cores see two
writes:

* the loop decides to go on from a clock read taken *before* each polling pass,
  so its last pass begins after the promised time (however long the loop was
  preempted or busy in between);
* the ringer's message was published (its ``sem_post`` completed) before the
  ringer read its clock, a margin ahead of the promise, so it is visible by the
  time that last pass begins;
* the promise only grows while the loop polls: a stale read gives an earlier
  time, and the ringer rings.
"""

from __future__ import annotations

import os
import struct
import time

from shm.region import Region, new_name

#: How far ahead of the loop's promise a ringer must be to skip the bell (CLOCK_MONOTONIC is one clock
#: for every core of a machine; the margin only has to cover a store becoming visible to another core).
MARGIN_NS = 50_000
_NS = struct.Struct("<q")


class Doorbell:
    """A pipe: :meth:`ring` in one process, :meth:`drain` in the other."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def drain(self) -> bool:
        """Consume pending rings; False once the writer has gone (EOF)."""
        try:
            while True:
                data = os.read(self.read_fd, 4096)
                if not data:
                    return False
                if len(data) < 4096:
                    return True
        except BlockingIOError:
            return True

    def close_writer(self) -> None:
        """Close this process's copy of the write end (after handing it over)."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_writer()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def ring(fd: int) -> None:
    """Ring a doorbell whose write end ``fd`` this process holds."""
    try:
        os.write(fd, b"\x01")
    except BlockingIOError:
        pass


class Watch:
    """The time until which an event loop polls its rings: written by the loop, read by ringers."""

    __slots__ = ("region", "_buf")

    def __init__(self, name: str | None = None) -> None:
        """Create a watch (``name`` None: the loop's side) or attach to one (the ringer's side)."""
        self.region = Region(new_name("watch"), _NS.size, create=True) if name is None else Region(name)
        self._buf = self.region.buf

    @property
    def name(self) -> str:
        return self.region.name

    def promise(self, until_ns: int) -> None:
        """The loop polls until ``until_ns`` (time.perf_counter_ns(), CLOCK_MONOTONIC) at least."""
        _NS.pack_into(self._buf, 0, until_ns)

    def watched(self) -> bool:
        """Whether a message published before this call will be seen without a bell."""
        return _NS.unpack_from(self._buf, 0)[0] - time.perf_counter_ns() > MARGIN_NS

    def close(self, unlink: bool = False) -> None:
        self._buf = None
        self.region.close()
        if unlink:
            self.region.unlink()
