"""``evaluate``: check everything in the parent, snapshot the configs, start the scheduler."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, overload

import loky

from procval.backends import Backend, WorkerSpec
from procval.config import Config
from procval.errors import ProcvalError
from procval.results import EvaluationResult, Results
from procval.run import limiter
from procval.run.budget import Budgets, check_budgets
from procval.run.checks import (
    _check_backend,
    _check_callables,
    _check_counts,
    _check_store_options,
    _named_configs,
)
from procval.run.dataset import Examples
from procval.run.epochs import repeat
from procval.run.groups import GroupBy, GroupedSink
from procval.run.heap import frozen_heap
from procval.run.limit_counts import counted
from procval.run.observe import observed
from procval.run.progress import Progress, wanted
from procval.run.scheduler import RunOptions, Scheduler
from procval.run.scoring import check_model, metric_of
from procval.run.snapshot import take_snapshot
from procval.store.scrub import scrubbed
from procval.store.sink import MemorySink, Sink
from procval.wire import Snapshot, WorkerOptions
from procval.worker.scoring import MetricSet


class Program(Protocol):
    """Anything called as ``program(example) -> prediction`` (sync or ``async def``)."""

    def __call__(self, example: Any, /) -> Any:
        """Predict for one example."""
        ...


class Metric(Protocol):
    """Anything called as ``metric(example, prediction)``, returning a score or named scores."""

    def __call__(self, example: Any, prediction: Any, /) -> Any:
        """Score one prediction."""
        ...


@overload
def evaluate(
    program: Program,
    dataset: Iterable[Any],
    metric: Metric | Sequence[Metric] | Mapping[str, Metric],
    *,
    config: Config | None = None,
    configs: None = None,
    workers: int | None = None,
    threads: int = 1,
    failure_score: float = 0.0,
    progress: bool | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 0.5,
    max_errors: int | None = None,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    retry_errors: bool = False,
    backend: str | Backend = "loky",
    epochs: int = 1,
    reducer: str | Mapping[str, str] = "mean",
    primary: str | None = None,
    group_by: GroupBy | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> EvaluationResult: ...


@overload
def evaluate(
    program: Program,
    dataset: Iterable[Any],
    metric: Metric | Sequence[Metric] | Mapping[str, Metric],
    *,
    config: None = None,
    configs: Mapping[str, Config] | Sequence[Config],
    workers: int | None = None,
    threads: int = 1,
    failure_score: float = 0.0,
    progress: bool | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 0.5,
    max_errors: int | None = None,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    retry_errors: bool = False,
    backend: str | Backend = "loky",
    epochs: int = 1,
    reducer: str | Mapping[str, str] = "mean",
    primary: str | None = None,
    group_by: GroupBy | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> Results: ...


def evaluate(
    program: Program,
    dataset: Iterable[Any],
    metric: Metric | Sequence[Metric] | Mapping[str, Metric],
    *,
    config: Config | None = None,
    configs: Mapping[str, Config] | Sequence[Config] | None = None,
    workers: int | None = None,
    threads: int = 1,
    failure_score: float = 0.0,
    progress: bool | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 0.5,
    max_errors: int | None = None,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    retry_errors: bool = False,
    backend: str | Backend = "loky",
    epochs: int = 1,
    reducer: str | Mapping[str, str] = "mean",
    primary: str | None = None,
    group_by: GroupBy | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> EvaluationResult | Results:
    """Evaluate ``program`` on every example of ``dataset`` with ``metric``, on worker processes.

    Each config runs in its own worker processes, which install a pickled snapshot of it at
    start (``env``, then ``seed``, then ``setup()``) and never serve another config.

    Args:
        program: called as ``program(example)`` in a worker; may be ``async def``. A DSPy
            program (a ``dspy.Module``, such as ``dspy.Predict``) is called as DSPy calls it,
            ``program(**example.inputs())``, on each ``dspy.Example``.
        dataset: any iterable of examples (list, generator, :func:`read_jsonl`). An example's id
            is its ``id`` key or attribute, else its position.
        metric: called as ``metric(example, prediction)``; returns a bool or a number, a
            mapping of score names to numbers, or an object with a ``score`` and other fields
            (``dspy.Prediction(score=..., feedback=...)``: the others go to ``row.extra``).
            A list or dict of metrics gives one named score per metric.
        config: one config (default ``Config()``); the call returns an :class:`EvaluationResult`.
        configs: several configs, as ``{name: Config}`` or a list of uniquely named configs;
            the call returns a read-only mapping of name to :class:`EvaluationResult`.
        workers: worker processes in total, shared among configs (default: the CPU count; on
            Ray, the cluster's CPUs over each actor's ``num_cpus``).
        threads: examples run at once inside each worker (for I/O-bound programs).
        failure_score: the score of an example whose program or metric failed.
        progress: show progress bars on stderr (default: when stderr is a terminal).
        timeout: seconds an example may run; past it the worker is killed and replaced and the
            example gets a ``"Timeout"`` error.
        retries: how many times to retry an example whose program raises (with exponential
            backoff and jitter); raise :class:`procval.NoRetry` to skip retries.
        backoff: seconds before the first retry; doubled for each further one.
        max_errors: stop once more than this many examples have failed, keeping what finished.
        store: a SQLite run store; calling again with the same store resumes the run.
        fresh: with ``store``, discard the rows stored for these configs and start over.
        retry_errors: with ``store``, run again the examples whose stored row failed (after
            fixing the cause of a ``max_errors`` stop, say); by default they count as done.
        backend: ``"loky"`` (local processes), ``"ray"``, or a backend object.

        epochs: how many times each example runs under each config, each epoch seeded from
            ``(seed, example_id, epoch)`` (epoch 0 as without epochs); rows carry ``epoch``.
        reducer: how an example's epochs make its score: ``"mean"``, ``"max"``, ``"median"``,
            ``"mode"``, ``"pass@K"``, ``"pass^K"`` (0/1 scores, K <= epochs), or a mapping of
            score name to reducer (see :meth:`EvaluationResult.examples`).
        primary: with named scores, the one that is ``result.score`` (default: ``score``,
            else the first).
        group_by: each example's group, for scores by group (``result.by_group()``): a key
            (``example["subject"]``), an attribute name, or a function of the example; its
            value, made a str, is ``row.group``. A list dataset is checked up front: examples
            without a group are refused (naming how many, and which ids) before any worker
            starts; a streamed one at the first such example, before it is sent.
        max_tokens: stop sending a config's examples once its rows have spent this many
            tokens (``Row.usage``; with a store, earlier sessions count); the examples in
            flight then finish and are kept, and ``result.stopped`` says how to resume. A
            config's own ``Config(max_tokens=)`` wins. See docs/rate-limits.md.
        max_cost: the same for the cost the rows report.

    Returns:
        An :class:`EvaluationResult` for ``config=``, a :class:`Results` mapping for ``configs=``;
        each result's ``found`` and ``added`` say how many rows were in the store already and
        how many this call produced.

    Raises:
        ValueError: bad arguments (both config and configs, workers < 1, an empty dataset,
            duplicate example ids, ...), raised before any worker starts.
        TypeError: a program or metric that is not callable or takes the wrong arguments.
        SnapshotError: the program, metric or a config cannot be pickled.
        SetupError: a config's ``setup`` failed in its workers, or they died before any result;
            the other configs ran to completion first (``.results``, ``.tracebacks``).
        Exception: whatever the dataset raised while it was read, once the examples read
            before it have run (and are stored, with ``store=``).
        TooManyErrors: more than ``max_errors`` examples failed.
    """
    named = _named_configs(config, configs)
    _check_counts(workers, threads, retries, backoff, timeout, max_errors)
    check_budgets(max_tokens, max_cost)
    _check_backend(backend)
    results = run_configs(
        named,
        program,
        dataset,
        metric,
        lambda: _backend(backend),
        workers=workers,
        threads=threads,
        failure_score=failure_score,
        progress=progress,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_errors=max_errors,
        store=store,
        fresh=fresh,
        retry_errors=retry_errors,
        epochs=epochs,
        reducer=reducer,
        primary=primary,
        group_by=group_by,
        max_tokens=max_tokens,
        max_cost=max_cost,
    )
    return results if configs is not None else results[named[0].name]


def run_configs(
    named: list[Config],
    program: Program,
    dataset: Iterable[Any],
    metric: Metric | Sequence[Metric] | Mapping[str, Metric],
    source: Callable[[], Backend],
    *,
    adopt: Callable[[Snapshot], Snapshot] | None = None,
    workers: int | None,
    threads: int,
    failure_score: float = 0.0,
    progress: bool | None = None,
    timeout: float | None = None,
    retries: int = 0,
    backoff: float = 0.5,
    max_errors: int | None = None,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    retry_errors: bool = False,
    epochs: int = 1,
    reducer: str | Mapping[str, str] = "mean",
    primary: str | None = None,
    group_by: GroupBy | None = None,
    items: Sequence[Any] | None = None,  # each like Examples: iterable of Items, .total
    sources: Mapping[str, str] | None = None,
    wrap: Callable[[Sink], Sink] | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> Results:
    """Run ``named`` configs (checked) on the workers ``source()`` gives; :func:`evaluate`'s core.

    ``source`` makes the scheduler's worker source: a new backend for a plain ``evaluate``
    (shut down at the end of the run), or a :class:`procval.Workers` pool's lease of its warm
    workers; ``adopt`` may replace a snapshot by an earlier one of the same content (a pool's,
    whose workers installed it). The options are ``evaluate``'s (counts checked by the caller).
    A rescore (:mod:`procval.run.rescore`) gives each config's work ``items`` instead of a
    ``dataset``, the rescored configs' ``sources`` (kept in the store), and ``wrap`` for the
    store's sink.
    """
    metric = metric_of(metric)
    for one in metric.metrics.values() if isinstance(metric, MetricSet) else [metric]:
        _check_callables(program, one)
    reducer = check_model(metric, primary, epochs, reducer)
    program = _dspy_way(program)
    _check_counts(workers, threads, retries, backoff, timeout, max_errors)
    _check_store_options(store, fresh, retry_errors)
    check_budgets(max_tokens, max_cost)
    limiter.check_limits(named)  # two configs giving one key different limits: refused now
    # with a store, a second row for an id is refused by the store: no id set in the parent
    data: Examples | None = None
    if items is None:
        data = Examples(
            dataset, passes=len(named), track_ids=store is None or retry_errors, group_by=group_by
        )
        items = [repeat(data, epochs)] * len(named)
    budgets = Budgets(named, max_tokens, max_cost, None if store is None else os.fspath(store))
    examples = budgets.gated([c.name for c in named], list(items))
    snapshots = [take_snapshot(c, program, metric) for c in named]
    if adopt is not None:
        snapshots = [adopt(s) for s in snapshots]
    options = WorkerOptions(
        threads=threads, retries=retries, backoff=backoff, parent_pid=os.getpid(), timeout=timeout
    )
    specs = [WorkerSpec(s, options, dict(c.env)) for s, c in zip(snapshots, named, strict=True)]
    scoring = {"epochs": epochs, "reducer": reducer, "primary": primary}
    sink = _open_sink(
        store, fresh, retry_errors, [c.name for c in named], workers, threads, scoring, sources
    )
    limits: list[limiter.Limiter] = []  # the run's limiter, once started (below)
    writer = sink if store is not None else None  # the store keeps the limit counts too
    if data is not None and data.grouped:  # innermost: the store and all who see rows get groups
        sink = GroupedSink(sink, data.group)
    sink = counted(budgets.wrap(sink), writer, lambda: limits[0].counts() if limits else None)
    sink = observed(sink if wrap is None else wrap(sink))
    sink = scrubbed(sink, named)  # outermost: env values leave every row before anyone sees it
    bars: Progress | None = None
    engine: Backend | None = None
    try:
        bars = Progress(
            [c.name for c in named], [e.total for e in examples], enabled=wanted(progress)
        )
        engine = source()
        scheduler = Scheduler(
            engine,
            specs,
            examples,
            sink,
            bars,
            RunOptions(
                workers=workers if workers is not None else _default_workers(engine),
                failure_score=float(failure_score),
                timeout=timeout,
                max_errors=max_errors,
                epochs=epochs,
                primary=primary,
                resume_hint=(
                    f"run again with store={os.fspath(store)!r} to resume (add "
                    "retry_errors=True to rerun the failed examples)"
                    if store
                    else ""
                ),
            ),
        )
    except BaseException:  # e.g. a store that refuses to resume: release what was opened
        if bars is not None:
            bars.close()
        sink.close(completed=False)  # and its lock: the next run must not find it taken
        if engine is not None:
            engine.shutdown()
        raise
    served = limiter.start(named, specs)  # before any worker starts: they are told its socket
    limits.extend([served] if served is not None else [])
    try:
        with frozen_heap():  # the collector passes over what the run allocates only
            results = scheduler.run()
    except ProcvalError as exc:  # TooManyErrors, SetupError: their results get the counts too
        limiter.stop(served, getattr(exc, "results", None) or {})
        raise
    except BaseException:
        limiter.stop(served, {})
        raise
    limiter.stop(served, results)
    return results


def _dspy_way(program: Any) -> Any:
    """A ``dspy.Module`` wrapped to be called as ``program(**example.inputs())``.

    DSPy is looked up in ``sys.modules``, never imported: a DSPy program means DSPy is loaded.
    """
    dspy = sys.modules.get("dspy")
    module = getattr(dspy, "Module", None)
    if not (isinstance(module, type) and isinstance(program, module)):
        return program
    from procval._dspy_call import wrap

    return wrap(program)


def _open_sink(
    store: str | os.PathLike[str] | None,
    fresh: bool,
    retry_errors: bool,
    names: list[str],
    workers: int | None,
    threads: int,
    scoring: Mapping[str, Any],
    sources: Mapping[str, str] | None = None,
) -> Sink:
    """The run's sink; a store's is locked (and its run options kept for the report)."""
    if store is None:
        return MemorySink(**scoring)
    from procval.store.writer import StoreSink

    run = {"workers": workers, "threads": threads}  # workers None: the backend's default
    epochs = scoring["epochs"]
    metric = {"reducer": scoring["reducer"], "primary": scoring["primary"]}
    return StoreSink(
        os.fspath(store),
        fresh=fresh,
        configs=names,
        retry_errors=retry_errors,
        run=run,
        epochs=epochs,
        metric=metric,
        sources=sources,
    )


def _default_workers(engine: Backend) -> int:
    default = getattr(engine, "default_workers", None)
    return int(default()) if callable(default) else int(loky.cpu_count())


def _backend(backend: str | Backend) -> Backend:
    if not isinstance(backend, str):
        return backend
    if backend == "loky":
        from procval.backends.loky import LokyBackend

        return LokyBackend()
    if backend == "ray":
        from procval.backends.ray import RayBackend

        return RayBackend()
    raise ValueError(f"backend must be 'loky', 'ray' or a Backend object, got {backend!r}")
