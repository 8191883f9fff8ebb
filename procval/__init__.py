"""procval: evaluate a program over a dataset with a metric, one process pool per config.

Each config runs in worker processes that installed a pickled snapshot of it at start, and a
process never serves two configs: global state cannot leak between the models you compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from procval._api import Metric, Program, evaluate
from procval._dataset import read_jsonl
from procval._worker import current_config, rng
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
    StoreMismatchError,
    TaskError,
    TooManyErrors,
    UnalignedResultsError,
)
from procval.results import EvaluationResult, Results, Row, RowError
from procval.store import load
from procval.task import Task

if TYPE_CHECKING:
    from types import ModuleType

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


def __getattr__(name: str) -> ModuleType | Any:
    """Import optional integrations (``procval.dspy``) only when first used."""
    if name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(_LAZY_MODULES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'procval' has no attribute {name!r}")
