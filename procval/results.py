"""What an evaluation returns: rows, their errors as data, and per-config results.

Statistics, comparisons and the notebook views are computed by :mod:`procval.report`, imported
on first use. Imports go one way: this module calls into the report, which never imports it.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

__all__ = [
    "EvaluationResult",
    "Results",
    "Row",
    "RowError",
    "Totals",
    "Usage",
]


if TYPE_CHECKING:
    from procval.report.compare import ComparisonTable
    from procval.report.stats import Interval


@dataclass(frozen=True, slots=True)
class RowError:
    """Why an example has no score.

    Attributes:
        type: the exception's class name, or ``"Timeout"``, ``"WorkerCrashed"``.
        message: the exception's message (for a crash: the exit code or signal).
        traceback: the traceback as formatted in the worker ("" where there is none).
    """

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost spent with one model: by one example, or by a whole config.

    Attributes:
        calls: calls made to the model.
        cached_calls: of those, calls answered from a cache.
        prompt_tokens: tokens sent.
        completion_tokens: tokens received.
        total_tokens: prompt and completion tokens together.
        cost: the cost in the provider's currency, or None where it is not known.
    """

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        cost = (
            None
            if self.cost is None and other.cost is None
            else ((self.cost or 0.0) + (other.cost or 0.0))
        )
        return Usage(
            self.calls + other.calls,
            self.cached_calls + other.cached_calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            cost,
        )

    @classmethod
    def from_dict(cls, counts: Mapping[str, Any]) -> Usage:
        """A ``Usage`` from a mapping of its field names (missing ones are 0, cost None)."""
        cost = counts.get("cost")
        return cls(
            int(counts.get("calls", 0) or 0),
            int(counts.get("cached_calls", 0) or 0),
            int(counts.get("prompt_tokens", 0) or 0),
            int(counts.get("completion_tokens", 0) or 0),
            int(counts.get("total_tokens", 0) or 0),
            None if cost is None else float(cost),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (as stored)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Row:
    """One example's outcome, with its provenance.

    Attributes:
        index: position in the dataset.
        example_id: the example's ``id`` key or attribute, else its position.
        example: the example as given (as stored, for a run loaded from a store).
        prediction: what the program returned (None when it raised).
        score: the metric's value as a float; ``failure_score`` when ``error`` is set.
        error: None, or what went wrong.
        attempts: how many times the program was called for this example.
        duration: seconds spent on the example in the worker, all attempts included.
        worker_pid: the process that produced the row.
        config: the config's name.
        fingerprint: the snapshot installed in that process.
        node: the host that ran the process.
        epoch: which repetition of the example this row is (``evaluate(..., epochs=)``), from 0.
        scores: every named score of the row, or None when the only score is ``score``;
            when set, ``score`` is the primary one.
        extra: what the metric returned besides its scores (JSON values), or None.
        usage: tokens and cost per model name spent by this example, or None.
        group: the example's group key, or None.
    """

    index: int
    example_id: int | str
    example: Any
    prediction: Any
    score: float
    error: RowError | None
    attempts: int
    duration: float
    worker_pid: int
    config: str
    fingerprint: str
    node: str = ""
    epoch: int = 0
    scores: Mapping[str, float] | None = None
    extra: Mapping[str, Any] | None = None
    usage: Mapping[str, Usage] | None = None
    group: str | None = None


@dataclass(frozen=True)
class Totals:
    """Running totals of one config's rows: enough for a score without the rows."""

    n: int = 0
    score_sum: float = 0.0
    errors: int = 0


class EvaluationResult:
    """The outcome of evaluating one config.

    Rows are held in memory, or read back from the run store when asked for (so a million-row
    run costs the parent no memory until you look at its rows).
    """

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
    ) -> None:
        self._config = config
        self._usage = dict(usage) if usage is not None else None
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
        """Mean score over all examples, failed ones counted as ``failure_score`` (NaN if none)."""
        totals = self.totals
        return totals.score_sum / totals.n if totals.n else math.nan

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
        """What this config's rate-limited calls met in this call, by key (empty: no limits).

        Each key maps to ``calls`` (permits granted, retries included), ``rate_limited`` (calls
        answered 429), ``waits`` and ``wait_seconds`` (calls the limits held back, and for how
        long in total) and ``tokens`` (as the calls reported them, else their estimates).
        """
        return self._limits

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
        totals = self.totals
        if not totals.n:
            return (
                f"config {self.config!r}: no rows (none of its examples finished: it was "
                "stopped, or its workers could not start; see the output of its run)"
            )
        samples = self._error_samples()
        lines = [
            f"config {self.config!r}: score {self.score:.4f} over {totals.n} examples "
            f"({totals.errors} errors) in {self.duration:.2f}s"
        ]
        warning = _all_failed(self)
        if warning:
            lines.append(f"  {warning}")
        for kind, count in self.error_types.items():
            lines.append(f"  {count} x {kind}{_example_of(samples.get(kind))}")
        if self.replaced_workers:
            lines.append(f"  {self.replaced_workers} workers lost and replaced")
        lines.extend(f"  {line}" for line in _limit_lines(self.limits))
        if self.usage:
            from procval.report.text import spend_lines

            lines.extend(spend_lines("  ", self))
        return "\n".join(lines)

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

        scores = [row.score for row in self.rows]
        return bootstrap_ci(scores, confidence=confidence, resamples=resamples, seed=seed)

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame``, one row per example, in dataset order.

        Columns: the fields of :class:`Row`, with ``error`` split into ``error_type``,
        ``error_message`` and ``error_traceback`` (None where the example succeeded).

        Raises:
            ImportError: pandas is not installed (``pip install 'procval[pandas]'``).
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install 'procval[pandas]'") from None
        columns: list[str] = []
        for name in (f.name for f in fields(Row)):
            columns += (
                ["error_type", "error_message", "error_traceback"] if name == "error" else [name]
            )
        records = []
        for row in self.rows:
            record = {name: getattr(row, name, None) for name in columns}
            if row.error is not None:
                record["error_type"] = row.error.type
                record["error_message"] = row.error.message
                record["error_traceback"] = row.error.traceback
            records.append(record)
        return pandas.DataFrame.from_records(records, columns=columns)

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
        width = max([len("config"), *(len(name) for name in self._results)])
        lines = [f"{'config':<{width}}  {'score':>7}  {'n':>7}  {'errors':>6}  {'time':>8}"]
        for name, result in self._results.items():
            totals = result.totals
            score = f"{result.score:>7.4f}" if totals.n else f"{'-':>7}"  # no rows: no score
            lines.append(
                f"{name:<{width}}  {score}  {totals.n:>7}  {totals.errors:>6}  "
                f"{result.duration:>7.2f}s"
            )
        for name, result in self._results.items():
            warning = _all_failed(result)
            if warning:
                lines.append(f"{name}: {warning}")
        replaced = [
            f"{n} {r.replaced_workers}" for n, r in self._results.items() if r.replaced_workers
        ]
        if replaced:
            lines.append(f"workers lost and replaced: {', '.join(replaced)}")
        for name, result in self._results.items():
            lines.extend(f"{name}: {line}" for line in _limit_lines(result.limits))
            if result.usage:
                from procval.report.text import spend_lines

                lines.extend(spend_lines(f"{name}: ", result))
        return "\n".join(lines)

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
            other config, ``b`` the baseline), with Holm-adjusted p-values.

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

    def __repr__(self) -> str:
        return f"Results({', '.join(f'{k}={v.score:.4f}' for k, v in self._results.items())})"


def _example_of(sample: tuple[int | str, str] | None, width: int = 160) -> str:
    """``", e.g. ID: first line of the message"`` (clipped to ``width``), or "" for None."""
    if sample is None:
        return ""
    example_id, message = sample
    lines = message.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > width:
        first = first[: width - 1] + "…"
    return f", e.g. {example_id}: {first}" if first else f", e.g. {example_id}"


def _index(row: Row) -> int:
    return row.index


def _all_failed(result: EvaluationResult) -> str:
    """A loud line when every example failed (its score is then failure_score), else ""."""
    totals = result.totals
    if not totals.n or totals.errors < totals.n:
        return ""
    kinds = result.error_types
    error = result._first_error()
    if error is None:
        what = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    else:
        message = error.message.strip().splitlines()[0].rstrip(".") if error.message.strip() else ""
        message = message if len(message) <= 200 else message[:197] + "..."
        what = f"{error.type}: {message}" if message else error.type
        if len(kinds) > 1:
            what += " (first of: " + ", ".join(f"{n} x {k}" for k, n in kinds.items()) + ")"
    return (
        f"ALL {totals.n} EXAMPLES FAILED: {what}; the score {result.score} is "
        "failure_score, not a measurement"
    )


def _limit_lines(limits: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One summary line per rate-limit key: calls, 429s, waits."""
    return [
        f"rate limit {key!r}: {int(c.get('calls', 0))} calls, {int(c.get('rate_limited', 0))} "
        f"answered 429, {int(c.get('waits', 0))} waited {c.get('wait_seconds', 0.0):.1f}s in all"
        for key, c in limits.items()
    ]


def _with_counts(
    result: EvaluationResult, *, found: int, added: int, replaced: int = 0
) -> EvaluationResult:
    """``result`` with what one call found in the store, added to it and lost (the scheduler's)."""
    counted = copy.copy(result)
    counted._found, counted._added, counted._replaced = found, added, replaced
    return counted
