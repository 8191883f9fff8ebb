"""DSPy on worker processes: :func:`snapshot` of DSPy's settings, and a drop-in :class:`Evaluate`.

::

    parent (the caller's thread)                     each worker process of the config
    ────────────────────────────                     ─────────────────────────────────
    snapshot(): dspy.settings.config as this          env: LITELLM_LOCAL_MODEL_COST_MAP=True
      thread sees it (configure + dspy.context)       setup(): dspy.configure_cache(...) as the
      − per-call state (trace, usage tracker,                  caller had it, then
        streaming and caller fields)                           dspy.configure(**settings)
      − callbacks that cannot be pickled (warned)
      the LM copied without its history
      pickled at once ──▶ Config.setup (bytes) ──────▶ installed once per process
      described, secrets redacted ──▶ Config.values   (what the run store keeps)

    Evaluate(...)(program): snapshot() ──▶ procval.evaluate ──▶ program(**example.inputs()),
      ◀── rows ── dspy-style EvaluationResult          metric(example, prediction), in
          (score in percent, results tuples)           num_threads // workers threads each
      as rows arrive: "Error for ..." per failed example, then "Average Metric: x / n (p%)",
      on DSPy's own loggers (dspy.utils.parallelizer, dspy.evaluate.evaluate)

What stays in a process: each worker builds its own DSPy cache object. The in-memory cache
starts empty in every worker; the disk cache (a SQLite-backed ``diskcache`` directory, safe for
several processes) is shared, so a response cached by any process or earlier run is reused.
Each worker's LM is its own copy: ``lm.history`` and ``dspy.inspect_history()`` fill up in the
worker and are not sent back, so the caller's LM history does not grow. What a prediction
carries (its fields, its LM usage under ``track_usage=True``) does come back with it.
"""

from __future__ import annotations

import contextvars
import csv
import functools
import hashlib
import importlib.util
import json
import logging
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    import dspy
except ImportError as exc:  # pragma: no cover - tested in a subprocess without dspy
    raise ImportError(
        "procval.dspy needs DSPy, which is not installed: pip install 'procval[dspy]'"
    ) from exc

from dspy.evaluate.evaluate import EvaluationResult as _DSPyEvaluationResult
from dspy.utils.callback import with_callbacks

from procval import _pickling
from procval.backends import Backend, _preload
from procval.errors import TooManyErrors
from procval.integrations import _dspy_observe as _observe
from procval.integrations._dspy_checks import _check_inputs, _ErrorLog, _plan
from procval.integrations._dspy_observe import in_worker
from procval.integrations._dspy_program import Scored, _dataset, _Program, _result, _score
from procval.integrations._dspy_settings import PER_CALL_SETTINGS, snapshot, worker_env
from procval.integrations._dspy_settings import _Configure as _Configure  # pickled as ours
from procval.ratelimit import RateLimit, rate_limits

if TYPE_CHECKING:
    from procval.results import EvaluationResult as _ProcvalResult
    from procval.results import Row, Usage
    from procval.run.pool import Workers

__all__ = ["PER_CALL_SETTINGS", "Evaluate", "EvaluationResult", "Scored", "in_worker", "snapshot"]

logger = logging.getLogger(__name__)
# DSPy's own loggers, so that its handler (time, level, name) shows these lines as DSPy's do and
# a filter set on them applies here too: failed examples as they happen, the mean at the end.
_executor_logger = logging.getLogger("dspy.utils.parallelizer")
_evaluate_logger = logging.getLogger("dspy.evaluate.evaluate")


_ALL_CALLBACKS: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "procval_dspy_callbacks", default=None
)


def _callbacks_here(call: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``Evaluate.__call__`` (and its evaluate callbacks) without the in-worker callbacks.

    Those run where the program runs, only there; the snapshot still carries them.
    """

    @functools.wraps(call)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        everything = list(dspy.settings.get("callbacks") or [])
        here = [c for c in everything if not _observe.runs_in_worker(c)]
        if len(here) == len(everything):
            return call(self, *args, **kwargs)
        token = _ALL_CALLBACKS.set(everything)
        try:
            with dspy.context(callbacks=here):
                return call(self, *args, **kwargs)
        finally:
            _ALL_CALLBACKS.reset(token)

    return wrapper


class EvaluationResult(_DSPyEvaluationResult):
    """DSPy's ``EvaluationResult``, with procval's rows and errors kept reachable.

    Attributes:
        score: the mean metric value in percent, rounded to 2 decimals, as DSPy computes it.
        results: ``(example, prediction, score)`` per example in devset order, as DSPy gives
            them: ``example`` is the devset's own object, ``score`` the metric's value as
            returned; a failed example has an empty ``dspy.Prediction()`` and
            ``failure_score``. After ``max_errors``, only the finished examples are there.
    """

    def __init__(
        self,
        score: float,
        results: list[tuple[Any, Any, Any]],
        evaluation: _ProcvalResult,
    ) -> None:
        super().__init__(score=score, results=results)
        self._procval = evaluation

    @property
    def procval(self) -> _ProcvalResult:
        """The result as procval gives it: rows, errors, ``summary()``, duration, fingerprint."""
        return self._procval

    @property
    def usage(self) -> dict[str, Usage]:
        """Tokens and cost per model spent by the run (every LM call, cached ones apart)."""
        return self._procval.usage

    @property
    def rows(self) -> Sequence[Row]:
        """Every row with its provenance; a row's ``prediction`` is a :class:`Scored`."""
        return self._procval.rows

    @property
    def errors(self) -> list[Row]:
        """The rows of the examples that failed, with the worker's traceback."""
        return self._procval.errors


class Evaluate(dspy.Evaluate):
    """``dspy.Evaluate`` that runs the program on worker processes holding a settings snapshot.

    The constructor and the call take ``dspy.Evaluate``'s arguments with their meaning, plus
    procval's options below. Each call takes a :func:`snapshot` of the DSPy settings the calling
    thread sees (so ``dspy.configure(lm=...)`` and ``dspy.context(lm=...)`` just before the call
    decide the LM) and evaluates ``program(**example.inputs())`` in processes holding it; they
    are kept for the next call while the settings stay the same (:class:`procval.Workers`, with
    DSPy preloaded in the fork server), and end with the evaluator.

    ``num_threads`` stays the number of examples in flight: the work runs on
    ``processes = min(workers, num_threads)`` processes with ``num_threads // processes`` threads
    each, so at most ``num_threads`` examples (and LM requests) are in flight.
    ``num_threads=None`` means ``dspy.settings.num_threads``, as in DSPy. ``workers=None`` means
    one process per 16 threads wanted, up to the CPU count: LM calls wait on the network, so
    threads serve them well, and each process holds memory of its own.

    ``max_errors`` keeps DSPy's meaning (stop at that many failed examples; ``None`` means
    ``dspy.settings.max_errors``). Unlike DSPy, the examples that finished are kept: the
    :class:`procval.TooManyErrors` raised carries them in ``.results``, an
    :class:`EvaluationResult` over the finished examples only.

    Args:
        devset: the ``dspy.Example`` objects to evaluate, with inputs set (``with_inputs``).
        metric: called as ``metric(example, prediction)``; returns a bool or a number (or
            anything ``float()`` accepts, such as ``dspy.Prediction(score=...)``).
        num_threads: examples in flight at once (see above).
        display_progress: show procval's progress bar on stderr.
        display_table: print the results as a table (needs pandas); an int shows that many rows.
        max_errors: stop once this many examples have failed (see above).
        provide_traceback: log each failed example with the worker's traceback.
        failure_score: the score of an example whose program or metric raised.
        save_as_csv: write the results to this CSV file, as DSPy does.
        save_as_json: write the results to this JSON file, as DSPy does.
        workers: worker processes at most (default: ``ceil(num_threads / 16)``, up to the CPU
            count).
        timeout: seconds an example may run before its worker is killed and the example fails
            with a ``"Timeout"`` error (default: no limit).
        retries: times to retry an example whose program raised, with backoff.
        store: a SQLite run store; calling again with the same store resumes the run.
        rate_limit: a :class:`procval.RateLimit` (or a list) for the LM calls of every worker,
            e.g. ``RateLimit(lm.model, requests_per_minute=3000)``; a call answered 429 is
            retried alone after its ``Retry-After`` (docs/rate-limits.md).
        max_tokens: stop once the LM calls spent this many tokens, keeping what finished
            (``evaluate(max_tokens=)``; ``.procval.stopped`` says how to resume).
        max_cost: the same for their cost (LiteLLM's price table, or the response's).
        backend: the engine, as ``evaluate``'s (``"ray"``, a ``RayBackend``); None: loky with
            DSPy preloaded. Its workers are kept between calls alike (Ray actors stay warm).
        **kwargs: passed to ``dspy.Evaluate`` (which rejects ``return_outputs``).
    """

    def __init__(
        self,
        *,
        devset: list[dspy.Example],
        metric: Callable[..., Any] | None = None,
        num_threads: int | None = None,
        display_progress: bool = False,
        display_table: bool | int = False,
        max_errors: int | None = None,
        provide_traceback: bool | None = None,
        failure_score: float = 0.0,
        save_as_csv: str | None = None,
        save_as_json: str | None = None,
        workers: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        store: str | os.PathLike[str] | None = None,
        rate_limit: RateLimit | Sequence[RateLimit] | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        backend: str | Backend | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            devset=devset,
            metric=metric,
            num_threads=num_threads,
            display_progress=display_progress,
            display_table=display_table,
            max_errors=max_errors,
            provide_traceback=provide_traceback,
            failure_score=failure_score,
            save_as_csv=save_as_csv,
            save_as_json=save_as_json,
            **kwargs,
        )
        self.workers = workers
        self.timeout = timeout
        self.retries = retries
        self.store = store
        from procval.run.budget import check_budgets

        self.rate_limit = rate_limits(rate_limit) or None  # checked now, not at the call
        check_budgets(max_tokens, max_cost)
        self.max_tokens, self.max_cost = max_tokens, max_cost
        self.backend = backend
        if backend is None:
            # the fork server that will preload DSPy starts now, in the background: its import
            # of DSPy overlaps the caller's own work until the first call (which waits for it)
            _preload.prestart(worker_env(), _preloaded())

    @_callbacks_here
    @with_callbacks
    def __call__(
        self,
        program: Callable[..., Any],
        metric: Callable[..., Any] | None = None,
        devset: list[dspy.Example] | None = None,
        num_threads: int | None = None,
        display_progress: bool | None = None,
        display_table: bool | int | None = None,
        callback_metadata: dict[str, Any] | None = None,
        save_as_csv: str | None = None,
        save_as_json: str | None = None,
    ) -> EvaluationResult:
        """Evaluate ``program`` on worker processes; arguments override the constructor's.

        Args:
            program: the DSPy program (any callable taking the examples' inputs as keywords).
            metric: the metric, if not the constructor's.
            devset: the examples, if not the constructor's.
            num_threads: examples in flight, if not the constructor's.
            display_progress: show a progress bar, if not the constructor's choice.
            display_table: print a results table, if not the constructor's choice.
            callback_metadata: metadata for DSPy's evaluate callbacks (logged at debug level).
            save_as_csv: a CSV file to write, if not the constructor's.
            save_as_json: a JSON file to write, if not the constructor's.

        Returns:
            An :class:`EvaluationResult`: ``score`` in percent, ``results`` tuples, and procval's
            ``rows``, ``errors`` and ``procval`` result.

        Raises:
            ValueError: an empty devset, or an example without inputs.
            TypeError: no metric, or a program or metric that is not callable.
            procval.TooManyErrors: ``max_errors`` examples failed; ``.results`` holds what
                finished, as an :class:`EvaluationResult`.
            procval.SnapshotError: the program, metric or a DSPy setting cannot be pickled.
            procval.SetupError: the settings could not be installed in a worker.
        """
        from procval.run.observe import on_rows

        metric = metric if metric is not None else self.metric
        devset = devset if devset is not None else self.devset
        num_threads = num_threads if num_threads is not None else self.num_threads
        display_progress = (
            display_progress if display_progress is not None else self.display_progress
        )
        display_table = display_table if display_table is not None else self.display_table
        save_as_csv = save_as_csv if save_as_csv is not None else self.save_as_csv
        save_as_json = save_as_json if save_as_json is not None else self.save_as_json
        if not devset:
            raise ValueError("devset must contain at least one example, got an empty devset.")
        if not callable(program):
            raise TypeError(f"program must be callable, got {type(program).__name__}")
        if not callable(metric):
            raise TypeError(
                "metric must be callable as metric(example, prediction); pass metric= to "
                f"Evaluate(...) or to the call (got {type(metric).__name__})"
            )
        if callback_metadata:
            logger.debug(f"Evaluate is called with callback metadata: {callback_metadata}")
        devset = list(devset)
        _check_inputs(devset)
        workers, threads = _plan(num_threads, self.workers)
        limit = self.max_errors if self.max_errors is not None else dspy.settings.max_errors
        everything = _ALL_CALLBACKS.get()
        extra: dict[str, Any] = {} if everything is None else {"callbacks": everything}
        config = snapshot(rate_limit=self.rate_limit, **extra)
        relay = config.setup.relay if isinstance(config.setup, _Configure) else None
        if relay is not None:  # the workers' callback events and LM history come back here
            relay.program = program
            relay.hold_history = True
        traceback = (
            self.provide_traceback
            if self.provide_traceback is not None
            else dspy.settings.provide_traceback
        )
        try:
            with on_rows(_ErrorLog(devset, bool(traceback))):
                outcome: Any = _workers(self, config, workers, threads).evaluate(
                    _Program(program, metric),
                    _dataset(devset),
                    _score,
                    failure_score=self.failure_score,
                    progress=bool(display_progress),
                    timeout=self.timeout,
                    retries=self.retries,
                    max_errors=None if limit is None else max(0, limit - 1),  # as DSPy stops
                    store=self.store,
                    max_tokens=self.max_tokens,
                    max_cost=self.max_cost,
                )
        except TooManyErrors as exc:
            partial = exc.results[config.name] if isinstance(exc.results, Mapping) else exc.results
            exc.results = self._report(partial, devset, metric, False, None, None, final=False)
            _executor_logger.warning(
                "Execution cancelled due to errors or interruption; the finished examples are "
                "kept in the TooManyErrors' .results."
            )
            raise
        finally:
            if relay is not None:
                relay.flush_history()  # in devset order
        return self._report(outcome, devset, metric, display_table, save_as_csv, save_as_json)

    def _report(
        self,
        outcome: _ProcvalResult,
        devset: list[Any],
        metric: Any,
        display_table: bool | int,
        save_as_csv: str | None,
        save_as_json: str | None,
        *,
        final: bool = True,
    ) -> EvaluationResult:
        """Log the mean, display and save the rows as ``dspy.Evaluate`` does; the DSPy result.

        The failed examples were logged as they happened (:class:`_ErrorLog`); a run stopped by
        ``max_errors`` (``final=False``) logs no mean, as DSPy's does not.
        """
        results = [(devset[row.index], *_result(row)) for row in outcome.rows]
        ncorrect, ntotal = sum(score for *_, score in results), len(results)
        percent = 100 * ncorrect / ntotal if ntotal else 0.0
        if final:
            _evaluate_logger.info(f"Average Metric: {ncorrect} / {ntotal} ({round(percent, 1)}%)")
        metric_name = (
            metric.__name__ if isinstance(metric, types.FunctionType) else type(metric).__name__
        )
        if display_table:
            if importlib.util.find_spec("pandas") is not None:
                table = self._construct_result_table(results, metric_name)
                self._display_result_table(table, display_table, metric_name)
            else:
                _evaluate_logger.warning("Skipping table display since `pandas` is not installed.")
        if save_as_csv:
            data = self._prepare_results_output(results, metric_name)
            with open(save_as_csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=data[0].keys())
                writer.writeheader()
                writer.writerows(data)
        if save_as_json:
            with open(save_as_json, "w") as f:
                json.dump(self._prepare_results_output(results, metric_name), f)
        return EvaluationResult(score=round(percent, 2), results=results, evaluation=outcome)


def _workers(owner: Evaluate, config: Any, workers: int, threads: int) -> Workers:
    """The evaluator's pool for these settings: kept while they stay the same (see Workers)."""
    from procval.backends.loky import LokyBackend
    from procval.run.pool import Workers

    key = (hashlib.sha256(_pickling.dumps_fast(config)).hexdigest(), workers, threads)
    held: tuple[Any, Workers] | None = getattr(owner, "_procval_workers", None)
    if held is None or held[0] != key:
        if held is not None:
            held[1].close()
        backend = owner.backend or LokyBackend(preload=_preloaded())
        held = owner._procval_workers = (
            key,
            Workers(config, workers=workers, threads=threads, backend=backend),
        )
    return held[1]


def _preloaded() -> tuple[str, ...] | None:
    """What Evaluate's workers preload: ``PROCVAL_PRELOAD`` if set, else DSPy (and this module)."""
    return None if os.environ.get("PROCVAL_PRELOAD") else _preload.DSPY
