"""Shared-memory building blocks: rings across processes, the arena allocator, region naming."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import posix_ipc
import pytest

from shm.arena import ALIGN, Arena, MiB
from shm.doorbell import Doorbell, ring
from shm.region import Region, ShmError, owned_objects, remove_stale, valid_key
from shm.ring import Ring, RingFull


def _echo_worker(inbox_spec, outbox_spec):
    """Child process: answer every message with (seq, len(payload), its last bytes)."""
    inbox, outbox = Ring(*inbox_spec), Ring(*outbox_spec)
    while True:
        msg = inbox.recv(timeout=10)
        if msg is None:
            break
        outbox.send([msg[0], len(msg[1]), msg[1][-8:]])


def test_ring_round_trips_across_processes():
    """Messages of 1 to many slots, wrapping many times, arrive whole and in order."""
    inbox = Ring.create("t-in", slots=16, slot_size=64)
    outbox = Ring.create("t-out", slots=16, slot_size=64)
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_echo_worker, args=(inbox.spec(), outbox.spec()))
    child.start()
    try:
        rng = random.Random(3)
        sent = []
        received = []
        deadline = time.monotonic() + 60
        for seq in range(3000):
            payload = os.urandom(rng.choice([0, 1, 50, 59, 60, 61, 200, 500, 900]))
            while True:
                try:
                    inbox.send([seq, payload], block=False)
                    break
                except RingFull:
                    received.extend(_drain(outbox))
                    assert child.is_alive() and time.monotonic() < deadline, "the consumer stopped"
            sent.append((seq, len(payload), payload[-8:]))
        while len(received) < len(sent):
            msg = outbox.recv(timeout=10)
            received.append(tuple(msg))
        assert [tuple(m) for m in received] == sent
        inbox.send(None)
    finally:
        child.join(10)
        for r in (inbox, outbox):
            r.close()
            r.unlink()
    assert child.exitcode == 0


def _drain(ring_):
    out = []
    while (msg := ring_.try_recv()) is not None:
        out.append(tuple(msg))
    return out


def test_ring_full_and_oversized():
    r = Ring.create("t-full", slots=4, slot_size=64)
    reader = Ring(*r.spec())  # the other end (each end keeps its own cursor)
    try:
        for i in range(4):
            r.send(i, block=False)
        with pytest.raises(RingFull):
            r.send(4, block=False)
        assert reader.try_recv() == 0  # one slot freed
        r.send(4, block=False)
        assert [reader.try_recv() for _ in range(4)] == [1, 2, 3, 4]
        assert reader.try_recv() is None
        with pytest.raises(ValueError):
            r.send(b"x" * 1000)
    finally:
        reader.close()
        r.close()
        r.unlink()


def test_producer_takes_free_slots_in_batches():
    """The producer takes ``spaces`` a batch at a time (one contended semaphore operation per batch of
    messages), and what it holds stays usable: messages of any size keep their order and contents."""
    from shm.ring import CREDIT_BATCH

    r = Ring.create("t-credits", slots=64, slot_size=32)
    reader = Ring(*r.spec())
    try:
        r.send(0)
        assert r.spaces.value == 64 - 1 - CREDIT_BATCH
        for i in range(1, CREDIT_BATCH + 1):
            r.send(i)
        assert r.spaces.value == 64 - 1 - CREDIT_BATCH  # sent from the credits it held: no semaphore touched
        assert [reader.try_recv() for _ in range(CREDIT_BATCH + 1)] == list(range(CREDIT_BATCH + 1))
        rng = random.Random(0)
        sent = []
        for i in range(500):  # sizes of 1 to 5 slots, wrapping around the ring many times
            msg = [i, b"x" * rng.randrange(140)]
            while True:
                try:
                    r.send(msg, block=False)
                    break
                except RingFull:  # full (the random walk outran the reads): read one and try again
                    assert reader.try_recv() == sent.pop(0)
            sent.append(msg)
            if rng.random() < 0.4:
                assert reader.try_recv() == sent.pop(0)
        assert _drain(reader) == [tuple(m) for m in sent]
    finally:
        reader.close()
        r.close()
        r.unlink()


def test_recv_times_out():
    r = Ring.create("t-timeout", slots=4, slot_size=64)
    try:
        with pytest.raises(posix_ipc.BusyError):
            r.recv(timeout=0.05)
    finally:
        r.close()
        r.unlink()


def test_doorbell_reports_writer_exit():
    bell = Doorbell()
    ring(bell.write_fd)
    assert bell.drain() is True
    bell.close_writer()
    assert bell.drain() is False
    bell.close()


def test_arena_alloc_free_coalesce_and_grow():
    arena = Arena("t-arena", initial_size=4096)
    try:
        blocks = [arena.alloc(100) for _ in range(40)]  # 40 * 128 > 4096: grows a second segment
        assert len(arena.names()) == 2
        assert all(offset % ALIGN == 0 for _, offset in blocks)
        assert len(set(blocks)) == 40
        for name, offset in blocks[::2]:
            arena.free(name, offset)
        for name, offset in blocks[1::2]:
            arena.free(name, offset)
        assert arena.in_use() == 0
        # Everything coalesced: the whole first segment is one block again.
        name, offset = arena.alloc(4096)
        assert (name, offset) == (arena.names()[0], 0)
        view = arena.view(name, offset, 4096)
        view[:4] = b"abcd"
        assert bytes(Region(name).buf[:4]) == b"abcd"  # another mapping sees the bytes
    finally:
        names = arena.names()
        arena.close()
    assert not any(os.path.exists("/dev/shm" + n) for n in names)


def test_region_keys_are_shm_names_only():
    assert valid_key("/camera0")
    for bad in ("camera", "/etc/passwd", "/../x", "/", "//x", "/a/b", "/.."):
        assert not valid_key(bad), bad
    with pytest.raises(ShmError):
        Region("/etc/passwd")
    with pytest.raises(ShmError):
        Region("/ek-test-does-not-exist")


def test_stale_objects_of_dead_processes_are_removed():
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_make_object_and_exit)
    child.start()
    child.join(10)
    assert owned_objects(child.pid), "the child left its object behind"
    removed = remove_stale()
    assert any(e.startswith(f"ek.{child.pid}.") for e in removed)
    assert not owned_objects(child.pid)


def _make_object_and_exit():
    from shm.region import Region, new_name

    Region(new_name("stale"), 4096, create=True)  # never unlinked


def test_names_of_a_reused_pid_are_stale_and_never_collide():
    """A container restarted after a kill: the server is pid 1 again and the memory-backed /dev/shm kept the
    old server's objects. Its names carry its start time, so they neither collide with the new ones nor
    survive remove_stale(), although a live process (here: this one) holds their pid."""
    from shm.region import _start_time, new_name

    pid = os.getpid()
    start = _start_time(pid)
    assert start > 0
    mine = Region(new_name("front"), 4096, create=True)
    assert mine.name.startswith(f"/ek.{pid}.{start}.front.")
    old_life = Region(f"/ek.{pid}.{start - 1}.front.{mine.name.rsplit('.', 1)[1]}", 4096, create=True)
    old_form = Region(f"/ek.{pid}.front.999999", 4096, create=True)  # (names before the start time: by pid)
    try:
        removed = remove_stale()
        assert old_life.name[1:] in removed
        assert mine.name[1:] not in removed and old_form.name[1:] not in removed
        assert Region(mine.name).size == 4096  # still there
    finally:
        for region in (mine, old_life, old_form):
            region.close()
            region.unlink()


def test_an_arena_fits_a_small_dev_shm(monkeypatch):
    """In Docker's or Kubernetes' default 64 MiB /dev/shm the arena's preferred 64 MiB segment cannot be
    reserved: it takes a segment of what the block needs instead, and says what /dev/shm holds when even
    that fails. (The refusal is posix_fallocate's ENOSPC, played here by a Region that refuses more than
    4 MiB: mounting a small /dev/shm needs privileges CI may not have.)"""
    from shm import arena as arena_module

    class SmallShm(Region):
        def __init__(self, name: str, size: int | None = None, **kw) -> None:
            if kw.get("create") and size is not None and size > 4 * MiB:
                raise ShmError(f"unable to reserve {size} bytes of shared memory for '{name}': [Errno 28] "
                               "No space left on device")
            super().__init__(name, size, **kw)

    monkeypatch.setattr(arena_module, "Region", SmallShm)
    arena = Arena("small", 64 * MiB)
    try:
        name, offset = arena.alloc(1000)
        assert arena.buffer(name).nbytes == MiB  # the smallest segment, not the preferred 64 MiB
        second = arena.alloc(3 * MiB)  # another segment, of what it needs
        assert second[0] != name and arena.buffer(second[0]).nbytes == 4 * MiB
        with pytest.raises(ShmError, match=r"No space left on device \(/dev/shm: \d+ MiB free of \d+ MiB; in a "
                                           r"container, give it more: docker run --shm-size=1g"):
            arena.alloc(5 * MiB)
        arena.free(name, offset)
        arena.free(*second)
    finally:
        arena.close()
