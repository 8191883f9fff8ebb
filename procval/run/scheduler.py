"""The parent side of a run: shards, worker pools per config, crash and timeout recovery.

::

    dataset ──▶ ConfigRun.take() ──▶ shard ──submit──▶ Worker (one process, one snapshot)
      (lazy;       requeue first,        (adaptive size,                │
       resume      then the source)       ≤ 2 in flight                 │ results
       skips done)                        per worker; a                 ▼
                                          "drain" shard     _collect(): provenance check,
                                          for the last)     rows → sink (store) → progress bar

    A worker's results need not be its shard's: a worker with threads returns a shard once all
    of its examples have *started*, and a straggler's result comes with a later shard. So each
    worker keeps the examples it was given and has not answered (``outstanding``); those are
    what a death or a timeout puts back in the queue. A worker with stragglers and nothing
    more to send gets an empty drain shard (``_fetch_stragglers``).

    every poll:  timeouts    slot table says an example runs > timeout: kill that worker;
                             the example gets a "Timeout" row, the others in it are requeued
                 deaths      a shard's future fails because its process died: the examples it
                             was running become suspects, the rest are requeued; a suspect is
                             rerun alone in an idle worker and, if it kills that one too,
                             gets a "WorkerCrashed" row
                 liveness    a worker owes answers but shows no sign of life (no heartbeat,
                             no CPU) for ``liveness`` s: kill it, rerun its examples
                 max_errors  too many failed rows: stop, keep what finished, raise

    A config that cannot start stops alone (``SetupError`` once the others finished); a dataset
    that raises is read no further, and its error is raised once what was read has run.

The states (a worker STARTING, PRODUCING, ALONE, RETIRED, DEAD; an example's fate when its worker
is killed: REQUEUE, RERUN, SUSPECT, CRASHED, TIMEOUT) and the rules between them are in
:mod:`procval.run.lifecycle`, drawn there; the queues and pools are in :mod:`procval.run.pools`.
A worker slot freed by a finished config goes to a config that still has work; no process ever
serves two configs. Everything runs in the caller's thread; Ctrl-C kills every worker at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

from procval import _pickling
from procval.backends import Backend, WorkerSpec
from procval.errors import TooManyErrors
from procval.results import Results, Row, RowError, Totals, _with_counts
from procval.run import logs, replay
from procval.run.dataset import Item, Source
from procval.run.failures import SetupFailure, note_dataset_error, setup_error
from procval.run.frames import user_traceback
from procval.run.lifecycle import (
    START_FAILURES,
    ExampleFate,
    TimeoutAction,
    WorkerEvent,
    WorkerState,
    fate_after_death,
    fate_after_loss,
    fate_after_timeout,
)
from procval.run.pools import ConfigRun, RunOptions, WorkerRun, read_ahead
from procval.run.progress import Progress
from procval.run.provenance import Provenance
from procval.run.rows import RowMaker
from procval.run.shards import ShardSizer
from procval.store.scrub import Scrubber
from procval.store.sink import Sink
from procval.wire import SetupFailed, Shard, ShardDone

__all__ = ["PIPELINE", "RunOptions", "Scheduler"]

PIPELINE = 2  # shards queued per worker, so a worker never waits for its next shard


class Scheduler:
    """Runs every config's examples on its own workers and feeds rows to a sink."""

    def __init__(
        self,
        backend: Backend,
        specs: list[WorkerSpec],
        examples: Sequence[Source],
        sink: Sink,
        progress: Progress,
        options: RunOptions,
    ) -> None:
        self._backend = backend
        self._sink = sink
        self._progress = progress
        self._options = options
        self._owners: dict[Future[bytes], WorkerRun] = {}
        self._provenance = Provenance()
        self._errors = 0
        self._runs: list[ConfigRun] = []
        self._makers: dict[str, RowMaker] = {}
        for spec, data in zip(specs, examples, strict=True):
            self._makers[spec.snapshot.name] = RowMaker(
                spec.snapshot.name,
                spec.snapshot.fingerprint,
                failure_score=options.failure_score,
                epochs=options.epochs,
                primary=options.primary,
            )
            prior = sink.begin(spec.snapshot)  # earlier sessions' errors do not count here
            run = ConfigRun(
                spec=spec,
                source=sink.pending(spec.snapshot.name, data) if prior.n else iter(data),
                total=data.total,
                sizer=ShardSizer(spec.options.threads),
                totals=prior,
                found=prior.n,
            )
            progress.advance(
                run.name, prior.n, n=prior.n, score_sum=prior.score_sum, errors=prior.errors
            )
            self._runs.append(run)

    # ---------------------------------------------------------------- main loop

    def run(self) -> Results:
        """Run to completion and return the results (rows are in the sink)."""
        completed = False
        listener = logs.start([run.spec for run in self._runs])  # workers' logs come here
        try:
            read_ahead(self._backend, self._runs)  # a resume's skip, while workers' servers start
            while not all(run.done() for run in self._runs):
                self._assign_workers()
                self._fill()
                self._wait()
                self._check_timeouts()
                self._check_liveness()
                self._check_errors()
            for w in self._live():
                self._retire(w)
            self._raise_failures()
            completed = True
        except BaseException:
            self._kill_all()
            raise
        finally:
            logs.stop(listener, [run.spec for run in self._runs])
            self._progress.close()
            self._sink.close(completed=completed)
            self._backend.shutdown()
        return self._results()

    def _results(self) -> Results:
        """The results of the configs that could start (a failed config has none)."""
        now, sink = time.perf_counter(), self._sink
        return Results(
            {
                run.name: _with_counts(
                    sink.result(run.name, (run.finished or now) - run.started),
                    found=run.found,
                    added=run.totals.n - run.found,
                    replaced=run.replaced,
                )
                for run in self._runs
                if run.setup_failure is None
            }
        )

    def _raise_failures(self) -> None:
        """At the end of a run: raise a config's setup failure, else a dataset's error."""
        failures = {run.name: run.setup_failure for run in self._runs if run.setup_failure}
        if failures:
            ran = [run.name for run in self._runs if run.setup_failure is None]
            raise setup_error(failures, ran, self._results())
        for run in self._runs:
            if run.dataset_error is not None:
                read = run.totals.n - run.found
                hint = self._options.resume_hint
                raise note_dataset_error(run.dataset_error, run.name, read, hint)

    def _fail_setup(self, run: ConfigRun, failure: SetupFailure) -> None:
        """Stop a config that cannot start; the other configs go on (``_raise_failures``)."""
        if run.setup_failure is not None:
            return
        scrub = Scrubber(run.spec.env)  # a setup that put a secret in its exception
        run.setup_failure = SetupFailure(scrub.text(failure.message), scrub.text(failure.traceback))
        run.stop()
        for w in list(run.workers):
            self._discard(w)
        run.finished = time.perf_counter()

    def _live(self) -> list[WorkerRun]:
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
                run.probe()  # a resumed run may have nothing left: find out cheaply
        free = self._options.workers - len(self._live())
        while free > 0:
            wanting = [r for r in self._runs if r.has_unsent() and r.could_use_worker()]
            if not wanting:
                return
            run = min(wanting, key=lambda r: len(r.workers))
            run.workers.append(WorkerRun(self._backend.start_worker(run.spec), run))
            free -= 1

    def _fill(self) -> None:
        for run in self._runs:
            for w in run.workers:
                if w.state is WorkerState.ALONE:
                    continue
                if run.suspects and not w.busy() and w.takes_work():
                    self._send_alone(w, run.suspects.popleft())
                    continue
                while w.takes_work() and not run.suspects and len(w.calls) < PIPELINE:
                    items = run.take(len(w.outstanding))
                    if not items:
                        break
                    self._send(w, items, drain=not run.has_unsent())
                if w.wants_drain():  # nothing (else) to send
                    self._fetch_stragglers(w)

    def _send(self, w: WorkerRun, items: list[Item], *, drain: bool) -> bool:
        """Send a shard of ``items``; return whether any of them could be sent."""
        try:
            data = _pickling.dumps(Shard(items, drain), what="example")
        except Exception:
            items = self._drop_unpicklable(w.config, items)
            if not items:
                if drain and w.outstanding:
                    self._fetch_stragglers(w)
                return False
            data = _pickling.dumps(Shard(items, drain), what="examples")
        self._post(w, data, items)
        return True

    def _send_alone(self, w: WorkerRun, suspect: Item) -> None:
        """Run a suspect by itself on an idle worker: it gets nothing else until it replies."""
        if self._send(w, [suspect], drain=True):
            w.move(WorkerEvent.SENT_SUSPECT)

    def _fetch_stragglers(self, w: WorkerRun) -> None:
        """Ask a worker with nothing more to do for the results it still owes (a drain)."""
        self._post(w, _pickling.dumps(Shard([], True), what="examples"), [])

    def _post(self, w: WorkerRun, data: bytes, items: list[Item]) -> None:
        future = w.worker.submit(data)
        w.calls.add(future)
        w.outstanding.update((item.seq, item) for item in items)
        self._owners[future] = w

    def _drop_unpicklable(self, run: ConfigRun, items: list[Item]) -> list[Item]:
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
                self._fail_setup(run, SetupFailure(f"config {run.name!r} could not run: {exc}"))
            else:
                self._on_death(w, w.worker.death(exc) or f"the worker failed ({exc!r})")
            return
        del self._owners[future]
        w.calls.discard(future)
        message: ShardDone | SetupFailed = _pickling.loads(data)
        if isinstance(message, SetupFailed):
            self._fail_setup(run, _setup_failure(run.name, w.worker.label, message))
            return
        pid, node, fingerprint, results = message
        results = [r for r in results if r.seq in w.outstanding]  # not a late one, answered
        self._provenance.check(run.name, run.spec.snapshot.fingerprint, pid, node, fingerprint)
        alone = w.state is WorkerState.ALONE  # the suspect's reply: timings of one example
        w.move(WorkerEvent.REPLIED)
        w.note_reply(len(results))
        run.start_failures = 0
        if not alone:
            run.sizer.observe(len(results), sum(result.duration for result in results))
        rows = self._makers[run.name].rows(results, w.outstanding, pid, node, fingerprint)
        self._deliver(run, rows)
        replay.deliver(run.name, rows, results)  # what the examples recorded in the worker

    def _deliver(self, run: ConfigRun, rows: list[Row]) -> None:
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
        self, run: ConfigRun, item: Item, error: RowError, where: tuple[int, str] = (0, "")
    ) -> Row:
        """A row for ``error``, naming the worker ``where`` (pid, node: a Ray actor's, not ours)."""
        return self._makers[run.name].error_row(
            item, error, failure_score=self._options.failure_score, pid=where[0], node=where[1]
        )

    # ---------------------------------------------------------------- failures

    def _unfinished(self, w: WorkerRun) -> tuple[list[Item], bool]:
        """Collect the answers that came back; return what is still unanswered.

        Returns:
            The examples given to the worker without a result, and whether the worker was
            running them alone (a suspect).
        """
        alone = w.state is WorkerState.ALONE
        for future in [f for f in w.calls if f.done() and f.exception() is None]:
            self._collect(future)
        lost = list(w.outstanding.values())
        for future in w.calls:
            self._owners.pop(future, None)
        w.calls.clear()
        w.outstanding.clear()
        return lost, alone and bool(lost)

    def _on_death(self, w: WorkerRun, how: str) -> None:
        run = w.config
        running = {seq for seq, _ in w.worker.running() if seq in w.outstanding}
        label, where, log = w.worker.label, w.where(), w.worker.crash_log()
        lost, alone = self._drop(w)
        run.replaced += 1
        verdict = fate_after_death(
            [item.seq for item in lost],
            running,
            alone=alone,
            replied=w.replies > 0,
            losses=run.losses,
        )
        if verdict.start_failure:
            run.start_failures += 1
            if run.start_failures >= START_FAILURES:
                message = (
                    f"workers of config {run.name!r} die before running any example ({how}); "
                    "check Config.setup and what the program imports"
                )
                self._fail_setup(run, SetupFailure(message, log))
                return
        message = f"{how} while running this example alone in {label}"
        self._apply(run, lost, verdict.fates, RowError("WorkerCrashed", message, log), where)

    def _check_timeouts(self) -> None:
        """A late example gets its Timeout row now; its worker drains, or dies if it must."""
        timeout = self._options.timeout or 0.0  # 0.0: no timeout
        for w in self._live() if timeout else ():
            action, late = w.check_timeout(timeout)  # NONE for one killed meanwhile
            if action is TimeoutAction.NONE:
                continue
            run, label, where = w.config, w.worker.label, w.where()
            message = f"example still running after {timeout:g}s; worker {label} was killed"
            if action is TimeoutAction.DRAIN:  # takes nothing new; its other examples finish
                w.move(WorkerEvent.TIMED_OUT)
                lost = [w.outstanding.pop(seq) for seq in late]
            else:
                lost, _ = self._drop(w)
            fates = fate_after_timeout([item.seq for item in lost], late)
            self._apply(run, lost, fates, RowError("Timeout", message + " and replaced"), where)

    def _check_liveness(self) -> None:
        """Kill and replace each worker that owes answers and has been silent for too long.

        A stopped or frozen worker (SIGSTOP, stuck in the kernel) never answers, whether it
        was running an example or pickling results between two: its examples are rerun
        (``lifecycle.fate_after_loss``), none of them counted as an attempt.
        """
        bound = self._options.liveness
        for w in self._live():
            if not w.calls:
                continue
            silent = w.worker.silent_for()
            if silent <= bound:
                continue
            run, label, where = w.config, w.worker.label, w.where()
            running = {seq for seq, _ in w.worker.running() if seq in w.outstanding}
            lost, alone = self._drop(w)
            fates = fate_after_loss(
                [item.seq for item in lost], running, alone=alone, losses=run.losses
            )
            message = (
                f"worker {label} showed no sign of life for {silent:.0f}s (stopped, or stuck "
                "in the operating system) while it ran this example alone, after losing it "
                f"before; PROCVAL_LIVENESS={bound:g} sets the bound"
            )
            self._apply(run, lost, fates, RowError("WorkerLost", message), where)

    def _apply(
        self,
        run: ConfigRun,
        lost: list[Item],
        fates: dict[int, ExampleFate],
        error: RowError,
        where: tuple[int, str],
    ) -> None:
        """Move a killed worker's examples where their fates say; ``error`` for the rows."""
        rows = [self._error_row(run, item, error, where) for item in run.place(lost, fates)]
        self._deliver(run, rows)

    def _drop(self, w: WorkerRun) -> tuple[list[Item], bool]:
        """Kill the worker and take it out of the run; return ``_unfinished(w)``."""
        lost = self._unfinished(w)
        self._discard(w)
        return lost

    def _discard(self, w: WorkerRun) -> None:
        """Kill the worker (unless dead already) and forget it, and whatever it still owes."""
        for future in w.calls:
            self._owners.pop(future, None)
        w.calls.clear()
        w.outstanding.clear()
        if w in w.config.workers:
            w.config.workers.remove(w)
        if w.state.live:
            w.worker.kill()
            w.move(WorkerEvent.DIED)

    def _retire(self, w: WorkerRun) -> None:
        if w.state is WorkerState.DRAINING:  # a thread of it may be stuck: never wait for it
            return self._discard(w)
        if w in w.config.workers:
            w.config.workers.remove(w)
        w.worker.close()
        w.move(WorkerEvent.RETIRED)

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
            limit=limit,
        )

    def _kill_all(self) -> None:
        """Kill every worker at once, keeping the shards that had already come back."""
        for w in self._live():
            with contextlib.suppress(Exception):
                self._unfinished(w)
            self._discard(w)
        self._owners.clear()


def _setup_failure(name: str, label: str, message: SetupFailed) -> SetupFailure:
    """Why a worker did not install its snapshot: a refusal in one line, or setup's traceback."""
    if message.reason:  # e.g. the worker would run another procval than the parent's
        return SetupFailure(f"a worker of config {name!r} ({label}) refused to start: "
                            f"{message.reason}")  # fmt: skip
    failed = f"Config.setup of config {name!r} failed in worker {label}"
    return SetupFailure(f"{failed}; fix the config's setup", user_traceback(message.traceback))
