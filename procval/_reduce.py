"""Epoch reducers: one score per example from the scores of its epochs.

``evaluate(..., epochs=k, reducer=...)`` runs each example ``k`` times; a reducer turns the ``k``
values of a score into the example's value:

- ``"mean"`` (default), ``"max"``, ``"median"``;
- ``"mode"``: the most frequent value (majority vote; a tie goes to the value seen first);
- ``"pass@k"``: the unbiased estimate of the chance that at least one of ``k`` epochs drawn
  from the ``n`` run succeeds, ``1 - C(n - c, k) / C(n, k)`` with ``c`` successes (0/1 scores);
- ``"pass^k"``: the chance that all ``k`` drawn succeed, ``C(c, k) / C(n, k)`` (0/1 scores).

``reducer`` is one name for every score, or a mapping of score name to name (the unnamed score
is ``"score"``; a score not in it is averaged).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from procval.results import Row

Reducer = str | Mapping[str, str]

_PLAIN = ("mean", "max", "median", "mode")
_PASS = re.compile(r"pass([@^])(\d+)$")


def check_reducer(reducer: Reducer, epochs: int) -> Reducer:
    """``reducer`` if it fits ``epochs``; raises before any worker starts otherwise.

    Raises:
        ValueError: an unknown reducer name, or ``pass@k`` / ``pass^k`` with ``k`` < 1 or
            ``k`` > ``epochs``.
        TypeError: ``reducer`` is neither a str nor a mapping of str to str.
    """
    if isinstance(reducer, str):
        _check_name(reducer, epochs, "reducer")
        return reducer
    if not isinstance(reducer, Mapping):
        raise TypeError(
            f"reducer must be a name ('mean', 'pass@2', ...) or a mapping of score name to "
            f"name, got {type(reducer).__name__}"
        )
    for name, how in reducer.items():
        if not isinstance(name, str) or not isinstance(how, str):
            raise TypeError(f"reducer maps score names to reducer names, got {name!r}: {how!r}")
        _check_name(how, epochs, f"reducer[{name!r}]")
    return dict(reducer)


def _check_name(how: str, epochs: int, what: str) -> None:
    if how in _PLAIN:
        return
    found = _PASS.match(how)
    if found is None:
        raise ValueError(
            f"{what} {how!r} is not a reducer; use one of 'mean', 'max', 'median', 'mode', "
            "'pass@K' or 'pass^K' (K a number of epochs)"
        )
    k = int(found.group(2))
    if not 1 <= k <= epochs:
        raise ValueError(
            f"{what} {how!r} needs {k} epochs per example but the run has epochs={epochs}; "
            f"pass epochs={max(k, 1)} or more, or a smaller K"
        )


def reducer_of(reducer: Reducer, name: str) -> str:
    """The reducer name for score ``name``."""
    if isinstance(reducer, str):
        return reducer
    return reducer.get(name, "mean")


def reduce(how: str, values: Sequence[float], *, score: str, example_id: object) -> float:
    """One example's value of a score from its epochs' values.

    Raises:
        ValueError: ``pass@k`` or ``pass^k`` on a value other than 0 and 1, or on fewer epochs
            than ``k``.
    """
    if len(values) == 1 and how in _PLAIN:
        return values[0]
    if how == "mean":
        return math.fsum(values) / len(values)
    if how == "max":
        return max(values)
    if how == "median":
        return float(statistics.median(values))
    if how == "mode":
        return Counter(values).most_common(1)[0][0]
    found = _PASS.match(how)
    assert found is not None  # checked by check_reducer
    k, n = int(found.group(2)), len(values)
    wrong = [v for v in values if v not in (0.0, 1.0)]
    if wrong:
        raise ValueError(
            f"reducer {how!r} needs 0/1 scores, but score {score!r} of example {example_id!r} "
            f"is {wrong[0]!r}; use 'mean' (or a mapping reducer={{{score!r}: 'mean'}}) for it"
        )
    if n < k:
        raise ValueError(
            f"reducer {how!r} needs {k} epochs of example {example_id!r}, which has {n} rows; "
            "finish the run (resume it) or use a smaller K"
        )
    c = int(sum(values))
    if found.group(1) == "@":
        return 1.0 - math.comb(n - c, k) / math.comb(n, k)
    return math.comb(c, k) / math.comb(n, k)


def by_example(rows: Iterable[Row]) -> Iterator[list[Row]]:
    """The rows of each example together (rows in dataset order, epochs in order)."""
    group: list[Row] = []
    for row in rows:
        if group and row.index != group[0].index:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def reduce_rows(rows: Iterable[Row], reducer: Reducer, primary: str) -> list[Row]:
    """One row per example: its first epoch's row with each score reduced over its epochs.

    The reduced row's ``error`` is None when any epoch succeeded (a failed epoch counts with its
    ``failure_score``), else the first epoch's error.

    Raises:
        ValueError: see :func:`reduce`.
    """
    reduced = []
    for group in by_example(rows):
        first = group[0]
        if len(group) == 1:
            reduced.append(first)
            continue
        eid = first.example_id
        names = next((list(r.scores) for r in group if r.scores), [])
        scores = {
            name: reduce(
                reducer_of(reducer, name),
                [r.scores[name] if r.scores else r.score for r in group],
                score=name,
                example_id=eid,
            )
            for name in names
        }
        if primary in scores:
            score = scores[primary]
        else:
            values = [r.score for r in group]
            score = reduce(reducer_of(reducer, primary), values, score=primary, example_id=eid)
        ok = any(r.error is None for r in group)
        reduced.append(
            dataclasses.replace(
                first, score=score, scores=scores or None, error=None if ok else first.error
            )
        )
    return reduced
