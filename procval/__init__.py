"""procval: evaluate a program over a dataset with a metric, one process pool per config.

Each config runs in worker processes that installed a pickled snapshot of it at start, and a
process never serves two configs: global state cannot leak between the models you compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Only what a worker process needs is imported eagerly: every worker imports this package (it
# runs procval.worker.runtime), and its start-up time is part of every evaluate() call. The
# parent-side modules (the run, the store with sqlite3, the report) load on first use.
from procval._version import __version__ as __version__
from procval.config import Config
from procval.errors import (
    IsolationError,
    NoRetry,
    NotInWorkerError,
    ProcvalError,
    ProgramChangedWarning,
    SetupError,
    SnapshotError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
    StoreMismatchError,
    TaskError,
    TooManyErrors,
    UnalignedResultsError,
)
from procval.ratelimit import RateLimit
from procval.worker.limited import limited
from procval.worker.runtime import current_config, rng
from procval.worker.usage import record_usage

if TYPE_CHECKING:
    from types import ModuleType

    from procval.report.compare import Comparison, ComparisonTable, Interval, compare
    from procval.results import EvaluationResult, Results, Row, RowError
    from procval.run.api import Metric, Program, evaluate
    from procval.run.dataset import read_jsonl
    from procval.run.pool import Workers
    from procval.run.rescore import rescore
    from procval.store.readers import load
    from procval.task import Task
    from procval.usage import Usage


__all__ = [
    "Comparison",
    "ComparisonTable",
    "Config",
    "EvaluationResult",
    "Interval",
    "IsolationError",
    "Metric",
    "NoRetry",
    "NotInWorkerError",
    "ProcvalError",
    "Program",
    "ProgramChangedWarning",
    "RateLimit",
    "Results",
    "Row",
    "RowError",
    "SetupError",
    "SnapshotError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMismatchError",
    "TaskError",
    "Task",
    "TooManyErrors",
    "UnalignedResultsError",
    "Usage",
    "Workers",
    "compare",
    "current_config",
    "evaluate",
    "limited",
    "load",
    "read_jsonl",
    "record_usage",
    "rescore",
    "rng",
]

_LAZY_MODULES = {"dspy": "procval.dspy"}
_LAZY_NAMES = {
    "Comparison": "procval.report.compare",
    "ComparisonTable": "procval.report.compare",
    "Interval": "procval.report.compare",
    "compare": "procval.report.compare",
    "Metric": "procval.run.api",
    "Program": "procval.run.api",
    "evaluate": "procval.run.api",
    "read_jsonl": "procval.run.dataset",
    "EvaluationResult": "procval.results",
    "Results": "procval.results",
    "Row": "procval.results",
    "RowError": "procval.results",
    "Usage": "procval.usage",
    "load": "procval.store.readers",
    "Task": "procval.task",
    "Workers": "procval.run.pool",
    "rescore": "procval.run.rescore",
}


def __getattr__(name: str) -> ModuleType | Any:
    """Import parent-side names and optional integrations (``procval.dspy``) on first use."""
    import importlib

    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(_LAZY_MODULES[name])
    else:
        raise AttributeError(f"module 'procval' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
