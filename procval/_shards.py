"""How many examples to put in the next shard.

Like joblib's auto-batching: aim for shards that take about ``TARGET`` seconds in a worker, so
the per-shard cost (~100 µs of pickling and IPC) is invisible next to trivial examples while slow
examples still travel one or a few at a time. Near the end of a dataset of known length, shards
shrink so that no worker idles while another finishes a long last shard.
"""

from __future__ import annotations

import math

TARGET = 0.3  # seconds of work per shard
MAX_SIZE = 4096


class ShardSizer:
    """Adaptive shard sizes for one config, from the timings its workers report."""

    def __init__(self, threads: int) -> None:
        self._threads = max(1, threads)
        self._per_example: float | None = None

    def observe(self, examples: int, seconds: float) -> None:
        """A shard of ``examples`` took ``seconds`` of wall time inside a worker."""
        if examples <= 0:
            return
        sample = max(seconds, 1e-7) / examples
        if self._per_example is None:
            self._per_example = sample
        else:  # exponential moving average: follow drifts, damp noise
            self._per_example = 0.7 * self._per_example + 0.3 * sample

    def next_size(self, *, remaining: int | None, workers: int) -> int:
        """Examples for the next shard, given what is left and how many workers share it."""
        size = 2 * self._threads if self._per_example is None else int(TARGET / self._per_example)
        if remaining is not None:
            size = min(size, math.ceil(remaining / (2 * max(1, workers))))
        return max(1, min(size, MAX_SIZE))
