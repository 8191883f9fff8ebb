"""The small interface between the scheduler and an execution engine.

A backend starts *workers*. A worker is one process (a loky process, a Ray actor, ...) that has
installed one config snapshot and runs shards for it until it is closed or killed. The scheduler
owns everything else (sharding, timeouts, crash recovery, retries of lost work, the store), so
every backend gets the same guarantees from the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from procval._worker import WorkerOptions
from procval.config import Snapshot


@dataclass(frozen=True)
class WorkerSpec:
    """What a new worker must install.

    Attributes:
        snapshot: the config's snapshot; the worker installs ``snapshot.data``, which holds
            the config, the program and the metric (shipped once per worker).
        options: threads, retries and backoff, and the parent's pid for the watchdog.
        env: the config's environment variables, set before the worker's interpreter starts
            (some libraries read them at import time).
    """

    snapshot: Snapshot
    options: WorkerOptions
    env: Mapping[str, str] = field(default_factory=dict)


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
        """Queue a pickled shard; the future resolves to the pickled results."""
        ...

    def running(self) -> list[tuple[int, float]]:
        """``(seq, seconds running)`` for each example the worker is running now."""
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
    """Starts workers and releases what it holds at the end of a run."""

    def default_workers(self) -> int:
        """How many workers ``evaluate(workers=None)`` starts (e.g. the CPUs it can use)."""
        ...

    def start_worker(self, spec: WorkerSpec) -> Worker:
        """Start a worker that installs ``spec.snapshot`` (asynchronously; submit may queue)."""
        ...

    def shutdown(self) -> None:
        """Kill any worker still alive and release resources."""
        ...
