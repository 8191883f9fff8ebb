"""The messages that cross the pipe between the parent and a worker, by name.

Everything a worker receives or sends is one of these types, pickled; nothing is read by
position::

    parent ──WorkerSpec(Snapshot, WorkerOptions, env)──▶ worker   once, at start (its bytes)
    parent ──Shard(items=[WorkItem, ...], drain)────────▶ worker   per shard
    parent ◀──ShardDone(pid, node, fingerprint, results=[ExampleResult, ...])   per shard
    parent ◀──SetupFailed(traceback)                                the snapshot did not install

They are ``NamedTuple``s, so every field has a name. A shard may carry thousands of examples:
``Shard`` and ``ShardDone`` send their items as plain tuples and name them again on arrival,
which keeps the per-example cost of the wire what it was with bare tuples. This module imports
nothing of procval's, so both sides can use it; the worker side must stay light (see
``tests/test_imports.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

__all__ = [
    "ErrorInfo",
    "ExampleResult",
    "Reply",
    "SetupFailed",
    "Shard",
    "ShardDone",
    "Snapshot",
    "WorkItem",
    "WorkerOptions",
    "WorkerSpec",
    "fingerprint",
]


@dataclass(frozen=True)
class Snapshot:
    """A config pickled once in the parent: the bytes every worker of it installs.

    Attributes:
        name: the config's name.
        data: the cloudpickled ``(config, program, metric)``, pickled together once.
        fingerprint: a hash of ``data``; each worker recomputes it from the bytes it installed
            and stamps it on every row it produces.
        identity: :meth:`Config.identity`, compared when resuming from a store.
        description: :meth:`Config.describe`, plus a ``program`` hash of the program's and
            metric's code; kept in the store (resuming warns when the program changed).
        identity_v1: the identity procval 0.1.0 gave the config when it differs (a ``setup``
            closure), else ``""``; resuming a store written by 0.1.0 accepts it.
    """

    name: str
    data: bytes = field(repr=False)
    fingerprint: str
    identity: str
    description: Mapping[str, Any] = field(repr=False)
    identity_v1: str = ""


@dataclass
class WorkerOptions:
    """What the scheduler tells every worker besides the snapshot.

    Attributes:
        threads: examples run at once in the worker (threads, or async tasks).
        retries: extra attempts for an example whose program raises.
        backoff: seconds before the first retry, doubled each time (with jitter).
        parent_pid: the process whose death ends the worker (its watchdog); 0 for none.
        procval_path: the folder of the parent's ``procval`` package; a worker that imports
            ``procval`` from elsewhere (a folder named ``procval`` next to the task file, say)
            refuses to start. "" checks nothing (a backend whose workers may run on other
            machines, where procval is installed in another place).
        session: the worker leads a session (and process group) of its own, so that the
            backend can kill its descendants with it.
        log: where the worker sends its log records, ``(socket path, {logger name: level})``
            (the parent's listening Unix datagram socket and its loggers' levels, "" for the
            root logger); None: records stay in the worker (:mod:`procval.worker.logs`).
        limiter: the parent's rate limiter socket (:mod:`procval.run.limiter`); "" when no
            config of the run has a rate limit.
        timeout: the run's ``timeout``: a drain shard does not wait for an example running
            past it (its row is the scheduler's), so that the others' results come back.
    """

    threads: int = 1
    retries: int = 0
    backoff: float = 0.5
    parent_pid: int = 0
    procval_path: str = ""
    session: bool = False
    log: tuple[str, tuple[tuple[str, int], ...]] | None = None
    limiter: str = ""
    timeout: float | None = None


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


class WorkItem(NamedTuple):
    """One example on its way to a worker.

    Attributes:
        seq: the example's position in the dataset; its key in the scheduler and slot table.
        example_id: the example's id (its ``id`` key or attribute, else ``seq``).
        example: the example itself.
        epoch: which repetition of the example (``evaluate(..., epochs=)``), from 0; the worker
            seeds it from ``(seed, example_id, epoch)``, and epoch 0 as ``(seed, example_id)``.
    """

    seq: int
    example_id: Any
    example: Any
    epoch: int = 0


class Shard(NamedTuple):
    """Examples for a worker to run.

    Attributes:
        items: the examples; empty for a pure drain.
        drain: answer only once every example given to the worker so far has finished (the
            scheduler has nothing more to send it); otherwise once these have all started.
    """

    items: list[WorkItem]
    drain: bool

    def __reduce__(self) -> tuple[Any, ...]:
        # Each item crosses as a plain tuple (pickled in C, ~8x faster than a NamedTuple, whose
        # pickling calls Python per object) and is named again on arrival.
        return (_shard, (list(map(tuple, self.items)), self.drain))


def _shard(items: list[tuple[Any, ...]], drain: bool) -> Shard:
    return Shard(list(map(_named, repeat(WorkItem), items)), drain)


class ErrorInfo(NamedTuple):
    """Why an example has no score, as the worker saw it.

    Attributes:
        type: the exception's class name.
        message: ``str()`` of the exception.
        traceback: the formatted traceback ("" where there is none).
    """

    type: str
    message: str
    traceback: str


class ExampleResult(NamedTuple):
    """One example's outcome, as the worker reports it.

    Attributes:
        seq: the ``WorkItem.seq`` it answers.
        prediction: what the program returned (None when it raised).
        score: the metric's value (0.0 on error; the parent applies ``failure_score``).
        error: None, or what went wrong.
        attempts: how many times the program was called.
        duration: seconds spent in the worker, all attempts included.
        scores: every named score as ``(names, JSON text)`` (``procval._scores``), or None
            when the metric gave one unnamed score.
        extra: what the metric returned besides scores (JSON-able), or None.
        usage: raw token counts and cost per model name, or None (the parent builds ``Usage``).
        events: what the example recorded while it ran (``(kind, payload)`` pairs: DSPy
            callback events and LM history entries, pickled: ``procval.worker.record``),
            replayed in the parent; None for none.
    """

    seq: int
    prediction: Any
    score: float
    error: ErrorInfo | None
    attempts: int
    duration: float
    scores: tuple[tuple[str, ...], str] | None = None
    extra: dict[str, Any] | None = None
    usage: dict[str, dict[str, float]] | None = None
    # ``events`` goes last: new fields above it
    events: bytes | list[tuple[str, Any]] | None = None


class ShardDone(NamedTuple):
    """A worker's answer to a shard: the results finished since its last answer.

    Attributes:
        pid: the worker's process id.
        node: where the worker runs (the host, or the Ray node).
        fingerprint: the fingerprint of the snapshot the worker installed.
        results: finished examples, of this shard or of earlier ones (stragglers).
    """

    pid: int
    node: str
    fingerprint: str
    results: list[ExampleResult]

    def __reduce__(self) -> tuple[Any, ...]:
        # as for Shard: results cross as plain tuples (an error stays an ErrorInfo)
        return (
            _shard_done,
            (self.pid, self.node, self.fingerprint, list(map(tuple, self.results))),
        )


def _shard_done(pid: int, node: str, fingerprint: str, results: list[tuple[Any, ...]]) -> ShardDone:
    return ShardDone(pid, node, fingerprint, list(map(_named, repeat(ExampleResult), results)))


class SetupFailed(NamedTuple):
    """The worker could not install its snapshot (unpickling or ``Config.setup`` raised).

    Attributes:
        traceback: the worker's formatted traceback ("" when it refused to start).
        reason: why the worker refused to start, on one line, naming the fix (e.g. it imports
            another ``procval`` than the parent's); "" when the snapshot itself failed.
    """

    traceback: str
    reason: str = ""


Reply = ShardDone | SetupFailed

_named = tuple.__new__  # tuple.__new__(WorkItem, values): a NamedTuple built in C


def fingerprint(data: bytes) -> str:
    """The fingerprint of snapshot bytes, as stamped on rows (the worker recomputes it)."""
    return hashlib.sha256(data).hexdigest()[:16]
