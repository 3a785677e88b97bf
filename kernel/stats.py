"""Per-model-version statistics in the shape of Triton's statistics extension."""

from __future__ import annotations

import time

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
              "cache_hit", "cache_miss")


class ModelStats:
    """Counters of one model version; all times in nanoseconds."""

    __slots__ = ("inference_count", "execution_count", "last_inference", "durations", "batches", "failures", "_hot")

    def __init__(self) -> None:
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0  # ms since the epoch
        self.durations = {k: [0, 0] for k in _DURATIONS}
        # the entries a success updates, unrolled there (this runs once per request)
        self._hot = tuple(self.durations[k] for k in ("success", "queue", "compute_input", "compute_infer",
                                                      "compute_output"))
        # batch size -> [count, compute_input ns, compute_infer ns, compute_output ns]
        self.batches: dict[int, list[int]] = {}
        self.failures: dict[str, int] = {}  # by Triton's metric reason: BACKEND, REJECTED, OTHER

    def success(self, total_ns: int, queue_ns: int, ci: int, cinf: int, co: int, batch_size: int) -> None:
        """One request answered successfully (``ci``... are its share of the batch).

        ``last_inference`` is set by :meth:`execution`, which precedes its requests' successes.
        """
        success, queue, compute_input, compute_infer, compute_output = self._hot
        success[0] += 1
        success[1] += total_ns
        queue[0] += 1
        queue[1] += queue_ns
        compute_input[0] += 1
        compute_input[1] += ci
        compute_infer[0] += 1
        compute_infer[1] += cinf
        compute_output[0] += 1
        compute_output[1] += co
        self.inference_count += batch_size

    def cache_hit(self, total_ns: int, queue_ns: int, hit_ns: int) -> None:
        """A request answered from the response cache: as Triton counts it, a success with its queue time
        but no compute, inference or execution (and ``last_inference`` stays)."""
        success, queue = self._hot[:2]
        success[0] += 1
        success[1] += total_ns
        queue[0] += 1
        queue[1] += queue_ns
        entry = self.durations["cache_hit"]
        entry[0] += 1
        entry[1] += hit_ns

    def cache_miss(self, miss_ns: int) -> None:
        """A request that missed the cache was answered (its success already counted): Triton adds the
        lookup and insertion time to the request's duration too."""
        self.durations["success"][1] += miss_ns
        entry = self.durations["cache_miss"]
        entry[0] += 1
        entry[1] += miss_ns

    def failure(self, total_ns: int, reason: str = "BACKEND") -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        entry = self.durations["fail"]
        entry[0] += 1
        entry[1] += total_ns
        self.last_inference = time.time_ns() // 1_000_000

    def execution(self, batch_size: int, ci: int, cinf: int, co: int) -> None:
        """One execution of the model on a batch of ``batch_size``."""
        self.execution_count += 1
        entry = self.batches.get(batch_size)
        if entry is None:
            entry = self.batches[batch_size] = [0, 0, 0, 0]
        entry[0] += 1
        entry[1] += ci
        entry[2] += cinf
        entry[3] += co
        self.last_inference = time.time_ns() // 1_000_000

    def to_dict(self, name: str, version: str) -> dict:
        """Triton's JSON for one entry of ``model_stats``."""

        def dur(count: int, ns: int) -> dict:
            return {"count": count, "ns": ns}

        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: dur(*v) for k, v in self.durations.items()},
            "response_stats": {},
            "batch_stats": [
                {"batch_size": size, "compute_input": dur(c, ci), "compute_infer": dur(c, cinf),
                 "compute_output": dur(c, co)}
                for size, (c, ci, cinf, co) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
