"""Triton's response cache (``--cache-config local,size=N`` + a model's ``response_cache { enable: true }``).

The cache lives in the front: a hit is answered without a worker, an output the client wants in its
registered region is written there, others are handed out as immutable bytes (so an entry evicted while
its bytes are being sent stays valid). The key covers exactly what Triton hashes (model name, version,
each input's name and bytes in name order); the entry also keeps the inputs' datatypes and shapes and the
outputs it holds, and a request differing in those is a miss rather than Triton's stale answer
(docs/triton-behaviour.md, "Response cache").
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from kernel.errors import ServerError
from kernel.types import ArenaRef, InferResponse, OutputTensor, ShmRef
from shm import dtypes

if TYPE_CHECKING:
    from kernel.model import ModelVersion, Pending
    from kernel.scheduling.scheduler import Scheduler

log = logging.getLogger("kernel")

#: bytes an entry costs besides its outputs' data (Triton's packed entry: counts, sizes, names, shapes)
_ENTRY_OVERHEAD = 8
_OUTPUT_OVERHEAD = 32


def parse_cache_config(settings: list[tuple[str, str, str]], byte_size: int | None = None) -> int:
    """``--cache-config`` settings (and the deprecated ``--response-cache-byte-size``) as the local cache's
    size in bytes (0: no cache). Errors raise ValueError with tritonserver's wording where it has one."""
    if byte_size is not None:
        if settings:
            raise ValueError("Incompatible flags --response-cache-byte-size and --cache-config both provided. "
                             "Please provide one or the other.")
        settings = [("local", "size", str(byte_size))]
        log.warning("'--response-cache-byte-size' has been deprecated! This will default to the 'local' cache "
                    "implementation with the provided byte size for its config. Please use '--cache-config' "
                    "instead. The equivalent --cache-config CLI args would be: '--cache-config=local,size=%d'",
                    byte_size)
    if not settings:
        return 0
    names = {name for name, _, _ in settings}
    if len(names) > 1:
        raise ValueError("found multiple cache configurations, but only a single cache is currently supported")
    name = names.pop()
    if name != "local":
        raise ValueError(f"unknown cache '{name}': only the 'local' cache is available (Triton would look for "
                         f"'libtritoncache_{name}.so')")
    config = {key: value for _, key, value in settings}
    for key in config.keys() - {"size"}:  # Triton's local cache ignores them too
        log.warning("--cache-config: the local cache ignores setting '%s'", key)
    if "size" not in config:
        raise ValueError("Failed to initialize LocalCache: config didn't contain a valid 'size' field.")
    text = config["size"]
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"Failed to initialize LocalCache: 'size' must be a positive number of bytes, got '{text}'")
    return int(text)


def cache_setting(text: str) -> tuple[str, str, str]:
    """One ``--cache-config`` argument, ``<cache name>,<setting>=<value>`` (tritonserver's parse and errors)."""
    comma = text.find(",")
    if comma <= 0:
        raise ValueError(f"No cache specified. --cache-config option format is <cache name>,<setting>=<value>. "
                         f"Got {text}")
    key, eq, value = text[comma + 1:].partition("=")
    if not eq or not key or not value:
        raise ValueError(f"--cache-config option format is '<cache name>,<setting>=<value>'. Got {text}")
    return text[:comma], key, value


def check_config(config: Any) -> None:
    """Triton's poll-time refusals (model_config_utils.cc): the cache supports neither sequence batching
    nor decoupled models."""
    if not config.response_cache.enable:
        return
    if config.HasField("sequence_batching"):
        raise ServerError(f"Response Cache does not currently support model {config.name} with sequence batching "
                          "scheduler. Please disable the response cache.", "INVALID_ARG")
    if config.model_transaction_policy.decoupled:
        raise ServerError(f"Response Cache does not currently support model {config.name} with 'decoupled' "
                          "transaction policy. Please disable the response cache.", "INVALID_ARG")


class Entry:
    """One cached response: its outputs' (name, datatype, shape, bytes), and the inputs' signature."""

    __slots__ = ("outputs", "signature", "nbytes")

    def __init__(self, outputs: list[tuple[str, str, list[int], bytes]], signature: tuple) -> None:
        self.outputs = outputs
        self.signature = signature
        self.nbytes = _ENTRY_OVERHEAD + sum(_OUTPUT_OVERHEAD + len(n) + 8 * len(s) + len(b)
                                            for n, _, s, b in outputs)


class ResponseCache:
    """Triton's ``local`` cache: complete responses, least recently used evicted first, bounded in bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        #: server-wide counters (Triton's nv_cache_num_* and nv_cache_*_duration metrics)
        self.lookups = self.hits = self.misses = self.evictions = 0
        self.lookup_ns = self.insertion_ns = 0

    def get(self, key: bytes) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> str | None:
        """Insert (replacing an entry of that key), evicting the least recently used as needed; an entry
        larger than the whole cache is refused with the local cache's message."""
        if entry.nbytes > self.size:
            return f"Requested byte_size: {entry.nbytes} is greater than total cache size: {self.size}"
        old = self.entries.pop(key, None)
        if old is not None:
            self.used -= old.nbytes
        while self.used + entry.nbytes > self.size:
            _, evicted = self.entries.popitem(last=False)
            self.used -= evicted.nbytes
            self.evictions += 1
        self.entries[key] = entry
        self.used += entry.nbytes
        return None


class ModelCache:
    """One model version's use of the server's cache: lookups before scheduling, insertions after."""

    __slots__ = ("version", "cache")

    def __init__(self, version: ModelVersion, cache: ResponseCache) -> None:
        self.version = version
        self.cache = cache

    def _key(self, pending: Pending) -> tuple[bytes, tuple] | None:
        """The request's key and signature; None when it cannot be cached (bytes the front cannot read)."""
        request = pending.request
        version = self.version
        h = hashlib.blake2b(digest_size=16)
        for part in (version.name, version.version_str):
            raw = part.encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
        signature = []
        for t in sorted(request.inputs, key=lambda t: t.name):
            data = t.data
            if isinstance(data, ShmRef):
                buf: Any = data.region.buffer()[data.offset : data.offset + data.byte_size]
            elif isinstance(data, ArenaRef):  # the front's arena (in-process API, large HTTP bodies) or, from a
                if isinstance(data.owner, (memoryview, bytes)):  # BLS call, the calling worker's, viewed by ``owner``
                    buf = data.owner
                elif version.server.arena is not None and version.server.arena.owns(data.key):
                    buf = version.server.arena.view(data.key, data.offset, data.byte_size)
                else:
                    return None
            elif isinstance(data, np.ndarray):
                if t.datatype == "BYTES":
                    buf = dtypes.serialize_bytes(data)
                else:
                    dtype = dtypes.NUMPY.get(t.datatype)
                    array = data if dtype is None else data.astype(dtype, copy=False)
                    buf = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            elif isinstance(data, (memoryview, bytes, bytearray)):
                buf = data
            elif data is None:
                buf = b""
            else:
                return None
            raw = t.name.encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
            h.update((buf.nbytes if type(buf) is memoryview else len(buf)).to_bytes(8, "little"))
            h.update(buf)
            signature.append((t.name, t.datatype, tuple(t.shape)))
        return h.digest(), tuple(signature)

    def serve(self, pending: Pending) -> bool:
        """Answer ``pending`` from the cache if it can (True); else remember its key for :meth:`store`."""
        request = pending.request
        if request.chain is not None or any(o.arena for o in request.outputs or ()):
            return False  # a chained pipeline step's outputs go to a block the next step reads: never cached
        # (classification is applied to a hit's outputs as to a model's, where the response is delivered: the
        # entry holds the raw tensors, as Triton's does)
        start = time.perf_counter_ns()
        keyed = self._key(pending)
        if keyed is None:
            return False
        key, signature = keyed
        cache = self.cache
        cache.lookups += 1
        entry = cache.get(key)
        if entry is not None and entry.signature == signature:
            outputs = self._outputs(entry, request.outputs)
            if outputs is not None:
                from kernel.model import _settle

                end = time.perf_counter_ns()
                cache.hits += 1
                cache.lookup_ns += end - start
                self.version.stats.cache_hit(end - pending.enqueued, start - pending.enqueued, end - start)
                _settle(pending, InferResponse(self.version.name, self.version.version_str, request.id, outputs))
                return True
        lookup_ns = time.perf_counter_ns() - start
        cache.misses += 1
        cache.lookup_ns += lookup_ns
        pending.cache = (key, signature, lookup_ns)
        return False

    @staticmethod
    def _outputs(entry: Entry, wanted: list | None) -> list[OutputTensor] | None:
        """The hit's outputs (into the client's regions where asked); None when the entry lacks one."""
        if wanted is None:
            return [OutputTensor(n, d, list(s), len(b), memoryview(b)) for n, d, s, b in entry.outputs]
        held = {o[0]: o for o in entry.outputs}
        if any(o.name not in held for o in wanted):
            return None
        outputs = []
        for o in wanted:
            name, datatype, shape, data = held[o.name]
            ref = o.shm
            if ref is None:
                outputs.append(OutputTensor(name, datatype, list(shape), len(data), memoryview(data)))
                continue
            if len(data) > ref.byte_size:
                raise ServerError(f"shared memory size specified with the request for output '{name}' "
                                  f"({ref.byte_size} bytes) should be at least {len(data)} bytes to hold the "
                                  "results", "INVALID_ARG")
            ref.region.buffer()[ref.offset : ref.offset + len(data)] = data
            outputs.append(OutputTensor(name, datatype, list(shape), len(data), shm=ref))
        return outputs

    def store(self, pending: Pending, response: InferResponse | None) -> None:
        """A request that missed was answered: its response (None: the model's error, not cached) goes in,
        and the miss is counted with its lookup and insertion time, as Triton does."""
        state = getattr(pending, "cache", None)
        if state is None:
            return
        pending.cache = None
        key, signature, lookup_ns = state
        start = time.perf_counter_ns()
        if response is not None:
            outputs = []
            for o in response.outputs:
                if o.shm is not None:
                    data = bytes(o.shm.region.buffer()[o.shm.offset : o.shm.offset + o.byte_size])
                else:
                    data = bytes(o.data) if o.data is not None else b""
                outputs.append((o.name, o.datatype, list(o.shape), data))
            error = self.cache.put(key, Entry(outputs, signature))
            if error is not None:
                log.error("Failed to insert key [%s] into response cache: %s", key.hex(), error)
        insertion_ns = time.perf_counter_ns() - start
        self.cache.insertion_ns += insertion_ns
        self.version.stats.cache_miss(lookup_ns + insertion_ns)


class CachingScheduler:
    """A cached model version's scheduler: looks each request up first; the wrapped scheduler does the rest
    (models without the cache keep theirs unwrapped, so their path is unchanged)."""

    def __init__(self, inner: Scheduler, cache: ModelCache) -> None:
        self.inner = inner
        self.cache = cache

    def submit(self, pending: Pending) -> None:
        if not self.cache.serve(pending):
            self.inner.submit(pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
