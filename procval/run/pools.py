"""The scheduler's bookkeeping: a :class:`ConfigRun` per config, a :class:`WorkerRun` per worker.

A config's examples wait in its queues (``requeue`` first, then the lazy ``source``; suspects
apart, sent alone); a worker holds what it was sent and has not answered (``outstanding``) and
the shards it has not answered (``calls``). How a worker's state and an example's place change is
decided in :mod:`procval.run.lifecycle`; the scheduler applies it here.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice

from procval.backends import Worker, WorkerSpec
from procval.results import Totals
from procval.run.dataset import Item
from procval.run.failures import SetupFailure
from procval.run.lifecycle import (
    ExampleFate,
    TimeoutAction,
    WorkerEvent,
    WorkerState,
    advance,
    timeout_action,
)
from procval.run.shards import ShardSizer

LIVENESS = 60.0  # seconds without a sign of life after which a worker that owes answers is lost


def default_liveness() -> float:
    """``PROCVAL_LIVENESS`` (seconds) if set, else :data:`LIVENESS`.

    Raises:
        ValueError: the variable is not a positive number.
    """
    value = os.environ.get("PROCVAL_LIVENESS", "")
    if not value:
        return LIVENESS
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"PROCVAL_LIVENESS must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass
class RunOptions:
    """Scheduler settings from ``evaluate``'s keywords.

    Attributes:
        liveness: seconds a worker that owes answers may show no sign of life (no heartbeat,
            no CPU time) before it is killed and replaced (``PROCVAL_LIVENESS``, default 60).
    """

    workers: int
    failure_score: float = 0.0
    timeout: float | None = None
    max_errors: int | None = None
    resume_hint: str = ""
    epochs: int = 1
    primary: str | None = None
    liveness: float = field(default_factory=default_liveness)


_DRAIN_PAUSE = 0.2  # seconds between two drains that came back empty


@dataclass(eq=False)
class WorkerRun:
    """One worker of a config, and what it owes the scheduler.

    Attributes:
        worker: the backend's worker.
        config: the config it serves (only that one, for its whole life).
        state: where it is in its lifecycle (``lifecycle.WorkerState``).
        calls: the shards sent and not answered.
        outstanding: the examples sent without a result yet, by seq.
        replies: how many replies came back (none: a death may be a start failure).
        empty_at: when a reply last came back with no result while examples were owed.
    """

    worker: Worker
    config: ConfigRun
    state: WorkerState = WorkerState.STARTING
    calls: set[Future[bytes]] = field(default_factory=set)
    outstanding: dict[int, Item] = field(default_factory=dict)
    replies: int = 0
    empty_at: float = 0.0

    def note_reply(self, results: int) -> None:
        """Count a reply of ``results`` results."""
        self.replies += 1
        if not results and self.outstanding:
            self.empty_at = time.monotonic()

    def wants_drain(self) -> bool:
        """Whether to ask for the results it owes (a drain).

        It has nothing else in flight, and its last reply was not an empty one just now: a
        worker whose only examples run past the timeout answers a drain at once, and asking
        again at every turn would spin.
        """
        return (
            bool(self.outstanding)
            and not self.calls
            and (time.monotonic() - self.empty_at > _DRAIN_PAUSE)
        )

    def where(self) -> tuple[int, str]:
        """The worker's pid and node for the rows written for it ("": this host; Ray: a node id)."""
        return self.worker.pid, getattr(self.worker, "node", "")

    def busy(self) -> bool:
        """Whether the worker owes a reply or a result."""
        return bool(self.calls or self.outstanding)

    def check_timeout(self, timeout: float) -> tuple[TimeoutAction, set[int]]:
        """What a timeout check does to this worker, and its examples running past ``timeout``.

        See ``lifecycle.timeout_action``.
        """
        if not self.state.live:  # killed meanwhile (its config could not start)
            return TimeoutAction.NONE, set()
        running = self.worker.running()
        late = {seq for seq, seconds in running if seconds > timeout and seq in self.outstanding}
        stuck = sum(seconds > timeout for _, seconds in running)
        threads = self.config.spec.options.threads
        action = timeout_action(
            self.outstanding, late, state=self.state, threads=threads, stuck=stuck
        )
        return action, late

    def takes_work(self) -> bool:
        """Whether new examples may be sent to it (not running a suspect alone, not draining)."""
        return self.state in (WorkerState.STARTING, WorkerState.PRODUCING)

    def move(self, event: WorkerEvent) -> None:
        """Apply ``event`` to the worker's state (``lifecycle.advance``)."""
        self.state = advance(self.state, event)


@dataclass(eq=False)
class ConfigRun:
    """One config's run: its examples not yet sent, its workers, its totals so far.

    Attributes:
        spec: what its workers install.
        source: the examples not read yet (lazy; a resumed run skips those done).
        total: how many examples the run has (None: unknown).
        sizer: the config's shard sizes.
        totals: the rows so far, earlier sessions' included.
        requeue: examples to send again (innocent of a death or a timeout), sent first.
        suspects: examples to run alone, each in a shard of its own, before anything else.
        losses: how often each example was lost in a death that did not explain itself.
        workers: the config's live workers.
        exhausted: ``source`` has nothing left.
        start_failures: deaths before any reply since the config's last reply.
        found: rows already finished when the run began (a resumed run).
        replaced: workers lost (died, silent, never placed) and replaced, in this call.
        dataset_error: what the dataset raised while being read (the examples read before
            it still run; the scheduler raises it at the end).
        setup_failure: why the config cannot start (its workers failed ``Config.setup`` or
            died before any result), with the worker's traceback; None while it runs.
    """

    spec: WorkerSpec
    source: Iterator[Item]
    total: int | None
    sizer: ShardSizer
    totals: Totals
    requeue: deque[Item] = field(default_factory=deque)
    suspects: deque[Item] = field(default_factory=deque)
    losses: dict[int, int] = field(default_factory=dict)
    workers: list[WorkerRun] = field(default_factory=list)
    exhausted: bool = False
    start_failures: int = 0
    found: int = 0
    replaced: int = 0
    dataset_error: Exception | None = None
    setup_failure: SetupFailure | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def name(self) -> str:
        """The config's name."""
        return self.spec.snapshot.name

    def has_unsent(self) -> bool:
        """Whether some example still waits to be sent."""
        return bool(self.requeue or self.suspects or not self.exhausted)

    def done(self) -> bool:
        """Whether every example has a row (nothing to send, no worker owes anything)."""
        return not self.has_unsent() and not any(w.busy() for w in self.workers)

    def remaining(self) -> int | None:
        """Examples without a row yet (None: the total is unknown)."""
        if self.total is None:
            return None
        return max(0, self.total - self.totals.n)

    def place(self, lost: list[Item], fates: dict[int, ExampleFate]) -> list[Item]:
        """Put a killed worker's examples where their fates say; return those owed a row."""
        owed = []
        for item in lost:
            fate = fates[item.seq]
            if fate is ExampleFate.REQUEUE:
                self.losses[item.seq] = self.losses.get(item.seq, 0) + 1
                self.requeue.append(item)
            elif fate is ExampleFate.RERUN:
                self.requeue.append(item)
            elif fate is ExampleFate.SUSPECT:
                self.suspects.append(item)
            else:  # CRASHED, TIMEOUT or LOST: a row with the error
                owed.append(item)
        return owed

    def could_use_worker(self) -> bool:
        """Whether another worker would have something to do."""
        remaining = self.remaining()
        if remaining is None or len(self.workers) < remaining:
            return True
        return not self.workers and bool(self.requeue or self.suspects)

    def take(self, running: int = 0) -> list[Item]:
        """The next shard's examples (requeued ones first), sized by ``sizer``.

        Args:
            running: examples the receiving worker has without a result yet.
        """
        size = self.sizer.next_size(
            remaining=self.remaining(), workers=len(self.workers), running=running
        )
        items: list[Item] = []
        while self.requeue and len(items) < size:
            items.append(self.requeue.popleft())
        wanted = size - len(items)
        if wanted > 0 and not self.exhausted:
            try:  # in C, not an item at a time: list.extend keeps what it read before a raise
                items.extend(islice(self.source, wanted))
            except Exception as exc:  # the dataset's own error: what was read still runs
                self.exhausted = True
                self.dataset_error = exc
            else:
                self.exhausted = len(items) < size
        return items

    def probe(self) -> None:
        """Read ahead one example, to learn whether a source with nothing left is exhausted."""
        item = self._read()
        if item is not None:
            self.requeue.appendleft(item)

    def _read(self) -> Item | None:
        """The source's next example; None once it is exhausted or raised (kept, not raised)."""
        try:
            return next(self.source)
        except StopIteration:
            self.exhausted = True
        except Exception as exc:  # the dataset's own error: what was read before it still runs
            self.exhausted = True
            self.dataset_error = exc
        return None

    def stop(self) -> None:
        """Send nothing more: drop the examples not sent yet and stop reading the source."""
        self.exhausted = True
        self.requeue.clear()
        self.suspects.clear()


def read_ahead(backend: object, runs: list[ConfigRun]) -> None:
    """Start every config's workers' servers in the background; read a resumed first config.

    Where the backend can start what its workers need in the background (``prestart``: loky's
    fork servers, a fresh interpreter's imports each), it starts them all now: configs whose
    environments differ get servers of their own, which then start in parallel rather than one
    after the other as each config's first worker asks for its own.

    A resumed run's first read skips what the store holds (a second per 900,000 rows): that
    runs meanwhile, instead of before the servers start, and no worker starts for it if nothing
    is left. Only the first config is read ahead (its shards are sent first): the others'
    workers start, and their rows are skipped, as before.
    """
    prestart = getattr(backend, "prestart", None)
    if callable(prestart) and runs:
        prestart([run.spec for run in runs])
    if runs and runs[0].found:
        runs[0].probe()
