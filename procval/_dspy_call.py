"""Calling a DSPy program the DSPy way when ``procval.evaluate`` is given one.

``procval.evaluate`` calls ``program(example)``; DSPy calls a ``dspy.Module`` (``dspy.Predict``,
``dspy.ChainOfThought``, your own module) as ``program(**example.inputs())``, and a
``dspy.Predict`` refuses positional arguments. So :func:`procval.evaluate` wraps a
``dspy.Module`` in :class:`DSPyCall`, which calls it as ``dspy.Evaluate`` does. Only imported
when DSPy is already imported (``procval.evaluate`` looks in ``sys.modules``).
"""

from __future__ import annotations

import json
from typing import Any

import dspy

from procval._convert import to_jsonable
from procval._identity import describe_callable

# Module attributes that change from process to process (``stage``: random bytes per Predict)
# or as the program is used (``history``): not part of what the program is.
_UNSTABLE = frozenset({"stage", "history", "callbacks"})


class DSPyCall:
    """``program(**example.inputs())`` for a ``dspy.Example``, else ``program(example)``.

    A plain dict is not unpacked: which of its keys are inputs (and which are labels) only a
    ``dspy.Example`` built with ``with_inputs(...)`` knows. Picklable (it holds the program);
    its ``repr`` (which procval hashes into the program's identity, kept in a run store) leaves
    out what DSPy makes different in every process, so that resuming a store does not warn that
    the program changed.
    """

    __slots__ = ("program",)

    def __init__(self, program: Any) -> None:
        self.program = program

    def __call__(self, example: Any) -> Any:
        """Run the program on one example, as ``dspy.Evaluate`` would."""
        if isinstance(example, dspy.Example):
            return self.program(**example.inputs())
        return self.program(example)

    def __repr__(self) -> str:
        return f"DSPyCall({json.dumps(_describe(self.program), sort_keys=True, default=repr)})"


def _describe(value: Any, depth: int = 0) -> Any:
    """A ``dspy.Module``'s class, ``forward`` code and attributes, without per-process state."""
    if depth > 10 or not isinstance(value, dspy.Module):
        return to_jsonable(value)
    kind = type(value)
    return {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "forward": describe_callable(getattr(kind, "forward", None)),
        "state": {
            name: _describe(item, depth + 1)
            for name, item in vars(value).items()
            if name not in _UNSTABLE and not name.startswith("_")
        },
    }


def wrap(program: Any) -> Any:
    """``DSPyCall(program)`` for a ``dspy.Module``, the program itself otherwise."""
    return DSPyCall(program) if isinstance(program, dspy.Module) else program
