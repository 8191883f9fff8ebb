"""The code that runs inside a worker process: its entry points and its state.

One worker process serves one config for its whole life::

    parent (scheduler)                          worker process (procval.worker.*)
    ──────────────────                          ─────────────────────────────────
    start_worker(snapshot) ──────spawn───────▶  runtime.initialize(): lifeline (SIGINT ignored,
                                                own session, watchdog, fault file, heartbeat
                                                thread); refuse another procval than the
                                                parent's; unpickle (config, program, metric)
                                                once; env → seed → setup(); run mode chosen;
                                                slot table ready
    submit(shard bytes) ───────────────────────▶ runtime.run_shard(), by run mode:
                                                  INLINE: the shard's examples, one after the
                                                    other, in this thread
                                                  THREADS / ASYNC: they join the feed (feed.py),
                                                    which `threads` threads or one event loop
                                                    keep draining (runners.py)
                                                  FAILED: SetupFailed(traceback), every time
                                                each example (execute.py):
                                                  seed from (seed, example_id)
                                                  slot table ← (seq, start time)
                                                  program(example), retried with backoff
                                                  metric(example, prediction) → score
    ◀──────────────────── result bytes ───────  INLINE: the shard's results; otherwise, once
                                                every example of the feed has started: the
                                                results finished so far (of this shard or
                                                earlier ones); a "drain" shard waits for all;
                                                stamped with pid, node and fingerprint
    reads slot table ◀─── mmap ────────────────  (timeouts, crash suspects, heartbeat: no
                                                message needed)

No barrier between shards: a thread that finishes takes the next example at once, even while
the slowest example of the previous shard still runs (its result travels with the next shard's).
The scheduler keeps a second shard queued behind the running one, and sends a drain shard when
it has nothing left for the worker. A worker with one thread runs its shard in its main thread,
one example after the other, and returns all of it.

Module-level state lives here, in an importable module, because a ``__main__``-defined
initializer would not share globals with ``__main__``-defined tasks under cloudpickle.
A watchdog thread ends the process when its parent dies, so no worker outlives a ``kill -9``
(:mod:`procval.worker.lifeline`).
"""

from __future__ import annotations

import enum
import logging
import os
import random
import socket
import sys
import traceback
from dataclasses import dataclass, field

from procval import _pickling
from procval.config import Config
from procval.errors import NotInWorkerError
from procval.wire import (
    ErrorInfo,
    ExampleResult,
    SetupFailed,
    Shard,
    ShardDone,
    WorkerOptions,
    fingerprint,
)
from procval.worker import dspy_limits, execute, lifeline, limited, logs, runners, usage
from procval.worker.feed import Feed
from procval.worker.slots import BEAT, SlotTable
from procval.worker.threads import follow as follow_threads

_logger = logging.getLogger("procval")


class RunMode(enum.Enum):
    """How a worker runs its examples; decided once, at the end of :func:`initialize`."""

    INLINE = "inline"  # one thread: a shard's examples run in the shard call, one by one
    THREADS = "threads"  # a feed drained by `threads` threads
    ASYNC = "async"  # a feed drained by an event loop (an async program, any `threads`)
    FAILED = "failed"  # the snapshot did not install: every shard answers SetupFailed


def select_mode(*, installed: bool, is_async: bool, threads: int) -> RunMode:
    """The run mode of a worker.

    Args:
        installed: whether the snapshot was unpickled and its seed and ``setup()`` succeeded.
        is_async: whether the program is a coroutine function.
        threads: ``threads`` of the run (how many examples run at once in one worker).
    """
    if not installed:
        return RunMode.FAILED
    if is_async:
        return RunMode.ASYNC
    return RunMode.THREADS if threads > 1 else RunMode.INLINE


@dataclass
class _State:
    config: Config
    fingerprint: str
    options: WorkerOptions
    slots: SlotTable
    pid: int = field(default_factory=os.getpid)
    node: str = field(default_factory=socket.gethostname)
    runner: execute.Runner | None = None  # None if the snapshot was unreadable
    setup_error: str | None = None  # the traceback of a failed unpickle, seed or setup()
    refusal: str = ""  # why the worker refused to start (one line); setup_error is "" then
    mode: RunMode = RunMode.FAILED  # until initialize() has installed the snapshot
    feed: Feed | None = None  # THREADS and ASYNC
    loop: runners.EventLoop | None = None  # ASYNC


_state: _State | None = None


def current_config() -> Config:
    """The config installed in this worker process.

    Raises:
        NotInWorkerError: called outside a procval worker (e.g. in the parent process).
    """
    if _state is None:
        raise NotInWorkerError(
            "current_config() works only inside a procval worker process, i.e. in a program or "
            "metric run by procval.evaluate(); in the parent, use the Config you passed"
        )
    return _state.config


def rng() -> random.Random:
    """A ``random.Random`` for the current example, seeded from ``(Config.seed, example_id)``.

    Unlike the global ``random`` module, it is private to the example (to its thread, or to its
    asyncio task), so results do not depend on how examples interleave when ``threads > 1``.
    Without ``Config.seed``, or outside an example, it is unseeded.
    """
    current = execute.example_rng()
    return current if current is not None else random.Random()


def initialize(snapshot: bytes, options: WorkerOptions, slots_path: str) -> None:
    """Install a snapshot in this process: unpickle it, then apply env, seed and setup.

    Runs once, as the worker's initializer. A failure is kept and reported by every
    :func:`run_shard` call, so the parent can stop the run with the worker's traceback. A
    worker that imports another ``procval`` than the parent's (``options.procval_path``)
    installs nothing and answers with a one-line ``SetupFailed.reason``. The heartbeat thread
    starts first, so that the parent sees a stopped worker even while it installs.
    """
    global _state
    lifeline.ignore_interrupts()  # Ctrl-C is the parent's to handle
    if options.session:
        lifeline.lead_process_group()
    lifeline.record_faults(slots_path + ".fault")
    lifeline.watch_parent(options.parent_pid)
    logs.install(options.log)  # log records go to the parent as they happen
    slots = SlotTable(slots_path, max(1, options.threads))
    lifeline.beat(slots, BEAT)
    refusal = other_procval(options.procval_path)
    if refusal:
        _state = _State(Config("refused"), fingerprint(snapshot), options, slots)
        _state.setup_error, _state.refusal = "", refusal
        slots.mark_ready(_state.pid)
        return
    try:
        config, program, metric = _pickling.loads(snapshot)
    except BaseException:
        config, runner = Config("unreadable snapshot"), None
        unreadable: str | None = traceback.format_exc()
    else:
        runner = execute.Runner(
            program,
            metric,
            seed=config.seed,
            retries=options.retries,
            backoff=options.backoff,
            slots=slots,
        )
        unreadable = None
    os.environ.update(config.env)
    state = _State(config, fingerprint(snapshot), options, slots, runner=runner)
    _state = state  # before setup(), which may call current_config()
    state.setup_error = unreadable
    try:
        if unreadable is None:
            execute.seed_globals(config.seed)
        if unreadable is None and config.setup is not None:
            config.setup()
    except BaseException:
        state.setup_error = traceback.format_exc()
    if options.limiter and config.rate_limits:  # DSPy's LM calls go through the limiter
        limited.install(config.name, config.rate_limits, options.limiter)
        dspy_limits.install()
    follow_threads()  # the threads a program starts record into its example
    usage.tap_dspy()  # DSPy's LM calls count in each row's usage, if the config uses DSPy
    state.mode = select_mode(
        installed=state.setup_error is None,
        is_async=runner is not None and execute.is_async(runner.program),
        threads=options.threads,
    )
    _start_runners(state)
    slots.mark_ready(state.pid)


def other_procval(expected: str) -> str:
    """Why this process's ``procval`` is not the parent's, on one line; "" if it is.

    Args:
        expected: the folder of the parent's ``procval`` package ("" checks nothing).
    """
    if not expected:
        return ""
    imported = getattr(sys.modules.get("procval"), "__file__", None) or "(no file)"
    for found in (os.path.dirname(imported), os.path.dirname(os.path.dirname(__file__))):
        if os.path.realpath(found) != os.path.realpath(expected):
            return (
                f"the worker imports procval from {found}, not the parent's {expected}: a "
                "folder named 'procval' next to the task file or on sys.path shadows it; "
                "rename that folder, or move the task file out of its directory"
            )
    return ""


def _start_runners(state: _State) -> None:
    """Start what runs examples besides the main thread: threads or an event loop."""
    threads = max(1, state.options.threads)
    if state.mode is RunMode.THREADS:
        assert state.runner is not None
        state.feed = Feed()
        runners.start_threads(state.runner, state.feed, threads)
    elif state.mode is RunMode.ASYNC:
        assert state.runner is not None
        state.feed = Feed()
        state.loop = runners.EventLoop(state.runner, state.feed, threads)


def run_shard(shard: bytes) -> bytes:
    """Run a pickled :class:`~procval.wire.Shard`; return the pickled ``ShardDone``.

    ``INLINE``: the results are those of this shard's examples. ``THREADS`` and ``ASYNC``: the
    examples join the worker's feed and the call returns once each of them has started, with
    every result finished by then (from this shard or earlier ones); with ``drain``, once every
    example given to this worker has finished. ``FAILED``: a ``SetupFailed`` with the traceback.
    """
    state = _state
    if state is None:  # pragma: no cover - initialize always runs first
        raise NotInWorkerError("run_shard called before initialize")
    if state.mode is RunMode.FAILED:
        assert state.setup_error is not None
        failed = SetupFailed(state.setup_error, state.refusal)
        return _pickling.dumps(failed, what="setup error")
    message: Shard = _pickling.loads(shard)
    if state.mode is RunMode.INLINE:
        assert state.runner is not None
        results = [state.runner.run(item, 0) for item in message.items]
    else:
        assert state.feed is not None
        slots = state.slots
        state.feed.put(message.items)
        if state.loop is not None:
            state.loop.wake()
        timeout = state.options.timeout
        late = None if timeout is None else lambda: sum(s > timeout for _, s in slots.running())
        results = state.feed.collect(drain=message.drain, late=late)
    logs.sent()  # the records its examples logged leave before their results (Ray: over TCP)
    return _dump_results(state, results)


def _dump_results(state: _State, results: list[ExampleResult]) -> bytes:
    done = ShardDone(state.pid, state.node, state.fingerprint, results)
    try:
        return _pickling.dumps(done, what="results")
    except Exception:
        fixed = []
        dropped: list[str] = []
        for result in results:
            try:
                _pickling.dumps(result.prediction, what="prediction")
            except Exception as exc:
                error = ErrorInfo(
                    "UnpicklablePrediction",
                    f"the prediction cannot be sent back to the parent: {exc}; "
                    "return plain data (str, dict, dataclass) from the program",
                    "",
                )
                result = result._replace(prediction=None, score=0.0, error=error)
            if result.events:
                try:
                    _pickling.dumps(result.events, what="events")
                except Exception as exc:  # the row stays; what it recorded is lost
                    dropped.append(f"{result.seq}: {exc}")
                    result = result._replace(events=None)
            fixed.append(result)
        if dropped:
            _logger.warning(
                "dropped the recorded events (callbacks, LM history) of %d example(s) that "
                "cannot be pickled; their rows are kept (by seq: %s)",
                len(dropped),
                "; ".join(dropped),
            )
        return _pickling.dumps(done._replace(results=fixed), what="results")
