"""Doorbells: wake an event loop when a ring has new messages.

The ringing side writes one byte to a non-blocking pipe after each message; the
event loop watches the read end with ``add_reader`` and drains the ring when it
is readable. A full pipe means a wake-up is already pending, so the byte is
dropped. The pipe's EOF also tells the loop that the other process has died.
"""

from __future__ import annotations

import os


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
