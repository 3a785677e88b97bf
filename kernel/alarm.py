"""A wake-up of the event loop at a moment given to the microsecond (Linux timerfd).

asyncio's timers cannot do it: uvloop's come from libuv, which counts in milliseconds. The
front uses this to sleep while a slow model (a GPU network: milliseconds) works and to start
polling for its answer just before it is due, instead of either spinning the whole time or
paying a process wake-up when the answer comes (kernel.instance.Spinner).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

_CLOCK_MONOTONIC = 1  # time.perf_counter_ns's clock on Linux
_TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 0o4000, 0o2000000, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)


class Alarm:
    """Calls ``callback`` on ``loop`` at the moment :meth:`arm` sets (the earliest, if armed again)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        self.at = 0  # armed for this time.perf_counter_ns() value; 0: not armed
        loop.add_reader(fd, self._fire)

    def arm(self, at_ns: int) -> None:
        if self.at and self.at <= at_ns:
            return
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(at_ns // 1_000_000_000, at_ns % 1_000_000_000))
        if _libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) == 0:
            self.at = at_ns

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self.at = 0
        self._callback()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
