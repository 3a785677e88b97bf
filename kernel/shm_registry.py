"""Triton's system shared memory extension: client regions registered by name."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from kernel.errors import ServerError
from shm.region import Region, ShmError, valid_key

_ids = itertools.count(1)


class Registration:
    """A registered span ``[offset, offset + byte_size)`` of a client's POSIX shm object."""

    __slots__ = ("name", "key", "posix_name", "offset", "byte_size", "id", "region")

    def __init__(self, name: str, key: str, posix_name: str, offset: int, byte_size: int, region: Region) -> None:
        self.name = name
        self.key = key  # as the client gave it
        self.posix_name = posix_name  # what workers open
        self.offset = offset
        self.byte_size = byte_size
        self.id = next(_ids)  # distinguishes re-registrations of one key, for the workers' caches
        self.region = region

    def buffer(self) -> memoryview:
        """The registered span, mapped in this process."""
        return self.region.buf[self.offset : self.offset + self.byte_size]

    def span(self, offset: int, byte_size: int, what: str) -> memoryview:
        self.check(offset, byte_size, what)
        start = self.offset + offset
        return self.region.buf[start : start + byte_size]

    def check(self, offset: int, byte_size: int, what: str) -> None:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise ServerError(f"Invalid offset + byte size for shared memory region: '{self.name}'", "INVALID_ARG")

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemoryRegistry:
    """Registered regions by name; mappings are opened once and shared by requests."""

    def __init__(self, on_unregister: Callable[[Registration], None] | None = None) -> None:
        self._regions: dict[str, Registration] = {}
        self._on_unregister = on_unregister

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map a client's POSIX shm object ``key`` (``/name``; like shm_open, the slash may be left out)."""
        if name in self._regions:
            raise ServerError(f"shared memory region '{name}' already in manager", "ALREADY_EXISTS")
        posix_name = key if key.startswith("/") else "/" + key
        if not valid_key(posix_name):  # never a path: only names under /dev/shm
            raise ServerError(f"Unable to open shared memory region: '{key}'", "INTERNAL")
        try:
            region = Region(posix_name)
        except ShmError:
            raise ServerError(f"Unable to open shared memory region: '{key}'", "INTERNAL") from None
        if offset < 0 or byte_size <= 0 or offset + byte_size > region.size:
            region.close()
            raise ServerError(f"failed to register shared memory region '{name}': invalid args", "INVALID_ARG")
        self._regions[name] = Registration(name, key, posix_name, offset, byte_size, region)

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name``, or every region when ``name`` is empty."""
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for n in names:
            reg = self._regions.pop(n)
            if self._on_unregister is not None:
                self._on_unregister(reg)
            reg.region.close()  # deferred by the OS view count while requests still use it

    def get(self, name: str) -> Registration:
        reg = self._regions.get(name)
        if reg is None:
            raise ServerError(f"Unable to find shared memory region: '{name}'", "NOT_FOUND")
        return reg

    def status(self, name: str | None = None) -> list[dict]:
        if name:
            reg = self._regions.get(name)
            if reg is None:
                raise ServerError(f"Unable to find system shared memory region: '{name}'", "NOT_FOUND")
            return [reg.status()]
        return [self._regions[n].status() for n in sorted(self._regions)]

    def close(self) -> None:
        self.unregister(None)
