"""procval for DSPy users: ``from procval.dspy import Evaluate, snapshot``.

The public names of :mod:`procval.integrations.dspy`, importable as a module of their own (so
``import procval.dspy`` and ``from procval.dspy import Evaluate`` work, as does the attribute
``procval.dspy``). Importing it imports DSPy; without DSPy it raises an ``ImportError`` that
says ``pip install 'procval[dspy]'``. ``import procval`` alone never imports DSPy.
"""

from __future__ import annotations

# The caller's side of a run (the pool, the scheduler, the loky backend) loads with the caller's
# module, not at the first call: procval.integrations.dspy, which DSPy workers and their fork
# server import, imports it lazily.
import procval.backends.loky
import procval.run.pool  # noqa: F401
from procval.integrations.dspy import (
    PER_CALL_SETTINGS,
    Evaluate,
    EvaluationResult,
    Scored,
    in_worker,
    snapshot,
)

__all__ = ["PER_CALL_SETTINGS", "Evaluate", "EvaluationResult", "Scored", "in_worker", "snapshot"]
