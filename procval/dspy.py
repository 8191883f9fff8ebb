"""procval for DSPy users: ``from procval.dspy import Evaluate, snapshot``.

The public names of :mod:`procval.integrations.dspy`, importable as a module of their own (so
``import procval.dspy`` and ``from procval.dspy import Evaluate`` work, as does the attribute
``procval.dspy``). Importing it imports DSPy; without DSPy it raises an ``ImportError`` that
says ``pip install 'procval[dspy]'``. ``import procval`` alone never imports DSPy.
"""

from __future__ import annotations

from procval.integrations.dspy import (
    PER_CALL_SETTINGS,
    Evaluate,
    EvaluationResult,
    Scored,
    in_worker,
    snapshot,
)

__all__ = ["PER_CALL_SETTINGS", "Evaluate", "EvaluationResult", "Scored", "in_worker", "snapshot"]
