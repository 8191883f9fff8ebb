"""``Task``: a run bundled for the command line, and finding one from ``FILE.py:NAME``.

A task file is ordinary Python that builds a :class:`Task`::

    # tasks.py
    import procval

    def program(example): ...
    def metric(example, prediction): ...

    task = procval.Task(
        program,
        lambda: procval.read_jsonl("dev.jsonl"),  # called when the run starts
        metric,
        {"small": procval.Config(...), "large": procval.Config(...)},
        threads=8,
    )

and is run with ``procval run tasks.py:task --store runs.db``. Worker processes import the task
file by its module name to find the program and metric, so its top level should stay cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cloudpickle

from procval.config import Config
from procval.errors import TaskError
from procval.ratelimit import RateLimit, rate_limits
from procval.results import Results
from procval.run.api import Metric, Program, evaluate
from procval.run.frames import user_frame

__all__ = [
    "Task",
    "load_object",
    "load_task",
]


@dataclasses.dataclass(frozen=True)
class Task:
    """A program, a dataset, a metric and the configs to run them under.

    Args:
        program: called as ``program(example)`` in worker processes.
        dataset: an iterable of examples, or a function that returns one (called when a run
            starts, so that importing the task file stays cheap).
        metric: called as ``metric(example, prediction)``.
        configs: ``{name: Config}`` or a list of uniquely named configs (default: one
            ``Config()`` named ``"default"``).
        workers: default for ``evaluate(workers=)``; the command line's ``--workers`` wins.
        threads: default for ``evaluate(threads=)``.
        timeout: default for ``evaluate(timeout=)``.
        retries: default for ``evaluate(retries=)``.
        max_errors: default for ``evaluate(max_errors=)``.
        failure_score: the score of a failed example.
        rate_limit: a :class:`procval.RateLimit` (or a list) added to every config, replacing
            a config's own limit of the same key; the command line's ``--rate-limit`` is added
            on top (docs/rate-limits.md).
        epochs: default for ``evaluate(epochs=)``; the command line's ``--epochs`` wins.
        reducer: default for ``evaluate(reducer=)``.
        primary: default for ``evaluate(primary=)``; the command line's ``--primary`` wins.
        group_by: default for ``evaluate(group_by=)`` (a key, an attribute name or a function of
            the example); the command line's ``--group-by`` wins.
        max_tokens: default for ``evaluate(max_tokens=)``; ``--max-tokens`` wins (a config's
            own ``Config(max_tokens=)`` wins over both).
        max_cost: default for ``evaluate(max_cost=)``; ``--max-cost`` wins (likewise).

    Raises:
        TaskError: a program or metric that is not callable, or configs that are not Configs.
    """

    program: Program
    dataset: Iterable[Any] | Callable[[], Iterable[Any]]
    metric: Metric | Sequence[Metric] | Mapping[str, Metric]
    configs: Mapping[str, Config] | Sequence[Config] = dataclasses.field(
        default_factory=lambda: [Config()]
    )
    _: dataclasses.KW_ONLY
    workers: int | None = None
    threads: int = 1
    timeout: float | None = None
    retries: int = 0
    max_errors: int | None = None
    failure_score: float = 0.0
    rate_limit: RateLimit | Sequence[RateLimit] | None = None
    epochs: int = 1
    reducer: str | Mapping[str, str] = "mean"
    primary: str | None = None
    group_by: str | Callable[[Any], Any] | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        if not callable(self.program):
            raise TaskError(f"Task program must be callable, got {type(self.program).__name__}")
        if not callable(self.metric) and not isinstance(self.metric, Mapping | list | tuple):
            raise TaskError(
                "Task metric must be callable, or a list or dict of metrics, got "
                f"{type(self.metric).__name__}"
            )
        self.config_map()  # validates

    def config_map(self) -> dict[str, Config]:
        """The configs by name, in order.

        Raises:
            TaskError: configs that are not Configs, or names used twice.
        """
        configs: Any = self.configs
        items: list[tuple[Any, Any]]
        if isinstance(configs, Mapping):
            items = list(configs.items())
        elif isinstance(configs, Sequence) and not isinstance(configs, str):
            items = [(getattr(c, "name", None), c) for c in configs]
        else:
            raise TaskError("Task configs must be a mapping {name: Config} or a list of Configs")
        named: dict[str, Config] = {}
        for name, config in items:
            if not isinstance(config, Config):
                raise TaskError(f"Task configs must be procval.Config, got {type(config).__name__}")
            if not isinstance(name, str) or name in named:
                raise TaskError(f"Task config names must be unique strings; {name!r} is not")
            named[name] = config if config.name == name else dataclasses.replace(config, name=name)
        if not named:
            raise TaskError("Task configs is empty: give at least one Config")
        return named

    def examples(self, limit: int | None = None) -> Iterable[Any]:
        """The dataset (calling ``dataset`` if it is a function), cut to ``limit`` examples.

        The cut is lazy: a generator stays a generator, a re-iterable stays re-iterable.

        Raises:
            TaskError: the dataset function raised (the message names the user's file and line;
                the original exception is the cause).
        """
        try:
            data = self.dataset() if callable(self.dataset) else self.dataset
        except Exception as exc:
            raise TaskError(f"the task's dataset function failed: {_describe(exc)}") from exc
        if limit is None:
            return data
        if iter(data) is data:  # a one-shot iterator
            return itertools.islice(data, limit)
        return _Head(data, limit)

    def evaluate(
        self, *, only: Sequence[str] | None = None, limit: int | None = None, **options: Any
    ) -> Results:
        """Run the task with :func:`procval.evaluate`; ``options`` override the task's defaults.

        Args:
            only: the names of the configs to run (default: all).
            limit: evaluate only the first ``limit`` examples.
            **options: keywords of :func:`procval.evaluate` (``store``, ``workers``, ...); a
                value of None keeps the task's default. ``rate_limit`` (a RateLimit or a list)
                is added to the task's and the configs' limits, replacing those of its keys.

        Returns:
            The :class:`procval.Results` mapping of config name to result.

        Raises:
            TaskError: a name in ``only`` that the task does not have.
        """
        configs = self.config_map()
        if only:
            unknown = [name for name in only if name not in configs]
            if unknown:
                raise TaskError(f"the task has no config {unknown[0]!r}; it has {list(configs)}")
            configs = {name: configs[name] for name in dict.fromkeys(only)}
        if limit is not None and limit < 1:
            raise TaskError(f"limit must be at least 1, got {limit}")
        extra = rate_limits(self.rate_limit) + rate_limits(options.pop("rate_limit", None))
        if extra:
            configs = {name: _with_limits(c, extra) for name, c in configs.items()}
        defaults = {
            "workers": self.workers,
            "threads": self.threads,
            "timeout": self.timeout,
            "retries": self.retries,
            "max_errors": self.max_errors,
            "failure_score": self.failure_score,
            "epochs": self.epochs,
            "reducer": self.reducer,
            "primary": self.primary,
            "group_by": self.group_by,
            "max_tokens": self.max_tokens,
            "max_cost": self.max_cost,
        }
        merged = {**defaults, **{k: v for k, v in options.items() if v is not None}}
        return evaluate(self.program, self.examples(limit), self.metric, configs=configs, **merged)


def _with_limits(config: Config, extra: tuple[RateLimit, ...]) -> Config:
    """``config`` with the limits of ``extra`` (later ones win for a key named twice)."""
    by_key = {limit.key: limit for limit in (*config.rate_limits, *extra)}
    return dataclasses.replace(config, rate_limit=tuple(by_key.values()))


class _Head:
    """The first ``n`` examples of a re-iterable dataset, itself re-iterable and lazy."""

    def __init__(self, data: Iterable[Any], n: int) -> None:
        self._data = data
        self._n = n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self._data), self._n)

    def __len__(self) -> int:
        try:
            return min(len(self._data), self._n)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("length unknown") from None


def load_task(reference: str) -> Task:
    """The :class:`Task` that ``reference`` names: ``path/to/file.py:name`` or ``module:name``.

    Without ``:name``, the task is the one called ``task``. A file's folder is put first on
    ``sys.path`` (as ``python file.py`` does) so that worker processes can import it.

    Raises:
        TaskError: no such file or module, no such name in it, the name is not a Task, or the
            file raised while it was imported (the message has the file and line).
    """
    where, _, name = reference.rpartition(":")
    if not where or os.sep in name or name.endswith(".py"):
        where, name = reference, "task"
    if where.endswith(".py") or os.sep in where or (os.altsep and os.altsep in where):
        module = _import_file(where)
    else:
        module = _import_module(where)
    if not hasattr(module, name):
        found = [k for k, v in vars(module).items() if isinstance(v, Task)]
        hint = f"; it defines Tasks named {', '.join(found)}" if found else ""
        raise TaskError(f"{where} has no attribute {name!r}{hint}")
    task = getattr(module, name)
    if not isinstance(task, Task):
        raise TaskError(f"{where}:{name} is of type {type(task).__name__}, not a procval.Task")
    return task


def load_object(reference: str, default: str) -> Any:
    """What ``reference`` names, as :func:`load_task` finds a task (``--metric path.py:fn``).

    Without ``:name``, the object is the one called ``default``.

    Raises:
        TaskError: no such file or module, no such name in it, or the import raised.
    """
    where, _, name = reference.rpartition(":")
    if not where or os.sep in name or name.endswith(".py"):
        where, name = reference, default
    if where.endswith(".py") or os.sep in where or (os.altsep and os.altsep in where):
        module = _import_file(where)
    else:
        module = _import_module(where)
    if not hasattr(module, name):
        raise TaskError(f"{where} has no attribute {name!r}; pass {where}:NAME")
    return getattr(module, name)


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise TaskError(f"task file {path} does not exist")
    path = os.path.abspath(path)
    folder, module_name = os.path.split(path[: -len(".py")] if path.endswith(".py") else path)
    existing = sys.modules.get(module_name)
    if existing is not None:
        if os.path.abspath(getattr(existing, "__file__", "") or "") == path:
            return existing
        raise TaskError(
            f"task file {path} is named like the module {module_name!r} that is already "
            "imported; rename the file"
        )
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if not isinstance(exc, Exception):
            raise
        raise TaskError(f"importing task file {path} failed: {_describe(exc)}") from exc
    # Ship the file's code by value: workers then need neither the file nor its folder (a
    # remote Ray node has neither), its top level does not run again in each worker, and its
    # functions share one copy of its globals there, as they do in one process.
    cloudpickle.register_pickle_by_value(module)
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like python -m: modules in the current folder
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise TaskError(
                f"no task module {name!r}: {exc}; pass a module on sys.path or a FILE.py path"
            ) from exc
        raise TaskError(f"importing task module {name!r} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise TaskError(f"importing task module {name!r} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)``, the line being the innermost frame in the user's code."""
    frame = user_frame(exc.__traceback__)  # not procval's, e.g. read_jsonl's, nor importlib's
    where = f" ({frame.filename}:{frame.lineno})" if frame else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"
