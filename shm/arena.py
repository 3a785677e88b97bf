"""Tensor arena: an allocator over shared-memory segments owned by one process.

The owner allocates and frees; other processes only map the segments (by name)
and read or write the blocks they are told about. Blocks are 64-byte aligned so
numpy views on them are aligned for every datatype and for SIMD loads. When a
segment is full a larger one is added; :meth:`trim` gives back the added segments
once they have stayed empty (a burst of large frames must not pin /dev/shm for ever).
"""

from __future__ import annotations

from bisect import bisect_left

from shm.region import Region, ShmError, new_name, space

ALIGN = 64
MiB = 1 << 20
SMALLEST = MiB  # the least a segment reserves when /dev/shm has no room for the size it would rather have


def round_up(n: int) -> int:
    """``n`` rounded up to the arena's alignment (every block starts ALIGN-aligned)."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class _Segment:
    """One shared-memory segment with a first-fit free list."""

    __slots__ = ("region", "free_offsets", "free_sizes", "used", "idle")

    def __init__(self, region: Region) -> None:
        self.region = region
        self.free_offsets: list[int] = [0]  # sorted
        self.free_sizes: list[int] = [region.size]
        self.used: dict[int, int] = {}
        self.idle = False  # empty at the last trim(), and not allocated from since

    def alloc(self, size: int) -> int | None:
        sizes = self.free_sizes
        for i, free in enumerate(sizes):
            if free >= size:
                offset = self.free_offsets[i]
                if free == size:
                    del self.free_offsets[i]
                    del sizes[i]
                else:
                    self.free_offsets[i] = offset + size
                    sizes[i] = free - size
                self.used[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self.used.pop(offset)
        offsets, sizes = self.free_offsets, self.free_sizes
        i = bisect_left(offsets, offset)
        # Coalesce with the following and the preceding free block.
        if i < len(offsets) and offset + size == offsets[i]:
            size += sizes[i]
            del offsets[i]
            del sizes[i]
        if i > 0 and offsets[i - 1] + sizes[i - 1] == offset:
            sizes[i - 1] += size
        else:
            offsets.insert(i, offset)
            sizes.insert(i, size)


class Arena:
    """Allocator of tensor blocks in shared memory, owned by this process."""

    def __init__(self, tag: str, initial_size: int = 32 * MiB) -> None:
        self._tag = tag
        self._initial = round_up(initial_size)
        self._segments: dict[str, _Segment] = {}
        self._order: list[_Segment] = []

    def alloc(self, nbytes: int, grow: bool = True) -> tuple[str, int] | None:
        """Reserve ``nbytes``; return ``(segment name, offset)``.

        With ``grow=False``, only from the segments there are (or the first, of the initial size):
        None when none has room.
        """
        size = round_up(max(nbytes, 1))
        for seg in self._order:
            offset = seg.alloc(size)
            if offset is not None:
                seg.idle = False
                return seg.region.name, offset
        if not grow and (self._order or size > self._initial):
            return None
        seg = self._grow(size)
        offset = seg.alloc(size)
        assert offset is not None
        return seg.region.name, offset

    def free(self, name: str, offset: int) -> None:
        """Release a block returned by :meth:`alloc`."""
        self._segments[name].free(offset)

    def owns(self, name: str) -> bool:
        """Whether ``name`` is a segment of this arena."""
        return name in self._segments

    def buffer(self, name: str) -> memoryview:
        """Writable view of the whole segment ``name``."""
        return self._segments[name].region.buf

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        """Writable view of ``nbytes`` at ``offset`` of segment ``name``."""
        return self._segments[name].region.buf[offset : offset + nbytes]

    def in_use(self) -> int:
        """Bytes currently allocated (for tests and statistics)."""
        return sum(sum(s.used.values()) for s in self._order)

    def names(self) -> list[str]:
        return [s.region.name for s in self._order]

    def trim(self) -> list[str]:
        """Give back the segments that were empty at the last call and still are, but one of the
        initial size (what a quiet server keeps).

        Called periodically: a segment must stay empty for a whole period before it goes, so a
        steady load does not map and unmap segments over and over. Returns the names removed:
        processes that mapped them must drop their mappings too, or the pages stay in use.
        """
        removed = []
        kept = next((seg for seg in self._order if seg.region.size == self._initial), None)
        for seg in self._order:
            if seg is kept:
                continue
            if seg.used:
                seg.idle = False
            elif not seg.idle:
                seg.idle = True
            else:
                removed.append(seg)
        for seg in removed:
            self._order.remove(seg)
            del self._segments[seg.region.name]
            seg.region.unlink()
            seg.region.close()
        return [seg.region.name for seg in removed]

    def close(self) -> None:
        """Unlink and unmap every segment."""
        for seg in self._order:
            seg.region.unlink()
            seg.region.close()
        self._segments.clear()
        self._order.clear()

    def _grow(self, size: int) -> _Segment:
        last = max((seg.region.size for seg in self._order), default=0)
        seg_size = max(self._initial, 2 * last)
        while seg_size < size:
            seg_size *= 2
        try:
            region = Region(new_name(self._tag), seg_size, create=True)
        except ShmError as e:
            # A small /dev/shm (Docker's and Kubernetes' default is 64 MiB): what this block needs, if not the
            # headroom; the arena grows again from there.
            need = max(SMALLEST, 1 << (size - 1).bit_length())
            if need >= seg_size:
                raise _full(e) from None
            try:
                region = Region(new_name(self._tag), need, create=True)
            except ShmError as again:
                raise _full(again) from None
        seg = _Segment(region)
        self._segments[seg.region.name] = seg
        self._order.append(seg)
        return seg


def _full(error: ShmError) -> ShmError:
    """``error`` with what /dev/shm holds, and how a container gets more."""
    free, total = space()
    return ShmError(f"{error} (/dev/shm: {free // MiB} MiB free of {total // MiB} MiB; in a container, give it more: "
                    "docker run --shm-size=1g, or a memory-backed emptyDir mounted on /dev/shm)")


__all__ = ["ALIGN", "Arena", "MiB", "round_up"]
