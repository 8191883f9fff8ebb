"""How procval.dspy runs a DSPy program on one example, and reads a row back as DSPy does.

``_Program`` and ``Scored`` travel in snapshots, so workers import this module (not all of
:mod:`procval.integrations.dspy`); the devset and row helpers are the caller's.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

from procval._row import Row
from procval.integrations import _dspy_observe as _observe
from procval.run.dataset import example_id

__all__ = ["Scored"]


@dataclass(frozen=True)
class _ByPosition:
    """An example sent under its position: for devsets whose ``id`` fields procval cannot use.

    procval identifies an example by its ``id`` field (ints or strings, unique) or else by
    position. DSPy does not care about ``id``, so a devset with duplicate or non-scalar ids
    is sent wrapped, numbered by position.
    """

    position: int
    example: Any

    @property
    def id(self) -> int:
        """The example's position in the devset."""
        return self.position


def _dataset(devset: list[Any]) -> list[Any]:
    seen: set[int | str] = set()
    for index, example in enumerate(devset):
        try:
            eid = example_id(example, index)
        except TypeError:
            break
        if eid in seen:
            break
        seen.add(eid)
    else:
        return devset
    return [_ByPosition(i, example) for i, example in enumerate(devset)]


def _unwrap(example: Any) -> Any:
    return example.example if isinstance(example, _ByPosition) else example


@dataclass(frozen=True)
class Scored:
    """What a worker returns for one example (a row's ``prediction``).

    DSPy runs the program and the metric as one step, and keeps the metric's value as returned
    (a bool, a number, a ``dspy.Prediction(score=..., feedback=...)``); so does procval.dspy.

    Attributes:
        prediction: what ``program(**example.inputs())`` returned.
        score: what ``metric(example, prediction)`` returned; the row's score is its float.
    """

    prediction: Any
    score: Any


class _Program:
    """Runs a DSPy program and its metric as DSPy's Evaluate does, on one example."""

    def __init__(self, program: Callable[..., Any], metric: Callable[..., Any]) -> None:
        self.program = program
        self.metric = metric
        self.watched = False

    def __call__(self, example: Any) -> Scored:
        if not self.watched:  # once per worker: name the program's modules and LMs for replay
            _observe.watch(self.program, _observe.current_token())
            self.watched = True
        example = _unwrap(example)
        # each example its own trace, as DSPy's optimizers run one (unless tracing is off):
        # DSPy's default is one list per process, which every call of every thread appends to
        # (up to 10,000 predictor calls, with their inputs and predictions), never read here
        traced = dspy.settings.trace is not None
        with dspy.context(trace=[]) if traced else contextlib.nullcontext():
            prediction = self.program(**example.inputs())
            return Scored(prediction, self.metric(example, prediction))


def _score(example: Any, scored: Scored) -> Any:
    """The row's score: the metric's value, through ``float()`` unless a bool or a number."""
    value = scored.score
    if isinstance(value, bool | numbers.Real):
        return value
    try:
        return float(value)  # e.g. dspy.Prediction(score=..., feedback=...)
    except (TypeError, ValueError):
        return value  # procval records the wrong type as the row's error


def _result(row: Row) -> tuple[Any, Any]:
    """``(prediction, metric value)`` of a row, as DSPy's results tuples hold them."""
    if row.error is not None:
        return dspy.Prediction(), row.score
    scored = row.prediction
    if isinstance(scored, Scored):
        return scored.prediction, scored.score
    # A row read back from a run store holds JSON: {"prediction": {...}, "score": ...}, where a
    # dspy.Prediction is the dict of its fields.
    stored = scored if isinstance(scored, dict) else {"prediction": scored}
    prediction, value = stored.get("prediction"), stored.get("score", row.score)
    if isinstance(prediction, dict):
        prediction = dspy.Prediction(**prediction)
    if isinstance(value, dict):
        value = dspy.Prediction(**value)
    elif not isinstance(value, bool | numbers.Real):
        value = row.score
    return prediction, value
