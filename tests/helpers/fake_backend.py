"""An in-process backend for the scheduler's unit tests: workers without processes.

:class:`FakeBackend` satisfies ``procval.backends.Backend`` and its :class:`FakeWorker`\\ s
``procval.backends.Worker``. A fake worker behaves like a real worker with many threads: every
example of a shard starts at once, so a shard's reply carries the results finished so far, and a
drain's reply waits until nothing runs. What an example does is scripted, per worker and example,
by ``script(worker, item)``, which returns one of:

- any value: the prediction, scored 1.0;
- :class:`Fail`: the program raised (an error row);
- :class:`Late`: still running when its shard replies; it finishes when the next shard arrives
  (its result then travels with that shard's reply, as a straggler's does), or at once in a
  drain shard (a drain's reply waits for everything but a :class:`Hang`);
- :class:`Hang`: runs for ever; ``running()`` reports it as running for ``seconds``;
- :class:`Crash`: the worker dies while running it (the slot table still shows it; its futures
  fail and ``death()`` says how);
- :class:`Vanish`: the worker dies as it reaches it, with nothing shown running;
- :class:`Freeze`: the worker freezes (as under SIGSTOP) after it ran the example, or while it
  runs it (``running=True``): it never replies, and ``silent_for()`` reports ``seconds``.

Replies are real pickled ``procval.wire.ShardDone`` / ``SetupFailed`` messages, so the
scheduler's own code path reads them.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import procval
from procval.wire import (
    ErrorInfo,
    ExampleResult,
    SetupFailed,
    Shard,
    ShardDone,
    WorkerSpec,
    WorkItem,
)


@dataclass(frozen=True)
class Fail:
    """The program raises ``type(message)``."""

    type: str = "ValueError"
    message: str = "boom"


@dataclass(frozen=True)
class Late:
    """Still running when its shard replies; finished by the next shard's reply."""


@dataclass(frozen=True)
class Hang:
    """Never finishes; reported as running for ``seconds``."""

    seconds: float = 3600.0


@dataclass(frozen=True)
class Crash:
    """Kills the worker while running (it shows in ``running()``)."""

    how: str = "killed by SIGKILL"
    log: str = "Fatal Python error: Segmentation fault"


@dataclass(frozen=True)
class Vanish:
    """The worker dies as it reaches this example, with nothing running."""

    how: str = "exit code 1"


@dataclass(frozen=True)
class Freeze:
    """The worker freezes: after running this example (or while, with ``running``)."""

    running: bool = False
    seconds: float = 3600.0


Script = Callable[["FakeWorker", WorkItem], Any]

# what a worker whose Config.setup raised sends: procval's frame, then the user's
_RUNTIME = os.path.join(os.path.dirname(procval.__file__), "worker", "runtime.py")
SETUP_TRACEBACK = f"""Traceback (most recent call last):
  File "{_RUNTIME}", line 167, in initialize
    config.setup()
  File "/home/user/tasks.py", line 10, in setup
    raise RuntimeError("no GPU")
RuntimeError: no GPU
"""


class WorkerDied(Exception):
    """A fake worker's futures fail with this when it dies (or is killed)."""


def answer(worker: FakeWorker, item: WorkItem) -> Any:
    """The default script: every example's prediction is the example itself."""
    return item.example


class FakeWorker:
    """One fake worker process of one config (see the module docstring)."""

    def __init__(self, backend: FakeBackend, spec: WorkerSpec, number: int, pid: int) -> None:
        self.backend, self.spec, self.number, self._pid = backend, spec, number, pid
        self.shards: list[Shard] = []  # every shard received, unpickled
        self.closed = False
        self.killed = False
        self._death: str | None = None
        self._log = ""
        self._running: dict[int, float] = {}  # seq -> seconds reported by running()
        self._late: list[WorkItem] = []
        self._done: list[ExampleResult] = []
        self._pending: list[tuple[Future[bytes], bool]] = []  # (future, drain) not replied
        self._silent = 0.0  # what silent_for() reports (a frozen worker's silence)

    @property
    def label(self) -> str:
        """``"fake pid N"``."""
        return f"fake pid {self._pid}"

    @property
    def pid(self) -> int:
        """The fake pid."""
        return self._pid

    @property
    def dead(self) -> bool:
        """Whether the worker died or was killed."""
        return self._death is not None or self.killed

    def submit(self, shard: bytes) -> Future[bytes]:
        """Run a pickled ``Shard`` at once; the future resolves unless something still runs."""
        future: Future[bytes] = Future()
        if self.dead:
            future.set_exception(WorkerDied(self._death or "killed"))
            return future
        message: Shard = pickle.loads(shard)
        self.shards.append(message)
        if self._silent:  # frozen: takes nothing up, answers nothing
            self._pending.append((future, message.drain))
            return future
        fails = self.backend.setup_fails
        if fails is True or (fails and self.spec.snapshot.name in fails):
            future.set_result(pickle.dumps(SetupFailed(SETUP_TRACEBACK)))
            return future
        if self.number < self.backend.start_deaths:
            self._die("exit code 1", "")
            future.set_exception(WorkerDied(self._death))
            return future
        self._pending.append((future, message.drain))
        self._finish_late()  # stragglers finish before the new shard's examples start
        for item in message.items:
            if not self._start(item):
                return future
        if message.drain:  # a drain waits for its own late examples too (not for a Hang)
            self._finish_late()
        if not self._silent:
            self._reply()
        return future

    def _finish_late(self) -> None:
        for item in self._late:
            self._running.pop(item.seq, None)
            self._done.append(_result(item.seq, item.example, None))
        self._late = []

    def _start(self, item: WorkItem) -> bool:
        step = self.backend.script(self, item)
        if isinstance(step, Crash):
            self._running[item.seq] = 0.5
            self._die(step.how, step.log)
            return False
        if isinstance(step, Vanish):
            self._die(step.how, "")
            return False
        if isinstance(step, Freeze):
            self._silent = step.seconds
            if step.running:
                self._running[item.seq] = step.seconds
                return False
            self._done.append(_result(item.seq, item.example, None))
            return False
        if isinstance(step, Hang):
            self._running[item.seq] = step.seconds
        elif isinstance(step, Late):
            self._running[item.seq] = 0.5
            self._late.append(item)
        elif isinstance(step, Fail):
            self._done.append(_result(item.seq, None, ErrorInfo(step.type, step.message, "")))
        else:
            self._done.append(_result(item.seq, step, None))
        return True

    def _reply(self) -> None:
        """Answer the pending shards, in order, as a threaded worker would."""
        while self._pending:
            future, drain = self._pending[0]
            if drain and self._running:
                return
            self._pending.pop(0)
            fingerprint = self.backend.fingerprint or self.spec.snapshot.fingerprint
            done, self._done = self._done, []
            future.set_result(pickle.dumps(ShardDone(self._pid, "fakehost", fingerprint, done)))

    def _die(self, how: str, log: str) -> None:
        self._death, self._log = how, log
        for future, _ in self._pending:
            future.set_exception(WorkerDied(how))
        self._pending = []
        self.backend.deaths += 1

    def running(self) -> list[tuple[int, float]]:
        """``(seq, seconds)`` of the examples running (still shown after a crash)."""
        return list(self._running.items())

    def silent_for(self) -> float:
        """0.0, or ``Freeze.seconds`` once frozen."""
        return self._silent

    def death(self, exc: BaseException) -> str | None:
        """How the worker died, if ``exc`` says it did."""
        return str(exc) if isinstance(exc, WorkerDied) else None

    def crash_log(self) -> str:
        """What a crashing example's fault handler wrote."""
        return self._log

    def kill(self) -> None:
        """Kill the worker: its pending futures fail."""
        if not self.dead:
            self.killed = True
            for future, _ in self._pending:
                future.set_exception(WorkerDied("killed"))
            self._pending = []

    def close(self) -> None:
        """Let the worker exit."""
        self.closed = True


class FakeBackend:
    """Starts :class:`FakeWorker`\\ s.

    Args:
        script: what each example does in each worker (module docstring); default: succeed.
        setup_fails: every worker replies ``SetupFailed`` (True), or those of these configs.
        start_deaths: the first this many workers die at their first shard, running nothing.
        fingerprint: a fingerprint to reply with instead of the snapshot's.
        pid: each worker's pid from its number (default: 1000 + number).
        max_workers: a bound on workers started, so a scheduler that loops fails the test.
    """

    def __init__(
        self,
        script: Script = answer,
        *,
        setup_fails: bool | Collection[str] = False,
        start_deaths: int = 0,
        fingerprint: str | None = None,
        pid: Callable[[int], int] = lambda number: 1000 + number,
        max_workers: int = 50,
    ) -> None:
        self.script = script
        self.setup_fails = setup_fails
        self.start_deaths = start_deaths
        self.fingerprint = fingerprint
        self._pid = pid
        self._max_workers = max_workers
        self.workers: list[FakeWorker] = []
        self.deaths = 0
        self.most_alive = 0  # the most workers alive at once
        self.shut_down = False

    def default_workers(self) -> int:
        """Two."""
        return 2

    def start_worker(self, spec: WorkerSpec) -> FakeWorker:
        """A new fake worker for ``spec``."""
        number = len(self.workers)
        if number >= self._max_workers:
            raise AssertionError(f"the scheduler started more than {self._max_workers} workers")
        worker = FakeWorker(self, spec, number, self._pid(number))
        self.workers.append(worker)
        alive = sum(not (w.dead or w.closed) for w in self.workers)
        self.most_alive = max(self.most_alive, alive)
        return worker

    def shutdown(self) -> None:
        """Kill what is left."""
        self.shut_down = True
        for worker in self.workers:
            worker.kill()


def _result(seq: int, prediction: Any, error: ErrorInfo | None) -> ExampleResult:
    return ExampleResult(seq, prediction, 0.0 if error else 1.0, error, 1, 0.01)
