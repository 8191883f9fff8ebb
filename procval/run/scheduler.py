"""The parent side of a run: shards, worker pools per config, crash and timeout recovery.

::

    dataset ──▶ _ConfigRun.take() ──▶ shard ──submit──▶ Worker (one process, one snapshot)
      (lazy;       requeue first,        (adaptive size,                │
       resume      then the source)       ≤ 2 in flight                 │ results
       skips done)                        per worker; a                 ▼
                                          "drain" shard     _collect(): provenance check,
                                          for the last)     rows → sink (store) → progress bar

    A worker's results need not be its shard's: a worker with threads returns a shard once all
    of its examples have *started*, and a straggler's result comes with a later shard. So each
    worker keeps the examples it was given and has not answered (``outstanding``); those are
    what a death or a timeout puts back in the queue.

    every poll:  timeouts    slot table says an example runs > timeout: kill that worker;
                             the example gets a "Timeout" row, the others in it are requeued
                 deaths      a shard's future fails because its process died: the examples it
                             was running become suspects, the rest are requeued; a suspect is
                             rerun alone in a fresh worker and, if it kills that one too,
                             gets a "WorkerCrashed" row
                 max_errors  too many failed rows: stop, keep what finished, raise

A worker slot freed by a finished config goes to a config that still has work; no process ever
serves two configs. Everything runs in the caller's thread; Ctrl-C kills every worker at once.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from procval import _pickling
from procval.backends import Backend, Worker, WorkerSpec
from procval.errors import IsolationError, SetupError, TooManyErrors
from procval.results import Results, Row, RowError, Totals
from procval.run.dataset import Examples, Item
from procval.run.progress import Progress
from procval.run.shards import ShardSizer
from procval.store.sink import Sink
from procval.wire import SetupFailed, Shard, ShardDone

_NODE = socket.gethostname()
PIPELINE = 2  # shards queued per worker, so a worker never waits for its next shard
START_FAILURES = 3  # fresh workers of a config dying before any result: give up
LOST_LIMIT = 3  # an example lost in this many unexplained deaths is run alone


@dataclass
class RunOptions:
    """Scheduler settings from ``evaluate``'s keywords."""

    workers: int
    failure_score: float = 0.0
    timeout: float | None = None
    max_errors: int | None = None
    resume_hint: str = ""


@dataclass(eq=False)
class _WorkerRun:
    worker: Worker
    config: _ConfigRun
    calls: set[Future[bytes]] = field(default_factory=set)  # shards sent, not answered
    outstanding: dict[int, Item] = field(default_factory=dict)  # by seq: sent, no result yet
    alone: bool = False  # running a suspect by itself
    produced: bool = False

    def busy(self) -> bool:
        return bool(self.calls or self.outstanding)


@dataclass(eq=False)
class _ConfigRun:
    spec: WorkerSpec
    source: Iterator[Item]
    total: int | None
    sizer: ShardSizer
    totals: Totals
    requeue: deque[Item] = field(default_factory=deque)
    suspects: deque[Item] = field(default_factory=deque)
    lost: dict[int, int] = field(default_factory=dict)
    workers: list[_WorkerRun] = field(default_factory=list)
    exhausted: bool = False
    start_failures: int = 0
    replaced: int = 0  # workers lost (died, silent, unplaced) and replaced
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    @property
    def name(self) -> str:
        return self.spec.snapshot.name

    def has_unsent(self) -> bool:
        return bool(self.requeue or self.suspects or not self.exhausted)

    def done(self) -> bool:
        return not self.has_unsent() and not any(w.busy() for w in self.workers)

    def remaining(self) -> int | None:
        if self.total is None:
            return None
        return max(0, self.total - self.totals.n)


class Scheduler:
    """Runs every config's examples on its own workers and feeds rows to a sink."""

    def __init__(
        self,
        backend: Backend,
        specs: list[WorkerSpec],
        examples: list[Examples],
        sink: Sink,
        progress: Progress,
        options: RunOptions,
    ) -> None:
        self._backend = backend
        self._sink = sink
        self._progress = progress
        self._options = options
        self._owners: dict[Future[bytes], _WorkerRun] = {}
        self._provenance: dict[tuple[str, int], str] = {}
        self._errors = 0
        self._failed: dict[str, str] = {}  # configs the backend cannot run, and why
        self._runs: list[_ConfigRun] = []
        for spec, data in zip(specs, examples, strict=True):
            prior = sink.begin(spec.snapshot)  # earlier sessions' errors do not count here
            run = _ConfigRun(
                spec=spec,
                source=self._pending(spec.snapshot.name, data) if prior.n else iter(data),
                total=data.total,
                sizer=ShardSizer(spec.options.threads),
                totals=prior,
            )
            progress.advance(
                run.name, prior.n, n=prior.n, score_sum=prior.score_sum, errors=prior.errors
            )
            self._runs.append(run)

    def _pending(self, name: str, data: Examples) -> Iterator[Item]:
        for item in data:
            if not self._sink.is_done(name, *item):
                yield item

    # ---------------------------------------------------------------- main loop

    def run(self) -> Results:
        """Run to completion and return the results (rows are in the sink)."""
        completed = False
        try:
            while not all(run.done() for run in self._runs):
                self._assign_workers()
                self._fill()
                self._wait()
                self._check_timeouts()
                self._check_errors()
            completed = not self._failed
            for w in self._live():
                self._retire(w)
            if self._failed:
                raise SetupError(
                    "; ".join(
                        f"config {n!r} could not run: {why}" for n, why in self._failed.items()
                    )
                    + ". The other configs finished and their rows are stored"
                )
        except BaseException:
            self._kill_all()
            raise
        finally:
            self._progress.close()
            self._sink.close(completed=completed)
            self._backend.shutdown()
        return self._results()

    def _results(self) -> Results:
        results = {}
        for run in self._runs:
            duration = (run.finished or time.perf_counter()) - run.started
            results[run.name] = result = self._sink.result(run.name, duration)
            result.replaced_workers = run.replaced
        return Results(results)

    def _live(self) -> list[_WorkerRun]:
        return [w for run in self._runs for w in run.workers]

    def _assign_workers(self) -> None:
        for run in self._runs:
            if not run.has_unsent():
                for w in [w for w in run.workers if not w.busy()]:
                    self._retire(w)
                if run.done() and run.finished is None:
                    run.finished = time.perf_counter()
        for run in self._runs:
            if not (run.workers or run.exhausted or run.requeue) and run.remaining() == 0:
                self._probe(run)  # a resumed run may have nothing left: find out cheaply
        free = self._options.workers - len(self._live())
        while free > 0:
            wanting = [r for r in self._runs if r.has_unsent() and self._could_use(r)]
            if not wanting:
                return
            run = min(wanting, key=lambda r: len(r.workers))
            run.workers.append(_WorkerRun(self._backend.start_worker(run.spec), run))
            free -= 1

    def _probe(self, run: _ConfigRun) -> None:
        """Read ahead one example, to learn whether a source with nothing left is exhausted."""
        try:
            run.requeue.appendleft(next(run.source))
        except StopIteration:
            run.exhausted = True

    def _could_use(self, run: _ConfigRun) -> bool:
        remaining = run.remaining()
        if remaining is None or len(run.workers) < remaining:
            return True
        return not run.workers and bool(run.requeue or run.suspects)

    def _fill(self) -> None:
        for run in self._runs:
            for w in run.workers:
                if w.alone:
                    continue
                if run.suspects and not w.busy():
                    self._submit(w, [run.suspects.popleft()], drain=True, alone=True)
                    continue
                while not run.suspects and len(w.calls) < PIPELINE:  # suspects go first
                    items = self._take(run)
                    if not items:
                        break
                    self._submit(w, items, drain=not run.has_unsent())
                if w.outstanding and not w.calls:  # nothing (else) to send: fetch the stragglers
                    self._submit(w, [], drain=True)

    def _take(self, run: _ConfigRun) -> list[Item]:
        size = run.sizer.next_size(remaining=run.remaining(), workers=len(run.workers))
        items: list[Item] = []
        while run.requeue and len(items) < size:
            items.append(run.requeue.popleft())
        while not run.exhausted and len(items) < size:
            try:
                items.append(next(run.source))
            except StopIteration:
                run.exhausted = True
        return items

    def _submit(
        self, w: _WorkerRun, items: list[Item], *, drain: bool, alone: bool = False
    ) -> None:
        try:
            data = _pickling.dumps(Shard(items, drain), what="example")
        except Exception:
            items = self._drop_unpicklable(w.config, items)
            data = _pickling.dumps(Shard(items, drain), what="examples")
        if not items and not (drain and w.outstanding):
            return
        w.alone = alone
        future = w.worker.submit(data)
        w.calls.add(future)
        w.outstanding.update((item.seq, item) for item in items)
        self._owners[future] = w

    def _drop_unpicklable(self, run: _ConfigRun, items: list[Item]) -> list[Item]:
        """Record examples that cannot be pickled as errors; return the rest."""
        keep, failed = [], []
        for item in items:
            try:
                _pickling.dumps(item, what=f"example {item.example_id!r}")
                keep.append(item)
            except Exception as exc:
                failed.append(self._error_row(run, item, RowError("SnapshotError", str(exc))))
        self._deliver(run, failed)
        return keep

    def _wait(self) -> None:
        futures = list(self._owners)
        if not futures:
            return
        poll = 0.25 if self._options.timeout is None else min(0.1, self._options.timeout / 10)
        done, _ = wait(futures, timeout=poll, return_when=FIRST_COMPLETED)
        for future in done:
            if future in self._owners:
                self._collect(future)

    # ---------------------------------------------------------------- results

    def _collect(self, future: Future[bytes]) -> None:
        w = self._owners[future]
        run = w.config
        try:
            data = future.result()
        except BaseException as exc:
            if getattr(exc, "fails_config", False):  # the backend cannot run this config at all
                self._fail_config(run, str(exc))
                return
            self._on_death(w, w.worker.death(exc) or f"the worker failed ({exc!r})")
            return
        del self._owners[future]
        w.calls.discard(future)
        message: ShardDone | SetupFailed = _pickling.loads(data)
        if isinstance(message, SetupFailed):
            raise SetupError(
                f"Config.setup of config {run.name!r} failed in worker {w.worker.label}; "
                f"fix the config's setup (the worker's traceback follows)\n{message.traceback}"
            )
        pid, node, fingerprint, results = message
        self._check_provenance(run, pid, node, fingerprint)
        w.produced = True
        run.start_failures = 0
        if w.alone:
            w.alone = False  # the suspect's answer: the worker may take any work again
        else:
            run.sizer.observe(len(results), sum(result.duration for result in results))
        failure_score, name, outstanding = self._options.failure_score, run.name, w.outstanding
        rows = []
        for seq, prediction, score, error, attempts, duration in results:
            index, example_id, example = outstanding.pop(seq)
            # positional, in Row's field order: a third faster than keywords, per example
            rows.append(
                Row(
                    index,
                    example_id,
                    example,
                    prediction,
                    failure_score if error else score,
                    RowError(*error) if error else None,
                    attempts,
                    duration,
                    pid,
                    name,
                    fingerprint,
                    node,
                )
            )
        self._deliver(run, rows)

    def _check_provenance(self, run: _ConfigRun, pid: int, node: str, fingerprint: str) -> None:
        if fingerprint != run.spec.snapshot.fingerprint:
            raise IsolationError(
                f"a worker of config {run.name!r} (pid {pid}) reports snapshot {fingerprint}, "
                f"expected {run.spec.snapshot.fingerprint}"
            )
        first = self._provenance.setdefault((node, pid), fingerprint)
        if first != fingerprint:
            raise IsolationError(
                f"process {pid} on {node} produced rows for snapshots {first} and {fingerprint}"
            )

    def _deliver(self, run: _ConfigRun, rows: list[Row]) -> None:
        if not rows:
            return
        self._sink.add(run.name, rows)  # durable first, reported after
        errors = sum(r.error is not None for r in rows)
        run.totals = Totals(
            n=run.totals.n + len(rows),
            score_sum=run.totals.score_sum + sum(r.score for r in rows),
            errors=run.totals.errors + errors,
        )
        self._errors += errors
        self._progress.advance(
            run.name,
            len(rows),
            n=run.totals.n,
            score_sum=run.totals.score_sum,
            errors=run.totals.errors,
            replaced=run.replaced,
        )

    def _error_row(
        self, run: _ConfigRun, item: Item, error: RowError, *, pid: int = 0, node: str = ""
    ) -> Row:
        index, example_id, example = item
        return Row(
            index=index,
            example_id=example_id,
            example=example,
            prediction=None,
            score=self._options.failure_score,
            error=error,
            attempts=1,
            duration=0.0,
            worker_pid=pid,
            config=run.name,
            fingerprint=run.spec.snapshot.fingerprint,
            node=node or _NODE,
        )

    # ---------------------------------------------------------------- failures

    def _unfinished(self, w: _WorkerRun) -> tuple[list[Item], bool]:
        """Collect the answers that came back; return what is still unanswered.

        Returns:
            The examples given to the worker without a result, and whether the worker was
            running them alone (a suspect).
        """
        alone = w.alone
        for future in [f for f in w.calls if f.done() and f.exception() is None]:
            self._collect(future)
        lost = list(w.outstanding.values())
        for future in w.calls:
            self._owners.pop(future, None)
        w.calls.clear()
        w.outstanding.clear()
        return lost, alone and bool(lost)

    def _on_death(self, w: _WorkerRun, how: str) -> None:
        run = w.config
        running = {seq for seq, _ in w.worker.running() if seq in w.outstanding}
        label, pid, log = w.worker.label, w.worker.pid, w.worker.crash_log()
        lost, alone = self._drop(w)
        run.replaced += 1
        if not w.produced and not running:
            run.start_failures += 1
            if run.start_failures >= START_FAILURES:
                raise SetupError(
                    f"workers of config {run.name!r} die before running any example ({how}); "
                    "check Config.setup and what the program imports"
                )
        rows = []
        for item in lost:
            if alone and item.seq in running:
                message = f"{how} while running this example alone in {label}"
                error = RowError("WorkerCrashed", message, log)
                rows.append(self._error_row(run, item, error, pid=pid))
            elif alone or item.seq in running or run.lost.get(item.seq, 0) >= LOST_LIMIT:
                run.suspects.append(item)
            else:
                run.lost[item.seq] = run.lost.get(item.seq, 0) + 1
                run.requeue.append(item)
        self._deliver(run, rows)

    def _fail_config(self, run: _ConfigRun, why: str) -> None:
        """Give up on a config the backend cannot run; its slots go to the other configs."""
        for w in list(run.workers):
            self._drop(w)
        run.requeue.clear()
        run.suspects.clear()
        run.source, run.exhausted = iter(()), True
        self._failed.setdefault(run.name, why)

    def _drop(self, w: _WorkerRun) -> tuple[list[Item], bool]:
        """Kill the worker and take it out of the run; return ``_unfinished(w)``."""
        lost = self._unfinished(w)
        if w in w.config.workers:
            w.config.workers.remove(w)
        w.worker.kill()
        return lost

    def _retire(self, w: _WorkerRun) -> None:
        if w in w.config.workers:
            w.config.workers.remove(w)
        w.worker.close()

    def _check_timeouts(self) -> None:
        timeout = self._options.timeout
        if timeout is None:
            return
        for w in self._live():
            late = {
                seq
                for seq, seconds in w.worker.running()
                if seconds > timeout and seq in w.outstanding
            }
            if not late:
                continue
            run, label, pid = w.config, w.worker.label, w.worker.pid
            rows = []
            for item in self._drop(w)[0]:
                if item.seq in late:
                    message = (
                        f"example still running after {timeout:g}s; "
                        f"worker {label} was killed and replaced"
                    )
                    error = RowError("Timeout", message)
                    rows.append(self._error_row(run, item, error, pid=pid))
                else:
                    run.requeue.append(item)
            self._deliver(run, rows)

    def _check_errors(self) -> None:
        limit = self._options.max_errors
        if limit is None or self._errors <= limit:
            return
        self._kill_all()
        results = self._results()
        hint = self._options.resume_hint
        raise TooManyErrors(
            f"{self._errors} examples failed, more than max_errors={limit}; the run stopped "
            f"early (examples already running finish first, so the count can pass the limit). "
            f"Look at the errors in .results, fix their cause, then {hint or 'run again'}",
            failed=self._errors,
            results=results,
        )

    def _kill_all(self) -> None:
        """Kill every worker at once, keeping the shards that had already come back."""
        for w in self._live():
            with contextlib.suppress(Exception):
                self._unfinished(w)
            w.worker.kill()
            w.config.workers.remove(w)
        self._owners.clear()
