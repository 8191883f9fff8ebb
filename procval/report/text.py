"""The report as plain text: p-values for people and what ``procval compare`` prints."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from procval._convert import to_jsonable
from procval.report.protocol import per_example

if TYPE_CHECKING:
    from procval.report.compare import Comparison
    from procval.report.protocol import ResultLike, RowLike

__all__ = ["describe", "format_p", "group_table", "per_correct", "spend_lines", "usage_text"]


def format_p(p: float) -> str:
    """A p-value for people: three decimals, or scientific notation below 0.001."""
    if math.isnan(p):
        return "nan"
    if p == 0.0:
        return "<1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def describe(comparison: Comparison, a: ResultLike, b: ResultLike, *, examples: int = 5) -> str:
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
    by_id_b = {row.example_id: row for row in per_example(b)}
    shown = [row for row in per_example(a) if row.example_id in flipped][:examples]
    lines.append(f"First {len(shown)} of {len(flipped)} examples where they differ:")
    width = max(len(str(row.example_id)) for row in shown)
    for row in shown:
        other = by_id_b[row.example_id]
        verb = "a wins " if row.score > other.score else "a loses"
        lines.append(f"  {row.example_id!s:<{width}}  {verb}  a: {_short(row)}  b: {_short(other)}")
        lines.append(f"  {'':<{width}}  input: {_clip(_plain(row.example), 88)}")
    return "\n".join(lines)


def group_table(
    groups: Mapping[str, ResultLike], prefix: str = "  ", *, confidence: float = 0.95
) -> list[str]:
    """One config's scores by group as table lines: score, bootstrap interval, examples, errors.

    With named scores, each other score's mean follows in a column of its own.

    Args:
        groups: ``result.by_group()``.
        prefix: put before every line (an indent).
        confidence: level of the intervals (bootstrap over the group's examples, seed 0).

    Returns:
        A header line and one line per group (none when there are no groups).
    """
    if not groups:
        return []
    means = {
        name: dict(getattr(g, "scores", None) or {"score": g.score}) for name, g in groups.items()
    }
    others = list(dict.fromkeys(n for found in means.values() for n in list(found)[1:]))
    width = max(len("group"), *(len(name) for name in groups))
    level = f"{confidence:.0%} CI"
    first = next(iter(means.values()))
    score = next(iter(first)) if list(first) != ["score"] else "score"
    lines = [
        f"{prefix}{'group':<{width}}  {score:>7}  {level:^18}  {'examples':>8}  {'errors':>6}"
        + "".join(f"  {n:>{max(7, len(n))}}" for n in others)
    ]
    for name, group in groups.items():
        ci = group.ci(confidence=confidence)
        n = len(per_example(group))
        lines.append(
            f"{prefix}{name:<{width}}  {group.score:>7.4f}  [{ci.low:.4f}, {ci.high:.4f}]  "
            f"{n:>8}  {group.totals.errors:>6}"
            + "".join(f"  {means[name].get(o, math.nan):>{max(7, len(o))}.4f}" for o in others)
        )
    return lines


def usage_text(usage: Any) -> str:
    """A ``Usage`` in a few words: ``12 calls (2 cached), 1,530 tokens (...), cost 0.0021``."""
    cached = f" ({usage.cached_calls:,} cached)" if usage.cached_calls else ""
    cost = "cost unknown" if usage.cost is None else f"cost {usage.cost:.4g}"
    return (
        f"{usage.calls:,} calls{cached}, {usage.total_tokens:,} tokens "
        f"({usage.prompt_tokens:,} prompt, {usage.completion_tokens:,} completion), {cost}"
    )


def per_correct(result: ResultLike) -> tuple[float, float | None]:
    """``(tokens, cost)`` per correct answer of ``result``, over all its models.

    Correct answers are the score summed over the examples (for a 0/1 metric, the number of
    correct answers), from the result's totals: no row is read. NaN (and a NaN cost) when there
    is no correct answer; the cost is None when no model's cost is known.
    """
    usage = getattr(result, "usage", None) or {}
    tokens = sum(u.total_tokens for u in usage.values())
    costs = [u.cost for u in usage.values() if u.cost is not None]
    correct = getattr(result.totals, "score_sum", math.nan)
    if not correct or math.isnan(correct):
        return math.nan, (math.nan if costs else None)
    return tokens / correct, (math.fsum(costs) / correct if costs else None)


def spend_lines(prefix: str, result: ResultLike) -> list[str]:
    """What ``result`` spent, model by model, then per correct answer (no lines if nothing).

    Each line starts with ``prefix`` (an indent, or the config's name and a colon).
    """
    usage = getattr(result, "usage", None) or {}
    if not usage:
        return []
    lines = [f"{prefix}{model}: {usage_text(spent)}" for model, spent in usage.items()]
    tokens, cost = per_correct(result)
    cost_text = "" if cost is None else f", cost {cost:.4g}"
    lines.append(f"{prefix}per correct answer: {tokens:,.1f} tokens{cost_text}")
    return lines


def _short(row: RowLike) -> str:
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
