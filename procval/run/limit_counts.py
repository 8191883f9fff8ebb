"""The rate-limit counts of a run (429s, waits, calls per config and key) kept in the run store.

::

    Limiter (procval.run.limiter)            CountingSink (this module), around the StoreSink
    counts per (config, key), this call ───▶ after each shard's rows are stored, and at close:
                                             the counts added since the last write go to the
                                             store's ``limits`` table (summed over sessions)

So ``procval report`` shows them for a stored run, and a resumed run adds to them. Counts since
the last write of a session killed with ``kill -9`` are lost (they are not results).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from procval.errors import StoreError
from procval.results import Row
from procval.store.sink import Sink, SinkWrapper

__all__ = ["CountingSink", "counted"]

Counts = Mapping[str, Mapping[str, Mapping[str, float]]]  # {config: {key: {name: value}}}


class CountingSink(SinkWrapper):
    """A store's sink that also writes the limiter's counts as they grow.

    Args:
        sink: the sink to wrap (the store's, or one around it).
        writer: the store's sink, whose ``add_limits`` keeps the counts.
        counts: the counts of this call so far (``Limiter.counts``), or None before the
            limiter started (or when the run has no rate limit).
    """

    def __init__(self, sink: Sink, writer: Any, counts: Callable[[], Counts | None]) -> None:
        super().__init__(sink)
        self._writer = writer
        self._counts = counts
        self._written: dict[tuple[str, str], dict[str, float]] = {}

    def add(self, config: str, rows: list[Row]) -> None:
        """Store the rows, then the config's counts added since the last write."""
        self._sink.add(config, rows)
        self.flush(config)

    def close(self, *, completed: bool) -> None:
        """Write every config's last counts, then close the wrapped sink."""
        try:
            with contextlib.suppress(StoreError):  # close never raises one (StoreSink.close)
                self.flush(None)
        finally:
            self._sink.close(completed=completed)

    def flush(self, only: str | None) -> None:
        """Write the counts of ``only`` (None: every config) added since they were last written."""
        found = self._counts() or {}
        for config, keys in found.items():
            if only is not None and config != only:
                continue
            delta: dict[str, dict[str, float]] = {}
            for key, now in keys.items():
                before = self._written.get((config, key), {})
                change = {name: value - before.get(name, 0) for name, value in now.items()}
                if any(change.values()):
                    delta[key] = change
                    self._written[config, key] = dict(now)
            if delta:
                self._writer.add_limits(config, delta)


def counted(sink: Sink, writer: Any, counts: Callable[[], Counts | None]) -> Sink:
    """``sink``, writing the limit counts with ``writer`` (a StoreSink; None: ``sink`` as is)."""
    return sink if writer is None else CountingSink(sink, writer, counts)
