"""Triton's system shared memory extension: client regions registered by name.

A client registers a span of a POSIX shared-memory object it owns; requests then
name ``(region, offset, byte_size)`` instead of carrying tensor bytes. The front
maps each registered object once; workers map it themselves by key and cache the
mapping per registration (:attr:`Registration.id`).

Unregistering removes the name at once (later requests naming it get Triton's
NOT_FOUND), but the mapping lives on while requests that were accepted with it
are still in flight: only when the last of them ends is the front's mapping
closed and the workers told to drop theirs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from kernel.errors import ServerError
from kernel.types import InferRequest, ShmRef
from shm.region import PREFIX, Region, ShmError, server_objects, valid_key

_ids = itertools.count(1)

#: Regions registered at once. Each costs a mapping in the front and in every worker that uses it;
#: a bound keeps a client from exhausting the processes' mappings and descriptors.
MAX_REGIONS = 4096


class Registration:
    """A registered span ``[offset, offset + byte_size)`` of a client's POSIX shm object."""

    __slots__ = ("name", "key", "posix_name", "offset", "byte_size", "id", "region", "users", "unregistered",
                 "closed")

    def __init__(self, name: str, key: str, posix_name: str, offset: int, byte_size: int, region: Region) -> None:
        self.name = name
        self.key = key  # as the client gave it
        self.posix_name = posix_name  # what workers open
        self.offset = offset
        self.byte_size = byte_size
        self.id = next(_ids)  # distinguishes re-registrations of one key, for the workers' caches
        self.region = region
        self.users = 0  # requests in flight that use this registration
        self.unregistered = False
        self.closed = False

    def buffer(self) -> memoryview:
        """The registered span, mapped in this process."""
        return self.region.buf[self.offset : self.offset + self.byte_size]

    def check(self, offset: int, byte_size: int, what: str) -> None:
        """Triton's bounds check of a tensor's span inside the registered span."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise ServerError(f"Invalid offset + byte size for shared memory region: '{self.name}'", "INVALID_ARG")

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def _open_error(key: str) -> ServerError:
    """Triton's words and gRPC code; over HTTP a 400, not Triton's 500: the key is the client's mistake."""
    return ServerError(f"Unable to open shared memory region: '{key}'", "INTERNAL", http_status=400)


class SharedMemoryRegistry:
    """Registered regions by name; mappings are opened once and shared by requests."""

    def __init__(self, on_unregister: Callable[[Registration], None] | None = None) -> None:
        self._regions: dict[str, Registration] = {}
        self._live: set[Registration] = set()  # registered, or unregistered but still in use
        self._on_unregister = on_unregister

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map a client's POSIX shm object ``key`` (``/name``; like shm_open, the slash may be left out).

        Keys are POSIX shm names only, never file paths, and never reach this
        server's own objects (its arenas, message rings and their semaphores) under
        any name: the object opened is compared with them, not just its name.
        """
        if name in self._regions:
            raise ServerError(f"shared memory region '{name}' already in manager", "ALREADY_EXISTS")
        if len(self._regions) >= MAX_REGIONS:
            raise ServerError(f"failed to register shared memory region '{name}': the server holds "
                              f"{MAX_REGIONS} regions already, unregister some first", "INVALID_ARG")
        posix_name = key if key.startswith("/") else "/" + key
        if not valid_key(posix_name) or posix_name.startswith("/" + PREFIX):
            raise _open_error(key)
        try:
            region = Region(posix_name)
        except ShmError:
            raise _open_error(key) from None
        if region.ident in server_objects():
            region.close()
            raise _open_error(key)
        if offset < 0 or byte_size < 0 or offset + byte_size > region.size:
            region.close()
            raise ServerError(f"failed to register shared memory region '{name}': invalid args", "INVALID_ARG")
        if byte_size == 0:  # Triton's mmap of 0 bytes fails with EINVAL
            region.close()
            raise ServerError(f"failed to register shared memory region '{name}': unable to process address "
                              "spaceInvalid argument", "INVALID_ARG")
        reg = self._regions[name] = Registration(name, key, posix_name, offset, byte_size, region)
        self._live.add(reg)

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name``, or every region when ``name`` is empty (an unknown name is no error)."""
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for n in names:
            reg = self._regions.pop(n)
            reg.unregistered = True
            if not reg.users:
                self._close(reg)

    def get(self, name: str) -> Registration:
        """The registration a request names, or Triton's NOT_FOUND error."""
        reg = self._regions.get(name)
        if reg is None:
            raise ServerError(f"Unable to find shared memory region: '{name}'", "NOT_FOUND")
        return reg

    def hold(self, request: InferRequest, future: asyncio.Future) -> None:
        """Keep the registrations ``request`` uses mapped until ``future`` is done.

        Raises Triton's NOT_FOUND if one was unregistered since the request was parsed.
        """
        regs: set[Registration] = set()
        for t in request.inputs:
            if isinstance(t.data, ShmRef):
                regs.add(t.data.region)
        for out in request.outputs or ():
            if out.shm is not None:
                regs.add(out.shm.region)
        if not regs:
            return
        for reg in regs:
            if reg.unregistered:
                raise ServerError(f"Unable to find shared memory region: '{reg.name}'", "NOT_FOUND")
        for reg in regs:
            reg.users += 1
        future.add_done_callback(lambda _: self._release(regs))

    def _release(self, regs: set[Registration]) -> None:
        for reg in regs:
            reg.users -= 1
            if not reg.users and reg.unregistered:
                self._close(reg)

    def _close(self, reg: Registration) -> None:
        """End a registration for good: workers drop their mappings, then the front its own."""
        if reg.closed:
            return
        reg.closed = True
        self._live.discard(reg)
        try:
            if self._on_unregister is not None:
                self._on_unregister(reg)
        finally:
            reg.region.close()  # deferred by the views that may still exist

    def status(self, name: str | None = None) -> list[dict]:
        """Triton's status: every region sorted by name, or the one named."""
        if name:
            reg = self._regions.get(name)
            if reg is None:
                raise ServerError(f"Unable to find system shared memory region: '{name}'", "NOT_FOUND")
            return [reg.status()]
        return [self._regions[n].status() for n in sorted(self._regions)]

    def close(self) -> None:
        """Unregister everything and close every mapping now (server stop)."""
        self.unregister(None)
        for reg in list(self._live):
            self._close(reg)
