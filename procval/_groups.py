"""Scores by group: a result split by its rows' ``group`` (``evaluate(..., group_by=)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from procval.results import EvaluationResult, Results, Row


def group_names(result: EvaluationResult) -> list[str]:
    """The groups of ``result``'s rows, sorted (``[]`` without groups); a store answers alone."""
    ask = getattr(result._load, "group_names", None)
    if result._rows is None and callable(ask):
        found: list[str] = ask()
        return found
    return sorted({row.group for row in result.rows if row.group is not None})


def by_group(result: EvaluationResult) -> dict[str, EvaluationResult]:
    """:meth:`procval.EvaluationResult.by_group` (each made as ``type(result)``)."""
    rows: dict[str, list[Row]] = {}
    for row in result.rows:
        if row.group is not None:
            rows.setdefault(row.group, []).append(row)
    if not rows:
        raise ValueError(
            f"config {result.config!r} has no groups: its rows were made without group_by "
            "(pass evaluate(..., group_by=KEY) or procval run --group-by KEY)"
        )
    return {
        name: type(result)(
            result.config,
            rows[name],
            duration=result.duration,
            fingerprint=result.fingerprint,
            epochs=result.epochs,
            reducer=result._reducer,
            primary=result._primary,
        )
        for name in sorted(rows)
    }


def results_by_group(
    results: Mapping[str, EvaluationResult],
    make: Callable[[Mapping[str, EvaluationResult]], Results],
) -> dict[str, Results]:
    """:meth:`procval.Results.by_group`: ``make`` is :class:`procval.Results`."""
    split = {name: by_group(result) for name, result in results.items()}
    names = sorted({group for groups in split.values() for group in groups})
    return {
        group: make({n: groups[group] for n, groups in split.items() if group in groups})
        for group in names
    }
