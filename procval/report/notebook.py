"""The notebook views: ``_repr_html_`` of a result and of a comparison table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from procval.report.markup import bar_svg, ci_text, clip, domain, esc, num
from procval.report.text import format_p

if TYPE_CHECKING:
    from procval.report.compare import Comparison, ComparisonTable
    from procval.report.protocol import ResultLike

__all__ = ["render_result", "render_table"]


def render_result(result: ResultLike, *, errors: int = 5) -> str:
    """The notebook view of one result: score, interval, counts and the first errors."""
    interval = result.ci()
    lo, hi = domain([result.score], [interval])
    totals = result.totals
    out = [
        "<div><table><tr><th>config</th><th class='num'>score</th><th>95% CI</th><th></th>"
        "<th class='num'>examples</th><th class='num'>errors</th><th class='num'>time</th></tr>",
        f"<tr><td>{esc(result.config)}</td><td class='num'>{num(result.score)}</td>"
        f"<td class='num'>{ci_text(interval)}</td>"
        f"<td>{bar_svg(result.score, interval, lo, hi)}</td><td class='num'>{totals.n}</td>"
        f"<td class='num'>{totals.errors}</td><td class='num'>{result.duration:.2f}s</td></tr>"
        "</table>",
    ]
    failed = result.errors
    if failed:
        out.append(f"<p>First {min(errors, len(failed))} of {len(failed)} errors:</p><ul>")
        for row in failed[:errors]:
            error = row.error
            assert error is not None
            out.append(
                f"<li>example {esc(repr(row.example_id))}: <b>{esc(error.type)}</b>: "
                f"{esc(clip(error.message))}</li>"
            )
        out.append("</ul>")
    return "".join(out) + "</div>"


def render_table(table: ComparisonTable) -> str:
    """The notebook view of a :class:`procval.ComparisonTable`."""
    named = any(c.score_name is not None for c in table)
    grouped = any(c.group is not None for c in table)

    def which(c: Comparison) -> str:  # score and group columns, when the table has them
        return (f"<td>{esc(c.score_name)}</td>" if named else "") + (
            f"<td>{esc(c.group or '(all)')}</td>" if grouped else ""
        )

    head = (
        "<table><tr><th>a</th><th>b</th>"
        + ("<th>score</th>" if named else "")
        + ("<th>group</th>" if grouped else "")
        + "<th class='num'>n</th><th class='num'>a − b</th>"
        "<th class='num'>CI</th><th class='num'>p</th><th class='num'>p (Holm)</th>"
        "<th class='num'>wins</th><th class='num'>losses</th><th class='num'>ties</th></tr>"
    )
    rows = [
        f"<tr><td>{esc(c.a)}</td><td>{esc(c.b)}</td>{which(c)}<td class='num'>{c.n}</td>"
        f"<td class='num'>{num(c.difference, signed=True)}</td>"
        f"<td class='num'>{ci_text(c.ci, signed=True)}</td><td class='num'>"
        f"{format_p(c.p_value)}</td><td class='num'>{format_p(p)}</td>"
        f"<td class='num'>{len(c.wins)}</td><td class='num'>{len(c.losses)}</td>"
        f"<td class='num'>{len(c.ties)}</td></tr>"
        for c, p in zip(table, table.p_adjusted, strict=True)
    ]
    return head + "".join(rows) + "</table>"
