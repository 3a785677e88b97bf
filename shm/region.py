"""Mapped POSIX shared-memory objects.

Every object this server creates is named ``/ek.<pid>.<start>.<tag>.<n>``, ``<start>`` being when its
process started (clock ticks since boot), so that a later start can remove what a killed server left
behind (:func:`remove_stale`). The pid alone does not name a process for long: in a container the server
is pid 1 at every start, and its workers get the same few pids again, while a memory-backed ``/dev/shm``
volume outlives the container. After an OOM kill, a restarted server would meet its own names still
there (``O_EXCL`` refusing them at every restart); with the start time they differ, and the old ones are
recognised as stale although a live process holds their pid.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import re
import time
import weakref
from collections.abc import Callable

import posix_ipc

PREFIX = "ek."
_counter = itertools.count()
# POSIX shm names: one leading slash, no other slash, no NUL; NAME_MAX on Linux.
_KEY_RE = re.compile(r"^/[^/\x00]{1,254}$")


class ShmError(Exception):
    """A shared-memory object could not be created, opened or mapped."""


def valid_key(key: str) -> bool:
    """True if ``key`` is a POSIX shm name (``/name``), never a file path."""
    return bool(_KEY_RE.match(key)) and key not in ("/.", "/..")


_owner: tuple[int, str] = (0, "")  # (pid, "ek.<pid>.<start>.") of this process, once asked


def _start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (/proc/<pid>/stat's 22nd field); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])  # (fields after the command's name start at 3)
    except (OSError, ValueError, IndexError):
        return 0


def owner_token() -> str:
    """``<pid>.<start>`` of this process: what the names of its objects carry, so that a later process can tell
    them from those of a process that has the same pid now (a container's server is PID 1 at every start)."""
    return _owner_prefix()[len(PREFIX):-1]


def gone(pid: int, start: int, started: dict[int, int]) -> bool:
    """Whether the process that named objects ``<pid>.<start>`` has ended: ``pid`` is gone, or names a process
    that started at another time (``start`` 0: names of an older form, by the pid alone). ``started`` caches
    start times over one sweep."""
    if not _alive(pid):
        return True
    if not start:
        return False
    now = started.setdefault(pid, _start_time(pid))
    return bool(now) and now != start


def _owner_prefix() -> str:
    global _owner
    pid = os.getpid()
    if _owner[0] != pid:  # (first use, or a forked child)
        _owner = (pid, f"{PREFIX}{pid}.{_start_time(pid)}.")
    return _owner[1]


def new_name(tag: str) -> str:
    """A fresh name for an object owned by this process."""
    return f"/{_owner_prefix()}{tag}.{next(_counter)}"


def _libc_mmap() -> tuple[ctypes.CDLL, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc, ctypes.c_void_p(-1).value


_libc, _MAP_FAILED = _libc_mmap()


def _map(fd: int, size: int) -> ctypes.Array:
    """Map ``size`` bytes of ``fd`` shared and writable, keeping no descriptor.

    Python's ``mmap`` keeps a duplicate of the descriptor for as long as the mapping lives: one
    per registered region in the front and in every worker, so ~1,000 registrations exhausted
    systemd's default limit of 1,024 and every request failed. The pages are unmapped when the
    returned array is collected, i.e. once the last view on it (numpy arrays, memoryviews) is gone.
    """
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    array = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(array, _libc.munmap, addr, size).atexit = False  # at exit the kernel unmaps; views may live
    _mappings[id(array)] = array
    return array


_mappings: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> mapping (ctypes arrays: unhashable)


def is_mapping(obj: object) -> bool:
    """True if ``obj`` is a shared-memory mapping made here (what a :class:`Region`'s ``buf`` views)."""
    return _mappings.get(id(obj)) is obj


class Region:
    """A POSIX shared-memory object mapped into this process (no descriptor kept unless asked).

    ``buf`` is a writable memoryview over the whole mapping. Numpy arrays made
    over ``buf`` keep the mapping alive; :meth:`close` only drops this object's
    references, so the pages stay mapped until the last view is gone.
    """

    __slots__ = ("name", "size", "owner", "ident", "_array", "buf", "_fd", "__weakref__")

    def __init__(self, name: str, size: int | None = None, *, create: bool = False, keep_fd: bool = False) -> None:
        """Open ``name`` (or create it with ``size`` bytes, reserved up front).

        ``keep_fd`` keeps the descriptor for :meth:`current_size` (regions a client may shrink, even
        after unlinking them: only the descriptor still leads to the object then).
        """
        if not valid_key(name):
            raise ShmError(f"invalid shared memory key '{name}'")
        try:
            if create:
                if not size or size <= 0:
                    raise ShmError("a created region needs a positive size")
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
                try:
                    # Reserve the pages now: a sparse object on a full /dev/shm
                    # would SIGBUS on first touch instead of failing cleanly.
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as e:
                    shm.close_fd()
                    shm.unlink()
                    raise ShmError(f"unable to reserve {size} bytes of shared memory for '{name}': {e}") from e
            else:
                shm = posix_ipc.SharedMemory(name)
                size = shm.size
        except posix_ipc.ExistentialError as e:
            raise ShmError(f"unable to open shared memory region '{name}': {e}") from e
        except (posix_ipc.PermissionsError, OSError, ValueError) as e:
            raise ShmError(f"unable to open shared memory region '{name}': {e}") from e
        try:
            st = os.fstat(shm.fd)
            self._array = _map(shm.fd, size) if size else None
            self._fd = os.dup(shm.fd) if keep_fd else -1
        except (OSError, ValueError, OverflowError) as e:
            raise ShmError(f"unable to map shared memory region '{name}': {e}") from e
        finally:
            shm.close_fd()
        self.name = name
        self.size = size
        self.owner = create
        self.ident = (st.st_dev, st.st_ino)  # the object itself, whatever name (or hard link) opened it
        self.buf = memoryview(self._array).cast("B") if self._array is not None else memoryview(b"")

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (for C calls on objects that live in it)."""
        return ctypes.addressof(self._array) if self._array is not None else 0

    def current_size(self) -> int:
        """The object's size now (its owner may have shrunk it since it was mapped)."""
        return os.fstat(self._fd).st_size if self._fd >= 0 else self.size

    def close(self) -> None:
        """Drop this process's mapping (deferred while views on it exist)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._array is None:
            return
        try:
            self.buf.release()
        except BufferError:
            pass  # numpy views still use the pages; they unmap when the last goes
        self.buf = memoryview(b"")
        self._array = None

    def unlink(self) -> None:
        """Remove the name from the system (mappings stay valid)."""
        unlink(self.name)

    def __repr__(self) -> str:
        return f"Region({self.name!r}, {self.size})"


def space(shm_dir: str = "/dev/shm") -> tuple[int, int]:
    """Bytes free and in all in ``shm_dir`` (0, 0 if it cannot be read)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return 0, 0
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def unlink(name: str) -> None:
    """Remove a shared-memory name, ignoring one that is already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def stale_entries(folder: str, owner: Callable[[str], tuple[int, int] | None]) -> list[str]:
    """The entries of ``folder`` whose owner has ended (:func:`gone`); ``owner(entry)`` reads an entry's
    ``(pid, start)`` from its name (``start`` 0 if the name has none), or None for a name not ours."""
    started: dict[int, int] = {}
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [entry for entry in entries if (o := owner(entry)) is not None and gone(o[0], o[1], started)]


def _shm_owner(entry: str) -> tuple[int, int] | None:
    stem = entry[4:] if entry.startswith("sem.") else entry
    if not stem.startswith(PREFIX):
        return None
    pid_text, start_text = (stem[len(PREFIX):].split(".", 2) + ["", ""])[:2]
    if not pid_text.isdigit():
        return None
    return int(pid_text), int(start_text) if start_text.isdigit() else 0


def remove_stale(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove objects of earlier servers whose process no longer exists: its pid is gone, or now names a
    process that started at another time (names of an older form, without the start time, by the pid alone)."""
    removed = []
    for entry in stale_entries(shm_dir, _shm_owner):
        try:
            os.unlink(os.path.join(shm_dir, entry))
            removed.append(entry)
        except OSError:
            pass
    return removed


_server_objects_cache: dict[str, tuple[int, set[tuple[int, int]]]] = {}


def server_objects(shm_dir: str = "/dev/shm") -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every object of this server family (arenas, rings and their semaphores).

    A client may reach one under another name (a hard link, or ``sem.ek...``, which ``shm_open`` opens
    too); comparing the objects themselves, not their names, refuses every such alias.
    """
    try:
        stamp = os.stat(shm_dir).st_mtime_ns  # changes whenever a name is added or removed
    except OSError:
        return set()
    cached = _server_objects_cache.get(shm_dir)
    # The stamp is coarse (a clock tick): trusted only once it is older than any tick.
    if cached is not None and cached[0] == stamp and time.time_ns() - stamp > 100_000_000:
        return cached[1]
    found: set[tuple[int, int]] = set()
    try:
        entries = os.scandir(shm_dir)
    except OSError:
        return found
    _server_objects_cache[shm_dir] = (stamp, found)
    with entries:
        for entry in entries:
            stem = entry.name[4:] if entry.name.startswith("sem.") else entry.name
            if stem.startswith(PREFIX):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.add((st.st_dev, st.st_ino))
    return found


def owned_objects(pid: int, shm_dir: str = "/dev/shm") -> list[str]:
    """Names in ``shm_dir`` that belong to process ``pid`` (what a crashed worker leaves behind)."""
    tag = f"{PREFIX}{pid}."
    try:
        return sorted(e for e in os.listdir(shm_dir) if e.startswith(tag) or e.startswith("sem." + tag))
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
