"""Paired statistics: is config A really better than config B, on which examples, by how much.

Two results over the same examples are compared example by example. Pairing cancels how hard
each example is, so it detects far smaller differences than two scores with their own intervals::

    a.rows ─┐ align on example_id ┌─▶ difference   mean(a) - mean(b)
    b.rows ─┘ (refuse, or keep    ├─▶ ci           percentile bootstrap over examples (pairs)
              common ids only)    ├─▶ p_value      0/1 scores: exact sign test on discordant
                                  │                pairs (exact McNemar); otherwise a paired
                                  │                permutation test (random sign flips)
                                  └─▶ wins/losses/ties   example ids, in a's dataset order

Errored rows take part with the score they carry (``failure_score``); they are counted.

Resampling uses numpy when it is installed and pure Python otherwise. With numpy, scores with
few distinct values are resampled as multinomial counts of those values, which is the same
bootstrap and costs nothing per example. The two paths draw different resamples from the same
seed: results are deterministic for a seed on a given installation, and agree across
installations up to resampling noise.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from procval._convert import to_jsonable
from procval.errors import UnalignedResultsError

if TYPE_CHECKING:
    from procval.results import EvaluationResult

_CHUNK = 1 << 20  # values drawn at once by the vectorised paths (8 MB of float64)
_EXACT_LIMIT = 20_000  # discordant pairs up to which the sign test runs in integers
_FLIPS = bytes.maketrans(b"01", b"\x00\x01")


class Interval(NamedTuple):
    """A confidence interval: ``low, high = result.ci()``."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the closed interval."""
        return self.low <= value <= self.high


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

    def __repr__(self) -> str:
        level = f"{self.confidence:.0%}"
        width = max(len(self.a), len(self.b), 2)
        left_out = self.missing_in_a + self.missing_in_b
        lines = [
            f"Comparison of {self.a!r} (a) with {self.b!r} (b) on {self.n} paired examples"
            + (f" ({left_out} unpaired ids left out)" if left_out else "")
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
        }


def compare(
    a: EvaluationResult,
    b: EvaluationResult,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    common_only: bool = False,
) -> Comparison:
    """Compare two configs' results example by example.

    Args:
        a: one config's result.
        b: another config's result over the same examples.
        confidence: level of the bootstrap intervals, between 0 and 1.
        resamples: bootstrap resamples over examples (and sign flips for the permutation test).
        seed: seed of the resamples; the same seed gives the same answer.
        common_only: compare on the example ids both results have instead of refusing.

    Returns:
        A :class:`Comparison`: ``difference`` (a minus b), ``ci``, ``p_value``, ``wins``...

    Raises:
        UnalignedResultsError: the results cover different example ids (and not
            ``common_only``), or none in common. It is also a ``ValueError``.
        ValueError: bad ``confidence``, ``resamples`` or ``seed``, or duplicate example ids.
        TypeError: ``a`` or ``b`` is not an ``EvaluationResult``.
    """
    from procval.results import EvaluationResult

    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, EvaluationResult):
            raise TypeError(f"{name} must be an EvaluationResult, got {type(value).__name__}")
    check_options(confidence, resamples, seed)
    pairs, missing_in_a, missing_in_b = _align(a, b, common_only=common_only)
    xs = [ra.score for ra, _ in pairs]
    ys = [rb.score for _, rb in pairs]
    means = _resample_means([xs, ys], resamples, seed)
    ci_a, ci_b, ci = _intervals(means, confidence)
    wins = tuple(ra.example_id for ra, rb in pairs if ra.score > rb.score)
    losses = tuple(ra.example_id for ra, rb in pairs if ra.score < rb.score)
    ties = tuple(ra.example_id for ra, rb in pairs if ra.score == rb.score)
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
        header = (
            f"{'a':<{wa}}  {'b':<{wb}}  {'n':>6}  {'a - b':>8}  {level + ' CI':^19}  "
            f"{'p':>8}  {'p (Holm)':>8}  {'wins':>5} {'losses':>6} {'ties':>6}"
        )
        lines = [header]
        for c, p_adj in zip(self._rows, self.p_adjusted, strict=True):
            lines.append(
                f"{c.a:<{wa}}  {c.b:<{wb}}  {c.n:>6}  {c.difference:>+8.4f}  "
                f"[{c.ci.low:+.4f}, {c.ci.high:+.4f}]  {format_p(c.p_value):>8}  "
                f"{format_p(p_adj):>8}  {len(c.wins):>5} {len(c.losses):>6} {len(c.ties):>6}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from procval._html import render_table

        return render_table(self)


def compare_all(
    results: Sequence[EvaluationResult],
    baseline: EvaluationResult | None,
    **options: Any,
) -> ComparisonTable:
    """Compare every result with ``baseline``, or, without one, every pair (later vs earlier).

    Args:
        results: the results, in the configs' order.
        baseline: the result the others are compared with; None for all pairs.
        **options: passed to :func:`compare`.

    Returns:
        A :class:`ComparisonTable`; each row's ``a`` is the other (or the later) config.
    """
    if baseline is not None:
        pairs = [(r, baseline) for r in results if r is not baseline]
    else:
        pairs = [(later, earlier) for earlier, later in itertools.combinations(results, 2)]
    return ComparisonTable([compare(x, y, **options) for x, y in pairs])


def describe(
    comparison: Comparison, a: EvaluationResult, b: EvaluationResult, *, examples: int = 5
) -> str:
    """The comparison's summary followed by the first examples on which a and b differ.

    This is what ``procval compare`` prints. ``a`` and ``b`` are the results compared.

    Args:
        comparison: the result of ``compare(a, b)``.
        a: the first result, for its rows.
        b: the second result.
        examples: how many differing examples to list, in ``a``'s dataset order.

    Returns:
        Several lines of text, without a final newline.
    """
    flipped = set(comparison.wins) | set(comparison.losses)
    lines = [repr(comparison)]
    if not flipped or examples <= 0:
        return lines[0]
    by_id_b = {row.example_id: row for row in b.rows}
    shown = [row for row in a.rows if row.example_id in flipped][:examples]
    lines.append(f"First {len(shown)} of {len(flipped)} examples where they differ:")
    width = max(len(str(row.example_id)) for row in shown)
    for row in shown:
        other = by_id_b[row.example_id]
        verb = "a wins " if row.score > other.score else "a loses"
        lines.append(f"  {row.example_id!s:<{width}}  {verb}  a: {_short(row)}  b: {_short(other)}")
        lines.append(f"  {'':<{width}}  input: {_clip(_plain(row.example), 88)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the statistics


def bootstrap_ci(
    scores: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of ``scores`` (NaN, NaN when empty).

    Raises:
        ValueError: bad ``confidence``, ``resamples`` or ``seed``.
    """
    check_options(confidence, resamples, seed)
    if not scores:
        return Interval(math.nan, math.nan)
    means = _resample_means([list(scores)], resamples, seed)
    return _intervals(means, confidence)[0]


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: ``2 * P(X <= min(wins, losses))``, X ~ Binomial(m, 1/2).

    Ties are left out before calling. On 0/1 scores this is the exact McNemar test, the
    discordant pairs being the wins and the losses.
    """
    m, k = wins + losses, min(wins, losses)
    if m == 0 or wins == losses:
        return 1.0
    if m <= _EXACT_LIMIT:
        term = tail = 1
        for i in range(1, k + 1):
            term = term * (m - i + 1) // i
            tail += term
        return min(1.0, tail / (1 << (m - 1)))
    # Large m: sum the tail down from its largest term, in floats relative to that term.
    log_top = math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) - m * math.log(2)
    relative, ratio = 1.0, 1.0
    for i in range(k, 0, -1):
        ratio *= i / (m - i + 1)
        relative += ratio
        if ratio < 1e-17 * relative:
            break
    return min(1.0, 2.0 * math.exp(log_top) * relative)


def permutation_test(diffs: Sequence[float], resamples: int, seed: int) -> float:
    """Two-sided paired permutation test of mean ``diffs`` = 0, by random sign flips.

    Returns ``(1 + hits) / (1 + resamples)``, where a hit is a flip whose absolute sum reaches the
    observed one; never 0, and exactly 1 when every difference is 0.
    """
    nonzero = [abs(d) for d in diffs if d != 0]
    if not nonzero:
        return 1.0
    observed = abs(math.fsum(diffs))
    total = math.fsum(nonzero)
    threshold = observed - 1e-10 * total  # absorb rounding in sums that are equal
    np = _numpy()
    if np is not None:
        hits = _flip_hits_numpy(np, nonzero, total, threshold, resamples, seed)
    else:
        hits = _flip_hits_python(nonzero, total, threshold, resamples, seed)
    return (1 + hits) / (1 + resamples)


def holm(p_values: Sequence[float]) -> tuple[float, ...]:
    """Holm's step-down adjustment of ``p_values`` (same order in and out)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return tuple(adjusted)


def format_p(p: float) -> str:
    """A p-value for people: three decimals, or scientific notation below 0.001."""
    if math.isnan(p):
        return "nan"
    if p == 0.0:
        return "<1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def check_options(confidence: float, resamples: int, seed: int) -> None:
    """Validate the options shared by :func:`compare` and ``EvaluationResult.ci``.

    Raises:
        ValueError: ``confidence`` not strictly between 0 and 1, ``resamples`` not a positive
            int, or ``seed`` not a non-negative int.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise ValueError(f"confidence must be a number between 0 and 1, got {confidence!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int (e.g. 10_000), got {resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# --------------------------------------------------------------------------------- the plumbing


def _align(
    a: EvaluationResult, b: EvaluationResult, *, common_only: bool
) -> tuple[list[tuple[Any, Any]], int, int]:
    by_id_b = {row.example_id: row for row in b.rows}
    ids_a = [row.example_id for row in a.rows]
    for result, count in ((a, len(set(ids_a))), (b, len(by_id_b))):
        if count != len(result.rows):
            raise ValueError(
                f"config {result.config!r} has {len(result.rows) - count} duplicate example "
                "ids; pairing needs one row per example id"
            )
    set_a = set(ids_a)
    missing_in_a = sum(i not in set_a for i in by_id_b)
    missing_in_b = sum(i not in by_id_b for i in ids_a)
    pairs = [(row, by_id_b[row.example_id]) for row in a.rows if row.example_id in by_id_b]
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


def _short(row: Any) -> str:
    """A row's prediction (or error) and score, in a few words for a terminal line."""
    shown = f"<{row.error.type}>" if row.error is not None else _clip(_plain(row.prediction), 32)
    return f"{shown} ({row.score:g})"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    try:
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _ids(count: int) -> str:
    return f"{count} example id{'' if count == 1 else 's'}"


def _binary(values: Sequence[float]) -> bool:
    return all(v == 0.0 or v == 1.0 for v in values)


def _numpy() -> Any:
    """The numpy module, or None: numpy is an optional speed-up, not a dependency."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _intervals(columns: list[Any], confidence: float) -> list[Interval]:
    """Intervals from resampled means: one per column, then ``column 0 - column 1`` if two.

    Each column holds one mean per resample (a list, or a numpy array).
    """
    tail = (1.0 - confidence) / 2.0
    if len(columns) == 2:
        x, y = columns
        columns = [
            *columns,
            [u - v for u, v in zip(x, y, strict=True)] if isinstance(x, list) else x - y,
        ]
    out = []
    for column in columns:
        ordered = column.copy()
        ordered.sort()
        out.append(Interval(_quantile(ordered, tail), _quantile(ordered, 1.0 - tail)))
    return out


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default method)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _resample_means(columns: list[list[float]], resamples: int, seed: int) -> list[Any]:
    """Per column, its means over ``resamples`` bootstrap resamples of the rows (the examples).

    Every column is resampled with the same rows, so the pairing is kept.
    """
    np = _numpy()
    if np is not None:
        return _resample_means_numpy(np, columns, resamples, seed)
    return _resample_means_python(columns, resamples, seed)


def _resample_means_numpy(
    np: Any, columns: list[list[float]], resamples: int, seed: int
) -> list[Any]:
    data = np.asarray(columns, dtype=float).T  # (n, columns)
    n = data.shape[0]
    rng = np.random.default_rng([seed, 0])
    values, counts = np.unique(data, axis=0, return_counts=True)
    if 4 * len(values) <= n:
        # Few distinct rows (0/1 scores: at most 4 pairs): a resample is a multinomial count
        # of each distinct row, the same distribution as drawing n examples.
        draws = rng.multinomial(n, counts / n, size=resamples)
        means = (draws @ values) / n
        return [means[:, j] for j in range(data.shape[1])]
    means = np.empty((resamples, data.shape[1]))
    step = max(1, _CHUNK // n)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        picks = rng.integers(0, n, size=(stop - start, n))
        for j in range(data.shape[1]):
            means[start:stop, j] = data[:, j][picks].mean(axis=1)
    return [means[:, j] for j in range(data.shape[1])]


def _resample_means_python(
    columns: list[list[float]], resamples: int, seed: int
) -> list[list[float]]:
    rng = random.Random(f"procval-bootstrap:{seed}")
    n = len(columns[0])
    positions = range(n)
    means: list[list[float]] = [[] for _ in columns]
    for _ in range(resamples):
        pick = operator.itemgetter(*rng.choices(positions, k=n))
        for column, out in zip(columns, means, strict=True):
            out.append(math.fsum(pick(column)) / n if n > 1 else column[0])
    return means


def _flip_hits_numpy(
    np: Any, nonzero: list[float], total: float, threshold: float, resamples: int, seed: int
) -> int:
    rng = np.random.default_rng([seed, 1])
    values, counts = np.unique(np.asarray(nonzero), return_counts=True)
    hits = 0
    if 8 * len(values) <= len(nonzero):
        # Few distinct |d|: the number flipped to + among each value's copies is binomial.
        step = max(1, _CHUNK // len(values))
        for start in range(0, resamples, step):
            plus = rng.binomial(counts, 0.5, size=(min(step, resamples - start), len(values)))
            hits += int(np.count_nonzero(np.abs(2.0 * (plus @ values) - total) >= threshold))
        return hits
    d = np.asarray(nonzero)
    step = max(1, _CHUNK // len(d))
    for start in range(0, resamples, step):
        bits = rng.integers(0, 2, size=(min(step, resamples - start), len(d)), dtype=np.int8)
        hits += int(np.count_nonzero(np.abs(2.0 * (bits @ d) - total) >= threshold))
    return hits


def _flip_hits_python(
    nonzero: list[float], total: float, threshold: float, resamples: int, seed: int
) -> int:
    rng = random.Random(f"procval-permutation:{seed}")
    groups = Counter(nonzero)
    hits = 0
    if 8 * len(groups) <= len(nonzero):
        # Few distinct |d|: count the + signs among each value's copies with a popcount.
        items = sorted(groups.items())
        for _ in range(resamples):
            plus = math.fsum(v * bin(rng.getrandbits(c)).count("1") for v, c in items)
            hits += abs(2.0 * plus - total) >= threshold
        return hits
    width = len(nonzero)
    for _ in range(resamples):
        bits = format(rng.getrandbits(width), f"0{width}b").encode().translate(_FLIPS)
        plus = math.fsum(itertools.compress(nonzero, bits))
        hits += abs(2.0 * plus - total) >= threshold
    return hits
