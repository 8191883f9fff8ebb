"""Paired statistics: is config A really better than config B, on which examples, by how much.

Two results over the same examples are compared example by example. Pairing cancels how hard
each example is, so it detects far smaller differences than two scores with their own intervals::

    a.rows ─┐ align on example_id ┌─▶ difference   mean(a) - mean(b)
    b.rows ─┘ (refuse, or keep    ├─▶ ci           percentile bootstrap over examples (pairs)
              common ids only)    ├─▶ p_value      0/1 scores: exact sign test on discordant
                                  │                pairs (exact McNemar); otherwise a paired
                                  │                permutation test (random sign flips)
                                  └─▶ wins/losses/ties   example ids, in a's dataset order

Errored rows take part with the score they carry (``failure_score``); they are counted. With
epochs, an example's row is its epochs reduced (``result.examples()``: the mean by default): the
pairs, the resamples and the tests are over examples, so an interval is clustered by example and
not narrowed by counting an example's epochs as if they were independent examples.

``score=`` compares one named score, ``group=`` one group's examples; ``every=True`` (and
:meth:`procval.Results.compare`) compares every named score, overall and in every group, in one
:class:`ComparisonTable` whose Holm adjustment counts every comparison made.

This module pairs the rows and holds the outcome; the statistics themselves (bootstrap, sign
and permutation tests, Holm's adjustment, with numpy or in pure Python) are in
:mod:`procval.report.stats`, the plain-text report in :mod:`procval.report.text`. A result is
read through :class:`procval.report.protocol.ResultLike`: nothing here imports
:mod:`procval.results`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from procval.errors import UnalignedResultsError
from procval.report.protocol import ResultLike, RowLike, is_result, per_example
from procval.report.stats import (
    Interval,
    _binary,
    _intervals,
    _resample_means,
    check_options,
    holm,
    permutation_test,
    sign_test,
)
from procval.report.text import format_p

__all__ = [
    "Comparison",
    "ComparisonTable",
    "Interval",
    "UnalignedResultsError",
    "compare",
    "compare_all",
]


@dataclass(frozen=True, repr=False)
class Comparison:
    """The paired comparison of two configs on the same examples; see :func:`compare`.

    Attributes:
        a: name of the first config.
        b: name of the second config.
        n: how many examples were paired.
        score_a: mean score of ``a`` over the paired examples.
        score_b: mean score of ``b`` over the paired examples.
        difference: ``score_a - score_b``.
        ci: bootstrap interval of ``difference``.
        ci_a: bootstrap interval of ``score_a`` (from the same resamples).
        ci_b: bootstrap interval of ``score_b``.
        p_value: two-sided p-value for "a and b score the same".
        test: ``"exact sign test"`` (0/1 scores) or ``"permutation test"``.
        wins: ids of the examples where ``a`` scored higher, in ``a``'s dataset order.
        losses: ids where ``a`` scored lower.
        ties: ids where both scored the same.
        errors_a: paired examples on which ``a`` failed (scored with ``failure_score``).
        errors_b: paired examples on which ``b`` failed.
        missing_in_a: ids of ``b`` left out because ``a`` lacks them (``common_only=True``).
        missing_in_b: ids of ``a`` left out because ``b`` lacks them.
        confidence: the intervals' confidence level.
        resamples: bootstrap resamples (and sign flips, for the permutation test).
        seed: the seed the resamples were drawn from.
        score_name: the named score compared (``compare(score=)``), or None for each row's
            ``score`` (the primary one).
        group: the group compared (``compare(group=)``), or None for every example.
    """

    a: str
    b: str
    n: int
    score_a: float
    score_b: float
    difference: float
    ci: Interval
    ci_a: Interval
    ci_b: Interval
    p_value: float
    test: str
    wins: tuple[int | str, ...]
    losses: tuple[int | str, ...]
    ties: tuple[int | str, ...]
    errors_a: int
    errors_b: int
    missing_in_a: int
    missing_in_b: int
    confidence: float
    resamples: int
    seed: int
    score_name: str | None = None
    group: str | None = None

    def __repr__(self) -> str:
        level = f"{self.confidence:.0%}"
        width = max(len(self.a), len(self.b), 2)
        left_out = self.missing_in_a + self.missing_in_b
        lines = [
            f"Comparison of {self.a!r} (a) with {self.b!r} (b) on {self.n} paired examples"
            + (f" ({left_out} unpaired ids left out)" if left_out else "")
            + (f", score {self.score_name!r}" if self.score_name is not None else "")
            + (f", group {self.group!r}" if self.group is not None else "")
        ]
        for label, name, score, ci, errors in (
            ("a", self.a, self.score_a, self.ci_a, self.errors_a),
            ("b", self.b, self.score_b, self.ci_b, self.errors_b),
        ):
            lines.append(
                f"  {label}  {name:<{width}}  {score:8.4f}  "
                f"{level} CI [{ci.low:.4f}, {ci.high:.4f}]  "
                f"{errors} error{'' if errors == 1 else 's'}"
            )
        lines.append(
            f"  {'a - b':<{width + 3}}  {self.difference:+8.4f}  {level} CI "
            f"[{self.ci.low:+.4f}, {self.ci.high:+.4f}]  p = {format_p(self.p_value)} ({self.test})"
        )
        lines.append(f"  a wins {len(self.wins)}, loses {len(self.losses)}, ties {len(self.ties)}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The comparison's numbers as a flat dict (counts instead of id lists)."""
        return {
            "a": self.a,
            "b": self.b,
            "n": self.n,
            "score_a": self.score_a,
            "score_b": self.score_b,
            "difference": self.difference,
            "ci_low": self.ci.low,
            "ci_high": self.ci.high,
            "p_value": self.p_value,
            "test": self.test,
            "wins": len(self.wins),
            "losses": len(self.losses),
            "ties": len(self.ties),
            "errors_a": self.errors_a,
            "errors_b": self.errors_b,
            "score_name": self.score_name,
            "group": self.group,
        }


@overload
def compare(
    a: ResultLike,
    b: ResultLike,
    *,
    confidence: float = ...,
    resamples: int = ...,
    seed: int = ...,
    common_only: bool = ...,
    score: str | None = ...,
    group: str | None = ...,
    every: Literal[False] = ...,
) -> Comparison: ...


@overload
def compare(
    a: ResultLike,
    b: ResultLike,
    *,
    confidence: float = ...,
    resamples: int = ...,
    seed: int = ...,
    common_only: bool = ...,
    score: None = ...,
    group: None = ...,
    every: Literal[True],
) -> ComparisonTable: ...


def compare(
    a: ResultLike,
    b: ResultLike,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    common_only: bool = False,
    score: str | None = None,
    group: str | None = None,
    every: bool = False,
) -> Comparison | ComparisonTable:
    """Compare two configs' results example by example.

    With epochs, each example counts once, its epochs reduced (``result.examples()``), so the
    interval is clustered by example.

    Args:
        a: one config's result.
        b: another config's result over the same examples.
        confidence: level of the bootstrap intervals, between 0 and 1.
        resamples: bootstrap resamples over examples (and sign flips for the permutation test).
        seed: seed of the resamples; the same seed gives the same answer.
        common_only: compare on the example ids both results have instead of refusing.
        score: the named score to compare (default: each row's ``score``, the primary one).
        group: compare only the examples of this group (``evaluate(..., group_by=)``).
        every: compare every named score, overall and in every group, in one table with
            Holm-adjusted p-values (``score`` and ``group`` must then be None).

    Returns:
        A :class:`Comparison`: ``difference`` (a minus b), ``ci``, ``p_value``, ``wins``...;
        with ``every``, a :class:`ComparisonTable` of them.

    Raises:
        UnalignedResultsError: the results cover different example ids (and not
            ``common_only``), or none in common. It is also a ``ValueError``.
        ValueError: bad ``confidence``, ``resamples`` or ``seed``, duplicate example ids, a
            ``score`` the results do not have, a ``group`` without examples.
        TypeError: ``a`` or ``b`` is not an ``EvaluationResult``.
    """
    for name, value in (("a", a), ("b", b)):
        if not is_result(value):
            raise TypeError(f"{name} must be an EvaluationResult, got {type(value).__name__}")
    check_options(confidence, resamples, seed)
    options = {"confidence": confidence, "resamples": resamples, "seed": seed}
    if every:
        if score is not None or group is not None:
            raise ValueError("every=True compares every score and group: leave score= and group=")
        return ComparisonTable(_every(a, b, common_only=common_only, **options))
    for result in (a, b):
        if score is not None and score not in _score_names(result):
            raise ValueError(
                f"config {result.config!r} has no score {score!r}; it has {_score_names(result)}"
            )
    pairs, missing_in_a, missing_in_b = _align(a, b, common_only=common_only, group=group)
    xs = [_value(ra, score) for ra, _ in pairs]
    ys = [_value(rb, score) for _, rb in pairs]
    means = _resample_means([xs, ys], resamples, seed)
    ci_a, ci_b, ci = _intervals(means, confidence)
    ids = [ra.example_id for ra, _ in pairs]
    wins = tuple(i for i, x, y in zip(ids, xs, ys, strict=True) if x > y)
    losses = tuple(i for i, x, y in zip(ids, xs, ys, strict=True) if x < y)
    ties = tuple(i for i, x, y in zip(ids, xs, ys, strict=True) if x == y)
    if _binary(xs) and _binary(ys):
        p_value, test = sign_test(len(wins), len(losses)), "exact sign test"
    else:
        diffs = [x - y for x, y in zip(xs, ys, strict=True)]
        p_value, test = permutation_test(diffs, resamples, seed), "permutation test"
    score_a, score_b = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    return Comparison(
        a=a.config,
        b=b.config,
        n=len(pairs),
        score_a=score_a,
        score_b=score_b,
        difference=score_a - score_b,
        ci=ci,
        ci_a=ci_a,
        ci_b=ci_b,
        p_value=p_value,
        test=test,
        wins=wins,
        losses=losses,
        ties=ties,
        errors_a=sum(ra.error is not None for ra, _ in pairs),
        errors_b=sum(rb.error is not None for _, rb in pairs),
        missing_in_a=missing_in_a,
        missing_in_b=missing_in_b,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        score_name=score,
        group=group,
    )


class ComparisonTable(Sequence[Comparison]):
    """Several comparisons in one table, with Holm-adjusted p-values for testing them together.

    Attributes:
        p_adjusted: Holm's step-down adjustment of the p-values, in the table's order.
    """

    def __init__(self, comparisons: Sequence[Comparison]) -> None:
        self._rows = tuple(comparisons)
        self.p_adjusted: tuple[float, ...] = holm([c.p_value for c in self._rows])

    @overload
    def __getitem__(self, index: int) -> Comparison: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Comparison]: ...

    def __getitem__(self, index: int | slice) -> Comparison | Sequence[Comparison]:
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Comparison]:
        return iter(self._rows)

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per comparison, with ``p_adjusted`` added."""
        return [
            {**c.as_dict(), "p_adjusted": p}
            for c, p in zip(self._rows, self.p_adjusted, strict=True)
        ]

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas), one row per comparison."""
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install 'procval[pandas]'") from None
        return pandas.DataFrame.from_records(self.records())

    def __repr__(self) -> str:
        if not self._rows:
            return "ComparisonTable(empty)"
        level = f"{self._rows[0].confidence:.0%}"
        wa = max(3, *(len(c.a) for c in self._rows))
        wb = max(1, *(len(c.b) for c in self._rows))
        named = any(c.score_name is not None for c in self._rows)
        grouped = any(c.group is not None for c in self._rows)
        ws = max(5, *(len(c.score_name or "") for c in self._rows)) if named else 0
        wg = max(5, *(len(c.group or "(all)") for c in self._rows)) if grouped else 0

        def which(c: Comparison) -> str:
            return (f"{c.score_name or '':<{ws}}  " if named else "") + (
                f"{c.group or '(all)':<{wg}}  " if grouped else ""
            )

        header = (
            f"{'a':<{wa}}  {'b':<{wb}}  "
            + (f"{'score':<{ws}}  " if named else "")
            + (f"{'group':<{wg}}  " if grouped else "")
            + f"{'n':>6}  {'a - b':>8}  {level + ' CI':^19}  "
            f"{'p':>8}  {'p (Holm)':>8}  {'wins':>5} {'losses':>6} {'ties':>6}"
        )
        lines = [header]
        for c, p_adj in zip(self._rows, self.p_adjusted, strict=True):
            lines.append(
                f"{c.a:<{wa}}  {c.b:<{wb}}  {which(c)}{c.n:>6}  {c.difference:>+8.4f}  "
                f"[{c.ci.low:+.4f}, {c.ci.high:+.4f}]  {format_p(c.p_value):>8}  "
                f"{format_p(p_adj):>8}  {len(c.wins):>5} {len(c.losses):>6} {len(c.ties):>6}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from procval.report.notebook import render_table

        return render_table(self)


def compare_all(
    results: Sequence[ResultLike],
    baseline: ResultLike | None,
    **options: Any,
) -> ComparisonTable:
    """Compare every result with ``baseline``, or, without one, every pair (later vs earlier).

    Args:
        results: the results, in the configs' order.
        baseline: the result the others are compared with; None for all pairs.
        **options: passed to :func:`compare`.

    Returns:
        A :class:`ComparisonTable`; each row's ``a`` is the other (or the later) config. Each
        pair is compared on every named score and, when the rows have groups, overall and in
        every group (see :func:`compare` with ``every=True``); Holm's adjustment counts them all.
    """
    if baseline is not None:
        pairs = [(r, baseline) for r in results if r is not baseline]
    else:
        pairs = [(later, earlier) for earlier, later in itertools.combinations(results, 2)]
    return ComparisonTable([c for x, y in pairs for c in _every(x, y, **options)])


# --------------------------------------------------------------------------------- the plumbing


def _every(a: ResultLike, b: ResultLike, **options: Any) -> list[Comparison]:
    """``a`` against ``b`` on every score both have, overall then in each group both have.

    One score (or no score name in common) and no groups: the one plain comparison.
    """
    names_b = _score_names(b)
    names = [name for name in _score_names(a) if name in names_b]
    scores: list[str | None] = [None] if len(names) < 2 else list(names)
    groups: list[str | None] = [None, *sorted(_groups(a) & _groups(b))]
    return [compare(a, b, score=s, group=g, **options) for g in groups for s in scores]


def _score_names(result: ResultLike) -> list[str]:
    return list(getattr(result, "scores", None) or ["score"])


def _groups(result: ResultLike) -> set[str]:
    return {g for row in per_example(result) if (g := getattr(row, "group", None)) is not None}


def _value(row: RowLike, score: str | None) -> float:
    """The row's ``score``, or its named score ``score`` (a failed row's is its ``score``)."""
    scores = getattr(row, "scores", None) if score is not None else None
    return row.score if scores is None else float(scores[score])


def _align(
    a: ResultLike, b: ResultLike, *, common_only: bool, group: str | None = None
) -> tuple[list[tuple[RowLike, RowLike]], int, int]:
    rows_a, rows_b = per_example(a), per_example(b)
    if group is not None:
        rows_a = [row for row in rows_a if getattr(row, "group", None) == group]
        rows_b = [row for row in rows_b if getattr(row, "group", None) == group]
        if not rows_a or not rows_b:
            raise ValueError(
                f"no example of group {group!r} in config "
                f"{(a if not rows_a else b).config!r}; its groups are "
                f"{sorted(_groups(a if not rows_a else b))}"
            )
    by_id_b = {row.example_id: row for row in rows_b}
    ids_a = [row.example_id for row in rows_a]
    for result, rows, count in ((a, rows_a, len(set(ids_a))), (b, rows_b, len(by_id_b))):
        if count != len(rows):
            raise ValueError(
                f"config {result.config!r} has {len(rows) - count} duplicate example "
                "ids; pairing needs one row per example id"
            )
    set_a = set(ids_a)
    missing_in_a = sum(i not in set_a for i in by_id_b)
    missing_in_b = sum(i not in by_id_b for i in ids_a)
    pairs = [(row, by_id_b[row.example_id]) for row in rows_a if row.example_id in by_id_b]
    if ((missing_in_a or missing_in_b) and not common_only) or not pairs:
        only_a = [i for i in ids_a if i not in by_id_b][:3]
        only_b = [i for i in by_id_b if i not in set_a][:3]
        samples = "; ".join(
            f"{', '.join(map(repr, ids))}{', ...' if count > len(ids) else ''} not in {name!r}"
            for ids, count, name in (
                (only_a, missing_in_b, b.config),
                (only_b, missing_in_a, a.config),
            )
            if ids
        )
        fix = (
            f"pass common_only=True to compare on the {len(pairs)} ids both have"
            if pairs
            else "they have no example id in common: were they run on the same dataset?"
        )
        raise UnalignedResultsError(
            f"cannot pair {a.config!r} with {b.config!r}: {_ids(missing_in_a)} of {b.config!r} "
            f"missing from {a.config!r} and {_ids(missing_in_b)} of {a.config!r} missing from "
            f"{b.config!r}" + (f" ({samples})" if samples else "") + f"; {fix}",
            missing_in_a=missing_in_a,
            missing_in_b=missing_in_b,
        )
    return pairs, missing_in_a, missing_in_b


def _ids(count: int) -> str:
    return f"{count} example id{'' if count == 1 else 's'}"
