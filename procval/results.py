"""What an evaluation returns: rows, their errors as data, and per-config results.

Statistics, comparisons and the notebook views are computed by :mod:`procval.report`, imported
on first use. Imports go one way: this module calls into the report, which never imports it.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from procval._row import Row, RowError, Totals
from procval._summary import result_summary, results_summary
from procval.usage import Usage

__all__ = [
    "EvaluationResult",
    "Results",
    "Row",
    "RowError",
    "Totals",
]


if TYPE_CHECKING:
    from procval.report.compare import ComparisonTable
    from procval.report.stats import Interval


class EvaluationResult:
    """The outcome of evaluating one config.

    Rows are held in memory, or read back from the run store when asked for (so a million-row
    run costs the parent no memory until you look at its rows).
    """

    # defaults for results pickled before these existed (procval 0.1.0)
    _epochs: int = 1
    _reducer: str | Mapping[str, str] = "mean"
    _primary: str | None = None
    _examples: list[Row] | None = None
    _kept: tuple[int, int] = (0, 0)
    _stopped: str | None = None
    _budget_warning: str | None = None
    _budget_stop: tuple[str, float, str] | None = None  # (option, budget, "Config"/"evaluate")

    def __init__(
        self,
        config: str,
        rows: Sequence[Row] | Callable[[], Sequence[Row]],
        *,
        duration: float,
        totals: Totals | None = None,
        error_types: Mapping[str, int] | None = None,
        fingerprint: str = "",
        usage: Mapping[str, Usage] | None = None,
        epochs: int = 1,
        reducer: str | Mapping[str, str] = "mean",
        primary: str | None = None,
        kept: tuple[int, int] = (0, 0),
    ) -> None:
        self._config = config
        # (rows, epochs): rows of later epochs its store keeps out of this result (store.readers)
        self._kept = kept
        self._usage = dict(usage) if usage is not None else None
        self._epochs = epochs
        self._reducer = reducer
        self._primary = primary
        self._examples: list[Row] | None = None
        self._rows: Sequence[Row] | None = None if callable(rows) else sorted(rows, key=_index)
        self._load = rows if callable(rows) else None
        self._duration = duration
        self._totals = totals
        self._error_types = dict(error_types) if error_types is not None else None
        self._fingerprint = fingerprint
        self._found = 0
        self._added: int | None = None
        self._replaced = 0
        self._limits: dict[str, dict[str, float]] = {}

    @property
    def config(self) -> str:
        """The config's name."""
        return self._config

    @property
    def rows(self) -> Sequence[Row]:
        """Every row, in dataset order."""
        if self._rows is None:
            assert self._load is not None
            self._rows = sorted(self._load(), key=_index)
        return self._rows

    @property
    def errors(self) -> list[Row]:
        """The rows whose example failed, in dataset order."""
        return [row for row in self.rows if row.error is not None]

    @property
    def totals(self) -> Totals:
        """Counts and the score sum, computed from the rows unless given."""
        if self._totals is None:
            rows = self.rows
            self._totals = Totals(
                n=len(rows),
                score_sum=math.fsum(r.score for r in rows),
                errors=sum(r.error is not None for r in rows),
            )
        return self._totals

    @property
    def score(self) -> float:
        """Mean score over all examples, failed ones counted as ``failure_score`` (NaN if none).

        With ``epochs``, the mean over examples of each example's reduced score (:meth:`examples`).
        """
        if self._epochs > 1:
            return _mean([row.score for row in self.examples()])
        totals = self.totals
        return totals.score_sum / totals.n if totals.n else math.nan

    @property
    def scores(self) -> dict[str, float]:
        """The mean of every named score, primary first (``{"score": score}`` for one score).

        Failed examples count with ``failure_score`` in each; with ``epochs``, each example's
        scores are first reduced over its epochs (:meth:`examples`).
        """
        ask = getattr(self._load, "score_means", None)
        if self._epochs == 1 and self._rows is None and callable(ask):
            found: dict[str, float] = ask()  # a stored result: one query, not every row
            means = found or {"score": self.score}
        else:
            rows = self.examples()
            names = next((list(r.scores) for r in rows if r.scores), ["score"])
            means = {
                name: _mean([r.scores[name] if r.scores else r.score for r in rows])
                for name in names
            }
            if names == ["score"]:
                means["score"] = self.score
        primary = self.primary
        return {primary: means[primary], **means} if primary in means else means

    @property
    def primary(self) -> str:
        """The name of the score :attr:`score` is: ``primary=``, else ``score``, else the first."""
        if self._primary is not None:
            return self._primary
        names = self._score_names()
        return "score" if not names or "score" in names else names[0]

    def _score_names(self) -> list[str]:
        ask = getattr(self._load, "score_names", None)
        if self._rows is None and callable(ask):
            found: list[str] = ask()
            return found
        return next((list(r.scores) for r in self.rows if r.scores), [])

    @property
    def epochs(self) -> int:
        """How many times each example was run (``evaluate(..., epochs=)``)."""
        return self._epochs

    def examples(self) -> list[Row]:
        """One row per example, in dataset order: each score reduced over the example's epochs.

        Without epochs, :attr:`rows`. With them, each example's first epoch's row, whose
        ``score`` and ``scores`` are reduced by ``reducer=`` over its epochs (see
        :mod:`procval._reduce`), and whose ``error`` is None when any epoch succeeded.

        Raises:
            ValueError: ``pass@k`` or ``pass^k`` met a score other than 0 or 1.
        """
        if self._examples is None:
            if self._epochs == 1:
                return list(self.rows)
            from procval._reduce import reduce_rows

            self._examples = reduce_rows(self.rows, self._reducer, self.primary)
        return self._examples

    @property
    def error_types(self) -> dict[str, int]:
        """How many rows failed, by error type, most frequent first."""
        if self._error_types is None:
            self._error_types = dict(Counter(r.error.type for r in self.errors if r.error))
        return dict(sorted(self._error_types.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def usage(self) -> dict[str, Usage]:
        """Tokens and cost per model spent by this config: ``{model: Usage}``, by model name.

        Summed over the rows in memory; for a result read from (or run with) a store, the
        config's spend as the store keeps it, over every session (a resumed run counts what
        its earlier sessions spent), without reading the rows. Empty when nothing was recorded.
        """
        if self._usage is None:
            totals: dict[str, Usage] = {}
            for row in self.rows:
                if row.usage:
                    for model, spent in row.usage.items():
                        found = totals.get(model)
                        totals[model] = spent if found is None else found + spent
            self._usage = totals
        return dict(sorted(self._usage.items()))

    @property
    def duration(self) -> float:
        """Wall-clock seconds this config took (summed over resumed sessions)."""
        return self._duration

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the snapshot the rows were produced under."""
        return self._fingerprint

    @property
    def found(self) -> int:
        """Rows that were already in the run store when the call began (a resume); else 0."""
        return self._found

    @property
    def added(self) -> int:
        """Rows this call produced (all of them, unless it resumed a store or was loaded)."""
        return self.totals.n - self._found if self._added is None else self._added

    @property
    def replaced_workers(self) -> int:
        """Workers of this config lost in this call (died, froze, never placed) and replaced."""
        return self._replaced

    @property
    def limits(self) -> dict[str, dict[str, float]]:
        """What this config's rate-limited calls met, by key (empty: no limits).

        In this call; with a run store (or read from one), over every session, as the store
        keeps them (``procval report`` shows them).

        Each key maps to ``calls`` (permits granted, retries included), ``rate_limited`` (calls
        answered 429), ``waits`` and ``wait_seconds`` (calls the limits held back, and for how
        long in total) and ``tokens`` (as the calls reported them, else their estimates).
        """
        return self._limits

    @property
    def stopped(self) -> str | None:
        """Why this config stopped before its last example, and how to resume; None if not.

        Set when its budget (``max_tokens``, ``max_cost``) was reached; see docs/rate-limits.md.
        """
        return self._stopped

    def __len__(self) -> int:
        return self.totals.n

    def _error_samples(self) -> dict[str, tuple[int | str, str]]:
        """``{type: (example_id, message)}`` of each error type's first failed example.

        A stored result asks the store (one grouped query), without reading every row.
        """
        if not self.error_types:
            return {}
        ask = getattr(self._load, "error_samples", None) if self._rows is None else None
        if callable(ask):
            found: dict[str, tuple[int | str, str]] = ask()
            return found
        samples: dict[str, tuple[int | str, str]] = {}
        for row in self.errors:
            if row.error is not None:
                samples.setdefault(row.error.type, (row.example_id, row.error.message))
        return samples

    def summary(self) -> str:
        """A few lines: score, examples, duration, and errors by type with an example of each.

        Each error type's line names its first failed example and the first line of its
        message (``3 x ValueError, e.g. q7: seven: 7``); :attr:`errors` holds every one.
        """
        return result_summary(self)

    def _first_error(self) -> RowError | None:
        """The first failed row's error, without reading every row of a stored result."""
        if self._rows is None:
            first = getattr(self._load, "first_error", None)
            if callable(first):
                error: RowError | None = first()
                return error
        return next((row.error for row in self.rows if row.error is not None), None)

    def ci(self, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
        """A bootstrap confidence interval of :attr:`score`, resampling the examples.

        Args:
            confidence: the interval's level, between 0 and 1.
            resamples: how many bootstrap resamples to draw.
            seed: seed of the resamples; the same seed gives the same interval.

        Returns:
            ``Interval(low, high)`` (a named tuple); NaNs when there are no rows.

        Raises:
            ValueError: bad ``confidence``, ``resamples`` or ``seed``.
        """
        from procval.report.stats import bootstrap_ci

        scores = [row.score for row in self.examples()]
        return bootstrap_ci(scores, confidence=confidence, resamples=resamples, seed=seed)

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame``, one row per example, in dataset order.

        Columns: the fields of :class:`Row`, with ``error`` split into ``error_type``,
        ``error_message`` and ``error_traceback`` (None where the example succeeded).

        Raises:
            ImportError: pandas is not installed (``pip install 'procval[pandas]'``).
        """
        from procval._summary import data_frame

        return data_frame(self.rows, [f.name for f in fields(Row)])

    def by_group(self) -> dict[str, EvaluationResult]:
        """A result per group (``evaluate(..., group_by=)``), by group name, sorted.

        Each holds that group's rows (every epoch), so ``score``, ``scores``, ``ci()``,
        ``examples()`` and :func:`procval.compare` work on it; ``duration`` is the config's.
        Rows without a group (stored before ``group_by`` was given) are left out.

        Raises:
            ValueError: no row has a group.
        """
        from procval._groups import by_group

        return by_group(self)

    def _repr_html_(self) -> str:
        """The notebook view: score with its interval, counts, and the first errors."""
        from procval.report.notebook import render_result

        return render_result(self)

    def __repr__(self) -> str:
        totals = self.totals
        return (
            f"EvaluationResult(config={self.config!r}, score={self.score:.4f}, "
            f"n={totals.n}, errors={totals.errors}, duration={self.duration:.2f}s)"
        )


class Results(Mapping[str, EvaluationResult]):
    """A read-only mapping of config name to :class:`EvaluationResult`, in the configs' order."""

    def __init__(self, results: Mapping[str, EvaluationResult]) -> None:
        self._results = dict(results)

    def __getitem__(self, name: str) -> EvaluationResult:
        try:
            return self._results[name]
        except KeyError:
            raise KeyError(f"no config named {name!r}; there are {list(self._results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def summary(self) -> str:
        """One line per config: name, score, examples, errors, duration."""
        return results_summary(self._results)

    def compare(
        self,
        baseline: str | None = None,
        *,
        pairs: bool = False,
        confidence: float = 0.95,
        resamples: int = 10_000,
        seed: int = 0,
        common_only: bool = False,
    ) -> ComparisonTable:
        """Compare every config with a baseline, or every pair, example by example.

        Args:
            baseline: the config the others are compared with (default: the first one).
            pairs: compare every pair of configs instead (each later config against each
                earlier one); ``baseline`` must then be None.
            confidence: level of the bootstrap intervals.
            resamples: bootstrap resamples per comparison.
            seed: seed of the resamples.
            common_only: pair on the example ids both configs have instead of refusing.

        Returns:
            A :class:`procval.ComparisonTable` of :class:`procval.Comparison` (``a`` is the
            other config, ``b`` the baseline), with Holm-adjusted p-values: one per pair, or,
            with named scores or groups, one per pair, score and group (overall first).

        Raises:
            KeyError: no config named ``baseline``.
            ValueError: both ``baseline`` and ``pairs``; or see :func:`procval.report.compare`.
        """
        from procval.report.compare import compare_all

        if pairs and baseline is not None:
            raise ValueError("pass baseline= or pairs=True, not both: pairs compares every pair")
        base = None
        if not pairs and self._results:
            base = self[baseline] if baseline is not None else next(iter(self._results.values()))
        return compare_all(
            list(self._results.values()),
            base,
            confidence=confidence,
            resamples=resamples,
            seed=seed,
            common_only=common_only,
        )

    def by_group(self) -> dict[str, Results]:
        """Each group's :class:`Results` (see :meth:`EvaluationResult.by_group`; same errors)."""
        from procval._groups import results_by_group

        return results_by_group(self._results, Results)

    def __repr__(self) -> str:
        return f"Results({', '.join(f'{k}={v.score:.4f}' for k, v in self._results.items())})"


def _index(row: Row) -> tuple[int, int]:
    return row.index, row.epoch


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _with_counts(
    result: EvaluationResult, *, found: int, added: int, replaced: int = 0
) -> EvaluationResult:
    """``result`` with what one call found in the store, added to it and lost (the scheduler's)."""
    counted = copy.copy(result)
    counted._found, counted._added, counted._replaced = found, added, replaced
    return counted
