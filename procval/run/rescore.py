"""``rescore``: score a store's predictions with another metric, without calling any program.

::

    store ──stored_configs()──▶ check: configs, names, metric, reducer (before any worker)
      │                         config of each source: the one given, or rebuilt from the
      │                         store's description (its identity must be the stored one)
      └──stored_rows(config)──▶ WorkItem(index * epochs + epoch, id, Stored(example,
                                 prediction, type), epoch) ──▶ run_configs (the scheduler,
                                 a worker per config snapshot, as for evaluate)
                                     worker: Replay() rebuilds the prediction (no program
                                     call), OnStored(metric)(example, prediction) scores it
      rows ◀── _Unwrapped sink: the row's example, group (and a failed program's error) back
               from its Stored ──▶ the same store, as a new config (kind 'rescore', source)

The store never keeps a config's pickle: env values and a ``setup``'s captured values may be
secrets (the store holds their names and hashes only). So a rescore installs, in each worker,
either the :class:`~procval.Config` the caller passes (its identity must equal the stored one),
or the config rebuilt from the stored description (name, seed, values, and each env variable
from this process's environment when its value has the stored hash), used only when its
identity equals the stored one: a config with a ``setup`` must be passed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from procval._identity import digest
from procval.config import Config
from procval.errors import StoreError
from procval.results import EvaluationResult, Results, Row, RowError
from procval.run.api import Metric, _backend, run_configs
from procval.run.checks import _check_backend, _check_callables, _check_counts
from procval.run.scoring import check_model, metric_of
from procval.store.codec import RawJSON
from procval.store.sink import SinkWrapper
from procval.store.sources import StoredConfig, stored_configs, stored_rows
from procval.wire import WorkItem
from procval.worker.scoring import MetricSet
from procval.worker.stored import OnStored, Replay, Stored

__all__ = ["rescore"]

_FIX = (
    "pass the config itself: procval.rescore(store, metric, configs=[config]) "
    "(procval rescore STORE --task TASK)"
)


def rescore(
    store: str | os.PathLike[str],
    metric: Metric | Sequence[Metric] | Mapping[str, Metric],
    *,
    configs: Sequence[str | Config] | Mapping[str, Config] | None = None,
    name: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    primary: str | None = None,
    reducer: str | Mapping[str, str] = "mean",
    progress: bool | None = None,
    timeout: float | None = None,
    failure_score: float = 0.0,
    backend: Any = "loky",
) -> Results:
    """Score the predictions stored in ``store`` with ``metric``; no program is called.

    Each chosen config's rows (every epoch) are scored in worker processes that installed that
    config (env, seed, setup), as ``evaluate`` runs them, so a metric that calls an LLM judge is
    isolated the same way. The metric receives the stored example (a JSON object as a ``dict``
    that also answers attribute access) and the stored prediction rebuilt as its type
    (:mod:`procval.worker.stored`: a ``dspy.Prediction``, a dataclass, a tuple ...). A row
    whose program had failed keeps its error. The rows go into ``store`` as a new config
    (``kind='rescore'``, its source recorded), keeping each row's example id, epoch, group and
    prediction; the metric's usage (an LLM judge's tokens) is recorded as usual.

    Args:
        store: a run store holding predictions (``evaluate(..., store=)``, ``procval run``).
        metric: the new metric, as for :func:`procval.evaluate` (a callable, a list or a dict).
        configs: the configs to rescore: names, or :class:`~procval.Config` objects (or a
            ``{name: Config}`` mapping) that must equal the stored ones; default: every config
            of the store that is not itself a rescore. A config with a ``setup``, or with env
            variables not set here to the run's values, must be passed as a ``Config``.
        name: the name of the rescored config (only with one config); default
            ``"<config>+<metric name>"``.
        workers: worker processes in total (default: the CPU count).
        threads: examples scored at once in each worker (for a metric that calls an LLM).
        primary: with named scores, the one that is ``result.score``.
        reducer: how an example's epochs make its score, as for :func:`procval.evaluate`.
        progress: show progress bars on stderr (default: when stderr is a terminal).
        timeout: seconds the metric may take on one example.
        failure_score: the score of an example whose metric (or program) failed.
        backend: ``"loky"``, ``"ray"`` or a backend object.

    Returns:
        A :class:`procval.Results` mapping each rescored config's name to its result.

    Raises:
        StoreError: no store at ``store``, or a config name it does not hold.
        ValueError: before any worker starts: no predictions to score, a ``name`` that the
            store holds already, a config that cannot be rebuilt or differs from the stored
            one, bad counts, a reducer that does not fit the epochs.
        TypeError: a metric that is not callable as ``metric(example, prediction)``.
    """
    path = os.fspath(store)
    _check_counts(workers, threads, 0, 0.5, timeout, None)
    _check_backend(backend)
    stored = stored_configs(path)
    chosen = _chosen(path, stored, configs)
    checked = metric_of(metric)
    for one in checked.metrics.values() if isinstance(checked, MetricSet) else [checked]:
        _check_callables(Replay(), one)
    targets = _targets(path, stored, list(chosen), _label(checked), name)
    by_epochs: dict[int, list[str]] = {}
    for source in chosen:
        check_model(checked, primary, stored[source].epochs, reducer)
        by_epochs.setdefault(stored[source].epochs, []).append(source)
    results: dict[str, EvaluationResult] = {}
    for epochs, sources in by_epochs.items():  # one run per epoch count (usually one run)
        named = [dataclasses.replace(chosen[s], name=targets[s]) for s in sources]
        done = run_configs(
            named,
            Replay(),
            (),
            OnStored(checked),
            lambda: _backend(backend),
            workers=workers,
            threads=threads,
            failure_score=failure_score,
            progress=progress,
            timeout=timeout,
            store=path,
            epochs=epochs,
            reducer=reducer,
            primary=primary,
            items=[_Items(path, stored[s], epochs) for s in sources],
            sources={targets[s]: s for s in sources},
            wrap=_Unwrapped,
        )
        results.update(done)
    return Results(results)


def _chosen(
    path: str,
    stored: Mapping[str, StoredConfig],
    configs: Sequence[str | Config] | Mapping[str, Config] | None,
) -> dict[str, Config]:
    """``{source name: the Config to install}``, each checked against the store."""
    if isinstance(configs, Mapping):
        given: list[str | Config] = [
            dataclasses.replace(c, name=n) if c.name != n else c for n, c in configs.items()
        ]
    elif configs is None:
        given = [n for n, c in stored.items() if c.kind != "rescore"]
    elif isinstance(configs, str | Config):
        given = [configs]
    else:
        given = list(configs)
    if not stored:
        raise ValueError(f"the store {path} holds no configs to rescore; run a task into it first")
    if not given:
        raise ValueError(
            f"every config of {path} is a rescore; name the one to rescore again "
            "(configs=[NAME], procval rescore --config NAME)"
        )
    chosen: dict[str, Config] = {}
    for one in given:
        if not isinstance(one, str | Config):
            raise TypeError(f"configs must hold config names or procval.Config objects: {one!r}")
        source = one if isinstance(one, str) else one.name
        if source not in stored:
            raise StoreError(f"the store {path} has no config {source!r}; it has {list(stored)}")
        found = stored[source]
        if found.predictions == 0:
            why = (
                "it has no rows" if found.rows == 0
                else f"each of its {found.rows} rows is a failed program, with no prediction"
            )  # fmt: skip
            raise ValueError(
                f"config {source!r} of {path} has no predictions to rescore ({why}); "
                "run it first (procval run, or evaluate(..., store=))"
            )
        chosen[source] = _config_for(found, one if isinstance(one, Config) else None)
    return chosen


def _config_for(stored: StoredConfig, given: Config | None) -> Config:
    """The config to install for ``stored``: ``given``, or rebuilt from its description."""
    if given is not None:
        if stored.identity not in (given.identity(), given._identity_v1()):
            now, before = given.describe(), stored.description
            keys = (set(now) | set(before)) - {"run", "program"}
            changed = sorted(k for k in keys if now.get(k) != before.get(k))
            what = f" (its {', '.join(changed)} differ)" if changed else ""
            raise ValueError(
                f"the config {given.name!r} given differs from the one stored under that name"
                f"{what}; pass the config the run used, or leave it out to rebuild it from the "
                "store"
            )
        return given
    described = stored.description
    env: dict[str, str] = {}
    missing = []
    for key, hashed in (described.get("env") or {}).items():
        value = os.environ.get(key)
        if value is not None and digest(value.encode())[:12] == hashed:
            env[key] = value
        else:
            missing.append(key)
    rebuilt = Config(
        name=stored.name,
        env=env,
        seed=described.get("seed"),
        values=described.get("values") or {},
    )
    if stored.identity in (rebuilt.identity(), rebuilt._identity_v1()):
        return rebuilt
    if described.get("setup") is not None:
        why = "it has a setup, which the store does not keep (it may hold secrets)"
    elif missing:
        why = (
            f"its env {', '.join(missing)} is not set in this process to the value the run had "
            "(env values are never stored)"
        )
    else:
        why = "its stored description does not rebuild it"
    raise ValueError(f"config {stored.name!r} cannot be rebuilt from the store: {why}; {_FIX}")


def _label(metric: Any) -> str:
    """The metric's name in a default rescored config's name."""
    if isinstance(metric, MetricSet):
        return "+".join(metric.metrics)
    return str(getattr(metric, "__name__", type(metric).__name__))


def _targets(
    path: str,
    stored: Mapping[str, StoredConfig],
    sources: list[str],
    label: str,
    name: str | None,
) -> dict[str, str]:
    """``{source: rescored config name}``, none of which the store holds yet."""
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if len(sources) != 1:
            raise ValueError(
                f"name= (--as) names one rescored config, but {len(sources)} configs are "
                f"rescored ({', '.join(sources)}); choose one config, or leave the name out "
                f"(each is named CONFIG+{label})"
            )
    targets = {s: name if name is not None else f"{s}+{label}" for s in sources}
    for source, target in targets.items():
        if target in stored:
            raise ValueError(
                f"the store {path} has a config named {target!r} already; choose another name "
                f"for the rescore of {source!r} (name=, or procval rescore --as NAME)"
            )
    return targets


class _Items:
    """A config's stored rows as work items: ``seq = index * epochs + epoch``, as epochs do."""

    def __init__(self, path: str, stored: StoredConfig, epochs: int) -> None:
        self._path = path
        self._config = stored.name
        self._epochs = epochs
        self.total: int | None = stored.rows

    def __iter__(self) -> Iterator[WorkItem]:
        k = self._epochs
        for row in stored_rows(self._path, self._config):
            item = Stored(row.example, row.prediction, row.prediction_type, row.error, row.group)
            yield WorkItem(row.position * k + row.epoch, row.example_id, item, row.epoch)


class _Unwrapped(SinkWrapper):
    """Gives each rescored row its example and group (and a failed program's error) back."""

    def add(self, config: str, rows: list[Row]) -> None:
        """The rows, unwrapped, to the store."""
        self._sink.add(config, [_unwrap(row) for row in rows])


_set = object.__setattr__


def _unwrap(row: Row) -> Row:
    """``row`` with its example and group (and a failed program's error) from its Stored.

    In place: the row was just made by the scheduler's RowMaker and nobody else holds it yet
    (``dataclasses.replace`` would cost more than the rest of the row's way to the store).
    """
    stored = row.example
    if not isinstance(stored, Stored):
        return row
    _set(row, "example", RawJSON(stored.text))  # stored as it is, with the same hash
    _set(row, "group", stored.group)
    if stored.error is not None:  # the program had failed: its row as it was
        for field, value in (("prediction", None), ("error", RowError(*stored.error)),
                             ("scores", None), ("extra", None)):  # fmt: skip
            _set(row, field, value)
    return row
