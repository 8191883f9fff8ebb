"""The code that runs inside a worker process.

One worker process serves one config for its whole life::

    parent (scheduler)                          worker process (this module)
    ──────────────────                          ────────────────────────────
    start_worker(snapshot) ──────spawn───────▶  initialize(): unpickle (config, program, metric)
                                                once; env → seed → setup(); slot table ready
    submit(shard bytes) ───────────────────────▶ run_shard(): the shard's examples join the
                                                worker's feed, which `threads` threads (or one
                                                event loop for async programs) keep draining:
                                                  seed from (seed, example_id)
                                                  slot table ← (seq, start time)
                                                  program(example), retried with backoff
                                                  metric(example, prediction) → score
    ◀──────────────────── result bytes ───────  once every example of the feed has started:
                                                the results finished so far (of this shard or
                                                earlier ones), stamped with pid, node and
                                                fingerprint; a "drain" shard waits for all
    reads slot table ◀─── mmap ────────────────  (timeouts, crash suspects: no message needed)

No barrier between shards: a thread that finishes takes the next example at once, even while
the slowest example of the previous shard still runs (its result travels with the next shard's).
The scheduler keeps a second shard queued behind the running one, and sends a drain shard when
it has nothing left for the worker. A worker with one thread runs its shard in its main thread,
one example after the other, and returns all of it.

Module-level state lives here, in an importable module, because a ``__main__``-defined
initializer would not share globals with ``__main__``-defined tasks under cloudpickle.
A watchdog thread ends the process when its parent dies, so no worker outlives a ``kill -9``.
"""

from __future__ import annotations

import contextvars
import faulthandler
import hashlib
import inspect
import numbers
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    WorkItem,
    fingerprint,
)
from procval.worker.slots import SlotTable

if TYPE_CHECKING:
    import asyncio  # imported in the worker only for an async program

_BACKOFF_CAP = 60.0


@dataclass
class _State:
    config: Config
    fingerprint: str
    options: WorkerOptions
    slots: SlotTable
    pid: int = field(default_factory=os.getpid)
    node: str = field(default_factory=socket.gethostname)
    program: Callable[[Any], Any] | None = None
    metric: Callable[[Any, Any], Any] | None = None
    is_async: bool = False
    setup_error: str | None = None
    feed: _Feed | None = None  # with threads > 1 or an async program
    loop: asyncio.AbstractEventLoop | None = None
    free_slots: list[int] = field(default_factory=list)  # async: slots of no running task
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # async: the running ones
    jitter: random.Random = field(default_factory=random.Random)


_state: _State | None = None
_local = threading.local()  # the slot of each worker thread
# per example: a ContextVar, so that each thread *and* each asyncio task sees its own
_example_rng: contextvars.ContextVar[random.Random | None] = contextvars.ContextVar(
    "procval_example_rng", default=None
)


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
    current = _example_rng.get()
    return current if current is not None else random.Random()


def example_seed(seed: int, example_id: object) -> int:
    """The seed used for one example: stable across processes, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}\0{example_id!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def initialize(snapshot: bytes, options: WorkerOptions, slots_path: str) -> None:
    """Install a snapshot in this process: unpickle it, then apply env, seed and setup.

    Runs once, as the worker's initializer. A failure is kept and reported by every
    :func:`run_shard` call, so the parent can stop the run with the worker's traceback.
    """
    global _state
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if hasattr(signal, "pthread_sigmask"):  # (not on Windows)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while starting
    _record_faults(slots_path + ".fault")
    _watch_parent(options.parent_pid)
    try:
        config, program, metric = _pickling.loads(snapshot)
    except BaseException:
        config, program, metric = Config("unreadable snapshot"), None, None
        unreadable: str | None = traceback.format_exc()
    else:
        unreadable = None
    os.environ.update(config.env)
    state = _State(
        config=config,
        program=program,
        metric=metric,
        is_async=_is_async(program),
        fingerprint=fingerprint(snapshot),
        options=options,
        slots=SlotTable(slots_path, max(1, options.threads)),
    )
    _state = state
    state.setup_error = unreadable
    try:
        if unreadable is None:
            _seed_globals(config.seed)
        if unreadable is None and config.setup is not None:
            config.setup()
    except BaseException:
        state.setup_error = traceback.format_exc()
    if state.setup_error is None:
        _start_runners(state)
    state.slots.mark_ready(state.pid)


def _start_runners(state: _State) -> None:
    """Start what runs examples besides the main thread: a thread pool or an event loop."""
    threads = max(1, state.options.threads)
    if state.is_async:
        import asyncio

        state.feed = _Feed()
        state.loop = asyncio.new_event_loop()
        state.free_slots = list(range(threads))
        threading.Thread(target=state.loop.run_forever, name="procval-loop", daemon=True).start()
    elif threads > 1:
        state.feed = feed = _Feed()
        for slot in range(threads):
            threading.Thread(
                target=_thread_main, args=(state, feed, slot), name=f"procval-{slot}", daemon=True
            ).start()


def run_shard(shard: bytes) -> bytes:
    """Run a pickled :class:`~procval.wire.Shard`; return the pickled ``ShardDone``.

    With one thread, the results are
    those of this shard's examples. Otherwise the examples join the worker's feed and the call
    returns once each of them has started, with every result finished by then (from this shard
    or earlier ones); with ``drain``, once every example given to this worker has finished.
    """
    state = _state
    if state is None:  # pragma: no cover - initialize always runs first
        raise NotInWorkerError("run_shard called before initialize")
    if state.setup_error is not None:
        return _pickling.dumps(SetupFailed(state.setup_error), what="setup error")
    message: Shard = _pickling.loads(shard)
    items, drain = message.items, message.drain
    feed = state.feed
    if feed is None:
        _local.slot = 0
        results = [_run_guarded(state, item) for item in items]
    else:
        feed.put(items)
        if state.loop is not None:
            state.loop.call_soon_threadsafe(_dispatch_async, state, feed)
        results = feed.collect(drain=drain)
    return _dump_results(state, results)


class _Feed:
    """Examples waiting for a thread (or an async task), and results waiting for a shard call.

    It outlives shards, so that threads never wait for the slowest example of a shard: each
    thread takes the next example as soon as it is free, whichever shard it came in.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # runners wait here for examples
        self._progress = threading.Condition(lock)  # the shard call waits here for results
        self._pending: deque[WorkItem] = deque()
        self._running = 0
        self._done: list[ExampleResult] = []

    def put(self, items: list[WorkItem]) -> None:
        """Hand examples to the runners."""
        with self._work:
            self._pending.extend(items)
            self._work.notify(len(items))

    def take(self) -> WorkItem:
        """The next example, once there is one (a runner thread calls this)."""
        with self._work:
            while not self._pending:
                self._work.wait()
            return self._started()

    def take_nowait(self) -> WorkItem | None:
        """The next example, or ``None`` (the async dispatcher calls this)."""
        with self._work:
            return self._started() if self._pending else None

    def _started(self) -> WorkItem:
        item = self._pending.popleft()
        self._running += 1
        if not self._pending:
            self._progress.notify()
        return item

    def finish(self, result: ExampleResult) -> None:
        """Record a finished example's result."""
        with self._progress:
            self._done.append(result)
            self._running -= 1
            self._progress.notify()

    def collect(self, *, drain: bool) -> list[ExampleResult]:
        """The results so far, once no example waits (and, with ``drain``, none runs)."""
        with self._progress:
            while self._pending or (drain and self._running):
                self._progress.wait()
            done, self._done = self._done, []
            return done


def _thread_main(state: _State, feed: _Feed, slot: int) -> None:
    _local.slot = slot
    while True:
        item = feed.take()
        feed.finish(_run_guarded(state, item))


def _run_guarded(state: _State, item: WorkItem) -> ExampleResult:
    """``_run_one``, with whatever else the program raises (e.g. KeyboardInterrupt) as its row."""
    try:
        return _run_one(state, item)
    except BaseException as exc:
        state.slots.stop(_local.slot)
        return ExampleResult(item.seq, None, 0.0, _error(exc), 1, 0.0)


def _dispatch_async(state: _State, feed: _Feed) -> None:
    """Start an asyncio task for each waiting example while a slot is free (on the loop)."""
    import asyncio

    while state.free_slots:
        item = feed.take_nowait()
        if item is None:
            return
        slot = state.free_slots.pop()
        task = asyncio.ensure_future(_run_async_task(state, feed, item, slot), loop=state.loop)
        state.tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(state.tasks.discard)


async def _run_async_task(state: _State, feed: _Feed, item: WorkItem, slot: int) -> None:
    try:
        result = await _run_one_async(state, item, slot)
    except BaseException as exc:  # e.g. CancelledError raised by the program itself
        state.slots.stop(slot)
        result = ExampleResult(item.seq, None, 0.0, _error(exc), 1, 0.0)
    state.free_slots.append(slot)
    feed.finish(result)
    _dispatch_async(state, feed)


def _run_one(state: _State, item: WorkItem) -> ExampleResult:
    seq, example_id, example = item
    slot = _local.slot
    started = time.perf_counter()
    attempts = 0
    assert state.program is not None and state.metric is not None
    while True:
        attempts += 1
        _seed_example(state.config.seed, example_id)
        state.slots.start(slot, seq)
        try:
            prediction = state.program(example)
        except (Exception, SystemExit) as exc:
            state.slots.stop(slot)
            if attempts <= state.options.retries and _retryable(exc):
                time.sleep(_backoff(state, attempts))
                continue
            return ExampleResult(
                seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started
            )
        try:
            score = _score(state.metric(example, prediction))
        except (Exception, SystemExit) as exc:
            return ExampleResult(
                seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started
            )
        finally:
            state.slots.stop(slot)
        return ExampleResult(seq, prediction, score, None, attempts, time.perf_counter() - started)


async def _run_one_async(state: _State, item: WorkItem, slot: int) -> ExampleResult:
    import asyncio

    seq, example_id, example = item
    started = time.perf_counter()
    attempts = 0
    assert state.program is not None and state.metric is not None
    while True:
        attempts += 1
        _seed_example(state.config.seed, example_id)
        state.slots.start(slot, seq)
        try:
            prediction = await state.program(example)
        except (Exception, SystemExit) as exc:
            state.slots.stop(slot)
            if attempts <= state.options.retries and _retryable(exc):
                await asyncio.sleep(_backoff(state, attempts))
                continue
            return ExampleResult(
                seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started
            )
        try:
            value = state.metric(example, prediction)
            if inspect.isawaitable(value):
                value = await value
            score = _score(value)
        except (Exception, SystemExit) as exc:
            return ExampleResult(
                seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started
            )
        finally:
            state.slots.stop(slot)
        return ExampleResult(seq, prediction, score, None, attempts, time.perf_counter() - started)


class MetricTypeError(TypeError):
    """A metric returned something other than a bool or a real number."""


def _score(value: Any) -> float:
    if isinstance(value, bool | numbers.Real):
        return float(value)
    raise MetricTypeError(
        f"metric returned a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}); "
        "it must return a bool, int or float"
    )


def _error(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))


def _retryable(exc: BaseException) -> bool:
    return getattr(exc, "procval_retry", True) is not False and not isinstance(exc, SystemExit)


def _backoff(state: _State, attempt: int) -> float:
    base = min(_BACKOFF_CAP, state.options.backoff * 2 ** (attempt - 1))
    return base * state.jitter.uniform(0.5, 1.5)


def _seed_globals(seed: int | None) -> None:
    if seed is None:
        return
    random.seed(seed)
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def _seed_example(seed: int | None, example_id: object) -> None:
    if seed is None:
        _example_rng.set(None)
        return
    value = example_seed(seed, example_id)
    _example_rng.set(random.Random(value))
    random.seed(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(value % 2**32)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _is_async(program: Any) -> bool:
    return inspect.iscoroutinefunction(program) or inspect.iscoroutinefunction(
        getattr(program, "__call__", None)
    )


def _dump_results(state: _State, results: list[ExampleResult]) -> bytes:
    done = ShardDone(state.pid, state.node, state.fingerprint, results)
    try:
        return _pickling.dumps(done, what="results")
    except Exception:
        fixed = []
        for result in results:
            try:
                _pickling.dumps(result.prediction, what="prediction")
                fixed.append(result)
            except Exception as exc:
                error = ErrorInfo(
                    "UnpicklablePrediction",
                    f"the prediction cannot be sent back to the parent: {exc}; "
                    "return plain data (str, dict, dataclass) from the program",
                    "",
                )
                fixed.append(result._replace(prediction=None, score=0.0, error=error))
        return _pickling.dumps(done._replace(results=fixed), what="results")


def _record_faults(path: str) -> None:
    """Send the fault handler's report of a fatal signal to a file the parent reads."""
    global _fault_file
    try:
        _fault_file = open(path, "w")  # noqa: SIM115 - must stay open for the process's life
    except OSError:
        return
    faulthandler.enable(file=_fault_file, all_threads=True)


_fault_file: Any = None


def _watch_parent(parent_pid: int) -> None:
    """End this process as soon as its parent is gone (even after the parent's ``kill -9``)."""
    if not parent_pid:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="procval-watchdog", daemon=True).start()
