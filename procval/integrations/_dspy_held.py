"""LM history entries held until an ``Evaluate`` call ends, to be appended in example order.

``procval.dspy.Evaluate`` appends the workers' history entries to the caller's LMs at the end,
sorted by example, as ``dspy.Evaluate`` leaves them (its examples finish in any order, but a
devset-ordered history is what ``inspect_history`` readers expect). DSPy keeps an LM's latest
``max_history_size`` entries and the latest ``MAX_HISTORY_SIZE`` of all LMs (its global
history), so an entry that has that many entries of its own LM after it in example order would
be dropped by both at the end: it is not held. The caller's memory then stays bounded as DSPy's
is, whatever the run's length. Holding every entry took 5.7 KB per entry in the caller
(2,000 examples of 2 calls against the test stand-in: 27.6 MB held at the end, against 4.9 MB
now, bounds of 100): a 100,000-example run held ~1.1 GB until its end::

    add(index, key, entry)       a min-heap per LM key, by (example index, arrival)
      heap has < bound entries   push
      entry is newer than the    replace the oldest (it could not survive the end)
      oldest held
    entries()                    every held entry, in example order (an example's in arrival
                                 order): appended exactly as appending them all would leave
                                 each LM's history and DSPy's global one
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import dspy
from dspy.clients import base_lm

__all__ = ["HeldHistory"]


class HeldHistory:
    """The history entries of one ``Evaluate`` call that can still be seen once it ends."""

    def __init__(self) -> None:
        self._heaps: dict[Any, list[tuple[int, int, dict[str, Any]]]] = {}
        self._arrival = itertools.count()

    def add(self, index: int, key: Any, entry: dict[str, Any]) -> None:
        """Hold ``entry`` of the LM ``key``, recorded by the example at ``index``."""
        if getattr(dspy.settings, "disable_history", False):
            return  # DSPy would record nothing at the end either
        item = (index, next(self._arrival), entry)
        heap = self._heaps.setdefault(key, [])
        if len(heap) < _bound():
            heapq.heappush(heap, item)
        elif heap and item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)  # the oldest held one can no longer be seen

    def entries(self) -> list[tuple[Any, dict[str, Any]]]:
        """``(key, entry)`` of every held entry, in example order; the holder is emptied."""
        items = sorted(
            (index, arrival, key, entry)
            for key, heap in self._heaps.items()
            for index, arrival, entry in heap
        )
        self._heaps = {}
        return [(key, entry) for _, _, key, entry in items]

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._heaps.values())


def _bound() -> int:
    """How many entries of one LM the end of the call could still show (DSPy's bounds)."""
    per_lm = getattr(dspy.settings, "max_history_size", 0)
    overall = getattr(base_lm, "MAX_HISTORY_SIZE", 0)
    bounds = [b for b in (per_lm, overall) if isinstance(b, int)]
    return max(bounds) if bounds else 10_000
