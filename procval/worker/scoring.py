"""What a metric returned, as a row's scores: one number, named numbers, or a score with extras.

A metric may return (checked in this order):

- a bool, an int or a float (or a numpy bool): the row's one score (the common case, fastest);
- a mapping of score names to numbers (``{"em": 1, "f1": 0.5}``): named scores; the primary one
  is the key ``score`` if there is one, else the first (``evaluate(..., primary=)`` chooses in
  the parent); a value may also be an object with a ``score`` (below), its other fields going
  to ``extra[name]``;
- an object with a ``score`` attribute or key, such as DSPy 3's ``dspy.Prediction(score=0.8,
  feedback="...")``: ``score`` is the score, the other fields go to ``extra`` (as JSON values).

Every score must be finite. Several metrics given together (``metric=[em, f1]`` or
``metric={"em": em, "f1": f1}``) become one :class:`MetricSet`, whose value is the mapping of
each metric's name to what it returned. This module runs in the workers: it stays light.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MetricSet", "MetricTypeError", "NonFiniteScore", "outcome", "score_of"]

Scores = dict[str, float]


class MetricTypeError(TypeError):
    """A metric returned something other than a bool or a real number."""


class NonFiniteScore(ValueError):
    """A metric returned NaN or an infinity: the example gets an error row, not that score."""


def outcome(value: Any) -> tuple[float, Scores | None, dict[str, Any] | None]:
    """``(score, scores, extra)`` of what a metric returned (see the module docstring).

    ``scores`` is None when the metric gave one score (a number, or an object whose only score
    is ``score``); ``extra`` is None when there is nothing besides scores.

    Raises:
        MetricTypeError: the value is none of the shapes above, or a score is not a number.
        NonFiniteScore: a score is NaN or infinite.
    """
    if type(value) is dict and "score" not in value:  # named scores, without the ABC checks
        return _named(value)
    if isinstance(value, bool | numbers.Real):
        return score_of(value), None, None
    if isinstance(value, MetricValues):
        return _named(value)
    if isinstance(value, Mapping) and ("score" not in value or all(map(_number, value.values()))):
        return _named(value)
    fields = _fields(value)
    if fields is None or "score" not in fields:
        return score_of(value), None, None  # a numpy bool, or a MetricTypeError
    extra = {k: _jsonable(v) for k, v in fields.items() if k != "score"}
    return score_of(fields["score"], "score"), None, extra or None


def _named(values: Mapping[Any, Any]) -> tuple[float, Scores | None, dict[str, Any] | None]:
    if not values:
        raise MetricTypeError("metric returned an empty mapping; it must hold at least one score")
    scores: Scores = {}
    extra: dict[str, Any] = {}
    isfinite = math.isfinite
    for name, value in values.items():
        if type(name) is not str and not isinstance(name, str):
            raise MetricTypeError(f"metric returned a score named {name!r}; names must be str")
        if type(value) is float and isfinite(value):  # the common case, without the checks
            scores[name] = value
            continue
        if isinstance(value, bool | numbers.Real):
            scores[name] = score_of(value, name)
            continue
        fields = _fields(value)
        if fields is None or "score" not in fields:
            scores[name] = score_of(value, name)  # a numpy bool, or a MetricTypeError
            continue
        scores[name] = score_of(fields["score"], name)
        rest = {k: _jsonable(v) for k, v in fields.items() if k != "score"}
        if rest:
            extra[name] = rest
    primary = scores["score"] if "score" in scores else next(iter(scores.values()))
    return primary, None if list(scores) == ["score"] else scores, extra or None


def _number(value: Any) -> bool:
    if isinstance(value, bool | numbers.Real):
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.bool_)


def score_of(value: Any, name: str = "") -> float:
    """One score as a float: a bool, a real number, or a numpy bool; finite.

    A NaN or infinite score would turn the config's mean into NaN or inf while its error count
    stays 0, so it raises :class:`NonFiniteScore`: the example becomes an error row (its
    prediction kept), counted and shown by the summary, report and comparison.
    """
    if isinstance(value, bool | numbers.Real):
        score = float(value)
    else:
        what = f"score {name!r}" if name and name != "score" else "metric"
        numpy = sys.modules.get("numpy")  # a numpy bool is not a numbers.Real
        if numpy is None or not isinstance(value, numpy.bool_):
            raise MetricTypeError(
                f"{what} returned a {type(value).__module__}.{type(value).__qualname__} "
                f"({value!r:.80}); it must return a bool, int or float, a mapping of score "
                "names to numbers, or an object with a 'score' (dspy.Prediction(score=...))"
            )
        score = float(bool(value))
    if not math.isfinite(score):
        what = f"score {name!r}" if name and name != "score" else "metric"
        raise NonFiniteScore(
            f"{what} returned {score!r} for this example; a metric must return a finite number "
            "(return 0.0, or raise, for an example it cannot score)"
        )
    return score


def _fields(value: Any) -> dict[str, Any] | None:
    """The fields of a score-holding object (a mapping, a ``dspy.Prediction``), or None."""
    if isinstance(value, Mapping):
        return dict(value)
    to_dict = getattr(value, "toDict", None) or getattr(value, "to_dict", None)
    if callable(to_dict) and hasattr(value, "score"):
        try:
            found = to_dict()
        except Exception:
            found = None
        if isinstance(found, Mapping):
            return {"score": value.score, **{k: v for k, v in found.items() if k != "score"}}
    if hasattr(value, "score") and hasattr(value, "__dict__"):
        public = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return {**public, "score": value.score}
    return None


def _jsonable(value: Any) -> Any:
    from procval._convert import to_jsonable

    return to_jsonable(value)


class MetricValues(dict[str, Any]):
    """What a :class:`MetricSet` returns: each metric's name and value (read as named scores)."""


class MetricSet:
    """Several metrics as one: called as a metric, it returns each metric's value by name.

    Args:
        metrics: the metrics by name, in order (the first is the primary score by default).
    """

    def __init__(self, metrics: Mapping[str, Callable[[Any, Any], Any]]) -> None:
        self.metrics = dict(metrics)

    def __call__(self, example: Any, prediction: Any) -> Any:
        """Each metric's value, by name; a coroutine if a metric returned an awaitable."""
        values = MetricValues((n, m(example, prediction)) for n, m in self.metrics.items())
        if any(inspect.isawaitable(v) for v in values.values()):
            return self._gather(values)
        return values

    async def _gather(self, values: MetricValues) -> MetricValues:
        for name, value in values.items():
            if inspect.isawaitable(value):
                values[name] = await value
        return values

    def __repr__(self) -> str:
        return f"MetricSet({list(self.metrics)})"
