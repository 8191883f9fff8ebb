"""The statistics behind :func:`procval.report.compare`, on plain lists of scores.

What the comparison needs, without rows, configs or example ids: percentile bootstrap intervals
(:func:`bootstrap_ci`; ``_resample_means`` and ``_intervals`` for paired columns), the exact sign
test (:func:`sign_test`), the paired permutation test (:func:`permutation_test`), Holm's
adjustment (:func:`holm`) and the checks of the options they share (:func:`check_options`).
:mod:`procval.report.compare` pairs the rows and calls these; it re-exports the public names.

Resampling uses numpy when it is installed and pure Python otherwise. With numpy, scores with
few distinct values are resampled as multinomial counts of those values, which is the same
bootstrap and costs nothing per example. The two paths draw different resamples from the same
seed: results are deterministic for a seed on a given installation, and agree across
installations up to resampling noise.
"""

from __future__ import annotations

import itertools
import math
import operator
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

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
