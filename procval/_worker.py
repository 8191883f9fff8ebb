"""The code that runs inside a worker process.

One worker process serves one config for its whole life::

    parent (scheduler)                          worker process (this module)
    ──────────────────                          ────────────────────────────
    start_worker(snapshot) ──────spawn───────▶  initialize(): unpickle (config, program, metric)
                                                once; env → seed → setup(); slot table ready
    submit(shard bytes) ───────────────────────▶ run_shard(): for each example, in `threads`
                                                threads (or one event loop for async programs):
                                                  seed from (seed, example_id)
                                                  slot table ← (seq, start time)
                                                  program(example), retried with backoff
                                                  metric(example, prediction) → score
    ◀──────────────────── result bytes ───────  one pickled list of result tuples per shard,
                                                stamped with pid, node and fingerprint
    reads slot table ◀─── mmap ────────────────  (timeouts, crash suspects: no message needed)

Module-level state lives here, in an importable module, because a ``__main__``-defined
initializer would not share globals with ``__main__``-defined tasks under cloudpickle.
A watchdog thread ends the process when its parent dies, so no worker outlives a ``kill -9``.
"""

from __future__ import annotations

import contextvars
import faulthandler
import hashlib
import inspect
import itertools
import numbers
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from procval import _pickling
from procval._slots import SlotTable
from procval.config import Config, fingerprint
from procval.errors import NotInWorkerError

if TYPE_CHECKING:
    import asyncio  # imported in the worker only for an async program

# A result travels back as a tuple, for speed:
#   (seq, prediction, score, error, attempts, duration)
# where error is None or (type name, message, traceback text).
Result = tuple[int, Any, float, "tuple[str, str, str] | None", int, float]

_BACKOFF_CAP = 60.0


@dataclass
class WorkerOptions:
    """What the scheduler tells every worker besides the snapshot."""

    threads: int = 1
    retries: int = 0
    backoff: float = 0.5
    parent_pid: int = 0


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
    pool: ThreadPoolExecutor | None = None
    loop: asyncio.AbstractEventLoop | None = None
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
    if state.is_async:
        import asyncio

        state.loop = asyncio.new_event_loop()
    elif options.threads > 1:
        counter = itertools.count()
        state.pool = ThreadPoolExecutor(
            options.threads,
            thread_name_prefix="procval",
            initializer=lambda: setattr(_local, "slot", next(counter)),
        )
    state.slots.mark_ready(state.pid)


def run_shard(shard: bytes) -> bytes:
    """Run a pickled list of ``(seq, example_id, example)`` and return the pickled results."""
    state = _state
    if state is None:  # pragma: no cover - initialize always runs first
        raise NotInWorkerError("run_shard called before initialize")
    if state.setup_error is not None:
        return _pickling.dumps(("setup_error", state.setup_error), what="setup error")
    items = _pickling.loads(shard)
    start = time.perf_counter()
    if state.loop is not None:
        results = state.loop.run_until_complete(_run_async(state, items))
    elif state.pool is not None:
        results = list(state.pool.map(lambda item: _run_one(state, item), items))
    else:
        _local.slot = 0
        results = [_run_one(state, item) for item in items]
    header = ("ok", state.pid, state.node, state.fingerprint, time.perf_counter() - start)
    return _dump_results(header, results)


def _run_one(state: _State, item: tuple[int, Any, Any]) -> Result:
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
            return (seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started)
        try:
            score = _score(state.metric(example, prediction))
        except (Exception, SystemExit) as exc:
            return (seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started)
        finally:
            state.slots.stop(slot)
        return (seq, prediction, score, None, attempts, time.perf_counter() - started)


async def _run_async(state: _State, items: list[tuple[int, Any, Any]]) -> list[Result]:
    import asyncio

    free = list(range(max(1, state.options.threads)))
    available = asyncio.Semaphore(len(free))

    async def one(item: tuple[int, Any, Any]) -> Result:
        async with available:
            slot = free.pop()
            try:
                return await _run_one_async(state, item, slot)
            finally:
                free.append(slot)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _run_one_async(state: _State, item: tuple[int, Any, Any], slot: int) -> Result:
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
            return (seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started)
        try:
            value = state.metric(example, prediction)
            if inspect.isawaitable(value):
                value = await value
            score = _score(value)
        except (Exception, SystemExit) as exc:
            return (seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started)
        finally:
            state.slots.stop(slot)
        return (seq, prediction, score, None, attempts, time.perf_counter() - started)


class MetricTypeError(TypeError):
    """A metric returned something other than a bool or a real number."""


def _score(value: Any) -> float:
    if isinstance(value, bool | numbers.Real):
        return float(value)
    raise MetricTypeError(
        f"metric returned a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}); "
        "it must return a bool, int or float"
    )


def _error(exc: BaseException) -> tuple[str, str, str]:
    return (type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))


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


def _dump_results(header: tuple[Any, ...], results: list[Result]) -> bytes:
    try:
        return _pickling.dumps((*header, results), what="results")
    except Exception:
        fixed = []
        for result in results:
            try:
                _pickling.dumps(result[1], what="prediction")
                fixed.append(result)
            except Exception as exc:
                error = (
                    "UnpicklablePrediction",
                    f"the prediction cannot be sent back to the parent: {exc}; "
                    "return plain data (str, dict, dataclass) from the program",
                    "",
                )
                fixed.append((result[0], None, 0.0, error, result[4], result[5]))
        return _pickling.dumps((*header, fixed), what="results")


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
