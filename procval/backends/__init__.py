"""Execution engines: the small interface between the scheduler and the processes it uses.

A backend starts *workers*. A worker is one process (a loky process, a Ray actor, ...) that has
installed one config snapshot and runs shards for it until it is closed or killed. The scheduler
owns everything else (sharding, timeouts, crash recovery, retries of lost work, the store), so
every backend gets the same guarantees from the same code.

Engines: :mod:`procval.backends.loky` (local processes, forked from ``_forkserver``) and
:mod:`procval.backends.ray` (Ray actors), each imported when first asked for.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from procval.wire import WorkerSpec

__all__ = ["Backend", "Worker", "WorkerSpec"]


class Worker(Protocol):
    """One worker process serving one snapshot."""

    @property
    def label(self) -> str:
        """A short name for messages, e.g. ``"pid 1234"``."""
        ...

    @property
    def pid(self) -> int:
        """The worker's process id once it has started, else 0."""
        ...

    def submit(self, shard: bytes) -> Future[bytes]:
        """Queue a pickled ``wire.Shard``; the future resolves to a pickled ``wire.Reply``."""
        ...

    def running(self) -> list[tuple[int, float]]:
        """``(seq, seconds running)`` for each example the worker is running now."""
        ...

    def silent_for(self) -> float:
        """Seconds the worker has shown no sign of life (heartbeat, CPU time); 0.0: unknown.

        The scheduler kills and replaces a worker that owes answers and stays silent past its
        liveness bound, so a backend must not call a busy worker silent.
        """
        ...

    def death(self, exc: BaseException) -> str | None:
        """If ``exc`` (from a shard's future) means the worker died, how (exit code, signal)."""
        ...

    def crash_log(self) -> str:
        """What the worker's fault handler wrote when it died (a native traceback), or ""."""
        ...

    def kill(self) -> None:
        """End the worker process at once; its pending futures fail."""
        ...

    def close(self) -> None:
        """Let the worker finish its queued shards and exit."""
        ...


class Backend(Protocol):
    """Starts workers and releases what it holds at the end of a run.

    A backend may also have ``prestart(specs: Sequence[WorkerSpec]) -> None``, starting in the
    background what the workers of ``specs`` will need (loky: the fork server); the scheduler
    calls it, if present, before a resumed run reads past its stored rows, and starts those
    workers after (``procval.run.pools.read_ahead``).
    """

    def default_workers(self) -> int:
        """How many workers ``evaluate(workers=None)`` starts (e.g. the CPUs it can use)."""
        ...

    def start_worker(self, spec: WorkerSpec) -> Worker:
        """Start a worker that installs ``spec.snapshot`` (asynchronously; submit may queue)."""
        ...

    def shutdown(self) -> None:
        """Kill any worker still alive and release resources."""
        ...
