"""procval: evaluate a program over a dataset with a metric, one process pool per config.

Each config runs in worker processes that installed a pickled snapshot of it at start, and a
process never serves two configs: global state cannot leak between the models you compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Only what a worker process needs is imported eagerly: every worker imports this package (it
# runs procval._worker), and its start-up time is part of every evaluate() call. The parent-side
# modules (scheduler, progress bars with tqdm, the store with sqlite3, ...) load on first use.
from procval._worker import current_config, rng

# eager, although parent-side: the function `compare` shares its name with its module, and a
# later first import of the module would make `procval.compare` the module instead
from procval.compare import Comparison, ComparisonTable, Interval, compare
from procval.config import Config
from procval.errors import (
    IsolationError,
    NoRetry,
    NotInWorkerError,
    ProcvalError,
    ProgramChangedWarning,
    SetupError,
    SnapshotError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    TaskError,
    TooManyErrors,
    UnalignedResultsError,
)

if TYPE_CHECKING:
    from types import ModuleType

    from procval._api import Metric, Program, evaluate
    from procval._dataset import read_jsonl
    from procval.results import EvaluationResult, Results, Row, RowError
    from procval.store import load
    from procval.task import Task

__version__ = "0.1.0"

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
    "Results",
    "Row",
    "RowError",
    "SetupError",
    "SnapshotError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "TaskError",
    "Task",
    "TooManyErrors",
    "UnalignedResultsError",
    "compare",
    "current_config",
    "evaluate",
    "load",
    "read_jsonl",
    "rng",
]

_LAZY_MODULES = {"dspy": "procval.integrations.dspy"}
_LAZY_NAMES = {
    "Metric": "procval._api",
    "Program": "procval._api",
    "evaluate": "procval._api",
    "read_jsonl": "procval._dataset",
    "EvaluationResult": "procval.results",
    "Results": "procval.results",
    "Row": "procval.results",
    "RowError": "procval.results",
    "load": "procval.store",
    "Task": "procval.task",
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
