"""A tiny shared-memory table: which example each worker thread is running, since when.

The worker writes, the parent reads, through a memory-mapped file; no message is sent, so it costs
about a microsecond per example and keeps working while the worker is stuck in C code. The parent
uses it to enforce timeouts, to know which examples were running when a worker died, and to see
that a worker is alive: a thread of the worker writes a heartbeat every :data:`BEAT` seconds
(:func:`procval.worker.lifeline.beat`), which stops when the process is stopped or frozen.

Layout (little-endian): ``pid:int64 ready:int64 beat:float64`` then, per thread slot,
``seq:int64 start:float64`` where ``seq`` is -1 for an idle slot, and ``start`` and ``beat`` are
``time.monotonic()`` (system-wide on Linux and macOS, so comparable across processes of one
machine); ``beat`` is 0.0 until the first heartbeat.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time

_HEADER = struct.Struct("<qqd")
_BEAT = struct.Struct("<d")
_BEAT_OFFSET = 16
BEAT = 0.5  # seconds between two heartbeats of a worker
_SLOT = struct.Struct("<qd")
IDLE = -1


def _size(slots: int) -> int:
    return _HEADER.size + _SLOT.size * slots


class SlotTable:
    """A slot table over ``path``: create it in the parent, open it in the worker."""

    def __init__(self, path: str, slots: int, *, create: bool = False) -> None:
        self.path = path
        self.slots = slots
        if create:
            with open(path, "wb") as f:
                f.write(_HEADER.pack(0, 0, 0.0))
                for _ in range(slots):
                    f.write(_SLOT.pack(IDLE, 0.0))
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _size(slots))
        finally:
            os.close(fd)

    # worker side
    def mark_ready(self, pid: int) -> None:
        """Record the worker's pid and that its snapshot is installed."""
        _HEADER.pack_into(self._map, 0, pid, 1, time.monotonic())

    def beat(self) -> None:
        """Record that the worker's interpreter is alive now (its heartbeat thread calls this)."""
        _BEAT.pack_into(self._map, _BEAT_OFFSET, time.monotonic())

    def start(self, slot: int, seq: int) -> None:
        """Thread ``slot`` starts example ``seq`` now."""
        offset = _HEADER.size + _SLOT.size * slot
        _SLOT.pack_into(self._map, offset, seq, time.monotonic())

    def stop(self, slot: int) -> None:
        """Thread ``slot`` is idle."""
        _SLOT.pack_into(self._map, _HEADER.size + _SLOT.size * slot, IDLE, 0.0)

    # parent side
    def pid(self) -> int:
        """The worker's pid, or 0 before it has installed its snapshot."""
        return int(_HEADER.unpack_from(self._map, 0)[0])

    def last_beat(self) -> float:
        """The ``time.monotonic()`` of the worker's last heartbeat, or 0.0 before the first."""
        return float(_BEAT.unpack_from(self._map, _BEAT_OFFSET)[0])

    def running(self) -> list[tuple[int, float]]:
        """``(seq, seconds running)`` for each busy slot."""
        now = time.monotonic()
        busy = []
        for slot in range(self.slots):
            seq, start = _SLOT.unpack_from(self._map, _HEADER.size + _SLOT.size * slot)
            if seq != IDLE:
                busy.append((int(seq), max(0.0, now - start)))
        return busy

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._map.closed

    def close(self) -> None:
        """Unmap the table (the file is removed by whoever created it)."""
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
