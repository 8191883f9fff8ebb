"""Views of a result that need more than a format string: summary lines, a pandas frame."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procval.results import EvaluationResult, Row


def example_of(sample: tuple[int | str, str] | None, width: int = 160) -> str:
    """``", e.g. ID: first line of the message"`` (clipped to ``width``), or "" for None."""
    if sample is None:
        return ""
    example_id, message = sample
    lines = message.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > width:
        first = first[: width - 1] + "…"
    return f", e.g. {example_id}: {first}" if first else f", e.g. {example_id}"


def all_failed(result: EvaluationResult) -> str:
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


def kept_line(result: EvaluationResult) -> str:
    """What the store keeps out of a result resumed with fewer epochs than it holds, or ""."""
    rows, epochs = result._kept
    if not rows:
        return ""
    which = (
        f"epoch {epochs - 1}"
        if epochs - 1 == result.epochs
        else (f"epochs {result.epochs} to {epochs - 1}")
    )
    return (
        f"{rows} stored rows of {which} are not counted "
        f"(this run has epochs={result.epochs}); they stay in the store: epochs={epochs} "
        "counts them again without rerunning them"
    )


def named_scores(result: EvaluationResult) -> str:
    """``"em 0.5000, f1 0.7500"`` when the config has named scores, else ""."""
    scores = result.scores
    if list(scores) == ["score"]:
        return ""
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())


def data_frame(rows: Sequence[Row], names: list[str]) -> Any:
    """``rows`` as a ``pandas.DataFrame`` of the Row fields ``names``, ``error`` split in three.

    Raises:
        ImportError: pandas is not installed (``pip install 'procval[pandas]'``).
    """
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install 'procval[pandas]'") from None
    columns: list[str] = []
    for name in names:
        columns += ["error_type", "error_message", "error_traceback"] if name == "error" else [name]
    records = []
    for row in rows:
        record = {name: getattr(row, name, None) for name in columns}
        if row.error is not None:
            record["error_type"] = row.error.type
            record["error_message"] = row.error.message
            record["error_traceback"] = row.error.traceback
        records.append(record)
    return pandas.DataFrame.from_records(records, columns=columns)


def result_summary(result: EvaluationResult) -> str:
    """:meth:`procval.EvaluationResult.summary`."""
    totals = result.totals
    if not totals.n:
        return "\n".join([
            f"config {result.config!r}: no rows (none of its examples finished: it was "
            "stopped, or its workers could not start; see the output of its run)",
            *(f"  {line}" for line in budget_lines(result)),
        ])  # fmt: skip
    samples = result._error_samples()
    over = f"{totals.n} examples"
    if result.epochs > 1:
        over = f"{len(result.examples())} examples x {result.epochs} epochs ({totals.n} rows)"
    lines = [
        f"config {result.config!r}: score {result.score:.4f} over {over} "
        f"({totals.errors} errors) in {result.duration:.2f}s"
    ]
    named = named_scores(result)
    if named:
        lines.append(f"  scores: {named}")
    warning = all_failed(result)
    if warning:
        lines.append(f"  {warning}")
    for kind, count in result.error_types.items():
        lines.append(f"  {count} x {kind}{example_of(samples.get(kind))}")
    lines.extend(group_lines(result, "  "))
    if result.replaced_workers:
        lines.append(f"  {result.replaced_workers} workers lost and replaced")
    kept = kept_line(result)
    if kept:
        lines.append(f"  {kept}")
    lines.extend(f"  {line}" for line in limit_lines(result.limits))
    lines.extend(f"  {line}" for line in budget_lines(result))
    if result.usage:
        from procval.report.text import spend_lines

        lines.extend(spend_lines("  ", result))
    return "\n".join(lines)


def results_summary(results: Mapping[str, EvaluationResult]) -> str:
    """:meth:`procval.Results.summary`."""
    width = max([len("config"), *(len(name) for name in results)])
    lines = [f"{'config':<{width}}  {'score':>7}  {'n':>7}  {'errors':>6}  {'time':>8}"]
    for name, result in results.items():
        totals = result.totals
        score = f"{result.score:>7.4f}" if totals.n else f"{'-':>7}"  # no rows: no score
        lines.append(
            f"{name:<{width}}  {score}  {totals.n:>7}  {totals.errors:>6}  {result.duration:>7.2f}s"
        )
    for name, result in results.items():
        named = named_scores(result) if result.totals.n else ""
        if named:
            lines.append(f"{name} scores: {named}")
    for name, result in results.items():
        warning = all_failed(result)
        if warning:
            lines.append(f"{name}: {warning}")
    for name, result in results.items():
        groups = group_lines(result, "  ")
        if groups:
            lines.append(f"{name} by group:")
            lines.extend(groups)
        kept = kept_line(result)
        if kept:
            lines.append(f"{name}: {kept}")
    replaced = [f"{n} {r.replaced_workers}" for n, r in results.items() if r.replaced_workers]
    if replaced:
        lines.append(f"workers lost and replaced: {', '.join(replaced)}")
    for name, result in results.items():
        lines.extend(f"{name}: {line}" for line in limit_lines(result.limits))
        lines.extend(f"{name}: {line}" for line in budget_lines(result))
        if result.usage:
            from procval.report.text import spend_lines

            lines.extend(spend_lines(f"{name}: ", result))
    return "\n".join(lines)


def group_lines(result: EvaluationResult, prefix: str) -> list[str]:
    """``result``'s scores by group, as table lines (none when its rows have no groups)."""
    from procval._groups import group_names

    if not result.totals.n or not group_names(result):
        return []
    from procval.report.text import group_table

    return group_table(result.by_group(), prefix)


def budget_lines(result: EvaluationResult) -> list[str]:
    """Why a budget stopped the config and how to resume, and a budget it could not check."""
    return [line for line in (result.stopped, result._budget_warning) if line]


def limit_lines(limits: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One summary line per rate-limit key: calls, 429s, waits."""
    return [
        f"rate limit {key!r}: {int(c.get('calls', 0))} calls, {int(c.get('rate_limited', 0))} "
        f"answered 429, {int(c.get('waits', 0))} waited {c.get('wait_seconds', 0.0):.1f}s in all"
        for key, c in limits.items()
    ]
