"""Links: one worker tells another that a batch's inputs are ready, with no message through the front.

A chained pipeline step (kernel.pipelines.ensemble) is sent to its worker together with the step it reads
from. Its worker maps its inputs, then waits on a *link*: a process-shared POSIX semaphore and a
status byte in a board of such slots that the front creates. The producing step's worker places
its outputs, writes the status (1: placed, 2: it cannot run) and posts the semaphore. The front
posts 2 itself when the producer fails in a way its worker cannot report (the worker died, the
request was cancelled).

Ordering, ARM64 included: the outputs and the status byte are written before ``sem_post``
(release semantics in glibc), and the waiter reads them only after its ``sem_wait`` or
``sem_trywait`` succeeds (acquire semantics), the same pairing that makes shm.ring correct. The
waiter may look at the status byte earlier, but only as a hint that the post is near.

The semaphores are unnamed (``sem_init`` with ``pshared``) inside one shared-memory object: one
object for the whole board instead of a named semaphore per link, and ``sem_init`` resets a slot
for its next use. Calls go through ctypes (about 1 µs each); a link costs a handful of them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from functools import partial

from shm.region import Region, new_name

#: glibc's sem_t on 64-bit Linux is 32 bytes (16 on 32-bit); slots are 32 apart either way.
_SEM_SIZE = 32
OK, FAILED = 1, 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for fn in ("sem_init", "sem_post", "sem_trywait", "sem_timedwait"):
        getattr(libc, fn).restype = ctypes.c_int
    libc.sem_init.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint)
    libc.sem_post.argtypes = libc.sem_trywait.argtypes = (ctypes.c_void_p,)
    libc.sem_timedwait.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Timespec))
    if hasattr(libc, "sem_clockwait"):  # glibc >= 2.30: deadlines on CLOCK_MONOTONIC (no wall-clock jumps)
        libc.sem_clockwait.restype = ctypes.c_int
        libc.sem_clockwait.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec))
    return libc


_c = _libc()
_CLOCKWAIT = hasattr(_c, "sem_clockwait")


class LinkBoard:
    """A board of link slots: created by the front (``name`` None), attached by workers."""

    __slots__ = ("region", "slots", "_base", "_status")

    def __init__(self, name: str | None = None, slots: int = 1024) -> None:
        if name is None:
            self.region = Region(new_name("links"), slots * (_SEM_SIZE + 1), create=True)
        else:
            self.region = Region(name)
            slots = self.region.size // (_SEM_SIZE + 1)
        self.slots = slots
        self._base = self.region.address
        self._status = self.region.buf[slots * _SEM_SIZE : slots * (_SEM_SIZE + 1)]

    @property
    def name(self) -> str:
        return self.region.name

    def _sem(self, slot: int) -> int:
        return self._base + slot * _SEM_SIZE

    # -- the front ---------------------------------------------------------
    def reset(self, slot: int) -> None:
        """Make ``slot`` ready for a new link (nobody uses it: both ends of its last link have answered)."""
        self._status[slot] = 0
        if _c.sem_init(self._sem(slot), 1, 0):
            raise OSError(ctypes.get_errno(), "sem_init failed")

    # -- both ----------------------------------------------------------------
    def post(self, slot: int, status: int) -> None:
        """The producer's outputs are placed (OK) or will not be (FAILED). A later post changes nothing
        for a waiter that already went."""
        if not self._status[slot]:
            self._status[slot] = status
        _c.sem_post(self._sem(slot))

    def status(self, slot: int) -> int:
        return self._status[slot]

    # -- the waiting worker ----------------------------------------------------
    def wait(self, slot: int, sleep_until: int, spin_until: int, alive: object = None) -> bool:
        """Wait for the link's post; True if the producer's outputs are placed.

        Sleeps in the kernel until ``sleep_until`` (time.perf_counter_ns(), CLOCK_MONOTONIC: the
        producer is still far from done), then polls until ``spin_until`` (it should post then: the
        post is seen within a microsecond instead of a wake-up's tens), then sleeps until the post,
        checking ``alive()`` every second.
        """
        sem = self._sem(slot)
        clock = time.perf_counter_ns
        now = clock()
        if sleep_until > now and self._sleep(sem, sleep_until):
            return self._status[slot] == OK
        status = self._status
        while not status[slot] and clock() < spin_until:
            pass
        while not self._sleep(sem, clock() + 1_000_000_000):
            if alive is not None and not alive():
                return False
        return status[slot] == OK

    @staticmethod
    def _sleep(sem: int, until: int) -> bool:
        """Wait on ``sem`` until ``until`` (time.perf_counter_ns(), which is CLOCK_MONOTONIC on Linux);
        True once the semaphore was taken."""
        if not _c.sem_trywait(sem):
            return True
        if _CLOCKWAIT:
            ts = _Timespec(until // 1_000_000_000, until % 1_000_000_000)
            wait = partial(_c.sem_clockwait, sem, time.CLOCK_MONOTONIC, ctypes.byref(ts))
        else:  # sem_timedwait's deadline is on the wall clock
            until += time.time_ns() - time.perf_counter_ns()
            ts = _Timespec(until // 1_000_000_000, until % 1_000_000_000)
            wait = partial(_c.sem_timedwait, sem, ctypes.byref(ts))
        while wait():
            err = ctypes.get_errno()
            if err == errno.ETIMEDOUT:
                return False
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))
        return True

    def close(self, unlink: bool = False) -> None:
        self._status = None
        self.region.close()
        if unlink:
            self.region.unlink()
