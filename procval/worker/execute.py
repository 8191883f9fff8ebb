"""Running one example: seed it, run the program (retried with backoff), score it with the metric.

Whatever happens, the outcome is an :class:`~procval.wire.ExampleResult`: a program or metric
that raises gives a row with its :class:`~procval.wire.ErrorInfo`, never a crashed worker. While
the program and the metric run, the slot table records which example the slot runs.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procval._scores import wire_scores
from procval.wire import ErrorInfo, ExampleResult, WorkItem
from procval.worker import record
from procval.worker.scoring import MetricTypeError, NonFiniteScore, outcome  # noqa: F401

if TYPE_CHECKING:
    from procval.worker.slots import SlotTable

_BACKOFF_CAP = 60.0

# per example: a ContextVar, so that each thread *and* each asyncio task sees its own
_example_rng: contextvars.ContextVar[random.Random | None] = contextvars.ContextVar(
    "procval_example_rng", default=None
)


class Runner:
    """What running an example needs: the snapshot's program and metric, and the run's options.

    A plain class, not a dataclass: it is built in every worker, and a dataclass costs half a
    millisecond of import time there.
    """

    __slots__ = ("backoff", "jitter", "metric", "program", "retries", "seed", "slots")

    def __init__(
        self,
        program: Callable[[Any], Any],
        metric: Callable[[Any, Any], Any],
        *,
        seed: int | None,
        retries: int,
        backoff: float,
        slots: SlotTable,
    ) -> None:
        """Keep what each example needs.

        Args:
            program: the user's program (a coroutine function for an async program).
            metric: the user's metric (may return an awaitable when the program is async).
            seed: ``Config.seed``; each example is seeded from ``(seed, example_id)``.
            retries: how many times a failing program is run again.
            backoff: the first retry's delay in seconds, doubled at each retry (with jitter).
            slots: the slot table in which each slot records the example it runs.
        """
        self.program = program
        self.metric = metric
        self.seed = seed
        self.retries = retries
        self.backoff = backoff
        self.slots = slots
        # not seeded: the retries of two examples should not wait in step
        self.jitter = random.Random()

    def run(self, item: WorkItem, slot: int) -> ExampleResult:
        """Run one example in this thread, as ``slot``; whatever it raises becomes its row."""
        token = record.begin(item.example_id)  # what it records travels with its result
        try:
            result = self._run(item, slot)
        except BaseException as exc:  # e.g. KeyboardInterrupt raised by the program itself
            self.slots.stop(slot)
            result = ExampleResult(item.seq, None, 0.0, _error(exc), 1, 0.0)
        return record.end(token, result)

    async def run_async(self, item: WorkItem, slot: int) -> ExampleResult:
        """Run one example of an async program, as ``slot``; whatever it raises becomes its row."""
        token = record.begin(item.example_id)
        try:
            result = await self._run_async(item, slot)
        except BaseException as exc:  # e.g. CancelledError raised by the program itself
            self.slots.stop(slot)
            result = ExampleResult(item.seq, None, 0.0, _error(exc), 1, 0.0)
        return record.end(token, result)

    def _run(self, item: WorkItem, slot: int) -> ExampleResult:
        seq, example_id, example, epoch = item
        started = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            seed_example(self.seed, example_id, epoch)
            self.slots.start(slot, seq)
            try:
                prediction = self.program(example)
            except (Exception, SystemExit) as exc:
                self.slots.stop(slot)
                if attempts <= self.retries and _retryable(exc):
                    time.sleep(self._backoff(attempts))
                    continue
                return ExampleResult(
                    seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started
                )
            try:
                score, scores, extra = outcome(self.metric(example, prediction))
            except (Exception, SystemExit) as exc:
                return ExampleResult(
                    seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started
                )
            finally:
                self.slots.stop(slot)
            named = None if scores is None else wire_scores(scores)  # (names, JSON text)
            return ExampleResult(
                seq, prediction, score, None, attempts, time.perf_counter() - started, named, extra
            )

    async def _run_async(self, item: WorkItem, slot: int) -> ExampleResult:
        import asyncio

        seq, example_id, example, epoch = item
        started = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            seed_example(self.seed, example_id, epoch)
            self.slots.start(slot, seq)
            try:
                prediction = await self.program(example)
            except (Exception, SystemExit) as exc:
                self.slots.stop(slot)
                if attempts <= self.retries and _retryable(exc):
                    await asyncio.sleep(self._backoff(attempts))
                    continue
                return ExampleResult(
                    seq, None, 0.0, _error(exc), attempts, time.perf_counter() - started
                )
            try:
                value = self.metric(example, prediction)
                if inspect.isawaitable(value):
                    value = await value
                score, scores, extra = outcome(value)
            except (Exception, SystemExit) as exc:
                return ExampleResult(
                    seq, prediction, 0.0, _error(exc), attempts, time.perf_counter() - started
                )
            finally:
                self.slots.stop(slot)
            named = None if scores is None else wire_scores(scores)  # (names, JSON text)
            return ExampleResult(
                seq, prediction, score, None, attempts, time.perf_counter() - started, named, extra
            )

    def _backoff(self, attempt: int) -> float:
        base = min(_BACKOFF_CAP, self.backoff * 2 ** (attempt - 1))
        return base * self.jitter.uniform(0.5, 1.5)


def is_async(program: Any) -> bool:
    """Whether ``program`` is a coroutine function (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(program) or inspect.iscoroutinefunction(
        getattr(program, "__call__", None)
    )


def example_seed(seed: int, example_id: object, epoch: int = 0) -> int:
    """The seed used for one example: stable across processes, machines and Python versions.

    Epoch 0 is seeded from ``(seed, example_id)`` alone, as before epochs existed, so that a run
    of one epoch gives the results it always gave; a later epoch from ``(seed, example_id,
    epoch)``.
    """
    key = f"{seed}\0{example_id!r}" if not epoch else f"{seed}\0{example_id!r}\0{epoch}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def example_rng() -> random.Random | None:
    """The current example's ``random.Random`` (``None`` without a seed or outside an example)."""
    return _example_rng.get()


def seed_globals(seed: int | None) -> None:
    """Seed ``random`` (and numpy's global generator, if numpy is installed) once, at start."""
    if seed is None:
        return
    random.seed(seed)
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def seed_example(seed: int | None, example_id: object, epoch: int = 0) -> None:
    """Seed the example's own ``rng()``, ``random`` and (if imported) numpy, before each attempt."""
    if seed is None:
        _example_rng.set(None)
        return
    value = example_seed(seed, example_id, epoch)
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


def _error(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))


def _retryable(exc: BaseException) -> bool:
    return getattr(exc, "procval_retry", True) is not False and not isinstance(exc, SystemExit)
